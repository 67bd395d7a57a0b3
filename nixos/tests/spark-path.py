# Test script of nixos/tests/spark-path.nix (common.py comes first): the
# vm-tests story "spark-path" (vm-tests/README.md) on NixOS VMs, with the
# assertions of its namespace version, tests/vm_spark_path.rs.
#
# The publisher builds the fixture flake's packages in its own store and
# copies them, derivations included, into two Nix roots it serves over NFS:
# /srv/roots/with-hello/nix (hello and "with.dot") and
# /srv/roots/without-hello/nix ("with.dot" only). Every executor mounts
# /srv/roots on /mnt/pub and stacks one of them, with the flake tree at
# /nixfs. Builds are counted exactly: the flake's builders append their
# name to BUILDS, one file per VM.

import base64
import json

REF = "myflake#hello"
STR_ENTRY = f"/nixfs/flake/str/{REF}"
B64_ENTRY = "/nixfs/flake/b64/" + base64.urlsafe_b64encode(REF.encode()).decode().rstrip("=")
WITH_HELLO = f"{ROOTS}/with-hello"
WITHOUT_HELLO = f"{ROOTS}/without-hello"

executors = [exec_a, exec_b, exec_c]

start_all()
serve_roots(publisher)
for m in [publisher] + executors:
    m.wait_for_unit("multi-user.target")
    m.succeed(f"mkdir -p /srv && cp -r {FLAKE_SRC} /srv/flake")

with subtest("the publisher makes two roots: one with myflake#hello built, one without"):
    # As nixfs-layer evaluates: no lock file written into the flake.
    hello_drv = publisher.succeed(
        "nix eval --raw --no-write-lock-file myflake#hello.drvPath"
    ).strip()
    dotted_drv = publisher.succeed(
        "nix eval --raw --no-write-lock-file 'myflake#\"with.dot\".drvPath'"
    ).strip()
    hello = publisher.succeed(f"nix-store --realise {hello_drv}").strip()
    publisher.succeed(f"nix-store --realise {dotted_drv}")
    publisher.succeed(
        f"nix copy --no-check-sigs --to {WITH_HELLO}"
        f" $(nix-store -qR --include-outputs {hello_drv} {dotted_drv})"
    )
    publisher.succeed(
        f"nix copy --no-check-sigs --to {WITHOUT_HELLO}"
        f" $(nix-store -qR --include-outputs {dotted_drv})"
    )
    publisher.succeed(f"test -d {WITH_HELLO}/nix/store/{base_name(hello)}")
    publisher.fail(f"test -e {WITHOUT_HELLO}/nix/store/{base_name(hello)}")
    roots = digest(publisher, ROOTS)

with subtest("each executor stacks its root, with the flake tree"):
    for m in executors:
        # Mounts /mnt/pub first (RequiresMountsFor), then the stack and the
        # tree at /nixfs.
        m.succeed("systemctl start nixfs-layer.service")
        m.succeed("mountpoint -q /nixfs")
        assert builds(m) == [], f"[{m.name}] nothing built yet"

with subtest("six readers on three hosts resolve the same static path at once"):
    # Two readers per executor (the str and b64 names of one reference),
    # all started before any is waited for; in the background (set +e: the
    # driver's shell has errexit on), the exit status last, in one rename.
    for m in executors:
        for i, entry in enumerate([STR_ENTRY, B64_ENTRY]):
            m.succeed(
                f"(set +e; (readlink '{entry}' && '{entry}/bin/hello') > /tmp/reader{i}.out"
                f" 2> /tmp/reader{i}.err; echo $? > /tmp/reader{i}.rc.new;"
                f" mv /tmp/reader{i}.rc.new /tmp/reader{i}.rc) > /dev/null 2>&1 &"
            )
    for m in executors:
        for i, entry in enumerate([STR_ENTRY, B64_ENTRY]):
            m.wait_for_file(f"/tmp/reader{i}.rc")
            rc = m.succeed(f"cat /tmp/reader{i}.rc").strip()
            assert rc == "0", f"[{m.name}] {entry}: " + m.succeed(f"cat /tmp/reader{i}.err")
            out = m.succeed(f"cat /tmp/reader{i}.out")
            assert out == f"{hello}\nhello from hello\n", (
                f"[{m.name}] {entry} is the same static path everywhere and runs: {out}"
            )

with subtest("the executor whose lower has it built nothing; the others once each"):
    assert builds(exec_a) == [], "exec-a's lower has the path: nothing built"
    assert upper_entries(exec_a) == [], (
        f"exec-a's upper stays empty: {upper_entries(exec_a)}"
    )
    for m in [exec_b, exec_c]:
        assert builds(m) == ["hello"], (
            f"[{m.name}] exactly one build for two readers: {builds(m)}"
        )
        # Into its own upper, not its lower.
        m.succeed(f"test -d {UPPER}/store/{base_name(hello)}")
        m.fail(f"test -e /mnt/pub/without-hello/nix/store/{base_name(hello)}")
    for m, how in [(exec_a, "lower-hit"), (exec_b, "upper-hit"), (exec_c, "upper-hit")]:
        answer = json.loads(m.succeed(f"nixfs-layer resolve --json '{REF}'"))
        assert answer["path"] == hello, f"[{m.name}] {answer}"
        assert answer["how"] == how, f"[{m.name}] {answer}"

with subtest("again, warm: nothing more is built anywhere"):
    for m in executors:
        assert m.succeed(f"'{STR_ENTRY}/bin/hello'") == "hello from hello\n"
    assert [len(builds(m)) for m in executors] == [0, 1, 1]
    assert digest(publisher, ROOTS) == roots, "the publisher's roots are untouched"

with subtest("stopping the service removes the flake tree and the stack"):
    for m in executors:
        m.succeed("systemctl stop nixfs-layer.service")
        m.fail("mountpoint -q /nixfs")
        m.fail("mountpoint -q /nix/store")
