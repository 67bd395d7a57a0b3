//! What a newcomer sees first: `init` says what it made, a failing
//! `resolve` says so once, a clean stop of the flake tree logs no warning,
//! `verify` and `optimise` agree on duplicates, and `sync` after `promote`
//! accounts for every path the lower has.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{stderr, Stack};

#[test]
fn init_says_what_it_made_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_nixfs-layer"))
            .args(["init", "--upper", upper.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stderr(&out), "", "nothing on stderr");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first.lines().count(), 1, "{first}");
    assert!(
        first.starts_with(&format!("initialised upper {}: ", upper.display())),
        "{first}"
    );
    assert!(
        first.contains("store/") && first.contains("Nix database"),
        "{first}"
    );
    let again = run();
    assert_eq!(
        again,
        format!("upper {} is initialised already\n", upper.display())
    );
}

ns_test! {
    fn a_failing_resolve_prints_its_error_once() {
        let s = Stack::new(&["app"]);
        s.mount();
        let config = s.w.path("deny.toml");
        std::fs::write(&config, "[flakefs]\ndeny = [\"*\"]\n").unwrap();
        let out = s.w.tool(["resolve", "--config", config.to_str().unwrap(), "nixpkgs#hello"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(77), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("nixfs-layer: "), "{err}");
        s.umount();
    }
}

ns_test! {
    fn a_clean_stop_of_the_flake_tree_logs_no_warning() {
        let s = Stack::new(&["app"]);
        let mount = s.w.tool([
            "mount",
            "--lower",
            s.lower.to_str().unwrap(),
            "--upper",
            s.upper.to_str().unwrap(),
        ]);
        assert!(mount.status.success(), "{}", stderr(&mount));
        let umount = s.w.tool(["umount"]);
        assert!(umount.status.success(), "{}", stderr(&umount));
        for (what, text) in [("mount", stderr(&mount)), ("umount", stderr(&umount))] {
            assert!(!text.contains("WARN"), "{what}: {text}");
        }
        let log = s.upper.join("var/log/nixfs-layer/flakefs.log");
        let log = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        assert!(!log.contains("WARN"), "the server's log: {log}");
    }
}

ns_test! {
    fn verify_and_optimise_agree_on_what_a_duplicate_is() {
        let s = Stack::new(&["tool"]);
        s.mount();
        let tool = s.lower_path("tool");
        // Nix cannot rebuild a lower path in place: that would white out
        // the lower's copy, which the sealed overlay refuses. Nothing changes.
        let out = s.w.nix("nix-build").args(["--repair", "--no-out-link", &common::fixture("store.nix"), "-A", "tool"]).output().unwrap();
        assert!(!out.status.success() && stderr(&out).contains("Operation not permitted"), "{}", stderr(&out));
        assert!(s.valid(&tool) && common::whiteouts(&s.upper).is_empty());
        assert_eq!(common::sh(&format!("{tool}/bin/tool")), "hello from tool\n");

        // Upper paths that a lower gains later are duplicates: verify lists
        // them, optimise drops exactly those.
        let extra = s.w.nix_ok("nix-build", ["--no-out-link", &common::fixture("store.nix"), "-A", "extra"]).trim().to_owned();
        s.w.with_nix_at(&s.lower, || s.w.build(&["extra"]));
        s.w.tool_ok(["sync"]);
        let out = s.w.tool(["verify", "--json"]);
        let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut dups: Vec<&str> = found["categories"]["duplicates"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap()).collect();
        dups.sort();
        assert!(dups.contains(&extra.as_str()), "{found:#}");
        let done: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["optimise", "--json"])).unwrap();
        let mut dropped: Vec<&str> = done["dropped"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap()).collect();
        dropped.sort();
        assert_eq!(dropped, dups, "optimise drops what verify calls a duplicate: {done:#}");
        let again = s.w.tool(["verify"]);
        assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
        common::verify_contents(&s.w);
    }
}

