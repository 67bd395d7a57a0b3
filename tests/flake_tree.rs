//! The /nixfs/flake tree end to end: a lower built by real Nix from a local
//! flake, stacked under an upper, the tree served by the binary over a real
//! FUSE mount, and real Nix (Debian's 2.8) evaluating and building.
//! Every test runs in its own mount and PID namespace with a tmpfs on /nix.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::hosts::BUILDS;
use common::{base_name, entries, sh, stderr, tree_digest, World, FLAKE_MOUNT};

struct Setup {
    w: World,
    lower: PathBuf,
    upper: PathBuf,
    /// The fixture flake as a `path:` flake (registry name `myflake`).
    flake: PathBuf,
    /// The same flake as a git repository (registry name `gitflake`).
    git: PathBuf,
    config: PathBuf,
    /// Every `nix` command the tool runs, one line each.
    nix_log: PathBuf,
    /// Output paths of the fixture's packages (evaluated, not built).
    out: BTreeMap<&'static str, String>,
}

fn setup(flakefs_config: &str) -> Setup {
    let w = World::new();
    std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
    // Where the fixture flake's builders count builds (a tmpfs per test).
    sh(&format!(
        "mount -t tmpfs nixfs-layer-test /run/nixfs-layer-test && touch {BUILDS}"
    ));

    let flake = w.path("flake");
    std::fs::create_dir(&flake).unwrap();
    std::fs::copy(common::fixture("flake/flake.nix"), flake.join("flake.nix")).unwrap();
    let git = w.path("gitflake");
    std::fs::create_dir(&git).unwrap();
    std::fs::copy(common::fixture("flake/flake.nix"), git.join("flake.nix")).unwrap();
    sh(&format!(
        "cd {} && git init -q && git add flake.nix && git -c user.email=t@t -c user.name=t commit -qm flake",
        git.display()
    ));
    let registry = w.path("registry.json");
    std::fs::write(
        &registry,
        serde_json::json!({"version": 2, "flakes": [
            {"from": {"type": "indirect", "id": "myflake"}, "to": {"type": "path", "path": flake}},
            {"from": {"type": "indirect", "id": "gitflake"}, "to": {"type": "git", "url": format!("file://{}", git.display())}},
        ]})
        .to_string(),
    )
    .unwrap();
    // No network: the global registry is a local file.
    *w.nix_conf.lock().unwrap() = format!("flake-registry = {}\n", registry.display());

    let lower = w.path("lower");
    let out = w.with_nix_at(&lower, || {
        w.nix_ok(
            "nix",
            [
                "build".to_owned(),
                "--no-link".into(),
                format!("path:{}#hello", flake.display()),
                format!("path:{}#\"with.dot\"", flake.display()),
            ],
        );
        let mut out = BTreeMap::new();
        for (k, attr) in [
            ("hello", "hello.outPath"),
            ("with.dot", "\"with.dot\".outPath"),
            ("extra", "extra.outPath"),
            ("multi", "multi.outPath"),
            ("multi.dev", "multi.dev.outPath"),
            ("slow", "slow.outPath"),
        ] {
            let v = w.nix_ok(
                "nix",
                [
                    "eval",
                    "--read-only",
                    "--json",
                    &format!("path:{}#{attr}", flake.display()),
                ],
            );
            out.insert(k, serde_json::from_str::<String>(&v).unwrap());
        }
        out
    });
    assert!(lower.join("store").join(base_name(&out["hello"])).is_dir());

    let upper = w.path("upper");
    w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
    let config = w.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "lowers = [\"{}\"]\nupper = \"{}\"\n[flakefs]\n{flakefs_config}\n",
            lower.display(),
            upper.display()
        ),
    )
    .unwrap();
    let nix_log = w.path("nix.log");
    common::nix_recorder(&w.path("nix-wrapper"), &nix_log);
    let s = Setup {
        w,
        lower,
        upper,
        flake,
        git,
        config,
        nix_log,
        out,
    };
    s.mount();
    s
}

