//! The flake tree as an unprivileged user (`nobody`) would attack it: the
//! root server must never read, fetch or fill anything on their behalf that
//! they could not themselves. A real stack, a real FUSE mount, a real
//! nix-daemon on the stack (through which users' references are evaluated
//! as themselves), real Nix; every test in its own mount and PID namespace.
//!
//! Each attack plants a root-only secret and then checks that its text is
//! nowhere: not in the upper, not in the merged store, not in any entry's
//! `user.nixfs.error`, not in the server's log.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::hosts::BUILDS;
use common::{base_name, sh, stderr, NixDaemon, World, FLAKE_MOUNT};

const NOBODY: u32 = 65534;

struct Sec {
    w: World,
    upper: PathBuf,
    /// World-readable; nobody's own flakes live here.
    public: PathBuf,
    /// Root-only things live under here (0700).
    private: PathBuf,
    /// The text planted in every root-only file.
    secret: String,
    config: PathBuf,
    /// One line per `nix` run of the server: `<uid> <subcommand> <installable>`.
    nix_log: PathBuf,
    hello: String,
    daemon: Option<NixDaemon>,
}

impl Drop for Sec {
    /// The daemon goes before the scratch directory it serves.
    fn drop(&mut self) {
        self.daemon.take();
    }
}

const FLAKE: &str = "tests/fixtures/flake/flake.nix";

