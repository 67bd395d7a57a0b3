//! The layered store core, end to end: a lower built by real Nix, stacked
//! under an upper with real overlayfs, used by stock Nix (Debian's nix-bin).
//! Every test runs in its own mount namespace with a tmpfs on /nix.

mod common;

use std::path::Path;

use common::{
    base_name, mount_table, sh, stderr, tree_digest, upper_entries, verify_contents, Stack, World,
    PIN_SUFFIX,
};

/// The common stack (app → libb → liba, liba.dev, and tool in the lower;
/// an initialised upper) plus a file added to the lower with `nix-store --add`.
struct Setup {
    stack: Stack,
    /// The store path of the added file.
    added_file: String,
}

impl std::ops::Deref for Setup {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.stack
    }
}

const ADDED_CONTENT: &str = "a file the lower already holds\n";

fn setup() -> Setup {
    let stack = Stack::new(&["app", "tool"]);
    let w = &stack.w;
    let added_file = w.with_nix_at(&stack.lower, || {
        let f = w.path("note.txt");
        std::fs::write(&f, ADDED_CONTENT).unwrap();
        let added = w.nix_ok("nix-store", [OsArg::from("--add"), f.as_os_str().into()]);
        added.trim().to_owned()
    });
    Setup { stack, added_file }
}

type OsArg = std::ffi::OsString;

impl Setup {
    /// The upper's store entries, but for the pin every upper holds.
    fn upper_store(&self) -> Vec<String> {
        upper_entries(&self.upper)
    }
    /// All valid paths as `nix path-info --all` lists them, but for the pin.
    fn all_paths(&self) -> Vec<String> {
        self.w
            .nix_ok("nix", ["path-info", "--all"])
            .lines()
            .filter(|l| !l.ends_with(PIN_SUFFIX))
            .map(str::to_owned)
            .collect()
    }
}

/// `nix path-info --json` as a list of objects with a `path` key: Nix 2.8
/// prints that; Nix ≥ 2.19 an object keyed by path (made a list here,
/// in path order).
fn path_info_list(v: serde_json::Value) -> Vec<serde_json::Value> {
    match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(path, mut info)| {
                info["path"] = path.into();
                info
            })
            .collect(),
        other => panic!("unexpected nix path-info --json output: {other}"),
    }
}

/// What Nix answers about a set of paths, in one comparable string. The
/// pin's own entry and its name among referrers are left out; tests check
/// where it shows on their own.
fn nix_answers(w: &World, paths: &[String]) -> String {
    let info = path_info_list(
        serde_json::from_str(&w.nix_ok("nix", ["path-info", "--json", "--all"])).unwrap(),
    );
    let info: Vec<_> = info
        .into_iter()
        .filter(|v| !v["path"].as_str().unwrap().ends_with(PIN_SUFFIX))
        .collect();
    let mut out = serde_json::to_string_pretty(&info).unwrap();
    for p in paths {
        for q in [
            vec!["-qR", p.as_str()],
            vec!["-q", "--referrers", p.as_str()],
            vec!["-q", "--deriver", p.as_str()],
            vec!["-q", "--references", p.as_str()],
            vec!["-q", "--hash", p.as_str()],
            vec!["-q", "--size", p.as_str()],
        ] {
            out += &format!("== {q:?}\n");
            for line in w
                .nix_ok("nix-store", &q)
                .lines()
                .filter(|l| !l.ends_with(PIN_SUFFIX))
            {
                out += line;
                out += "\n";
            }
        }
    }
    out
}

ns_test! {
    fn lower_paths_answer_as_in_the_lower() {
        let s = setup();
        let all = s.w.with_nix_at(&s.lower, || s.all_paths());
        assert!(all.len() >= 8, "lower has outputs, .drv files and the added file: {all:?}");
        let expected = s.w.with_nix_at(&s.lower, || nix_answers(&s.w, &all));
        let lower_before = tree_digest(&s.lower);

        s.mount();
        assert_eq!(s.all_paths(), all, "every lower path is valid in the merged store, nothing else");
        assert_eq!(nix_answers(&s.w, &all), expected, "Nix answers as the lower itself does");
        // The pin shows among the referrers of the lower's tops only.
        let app = &s.lower_path("app");
        let liba = s.w.nix_ok("nix-store", ["-q", "--references", app]);
        let liba = liba.lines().find(|l| l.ends_with("-liba")).unwrap();
        let referrers = |p: &str| s.w.nix_ok("nix-store", ["-q", "--referrers", p]);
        assert!(referrers(app).lines().any(|l| l.ends_with(PIN_SUFFIX)), "{}", referrers(app));
        assert!(!referrers(liba).contains(PIN_SUFFIX), "{}", referrers(liba));
        verify_contents(&s.w);
        let app = &s.lower_path("app");
        assert_eq!(sh(&format!("{app}/bin/app")), "hello from app\n");
        assert!(s.upper_store().is_empty(), "reading creates nothing in the upper: {:?}", s.upper_store());
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is untouched");
    }
}

