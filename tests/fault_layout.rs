//! Faults in how the layers are laid out or where they live: a target that
//! overlaps a layer, a full upper file system, what an interrupted import
//! leaves in the upper.

mod common;

use std::path::Path;

use common::*;

/// Runs the tool, expects it to fail with `code`, a one-line message
/// holding every one of `says`, and the mount table as it was.
fn refused(w: &World, args: &[&str], code: i32, says: &[&str]) -> String {
    let before = mount_table();
    let out = w.tool(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: expected '{s}' in: {err}");
    }
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("nixfs-layer: "), "{err}");
    assert_eq!(mount_table(), before, "{args:?} left mounts behind");
    err
}

fn mount_args<'a>(lower: &'a str, upper: &'a str, target: Option<&'a str>) -> Vec<&'a str> {
    let mut a = vec!["mount", "--lower", lower, "--upper", upper, "--no-flake-fs"];
    if let Some(t) = target {
        a.extend(["--target", t]);
    }
    a
}

ns_test! {
    /// A target that is, holds or lies inside a lower or the upper is
    /// refused before anything is mounted (or created in a layer).
    fn a_target_overlapping_a_layer_is_refused() {
        let s = Stack::new(&["app"]);
        let w = &s.w;
        let (lower, upper) = (s.lower.to_str().unwrap(), s.upper.to_str().unwrap());
        let lower_before = tree_digest(&s.lower);
        let upper_var = s.upper.join("var");
        let in_lower = s.lower.join("sub");
        let link = w.path("link-to-lower");
        std::os::unix::fs::symlink(&s.lower, &link).unwrap();
        let scratch = w.path("");
        let cases: [(&Path, &str, &str, &str); 6] = [
            (&s.lower, "lower", lower, "they are the same directory"),
            (&s.upper, "upper", upper, "they are the same directory"),
            (&upper_var, "upper", upper, "the target lies inside the upper"),
            (&in_lower, "lower", lower, "the target lies inside the lower"),
            // The target given as a symlink to the lower.
            (&link, "lower", lower, "they are the same directory"),
            // A target holding both layers.
            (&scratch, "upper", upper, "the upper lies inside the target"),
        ];
        for (target, kind, layer, how) in cases {
            let t = target.to_str().unwrap();
            let err = refused(w, &mount_args(lower, upper, Some(t)), 64, &[how]);
            let resolved = std::fs::canonicalize(target)
                .unwrap_or_else(|_| target.to_owned());
            assert!(err.contains(&format!("target {}", resolved.display())), "{err}");
            assert!(err.contains(&format!("{kind} {layer}")), "{err}");
        }
        assert!(!in_lower.exists(), "nothing is created in a lower");
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is untouched");
        assert!(!s.upper.join("nixfs-layer/mount.json").exists());

        // A lower given as a symlink to the target.
        let link = w.path("link-to-nix");
        std::os::unix::fs::symlink("/nix", &link).unwrap();
        sh(&format!("mount --bind {lower} /nix"));
        refused(
            w,
            &mount_args(link.to_str().unwrap(), upper, None),
            64,
            &["target /nix and lower /nix overlap (they are the same directory)"],
        );
        sh("umount /nix");
    }
}

ns_test! {
    /// `mount --bind L /nix` then `--lower /nix`: the lower is the target.
    /// Mounted, the lower's path would show the stack, and `verify` would
    /// take the upper's own builds for copies of lower paths.
    fn a_lower_bound_on_the_target_is_refused_as_a_lower() {
        let s = Stack::new(&["app"]);
        let upper = s.upper.to_str().unwrap();
        sh(&format!("mount --bind {} /nix", s.lower.display()));
        let before = tree_digest(Path::new("/nix"));
        refused(
            &s.w,
            &mount_args("/nix", upper, None),
            64,
            &["target /nix and lower /nix overlap", "they are the same directory"],
        );
        // So is the upper bound on the target.
        sh("umount /nix");
        sh(&format!("mount --bind {upper} /nix"));
        refused(
            &s.w,
            &mount_args(s.lower.to_str().unwrap(), upper, None),
            64,
            &[&format!("target /nix and upper {upper} overlap (they are the same directory)")],
        );
        sh("umount /nix");
        sh(&format!("mount --bind {} /nix", s.lower.display()));
        assert_eq!(tree_digest(Path::new("/nix")), before, "the lower is untouched");
        sh("umount /nix");
    }
}

