//! The merged store cannot hide, copy up or change what a lower holds,
//! whatever stock Nix does on it: `nix-store --delete` and the collectors
//! on a path both layers hold, the collectors while a lower gains paths,
//! `nix-store --optimise`. The overlay's work directory is sealed while it
//! is mounted (see `overlay::seal`), so the kernel refuses the copy-up or
//! the whiteout such an operation needs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{base_name, sh, stderr, verify_contents, Stack, World};

/// Disk blocks (KiB) an upper's store uses (Nix's own state, such as the
/// 8 MB `reserved` file it makes for the collector, is not the point).
fn disk_kib(upper: &Path) -> u64 {
    sh(&format!("du -sk {}/store", upper.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn is_immutable(dir: &Path) -> bool {
    sh(&format!("lsattr -d {}", dir.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .contains('i')
}

/// How many names an upper whites out, and the first few.
fn whiteout_summary(s: &Stack) -> String {
    let w = s.whiteouts();
    format!("{} whiteout(s), first {:?}", w.len(), &w[..w.len().min(3)])
}

/// Every lower path is valid and its content is what the lower holds.
fn assert_lower_intact(s: &Stack, paths: &[String]) {
    for p in paths {
        assert!(s.valid(p), "{p} stays valid");
        let merged = Path::new(p);
        let lower = s.lower.join("store").join(base_name(p));
        assert!(
            std::fs::symlink_metadata(merged).is_ok(),
            "{p} is visible in /nix/store"
        );
        let ml = std::fs::symlink_metadata(merged).unwrap();
        let ll = std::fs::symlink_metadata(&lower).unwrap();
        assert_eq!(
            (ml.len(), ml.mode()),
            (ll.len(), ll.mode()),
            "{p} looks as in the lower"
        );
    }
    assert!(
        s.whiteouts().is_empty(),
        "nothing is whited out: {}",
        whiteout_summary(s)
    );
}

ns_test! {
    fn the_overlay_is_sealed_while_mounted_and_released_by_umount() {
        let s = Stack::new(&["app"]);
        s.mount();
        let work = s.upper.join("work/work");
        assert!(is_immutable(&work), "mount seals {}", work.display());
        // Through the merged store, a lower file can be neither removed,
        // changed nor hard-linked, even by root; the upper works as usual.
        let app = s.lower_path("app");
        let out = Command::new("rm").args(["-rf", &app]).output().unwrap();
        assert!(!out.status.success(), "rm -rf of a lower path is refused");
        assert!(stderr(&out).contains("Operation not permitted"), "{}", stderr(&out));
        let out = Command::new("ln").arg(format!("{app}/bin/app")).arg("/nix/store/x").output().unwrap();
        assert!(!out.status.success(), "a hard link of a lower file is refused");
        assert_lower_intact(&s, &s.lower_paths.iter().cloned().collect::<Vec<_>>());
        let built = s.w.build(&["extra"]);
        assert!(s.valid(&built[0]), "builds land in the upper as before");
        s.umount();
        assert!(!is_immutable(&work), "umount lifts the seal");
        // The upper is an ordinary directory again.
        let copy = s.w.path("upper-copy");
        sh(&format!("cp -a {} {} && rm -rf {}", s.upper.display(), copy.display(), copy.display()));
        s.mount();
        assert!(s.valid(&built[0]));
    }
}

ns_test! {
    fn a_crash_around_the_seal_is_mended_by_the_next_mount_or_sync() {
        let s = Stack::new(&["app"]);
        s.mount();
        // As if the mount's owner died: the kernel mounts go, the seal and
        // the record stay.
        sh("umount /nix/var && umount /nix/store");
        assert!(is_immutable(&s.upper.join("work/work")));
        s.mount();
        let built = s.w.build(&["extra"]);
        assert!(s.valid(&built[0]), "the new mount is writable, not a read-only fallback");
        assert!(is_immutable(&s.upper.join("work/work")));
        let sealed = || -> serde_json::Value {
            serde_json::from_str::<serde_json::Value>(&s.w.tool_ok(["status", "--json"])).unwrap()["sealed"].clone()
        };
        assert_eq!(sealed(), true);
        // As if a mount was killed between its mount call and the seal:
        // status says so, and sync seals.
        sh(&format!("chattr -i {}", s.upper.join("work/work").display()));
        assert_eq!(sealed(), false);
        assert!(s.w.tool_ok(["status"]).contains("not sealed"), "status text warns");
        s.w.tool_ok(["sync"]);
        assert_eq!(sealed(), true, "sync seals the overlay");
        assert!(is_immutable(&s.upper.join("work/work")));
        s.umount();
        assert_eq!(sealed(), serde_json::Value::Null, "nothing mounted: no seal to report");
    }
}

ns_test! {
    fn deleting_a_path_both_layers_hold_hides_nothing() {
        // Nix's local-overlay "delete-duplicate", adapted: the same path in
        // the upper (added through the merged store) and in the lower (the
        // template added it later). Deleting it must not hide the lower's
        // copy: afterwards the path is valid and its bytes are the lower's.
        let s = Stack::new(&["liba"]);
        s.mount();
        let f = s.w.path("dup.txt");
        std::fs::write(&f, "the same content in both layers\n").unwrap();
        let in_upper = s.w.nix_ok("nix-store", ["--add", f.to_str().unwrap()]).trim().to_owned();
        assert!(s.upper.join("store").join(base_name(&in_upper)).exists());
        // The lower gains the same path (its own Nix, the stack mounted).
        let in_lower = s.w.with_nix_at(&s.lower, || s.w.nix_ok("nix-store", ["--add", f.to_str().unwrap()]).trim().to_owned());
        assert_eq!(in_upper, in_lower);
        for (i, delete) in [
            vec!["nix-store", "--delete", &in_upper],
            vec!["nix-store", "--delete", "--ignore-liveness", &in_upper],
            vec!["nix-store", "--gc"],
            vec!["nix-collect-garbage", "-d"],
        ]
        .into_iter()
        .enumerate()
        {
            // Before and after the lower's paths are synced in.
            if i == 2 {
                s.w.tool_ok(["sync"]);
            }
            let out = s.w.nix(delete[0]).args(&delete[1..]).output().unwrap();
            eprintln!("{delete:?}: {} {}", out.status, stderr(&out));
            s.w.tool_ok(["sync"]);
            assert!(s.valid(&in_upper), "{delete:?}: the path stays valid");
            assert_eq!(
                std::fs::read_to_string(&in_upper).unwrap(),
                "the same content in both layers\n",
                "{delete:?}: its content is there"
            );
            assert!(s.whiteouts().is_empty(), "{delete:?} whites out nothing: {}", whiteout_summary(&s));
        }
        // Dropping the upper's copy (what `optimise` is for) leaves the
        // lower's, valid.
        s.w.tool_ok(["optimise"]);
        assert!(!s.upper.join("store").join(base_name(&in_upper)).exists());
        assert!(s.valid(&in_upper));
        assert_eq!(
            std::fs::metadata(&in_upper).unwrap().ino(),
            std::fs::metadata(s.lower.join("store").join(base_name(&in_upper))).unwrap().ino(),
            "the merged file is the lower's"
        );
        assert_lower_intact(&s, &s.lower_paths.iter().cloned().collect::<Vec<_>>());
        verify_contents(&s.w);
    }
}

/// A publisher's copy of the lower with `n` new paths, made by real Nix,
/// to be copied into the lower entry by entry, its database last.
fn publisher_root(w: &World, lower: &Path, n: usize) -> (std::path::PathBuf, Vec<String>) {
    let root = w.path("publisher");
    sh(&format!("cp -a {} {}", lower.display(), root.display()));
    let files = w.path("publish-src");
    std::fs::create_dir_all(&files).unwrap();
    let mut args = vec!["--add".to_owned()];
    for i in 0..n {
        let f = files.join(format!("published-{i}"));
        std::fs::write(&f, format!("published path {i}\n")).unwrap();
        args.push(f.to_str().unwrap().to_owned());
    }
    let paths = w.with_nix_at(&root, || {
        w.nix_ok("nix-store", &args)
            .lines()
            .map(str::to_owned)
            .collect()
    });
    (root, paths)
}

/// Copies the publisher's store entries into the lower one by one, then
/// its database (as `rsync` of a Nix root would, store first).
fn publish_script(from: &Path, lower: &Path) -> String {
    format!(
        "for e in {from}/store/*; do [ -e {lower}/store/\"${{e##*/}}\" ] || cp -a \"$e\" {lower}/store/; done; cp {from}/var/nix/db/db.sqlite {lower}/var/nix/db/db.sqlite.new && mv {lower}/var/nix/db/db.sqlite.new {lower}/var/nix/db/db.sqlite",
        from = from.display(),
        lower = lower.display()
    )
}

ns_test! {
    fn collectors_while_the_lower_gains_paths_hide_none_of_them() {
        let s = Stack::new(&["app"]);
        s.mount();
        // Garbage the collectors may take: an unrooted upper build.
        let garbage = s.w.build(&["extra"]);
        let (publisher, published) = publisher_root(&s.w, &s.lower, 300);

        // 1. The entries are in the lower, its database not yet: every
        //    collector finds them as invalid store entries.
        sh(&format!("for e in {}/store/*-published-*; do cp -a \"$e\" {}/store/; done", publisher.display(), s.lower.display()));
        let gc = s.w.nix("nix-store").args(["--gc"]).output().unwrap();
        eprintln!("nix-store --gc with unregistered lower entries: {} {}", gc.status, stderr(&gc));
        let ours = s.w.tool(["gc"]);
        eprintln!("nixfs-layer gc with unregistered lower entries: {} {}", ours.status, stderr(&ours));
        assert!(s.whiteouts().is_empty(), "no collector whites out a new lower entry: {}", whiteout_summary(&s));
        for p in &published {
            assert!(Path::new(p).exists(), "{p} stays visible");
        }

        // 2. The publisher goes on while the collectors run, over and over.
        sh(&format!("rm -rf {}/store/*-published-*", s.lower.display()));
        sh("mount -o remount /nix/store");
        let publishing = Command::new("sh")
            .arg("-c")
            .arg(publish_script(&publisher, &s.lower))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut publishing = Some(publishing);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut rounds = 0;
        while let Some(p) = publishing.as_mut() {
            for (i, c) in [vec!["nix-store", "--gc"], vec!["nix-collect-garbage", "-d"]].iter().enumerate() {
                let out = if i == 0 || rounds % 2 == 0 {
                    s.w.nix(c[0]).args(&c[1..]).output().unwrap()
                } else {
                    s.w.tool(["gc"])
                };
                let _ = out;
            }
            rounds += 1;
            if p.try_wait().unwrap().is_some() || Instant::now() > deadline {
                publishing.take().unwrap().wait().unwrap();
            }
        }
        eprintln!("{rounds} collector rounds while publishing");
        assert!(s.whiteouts().is_empty(), "no collector whites out a new lower entry: {}", whiteout_summary(&s));
        let out = s.w.tool(["sync"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("sync: ") && !said.contains("skipped"), "sync skips nothing: {said}");
        let mut all: Vec<String> = s.lower_paths.iter().cloned().collect();
        all.extend(published.iter().cloned());
        assert_lower_intact(&s, &all);
        // And with the lower's database caught up, Nix's collector works as
        // usual: the unrooted upper build goes, the lowers stay.
        let out = s.w.tool(["gc"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!s.valid(&garbage[0]), "the upper's garbage is collected");
        assert_lower_intact(&s, &all);
        verify_contents(&s.w);
    }
}

ns_test! {
    fn stock_optimise_copies_no_lower_data_into_the_upper() {
        let w = World::new();
        let lower = w.path("lower");
        // A lower with 16 MB of file data.
        let big = w.with_nix_at(&lower, || {
            let dir = w.path("big");
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..4 {
                sh(&format!("head -c 4M /dev/urandom > {}/blob{i}", dir.display()));
            }
            // A second path with the same files: a candidate for linking.
            let twin = w.path("twin");
            sh(&format!("cp -a {} {}", dir.display(), twin.display()));
            vec![
                w.nix_ok("nix-store", ["--add", dir.to_str().unwrap()]).trim().to_owned(),
                w.nix_ok("nix-store", ["--add", twin.to_str().unwrap()]).trim().to_owned(),
            ]
        });
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        w.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap(), "--no-flake-fs"]);
        let before = disk_kib(&upper);
        let out = w.nix("nix-store").arg("--optimise").output().unwrap();
        eprintln!("nix-store --optimise: {} {}", out.status, stderr(&out));
        let grown = disk_kib(&upper).saturating_sub(before);
        assert!(grown < 1024, "the upper grew by {grown} KiB: lower file data was copied up");
        for p in &big {
            assert!(w.valid(p));
            let l = lower.join("store").join(base_name(p));
            assert!(!upper.join("store").join(base_name(p)).exists(), "{p} is not copied up");
            assert_eq!(
                std::fs::metadata(format!("{p}/blob0")).unwrap().ino(),
                std::fs::metadata(l.join("blob0")).unwrap().ino(),
                "{p} is still the lower's"
            );
        }
        // With auto-optimise-store, a build whose output shares a file with
        // a lower path succeeds and links within the upper only.
        *w.nix_conf.lock().unwrap() = "auto-optimise-store = true\n".into();
        let dir = w.path("mine");
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!("cp {}/blob0 {}/same && cp {}/blob0 {}/again", w.path("big").display(), dir.display(), w.path("big").display(), dir.display()));
        let mine = w.nix_ok("nix-store", ["--add", dir.to_str().unwrap()]).trim().to_owned();
        assert!(w.valid(&mine));
        let grown = disk_kib(&upper).saturating_sub(before);
        assert!(grown < 4096 + 1024, "the upper holds one copy of the new path's data: grew by {grown} KiB");
        assert_eq!(
            std::fs::metadata(format!("{mine}/same")).unwrap().ino(),
            std::fs::metadata(format!("{mine}/again")).unwrap().ino(),
            "the upper's own files are linked"
        );
        assert!(common::whiteouts(&upper).is_empty());
        verify_contents(&w);
    }
}

ns_test! {
    fn an_upper_mounted_in_another_namespace_is_refused() {
        let s = Stack::new(&["liba"]);
        // Another mount namespace mounts the stack elsewhere and stays.
        let other = s.w.path("other-target");
        std::fs::create_dir_all(&other).unwrap();
        let mut holder = Command::new("unshare");
        holder.args(["-m", "--propagation", "private", "sh", "-c"]).arg(format!(
            "{} mount --lower {} --upper {} --target {} --no-flake-fs >/dev/null && echo up && exec sleep 600",
            env!("CARGO_BIN_EXE_nixfs-layer"),
            s.lower.display(),
            s.upper.display(),
            other.display()
        ));
        s.w.nix_env(&mut holder);
        let mut holder = holder.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "up");
        let out = s.w.tool(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs"]);
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(s.upper.to_str().unwrap()) && err.contains("another mount namespace") && err.contains(&other.display().to_string()), "{err}");
        assert!(!common::mountinfo().contains(" /nix/store "), "nothing is mounted here");
        holder.kill().unwrap();
        holder.wait().unwrap();
        // Once that namespace is gone, the upper mounts here.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = s.w.tool(["mount", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--no-flake-fs"]);
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{}", stderr(&out));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(s.valid(&s.lower_path("liba")));
    }
}