ns_test! {
    fn adding_content_the_lower_has_creates_nothing_in_the_upper() {
        let s = setup();
        s.mount();
        let f = s.w.path("again.txt");
        std::fs::write(&f, ADDED_CONTENT).unwrap();
        // Same name and content as in the lower: same store path.
        let again = s.w.path("copy");
        std::fs::create_dir(&again).unwrap();
        std::fs::rename(&f, again.join("note.txt")).unwrap();
        let p = s.w.nix_ok("nix-store", [OsArg::from("--add"), again.join("note.txt").into()]);
        assert_eq!(p.trim(), s.added_file);
        assert!(s.upper_store().is_empty(), "upper store gained {:?}", s.upper_store());
    }
}

ns_test! {
    fn builds_land_in_the_upper_only() {
        let s = setup();
        let lower_before = tree_digest(&s.lower);
        s.mount();
        let out = s.w.build(&["onTop"]);
        let on_top = &out[0];
        let base = Path::new(on_top).file_name().unwrap().to_str().unwrap().to_owned();
        assert!(s.upper.join("store").join(&base).is_dir(), "output in the upper's store dir");
        assert!(!s.lower.join("store").join(&base).exists(), "output not in the lower");
        assert!(s.valid(on_top));
        let refs = s.w.nix_ok("nix-store", ["-q", "--references", on_top]);
        let app = &s.lower_path("app");
        let tool = &s.lower_path("tool");
        assert!(refs.contains(app.as_str()) && refs.contains(tool.as_str()), "references: {refs}");
        for r in refs.lines().filter(|r| *r != on_top) {
            let b = Path::new(r).file_name().unwrap();
            assert!(s.lower.join("store").join(b).exists(), "{r} is a lower path");
            assert!(!s.upper.join("store").join(b).exists(), "{r} was not copied up");
        }
        // Everything new in the upper belongs to this build (its .drv and output).
        for e in s.upper_store() {
            assert!(e.contains("on-top"), "unexpected upper entry {e}");
        }
        assert_eq!(sh(&format!("cat {on_top}/share/deps")).lines().count(), 2);
        verify_contents(&s.w);
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is byte-identical");
    }
}

/// The store path of a fixture attribute, computed without building it.
fn out_path(w: &World, attr: &str) -> String {
    let expr = format!(
        "(import {} {{}}).{attr}.outPath",
        common::fixture("store.nix")
    );
    w.nix_ok("nix-instantiate", ["--eval", "--json", "-E", &expr])
        .trim()
        .trim_matches('"')
        .to_owned()
}

ns_test! {
    fn sync_follows_a_lower_that_gains_and_loses_paths() {
        let s = setup();
        s.mount();
        let extra = s.w.with_nix_at(&s.lower, || out_path(&s.w, "extra"));
        // Looked up (and missed) through the overlay before the lower has it.
        assert!(!Path::new(&extra).exists());
        assert!(!s.valid(&extra));

        let lower_extra = s.w.with_nix_at(&s.lower, || s.w.build(&["extra"]));
        assert_eq!(lower_extra, vec![extra.clone()]);
        assert!(!s.valid(&extra), "not valid before sync");
        let out = s.w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 2, removed 0"), "extra and its .drv: {out}");
        assert!(s.valid(&extra));
        assert_eq!(sh(&format!("cat {extra}/share/name")), "extra\n", "content visible through the overlay");
        verify_contents(&s.w);
        assert!(s.upper_store().is_empty(), "a lower addition copies nothing: {:?}", s.upper_store());

        // Nothing changed: nothing to do.
        let out = s.w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 0, removed 0"), "{out}");

        // The lower loses an unreferenced path.
        let tool = s.lower_path("tool");
        s.w.with_nix_at(&s.lower, || prune_from_lower(&s.w, &tool));
        assert!(!s.lower.join("store").join(base_name(&tool)).exists());
        let out = s.w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 0, removed 1"), "{out}");
        assert!(!s.valid(&tool), "{tool} is no longer valid");
        assert!(!Path::new(&tool).exists(), "and no longer visible");
        verify_contents(&s.w);
    }
}

