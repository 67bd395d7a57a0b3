//! The mount lifecycle under races: one live stack per upper and per
//! target, whatever runs at the same time.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{mountinfo, stderr, Stack};

/// Overlays of ours mounted in this namespace: (mount point, upperdir).
fn overlays() -> Vec<(String, String)> {
    mountinfo()
        .lines()
        .filter(|l| l.contains(" - overlay nixfs-layer "))
        .map(|l| {
            let point = l.split(' ').nth(4).unwrap().to_owned();
            let upper = l
                .split(',')
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap()
                .to_owned();
            (point, upper)
        })
        .collect()
}

fn mount_cmd(s: &Stack, lowers: &[&Path], upper: &Path, target: &Path, flake: bool) -> Command {
    let mut c = s.w.tool_command();
    c.arg("mount");
    for l in lowers {
        c.arg("--lower").arg(l);
    }
    c.arg("--upper").arg(upper).arg("--target").arg(target);
    if !flake {
        c.arg("--no-flake-fs");
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs both at once; their outputs.
fn race(mut a: Command, mut b: Command) -> (Output, Output) {
    let (a, b) = (a.spawn().unwrap(), b.spawn().unwrap());
    (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
}

ns_test! {
    fn racing_mounts_leave_exactly_one_stack() {
        let s = Stack::new(&["app"]);
        let second_lower = s.w.path("lower2");
        common::sh(&format!("cp -a {} {}", s.lower.display(), second_lower.display()));
        let other_upper = s.w.path("upper2");
        s.w.tool_ok(["init", "--upper", other_upper.to_str().unwrap()]);
        let other_target = s.w.path("target2");
        std::fs::create_dir_all(&other_target).unwrap();
        let nix = PathBuf::from("/nix");
        let l1: &[&Path] = &[s.lower.as_path()];
        let l2: &[&Path] = &[second_lower.as_path()];
        let u1 = s.upper.as_path();
        let u2 = other_upper.as_path();
        // (what, first mount, second mount); each case runs twice, the
        // same-target one three times.
        type Case<'a> = (&'a str, (&'a [&'a Path], &'a Path, &'a Path, bool), (&'a [&'a Path], &'a Path, &'a Path, bool));
        let cases: Vec<Case> = vec![
            ("one upper, one target", (l1, u1, &nix, false), (l1, u1, &nix, false)),
            ("one upper, another target", (l1, u1, &nix, false), (l1, u1, &other_target, false)),
            ("one upper, with the flake tree", (l1, u1, &nix, true), (l1, u1, &nix, true)),
            ("one upper, two different lowers", (l1, u1, &nix, false), (l2, u1, &nix, false)),
            ("two uppers, one target", (l1, u1, &nix, false), (l1, u2, &nix, false)),
        ];
        let mut pairs = 0;
        for (what, a, b) in &cases {
            for _ in 0..if *what == "one upper, one target" { 3 } else { 2 } {
                let (oa, ob) = race(mount_cmd(&s, a.0, a.1, a.2, a.3), mount_cmd(&s, b.0, b.1, b.2, b.3));
                pairs += 1;
                let codes = [oa.status.code(), ob.status.code()];
                let won = codes.iter().filter(|c| **c == Some(0)).count();
                assert_eq!(won, 1, "{what}: exactly one mount wins: {codes:?}\n{}\n{}", stderr(&oa), stderr(&ob));
                let loser = if codes[0] == Some(0) { &ob } else { &oa };
                assert_eq!(loser.status.code(), Some(75), "{what}: the loser says busy: {}", stderr(loser));
                let errors = stderr(loser).lines().filter(|l| l.starts_with("nixfs-layer: ")).count();
                assert_eq!(errors, 1, "{what}: one error line: {}", stderr(loser));
                let ovl = overlays();
                assert_eq!(ovl.len(), 1, "{what}: one overlay: {ovl:?}");
                // One umount takes the whole stack down; a new mount works.
                let winner_target = if codes[0] == Some(0) { a.2 } else { b.2 };
                s.w.tool_ok(["umount", "--target", winner_target.to_str().unwrap()]);
                assert!(overlays().is_empty(), "{what}: nothing left after one umount: {:?}", overlays());
                assert!(!mountinfo().contains(" /nixfs "), "{what}: no flake tree left");
            }
        }
        assert!(pairs >= 9, "{pairs} racing pairs");
        s.mount();
        assert!(s.valid(&s.lower_path("app")));
    }
}

