//! What a newcomer sees first: `init` says what it made, a failing
//! `resolve` says so once, and a clean stop of the flake tree logs no
//! warning.

mod common;

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