ns_test! {
    fn sync_refuses_to_drop_what_upper_builds_need() {
        let s = setup();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        let tool = s.lower_path("tool");
        let db = s.upper.join("var/nix/db/db.sqlite");
        let db_before = std::fs::read(&db).unwrap();
        s.w.with_nix_at(&s.lower, || prune_from_lower(&s.w, &tool));

        let out = s.w.tool(["sync"]);
        assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("{tool} (needed by {on_top})")), "names path and referrer: {err}");
        assert!(err.contains("unchanged"), "{err}");
        assert_eq!(std::fs::read(&db).unwrap(), db_before, "merged database untouched");
        assert!(s.valid(&tool) && s.valid(&on_top));

        // Once the upper no longer needs it, the sync goes through.
        s.w.nix_ok("nix-store", ["--delete", &on_top]);
        let out = s.w.tool_ok(["sync"]);
        assert!(out.contains("removed 1"), "{out}");
        assert!(!s.valid(&tool));
    }
}

ns_test! {
    fn rows_still_in_the_lowers_wal_are_valid() {
        let w = World::new();
        let lower = w.path("lower");
        w.with_nix_at(&lower, || w.build(&["app"]));
        let db = lower.join("var/nix/db/db.sqlite");
        // A reader keeps the WAL from being checkpointed when Nix closes the
        // database, as a publisher's long-running Nix process would.
        let holder = rusqlite::Connection::open(&db).unwrap();
        let mode: String = holder.query_row("pragma journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let tool = w.with_nix_at(&lower, || w.build(&["tool"])).remove(0);

        let wal = lower.join("var/nix/db/db.sqlite-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0, "registrations sit in the WAL");
        let main_only = w.path("main-only.sqlite");
        std::fs::copy(&db, &main_only).unwrap();
        let c = rusqlite::Connection::open(&main_only).unwrap();
        let n: i64 = c
            .query_row("select count(*) from ValidPaths where path = ?1", [&tool], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "the main database file alone does not have {tool}");
        drop(c);

        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        let lower_before = tree_digest(&lower);
        w.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap()]);
        assert!(w.valid(&tool), "{tool} from the WAL is valid");
        verify_contents(&w);
        assert_eq!(tree_digest(&lower), lower_before, "no -shm or other file made in the lower");
        drop(holder);
    }
}

ns_test! {
    fn umount_then_mount_keeps_upper_builds() {
        let s = setup();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        s.w.tool_ok(["umount"]);
        assert!(!mount_table().iter().any(|(p, _)| p == "/nix/store" || p == "/nix/var"));
        assert!(!Path::new(&on_top).exists(), "unmounted: the store is gone from /nix");
        s.mount();
        assert!(s.valid(&on_top));
        assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
        verify_contents(&s.w);
        let status: serde_json::Value =
            serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(status["upper"]["paths"], 2, "on-top and its .drv: {status}");
    }
}

ns_test! {
    fn status_reports_each_layer() {
        let s = setup();
        let out = s.w.tool_ok(["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["mounted"], false);
        assert_eq!(v["upper"], serde_json::Value::Null, "no upper known: {out}");

        s.mount();
        let lower_count = s.all_paths().len() as u64;
        s.w.build(&["onTop"]);
        let v: serde_json::Value =
            serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["target"], "/nix");
        assert_eq!(v["mounted"], true);
        assert_eq!(v["upper"]["dir"], s.upper.to_str().unwrap());
        assert_eq!(v["upper"]["paths"], 2);
        assert_eq!(v["upper"]["upper_only_paths"], 2);
        assert!(v["upper"]["bytes"].as_u64().unwrap() > 0);
        assert_eq!(v["lowers"][0]["dir"], s.lower.to_str().unwrap());
        assert_eq!(v["lowers"][0]["paths"], lower_count);
        assert_eq!(v["lowers"][0]["provided_paths"], lower_count);
        assert!(v["lowers"][0]["bytes"].as_u64().unwrap() > 0);
        assert_eq!(v["valid_paths"], lower_count + 2, "the pin is not counted");
        // What Nix lists counts the pin: status says so, in both forms.
        let nix_all = s.w.nix_ok("nix", ["path-info", "--all"]).lines().count() as u64;
        assert_eq!(nix_all, lower_count + 3, "Nix lists the pin");
        assert_eq!(v["nix_valid_paths"], nix_all, "nix_valid_paths is Nix's count");

        let text = s.w.tool_ok(["status"]);
        assert!(text.starts_with("/nix: mounted\n"), "{text}");
        let valid = format!(
            "  valid paths: {} of the layers; `nix path-info --all` lists {nix_all}, with the pin (…-nixfs-layer-lowers)\n",
            lower_count + 2
        );
        assert!(text.contains(&valid), "{valid} in {text}");
        assert!(text.contains(&format!("lower {}: {lower_count} paths", s.lower.display())), "{text}");

        s.w.tool_ok(["umount"]);
        let v: serde_json::Value = serde_json::from_str(
            &s.w.tool_ok(["status", "--json", "--upper", s.upper.to_str().unwrap()]),
        )
        .unwrap();
        assert_eq!(v["mounted"], false);
        assert_eq!(v["upper"]["paths"], 2, "figures of an unmounted upper: {v}");
    }
}

/// Runs the tool, expects `code`, a one-line message containing `says`,
/// and the mount table exactly as before.
fn refused(w: &World, args: &[&str], code: i32, says: &str) {
    let before = mount_table();
    let out = w.tool(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?}: expected '{says}' in: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("nixfs-layer: "), "{err}");
    assert_eq!(mount_table(), before, "{args:?} left mounts behind");
}

