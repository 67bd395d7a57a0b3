//! Lowers changed behind the tool's back, the way publishers do it: a new
//! tree renamed into place while the stack is mounted, a tree's `store/`
//! replaced by copying, a store entry deleted while the lower's database
//! still lists it. Lowers are built by real Nix; every test runs in its own
//! mount namespace with a tmpfs on /nix.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{base_name, fixture, mountinfo, sh, stderr, verify_contents, Stack, World};

/// Builds `attrs` of tests/fixtures/store.nix into a Nix root at `dir` of
/// its own (its own database, its own store directory); returns its valid
/// paths.
fn build_tree(w: &World, dir: &Path, attrs: &[&str]) -> BTreeSet<String> {
    w.with_nix_at(dir, || {
        w.build(attrs);
        w.nix_ok("nix", ["path-info", "--all"])
            .lines()
            .map(str::to_owned)
            .collect()
    })
}

impl Stack {
    /// Builds `attr` through the merged store with a `result` link as GC root.
    fn build_rooted(&self, attr: &str) -> String {
        let link = self.w.path(&format!("result-{attr}"));
        self.w
            .nix_ok(
                "nix-build",
                [
                    "-o",
                    link.to_str().unwrap(),
                    &fixture("store.nix"),
                    "-A",
                    attr,
                ],
            )
            .trim()
            .to_owned()
    }

    fn lower_dir(&self) -> PathBuf {
        self.lower.canonicalize().unwrap()
    }

    /// `status --json`: whether each lower is reported replaced.
    fn replaced(&self) -> Vec<bool> {
        let out = self.w.tool(["status", "--json"]);
        assert!(out.status.success(), "status: {}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["lowers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["replaced"].as_bool().expect("replaced is a boolean"))
            .collect()
    }

    /// Every path valid and its content there through /nix/store.
    fn assert_valid_and_visible<'a>(&self, paths: impl IntoIterator<Item = &'a String>) {
        for p in paths {
            assert!(self.valid(p), "{p} is valid");
            assert!(Path::new(p).exists(), "{p} is visible in /nix/store");
        }
    }

    fn valid_count(&self) -> i64 {
        common::valid_count(&self.upper)
    }
}

/// The mountinfo line of the mount at `point` (mount ids included: a
/// fresh mount gets a new one).
fn mount_line(point: &str) -> String {
    mountinfo()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(point))
        .unwrap_or_else(|| panic!("something is mounted at {point}"))
        .to_owned()
}