ns_test! {
    fn sync_after_promote_accounts_for_every_path_the_lower_has() {
        let s = Stack::new(&["app", "tool"]);
        s.mount();
        let on_top = s.w.nix_ok("nix-build", ["--no-out-link", &common::fixture("store.nix"), "-A", "onTop"]).trim().to_owned();
        let out = s.w.tool_ok(["promote", &on_top, "--into", s.lower.to_str().unwrap()]);
        assert!(out.starts_with("promoted 1 path(s)"), "{out}");
        let lower_paths = common::valid_count(&s.lower) as u64;
        let said = s.w.tool_ok(["sync"]);
        assert_eq!(
            said.trim(),
            format!("sync: added 0, removed 0, unchanged {}; 1 path(s) the lowers gained are served from the upper's own copies (`nixfs-layer optimise` drops them)", lower_paths - 1)
        );
        let done = s.w.tool_ok(["optimise"]);
        assert!(done.starts_with("dropped 1 "), "{done}");
        let st: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(st["lowers"][0]["provided_paths"], lower_paths, "{st:#}");
    }
}

ns_test! {
    fn long_operations_show_progress_on_a_terminal_only() {
        let s = Stack::new(&["tool"]);
        // A lower path big enough that hashing and copying it take a while.
        let big = s.w.path("big");
        common::sh(&format!("dd if=/dev/zero of={} bs=1M count=400 status=none", big.display()));
        let added = s.w.with_nix_at(&s.lower, || s.w.nix_ok("nix-store", ["--add", big.to_str().unwrap()]));
        let big_path = added.trim().to_owned();
        s.mount();
        let bin = env!("CARGO_BIN_EXE_nixfs-layer");
        // A bar: bytes so far, of the total, and a rate.
        let bar = |shown: &str, what: &str| {
            shown.contains(what) && shown.contains("iB/s") && shown.contains("/400.00 MiB")
        };

        let shown = common::on_terminal(&s.w, &format!("{bin} verify --check-contents"));
        assert!(bar(&shown, "hashing contents: ["), "verify on a terminal: {shown:?}");

        // An upper copy of it to export and import.
        let copy = s.w.nix_ok("nix-store", ["--add", big.to_str().unwrap(), "--option", "store", "local"]);
        assert_eq!(copy.trim(), big_path);
        let file = s.w.path("big.export");
        let shown = common::on_terminal(&s.w, &format!("{bin} export --full {big_path} -o {}", file.display()));
        assert!(bar(&shown, "exporting 1 path(s): ["), "export on a terminal: {shown:?}");

        // Its import: the check of the file counts NAR bytes as it reads.
        let shown = common::on_terminal(&s.w, &format!("{bin} import {}", file.display()));
        assert!(shown.contains(&format!("checking {}: ", file.display())) && shown.contains("iB/s"), "import on a terminal: {shown:?}");
        assert!(shown.contains("imported 0 path(s), 1 already present"), "{shown:?}");

        // Off a terminal and with --quiet: no bar at all.
        let out = s.w.tool(["verify", "--check-contents"]);
        assert_eq!(stderr(&out), "", "verify's stderr off a terminal");
        let out = s.w.tool(["export", "--full", &big_path, "-o", file.to_str().unwrap()]);
        assert!(out.status.success());
        assert_eq!(stderr(&out), "", "export's stderr off a terminal");
        let shown = common::on_terminal(&s.w, &format!("{bin} --quiet verify --check-contents"));
        assert!(!shown.contains("hashing contents"), "--quiet on a terminal: {shown:?}");
    }
}

ns_test! {
    fn a_failing_lookup_logs_one_line() {
        let s = Stack::new(&["tool"]);
        s.w.tool_ok(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        // A local flake whose evaluation fails.
        let dir = s.w.path("not-a-flake");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("flake.nix"), "{ outputs = { self }: throw \"broken on purpose\"; }").unwrap();
        let entry = format!(
            "/nixfs/flake/b64/{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, format!("path:{}#x", dir.display()))
        );
        // What `ls -l` and a shell do: lstat again and again, readlink.
        for _ in 0..3 {
            // The failed entry: a directory no one may enter, its message
            // in the user.nixfs.error attribute.
            let m = std::fs::symlink_metadata(&entry).unwrap();
            assert!(m.is_dir() && m.permissions().mode() & 0o777 == 0, "{m:?}");
        }
        assert!(std::fs::read_link(&entry).is_err());
        let log = std::fs::read_to_string("/nix/var/log/nixfs-layer/flakefs.log").unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("not-a-flake")).collect();
        assert_eq!(lines.len(), 1, "one failing reference, one line: {log}");
        assert!(lines[0].contains("WARN") && lines[0].contains("broken on purpose"), "{log}");
        s.w.tool_ok(["umount"]);
    }
}