ns_test! {
    fn bad_input_is_refused_with_no_mount_left_behind() {
        let s = setup();
        let (lower, upper) = (s.lower.to_str().unwrap(), s.upper.to_str().unwrap());
        let w = &s.w;
        let mount = |l: &str, u: &str| vec!["mount", "--lower", l, "--upper", u].into_iter()
            .map(str::to_owned).collect::<Vec<_>>();
        let run = |args: Vec<String>, code, says: &str| {
            refused(w, &args.iter().map(String::as_str).collect::<Vec<_>>(), code, says)
        };

        let missing = w.path("no-such-lower");
        run(mount(missing.to_str().unwrap(), upper), 66, "no-such-lower: no such directory");

        let empty = w.path("empty-lower");
        std::fs::create_dir(&empty).unwrap();
        run(mount(empty.to_str().unwrap(), upper), 65, "no store/ directory");

        std::fs::create_dir(empty.join("store")).unwrap();
        run(mount(empty.to_str().unwrap(), upper), 65, "no Nix database at");

        std::fs::create_dir_all(empty.join("var/nix/db")).unwrap();
        std::fs::write(empty.join("var/nix/db/db.sqlite"), "this is not sqlite, just text padding it out to a page or so".repeat(100)).unwrap();
        std::fs::write(empty.join("var/nix/db/schema"), "7").unwrap();
        run(mount(empty.to_str().unwrap(), upper), 65, "schema version '7'");

        std::fs::write(empty.join("var/nix/db/schema"), "10").unwrap();
        run(mount(empty.to_str().unwrap(), upper), 65, "not a Nix database");

        let fresh = w.path("never-initialised");
        std::fs::create_dir(&fresh).unwrap();
        run(mount(lower, fresh.to_str().unwrap()), 66, "nixfs-layer init --upper");
        run(mount(lower, lower), 64, "are the same directory");
        refused(w, &["mount", "--lower", lower], 64, "mount needs --upper");

        let bad_config = w.path("bad.toml");
        std::fs::write(&bad_config, "lowers = \"not a list\"\n").unwrap();
        refused(w, &["mount", "--config", bad_config.to_str().unwrap()], 78, "bad.toml");

        let foreign = w.path("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("precious"), "data").unwrap();
        refused(w, &["init", "--upper", foreign.to_str().unwrap()], 73, "not a nixfs-layer upper");
        assert_eq!(std::fs::read_to_string(foreign.join("precious")).unwrap(), "data");

        // Without CAP_SYS_ADMIN (still uid 0).
        let before = mount_table();
        let out = std::process::Command::new("setpriv")
            .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"])
            .arg(env!("CARGO_BIN_EXE_nixfs-layer"))
            .args(mount(lower, upper))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
        assert!(stderr(&out).contains("needs root (CAP_SYS_ADMIN)"), "{}", stderr(&out));
        assert_eq!(mount_table(), before);

        // A kernel without overlayfs: this namespace's /proc/filesystems lacks it.
        let fake = w.path("filesystems");
        std::fs::write(&fake, "nodev\tsysfs\nnodev\ttmpfs\n\text4\n").unwrap();
        sh(&format!("mount --bind {} /proc/filesystems", fake.display()));
        run(mount(lower, upper), 69, "modprobe overlay");
        sh("umount /proc/filesystems");

        // Already mounted.
        s.mount();
        run(mount(lower, upper), 75, "/nix/store is already a mount point");
        let other = w.path("other-target");
        let mut again = mount(lower, upper);
        again.extend(["--target".to_owned(), other.to_str().unwrap().to_owned()]);
        run(again, 75, "is already mounted at /nix/store");
        s.w.tool_ok(["umount"]);
        refused(w, &["umount"], 1, "nothing of nixfs-layer is mounted at /nix");
        refused(w, &["sync"], 1, "nothing of nixfs-layer is mounted at /nix");
    }
}

ns_test! {
    fn realisations_of_ca_derivations_come_along() {
        let w = World::new();
        *w.features.lock().unwrap() = "ca-derivations".into();
        let lower = w.path("lower");
        let (built, lower_rows) = w.with_nix_at(&lower, || {
            let built = w.build_from("ca.nix", &["b"]);
            (built, realisation_rows(Path::new("/nix/var/nix/db/db.sqlite")))
        });
        assert_eq!(lower_rows.len(), 3, "ca-a, ca-b and its resolved form: {lower_rows:?}");
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        w.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap()]);
        assert_eq!(realisation_rows(&upper.join("var/nix/db/db.sqlite")), lower_rows);
        // Nix 2.8 records the CA tables' version in `ca-schema`; Nix ≥ 2.20
        // as a row of SchemaMigrations instead. Either comes along.
        if lower.join("var/nix/db/ca-schema").exists() {
            assert_eq!(
                std::fs::read_to_string(upper.join("var/nix/db/ca-schema")).unwrap(),
                std::fs::read_to_string(lower.join("var/nix/db/ca-schema")).unwrap()
            );
        }
        // Nix finds the outputs through the realisations: nothing is rebuilt.
        let out = w.nix("nix-build").args(["--no-out-link", &common::fixture("ca.nix"), "-A", "b"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), built[0]);
        if !lower.join("var/nix/db/ca-schema").exists() {
            // The lower (Realisations tables and their trigger on
            // ValidPaths) was merged row by row, without SchemaMigrations;
            // the Nix that then used the merged store recorded its
            // migration there itself.
            let c = rusqlite::Connection::open(upper.join("var/nix/db/db.sqlite")).unwrap();
            let mut q = c.prepare("select migration from SchemaMigrations").unwrap();
            let m: Vec<String> = q.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
            assert!(m.iter().any(|m| m.contains("ca-derivations")), "{m:?}");
        }
        assert!(!stderr(&out).contains("building"), "nothing built: {}", stderr(&out));
        let upper_outputs: Vec<_> = upper_entries(&upper).into_iter().filter(|e| !e.ends_with(".drv")).collect();
        assert!(upper_outputs.is_empty(), "no output in the upper: {upper_outputs:?}");
        verify_contents(&w);
    }
}