fn setup(flakefs: &str, with_daemon: bool) -> Sec {
    let w = World::new();
    // nobody must reach the test's public directory.
    std::fs::set_permissions(w.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
    sh(&format!(
        "mount -t tmpfs nixfs-layer-test /run/nixfs-layer-test && touch {BUILDS} && chmod 666 {BUILDS}"
    ));
    let secret = format!("SECRET-{}-{}", std::process::id(), rand_word());
    let public = w.path("pub");
    let private = w.path("private");
    std::fs::create_dir(&public).unwrap();
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let flake = w.path("flake");
    std::fs::create_dir(&flake).unwrap();
    std::fs::copy(common::fixture("flake/flake.nix"), flake.join("flake.nix")).unwrap();
    let registry = w.path("registry.json");
    std::fs::write(
        &registry,
        serde_json::json!({"version": 2, "flakes": [
            {"from": {"type": "indirect", "id": "myflake"}, "to": {"type": "path", "path": flake}},
        ]})
        .to_string(),
    )
    .unwrap();
    *w.nix_conf.lock().unwrap() = format!("flake-registry = {}\n", registry.display());

    let lower = w.path("lower");
    let hello = w.with_nix_at(&lower, || {
        w.nix_ok(
            "nix",
            [
                "build".to_owned(),
                "--no-link".into(),
                format!("path:{}#hello", flake.display()),
            ],
        );
        let v = w.nix_ok(
            "nix",
            [
                "eval",
                "--read-only",
                "--json",
                &format!("path:{}#hello.outPath", flake.display()),
            ],
        );
        serde_json::from_str::<String>(&v).unwrap()
    });
    let upper = w.path("upper");
    w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
    let config = w.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "lowers = [\"{}\"]\nupper = \"{}\"\n[flakefs]\n{flakefs}\n",
            lower.display(),
            upper.display()
        ),
    )
    .unwrap();
    let nix_log = w.path("nix.log");
    std::fs::write(&nix_log, "").unwrap();
    std::fs::set_permissions(&nix_log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let wrapper = w.path("nix-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nfor a; do last=$a; done\necho \"$(id -u) $1 $last\" >> {}\nexec nix \"$@\"\n",
            nix_log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = Sec {
        w,
        upper,
        public,
        private,
        secret,
        config,
        nix_log,
        hello,
        daemon: None,
    };
    s.tool_ok(&["mount", "--config", s.config.to_str().unwrap()]);
    if with_daemon {
        s.start_daemon();
    }
    s
}

fn rand_word() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Sec {
    fn tool(&self, args: &[&str]) -> std::process::Output {
        self.w
            .tool_command()
            .env("NIXFS_LAYER_NIX", self.w.path("nix-wrapper"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
    fn tool_ok(&self, args: &[&str]) -> String {
        let o = self.tool(args);
        assert!(o.status.success(), "nixfs-layer {args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A nix-daemon on the stack, as on a multi-user machine.
    fn start_daemon(&mut self) {
        self.daemon = Some(self.w.start_nix_daemon("", true));
    }

    /// The `nix` runs so far: (uid, subcommand, installable).
    fn nix_calls(&self) -> Vec<(u32, String, String)> {
        std::fs::read_to_string(&self.nix_log)
            .unwrap()
            .lines()
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                (
                    it.next().unwrap().parse().unwrap(),
                    it.next().unwrap_or_default().to_owned(),
                    it.next().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// A file only root can read, holding the secret.
    fn root_only_file(&self, path: &Path) {
        std::fs::write(path, format!("{}\n", self.secret)).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A flake whose `flake.nix` anyone may read, with a root-only secret
    /// beside it and a readable subdirectory.
    fn root_flake(&self, name: &str) -> PathBuf {
        let d = self.w.path(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(FLAKE, d.join("flake.nix")).unwrap();
        self.root_only_file(&d.join("secret"));
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/readme"), "public\n").unwrap();
        for p in [&d, &d.join("sub")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    }

    /// A flake of nobody's own in the public directory.
    fn nobody_flake(&self, name: &str, text: &str) -> PathBuf {
        let d = self.public.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("flake.nix"), text).unwrap();
        sh(&format!("chown -R {NOBODY}:{NOBODY} {}", d.display()));
        d
    }

    /// The secret appears nowhere a caller could see it.
    fn assert_no_leak(&self, what: &str, entries: &[PathBuf]) {
        let grep = |dir: &Path| {
            Command::new("grep")
                .args(["-rlF", &self.secret])
                .arg(dir)
                .output()
                .unwrap()
        };
        for dir in [self.upper.join("store"), PathBuf::from("/nix/store")] {
            let o = grep(&dir);
            assert!(
                o.stdout.is_empty(),
                "{what}: the secret is in {}: {}",
                dir.display(),
                String::from_utf8_lossy(&o.stdout)
            );
        }
        let log = std::fs::read_to_string(self.upper.join("var/log/nixfs-layer/flakefs.log"))
            .unwrap_or_default();
        assert!(
            !log.contains(&self.secret),
            "{what}: the secret is in the log"
        );
        for e in entries {
            // As nobody: a root lookup would evaluate as root, for root.
            let p = e.clone();
            if let Some(msg) = as_uid(NOBODY, move || error_xattr(&p)) {
                assert!(
                    !msg.contains(&self.secret),
                    "{what}: the secret is in {msg}"
                );
            }
        }
    }
}

fn entry(dir: &str, name: &str) -> PathBuf {
    Path::new(FLAKE_MOUNT).join("flake").join(dir).join(name)
}
fn str_(r: &str) -> PathBuf {
    entry("str", r)
}
fn b64(r: &str) -> PathBuf {
    entry(
        "b64",
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r),
    )
}
fn b64_padded(r: &str) -> PathBuf {
    entry("b64", &base64::engine::general_purpose::URL_SAFE.encode(r))
}
fn urlenc(r: &str) -> PathBuf {
    entry(
        "urlenc",
        &percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC).to_string(),
    )
}

/// `user.nixfs.error` of an entry, if it has one.
fn error_xattr(p: &Path) -> Option<String> {
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
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `f` on a thread whose file-system uid and gid are `uid` and that
/// has no supplementary groups: FUSE sees the requests as that user's.
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

/// What nobody gets for an entry: its target, or the errno and message.
fn lookup_as(uid: u32, p: &Path) -> Result<String, (i32, String)> {
    let p = p.to_owned();
    as_uid(uid, move || match std::fs::read_link(&p) {
        Ok(t) => Ok(t.display().to_string()),
        // (An answer kept for nobody changes between two accesses when
        // what it names does: the flipping-symlink test.)
        Err(_) => match std::fs::metadata(p.join("bin")) {
            Ok(_) => Ok("(resolved on a second access)".into()),
            Err(e) => Err((
                e.raw_os_error().unwrap(),
                error_xattr(&p).unwrap_or_default(),
            )),
        },
    })
}

fn readlink(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
        .display()
        .to_string()
}

/// Processes of `uid` whose command line mentions nix.
fn nix_processes_of(uid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let of_uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some(&uid.to_string()));
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if of_uid && cmd.contains("nix") {
            out.push(cmd);
        }
    }
    out
}

/// The flake tree server's pid, from `status --json`.
fn server_pid(s: &Sec) -> u32 {
    let out = s.tool_ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["flake_tree"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no server pid in {out}")) as u32
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

ns_test! {
    fn a_relative_path_passed_off_as_a_registry_name_is_refused_before_nix_runs() {
        let s = setup("", true);
        let f = s.root_flake("rootflake");
        // Relative to the server's working directory, /.
        let rel = f.strip_prefix("/").unwrap().display().to_string();
        let first = rel.split('/').next().unwrap();
        let names = [
            urlenc(&format!("{first}/../{rel}#hello")),
            urlenc(&format!("flake:{first}/../{rel}#hello")),
            urlenc(&format!("myflake?dir=../{rel}#hello")),
            urlenc(&format!("{}/sub/..#hello", f.display())),
            b64(&format!("path:{}/./sub#hello", f.display())),
        ];
        for p in &names {
            let (errno, msg) = lookup_as(NOBODY, p).unwrap_err();
            assert_eq!(errno, libc::EINVAL, "{}: {msg}", p.display());
        }
        assert!(s.nix_calls().is_empty(), "no nix ran: {:?}", s.nix_calls());
        // Without `.` segments the same text is a registry name (id, then a
        // branch with slashes) to Nix too: looked up in the registry, as
        // nobody, and not found.
        let name = urlenc(&format!("{rel}#hello"));
        let (errno, msg) = lookup_as(NOBODY, &name).unwrap_err();
        eprintln!("{rel}#hello as nobody: errno {errno}: {msg}");
        assert!(s.nix_calls().iter().all(|(uid, ..)| *uid == NOBODY), "{:?}", s.nix_calls());
        s.assert_no_leak("relative path", &names);
    }
}

ns_test! {
    fn a_callers_flake_cannot_fetch_a_root_only_input() {
        let s = setup("", true);
        let secret_dir = s.private.join("inputdir");
        std::fs::create_dir(&secret_dir).unwrap();
        s.root_only_file(&secret_dir.join("secret"));
        let f = s.nobody_flake(
            "thief",
            &format!(
                r#"{{
  inputs.s = {{ url = "path:{}"; flake = false; }};
  outputs = {{ self, s }}: {{
    packages.x86_64-linux.hello = throw (builtins.readFile "${{s}}/secret");
  }};
}}"#,
                secret_dir.display()
            ),
        );
        let p = b64(&format!("path:{}#hello", f.display()));
        let (errno, msg) = lookup_as(NOBODY, &p).unwrap_err();
        assert_ne!(errno, 0);
        let calls = s.nix_calls();
        assert!(!calls.is_empty(), "evaluated, as nobody");
        assert!(calls.iter().all(|(uid, ..)| *uid == NOBODY), "{calls:?}");
        eprintln!("refused: errno {errno}: {msg}");
        s.assert_no_leak("input", &[p]);
    }
}

ns_test! {
    fn a_readable_subdirectory_of_a_root_only_flake_copies_nothing() {
        let s = setup("", true);
        let f = s.root_flake("rootflake");
        // A git repository too: Nix searches upward for .git as well.
        let repo = s.root_flake("rootrepo");
        sh(&format!(
            "cd {} && git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm x && chmod 600 secret",
            repo.display()
        ));
        let names = [
            b64(&format!("{}/sub#hello", f.display())),
            b64(&format!("{}/sub#hello", repo.display())),
            b64(&format!("path:{}/sub#hello", f.display())),
        ];
        for p in &names {
            let r = lookup_as(NOBODY, p);
            assert!(r.is_err(), "{}: {r:?}", p.display());
        }
        let calls = s.nix_calls();
        assert!(calls.iter().all(|(uid, ..)| *uid == NOBODY), "{calls:?}");
        s.assert_no_leak("upward search", &names);
        // Root, who can read it all, still can.
        assert_eq!(readlink(&b64_padded(&format!("path:{}#hello", f.display()))), s.hello);
    }
}

ns_test! {
    fn symlinks_the_caller_owns_and_flips_never_get_root_to_read() {
        let s = setup("ttl = 0\nfailure-ttl = 0\nrefusal-ttl = 0\nevals-per-minute = 0", true);
        let f = s.root_flake("rootflake");
        let decoy = s.nobody_flake("decoy", &std::fs::read_to_string(FLAKE).unwrap());
        // `..` after a symlink nobody owns: refused as a name.
        let link = s.public.join("link");
        std::os::unix::fs::symlink(f.join("sub"), &link).unwrap();
        let dotted = b64(&format!("{}/..#hello", link.display()));
        assert_eq!(lookup_as(NOBODY, &dotted).unwrap_err().0, libc::EINVAL);

        // A symlink flipped between a directory holding nobody's decoy
        // flake and one holding the root-only flake, while the tree checks
        // and evaluates `FLIP/f`.
        let root_parent = s.w.path("rootparent");
        std::fs::create_dir(&root_parent).unwrap();
        std::fs::set_permissions(&root_parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&f, root_parent.join("f")).unwrap();
        let decoy_parent = s.public.join("decoyparent");
        std::fs::create_dir(&decoy_parent).unwrap();
        std::fs::rename(&decoy, decoy_parent.join("f")).unwrap();
        let (f, decoy) = (root_parent, decoy_parent);
        let flip = s.public.join("flip");
        std::os::unix::fs::symlink(&decoy, &flip).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (stop, flip, decoy, f) = (stop.clone(), flip.clone(), decoy.clone(), f.clone());
            std::thread::spawn(move || {
                let tmp = flip.with_extension("new");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let to = if n % 2 == 0 { &f } else { &decoy };
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(to, &tmp).unwrap();
                    std::fs::rename(&tmp, &flip).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        let mut names = Vec::new();
        let (mut resolved, mut refused) = (0, 0);
        for i in 0..60 {
            // Nothing is kept (ttl 0): every lookup reaches the server.
            let p = if i % 2 == 0 {
                b64(&format!("path:{}/f#hello", flip.display()))
            } else {
                b64(&format!("{}/f#hello", flip.display()))
            };
            match lookup_as(NOBODY, &p) {
                Ok(_) => resolved += 1,
                Err((errno, msg)) => {
                    if refused < 4 {
                        eprintln!("refused: {errno}: {msg}");
                    }
                    refused += 1
                }
            }
            names.push(p);
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        eprintln!("60 lookups through a flipping symlink: {resolved} resolved (the decoy), {refused} refused");
        let calls = s.nix_calls();
        let as_root: Vec<_> = calls.iter().filter(|(uid, ..)| *uid != NOBODY).collect();
        assert!(as_root.is_empty(), "root evaluated for nobody: {as_root:?}");
        assert!(calls.len() >= 30, "the lookups evaluated (as nobody): {}", calls.len());
        assert!(resolved > 0, "the decoy resolves when the link points at it");
        s.assert_no_leak("symlink flip", &names);
    }
}

ns_test! {
    fn a_git_workdir_pointing_into_a_root_repository_reads_nothing() {
        let s = setup("", true);
        let repo = s.private.join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::copy(FLAKE, repo.join("flake.nix")).unwrap();
        s.root_only_file(&repo.join("secret"));
        sh(&format!(
            "cd {} && git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm x",
            repo.display()
        ));
        let work = s.public.join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::write(work.join(".git"), format!("gitdir: {}/.git\n", repo.display())).unwrap();
        std::fs::copy(FLAKE, work.join("flake.nix")).unwrap();
        sh(&format!("chown -R {NOBODY}:{NOBODY} {}", work.display()));
        let names = [
            b64(&format!("git+file://{}#hello", work.display())),
            b64(&format!("{}#hello", work.display())),
        ];
        for p in &names {
            let r = lookup_as(NOBODY, p);
            assert!(r.is_err(), "{}: {r:?}", p.display());
        }
        let calls = s.nix_calls();
        assert!(calls.iter().all(|(uid, ..)| *uid == NOBODY), "{calls:?}");
        s.assert_no_leak("git workdir", &names);
    }
}

ns_test! {
    fn without_a_daemon_users_get_only_what_needs_no_evaluation() {
        let s = setup("", false);
        let p = str_("myflake#hello");
        let (errno, msg) = lookup_as(NOBODY, &p).unwrap_err();
        assert_eq!(errno, libc::EACCES);
        assert!(msg.contains("nix-daemon") && msg.contains("trusted-users"), "{msg}");
        assert!(s.nix_calls().is_empty(), "nothing evaluated for nobody");
        // Once root has resolved it, everyone gets root's answer.
        assert_eq!(readlink(&b64("myflake#hello")), s.hello);
        assert_eq!(lookup_as(NOBODY, &b64_padded("myflake#hello")), Ok(s.hello.clone()));
        let calls = s.nix_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].0, 0);
        // Their own local flake: refused too (no daemon to read it as them).
        let f = s.nobody_flake("mine", &std::fs::read_to_string(FLAKE).unwrap());
        let (errno, _) = lookup_as(NOBODY, &b64(&format!("path:{}#hello", f.display()))).unwrap_err();
        assert_eq!(errno, libc::EACCES);
        assert_eq!(s.nix_calls().len(), 1);
    }
}

ns_test! {
    fn a_users_answer_is_theirs_alone() {
        let s = setup("", true);
        // nobody's flake says myflake-like things: their word, not root's.
        let f = s.nobody_flake("mine", &std::fs::read_to_string(FLAKE).unwrap());
        let r = format!("path:{}#hello", f.display());
        assert_eq!(lookup_as(NOBODY, &b64(&r)), Ok(s.hello.clone()), "same derivation, a lower hit");
        let calls = s.nix_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, NOBODY, "evaluated as nobody: {calls:?}");
        // Root asking the same reference evaluates it itself.
        assert_eq!(readlink(&b64_padded(&r)), s.hello);
        let calls = s.nix_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[1].0, 0);
        // A build for nobody runs as nobody, through the daemon.
        let extra = str_("myflake#extra");
        let got = lookup_as(NOBODY, &extra);
        assert!(got.is_err(), "nobody may not start builds: {got:?}");
        let (errno, msg) = got.unwrap_err();
        assert_eq!(errno, libc::EACCES);
        assert!(msg.contains("may not start builds"), "{msg}");
        // The refusal is kept for nobody: asking again starts no Nix.
        let n = s.nix_calls().len();
        for _ in 0..10 {
            assert_eq!(lookup_as(NOBODY, &extra).unwrap_err().0, libc::EACCES);
        }
        assert_eq!(s.nix_calls().len(), n, "repeated refused lookups start no nix");
        assert!(!s.upper.join("store").join(base_name(&s.hello)).exists());
    }
}

ns_test! {
    fn a_fifo_input_holds_only_its_users_slots_and_is_killed_at_the_timeout() {
        let s = setup("eval-timeout = 4", true);
        // Root's answer, cached, and a reference root will evaluate later.
        assert_eq!(readlink(&str_("myflake#hello")), s.hello);
        let fifo = s.public.join("fifo.tar.gz");
        sh(&format!("mkfifo {} && chown {NOBODY} {}", fifo.display(), fifo.display()));
        let f = s.nobody_flake(
            "hang",
            &format!(
                r#"{{
  inputs.s = {{ url = "file://{}"; flake = false; }};
  outputs = {{ self, s }}: {{ packages.x86_64-linux.hello = import s; }};
}}"#,
                fifo.display()
            ),
        );
        let hangs: Vec<_> = (0..3)
            .map(|i| {
                let p = b64(&format!("path:{}#hello{}", f.display(), "x".repeat(i)));
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let r = lookup_as(NOBODY, &p);
                    (r, t.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        let t = Instant::now();
        assert_eq!(readlink(&b64("myflake#hello")), s.hello);
        let cached = t.elapsed();
        let t = Instant::now();
        let with_dot = readlink(&str_("myflake#\"with.dot\""));
        let evaluated = t.elapsed();
        eprintln!("while nobody's evaluations hang on a FIFO: a cached root lookup took {cached:?}, an evaluating one {evaluated:?}");
        assert!(cached < Duration::from_secs(1), "{cached:?}");
        assert!(with_dot.starts_with("/nix/store/"));
        assert!(evaluated < Duration::from_secs(4), "root did not wait for nobody's slots: {evaluated:?}");
        for h in hangs {
            let (r, took) = h.join().unwrap();
            let (errno, msg) = r.unwrap_err();
            eprintln!("nobody's FIFO lookup: errno {errno} after {took:?}");
            assert!(
                errno == libc::ETIMEDOUT || errno == libc::EAGAIN,
                "{errno}: {msg}"
            );
            assert!(took < Duration::from_secs(12), "{took:?}");
        }
        let t = Instant::now();
        while !nix_processes_of(NOBODY).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "left running: {:?}", nix_processes_of(NOBODY));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

ns_test! {
    fn a_flood_from_one_user_leaves_root_fast_and_the_server_bounded() {
        let s = setup("cache-entries = 2000", true);
        assert_eq!(readlink(&str_("myflake#hello")), s.hello);
        let pid = server_pid(&s);
        let rss_before = rss_kib(pid);
        // 200 distinct references at once, from nobody.
        let flood: Vec<_> = (0..200)
            .map(|i| {
                let p = str_(&format!("myflake#nope{i}"));
                std::thread::spawn(move || lookup_as(NOBODY, &p))
            })
            .collect();
        // Root's lookups (new names of a cached reference reach the server).
        let mut worst = Duration::ZERO;
        let ref_ = "myflake#hello";
        for i in 0..40 {
            let name = match i % 3 {
                0 => b64(ref_),
                1 => b64_padded(ref_),
                _ => urlenc(ref_),
            };
            let t = Instant::now();
            assert_eq!(readlink(&name), s.hello);
            worst = worst.max(t.elapsed());
            // Let the kernel forget the name so the next one asks again.
            sh("echo 2 > /proc/sys/vm/drop_caches");
        }
        let mut kinds = std::collections::BTreeMap::<i32, usize>::new();
        for h in flood {
            let errno = h.join().unwrap().unwrap_err().0;
            *kinds.entry(errno).or_default() += 1;
        }
        let evals = s.nix_calls().iter().filter(|(u, ..)| *u == NOBODY).count();
        eprintln!("200 distinct refs from nobody: {evals} evaluations, answers by errno {kinds:?}; root's slowest lookup meanwhile {worst:?}");
        assert!(evals <= 30, "evals-per-minute bounds them: {evals}");
        // The target (100 ms) is held by `cargo bench --bench flakefs`; on a
        // shared machine running tests in parallel, this only catches a
        // server that makes root wait for the flood (it was 2.2 s).
        assert!(worst < Duration::from_secs(1), "{worst:?}");

        // 20,000 distinct names.
        let t = Instant::now();
        let flood: Vec<_> = (0..4)
            .map(|k| {
                std::thread::spawn(move || {
                    as_uid(NOBODY, move || {
                        for i in (k..20_000).step_by(4) {
                            let _ = std::fs::symlink_metadata(str_(&format!("nosuch{i}#x")));
                        }
                    })
                })
            })
            .collect();
        for f in flood {
            f.join().unwrap();
        }
        let rss_after = rss_kib(pid);
        eprintln!(
            "20,000 distinct names from nobody in {:?}: server RSS {} KiB before, {} KiB after",
            t.elapsed(),
            rss_before,
            rss_after
        );
        assert!(rss_after < rss_before + 64 * 1024, "{rss_before} -> {rss_after} KiB");
        let t = Instant::now();
        assert_eq!(readlink(&entry("urlenc", "myflake%23hello")), s.hello);
        eprintln!("a root lookup after the flood: {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}