ns_test! {
    /// A lower and an upper that are one directory through a bind mount.
    fn a_lower_bound_on_the_upper_is_refused() {
        let s = Stack::new(&["app"]);
        let bound = s.w.path("upper-again");
        std::fs::create_dir_all(&bound).unwrap();
        sh(&format!("mount --bind {} {}", s.upper.display(), bound.display()));
        // The upper holds store/ and a schema-10 database: it would pass
        // as a lower by itself.
        refused(
            &s.w,
            &mount_args(bound.to_str().unwrap(), s.upper.to_str().unwrap(), None),
            64,
            &[
                &format!("lower {} and upper {} are the same directory", bound.display(), s.upper.display()),
            ],
        );
    }
}

ns_test! {
    /// `sync --lower` to a new generation that is the target itself is
    /// refused before anything changes; the stack stays mounted as it was.
    fn switching_to_the_target_as_a_lower_is_refused() {
        let s = Stack::new(&["app"]);
        s.mount();
        let app = s.lower_path("app");
        let mounted = mount_table();
        refused(
            &s.w,
            &["sync", "--lower", "/nix", "--keep-needed"],
            64,
            &["target /nix and lower /nix overlap"],
        );
        assert_eq!(mount_table(), mounted);
        assert!(s.valid(&app));
        s.umount();
    }
}

