# Test script of nixos/tests/template-update.nix (common.py comes first): the
# vm-tests story "template-update" (vm-tests/README.md) on NixOS VMs, with
# the assertions of its namespace version, tests/vm_template_update.rs.
#
# The template builds fixtures in its own store and copies their closures,
# derivations included, into the Nix root /srv/roots/nix, which it serves
# read-only over NFS. The AppVM mounts it on /mnt/template at boot, and its
# nixfs-layer service stacks /mnt/template/nix under the upper on its own
# disk (/var/lib/nixfs-layer), which is kept across reboots.

import json

LOWER = "/mnt/template/nix"
WARNING = "nixfs-layer: warning: "
SERVICE_LOG = "journalctl -b -o cat -u nixfs-layer.service"


def boot():
    """Boots the AppVM and waits for its stack; returns the store paths
    that `nixfs-layer mount` warned about in this boot."""
    appvm.start()
    appvm.wait_for_unit("nixfs-layer.service")
    appvm.wait_until_succeeds(f"{SERVICE_LOG} | grep '^mounted ' > /dev/null", timeout=60)
    appvm.fail(f"touch {LOWER}/store/x")  # the template is read-only here
    log = appvm.succeed(SERVICE_LOG)
    return {
        line[len(WARNING) :].split()[0]
        for line in log.splitlines()
        if line.startswith(WARNING)
    }


def missing_in_closures(roots):
    """Paths in the closures of `roots` whose content is not there."""
    paths = " ".join(roots)
    return set(
        appvm.succeed(
            f"for p in $(nix-store -qR {paths} | sort -u); do test -e $p || echo $p; done"
        ).split()
    )


template.start()
serve_roots(template)

with subtest("the template builds app, tool and extra into its Nix root"):
    built = publish(template, ROOTS, STORE_NIX, ["app", "tool", "extra"])
    app = with_suffix(built, "-app")
    tool = with_suffix(built, "-tool")
    extra = with_suffix(built, "-extra")

with subtest("boot 1: the AppVM builds on the template, with GC roots on its disk"):
    warned = boot()
    assert warned == set(), f"nothing to warn about: {warned}"
    on_top = appvm.succeed(f"nix-build -o /root/result-on-top {STORE_NIX} -A onTop").strip()
    app_only = appvm.succeed(
        f"nix-build -o /root/result-app-only {FLEET_NIX} --argstr job appvm -A appOnly"
    ).strip()
    assert (
        appvm.succeed(f"{on_top}/bin/on-top && {tool}/bin/tool")
        == "hello from on-top\nhello from tool\n"
    )
    appvm.shutdown()

with subtest("while the AppVM is off, the template drops tool and extra, adds new-tool"):
    # tool is needed by the AppVM's on-top; nothing of the AppVM needs extra.
    template.succeed(f"nix store delete --store {ROOTS} {tool} {extra}")
    template.fail(f"test -e {ROOTS}/nix/store/{base_name(tool)}")
    new_tool = publish(template, ROOTS, FLEET_NIX, ["newTool"])[0]

with subtest("boot 2: what the update broke is reported by name, the rest works"):
    warned = boot()
    missing = missing_in_closures([on_top, app_only])
    assert missing == {tool}, f"what the update broke: {missing}"
    assert warned == missing, f"mount names exactly what broke: {warned}"
    status, out = appvm.execute("nixfs-layer verify")
    assert status == 1, f"verify reports problems: {out}"
    assert tool in out, f"verify names the missing path: {out}"
    assert extra not in out, f"what nothing needed is not a problem: {out}"
    status, out = appvm.execute("nixfs-layer verify --json")
    assert tool in json.dumps(json.loads(out)), out
    # Removed and unneeded: gone, not valid. Added: valid and usable.
    assert not valid(appvm, extra)
    assert appvm.succeed(f"{new_tool}/bin/new-tool") == "hello from new-tool\n"
    # What the update did not touch keeps working.
    assert (
        appvm.succeed(f"{app_only}/bin/app-only-appvm && {app}/bin/app")
        == "hello from app-only-appvm\nhello from app\n"
    )
    assert appvm.succeed(f"{on_top}/bin/on-top") == "hello from on-top\n", (
        "on-top's own files are in the upper"
    )
    appvm.fail(f"{tool}/bin/tool")  # the removed dependency is really gone
    # New builds on the updated template work.
    again = appvm.succeed(
        f"nix-build --no-out-link {FLEET_NIX} --argstr job boot2 -A appOnly"
    ).strip()
    assert appvm.succeed(f"{again}/bin/app-only-boot2") == "hello from app-only-boot2\n"
    # Plain sync does not pretend: the rows stay, nothing changes.
    appvm.succeed("nixfs-layer sync")
    assert valid(appvm, tool), "the broken row is kept for verify to report"
    appvm.shutdown()

with subtest("the template brings tool back: boot 3 is whole again"):
    publish(template, ROOTS, STORE_NIX, ["tool"])
    warned = boot()
    assert warned == set(), f"nothing broken any more: {warned}"
    assert missing_in_closures([on_top, app_only]) == set()
    status, out = appvm.execute("nixfs-layer verify")
    assert status == 0, f"verify is clean after the fix: {out}"
    assert (
        appvm.succeed(f"{on_top}/bin/on-top && {tool}/bin/tool")
        == "hello from on-top\nhello from tool\n"
    )
    # The AppVM's build and its GC root persisted across three boots.
    appvm.succeed(f"test -d {UPPER}/store/{base_name(on_top)}")
    assert appvm.succeed("readlink /root/result-on-top").strip() == on_top