impl Setup {
    fn tool(&self, args: &[&str]) -> std::process::Output {
        self.w
            .tool_command()
            .env("NIXFS_LAYER_NIX", self.w.path("nix-wrapper"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }
    fn tool_ok(&self, args: &[&str]) -> String {
        let o = self.tool(args);
        assert!(o.status.success(), "nixfs-layer {args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    }
    fn mount(&self) {
        self.tool_ok(&["mount", "--config", self.config.to_str().unwrap()]);
    }
    /// Builds run so far (fixture builders append their name).
    fn builds(&self) -> Vec<String> {
        std::fs::read_to_string(BUILDS)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
    /// The `nix` commands the tool ran.
    fn nix_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.nix_log)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn entry(dir: &str, name: &str) -> PathBuf {
    Path::new(FLAKE_MOUNT).join("flake").join(dir).join(name)
}
fn str_(r: &str) -> PathBuf {
    entry("str", r)
}
fn b64url(r: &str) -> PathBuf {
    entry(
        "b64",
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r),
    )
}
fn b64std(r: &str) -> PathBuf {
    entry("b64", &base64::engine::general_purpose::STANDARD.encode(r))
}
fn urlenc(r: &str) -> PathBuf {
    entry(
        "urlenc",
        &percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC).to_string(),
    )
}
fn target(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
        .display()
        .to_string()
}
fn run(p: &Path) -> String {
    let out = std::process::Command::new(p).output().unwrap();
    assert!(out.status.success(), "{}: {}", p.display(), stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}
/// The errno of going through an entry (`<entry>/bin`).
fn errno_through(p: &Path) -> i32 {
    std::fs::metadata(p.join("bin"))
        .expect_err("the entry must fail")
        .raw_os_error()
        .unwrap()
}
/// `user.nixfs.error` of an entry (not following it).
fn error_xattr(p: &Path) -> String {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = CString::new("user.nixfs.error").unwrap();
    let mut buf = vec![0u8; 8192];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n >= 0,
        "lgetxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(n as usize);
    String::from_utf8(buf).unwrap()
}
/// Runs `f` on a thread whose file-system uid/gid are `uid` (FUSE sees
/// requests from that uid), with no supplementary groups.
fn as_uid<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: raw syscalls change this thread's credentials only.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            libc::syscall(libc::SYS_setfsgid, uid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        f()
    })
    .join()
    .unwrap()
}

ns_test! {
    fn every_encoding_resolves_to_a_store_path_that_runs() {
        let s = setup("");
        let builds = s.builds();
        let upper_before = tree_digest(&s.upper.join("store"));
        let hello = &s.out["hello"];
        let flake = s.flake.display().to_string();

        assert_eq!(entries(&Path::new(FLAKE_MOUNT).join("flake")), ["b64", "str", "urlenc"]);
        let by_str = str_("myflake#hello");
        assert_eq!(&target(&by_str), hello);
        assert_eq!(run(&by_str.join("bin/hello")), "hello from hello\n");

        let path_ref = format!("path:{flake}#hello");
        assert_eq!(&target(&b64url(&path_ref)), hello);
        assert_eq!(run(&b64url(&path_ref).join("bin/hello")), "hello from hello\n");
        // The standard alphabet, padded: a copy of the flake at a path whose
        // encoding has '+' (and no '/', which no name can hold).
        let std_ref = (0..1000)
            .flat_map(|i| ["f~{i}", "~f{i}", "x~~{i}"].map(|n| n.replace("{i}", &i.to_string())))
            .map(|n| format!("path:/run/nixfs-layer-test/{n}#hello"))
            .find(|r| {
                let e = base64::engine::general_purpose::STANDARD.encode(r);
                e.contains('+') && e.ends_with('=') && !e.contains('/')
            })
            .unwrap();
        let copy = std_ref.trim_start_matches("path:").trim_end_matches("#hello");
        std::fs::create_dir_all(copy).unwrap();
        std::fs::copy(s.flake.join("flake.nix"), Path::new(copy).join("flake.nix")).unwrap();
        assert_eq!(&target(&b64std(&std_ref)), hello, "{std_ref}");

        let git_ref = format!("git+file://{}#hello", s.git.display());
        assert_eq!(&target(&urlenc(&git_ref)), hello);
        assert_eq!(run(&urlenc(&git_ref).join("bin/hello")), "hello from hello\n");
        assert_eq!(&target(&str_("gitflake#hello")), hello);

        // Quoted attribute names, output selection, full attribute paths, the default package.
        assert_eq!(&target(&str_("myflake#\"with.dot\"")), &s.out["with.dot"]);
        assert_eq!(&target(&str_("myflake#hello^out")), hello);
        assert_eq!(&target(&str_("myflake#packages.x86_64-linux.hello")), hello);
        assert_eq!(&target(&str_("myflake")), hello);

        // Listing shows nothing and starts nothing.
        let calls = s.nix_calls().len();
        for d in ["str", "b64", "urlenc"] {
            assert!(entries(&Path::new(FLAKE_MOUNT).join("flake").join(d)).is_empty());
        }
        assert_eq!(s.nix_calls().len(), calls, "readdir ran nix");

        assert_eq!(s.builds(), builds, "lower hits build nothing");
        assert_eq!(tree_digest(&s.upper.join("store")), upper_before, "nothing written to the upper");

        let v: serde_json::Value =
            serde_json::from_str(&s.tool_ok(&["resolve", "--json", "myflake#hello"])).unwrap();
        assert_eq!(v["path"], hello.as_str());
        assert_eq!(v["how"], "lower-hit");
        assert_eq!(s.tool_ok(&["resolve", "myflake#hello"]).trim(), hello);
    }
}

ns_test! {
    fn lower_hits_build_nothing_and_misses_build_once_into_the_upper() {
        let s = setup("");
        let builds = s.builds();
        let upper_before = tree_digest(&s.upper.join("store"));

        assert_eq!(&target(&str_("myflake#hello")), &s.out["hello"]);
        assert_eq!(s.builds(), builds);
        assert_eq!(tree_digest(&s.upper.join("store")), upper_before);
        assert!(
            !s.nix_calls().iter().any(|c| c.starts_with("build")),
            "no build process for a lower hit: {:?}",
            s.nix_calls()
        );

        let extra = &s.out["extra"];
        let base = base_name(extra);
        assert_eq!(&target(&str_("myflake#extra")), extra);
        assert_eq!(run(&str_("myflake#extra").join("bin/extra")), "hello from extra\n");
        assert_eq!(s.builds().len(), builds.len() + 1, "{:?}", s.builds());
        assert_eq!(s.builds().last().unwrap(), "extra");
        assert!(s.upper.join("store").join(base).is_dir(), "built into the upper");
        assert!(!s.lower.join("store").join(base).exists(), "the lower is untouched");
        // Again, under another name for the same reference: cached.
        assert_eq!(&target(&b64url("myflake#extra")), extra);
        assert_eq!(s.builds().len(), builds.len() + 1);
        let v: serde_json::Value =
            serde_json::from_str(&s.tool_ok(&["resolve", "--json", "myflake#extra"])).unwrap();
        assert_eq!(v["how"], "upper-hit", "{v}");
        // What the tree built is rooted: stock GC keeps it, the link still works.
        s.w.nix_ok("nix-collect-garbage", Vec::<&str>::new());
        assert_eq!(run(&str_("myflake#extra").join("bin/extra")), "hello from extra\n");
        assert!(s.upper.join("store").join(base).is_dir(), "still in the upper after GC");

        // One output of a multi-output package.
        let dev = str_("myflake#multi^dev");
        assert_eq!(&target(&dev), &s.out["multi.dev"]);
        assert_eq!(std::fs::read_to_string(dev.join("include/multi.h")).unwrap(), "multi\n");
        assert_eq!(s.builds().len(), builds.len() + 2);
    }
}

ns_test! {
    fn concurrent_readers_of_one_reference_share_one_build() {
        let s = setup("");
        let builds = s.builds().len();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(64));
        // 64 different names for the one reference (some of its characters
        // percent-encoded, chosen by the bits of k): the kernel cannot merge
        // the lookups, the server gets 64 of them at once.
        let names: Vec<PathBuf> = (0..64u32)
            .map(|k| {
                let name: String = "myflake#extra"
                    .chars()
                    .enumerate()
                    .map(|(i, c)| if k & (1 << i) != 0 { format!("%{:02X}", c as u32) } else { c.to_string() })
                    .collect();
                entry("urlenc", &name)
            })
            .collect();
        let readers: Vec<_> = names
            .into_iter()
            .map(|p| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    b.wait();
                    target(&p)
                })
            })
            .collect();
        let targets: Vec<String> = readers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(targets.iter().all(|t| t == &s.out["extra"]), "{targets:?}");
        assert_eq!(s.builds().len(), builds + 1, "exactly one build: {:?}", s.builds());
        let calls = s.nix_calls();
        assert_eq!(calls.iter().filter(|c| c.starts_with("eval")).count(), 1, "{calls:?}");
        assert_eq!(calls.iter().filter(|c| c.starts_with("build")).count(), 1, "{calls:?}");
    }
}

