# Test script of nixos/tests/nfs-fleet.nix (common.py comes first): the
# vm-tests story "nfs-fleet" (vm-tests/README.md) on NixOS VMs, with the
# assertions of its namespace version, tests/vm_nfs_fleet.rs.
#
# The publisher builds fixtures in its own store and copies their closures,
# derivations included, into the Nix root /srv/roots/nix, which it serves
# read-only over NFS. The runners mount it on /mnt/pub: /mnt/pub/nix is the
# top lower of the stack their nixfs-layer service mounts on /nix.

import time

# The publisher's Nix root is ROOTS/nix; the runners mount ROOTS on /mnt/pub.
LOWER = "/mnt/pub/nix"
# How long each runner's job builds (seconds). The overlap of the two jobs
# is judged by the VMs' clocks, which may be a second or two apart.
HOLD = 10

runners = [runner1, runner2]


def store_mount_id(m):
    """The mount id of what is mounted on /nix/store."""
    return m.succeed(
        "awk '$5 == \"/nix/store\" { print $1 }' /proc/self/mountinfo"
    ).strip()


def job_times(m, path):
    """When a fleet job started and finished building (the VM's clock)."""
    return (
        float(m.succeed(f"cat {path}/started")),
        float(m.succeed(f"cat {path}/finished")),
    )


start_all()
serve_roots(publisher)

with subtest("the publisher builds a Nix root and serves it"):
    app = with_suffix(publish(publisher, ROOTS, STORE_NIX, ["app", "tool"]), "-app")
    liba_dev = with_suffix(
        publisher.succeed(f"nix-store -q --references {app}").split(), "-liba-dev"
    )

with subtest("each runner stacks the NFS root under an upper of its own"):
    for r in runners:
        r.wait_for_unit("multi-user.target")
        # Mounts /mnt/pub first (RequiresMountsFor), then the stack.
        r.succeed("systemctl start nixfs-layer.service")
        fstype = r.succeed("findmnt -n -o FSTYPE /mnt/pub").strip()
        assert fstype.startswith("nfs"), f"{r.name}: /mnt/pub is {fstype}"
        assert r.succeed("findmnt -n -o FSTYPE /nix/store").strip() == "overlay"
        options = r.succeed("findmnt -n -o OPTIONS /nix/store")
        assert f"{LOWER}/store" in options, f"{r.name}: {options}"
        assert valid(r, app), f"{r.name}: the published app is valid"
        assert r.succeed(f"{app}/bin/app") == "hello from app\n"
        assert upper_entries(r) == [], f"reading wrote nothing to {r.name}'s upper"
    published = digest(publisher, ROOTS)

with subtest("both runners build at the same time and see no trace of each other"):
    # In the background (set +e: the driver's shell has errexit on), the
    # exit status last, in one rename.
    for r, job in ((runner1, "r1"), (runner2, "r2")):
        r.succeed(
            f"(set +e; nix-build --no-out-link {FLEET_NIX} --argstr job {job} --arg hold {HOLD}"
            " -A job > /tmp/job.out 2> /tmp/job.err; echo $? > /tmp/job.rc.new;"
            " mv /tmp/job.rc.new /tmp/job.rc) > /dev/null 2>&1 &"
        )
    jobs: dict[str, str] = {}
    for r in runners:
        r.wait_for_file("/tmp/job.rc")
        rc = r.succeed("cat /tmp/job.rc").strip()
        assert rc == "0", f"{r.name}'s build: " + r.succeed("cat /tmp/job.err")
        jobs[r.name] = r.succeed("cat /tmp/job.out").strip()
    j1, j2 = jobs["runner1"], jobs["runner2"]
    assert j1.endswith("-job-r1") and j2.endswith("-job-r2"), f"{j1} {j2}"
    s1, f1 = job_times(runner1, j1)
    s2, f2 = job_times(runner2, j2)
    assert s1 < f2 and s2 < f1, (
        f"the two builds overlapped in time: runner1 {s1}..{f1}, runner2 {s2}..{f2}"
    )
    for me, mine, theirs, tag in (
        (runner1, j1, j2, "job-r1"),
        (runner2, j2, j1, "job-r2"),
    ):
        assert me.succeed(f"cat {mine}/app-said") == "hello from app\n", (
            "the job ran the lower's app"
        )
        assert valid(me, mine)
        # No trace of the other runner's build: not valid, no file, not listed.
        assert not valid(me, theirs), f"{me.name} sees {theirs}"
        me.fail(f"test -e {theirs}")
        assert base_name(theirs) not in me.succeed("nix path-info --all"), (
            f"{me.name} lists {theirs}"
        )
        ups = upper_entries(me)
        assert ups and all(tag in e for e in ups), (
            f"{me.name}'s upper holds its own job only: {ups}"
        )
    assert digest(publisher, ROOTS) == published, (
        "the runners wrote nothing to the published root"
    )

