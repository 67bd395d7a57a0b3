//! `verify` and `gc` end to end: a lower built by real Nix, stacked under an
//! upper with real overlayfs, faults made the way they happen (behind the
//! tool's back), stock Nix's collector run on the merged store. Every test
//! runs in its own mount namespace with a tmpfs on /nix.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{base_name, sh, stderr, tree_digest, upper_entries, verify_contents, Stack};

fn stack() -> Stack {
    Stack::new(&["app", "tool"])
}

impl Stack {
    /// `nixfs-layer verify --json` plus `args`: exit code and document.
    fn verify(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["verify", "--json"];
        all.extend_from_slice(args);
        let out = self.w.tool(&all);
        let doc = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("verify output is JSON ({e}): {}", stderr(&out)));
        (out.status.code().unwrap(), doc)
    }
    /// Upper store entries other than the pin.
    fn upper_entries(&self) -> Vec<String> {
        upper_entries(&self.upper)
    }
    fn assert_lower_intact(&self) {
        self.assert_lower_paths_valid();
        assert!(
            self.whiteouts().is_empty(),
            "no whiteout in the upper: {:?}",
            self.whiteouts()
        );
    }
    fn assert_lower_paths_valid(&self) {
        for p in &self.lower_paths {
            assert!(self.valid(p), "lower path {p} is still valid");
            assert!(
                Path::new(p).exists(),
                "lower path {p} is visible in /nix/store"
            );
        }
    }
    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.upper.join("var/nix/db/db.sqlite")).unwrap()
    }
}

/// The paths (`.path` fields) of a category in a verify document.
fn paths_of(doc: &serde_json::Value, category: &str) -> Vec<String> {
    doc["categories"][category]
        .as_array()
        .unwrap_or_else(|| panic!("{category} is a list: {doc}"))
        .iter()
        .map(|v| v["path"].as_str().unwrap().to_owned())
        .collect()
}

const CATEGORIES: [&str; 5] = [
    "missing_content",
    "unregistered",
    "hidden",
    "duplicates",
    "dangling_references",
];

fn assert_clean(doc: &serde_json::Value) {
    assert_eq!(doc["clean"], true, "{doc}");
    assert_eq!(doc["problems"], 0, "{doc}");
    for c in CATEGORIES {
        assert_eq!(doc["categories"][c], serde_json::json!([]), "{c}: {doc}");
    }
}