ns_test! {
    /// What stays allowed: layers apart from the target (and the target's
    /// own directory bound privately elsewhere as a lower, the machine's
    /// own /nix stacked over itself: layered_store.rs). A build in the
    /// upper is then no "copy of a lower path" to verify.
    fn a_layout_apart_from_the_target_mounts() {
        let s = Stack::new(&["app"]);
        s.mount();
        let app = s.lower_path("app");
        assert_eq!(sh(&format!("{app}/bin/app")), "hello from app\n");
        let extra = s.w.build(&["extra"])[0].clone();
        assert!(s.valid(&extra));
        let out = s.w.tool(["verify"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        s.umount();
        assert!(!mount_table().iter().any(|(p, _)| p == "/nix/store" || p == "/nix/var"));
    }
}

/// Bytes in use on the file system at `dir`.
fn used_bytes(dir: &Path) -> u64 {
    sh(&format!("df --output=used -B1 {} | tail -1", dir.display()))
        .trim()
        .parse()
        .unwrap()
}

fn resize(dir: &Path, bytes: u64) {
    sh(&format!("mount -o remount,size={bytes} {}", dir.display()));
}

/// `PRAGMA integrity_check` of an upper's merged database says ok.
fn db_intact(upper: &Path) -> bool {
    let c = rusqlite::Connection::open(upper.join("var/nix/db/db.sqlite")).unwrap();
    c.query_row("pragma integrity_check", [], |r| r.get::<_, String>(0))
        .unwrap()
        == "ok"
}

/// Expects a failure with 74 naming the full upper (and not `lower`);
/// returns the message.
fn says_upper_full(w: &World, args: &[&str], upper: &Path, lower: Option<&Path>) -> String {
    let err = refused(
        w,
        args,
        74,
        &[
            &format!("upper {} is full", upper.display()),
            "free space there and retry",
        ],
    );
    if let Some(l) = lower {
        assert!(
            !err.contains(l.to_str().unwrap()),
            "a lower is not to blame: {err}"
        );
    }
    err
}

ns_test! {
    /// A full upper file system is reported as such (exit 74, naming the
    /// upper), never as a lower's fault or an internal error, by init,
    /// mount and sync; nothing is mounted, the merged database is as it
    /// was, and once there is room again the same command works.
    fn a_full_upper_is_named_and_nothing_is_lost() {
        let w = World::new();
        let lower = w.path("lower");
        let made = nixfs_layer::synth::generate(&lower, 8000, 7).unwrap();
        let db_size = std::fs::metadata(lower.join("var/nix/db/db.sqlite")).unwrap().len();
        assert!(db_size > 3 << 20, "the lower's database outgrows a 2 MiB upper: {db_size}");
        let fs = w.path("upper-fs");
        std::fs::create_dir_all(&fs).unwrap();
        sh(&format!("mount -t tmpfs -o size=2m nixfs-layer-test {}", fs.display()));

        // init on a file system with no room left, then with a little.
        let upper = fs.join("upper");
        let up = upper.to_str().unwrap();
        sh(&format!("dd if=/dev/zero of={}/fill bs=64k 2>/dev/null || true", fs.display()));
        says_upper_full(&w, &["init", "--upper", up], &upper, None);
        sh(&format!("rm {0}/fill; dd if=/dev/zero of={0}/fill bs=1k count=2000 2>/dev/null || true", fs.display()));
        says_upper_full(&w, &["init", "--upper", up], &upper, None);
        sh(&format!("rm {}/fill", fs.display()));
        w.tool_ok(["init", "--upper", up]);
        assert_eq!(valid_count(&upper), 1, "the pin");

        // mount: the lower's database does not fit into the upper.
        let args = mount_args(lower.to_str().unwrap(), up, None);
        says_upper_full(&w, &args, &upper, Some(&lower));
        assert!(db_intact(&upper));
        assert_eq!(valid_count(&upper), 1, "the merged database is as it was");
        assert_eq!(entries(&upper.join("nixfs-layer/tmp")), Vec::<String>::new());
        assert!(!upper.join("nixfs-layer/mount.json").exists());
        resize(&fs, 64 << 20);
        w.tool_ok(&args);
        assert!(w.valid(&made.paths[0].path));
        let count = valid_count(&upper);
        assert_eq!(count, 8001);

        // sync: the lower doubles. First the copy of its database does not
        // fit, then (with room for the copy) the merged database cannot grow.
        nixfs_layer::synth::mutate(&lower, 0, 8000, 8).unwrap();
        let db_size = std::fs::metadata(lower.join("var/nix/db/db.sqlite")).unwrap().len();
        let used = used_bytes(&fs);
        let mounted = mount_table();
        for (room, writing) in [(1 << 20, "nixfs-layer/tmp/"), (db_size + (1 << 20), "var/nix/db/db.sqlite")] {
            resize(&fs, used + room);
            let err = says_upper_full(&w, &["sync"], &upper, Some(&lower));
            assert!(err.contains(&format!("(writing {}/{writing}", upper.display())), "{err}");
            assert_eq!(mount_table(), mounted, "still mounted as it was");
            assert!(db_intact(&upper));
            assert_eq!(valid_count(&upper), count, "the merged database is as it was");
            assert_eq!(entries(&upper.join("nixfs-layer/tmp")), Vec::<String>::new());
        }
        resize(&fs, 128 << 20);
        let out = w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 8000"), "{out}");
        assert_eq!(valid_count(&upper), count + 8000);
        w.tool_ok(["umount"]);
    }
}

/// `verify --json`: its exit code and document.
fn verify_json(w: &World, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["verify", "--json"];
    args.extend(extra);
    let out = w.tool(&args);
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify --json: {e}: {}", stderr(&out)));
    (out.status.code().unwrap(), doc)
}

fn partial_paths(doc: &serde_json::Value) -> Vec<String> {
    doc["categories"]["partial_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_owned())
        .collect()
}

ns_test! {
    /// A real `nix-store --import` stopped while it writes a path: its
    /// entry and `.lock` are in the upper. While the process lives (and
    /// holds the lock) verify leaves them be; once it is killed they are a
    /// partial entry, reported, and `verify --repair` removes both, after
    /// which the same import goes through.
    fn an_interrupted_import_is_reported_and_repaired_once_its_lock_is_free() {
        let s = Stack::new(&["app"]);
        s.mount();
        let w = &s.w;
        // Many small files: Nix takes a while to restore and canonicalise
        // them, long enough to be caught at it.
        let src = w.path("many");
        std::fs::create_dir_all(&src).unwrap();
        let salt = w.path("").display().to_string();
        for i in 0..20000 {
            std::fs::write(src.join(format!("f{i}")), format!("{salt} {i}\n")).unwrap();
        }
        let path = w.nix_ok("nix-store", ["--add", src.to_str().unwrap()]).trim().to_owned();
        let export = w.path("many.export");
        let out = w.nix("nix-store").args(["--export", &path]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::write(&export, &out.stdout).unwrap();
        w.nix_ok("nix-store", ["--delete", &path]);
        let name = base_name(&path).to_owned();
        let entry = s.upper.join("store").join(&name);
        let lock = s.upper.join("store").join(format!("{name}.lock"));
        assert!(!entry.exists() && !lock.exists());

        // Start the import, stop it once its entry appears.
        let mut caught = None;
        for attempt in 0..5 {
            let mut child = w
                .nix("nix-store")
                .arg("--import")
                .stdin(std::fs::File::open(&export).unwrap())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            loop {
                if entry.symlink_metadata().is_ok() && lock.exists() {
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                    break;
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            if s.valid(&path) || child.try_wait().unwrap().is_some() {
                eprintln!("attempt {attempt}: the import finished before it was stopped; again");
                let _ = child.wait();
                w.nix_ok("nix-store", ["--delete", &path]);
                continue;
            }
            caught = Some(child);
            break;
        }
        let mut child = caught.expect("an import stopped half-way");
        assert!(!s.valid(&path));

        // Stopped, alive, holding the lock: not reported, not touched.
        let (code, doc) = verify_json(w, &[]);
        assert_eq!(partial_paths(&doc), Vec::<String>::new(), "{doc}");
        assert_eq!(doc["categories"]["unregistered"], serde_json::json!([]), "{doc}");
        assert_eq!(code, 0, "{doc}");
        let (_, doc) = verify_json(w, &["--repair"]);
        assert_eq!(doc["repaired"]["partial_removed"], serde_json::json!([]), "{doc}");
        assert!(entry.exists() && lock.exists(), "left alone while its lock is held");

        // Killed: its lock is free, the entry is partial.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(entry.exists() && lock.exists());
        let (code, doc) = verify_json(w, &[]);
        assert_eq!(partial_paths(&doc), vec![path.clone()], "{doc}");
        // (Its size is reported; it can be 0 when the import was stopped
        // right after making the entry.)
        assert!(doc["categories"]["partial_entries"][0]["bytes"].as_u64().is_some(), "{doc}");
        assert_eq!(doc["categories"]["unregistered"], serde_json::json!([]), "{doc}");
        assert_eq!(code, 1);
        let out = w.tool(["verify"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("partial entries (interrupted imports or builds): 1  {path}")), "{text}");
        assert!(stderr(&out).contains("verify --repair"), "{}", stderr(&out));

        let (code, doc) = verify_json(w, &["--repair"]);
        assert_eq!(doc["repaired"]["partial_removed"], serde_json::json!([path]), "{doc}");
        assert_eq!(doc["repaired"]["remounted"], true, "{doc}");
        assert_eq!((code, doc["clean"].as_bool()), (0, Some(true)), "{doc}");
        assert!(!entry.exists() && !lock.exists(), "entry and lock removed from the upper");
        assert!(!Path::new(&path).exists(), "gone from the merged store too");

        // The import goes through now.
        let out = w
            .nix("nix-store")
            .arg("--import")
            .stdin(std::fs::File::open(&export).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(s.valid(&path));
        assert!(!lock.exists());
        let (code, doc) = verify_json(w, &[]);
        assert_eq!(code, 0, "{doc}");
        s.umount();
    }
}

ns_test! {
    /// The same state made by hand: an entry and its `.lock` in the merged
    /// store, the lock held by this process with flock(2) (as Nix takes
    /// it), then with an fcntl lock; neither is reported or removed. Let
    /// go, it is reported and repaired.
    fn a_partial_entry_is_left_alone_while_its_lock_is_held() {
        use std::os::fd::AsRawFd;
        let s = Stack::new(&["app"]);
        s.mount();
        let w = &s.w;
        let name = "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-half-imported";
        let path = format!("/nix/store/{name}");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(format!("{path}/part"), "half of it").unwrap();
        let lock_path = format!("{path}.lock");
        let lock = std::fs::File::create(&lock_path).unwrap();
        assert!(s.upper.join("store").join(name).exists(), "written into the upper");

        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let (code, doc) = verify_json(w, &["--repair"]);
        assert_eq!(partial_paths(&doc), Vec::<String>::new(), "{doc}");
        assert_eq!(code, 0, "{doc}");
        assert!(Path::new(&path).exists() && Path::new(&lock_path).exists());
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) }, 0);

        let mut l: libc::flock = unsafe { std::mem::zeroed() };
        l.l_type = libc::F_WRLCK as libc::c_short;
        l.l_whence = libc::SEEK_SET as libc::c_short;
        let rw = std::fs::OpenOptions::new().write(true).open(&lock_path).unwrap();
        assert_eq!(unsafe { libc::fcntl(rw.as_raw_fd(), libc::F_SETLK, &l) }, 0);
        let (code, doc) = verify_json(w, &["--repair"]);
        assert_eq!(partial_paths(&doc), Vec::<String>::new(), "{doc}");
        assert_eq!(code, 0, "{doc}");
        assert!(Path::new(&path).exists() && Path::new(&lock_path).exists());
        drop(rw);
        drop(lock);

        let (code, doc) = verify_json(w, &[]);
        assert_eq!(partial_paths(&doc), vec![path.clone()], "{doc}");
        assert_eq!(code, 1);
        let (code, doc) = verify_json(w, &["--repair"]);
        assert_eq!(doc["repaired"]["partial_removed"], serde_json::json!([path]), "{doc}");
        assert_eq!(code, 0, "{doc}");
        assert!(!Path::new(&path).exists() && !Path::new(&lock_path).exists());
        assert!(!s.upper.join("store").join(name).exists());
        assert!(!s.upper.join("store").join(format!("{name}.lock")).exists());
        s.umount();
    }
}