ns_test! {
    fn umount_during_a_build_refuses_naming_it_or_waits_for_it() {
        let s = Stack::new(&["app"]);
        s.mount();
        let mounts_before = overlays();
        let mut build = s.w.nix("nix-build");
        build
            .args(["--no-out-link", &common::fixture("slow.nix"), "-A", "c", "--argstr", "salt", "umount"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let build = build.spawn().unwrap();
        // Wait until Nix has the store open.
        std::thread::sleep(std::time::Duration::from_millis(700));
        let out = s.w.tool(["umount"]);
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("pid {}", build.id())) && err.contains("nix-build"), "names the build: {err}");
        assert!(err.contains("nothing was unmounted") && err.contains("--wait"), "{err}");
        assert_eq!(overlays(), mounts_before, "the stack stays whole");
        assert!(mountinfo().contains(" /nix/var "), "the state bind stays");
        // With --wait, umount waits for the build and then goes.
        let t = std::time::Instant::now();
        let out = s.w.tool(["umount", "--wait", "60"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let built = build.wait_with_output().unwrap();
        assert!(built.status.success(), "the build finished undisturbed: {}", stderr(&built));
        eprintln!("umount --wait returned after {:?}", t.elapsed());
        assert!(overlays().is_empty());
        // The next mount and build see no stale handle.
        s.mount();
        let path = String::from_utf8(built.stdout).unwrap().trim().to_owned();
        assert!(s.valid(&path), "the build done before the umount is registered");
        let again = s.w.build(&["extra"]);
        assert!(s.valid(&again[0]));
    }
}

ns_test! {
    fn a_busy_umount_tears_nothing_down() {
        let s = Stack::new(&["app"]);
        // With the flake tree this time.
        s.w.tool_ok(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        assert!(mountinfo().contains(" /nixfs "));
        let app = s.lower_path("app");
        let mut shell = Command::new("sh").arg("-c").arg("exec sleep 600").current_dir(&app).spawn().unwrap();
        let out = s.w.tool(["umount"]);
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("pid {} (", shell.id())), "{}", stderr(&out));
        assert!(mountinfo().contains(" /nixfs "), "the flake tree stays up");
        assert_eq!(overlays().len(), 1, "the store stays mounted");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.upper.join("nixfs-layer/mount.json")).unwrap()).unwrap();
        let server = record["flakefs"]["pid"].as_u64().unwrap();
        assert!(Path::new(&format!("/proc/{server}")).exists(), "its server runs on");
        shell.kill().unwrap();
        shell.wait().unwrap();
        s.w.tool_ok(["umount"]);
        assert!(overlays().is_empty() && !mountinfo().contains(" /nixfs "));
    }
}

/// Nothing of a stack is left: no overlay, no state bind, no flake tree,
/// no server, no scratch database; the seal is off.
fn assert_nothing_left(s: &Stack, when: &str) {
    let mi = mountinfo();
    assert!(
        overlays().is_empty(),
        "{when}: no overlay: {:?}",
        overlays()
    );
    assert!(!mi.contains(" /nix/var "), "{when}: no state bind");
    assert!(!mi.contains(" /nixfs "), "{when}: no flake tree");
    // (A zombie's command line is empty.)
    let servers = common::sh("ps -eo args= | grep '[f]lakefs --mountpoint' || true");
    assert!(servers.trim().is_empty(), "{when}: no server: {servers}");
    let scratch: Vec<String> = common::entries(&s.upper.join("nixfs-layer"))
        .into_iter()
        // (journal.sqlite is the upper's journal of registrations, kept.)
        .filter(|e| (e.ends_with(".sqlite") && e != "journal.sqlite") || e.contains("tmp-"))
        .collect();
    assert!(
        scratch.is_empty(),
        "{when}: no scratch database: {scratch:?}"
    );
}

fn integrity(upper: &Path) -> String {
    common::sh(&format!(
        "sqlite3 {}/var/nix/db/db.sqlite 'pragma integrity_check'",
        upper.display()
    ))
    .trim()
    .to_owned()
}

