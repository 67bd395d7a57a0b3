//! `promote`: upper paths copied into a lower its owner publishes; readers
//! `sync` then `optimise`, and are served from the lower. A reader syncing
//! while the promote runs sees the lower either before or after it.

mod common;

use common::{sh, stderr, tree_digest, upper_entries, verify_contents, Stack, World};

fn lower_count(w: &World) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&w.tool_ok(["status", "--json"])).unwrap();
    v["lowers"][0]["paths"].as_u64().unwrap()
}

ns_test! {
    fn promoted_paths_are_served_from_the_lower_after_sync_and_optimise() {
        let s = Stack::new(&["app", "tool"]);
        s.mount();
        let (w, lower, upper) = (&s.w, &s.lower, &s.upper);
        let l = lower.to_str().unwrap();
        let built = w.build(&["onTop", "extra"]);
        let (on_top, extra) = (&built[0], &built[1]);
        let before = lower_count(w);

        // A reader syncing over and over while the promote runs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let out = w.tool(["sync", "--quiet"]);
                    assert!(out.status.success(), "reader sync: {}", stderr(&out));
                    seen.insert(lower_count(w));
                }
                seen
            });
            let out = w.tool(["promote", on_top, extra, "--into", l]);
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(out.status.success(), "promote: {}", stderr(&out));
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(text.starts_with("promoted 2 path(s)"), "{text}");
            reader.join().unwrap()
        });
        let after = before + 2;
        assert!(!seen.is_empty(), "the reader synced while the promote ran");
        assert!(seen.iter().all(|n| *n == before || *n == after), "only whole states seen: {seen:?}");

        // The lower's own Nix agrees: the paths are valid there and verify.
        let lower_before_sync = tree_digest(lower);
        w.tool_ok(["sync"]);
        assert_eq!(lower_count(w), after);
        let out = w.tool_ok(["optimise"]);
        assert!(out.contains("dropped 2"), "{out}");
        let left = upper_entries(upper);
        assert!(left.iter().all(|e| e.ends_with(".drv")), "no upper copies left: {left:?}");
        assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
        let st: serde_json::Value = serde_json::from_str(&w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(st["lowers"][0]["provided_paths"], after, "{st}");
        verify_contents(w);
        let v = w.tool(["verify", "--check-contents"]);
        assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
        assert_eq!(tree_digest(lower), lower_before_sync, "readers do not write to the lower");

        s.umount();
        w.with_nix_at(lower, || {
            verify_contents(w);
            assert!(w.valid(on_top), "{on_top} is valid in the lower");
            let refs = w.nix_ok("nix-store", ["-q", "--references", on_top]);
            assert!(refs.lines().any(|r| r.ends_with("-app")) && refs.lines().any(|r| r.ends_with("-tool")), "{refs}");
        });
    }
}
