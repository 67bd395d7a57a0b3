//! vm-tests scenario "template-update" (vm-tests/README.md): a template
//! host's Nix root is the read-only lower of an AppVM host whose upper
//! persists across reboots (a reboot is a fresh host: new namespaces, new
//! /nix, same upper). Between boots the template gains and loses paths;
//! the AppVM's own builds keep working or are reported broken by name
//! (mount's warning, `verify`), never silently.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use common::hosts::{fleet_nix, Host};
use common::{base_name, fixture, World};

/// Boots the AppVM: a fresh host, the template's root bound read-only (as
/// a template's volume is), the persistent upper mounted on it. Returns
/// the host and mount's stderr.
fn boot(w: &World, template_root: &Path) -> (Host, String) {
    let h = Host::start(w, "appvm");
    let lower = h.dir.join("template-nix");
    std::fs::create_dir_all(&lower).unwrap();
    h.sh(&format!(
        "mount --bind {t} {l} && mount -o remount,bind,ro {l}",
        t = template_root.display(),
        l = lower.display()
    ));
    assert!(
        !h.ok(&format!("touch {}/store/x", lower.display())),
        "the template is read-only in the AppVM"
    );
    let upper = h.dir.join("upper");
    if !upper.exists() {
        h.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
    }
    let out = h.tool([
        "mount",
        "--lower",
        lower.to_str().unwrap(),
        "--upper",
        upper.to_str().unwrap(),
        "--no-flake-fs",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mount: {err}");
    (h, err)
}

fn shutdown(h: Host) {
    h.tool_ok(["umount"]);
    drop(h);
}

/// Store paths warned about by mount (`warning: <path> left the lowers…`).
fn warned(mount_stderr: &str) -> BTreeSet<String> {
    mount_stderr
        .lines()
        .filter_map(|l| l.strip_prefix("nixfs-layer: warning: "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Paths in the closures of `roots` whose content is not there.
fn missing_in_closures(h: &Host, roots: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for r in roots {
        for p in h.sh(&format!("nix-store -qR {r}")).lines() {
            if !h.ok(&format!("test -e {p}")) {
                out.insert(p.to_owned());
            }
        }
    }
    out
}

ns_test! {
    fn template_update() {
        let t0 = Instant::now();
        let w = World::new();
        let template = Host::start(&w, "template");
        let root = w.path("template/nix");
        let built = template.build_into(&root, &fixture("store.nix"), &["app", "tool", "extra"]);
        let find = |suffix: &str| built.iter().find(|p| p.ends_with(suffix)).unwrap().clone();
        let (app, tool, extra) = (find("-app"), find("-tool"), find("-extra"));

        // Boot 1: the AppVM builds on the template, with GC roots on its disk.
        let (vm, err) = boot(&w, &root);
        assert!(warned(&err).is_empty(), "{err}");
        let on_top = vm.sh(&format!("nix-build -o {}/result-on-top {} -A onTop", vm.dir.display(), fixture("store.nix")));
        let on_top = on_top.trim().to_owned();
        let app_only = vm.sh(&format!("nix-build -o {}/result-app-only {} --argstr job appvm -A appOnly", vm.dir.display(), fleet_nix()));
        let app_only = app_only.trim().to_owned();
        assert_eq!(vm.sh(&format!("{on_top}/bin/on-top && {tool}/bin/tool")), "hello from on-top\nhello from tool\n");
        let vm_dir = vm.dir.clone();
        shutdown(vm);

        // Template update while the AppVM is off: a path added, two removed
        // (tool, which the AppVM's on-top needs; extra, which nothing of the
        // AppVM needs).
        template.with_root(&root, &format!("nix-store --delete {tool} {extra}"));
        assert!(!root.join("store").join(base_name(&tool)).exists());
        let new_tool = template.build_into(&root, &fleet_nix(), &["newTool"]).remove(0);

        // Boot 2.
        let (vm, err) = boot(&w, &root);
        eprintln!("boot 2 after {:?}; mount said: {err}", t0.elapsed());
        let missing = missing_in_closures(&vm, &[&on_top, &app_only]);
        assert_eq!(missing, BTreeSet::from([tool.clone()]), "what the update broke");
        assert_eq!(warned(&err), missing, "mount names exactly what broke: {err}");
        let verify = vm.tool(["verify"]);
        let vout = String::from_utf8_lossy(&verify.stdout).into_owned();
        assert_eq!(verify.status.code(), Some(1), "verify reports problems: {vout}");
        assert!(vout.contains(&tool), "verify names the missing path: {vout}");
        assert!(!vout.contains(&extra), "what nothing needed is not a problem: {vout}");
        let vjson: serde_json::Value = serde_json::from_slice(&vm.tool(["verify", "--json"]).stdout).unwrap();
        assert!(vjson.to_string().contains(&tool), "{vjson}");
        // Removed and unneeded: gone, not valid. Added: valid and usable.
        assert!(!vm.ok(&format!("nix-store --check-validity {extra}")));
        assert_eq!(vm.sh(&format!("{new_tool}/bin/new-tool")), "hello from new-tool\n");
        // What the update did not touch keeps working.
        assert_eq!(vm.sh(&format!("{app_only}/bin/app-only-appvm && {app}/bin/app")), "hello from app-only-appvm\nhello from app\n");
        assert_eq!(vm.sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n", "on-top's own files are in the upper");
        assert!(!vm.ok(&format!("{tool}/bin/tool")), "the removed dependency is really gone");
        // New builds on the updated template work.
        let again = vm.sh(&format!("nix-build --no-out-link {} --argstr job boot2 -A appOnly", fleet_nix()));
        assert_eq!(vm.sh(&format!("{}/bin/app-only-boot2", again.trim())), "hello from app-only-boot2\n");
        // Plain sync keeps refusing to pretend: the rows stay, nothing changes.
        let sync = vm.tool(["sync"]);
        assert!(sync.status.success(), "{}", String::from_utf8_lossy(&sync.stderr));
        let said = String::from_utf8_lossy(&sync.stdout);
        assert!(said.starts_with("sync: added 0, removed 0, "), "sync changes nothing: {said}");
        assert!(vm.ok(&format!("nix-store --check-validity {tool}")), "the broken row is kept for verify to report");
        shutdown(vm);

        // The template brings tool back: boot 3 is whole again.
        template.build_into(&root, &fixture("store.nix"), &["tool"]);
        let (vm, err) = boot(&w, &root);
        assert!(warned(&err).is_empty(), "nothing broken any more: {err}");
        assert!(missing_in_closures(&vm, &[&on_top, &app_only]).is_empty());
        let verify = vm.tool(["verify"]);
        assert!(verify.status.success(), "verify clean after the fix: {}", String::from_utf8_lossy(&verify.stdout));
        assert_eq!(vm.sh(&format!("{on_top}/bin/on-top && {tool}/bin/tool")), "hello from on-top\nhello from tool\n");
        assert!(vm_dir.join("upper/store").join(base_name(&on_top)).is_dir(), "the AppVM's build persisted across three boots");
        shutdown(vm);
        eprintln!("template-update done in {:?}", t0.elapsed());
    }
}
