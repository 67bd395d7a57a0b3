//! A damaged merged database, end to end: a lower built by real Nix, upper
//! paths built through the merged store with GC roots, then the merged
//! database damaged the way a disk does it (bytes overwritten in the middle
//! of a page of one table, a file cut short). `mount` and `sync` refuse it,
//! `verify` reports it, `verify --repair` rebuilds it from the layers and
//! the journal of the upper's registrations, and afterwards every path is
//! valid again with what Nix had recorded about it.

mod common;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fixture, mount_table, stderr, verify_contents, Stack};

/// What Nix says about a path: `nix path-info --json` (narHash, narSize,
/// references, deriver, registrationTime, signatures, ca).
type PathInfo = serde_json::Value;

struct Built {
    /// GC-rooted upper paths, each with what Nix recorded about it.
    rooted: BTreeMap<String, PathInfo>,
    /// Upper paths Nix signed (their signatures must survive).
    signed: String,
}

impl Stack {
    fn db_file(&self) -> PathBuf {
        self.upper.join("var/nix/db/db.sqlite")
    }

    fn path_info(&self, p: &str) -> PathInfo {
        let out = self.w.nix_ok("nix", ["path-info", "--json", p]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        // 2.8 prints a list of objects, newer Nix an object by path.
        match v {
            serde_json::Value::Array(mut a) => a.remove(0),
            serde_json::Value::Object(m) => m.into_iter().next().unwrap().1,
            other => panic!("path-info: {other}"),
        }
    }

    fn references(&self, p: &str) -> String {
        self.w.nix_ok("nix-store", ["-q", "--references", p])
    }

    fn deriver(&self, p: &str) -> String {
        self.w.nix_ok("nix-store", ["-q", "--deriver", p])
    }

    /// Builds `attr` of store.nix through the mounted stack with a GC root
    /// in the upper's gcroots.
    fn build_rooted(&self, attr: &str) -> String {
        let root = format!("/nix/var/nix/gcroots/test-{attr}");
        let out = self.w.nix_ok(
            "nix-build",
            [&fixture("store.nix"), "-A", attr, "--out-link", &root],
        );
        out.trim().to_owned()
    }

    /// Mounts, builds `onTop` (on two lower paths) with a root, signs it
    /// (Nix updates its row in place), syncs; returns what Nix says about it.
    fn build_upper(&self) -> Built {
        self.mount();
        let on_top = self.build_rooted("onTop");
        let keys = self.w.path("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let (sk, pk) = (keys.join("sk"), keys.join("pk"));
        let out = self
            .w
            .nix("nix-store")
            .args(["--generate-binary-cache-key", "test-key-1"])
            .args([&sk, &pk])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        self.w.nix_ok(
            "nix",
            ["store", "sign", "--key-file", sk.to_str().unwrap(), &on_top],
        );
        let info = self.path_info(&on_top);
        assert!(
            info["signatures"].as_array().is_some_and(|s| !s.is_empty()),
            "signed: {info}"
        );
        assert!(info["deriver"].is_string(), "{info}");
        self.w.tool_ok(["sync"]);
        Built {
            rooted: BTreeMap::from([(on_top.clone(), info)]),
            signed: on_top,
        }
    }

    fn tool_upper(&self, cmd: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec![cmd, "--upper", self.upper.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.w.tool(&args)
    }

    fn assert_rebuilt_as_before(&self, built: &Built) {
        for p in &self.lower_paths {
            assert!(self.valid(p), "lower path {p} valid after the rebuild");
        }
        for (p, before) in &built.rooted {
            assert!(
                self.valid(p),
                "rooted upper path {p} valid after the rebuild"
            );
            let after = self.path_info(p);
            assert_eq!(&after, before, "Nix says the same about {p} as before");
        }
        assert!(self.path_info(&built.signed)["signatures"]
            .as_array()
            .is_some_and(|s| !s.is_empty()));
        verify_contents(&self.w);
        let (code, doc) = verify_json(self, &[]);
        assert_eq!(code, 0, "{doc}");
        assert_eq!(doc["clean"], true, "{doc}");
    }
}

fn verify_json(s: &Stack, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let out = s.w.tool(&all);
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify output is JSON ({e}): {}", stderr(&out)));
    (out.status.code().unwrap(), doc)
}

/// Writes what the WAL holds into the database file, as a checkpoint does
/// (the damage must be in the file, where a disk would make it).
fn checkpoint(db: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("pragma wal_checkpoint(truncate)", [], |_| Ok(()))
        .unwrap();
}

/// Overwrites bytes in the middle of the stored rows of a page of `table`
/// (the part of a b-tree page that holds cells: from its cell content
/// offset to the page's end), as a bad sector would.
fn damage_page_of(db: &Path, table: &str) -> u64 {
    checkpoint(db);
    let c = rusqlite::Connection::open(db).unwrap();
    let page_size: u64 = c.query_row("pragma page_size", [], |r| r.get(0)).unwrap();
    let page: u64 = c
        .query_row(
            "select pageno from dbstat where name = ?1 and pagetype = 'leaf' order by ncell desc limit 1",
            [table],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("a leaf page of {table}: {e}"));
    drop(c);
    let start = (page - 1) * page_size;
    let bytes = std::fs::read(db).unwrap();
    let header = &bytes[start as usize..(start + page_size) as usize];
    // b-tree page header: bytes 5..7 are where the cell content starts.
    let content = u16::from_be_bytes([header[5], header[6]]) as u64;
    let middle = content + (page_size - content) / 2;
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.seek(SeekFrom::Start(start + middle - 32)).unwrap();
    f.write_all(&[0xa5; 64]).unwrap();
    f.sync_all().unwrap();
    page
}

fn truncate(db: &Path) {
    checkpoint(db);
    let len = std::fs::metadata(db).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.set_len(len / 2).unwrap();
}

/// Nothing of the stack is mounted at /nix.
fn assert_nothing_mounted() {
    let table = mount_table();
    for p in ["/nix/store", "/nix/var"] {
        assert!(
            !table.iter().any(|(m, _)| m == p),
            "nothing mounted on {p}: {table:?}"
        );
    }
}

/// The one-line refusal of a damaged database: its file and the way out.
fn assert_refusal(s: &Stack, out: &std::process::Output, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(65), "{what}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
    let db = s.db_file();
    assert!(
        err.contains(db.to_str().unwrap()),
        "{what} names the file: {err}"
    );
    assert!(err.contains("damaged"), "{what}: {err}");
    assert!(
        err.contains(&format!(
            "nixfs-layer verify --repair --upper {}",
            s.upper.display()
        )),
        "{what} names the fix: {err}"
    );
}

/// Unmounted: mount refuses, verify --upper reports, verify --repair
/// --upper rebuilds, mount works and Nix sees everything as before.
fn refused_reported_rebuilt(damage: impl FnOnce(&Path)) {
    let s = Stack::new(&["app", "tool"]);
    let built = s.build_upper();
    s.umount();
    damage(&s.db_file());

    let out = s.w.tool([
        "mount",
        "--lower",
        s.lower.to_str().unwrap(),
        "--upper",
        s.upper.to_str().unwrap(),
        "--no-flake-fs",
    ]);
    assert_refusal(&s, &out, "mount");
    assert_nothing_mounted();
    assert!(!s.upper.join("nixfs-layer/mount.json").exists());

    let out = s.tool_upper("verify", &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damage = doc["categories"]["damaged_database"].as_array().unwrap();
    assert!(!damage.is_empty(), "{doc}");
    assert_eq!(
        damage[0]["database"],
        s.db_file().to_str().unwrap(),
        "{doc}"
    );
    assert_eq!(doc["clean"], false);
    let err = stderr(&out);
    assert!(err.contains("verify --repair"), "{err}");
    let out = s.tool_upper("verify", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("damaged database: "), "{text}");
    assert!(!text.contains("damaged database: 0"), "{text}");

    let out = s.tool_upper("verify", &["--repair", "--json"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(out.status.code(), Some(0), "{doc} {}", stderr(&out));
    let rebuilt = &doc["repaired"]["rebuilt"];
    let from_journal: Vec<&str> = rebuilt["from_journal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for p in built.rooted.keys() {
        assert!(
            from_journal.contains(&p.as_str()),
            "{p} from the journal: {doc}"
        );
    }
    let aside = rebuilt["damaged_copy"].as_str().unwrap();
    assert!(
        aside.starts_with(&format!("{}.damaged-", s.db_file().display())),
        "{doc}"
    );
    assert!(
        Path::new(aside).is_file(),
        "the damaged file is kept: {aside}"
    );
    assert_eq!(doc["categories"]["damaged_database"], serde_json::json!([]));

    s.mount();
    s.assert_rebuilt_as_before(&built);
}

ns_test! {
    fn a_damaged_valid_paths_page_is_refused_reported_and_rebuilt() {
        refused_reported_rebuilt(|db| {
            damage_page_of(db, "ValidPaths");
        });
    }
}

ns_test! {
    fn a_damaged_provenance_page_is_refused_reported_and_rebuilt() {
        refused_reported_rebuilt(|db| {
            damage_page_of(db, "NixfsLayerOrigin");
        });
    }
}

ns_test! {
    fn a_truncated_database_is_refused_with_the_fix_and_rebuilt() {
        refused_reported_rebuilt(|db| {
            truncate(db);
            // Not "no such table": the same line as for other damage, from
            // every command that opens it.
        });
    }
}

ns_test! {
    fn an_emptied_database_names_the_fix_in_status_too() {
        let s = Stack::new(&["app", "tool"]);
        let built = s.build_upper();
        s.umount();
        let db = s.db_file();
        checkpoint(&db);
        std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(0).unwrap();
        let out = s.tool_upper("status", &[]);
        assert_refusal(&s, &out, "status");
        assert!(!stderr(&out).contains("no such table"), "{}", stderr(&out));
        let out = s.w.tool([
            "mount", "--lower", s.lower.to_str().unwrap(),
            "--upper", s.upper.to_str().unwrap(), "--no-flake-fs",
        ]);
        assert_refusal(&s, &out, "mount");
        assert_nothing_mounted();
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "mount wrote nothing into it");
        let out = s.tool_upper("verify", &["--repair"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        s.mount();
        s.assert_rebuilt_as_before(&built);
    }
}

ns_test! {
    fn a_mounted_stack_with_a_damaged_database_refuses_sync_and_is_rebuilt_in_place() {
        let s = Stack::new(&["app", "tool"]);
        let built = s.build_upper();
        // Built after the journal's last catch-up: the rebuild hashes and
        // scans it (its references are found again, its deriver is lost).
        let late = s.build_rooted("extra");
        let late_refs = s.references(&late);
        let liba = s.lower_path("liba");
        assert!(late_refs.contains(&liba), "{late_refs}");
        damage_page_of(&s.db_file(), "ValidPaths");

        // A sync that re-reads the lowers would write: refused.
        let out = s.w.tool(["sync", "--force"]);
        assert_refusal(&s, &out, "sync");
        let (code, doc) = verify_json(&s, &[]);
        assert_eq!(code, 1, "{doc}");
        assert_eq!(doc["mounted"], true);
        assert!(!doc["categories"]["damaged_database"].as_array().unwrap().is_empty(), "{doc}");

        // While a Nix process has the store open, the repair waits for
        // nothing and changes nothing.
        let mut serve = s
            .w
            .nix("nix-store")
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lock = "/nix/var/nix/db/big-lock";
        for _ in 0..100 {
            let free = Command::new("flock").args(["-n", "-x", lock, "true"]).status().unwrap().success();
            if !free {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let before = std::fs::read(s.db_file()).unwrap();
        let out = s.w.tool(["verify", "--repair"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(75), "{err}");
        assert!(err.contains("big-lock") && err.contains("Nix is using this store"), "{err}");
        assert_eq!(std::fs::read(s.db_file()).unwrap(), before, "nothing changed");
        drop(serve.stdin.take());
        serve.wait().unwrap();

        let (code, doc) = verify_json(&s, &["--repair"]);
        assert_eq!(code, 0, "{doc}");
        let rebuilt = &doc["repaired"]["rebuilt"];
        // The late output and its .drv, and nothing the journal had.
        let scanned: Vec<&str> = rebuilt["scanned"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(scanned.contains(&late.as_str()), "{doc}");
        assert!(scanned.iter().all(|p| p.contains("-extra")), "{doc}");
        assert!(rebuilt["from_journal"].as_array().unwrap().iter().any(|v| v == &serde_json::json!(built.signed)), "{doc}");
        // Still mounted, and Nix sees the rebuilt database at once.
        assert!(mount_table().iter().any(|(m, _)| m == "/nix/store"));
        assert!(s.valid(&late));
        assert_eq!(s.references(&late), late_refs);
        assert_eq!(s.deriver(&late).trim(), "unknown-deriver");
        s.w.tool_ok(["sync"]);
        s.assert_rebuilt_as_before(&built);
    }
}