with subtest("the publisher adds a path; the runners sync and use it, stacks left mounted"):
    extra = publish(publisher, ROOTS, STORE_NIX, ["extra"])[0]
    ids = [store_mount_id(r) for r in runners]
    for r in runners:
        assert not valid(r, extra), "not valid before sync"
        out = r.succeed("nixfs-layer sync")
        assert out.startswith("sync: added ") and not out.startswith("sync: added 0"), out
        assert valid(r, extra), f"{r.name}: the published path is valid after sync"
        assert r.succeed(f"{extra}/bin/extra") == "hello from extra\n"
    assert [store_mount_id(r) for r in runners] == ids, "sync did not remount the stacks"
    assert valid(runner1, j1) and valid(runner2, j2), (
        "the runners' builds stay valid across sync"
    )
    uses = runner1.succeed(
        f"nix-build --no-out-link {FLEET_NIX} --argstr job r1 -A usesExtra"
    ).strip()
    assert runner1.succeed(f"cat {uses}/extra-said") == "hello from extra\n"
    ups = upper_entries(runner1)
    assert all("job-r1" in e or "uses-extra-r1" in e for e in ups), (
        f"nothing of the published path was built or copied into the upper: {ups}"
    )

with subtest("runner1 is cut off: reads fail with an I/O error, its upper is intact"):
    header = f"{liba_dev}/include/liba.h"
    rows = (
        f"sqlite3 -readonly {UPPER}/var/nix/db/db.sqlite"
        f" \"select count(*) from ValidPaths where path in ('{j1}', '{uses}')\""
    )
    assert runner1.succeed(rows).strip() == "2"
    before_cut = digest(runner1, f"{UPPER}/store")
    # Everything run on runner1 during the cut (the driver's shell tools,
    # cat, nixfs-layer, sqlite3, find, sha256sum) has run before: their
    # store paths are looked up already, only the lower's files need the
    # network.
    runner1.succeed("nixfs-layer --help > /dev/null")
    runner1.block()
    started = time.monotonic()
    status, out = runner1.execute(f"timeout 120 cat {header} 2>&1")
    took = time.monotonic() - started
    runner1.log(f"read of a lower file with the network cut: {took:.1f} s: {out}")
    assert status != 0, "a lower file runner1 never read cannot be read with the network down"
    assert status != 124, f"the read fails rather than hangs (took {took:.0f} s)"
    # EIO from the soft mount (the namespace version, on sshfs, sees EIO or
    # ENOTCONN); ETIMEDOUT or ESTALE would be the NFS client's other ways
    # of saying the server did not answer.
    assert any(
        e in out
        for e in ["Input/output error", "Connection timed out", "Stale file handle"]
    ), f"the read fails with an I/O error, not wrong data: {out}"
    status, out = runner1.execute("nixfs-layer sync 2>&1")
    assert status == 74, f"sync with the lower unreachable: {out}"
    assert LOWER in out and "cannot be read" in out, f"sync names the unreachable lower: {out}"
    # The other runner goes on.
    assert runner2.succeed(f"cat {header}") == "liba\n"
    assert runner2.succeed("nixfs-layer sync").startswith("sync: added 0")
    # Nothing of runner1's upper is lost: same bytes, same rows.
    assert digest(runner1, f"{UPPER}/store") == before_cut, (
        "runner1's upper is intact during the outage"
    )
    assert runner1.succeed(rows).strip() == "2", "runner1's builds are still registered"

with subtest("the network comes back: runner1 reads, syncs and verifies again"):
    runner1.unblock()
    started = time.monotonic()
    runner1.wait_until_succeeds(f"cat {header} > /dev/null", timeout=300)
    runner1.log(
        f"lower readable again {time.monotonic() - started:.1f} s after the link came back"
    )
    assert runner1.succeed(f"cat {header}") == "liba\n"
    out = runner1.succeed("nixfs-layer sync")
    assert out.startswith("sync: "), out
    for p in (j1, app, extra):
        assert valid(runner1, p), f"{p} is valid after recovery"
    assert (
        runner1.succeed(f"cat {j1}/app-said && {uses}/bin/uses-extra-r1")
        == "hello from app\nhello from uses-extra-r1\n"
    )
    assert runner1.succeed(f"{app}/bin/app") == "hello from app\n"
    status, out = runner1.execute("nixfs-layer verify 2>&1")
    assert status == 0, f"verify after recovery: {out}"
    assert digest(runner1, f"{UPPER}/store") == before_cut, (
        "recovery changed nothing in the upper"
    )

with subtest("stopping the service unmounts the stack"):
    for r in runners:
        r.succeed("systemctl stop nixfs-layer.service")
        r.fail("mountpoint -q /nix/store")
        r.fail("mountpoint -q /nix/var")