ns_test! {
    // `mount` killed right after each of its steps, then at random moments:
    // one `umount` clears what is left, `status` said what was wrong, and
    // the next `mount` works with a sound database.
    fn a_killed_mount_is_cleared_by_one_umount() {
        let s = Stack::new(&["app"]);
        let built = {
            s.mount();
            let b = s.w.build(&["extra"]);
            s.umount();
            b
        };
        let mount = || {
            let mut c = s.w.tool_command();
            c.args(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let points = ["mount:merged", "mount:recorded", "mount:overlay-unsealed", "mount:overlay", "mount:var", "mount:server", "mount:done"];
        let mut kills = 0;
        let check = |when: &str| {
            let status = s.w.tool(["status", "--json"]);
            let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
            if doc["mounted"] == true && !when.ends_with("mount:done") {
                // Mid-way is reported as such where something is missing.
                let complete = doc["state"] == "mounted";
                eprintln!("{when}: status says {} {}", doc["state"], doc["problems"]);
                assert!(complete || !doc["problems"].as_array().unwrap().is_empty(), "{when}: {doc}");
            }
            let out = s.w.tool(["umount"]);
            assert!(matches!(out.status.code(), Some(0) | Some(1)), "{when}: umount clears it: {}", stderr(&out));
            assert_nothing_left(&s, when);
            assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
            s.w.tool_ok(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
            assert!(s.valid(&built[0]) && s.valid(&s.lower_path("app")), "{when}: paths are valid again");
            s.w.tool_ok(["umount"]);
            assert_nothing_left(&s, when);
        };
        for p in points {
            let out = mount().env("NIXFS_LAYER_KILL_AT", p).output().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "{p}: killed there: {}", stderr(&out));
            if p == "mount:var" {
                // The record names the flake tree before its server starts:
                // a tree without a server, and what to run.
                let doc: serde_json::Value = serde_json::from_slice(&s.w.tool(["status", "--json"]).stdout).unwrap();
                assert_eq!(doc["state"], "half-mounted", "{p}: {doc}");
                assert_eq!(doc["flake_tree"]["alive"], false, "{p}: {doc}");
                assert!(doc["problems"].to_string().contains("nixfs-layer umount"), "{p}: names what to run: {doc}");
            }
            kills += 1;
            check(p);
        }
        // At random moments (the merge, mounting, starting the server).
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..24 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = std::time::Duration::from_micros(seed % 40_000);
            let mut child = mount().spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            kills += 1;
            check(&format!("random kill {i} after {delay:?}"));
        }
        assert!(kills >= 30, "{kills} kills");
    }
}

ns_test! {
    // `sync --lower NEW --keep-needed` killed after each of its steps and
    // at random moments: one `umount` clears what is left; mounting the new
    // lower then works, the upper's rooted build and everything it needs
    // are valid with their content (what the switch had copied becomes the
    // upper's), and the database is sound.
    fn a_killed_switch_to_new_lowers_is_cleared_by_one_umount() {
        let s = Stack::new(&["app", "tool"]);
        s.mount();
        let root = s.w.path("on-top-root");
        let on_top = s
            .w
            .nix_ok("nix-build", ["-o", root.to_str().unwrap(), &common::fixture("store.nix"), "-A", "onTop"])
            .trim()
            .to_owned();
        let closure: Vec<String> = s.w.nix_ok("nix-store", ["-qR", &on_top]).lines().map(str::to_owned).collect();
        s.umount();
        // The next generation lacks `tool`, which on-top needs.
        let new_lower = s.w.path("lower-v2");
        s.w.with_nix_at(&new_lower, || s.w.build(&["app", "extra"]));
        let pristine = s.w.path("upper-pristine");
        common::sh(&format!("cp -a {} {}", s.upper.display(), pristine.display()));
        let nl = new_lower.to_str().unwrap().to_owned();
        let switch = || {
            let mut c = s.w.tool_command();
            c.args(["sync", "--lower", &nl, "--keep-needed"]);
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let reset = || {
            common::sh(&format!("rm -rf {u} && cp -a {p} {u}", u = s.upper.display(), p = pristine.display()));
            s.mount();
        };
        let tool = s.lower_path("tool");
        let check = |when: &str| {
            // Killed before its copies were verified, the switch is undone
            // (the stack stays on the old lower); after, it is completed.
            let pending = s.upper.join("nixfs-layer/switch.json").exists();
            let committed = pending || s.upper.join("store").join(common::base_name(&tool)).exists();
            if pending {
                let text = s.w.tool_ok(["status", "--upper", s.upper.to_str().unwrap()]);
                assert!(text.contains("cut short") && text.contains("nixfs-layer mount"), "{when}: status says what to run: {text}");
            }
            let out = s.w.tool(["umount"]);
            assert!(matches!(out.status.code(), Some(0) | Some(1)), "{when}: umount clears it: {}", stderr(&out));
            assert_nothing_left(&s, when);
            let lower = if committed { nl.clone() } else { s.lower.to_str().unwrap().to_owned() };
            eprintln!("{when}: {}", if committed { "completed" } else { "undone" });
            let out = s.w.tool(["mount", "--lower", &lower, "--upper", s.upper.to_str().unwrap(), "--no-flake-fs"]);
            assert!(out.status.success(), "{when}: mount of {lower}: {}", stderr(&out));
            assert!(!stderr(&out).contains("content is missing"), "{when}: nothing the upper needs is missing: {}", stderr(&out));
            for p in &closure {
                assert!(s.valid(p), "{when}: {p} is valid");
                assert!(Path::new(p).exists(), "{when}: {p} has its content");
            }
            assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
            common::verify_contents(&s.w);
            s.w.tool_ok(["umount"]);
            assert!(!common::entries(&s.upper.join("nixfs-layer")).iter().any(|e| e == "staging" || e == "switch.json"), "{when}: no staging left");
        };
        let mut kills = 0;
        for p in ["sync-lower:copied", "sync-lower:journaled", "umount:journaled", "umount:unrecorded", "sync-lower:unmounted", "sync-lower:moved", "sync-lower:adopted", "mount:overlay", "mount:done"] {
            reset();
            let out = switch().env("NIXFS_LAYER_KILL_AT", p).output().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "{p}: killed there: {}", stderr(&out));
            kills += 1;
            check(p);
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..14 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            reset();
            let delay = std::time::Duration::from_micros(seed % 25_000);
            let mut child = switch().spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            kills += 1;
            check(&format!("random kill {i} after {delay:?}"));
        }
        assert!(kills >= 20, "{kills} kills");
    }
}

ns_test! {
    // `optimise` killed after each of its steps and at random moments: what
    // Nix sees keeps its content throughout (stock `nix-store --verify
    // --check-contents` is clean), and the next `optimise` completes the
    // run: the upper copies are gone, the paths lower-provided, nothing of
    // the run left behind.
    fn a_killed_optimise_is_completed_by_the_next() {
        let s = Stack::new(&["app", "tool"]);
        s.mount();
        let extra = s.w.build(&["extra"]).remove(0);
        // The lower gains extra too: the upper's copy is a duplicate.
        let built = s.w.with_nix_at(&s.lower, || s.w.build(&["extra"]));
        assert_eq!(built, vec![extra.clone()]);
        s.w.tool_ok(["sync"]);
        s.umount();
        let pristine = s.w.path("upper-pristine");
        common::sh(&format!("cp -a {} {}", s.upper.display(), pristine.display()));
        let reset = || {
            common::sh(&format!("rm -rf {u} && cp -a {p} {u}", u = s.upper.display(), p = pristine.display()));
            s.mount();
        };
        let upper_copy = s.upper.join("store").join(common::base_name(&extra));
        let optimise = || {
            let mut c = s.w.tool_command();
            c.arg("optimise");
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let check = |when: &str| {
            common::verify_contents(&s.w);
            assert_eq!(common::sh(&format!("{extra}/bin/extra")), "hello from extra\n", "{when}: extra runs");
            let out = s.w.tool(["optimise"]);
            assert!(out.status.success(), "{when}: the next optimise completes it: {}", stderr(&out));
            assert!(!upper_copy.exists(), "{when}: the upper copy is gone");
            assert!(!s.upper.join("nixfs-layer/optimise-trash").exists(), "{when}: nothing of the run is left");
            let layer: i64 = rusqlite::Connection::open(s.upper.join("var/nix/db/db.sqlite"))
                .unwrap()
                .query_row("select layer from NixfsLayerOrigin where path = ?1", [&extra], |r| r.get(0))
                .unwrap();
            assert!(layer > 0, "{when}: extra is lower-provided");
            assert_eq!(common::sh(&format!("{extra}/bin/extra")), "hello from extra\n", "{when}: served from the lower, no stale handle");
            common::verify_contents(&s.w);
            let v = s.w.tool(["verify", "--check-contents"]);
            assert_eq!(v.status.code(), Some(0), "{when}: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
            s.w.tool_ok(["umount"]);
            assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
            assert_nothing_left(&s, when);
        };
        let mut kills = 0;
        // (The last: killed mid-way, then remounted; the mount deletes
        // what the run had moved out of the store.)
        for (p, remount) in [("optimise:committed", false), ("optimise:moved", false), ("optimise:refreshed", false), ("optimise:moved", true)] {
            reset();
            let out = optimise().env("NIXFS_LAYER_KILL_AT", p).output().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "{p}: killed there: {}", stderr(&out));
            if p != "optimise:committed" {
                let doc: serde_json::Value = serde_json::from_slice(&s.w.tool(["status", "--json"]).stdout).unwrap();
                assert_eq!(doc["state"], "half-mounted", "{p}: {doc}");
                assert!(doc["problems"].to_string().contains("nixfs-layer optimise"), "{p}: names what to run: {doc}");
            }
            if remount {
                s.w.tool_ok(["umount"]);
                s.mount();
                assert!(!s.upper.join("nixfs-layer/optimise-trash").exists(), "{p}: mount finished the run");
            }
            kills += 1;
            check(p);
        }
        let mut seed = 0x27bb_2ee6_87b0_b0fd_u64;
        for i in 0..12 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            reset();
            let delay = std::time::Duration::from_micros(seed % 30_000);
            let mut child = optimise().spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            kills += 1;
            check(&format!("random kill {i} after {delay:?}"));
        }
        assert!(kills >= 16, "{kills} kills");
    }
}

/// `status --json` (it exits 0 whatever it finds) and the text output.
fn status_of(s: &Stack, when: &str) -> (serde_json::Value, String) {
    let out = s.w.tool(["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{when}: status exits 0: {}",
        stderr(&out)
    );
    let doc = serde_json::from_slice(&out.stdout).unwrap();
    let out = s.w.tool(["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{when}: status exits 0: {}",
        stderr(&out)
    );
    (doc, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every field of a `status --json` document is in docs/status-json.md's
/// table (`upper.dir`, `lowers[].dir`, `transaction.kind`…).
fn assert_documented(doc: &serde_json::Value) {
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in v.as_object().into_iter().flatten() {
            let mut name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_array() {
                name.push_str("[]");
            }
            out.push(name.clone());
            for e in v.as_array().map_or(std::slice::from_ref(v), Vec::as_slice) {
                walk(e, &name, out);
            }
        }
    }
    let table =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-json.md"))
            .unwrap();
    let mut fields = Vec::new();
    walk(doc, "", &mut fields);
    for f in fields {
        assert!(
            table.contains(&format!("| `{f}` |")),
            "docs/status-json.md documents `{f}`"
        );
    }
}

/// After a kill: whatever `status` says, one `umount` leaves nothing, the
/// database is sound, and the next `mount` works (`paths` valid).
fn cleared_by_one_umount(s: &Stack, when: &str, paths: &[String]) {
    let out = s.w.tool(["umount"]);
    // (1: nothing was mounted any more, the kill came at the very end.)
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{when}: umount clears it: {}",
        stderr(&out)
    );
    assert_nothing_left(s, when);
    assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
    assert!(
        !s.upper.join("nixfs-layer/mount.json").exists(),
        "{when}: no record left"
    );
    // The upper, unmounted, has nothing left to finish.
    let out =
        s.w.tool(["status", "--json", "--upper", s.upper.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "not mounted", "{when}: {doc}");
    assert_eq!(doc["problems"], serde_json::json!([]), "{when}: {doc}");
    s.mount();
    for p in paths {
        assert!(
            s.valid(p) && Path::new(p).exists(),
            "{when}: {p} valid again"
        );
    }
    s.w.tool_ok(["umount"]);
    assert_nothing_left(s, when);
}

fn mount_with(s: &Stack, flake: bool) {
    let mut args = vec![
        "mount",
        "--lower",
        s.lower.to_str().unwrap(),
        "--upper",
        s.upper.to_str().unwrap(),
    ];
    if !flake {
        args.push("--no-flake-fs");
    }
    s.w.tool_ok(args);
}

/// `umount` killed after each of its steps, with and without the flake
/// tree, then at random moments: `status` says an unmount was cut short
/// and what to run; one `umount` finishes it.
fn killed_umounts(flake: bool, seed: u64, random: usize) {
    let s = Stack::new(&["app"]);
    s.mount();
    let mut paths = s.w.build(&["extra"]);
    paths.push(s.lower_path("app"));
    s.umount();
    let umount = || {
        let mut c = s.w.tool_command();
        c.arg("umount");
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let mut kills = 0;
    let mut points = vec![
        "umount:journaled",
        "umount:var",
        "umount:unsealed",
        "umount:unrecorded",
    ];
    if flake {
        points.insert(1, "umount:tree");
    }
    for p in points {
        mount_with(&s, flake);
        let out = umount().env("NIXFS_LAYER_KILL_AT", p).output().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(9),
            "{p}: killed there: {}",
            stderr(&out)
        );
        kills += 1;
        let (doc, text) = status_of(&s, p);
        eprintln!(
            "{p}: status says {} {} {}",
            doc["state"], doc["problems"], doc["transaction"]
        );
        assert_eq!(doc["state"], "half-mounted", "{p}: {doc}");
        assert_documented(&doc);
        assert_eq!(
            doc["mounted"], true,
            "{p}: the overlay is still there: {doc}"
        );
        assert!(
            doc["problems"].to_string().contains("nixfs-layer umount"),
            "{p}: names what to run: {doc}"
        );
        if p == "umount:unrecorded" {
            // The record went just before the overlay: the overlay itself
            // leads to the upper, and the state bind is missing.
            assert!(doc["transaction"].is_null(), "{p}: {doc}");
        } else {
            assert_eq!(doc["transaction"]["kind"], "unmount", "{p}: {doc}");
            assert_eq!(doc["transaction"]["interrupted"], true, "{p}: {doc}");
            assert_eq!(
                doc["transaction"]["run"], "nixfs-layer umount --target /nix",
                "{p}: {doc}"
            );
            assert!(
                text.contains("unmounting (interrupted)")
                    && text.contains("run `nixfs-layer umount"),
                "{p}: {text}"
            );
        }
        if p == "umount:journaled" {
            // While a process holds the upper's lock, the same record is a
            // transaction under way, not one cut short.
            let upper_lock = s.upper.join("nixfs-layer/lock");
            // (-o: the lock goes with flock itself, not with its child.)
            let mut holder = Command::new("flock")
                .arg("-o")
                .arg(&upper_lock)
                .args(["-c", "echo held; exec sleep 5"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            let (doc, text) = status_of(&s, p);
            holder.kill().unwrap();
            holder.wait().unwrap();
            assert_eq!(doc["transaction"]["interrupted"], false, "{p}: {doc}");
            assert!(text.contains("is under way"), "{p}: {text}");
        }
        if flake && p != "umount:journaled" {
            assert!(
                !mountinfo().contains(" /nixfs "),
                "{p}: the tree went first"
            );
        }
        cleared_by_one_umount(&s, p, &paths);
    }
    // Random moments around the end of what one whole umount takes here
    // (most of it is starting the process).
    let span = (0..3)
        .map(|_| {
            mount_with(&s, flake);
            let t = std::time::Instant::now();
            s.umount();
            t.elapsed().as_micros() as u64
        })
        .min()
        .unwrap();
    eprintln!("one umount takes {span} µs");
    // The delays close in on the window where umount is at work: a kill
    // that found the stack untouched raises the lower bound, one that found
    // it gone lowers the upper (the timing of this shared machine drifts).
    let (mut lo, mut hi) = (0, 2 * span);
    let mut seed = seed;
    let mut landed = std::collections::BTreeMap::new();
    for i in 0..random {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        mount_with(&s, flake);
        let micros = lo + seed % (hi - lo).max(1);
        let delay = std::time::Duration::from_micros(micros);
        let mut child = umount().spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        kills += 1;
        let when = format!("random kill {i} after {delay:?}");
        let (doc, _) = status_of(&s, &when);
        let state = doc["state"].as_str().unwrap().to_owned();
        if state == "half-mounted" {
            assert!(
                doc["problems"].to_string().contains("nixfs-layer umount"),
                "{when}: names what to run: {doc}"
            );
        }
        *landed
            .entry(format!("{state} {}", doc["transaction"]["kind"]))
            .or_insert(0) += 1;
        match state.as_str() {
            "mounted" => lo = lo.max(micros),
            "not mounted" => hi = hi.min(micros),
            _ => {}
        }
        // (Drift: the window may move out of the bounds.)
        if hi <= lo + 200 {
            (lo, hi) = (lo.saturating_sub(span / 4), hi + span / 4);
        }
        cleared_by_one_umount(&s, &when, &paths);
    }
    eprintln!("random kills landed: {landed:?}; the window closed in on {lo}..{hi} µs");
    eprintln!("{kills} kills");
    assert!(
        landed.keys().any(|k| k.starts_with("half-mounted")),
        "some random kills fell inside umount's work: {landed:?}"
    );
}

ns_test! {
    fn a_killed_umount_is_finished_by_the_next() {
        killed_umounts(false, 0x853c_49e6_748f_ea9b, 40);
    }
}

ns_test! {
    fn a_killed_umount_with_the_flake_tree_is_finished_by_the_next() {
        killed_umounts(true, 0xda94_2042_e4dd_58b5, 30);
    }
}

ns_test! {
    // `sync` killed while it mounts `TARGET/store` afresh onto a lower
    // replaced under the mount (a new tree renamed into place), after each
    // of its steps and at random moments: `status` says a remount was cut
    // short and what to run; the next `sync` finishes it, or one `umount`
    // clears it; the next mount works with a sound database.
    fn a_killed_remount_is_finished_by_sync_or_cleared_by_umount() {
        let s = Stack::new(&["app"]);
        s.mount();
        let tool = s.w.build(&["tool"]).remove(0);
        s.umount();
        // The other generation of the lower: what a publisher renames into
        // place. The two trade places before each kill.
        let other = s.w.path("lower-other");
        let extra = s.w.with_nix_at(&other, || s.w.build(&["app", "extra"])).remove(1);
        let swap = || {
            common::sh(&format!(
                "mv {l} {l}.x && mv {o} {l} && mv {l}.x {o}",
                l = s.lower.display(),
                o = other.display()
            ));
        };
        let sync = || {
            let mut c = s.w.tool_command();
            c.arg("sync");
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let app = s.lower_path("app");
        let mut generation_b = false;
        let check = |when: &str, by_sync: bool, generation_b: bool| {
            let (doc, text) = status_of(&s, when);
            eprintln!("{when}: status says {} mounted={} {} {}", doc["state"], doc["mounted"], doc["problems"], doc["transaction"]);
            if doc["state"] != "mounted" {
                assert_eq!(doc["state"], "half-mounted", "{when}: {doc}");
                let problems = doc["problems"].to_string();
                assert!(problems.contains("nixfs-layer sync") || problems.contains("nixfs-layer umount"), "{when}: names what to run: {doc}");
            }
            if doc["transaction"]["kind"] == "remount" {
                assert_eq!(doc["transaction"]["interrupted"], true, "{when}: {doc}");
                assert_eq!(doc["transaction"]["run"], "nixfs-layer sync --target /nix", "{when}: {doc}");
                assert!(text.contains("remounting (interrupted)"), "{when}: {text}");
            }
            let mut paths = vec![tool.clone(), app.clone()];
            if generation_b {
                paths.push(extra.clone());
            }
            if by_sync {
                let out = s.w.tool(["sync"]);
                assert!(out.status.success(), "{when}: the next sync finishes it: {}", stderr(&out));
                let (doc, _) = status_of(&s, when);
                assert_eq!(doc["state"], "mounted", "{when}: whole again: {doc}");
                assert!(doc["transaction"].is_null() && doc["problems"].as_array().unwrap().is_empty(), "{when}: {doc}");
                assert_eq!(doc["lowers"][0]["replaced"], false, "{when}: the new tree is mounted: {doc}");
                assert_eq!(doc["sealed"], true, "{when}: {doc}");
                for p in &paths {
                    assert!(s.valid(p) && Path::new(p).exists(), "{when}: {p} valid, with its content");
                }
                assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
                s.umount();
                assert_nothing_left(&s, when);
            } else {
                cleared_by_one_umount(&s, when, &paths);
            }
        };
        let mut kills = 0;
        let points = ["sync:remount-journaled", "sync:old-unmounted", "mount:overlay-unsealed", "sync:remounted"];
        for p in points {
            for by_sync in [false, true] {
                s.mount();
                swap();
                generation_b = !generation_b;
                let out = sync().env("NIXFS_LAYER_KILL_AT", p).output().unwrap();
                assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "{p}: killed there: {}", stderr(&out));
                kills += 1;
                let (doc, _) = status_of(&s, p);
                assert_eq!(doc["state"], "half-mounted", "{p}: {doc}");
                assert_eq!(doc["transaction"]["kind"], "remount", "{p}: {doc}");
                assert_eq!(doc["mounted"], p != "sync:old-unmounted", "{p}: {doc}");
                check(&format!("{p}, then {}", if by_sync { "sync" } else { "umount" }), by_sync, generation_b);
            }
        }
        // Random moments within one whole sync (the remount, the merge).
        let span = (0..3)
            .map(|_| {
                s.mount();
                swap();
                generation_b = !generation_b;
                let t = std::time::Instant::now();
                s.w.tool_ok(["sync"]);
                let d = t.elapsed().as_micros() as u64;
                s.umount();
                d
            })
            .min()
            .unwrap();
        eprintln!("one sync with a remount takes {span} µs");
        let mut seed = 0x4f1b_bcdc_bfa5_3e0b_u64;
        for i in 0..16 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.mount();
            swap();
            generation_b = !generation_b;
            let delay = std::time::Duration::from_micros(span / 4 + seed % span);
            let mut child = sync().spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            kills += 1;
            check(&format!("random kill {i} after {delay:?}"), i % 2 == 1, generation_b);
        }
        eprintln!("{kills} kills");
        assert!(kills >= 24, "{kills} kills");
    }
}

ns_test! {
    // Plain `sync` killed after its merge and at random moments: the next
    // `sync` leaves the paths the lower gained valid and visible through
    // the store (the overlay forgets what it had cached), and one `umount`
    // clears the stack.
    fn a_killed_sync_is_finished_by_the_next() {
        let s = Stack::new(&["app"]);
        let scratch = s.w.path("scratch");
        let gained = s.w.with_nix_at(&scratch, || s.w.build(&["extra", "tool"]));
        s.mount();
        for p in &gained {
            // Looked up before the lower has it: the overlay caches that.
            assert!(!Path::new(p).exists());
        }
        s.w.with_nix_at(&s.lower, || s.w.build(&["extra", "tool"]));
        let sync = || {
            let mut c = s.w.tool_command();
            c.arg("sync");
            c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let out = sync().env("NIXFS_LAYER_KILL_AT", "sync:merged").output().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "killed there: {}", stderr(&out));
        let (doc, _) = status_of(&s, "sync:merged");
        eprintln!("sync:merged: status says {} {}", doc["state"], doc["problems"]);
        assert_eq!(doc["state"], "half-mounted", "{doc}");
        assert!(doc["problems"].to_string().contains("run `nixfs-layer sync`"), "names what to run: {doc}");
        s.w.tool_ok(["sync"]);
        for p in &gained {
            assert!(s.valid(p), "{p} is valid");
            assert!(Path::new(p).exists(), "{p} is visible through the store");
        }
        common::verify_contents(&s.w);
        // Random moments of `sync --force` (every lower re-read).
        let mut seed = 0x1f83_d9ab_fb41_bd6b_u64;
        let mut kills = 1;
        let mut landed = std::collections::BTreeMap::new();
        for i in 0..12 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = std::time::Duration::from_micros(seed % 30_000);
            let mut child = sync().arg("--force").spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let _ = child.wait();
            kills += 1;
            let when = format!("random kill {i} after {delay:?}");
            let (doc, _) = status_of(&s, &when);
            if doc["state"] != "mounted" {
                assert_eq!(doc["state"], "half-mounted", "{when}: {doc}");
                assert!(doc["problems"].to_string().contains("run `nixfs-layer sync`"), "{when}: names what to run: {doc}");
            }
            *landed.entry(doc["state"].as_str().unwrap().to_owned()).or_insert(0) += 1;
            assert_eq!(integrity(&s.upper), "ok", "{when}: the database is sound");
            s.w.tool_ok(["sync"]);
            for p in gained.iter().chain([&s.lower_path("app")]) {
                assert!(s.valid(p) && Path::new(p).exists(), "{when}: {p} valid and visible");
            }
        }
        eprintln!("{kills} kills; the random ones left status {landed:?}");
        cleared_by_one_umount(&s, "after the kills", &gained);
    }
}

ns_test! {
    // A record left in the upper with nothing mounted: by a `mount` killed
    // before its first mount call, and by an older version's `umount`
    // killed after it unmounted (the record and the seal left). `status
    // --upper` says so; `umount` without the upper known says nothing is
    // mounted, with it configured clears the record and lifts the seal;
    // `mount` replaces the record and works.
    fn a_record_left_with_nothing_mounted_is_cleared_or_replaced() {
        let s = Stack::new(&["app"]);
        let app = s.lower_path("app");
        let record = s.upper.join("nixfs-layer/mount.json");
        let config = s.w.path("config.toml");
        std::fs::write(&config, format!("upper = \"{}\"\n", s.upper.display())).unwrap();
        // (work/work is made by the first overlay mount.)
        let sealed = || common::sh(&format!("lsattr -d {}/work/work 2>/dev/null || echo -", s.upper.display())).split(' ').next().unwrap().contains('i');
        let leave = |how: &str| match how {
            "mount killed" => {
                let out = s.w.tool_command()
                    .args(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()])
                    .env("NIXFS_LAYER_KILL_AT", "mount:recorded")
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "killed: {}", stderr(&out));
            }
            _ => {
                // What a version that removed the record after the overlay
                // left when killed between the two.
                s.mount();
                common::sh("umount /nix/var && umount /nix/store");
                assert!(sealed(), "the seal is left");
            }
        };
        for how in ["mount killed", "old umount killed"] {
            for next in ["umount", "mount"] {
                leave(how);
                let when = format!("{how}, then {next}");
                assert!(record.exists() && overlays().is_empty(), "{when}");
                let out = s.w.tool(["status", "--json", "--upper", s.upper.to_str().unwrap()]);
                assert_eq!(out.status.code(), Some(0), "{when}: {}", stderr(&out));
                let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                eprintln!("{when}: status says {} {}", doc["state"], doc["problems"]);
                assert_eq!(doc["state"], "not mounted", "{when}: {doc}");
                assert!(doc["problems"].to_string().contains("nixfs-layer umount"), "{when}: {doc}");
                if next == "umount" {
                    let out = s.w.tool(["umount"]);
                    assert_eq!(out.status.code(), Some(1), "{when}: {}", stderr(&out));
                    assert!(stderr(&out).contains("nothing of nixfs-layer is mounted at /nix"), "{when}: {}", stderr(&out));
                    let out = s.w.tool(["umount", "--config", config.to_str().unwrap()]);
                    assert_eq!(out.status.code(), Some(0), "{when}: {}", stderr(&out));
                    assert!(stderr(&out).contains("cleared the record"), "{when}: {}", stderr(&out));
                    assert!(!record.exists() && !sealed(), "{when}: the record and the seal are gone");
                    // Nothing left to clear now.
                    let out = s.w.tool(["umount", "--config", config.to_str().unwrap()]);
                    assert_eq!(out.status.code(), Some(1), "{when}: {}", stderr(&out));
                    let out = s.w.tool(["status", "--json", "--upper", s.upper.to_str().unwrap()]);
                    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    assert!(doc["problems"].as_array().unwrap().is_empty(), "{when}: {doc}");
                }
                s.mount();
                assert!(s.valid(&app) && Path::new(&app).exists(), "{when}: mounted again");
                s.umount();
                assert_nothing_left(&s, &when);
                assert!(!record.exists() && !sealed(), "{when}");
            }
        }
    }
}