/// After a new tree took the lower's place and `sync` ran: the new tree's
/// paths and the rooted upper path are valid with their content, and stock
/// `nix-store --verify --check-contents` finds nothing to unregister.
fn assert_new_tree_served(s: &Stack, new_paths: &BTreeSet<String>, on_top: &String) {
    s.assert_valid_and_visible(new_paths);
    s.assert_valid_and_visible([on_top]);
    assert_eq!(
        sh(&format!("{on_top}/bin/on-top")),
        "hello from on-top\n",
        "the upper build still runs"
    );
    let extra = new_paths
        .iter()
        .find(|p| p.ends_with("-extra"))
        .expect("the new tree has extra");
    assert_eq!(sh(&format!("cat {extra}/share/name")), "extra\n");
    assert_eq!(s.replaced(), [false], "status: nothing replaced any more");
    verify_contents(&s.w);
    s.assert_valid_and_visible(new_paths);
    s.assert_valid_and_visible([on_top]);
    let out = s.w.tool(["verify"]);
    assert!(
        out.status.success(),
        "nixfs-layer verify is clean: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

ns_test! {
    fn a_lower_renamed_into_place_is_mounted_afresh_by_sync() {
        let s = Stack::new(&["app", "tool"]);
        let staged = s.w.path("lower.new");
        let new_paths = build_tree(&s.w, &staged, &["app", "tool", "extra"]);
        s.mount();
        let on_top = s.build_rooted("onTop");
        let lower = s.lower_dir();

        // The publisher renames the new tree into place and drops the old one.
        sh(&format!(
            "mv {l} {l}.old && mv {n} {l} && rm -rf {l}.old",
            l = lower.display(),
            n = staged.display()
        ));

        // status tells, and says what to run.
        let out = s.w.tool(["status"]);
        assert!(out.status.success(), "status exits 0: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("REPLACED since it was mounted") && text.contains("nixfs-layer sync"),
            "{text}"
        );
        assert_eq!(s.replaced(), [true]);

        // Busy: a process has a file open on the store. Refused, nothing changed.
        let mut holder = Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3< {on_top}/bin/on-top; echo open; exec sleep 600"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready, "open\n");
        let (before_mount, before_count) = (mount_line("/nix/store"), s.valid_count());
        let out = s.w.tool(["sync"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(75), "busy: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("lower {} was replaced", lower.display()))
                && err.contains("busy")
                && err.contains("nixfs-layer sync"),
            "{err}"
        );
        assert_eq!(mount_line("/nix/store"), before_mount, "the overlay is left as it was");
        assert_eq!(s.valid_count(), before_count, "the merged database is unchanged");
        assert_eq!(s.replaced(), [true], "still reported");
        holder.kill().unwrap();
        holder.wait().unwrap();

        // Now sync mounts the new tree and merges it.
        let out = s.w.tool(["sync"]);
        assert!(out.status.success(), "sync: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("lower {} was replaced since it was mounted", lower.display())),
            "{}",
            stderr(&out)
        );
        assert_ne!(mount_line("/nix/store"), before_mount, "mounted afresh");
        assert_new_tree_served(&s, &new_paths, &on_top);

        // The next sync has nothing to do.
        let out = s.w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 0, removed 0"), "{out}");
    }
}

ns_test! {
    fn a_lower_store_replaced_by_copying_is_mounted_afresh_by_sync() {
        let s = Stack::new(&["app", "tool"]);
        let staged = s.w.path("staged");
        let new_paths = build_tree(&s.w, &staged, &["app", "tool", "extra"]);
        s.mount();
        let on_top = s.build_rooted("onTop");
        let lower = s.lower_dir();

        // What `rsync -a --delete` of a fresh tree does to the lower's
        // contents, with cp/rm: the lower directory stays, store/ and var/
        // are new (mtimes kept, as -a does).
        sh(&format!(
            "rm -rf {l}/store {l}/var && cp -a {n}/store {n}/var {l}/",
            l = lower.display(),
            n = staged.display()
        ));
        assert_eq!(s.replaced(), [true], "status tells");

        let out = s.w.tool(["sync"]);
        assert!(out.status.success(), "sync: {}", stderr(&out));
        assert!(stderr(&out).contains("was replaced since it was mounted"), "{}", stderr(&out));
        assert_new_tree_served(&s, &new_paths, &on_top);

        // Unmounted and mounted again: the same, nothing lost.
        s.umount();
        s.mount();
        assert_new_tree_served(&s, &new_paths, &on_top);
    }
}

ns_test! {
    fn mount_after_a_replacement_reads_the_whole_new_tree() {
        // The lower was replaced while mounted and stock `nix-store
        // --verify` ran before anyone synced: it unregistered what the
        // stale overlay no longer showed. Unmounted and mounted again, the
        // merge must not take the new tree for the one it knew.
        let s = Stack::new(&["app", "tool"]);
        let staged = s.w.path("lower.new");
        let new_paths = build_tree(&s.w, &staged, &["app", "tool", "extra"]);
        s.mount();
        let on_top = s.build_rooted("onTop");
        let lower = s.lower_dir();
        sh(&format!(
            "mv {l} {l}.old && mv {n} {l} && rm -rf {l}.old",
            l = lower.display(),
            n = staged.display()
        ));
        // Stock Nix's verify, through the stale view, before anyone synced:
        // it unregisters what it cannot see.
        let out = s.w.nix("nix-store").arg("--verify").output().unwrap();
        let lost: Vec<&String> = s.lower_paths.iter().filter(|p| !s.valid(p)).collect();
        eprintln!("stock nix-store --verify through the stale overlay: {}", stderr(&out));
        assert!(!lost.is_empty(), "it unregistered lower paths: {}", stderr(&out));
        s.umount();

        let out = s.w.tool([
            "mount", "--lower", lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs",
        ]);
        assert!(out.status.success(), "mount: {}", stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains(&format!("(added {},", lost.len() + 2)),
            "the lower paths Nix unregistered, and extra with its .drv, are registered: {said}"
        );
        s.assert_valid_and_visible(&new_paths);
        // What Nix unregistered of the upper's own paths is verify --repair's.
        if !s.valid(&on_top) {
            let out = s.w.tool(["verify", "--repair"]);
            assert!(out.status.success(), "verify --repair: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        }
        assert_new_tree_served(&s, &new_paths, &on_top);
    }
}

ns_test! {
    fn a_lower_entry_deleted_behind_its_database_is_named() {
        let s = Stack::new(&["app", "tool"]);
        s.mount();
        let lower = s.lower_dir();
        let tool = s.lower_path("tool");
        let entry = lower.join("store").join(base_name(&tool));
        let saved = s.w.path("saved-tool");
        sh(&format!("cp -a {} {}", entry.display(), saved.display()));

        // Someone deletes the entry; the lower's database still lists it.
        sh(&format!("rm -rf {}", entry.display()));
        let warning = format!(
            "warning: missing content: {tool} is valid in the database of lower {}",
            lower.display()
        );
        for round in ["sync", "sync again"] {
            let out = s.w.tool(["sync"]);
            assert!(out.status.success(), "{round}: {}", stderr(&out));
            assert!(stderr(&out).contains(&warning), "{round} names it: {}", stderr(&out));
            let summary = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                summary.contains("missing content: 1 lower path(s) whose store entry vanished")
                    && summary.contains(&tool),
                "{round}: {summary}"
            );
        }
        // An idle sync stays cheap with it known.
        let t = Instant::now();
        s.w.tool_ok(["sync"]);
        let idle = t.elapsed();
        eprintln!("idle sync with one vanished entry known: {idle:?}");
        assert!(idle < Duration::from_secs(2), "{idle:?}");

        // verify says the same, in the same words.
        let out = s.w.tool(["verify"]);
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(&format!("missing content: 1  {tool}")), "{text}");

        // mount names it too.
        s.umount();
        let out = s.w.tool([
            "mount", "--lower", lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs",
        ]);
        assert!(out.status.success(), "mount: {}", stderr(&out));
        assert!(stderr(&out).contains(&warning), "mount names it: {}", stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("missing content: 1 lower path(s)"), "mount's summary: {said}");

        // Put back: no more warnings.
        sh(&format!("cp -a {} {}", saved.display(), entry.display()));
        let out = s.w.tool(["sync"]);
        assert!(out.status.success());
        assert!(!stderr(&out).contains("missing content"), "{}", stderr(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("missing content"));
        assert_eq!(sh(&format!("{tool}/bin/tool")), "hello from tool\n");
        verify_contents(&s.w);
    }
}