/// (drvPath, outputName, output path, references to other realisations)
fn realisation_rows(db: &Path) -> Vec<(String, String, String, Vec<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare(
            "select r.drvPath, r.outputName, v.path,
                    coalesce((select group_concat(r2.drvPath || '!' || r2.outputName, ' ')
                              from RealisationsRefs rr join Realisations r2 on r2.id = rr.realisationReference
                              where rr.referrer = r.id), '')
             from Realisations r join ValidPaths v on v.id = r.outputPath order by 1, 2",
        )
        .unwrap();
    s.query_map([], |r| {
        let refs: String = r.get(3)?;
        let mut refs: Vec<String> = refs.split_whitespace().map(str::to_owned).collect();
        refs.sort();
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, refs))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

ns_test! {
    fn config_file_carries_the_same_settings_and_flags_win() {
        let s = setup();
        let (lower, upper) = (s.lower.to_str().unwrap(), s.upper.to_str().unwrap());
        let cfg = s.w.path("stack.toml");
        std::fs::write(&cfg, format!("lowers = [\"{lower}\"]\nupper = \"{upper}\"\ntarget = \"/nix\"\n[flakefs]\nenable = false\n")).unwrap();
        let cfg = cfg.to_str().unwrap();
        s.w.tool_ok(["mount", "--config", cfg]);
        let v: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json", "--config", cfg])).unwrap();
        assert_eq!(v["mounted"], true);
        assert_eq!(v["lowers"][0]["dir"], lower);
        s.w.tool_ok(["umount", "--config", cfg]);

        // Flags win over the file: the file's upper does not exist.
        let wrong = s.w.path("wrong.toml");
        std::fs::write(&wrong, format!("lowers = [\"{lower}\"]\nupper = \"/nonexistent/upper\"\n")).unwrap();
        let out = s.w.tool(["mount", "--config", wrong.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
        s.w.tool_ok(["mount", "--config", wrong.to_str().unwrap(), "--upper", upper]);
        s.w.tool_ok(["umount"]);

        // /etc/nixfs-layer/config.toml is read when no --config is given.
        std::fs::write(Path::new(common::DEFAULT_CONFIG_DIR).join("config.toml"), format!("lowers = [\"{lower}\"]\nupper = \"{upper}\"\n")).unwrap();
        s.w.tool_ok(["mount"]);
        assert!(s.valid(&s.lower_path("app")));
        let v: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(v["upper"]["dir"], upper);
    }
}

ns_test! {
    fn provenance_follows_what_nix_itself_adds_and_deletes() {
        let s = setup();
        s.mount();
        let status = || -> serde_json::Value { serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap() };
        let lower_count = status()["lowers"][0]["provided_paths"].as_u64().unwrap();
        let on_top = s.w.build(&["onTop"]).remove(0);
        assert_eq!(status()["upper"]["paths"], 2, "Nix's registrations are the upper's");

        s.w.nix_ok("nix-store", ["--delete", &on_top]);
        assert_eq!(status()["upper"]["paths"], 1, "only the .drv is left");

        // Lower paths are GC roots: a plain delete is refused...
        let tool = &s.lower_path("tool");
        let out = s.w.nix("nix-store").args(["--delete", tool]).output().unwrap();
        assert!(!out.status.success() && stderr(&out).contains("still alive"), "{}", stderr(&out));
        assert!(s.upper_store().iter().all(|e| e.contains("on-top")), "no whiteout: {:?}", s.upper_store());
        // ...and so is one forced past liveness (the pin still refers to it).
        let out = s.w.nix("nix-store").args(["--delete", "--ignore-liveness", tool]).output().unwrap();
        assert!(!out.status.success() && (stderr(&out).contains("in use") || stderr(&out).contains("still alive")), "{}", stderr(&out));
        assert!(s.valid(tool));
        assert_eq!(status()["lowers"][0]["provided_paths"], lower_count);

        // A lower path hidden by a whiteout (made behind the tool's back) is
        // not registered again by a sync that re-reads the lower.
        let out = s.w.tool_ok(["sync", "--force"]);
        assert!(out.starts_with("sync: added 0, removed 0"), "re-reading the lower: {out}");
        verify_contents(&s.w);

        let c = rusqlite::Connection::open(s.upper.join("var/nix/db/db.sqlite")).unwrap();
        let (paths, origins): (i64, i64) = c
            .query_row("select (select count(*) from ValidPaths), (select count(*) from NixfsLayerOrigin)", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!(paths, origins, "one provenance row per valid path");
    }
}

/// The lower's publisher deletes a path from the lower with its own Nix.
/// (`--ignore-liveness`: under a loaded machine Nix 2.8 sometimes counts a
/// path as alive through runtime-root scanning of unrelated processes; the
/// path has no referrer in the lower either way.)
fn prune_from_lower(w: &World, path: &str) {
    w.nix_ok("nix-store", ["--delete", "--ignore-liveness", path]);
}

ns_test! {
    fn switching_to_a_new_lower_keeps_exactly_what_the_upper_needs() {
        let s = setup();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        let on_top_drv = s.w.nix_ok("nix-store", ["-q", "--deriver", &on_top]).trim().to_owned();
        let refs_before = s.w.nix_ok("nix-store", ["-q", "--references", &on_top]);
        let closure: std::collections::BTreeSet<String> = s
            .w
            .nix_ok("nix-store", ["-qR", &on_top, &on_top_drv])
            .lines()
            .map(str::to_owned)
            .collect();
        let lower_before = tree_digest(&s.lower);

        // The next generation of the lower: app (same paths) and extra, no tool.
        let new_lower = s.w.path("lower-v2");
        let new_paths: std::collections::BTreeSet<String> = s.w.with_nix_at(&new_lower, || {
            s.w.build(&["app", "extra"]);
            s.all_paths().into_iter().collect()
        });
        let expected_kept: std::collections::BTreeSet<String> = closure
            .iter()
            .filter(|p| !new_paths.contains(*p) && **p != on_top && **p != on_top_drv)
            .map(|p| base_name(p).to_owned())
            .collect();
        assert!(expected_kept.iter().any(|p| p.ends_with("-tool")), "{expected_kept:?}");

        // Without --keep-needed: refused, nothing changes.
        let nl = new_lower.to_str().unwrap();
        let out = s.w.tool(["sync", "--lower", nl]);
        assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
        assert!(stderr(&out).contains("-tool (needed by") && stderr(&out).contains("--keep-needed"), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(v["lowers"][0]["dir"], s.lower.to_str().unwrap(), "still on the old lower");

        s.w.tool_ok(["sync", "--lower", nl, "--keep-needed"]);
        let v: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(v["mounted"], true);
        assert_eq!(v["lowers"][0]["dir"], nl);
        assert_eq!(v["lowers"].as_array().unwrap().len(), 1);
        let mut want: std::collections::BTreeSet<String> = expected_kept.clone();
        want.insert(base_name(&on_top).to_owned());
        want.insert(base_name(&on_top_drv).to_owned());
        let got: std::collections::BTreeSet<String> = s.upper_store().into_iter().collect();
        assert_eq!(got, want, "the upper holds its own paths plus exactly what the new lower lacks");

        assert!(s.valid(&on_top));
        assert_eq!(s.w.nix_ok("nix-store", ["-q", "--references", &on_top]), refs_before);
        assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
        assert!(!s.valid(&s.added_file), "what nothing needed went with the old lower");
        let extra = new_paths.iter().find(|p| p.ends_with("-extra")).unwrap();
        assert!(s.valid(extra), "the new lower's paths are valid");
        verify_contents(&s.w);
        assert_eq!(tree_digest(&s.lower), lower_before, "the old lower was only read");
        let out = s.w.tool(["verify"]);
        assert!(out.status.success(), "verify: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    }
}

ns_test! {
    fn mount_reports_what_a_lower_lost_while_unmounted() {
        let s = setup();
        s.mount();
        let on_top = s.w.build(&["onTop"]).remove(0);
        s.w.tool_ok(["umount"]);
        // The template drops tool while the AppVM is off.
        let tool = s.lower_path("tool");
        s.w.with_nix_at(&s.lower, || prune_from_lower(&s.w, &tool));

        let out = s.w.tool([
            "mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs",
        ]);
        assert!(out.status.success(), "mount goes ahead: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("warning: {tool} left the lowers but upper paths need it")),
            "names what broke: {}",
            stderr(&out)
        );
        assert!(s.valid(&on_top));
        let out = s.w.tool(["verify", "--json"]);
        assert_eq!(out.status.code(), Some(1));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let missing = v["categories"]["missing_content"].as_array().unwrap();
        assert!(missing.iter().any(|m| m["path"] == tool.as_str()), "verify lists it missing: {v}");
        // Everything else of the lower is still there and fine.
        let app = &s.lower_path("app");
        assert_eq!(sh(&format!("{app}/bin/app")), "hello from app\n");
    }
}

ns_test! {
    fn two_lowers_first_wins_and_order_changes_move_paths() {
        let s = setup();
        // A second lower sharing app's closure with the first, plus extra.
        let second = s.w.path("lower-b");
        let b_paths: Vec<String> = s.w.with_nix_at(&second, || {
            s.w.build(&["app", "extra"]);
            s.all_paths()
        });
        let a_paths = s.w.with_nix_at(&s.lower, || s.all_paths());
        let (a, b, u) = (s.lower.to_str().unwrap(), second.to_str().unwrap(), s.upper.to_str().unwrap());
        s.w.tool_ok(["mount", "--lower", a, "--lower", b, "--upper", u, "--no-flake-fs"]);
        let status = || -> serde_json::Value { serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap() };
        let only_b = b_paths.iter().filter(|p| !a_paths.contains(p)).count();
        let v = status();
        assert_eq!(v["lowers"][0]["provided_paths"], a_paths.len(), "{v}");
        assert_eq!(v["lowers"][1]["provided_paths"], only_b, "{v}");
        assert_eq!(v["lowers"][1]["paths"], b_paths.len());
        let mut all = s.all_paths();
        all.sort();
        let mut union: Vec<String> = a_paths.iter().chain(&b_paths).cloned().collect();
        union.sort();
        union.dedup();
        assert_eq!(all, union, "every path of either lower is valid");
        let extra = b_paths.iter().find(|p| p.ends_with("-extra")).unwrap();
        assert_eq!(sh(&format!("cat {extra}/share/name")), "extra\n");
        verify_contents(&s.w);
        s.w.tool_ok(["umount"]);

        // The other way round: the shared paths now come from b.
        let out = s.w.tool(["mount", "--lower", b, "--lower", a, "--upper", u, "--no-flake-fs"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("now from another lower"), "mount's summary: {said}");
        let v = status();
        assert_eq!(v["lowers"][0]["provided_paths"], b_paths.len(), "{v}");
        let only_a = a_paths.iter().filter(|p| !b_paths.contains(p)).count();
        assert_eq!(v["lowers"][1]["provided_paths"], only_a, "{v}");
        verify_contents(&s.w);
    }
}

ns_test! {
    fn a_lower_row_without_content_is_skipped_on_the_first_merge() {
        let s = setup();
        let tool = s.lower_path("tool");
        // Content pruned behind the lower's Nix: its database still lists it.
        sh(&format!("chmod -R u+w {0} && rm -rf {0}", s.lower.join("store").join(base_name(&tool)).display()));
        let out = s.w.tool([
            "mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("skipped 1 lower path(s) whose store entry is missing"), "mount's summary: {said}");
        assert!(!s.valid(&tool));
        let app = &s.lower_path("app");
        assert!(s.valid(app));
        verify_contents(&s.w);
    }
}

ns_test! {
    fn foreground_mount_without_the_tree_serves_until_stopped() {
        use std::time::{Duration, Instant};
        let s = setup();
        let before = mount_table();
        let sock_path = s.w.path("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let wait_exit = |child: &mut std::process::Child| {
            let t = Instant::now();
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    return st;
                }
                assert!(t.elapsed() < Duration::from_secs(20), "exits within 20 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let spawn = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_nixfs-layer"))
                .args(["mount", "--foreground", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()])
                .env("NOTIFY_SOCKET", &sock_path)
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut buf = [0u8; 64];

        // Stopped by SIGTERM (a service manager's stop).
        let mut svc = spawn();
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(s.valid(&s.lower_path("app")), "the store is usable once READY=1 is sent");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(svc.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(wait_exit(&mut svc).success());
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert_eq!(mount_table(), before, "SIGTERM leaves nothing mounted");

        // Stopped by `umount`.
        let mut svc = spawn();
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        s.w.tool_ok(["umount"]);
        assert!(wait_exit(&mut svc).success());
        assert_eq!(mount_table(), before);
    }
}

ns_test! {
    /// A machine's own /nix as its bottom lower (a Qubes AppVM whose /nix
    /// came with the template's root, a NixOS host whose system lives in
    /// /nix/store): bound read-only and private elsewhere, then stacked
    /// over /nix itself. Unmounting gives back the untouched original.
    fn the_machines_own_nix_bound_elsewhere_is_a_lower_over_itself() {
        let w = World::new();
        let built = w.build(&["app", "tool"]);
        let app = built[0].clone();
        let own = w.path("own-nix");
        std::fs::create_dir_all(&own).unwrap();
        sh(&format!(
            "mount --bind /nix {0} && mount --make-private {0} && mount -o remount,bind,ro {0}",
            own.display()
        ));
        let before = tree_digest(&own);
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        w.tool_ok([
            "mount",
            "--lower",
            own.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
            "--no-flake-fs",
        ]);
        // The lower's paths are there and valid, through the stack.
        let out = sh(&format!("{app}/bin/app"));
        assert_eq!(out, "hello from app\n");
        assert!(w.valid(&app));
        // A build lands in the upper, not in the machine's own store.
        let extra = w.build(&["extra"])[0].clone();
        assert!(w.valid(&extra));
        let ups = upper_entries(&upper);
        assert!(ups.contains(&base_name(&extra).to_owned()), "{ups:?}");
        assert!(ups.iter().all(|e| e.contains("-extra")), "only the build and its .drv: {ups:?}");
        assert!(!own.join("store").join(base_name(&extra)).exists());
        // The lower as the tool reads it is the original, not the stack
        // mounted over it: sync finds nothing new, the DB it copies is the
        // machine's own.
        let out = w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 0, removed 0"), "{out}");
        assert_eq!(tree_digest(&own), before, "the own /nix is untouched");

        w.tool_ok(["umount"]);
        // The original /nix is back as it was, no trace of the stack; Nix
        // uses it as before.
        sh(&format!("umount {}", own.display()));
        assert_eq!(tree_digest(Path::new("/nix")), before);
        assert!(!Path::new(&extra).exists());
        assert!(!w.valid(&extra));
        assert!(w.valid(&app));
    }
}

ns_test! {
    /// The same with a bind that shares mount events with /nix (systemd
    /// makes mounts shared): the stack would show up inside its own lower,
    /// and the lower's database would be the merged one. Refused, nothing
    /// mounted.
    fn a_lower_that_would_see_the_stack_mounted_over_it_is_refused() {
        let w = World::new();
        w.build(&["app"]);
        let own = w.path("own-nix");
        std::fs::create_dir_all(&own).unwrap();
        sh(&format!("mount --make-shared /nix && mount --bind /nix {0}", own.display()));
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        let before = mount_table();
        let out = w.tool([
            "mount",
            "--lower",
            own.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
            "--no-flake-fs",
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains(own.to_str().unwrap()) && err.contains("--make-private"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(mount_table(), before, "nothing mounted");
    }
}

ns_test! {
    /// A lost or damaged mount record (nixfs-layer/mount.json in the upper)
    /// does not strand the stack: the overlay lists its lowers, so status,
    /// sync and umount still work.
    fn a_lost_mount_record_does_not_strand_the_stack() {
        let s = setup();
        s.mount();
        let record = s.upper.join("nixfs-layer/mount.json");
        std::fs::write(&record, "{ not json").unwrap();
        let status = s.w.tool_ok(["status", "--json"]);
        assert!(status.contains(s.lower.to_str().unwrap()), "{status}");
        let out = s.w.tool(["sync"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("mount record unreadable"), "{}", stderr(&out));
        s.w.tool_ok(["umount"]);
        assert!(!mount_table().iter().any(|(p, _)| p == "/nix/store" || p == "/nix/var"));
    }
}