ns_test! {
    fn a_healthy_stack_verifies_clean() {
        let s = stack();
        s.mount();
        s.w.build(&["onTop"]);
        let (code, doc) = s.verify(&[]);
        assert_eq!(code, 0, "{doc}");
        assert_clean(&doc);
        assert_eq!(doc["format"], 1);
        assert_eq!(doc["mounted"], true);
        assert_eq!(doc["categories"]["hash_mismatches"], serde_json::Value::Null, "not checked: {doc}");

        let (code, doc) = s.verify(&["--check-contents"]);
        assert_eq!(code, 0, "{doc}");
        assert_clean(&doc);
        assert_eq!(doc["categories"]["hash_mismatches"], serde_json::json!([]));

        let text = s.w.tool_ok(["verify"]);
        assert!(text.lines().any(|l| l == "missing content: 0"), "{text}");
        assert!(text.ends_with("clean\n"), "{text}");

        // Not mounted: the same check on the named upper.
        s.umount();
        let out = s.w.tool(["verify", "--check-contents", "--upper", s.upper.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let out = s.w.tool(["verify"]);
        assert_eq!(out.status.code(), Some(64), "no mount, no --upper: {}", stderr(&out));
        assert!(stderr(&out).contains("--upper DIR"), "{}", stderr(&out));
    }
}

ns_test! {
    fn verify_finds_repairable_faults_and_repair_fixes_them() {
        let s = stack();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        let refs_of = |p: &str| -> BTreeSet<String> {
            s.w.nix_ok("nix-store", ["-q", "--references", p]).lines().map(str::to_owned).collect()
        };
        let on_top_refs = refs_of(&on_top);
        assert!(on_top_refs.len() >= 2, "on-top refers to app and tool: {on_top_refs:?}");
        // Unregistered: an upper entry whose row is gone.
        let c = s.db();
        c.execute("delete from Refs where referrer = (select id from ValidPaths where path = ?1)", [&on_top]).unwrap();
        c.execute("delete from ValidPaths where path = ?1", [&on_top]).unwrap();
        drop(c);
        assert!(!s.valid(&on_top));

        // Hidden: a whiteout over a lower path; duplicate: a lower path copied into the upper.
        let tool = s.lower_path("tool");
        let libb = s.lower_path("libb");
        s.umount();
        sh(&format!("mknod {}/store/{} c 0 0", s.upper.display(), base_name(&tool)));
        sh(&format!("cp -a {}/store/{} {}/store/", s.lower.display(), base_name(&libb), s.upper.display()));
        s.mount();
        assert!(!Path::new(&tool).exists(), "the whiteout hides {tool}");

        let (code, doc) = s.verify(&[]);
        assert_eq!(code, 1, "{doc}");
        assert_eq!(doc["clean"], false);
        assert_eq!(paths_of(&doc, "unregistered"), vec![on_top.clone()], "{doc}");
        assert_eq!(doc["categories"]["unregistered"][0]["registrable"], true);
        assert_eq!(paths_of(&doc, "hidden"), vec![tool.clone()], "{doc}");
        assert_eq!(doc["categories"]["hidden"][0]["valid"], true);
        assert_eq!(doc["categories"]["hidden"][0]["lower"], s.lower.to_str().unwrap());
        assert_eq!(paths_of(&doc, "duplicates"), vec![libb.clone()], "{doc}");
        assert!(doc["categories"]["duplicates"][0]["bytes"].as_u64().unwrap() > 0);
        assert_eq!(paths_of(&doc, "missing_content"), vec![tool.clone()], "{doc}");
        assert_eq!(doc["categories"]["missing_content"][0]["reason"], "whiteout");
        assert_eq!(doc["categories"]["dangling_references"], serde_json::json!([]));
        assert_eq!(doc["problems"], 4);

        let out = s.w.tool(["verify"]);
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("unregistered: 1  {on_top}\n")), "{text}");
        assert!(text.contains(&format!("hidden by whiteouts: 1  {tool}\n")), "{text}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("nixfs-layer: verify: 4 problem(s) found") && err.contains("--repair"), "{err}");

        let (code, doc) = s.verify(&["--repair", "--check-contents"]);
        assert_eq!(code, 0, "{doc}");
        assert_clean(&doc);
        assert_eq!(doc["categories"]["hash_mismatches"], serde_json::json!([]));
        let rep = &doc["repaired"];
        assert_eq!(rep["whiteouts_removed"], serde_json::json!([tool]));
        assert_eq!(rep["duplicates_removed"], serde_json::json!([libb]));
        assert_eq!(rep["registered"], serde_json::json!([on_top]));
        assert_eq!(rep["remounted"], true);

        // What a user checks: the hidden path is back, the copy is gone,
        // the entry is valid again with the references Nix had recorded.
        assert_eq!(sh(&format!("{tool}/bin/tool")), "hello from tool\n");
        assert!(s.whiteouts().is_empty());
        assert!(!s.upper_entries().contains(&base_name(&libb).to_owned()), "{:?}", s.upper_entries());
        assert!(s.valid(&on_top));
        assert_eq!(refs_of(&on_top), on_top_refs);
        verify_contents(&s.w);
        let (code, doc) = s.verify(&["--check-contents"]);
        assert_eq!(code, 0, "{doc}");
    }
}

ns_test! {
    fn repair_with_check_contents_hashes_again_only_what_it_changed() {
        let s = stack();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        let c = s.db();
        c.execute("delete from Refs where referrer = (select id from ValidPaths where path = ?1)", [&on_top]).unwrap();
        c.execute("delete from ValidPaths where path = ?1", [&on_top]).unwrap();
        drop(c);
        let tool = s.lower_path("tool");
        let libb = s.lower_path("libb");
        let app = s.lower_path("app");
        s.umount();
        // A whiteout over tool, whose content changed behind it; a
        // duplicate of libb; app changed (a mismatch before and after).
        sh(&format!("mknod {}/store/{} c 0 0", s.upper.display(), base_name(&tool)));
        sh(&format!("cp -a {}/store/{} {}/store/", s.lower.display(), base_name(&libb), s.upper.display()));
        for p in [&tool, &app] {
            let name = s.lower.join("store").join(base_name(p)).join("share/name");
            sh(&format!("printf X | dd of={} bs=1 count=1 conv=notrunc status=none", name.display()));
        }
        s.mount();

        let out = s
            .w
            .tool_command()
            .env("NIXFS_LAYER_LOG", "nixfs_layer=info")
            .args(["verify", "--json", "--check-contents", "--repair"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rep = &doc["repaired"];
        assert_eq!(rep["whiteouts_removed"], serde_json::json!([tool]), "{doc}");
        assert_eq!(rep["duplicates_removed"], serde_json::json!([libb]), "{doc}");
        assert_eq!(rep["registered"], serde_json::json!([on_top]), "{doc}");
        // The change the whiteout hid is found, the one before is kept.
        let mut mismatched = vec![app.clone(), tool.clone()];
        mismatched.sort();
        assert_eq!(paths_of(&doc, "hash_mismatches"), mismatched, "{doc}");
        for c in CATEGORIES {
            assert_eq!(doc["categories"][c], serde_json::json!([]), "{c}: {doc}");
        }
        // Every valid path was hashed once, then only the uncovered one.
        let hashed: Vec<usize> = stderr(&out)
            .lines()
            .filter(|l| l.contains("hashing contents"))
            .map(|l| l.rsplit("paths=").next().unwrap().trim().parse().unwrap())
            .collect();
        assert_eq!(hashed.len(), 2, "{}", stderr(&out));
        assert!(hashed[0] >= 4, "{hashed:?}");
        assert_eq!(hashed[1], 1, "{hashed:?}");

        // A check from scratch agrees.
        let (code, again) = s.verify(&["--check-contents"]);
        assert_eq!(code, 1, "{again}");
        assert_eq!(again["categories"], doc["categories"]);
    }
}

ns_test! {
    fn verify_reports_what_it_cannot_repair() {
        let s = stack();
        s.mount();
        let tool = s.lower_path("tool");
        let libb = s.lower_path("libb");
        let app = s.lower_path("app");
        let dev = s.lower_path("liba-dev");
        // Behind the tool's back: a lower path's content disappears, a byte
        // of another changes (same size), a referenced row is deleted.
        sh(&format!("rm -rf {}/store/{}", s.lower.display(), base_name(&tool)));
        let name = s.lower.join("store").join(base_name(&libb)).join("share/name");
        sh(&format!("printf X | dd of={} bs=1 count=1 conv=notrunc status=none", name.display()));
        let c = s.db();
        c.pragma_update(None, "foreign_keys", "off").unwrap();
        c.execute("delete from ValidPaths where path = ?1", [&dev]).unwrap();
        drop(c);

        let (code, doc) = s.verify(&[]);
        assert_eq!(code, 1, "{doc}");
        assert_eq!(paths_of(&doc, "missing_content"), vec![tool.clone()], "{doc}");
        assert_eq!(doc["categories"]["missing_content"][0]["reason"], "absent");
        assert_eq!(doc["categories"]["missing_content"][0]["layer"], s.lower.to_str().unwrap());
        assert_eq!(doc["categories"]["dangling_references"].as_array().unwrap().len(), 1, "{doc}");
        assert_eq!(doc["categories"]["dangling_references"][0]["referrer"], app);
        assert!(doc["categories"]["dangling_references"][0]["reference"].as_str().unwrap().starts_with('#'));
        assert_eq!(doc["categories"]["hash_mismatches"], serde_json::Value::Null);
        for c in ["unregistered", "hidden", "duplicates"] {
            assert_eq!(doc["categories"][c], serde_json::json!([]), "{c}: {doc}");
        }

        let (code, doc) = s.verify(&["--check-contents"]);
        assert_eq!(code, 1);
        assert_eq!(paths_of(&doc, "hash_mismatches"), vec![libb.clone()], "{doc}");
        let m = &doc["categories"]["hash_mismatches"][0];
        assert_ne!(m["expected"], m["actual"]);

        let out = s.w.tool(["verify", "--check-contents", "--repair", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("remain after repairing"), "{}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(paths_of(&doc, "missing_content"), vec![tool.clone()]);
        assert_eq!(paths_of(&doc, "hash_mismatches"), vec![libb.clone()]);
        assert_eq!(doc["repaired"]["registered"], serde_json::json!([]));

        // Nix's own check agrees about the modified path.
        let out = s.w.nix("nix-store").args(["--verify", "--check-contents"]).output().unwrap();
        assert!(stderr(&out).contains(&libb) && stderr(&out).contains("modified"), "{}", stderr(&out));
    }
}

ns_test! {
    fn stock_nix_gc_on_the_merged_store_spares_the_lowers() {
        let s = stack();
        s.mount();
        let lower_before = tree_digest(&s.lower);
        let on_top = s.w.build(&["onTop", "extra"]);
        assert!(!s.upper_entries().is_empty());

        // Deleting a lower path through the merged store fails, no whiteout.
        let tool = s.lower_path("tool");
        let out = s.w.nix("nix-store").args(["--delete", &tool]).output().unwrap();
        assert!(!out.status.success(), "{}", stderr(&out));
        assert!(s.whiteouts().is_empty(), "{:?}", s.whiteouts());
        assert!(s.valid(&tool) && Path::new(&tool).exists());

        s.w.nix_ok("nix-collect-garbage", ["-d"]);
        s.w.nix_ok("nix-store", ["--gc"]);
        for p in &on_top {
            assert!(!s.valid(p) && !Path::new(p).exists(), "unrooted upper path {p} collected");
        }
        assert_eq!(s.upper_entries(), Vec::<String>::new(), "only the pin is left in the upper");
        s.assert_lower_intact();
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is untouched");
        verify_contents(&s.w);
        let (code, doc) = s.verify(&[]);
        assert_eq!(code, 0, "{doc}");
    }
}

/// `nixfs-layer gc` output: the headline and the listed (path, bytes).
fn gc(s: &Stack, args: &[&str]) -> (String, Vec<(String, u64)>) {
    let mut all = vec!["gc"];
    all.extend_from_slice(args);
    let out = s.w.tool_ok(&all);
    let mut lines = out.lines();
    let head = lines.next().unwrap_or_default().to_owned();
    let listed = lines
        .map(|l| {
            let (p, b) = l
                .split_once('\t')
                .unwrap_or_else(|| panic!("path<TAB>bytes: {l}"));
            (p.to_owned(), b.parse().unwrap())
        })
        .collect();
    (head, listed)
}

ns_test! {
    fn nixfs_layer_gc_frees_exactly_the_unreachable_upper_paths() {
        let s = stack();
        s.mount();
        let lower_before = tree_digest(&s.lower);
        let result = s.w.path("result");
        let on_top = s.w.nix_ok("nix-build", ["-o", result.to_str().unwrap(), &common::fixture("store.nix"), "-A", "onTop"]);
        let on_top = on_top.trim().to_owned();
        let extra = s.w.build(&["extra"]).remove(0);
        s.w.nix_ok("nix-env", ["-p", "/nix/var/nix/profiles/test", "-i", &extra]);
        // Unrooted: an added file, and a build of its own.
        let f = s.w.path("scratch.txt");
        std::fs::write(&f, "scratch\n").unwrap();
        let added = s.w.nix_ok("nix-store", ["--add", f.to_str().unwrap()]).trim().to_owned();
        let salted = s.w.nix_ok("nix-build", ["--no-out-link", &common::fixture("store.nix"), "-A", "tool", "--argstr", "salt", "-x"]).trim().to_owned();
        let salted_drv = s.w.nix_ok("nix-store", ["-q", "--deriver", &salted]).trim().to_owned();
        let dead: BTreeSet<String> = [added.clone(), salted.clone(), salted_drv.clone()].into();
        let size = |p: &str| -> u64 { s.w.nix_ok("nix-store", ["-q", "--size", p]).trim().parse().unwrap() };
        let dead_bytes: u64 = dead.iter().map(|p| size(p)).sum();

        let before = s.upper_entries();
        let (head, listed) = gc(&s, &["--dry-run"]);
        assert_eq!(head, format!("would free 3 path(s), {dead_bytes} bytes"));
        assert_eq!(listed.iter().map(|(p, _)| p.clone()).collect::<BTreeSet<_>>(), dead);
        assert_eq!(s.upper_entries(), before, "a dry run deletes nothing");
        assert!(dead.iter().all(|p| s.valid(p)));

        let (head, listed) = gc(&s, &[]);
        assert_eq!(head, format!("freed 3 path(s), {dead_bytes} bytes"));
        assert_eq!(listed.iter().map(|(p, _)| p.clone()).collect::<BTreeSet<_>>(), dead);
        for p in &dead {
            assert!(!s.valid(p) && !s.upper.join("store").join(base_name(p)).exists(), "{p} freed");
        }
        for p in [&on_top, &extra] {
            assert!(s.valid(p), "rooted {p} survives");
        }
        assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
        s.assert_lower_intact();

        // Without roots everything of the upper goes, but the pin.
        std::fs::remove_file(&result).unwrap();
        sh("rm -f /nix/var/nix/profiles/test /nix/var/nix/profiles/test-*-link");
        let (head, listed) = gc(&s, &[]);
        assert!(listed.iter().any(|(p, _)| p == &on_top) && listed.iter().any(|(p, _)| p == &extra), "{head}: {listed:?}");
        assert!(head.starts_with(&format!("freed {} path(s)", listed.len())), "{head}");
        assert_eq!(s.upper_entries(), Vec::<String>::new(), "the upper holds nothing but the pin");
        s.assert_lower_intact();
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is untouched");
        verify_contents(&s.w);
    }
}

ns_test! {
    fn gc_refuses_a_stack_whose_lower_holds_entries_nix_would_delete() {
        let s = stack();
        s.mount();
        // An entry of the lower's store that no database lists (a leftover
        // of an interrupted copy, say).
        let stray = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-stray";
        sh(&format!("mkdir {}/store/{stray} && echo x > {}/store/{stray}/f", s.lower.display(), s.lower.display()));
        sh("mount -o remount /nix/store");
        let out = s.w.tool(["gc"]);
        assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
        assert!(stderr(&out).contains(stray) && stderr(&out).contains("nixfs-layer sync"), "{}", stderr(&out));
        assert!(s.whiteouts().is_empty());
        // The reason: stock Nix's collector deletes invalid entries. The
        // sealed overlay refuses that (it would be a whiteout over the
        // lower's copy), so Nix stops there and the entry stays.
        let out = s.w.nix("nix-store").arg("--gc").output().unwrap();
        assert!(!out.status.success(), "Nix's collector stops at the stray entry");
        assert!(stderr(&out).contains(stray) && stderr(&out).contains("Operation not permitted"), "{}", stderr(&out));
        assert!(s.whiteouts().is_empty(), "nothing is whited out: {:?}", s.whiteouts());
        assert!(Path::new(&format!("/nix/store/{stray}/f")).exists(), "the stray entry is still visible");
        s.assert_lower_paths_valid();
    }
}

ns_test! {
    fn repair_brings_back_a_lower_path_hidden_before_the_first_sync() {
        let s = stack();
        let tool = s.lower_path("tool");
        // The whiteout predates the first mount: the sync never registered tool.
        sh(&format!("mknod {}/store/{} c 0 0", s.upper.display(), base_name(&tool)));
        s.mount();
        assert!(!s.valid(&tool) && !Path::new(&tool).exists());
        let (code, doc) = s.verify(&[]);
        assert_eq!(code, 1, "{doc}");
        assert_eq!(paths_of(&doc, "hidden"), vec![tool.clone()], "{doc}");
        assert_eq!(doc["categories"]["hidden"][0]["valid"], false);
        assert_eq!(doc["categories"]["missing_content"], serde_json::json!([]), "not valid, so not missing: {doc}");

        let (code, doc) = s.verify(&["--repair"]);
        assert_eq!(code, 0, "{doc}");
        assert_eq!(doc["repaired"]["resynced"], true);
        assert!(s.valid(&tool), "registered again");
        assert_eq!(sh(&format!("{tool}/bin/tool")), "hello from tool\n");
        s.assert_lower_intact();
        verify_contents(&s.w);
    }
}