ns_test! {
    fn a_slow_build_does_not_hold_up_other_lookups() {
        let s = setup("max-parallel-builds = 2");
        assert_eq!(&target(&str_("myflake#hello")), &s.out["hello"]);
        let slow = std::thread::spawn(|| {
            let t = Instant::now();
            (target(&str_("myflake#slow")), t.elapsed())
        });
        let started = Instant::now();
        while !s.builds().contains(&"slow".to_owned()) {
            assert!(started.elapsed() < Duration::from_secs(20), "the slow build never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A cached reference under a new name (answered by the FUSE loop),
        // and a new reference the lower has (evaluated), while slow builds.
        let t = Instant::now();
        assert_eq!(&target(&b64url("myflake#hello")), &s.out["hello"]);
        let cached = t.elapsed();
        let t = Instant::now();
        assert_eq!(&target(&str_("myflake#\"with.dot\"")), &s.out["with.dot"]);
        let new = t.elapsed();
        eprintln!("during the slow build: cached lookup {cached:?}, new lookup {new:?}");
        assert!(cached < Duration::from_millis(100), "cached lookup took {cached:?}");
        // An evaluation of its own (~30 ms alone, more on a loaded machine):
        // well under the 3 s the slow build takes, so it did not wait for it.
        assert!(new < Duration::from_secs(1), "new lookup took {new:?}");
        // Another build runs beside it.
        assert_eq!(&target(&str_("myflake#extra")), &s.out["extra"]);
        assert!(!slow.is_finished(), "all of that happened while the slow build ran");
        let (slow_target, took) = slow.join().unwrap();
        assert_eq!(slow_target, s.out["slow"]);
        assert!(took >= Duration::from_secs(3), "{took:?}");
    }
}

ns_test! {
    fn a_locked_reference_resolves_after_a_restart_without_evaluation() {
        let s = setup("");
        let meta: serde_json::Value = serde_json::from_str(&s.w.nix_ok(
            "nix",
            ["flake", "metadata", "--json", &format!("path:{}", s.flake.display())],
        ))
        .unwrap();
        let nar_hash = meta["locked"]["narHash"].as_str().unwrap();
        let locked = format!("path:{}?narHash={nar_hash}#hello", s.flake.display());
        assert_eq!(&target(&urlenc(&locked)), &s.out["hello"]);
        assert_eq!(&target(&str_("myflake#extra")), &s.out["extra"]);

        // Restart: umount stops the server, mount starts a new one.
        s.tool_ok(&["umount"]);
        assert!(!common::mount_table().iter().any(|(p, _)| p == FLAKE_MOUNT), "tree unmounted");
        s.mount();
        let calls = s.nix_calls().len();
        assert_eq!(&target(&urlenc(&locked)), &s.out["hello"]);
        assert_eq!(&target(&b64url(&locked)), &s.out["hello"]);
        let log = || std::fs::read_to_string(s.upper.join("var/log/nixfs-layer/flakefs.log")).unwrap();
        assert_eq!(s.nix_calls().len(), calls, "no nix run for a locked reference: {:?}\n{}", &s.nix_calls()[calls..], log());
        // An unlocked one is evaluated again.
        assert_eq!(&target(&str_("myflake#extra")), &s.out["extra"]);
        assert_eq!(s.nix_calls().len(), calls + 1, "{:?}", &s.nix_calls()[calls..]);
        let v: serde_json::Value =
            serde_json::from_str(&s.tool_ok(&["resolve", "--json", &locked])).unwrap();
        assert_eq!(v["how"], "cached", "{v}");
        assert_eq!(v["locked"], true);
    }
}

ns_test! {
    fn bad_input_fails_at_once_with_its_errno_and_message() {
        // nobody is trusted here (root evaluates for them, as for root):
        // what they may read and build is the tree's own policy.
        // tests/flake_security.rs has untrusted users.
        let s = setup("deny = [\"*#secret*\"]\ntrusted-users = [\"65534\"]");
        let calls = s.nix_calls();
        let cases: Vec<(PathBuf, i32, &str)> = vec![
            (str_("--option"), libc::EINVAL, "may not start with '-'"),
            (str_("-E"), libc::EINVAL, "may not start with '-'"),
            (str_("myflake#hello --impure"), libc::EINVAL, "whitespace"),
            (b64url("--expr"), libc::EINVAL, "may not start with '-'"),
            (b64url("myflake#hello\n--impure"), libc::EINVAL, "whitespace"),
            (entry("b64", "!!not*base64"), libc::EINVAL, "base64"),
            (entry("urlenc", "myflake%2"), libc::EINVAL, "percent-encoding"),
            (entry("urlenc", "%00"), libc::EINVAL, "control"),
            (str_(".#hello"), libc::EINVAL, "relative paths are refused"),
            (urlenc("path:relative/dir#hello"), libc::EINVAL, "relative paths are refused"),
            (urlenc("./flake#hello"), libc::EINVAL, "relative paths are refused"),
            (str_("weird!:x"), libc::EINVAL, "not a flake reference"),
            (str_("ftp:host#x"), libc::EINVAL, "unsupported flake reference type"),
            (str_("myflake#a..b"), libc::EINVAL, "empty attribute name"),
            (str_("myflake#hello^out,dev"), libc::EINVAL, "exactly one output"),
            (str_(&format!("{}!", "a".repeat(400))), libc::EINVAL, "not a flake reference"),
            (str_("myflake#secret"), libc::EACCES, "deny pattern"),
        ];
        for (p, errno, says) in &cases {
            let t = Instant::now();
            assert_eq!(errno_through(p), *errno, "{}", p.display());
            assert!(t.elapsed() < Duration::from_millis(100), "{} took {:?}", p.display(), t.elapsed());
            let msg = error_xattr(p);
            assert!(msg.contains(says), "{}: expected '{says}' in: {msg}", p.display());
        }
        // Over 1024 bytes, the FUSE limit of older kernels (6.18 passes up
        // to 4095): refused by the daemon; over PATH_MAX by the kernel.
        let long = str_(&"a".repeat(1025));
        assert_eq!(errno_through(&long), libc::ENAMETOOLONG);
        assert!(error_xattr(&long).contains("at most 1024"), "{}", error_xattr(&long));
        let e = std::fs::symlink_metadata(str_(&"a".repeat(5000))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
        assert_eq!(s.nix_calls(), calls, "no nix process for bad input");

        // A local flake the caller cannot read: refused before Nix runs.
        let private = s.w.path("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::copy(s.flake.join("flake.nix"), private.join("flake.nix")).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = b64url(&format!("path:{}#hello", private.display()));
        let (errno, msg) = as_uid(65534, move || (errno_through(&p), error_xattr(&p)));
        assert_eq!(errno, libc::EACCES);
        assert!(msg.contains("uid 65534 may not read") && msg.contains("private"), "{msg}");
        assert_eq!(s.nix_calls(), calls, "no nix process for an unreadable flake");

        // Failures Nix reports.
        let failures: Vec<(PathBuf, i32, &str)> = vec![
            (str_("myflake#nope"), libc::ENOENT, "does not provide attribute"),
            (str_("myflake#multi^nope"), libc::ENOENT, "has no output 'nope'"),
            (str_("myflake#notAPackage"), libc::EINVAL, "not a derivation"),
            (str_("myflake#broken"), libc::EIO, "broken fails on purpose"),
        ];
        for (p, errno, says) in &failures {
            assert_eq!(errno_through(p), *errno, "{}", p.display());
            let msg = error_xattr(p);
            assert!(msg.contains(says), "{}: expected '{says}' in: {msg}", p.display());
            assert!(msg.contains("myflake#"), "the message names the reference: {msg}");
        }
        let log = std::fs::read_to_string(s.upper.join("var/log/nixfs-layer/flakefs.log")).unwrap();
        assert!(log.contains("myflake#broken"), "the log names the reference: {log}");

        // Users who may not build get what the layers have, nothing else.
        let builds = s.builds();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
            .arg(str_("myflake#hello").join("bin/hello"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from hello\n", "{}", stderr(&out));
        let p = str_("myflake#extra");
        let (errno, msg) = as_uid(65534, move || (errno_through(&p), error_xattr(&p)));
        assert_eq!(errno, libc::EACCES);
        assert!(msg.contains("may not start builds"), "{msg}");
        assert_eq!(s.builds(), builds, "nothing built for them");
        assert!(!s.upper.join("store").join(base_name(&s.out["extra"])).exists());
        // Root may: the refusal was not cached for everyone.
        assert_eq!(&target(&str_("myflake#extra")), &s.out["extra"]);
    }
}

ns_test! {
    fn a_build_over_its_timeout_is_stopped() {
        let s = setup("build-timeout = 1");
        let t = Instant::now();
        let p = str_("myflake#slow");
        assert_eq!(errno_through(&p), libc::ETIMEDOUT);
        assert!(t.elapsed() < Duration::from_secs(3), "stopped after the timeout: {:?}", t.elapsed());
        assert!(error_xattr(&p).contains("took longer than 1s"), "{}", error_xattr(&p));
        assert!(error_xattr(&p).contains("raise [flakefs] build-timeout"), "{}", error_xattr(&p));
        assert!(!Path::new(&s.out["slow"]).exists());
        // The builder went with it: nothing appears later.
        std::thread::sleep(Duration::from_secs(3));
        assert!(!s.upper.join("store").join(base_name(&s.out["slow"])).exists());
    }
}

ns_test! {
    fn an_unlocked_reference_follows_its_flake_after_the_ttl() {
        let s = setup("ttl = 1");
        let old = target(&str_("myflake#hello"));
        assert_eq!(old, s.out["hello"]);
        let f = s.flake.join("flake.nix");
        let text = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, text.replace("hello = mk \"hello\" { };", "hello = mk \"hello\" { V = \"2\"; };")).unwrap();
        // Within the TTL the kernel and the cache keep the old answer.
        assert_eq!(target(&str_("myflake#hello")), old);
        std::thread::sleep(Duration::from_millis(1500));
        let new = target(&str_("myflake#hello"));
        assert_ne!(new, old, "the kernel's cached symlink is not stale");
        assert_eq!(run(&str_("myflake#hello").join("bin/hello")), "hello from hello\n");
        assert!(s.upper.join("store").join(base_name(&new)).is_dir(), "the new one was built into the upper");
    }
}

ns_test! {
    fn a_tree_that_cannot_start_leaves_nothing_mounted() {
        let s = setup("");
        s.tool_ok(&["umount"]);
        let before_mount = common::mount_table();
        // A mount point that cannot be made (/proc refuses directories).
        let out = s.tool(&["mount", "--config", s.config.to_str().unwrap(), "--flake-mount", "/proc/nixfs-test"]);
        assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
        assert!(stderr(&out).contains("flake tree"), "{}", stderr(&out));
        assert_eq!(common::mount_table(), before_mount, "overlay and bind undone");
        assert!(!s.upper.join("nixfs-layer/mount.json").exists());
    }
}

ns_test! {
    fn a_tree_is_not_started_over_another_mount() {
        let s = setup("enable = false");
        // Another FUSE file system, its server gone: every access fails with
        // ENOTCONN, and mountinfo shows plain `fuse` as for the tree.
        let mp = s.w.path("tree");
        std::fs::create_dir(&mp).unwrap();
        sh(&format!(
            "exec 3<>/dev/fuse && mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 other {}",
            mp.display()
        ));
        let out = s.tool(&["flakefs", "--mountpoint", mp.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        assert!(stderr(&out).contains("already a mount point"), "{}", stderr(&out));

        // `mount` refuses it too, and undoes the store's mounts.
        s.tool_ok(&["umount"]);
        let before_mount = common::mount_table();
        let cfg = s.w.path("tree.toml");
        std::fs::write(&cfg, std::fs::read_to_string(&s.config).unwrap().replace("enable = false", "")).unwrap();
        let out = s.tool(&["mount", "--config", cfg.to_str().unwrap(), "--flake-mount", mp.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        assert_eq!(common::mount_table(), before_mount, "overlay and bind undone");
        sh(&format!("umount -l {}", mp.display()));
    }
}

ns_test! {
    fn the_tree_runs_alone_and_in_the_foreground() {
        let s = setup("enable = false");
        // Alone, over the store that is mounted: returns once mounted.
        let mp = s.w.path("tree");
        s.tool_ok(&["flakefs", "--mountpoint", mp.to_str().unwrap()]);
        let e = mp.join("flake/str/myflake#hello");
        assert_eq!(target(&e), s.out["hello"]);
        sh(&format!("umount {}", mp.display()));
        let servers = || {
            sh("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done")
                .lines()
                .filter(|l| l.contains("nixfs-layer flakefs"))
                .count()
        };
        let t = Instant::now();
        while servers() > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "the server exits when its tree is unmounted");
            std::thread::sleep(Duration::from_millis(20));
        }

        // `mount --foreground` serves the tree itself until `umount`.
        s.tool_ok(&["umount"]);
        let cfg = s.w.path("fg.toml");
        std::fs::write(&cfg, std::fs::read_to_string(&s.config).unwrap().replace("enable = false", "")).unwrap();
        let mut fg = s
            .w
            .tool_command()
            .args(["mount", "--foreground", "--config", cfg.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !common::mount_table().iter().any(|(p, _)| p == FLAKE_MOUNT) {
            assert!(fg.try_wait().unwrap().is_none(), "mount --foreground exited");
            assert!(t.elapsed() < Duration::from_secs(10), "the tree never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(target(&str_("myflake#hello")), s.out["hello"]);
        s.tool_ok(&["umount"]);
        assert!(fg.wait().unwrap().success(), "the foreground process ends cleanly with umount");
        let table = common::mount_table();
        assert!(!table.iter().any(|(p, _)| p == FLAKE_MOUNT || p == "/nix/store" || p == "/nix/var"), "{table:?}");
    }
}

ns_test! {
    fn the_service_reports_ready_and_stops_cleanly_on_sigterm() {
        let s = setup("enable = false");
        s.tool_ok(&["umount"]);
        let cfg = s.w.path("svc.toml");
        std::fs::write(&cfg, std::fs::read_to_string(&s.config).unwrap().replace("enable = false", "")).unwrap();
        // systemd's notification socket, as a Type=notify unit would have it.
        let sock_path = s.w.path("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let before = common::mount_table();
        let mut svc = s
            .w
            .tool_command()
            .args(["mount", "--foreground", "--config", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
        assert_eq!(&buf[..n], b"READY=1");
        // Ready means ready: store, state and tree are all mounted now.
        let table = common::mount_table();
        for p in ["/nix/store", "/nix/var", FLAKE_MOUNT] {
            assert!(table.iter().any(|(m, _)| m == p), "{p} mounted at READY=1: {table:?}");
        }
        assert_eq!(target(&str_("myflake#hello")), s.out["hello"]);

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(svc.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(st) = svc.try_wait().unwrap() {
                break st;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "stops within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status after SIGTERM: {status}");
        let n = sock.recv(&mut buf).expect("STOPPING=1");
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert_eq!(common::mount_table(), before, "SIGTERM leaves nothing mounted");
        let out = s.w.tool(["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["mounted"], false);
    }
}

ns_test! {
    fn a_killed_server_takes_its_nix_children_along_and_a_new_one_starts_clean() {
        let s = setup("");
        let slow = std::thread::spawn(|| std::fs::read_link(str_("myflake#slow")));
        let started = Instant::now();
        while !s.builds().contains(&"slow".to_owned()) {
            assert!(started.elapsed() < Duration::from_secs(20), "the slow build never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Live ones: the test is the namespace's init and reaps nothing.
        // Nix and its builders (the fixture's: sh, sleep).
        let nix_running = || sh("ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2 == \"nix\" || $2 == \"sleep\")'").lines().count();
        assert!(nix_running() > 0, "a nix build runs for the tree");
        // SIGKILL: the server gets no chance to stop anything itself.
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.upper.join("nixfs-layer/mount.json")).unwrap()).unwrap();
        let pid = record["flakefs"]["pid"].as_u64().unwrap();
        sh(&format!("kill -9 {pid}"));
        let t = Instant::now();
        while nix_running() > 0 {
            assert!(t.elapsed() < Duration::from_secs(2), "nix or its builder outlived the server: {}", sh("ps -ef"));
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = slow.join();
        // The tree is gone with its server; a new mount serves it again
        // and the same reference resolves (no stale handle).
        s.tool_ok(&["umount"]);
        s.mount();
        assert_eq!(&target(&str_("myflake#hello")), &s.out["hello"]);
        assert_eq!(&target(&str_("myflake#slow")), &s.out["slow"]);
    }
}
