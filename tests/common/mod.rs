//! Shared by the integration tests: running a test body in a private mount
//! namespace, real Nix against a throw-away `/nix`, the binary under test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

pub mod hosts;

const IN_NS: &str = "NIXFS_LAYER_TEST_IN_NS";
pub const DEFAULT_CONFIG_DIR: &str = "/etc/nixfs-layer";
/// Where `mount` puts the flake tree by default.
pub const FLAKE_MOUNT: &str = "/nixfs";

/// Declares a test whose body runs in its own mount namespace: the test
/// process re-runs itself under `unshare -m --propagation private` (a
/// multithreaded process cannot unshare its mounts reliably), so nothing it
/// mounts is seen by the host or by other tests.
#[macro_export]
macro_rules! ns_test {
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        #[test]
        $(#[$m])*
        fn $name() {
            common::in_private_ns(stringify!($name), || $body)
        }
    };
}

pub fn in_private_ns(name: &str, body: impl FnOnce()) {
    if std::env::var_os(IN_NS).is_some() {
        body();
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "mount tests need root: run the test suite as root (see README)"
    );
    std::fs::create_dir_all("/nix").expect("create /nix as a mount point");
    let exe = std::env::current_exe().unwrap();
    // A PID namespace too: servers a test starts (the flake tree's) end
    // with the test.
    let status = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
        ])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(IN_NS, "1")
        .status()
        .expect("run unshare (util-linux)");
    assert!(
        status.success(),
        "test body of {name} failed in its namespace: {status}"
    );
}

/// A scratch directory for one test, with a tmpfs on `/nix` (inside the
/// test's namespace) so real Nix can build into it.
pub struct World {
    pub tmp: tempfile::TempDir,
    /// Extra Nix experimental features (e.g. "ca-derivations").
    pub features: std::sync::Mutex<String>,
    /// Extra nix.conf lines (e.g. "flake-registry = …").
    pub nix_conf: std::sync::Mutex<String>,
}

impl Drop for World {
    /// Lifts the seal `mount` puts on each upper's overlay work directory
    /// (a test may end with its stack mounted), so the scratch directory
    /// can be removed.
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg("find \"$1\" -maxdepth 4 -path '*/work/work' -exec chattr -i {} + 2>/dev/null")
            .arg("sh")
            .arg(self.tmp.path())
            .status();
    }
}

impl World {
    pub fn new() -> World {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ns-tests");
        std::fs::create_dir_all(&base).unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("t-")
            .tempdir_in(&base)
            .unwrap();
        sh("mount -t tmpfs nixfs-layer-test /nix");
        // The host's own /etc/nixfs-layer/config.toml must not leak into
        // tests: an empty tmpfs hides it (and takes the default-config test's).
        std::fs::create_dir_all(DEFAULT_CONFIG_DIR).unwrap();
        sh(&format!(
            "mount -t tmpfs nixfs-layer-test {DEFAULT_CONFIG_DIR}"
        ));
        std::fs::create_dir_all(tmp.path().join("home")).unwrap();
        // The default mount point of the flake tree, like /nix above.
        std::fs::create_dir_all(FLAKE_MOUNT).unwrap();
        World {
            tmp,
            features: Default::default(),
            nix_conf: Default::default(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Environment for real Nix: local store at /nix, no daemon, no build
    /// users, no substituters, caches under the test's home. The Nix is the
    /// suite's ([`TestNix::from_env`]: the host's, or a chroot's).
    pub fn nix(&self, program: &str) -> Command {
        self.nix_of(&TestNix::from_env(), program)
    }

    /// [`World::nix`] with a given Nix.
    pub fn nix_of(&self, which: &TestNix, program: &str) -> Command {
        let mut c = which.command(program);
        self.nix_env(&mut c);
        c
    }

    /// [`World::nix_ok`] with a given Nix.
    pub fn nix_ok_of<I, S>(&self, which: &TestNix, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.nix_of(which, program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} ({which:?}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The environment of [`World::nix`] on any command (the tool under
    /// test runs Nix in the flake tree's server).
    pub fn nix_env(&self, c: &mut Command) {
        c.env("NIX_REMOTE", "local")
            .env("NIX_CONFIG", self.nix_config())
            .env("HOME", self.path("home"))
            .env("XDG_CACHE_HOME", self.path("home/.cache"))
            .env_remove("NIX_PATH");
    }

    /// The settings [`World::nix`] gives Nix (in `NIX_CONFIG`).
    pub fn nix_config(&self) -> String {
        format!(
            "build-users-group =\nsubstituters =\nsandbox = false\nexperimental-features = nix-command flakes {}\n{}",
            self.features.lock().unwrap(),
            self.nix_conf.lock().unwrap()
        )
    }

    /// Runs a Nix command and returns its stdout; panics with stderr on failure.
    pub fn nix_ok<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.nix_ok_of(&TestNix::from_env(), program, args)
    }

    /// Builds attributes of tests/fixtures/store.nix into whatever /nix is now.
    pub fn build(&self, attrs: &[&str]) -> Vec<String> {
        self.build_of(&TestNix::from_env(), attrs)
    }

    /// [`World::build`] with a given Nix.
    pub fn build_of(&self, which: &TestNix, attrs: &[&str]) -> Vec<String> {
        self.build_from_of(which, "store.nix", attrs)
    }

    /// Builds attributes of a fixture file.
    pub fn build_from(&self, file: &str, attrs: &[&str]) -> Vec<String> {
        self.build_from_of(&TestNix::from_env(), file, attrs)
    }

    /// [`World::build_from`] with a given Nix.
    pub fn build_from_of(&self, which: &TestNix, file: &str, attrs: &[&str]) -> Vec<String> {
        let mut args = vec!["--no-out-link".to_owned(), fixture(file)];
        for a in attrs {
            args.push("-A".into());
            args.push((*a).into());
        }
        self.nix_ok_of(which, "nix-build", &args)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether Nix holds `path` valid in the store at /nix.
    pub fn valid(&self, path: &str) -> bool {
        self.valid_of(&TestNix::from_env(), path)
    }

    /// [`World::valid`] with a given Nix.
    pub fn valid_of(&self, which: &TestNix, path: &str) -> bool {
        self.nix_of(which, "nix-store")
            .args(["--check-validity", path])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Makes `dir` a lower built by real Nix: binds it on /nix for the
    /// duration of `f`, in a nested namespace so that whatever is mounted
    /// on /nix now is left alone.
    pub fn with_nix_at<T>(&self, dir: &Path, f: impl FnOnce() -> T) -> T {
        std::fs::create_dir_all(dir).unwrap();
        // Bind over /nix; undo it afterwards. Mount stacking restores the
        // previous /nix (the merged store, if one is mounted).
        sh(&format!("mount --bind {} /nix", dir.display()));
        let r = f();
        sh("umount /nix");
        r
    }

    /// Runs the binary under test.
    pub fn tool<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.tool_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The binary under test with the Nix environment of [`World::nix`].
    pub fn tool_command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nixfs-layer"));
        self.nix_env(&mut c);
        c
    }

    /// Runs the binary and asserts success; returns stdout.
    pub fn tool_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.tool(args);
        assert!(
            out.status.success(),
            "nixfs-layer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The variable that picks the Nix the suite runs against:
/// unset or `host` for the host's (Debian bookworm's 2.8), `chroot:DIR`
/// for the one installed in the chroot DIR (scripts/test.sh --modern-nix).
pub const TEST_NIX_VAR: &str = "NIXFS_LAYER_TEST_NIX";

/// Where scripts/modern-nix-chroot.sh keeps the trixie chroot by default.
pub const MODERN_CHROOT_DEFAULT: &str = "/var/cache/nixfs-layer/nix-trixie";

/// Which Nix programs a test runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestNix {
    /// The host's, found on PATH.
    Host,
    /// The one inside a chroot: run as `chroot DIR program …` in a mount
    /// namespace of its own where /nix, /proc, /dev, the tests' scratch
    /// directories and tests/fixtures are bound at the same paths inside.
    Chroot(PathBuf),
}

impl TestNix {
    pub fn from_env() -> TestNix {
        match std::env::var(TEST_NIX_VAR) {
            Err(_) => TestNix::Host,
            Ok(v) if v.is_empty() || v == "host" => TestNix::Host,
            Ok(v) => match v.strip_prefix("chroot:") {
                Some(dir) => TestNix::Chroot(PathBuf::from(dir)),
                None => panic!("{TEST_NIX_VAR}={v}: want `host` or `chroot:DIR`"),
            },
        }
    }

    /// A command running `program` of this Nix. Arguments added to it go
    /// to `program`; the environment set on it reaches `program` too.
    pub fn command(&self, program: &str) -> Command {
        match self {
            TestNix::Host => Command::new(program),
            TestNix::Chroot(root) => {
                // Mounts are made afresh for every command, in a namespace
                // that ends with it: whatever is on /nix right now (a
                // tmpfs, a lower bound by with_nix_at, the merged store)
                // is what the chroot sees, and nothing leaks into the
                // cached chroot or the test's namespace.
                let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
                let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
                    .arg(CHROOT_SCRIPT)
                    .arg("sh")
                    .arg(root)
                    .arg(scratch)
                    .arg(fixtures)
                    .arg(program);
                c
            }
        }
    }
}

/// `sh -c` body of a chrooted Nix command: `$1` the chroot, `$2` and `$3`
/// directories to bind at the same path inside, then the program and its
/// arguments. `exec` all the way: the pid of the command is Nix's.
const CHROOT_SCRIPT: &str = r#"set -e
root=$1 scratch=$2 fixtures=$3
shift 3
for d in /nix /proc /dev "$scratch" "$fixtures"; do
  mkdir -p "$root$d"
  mount --rbind "$d" "$root$d"
done
exec chroot "$root" "$@"
"#;

/// The modern-Nix chroot: the suite's when it runs against one, else
/// `$NIXFS_LAYER_MODERN_CHROOT` or the cached default, made by scripts/modern-nix-chroot.sh if missing (a few
/// minutes once per machine).
pub fn modern_chroot() -> PathBuf {
    if let TestNix::Chroot(dir) = TestNix::from_env() {
        return dir;
    }
    let dir = std::env::var_os("NIXFS_LAYER_MODERN_CHROOT")
        .unwrap_or_else(|| MODERN_CHROOT_DEFAULT.into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/modern-nix-chroot.sh");
    let out = Command::new(&script)
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/modern-nix-chroot.sh");
    assert!(
        out.status.success(),
        "scripts/modern-nix-chroot.sh could not make the modern-Nix chroot"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Writes `wrapper`, a `nix` that records each run in `log` (one line: the
/// subcommand and the last argument, the installable) and then runs the
/// real one; point `NIXFS_LAYER_NIX` at it to count the tool's Nix runs.
/// `log` starts empty.
pub fn nix_recorder(wrapper: &Path, log: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(
        wrapper,
        format!(
            "#!/bin/sh\nfor a; do last=$a; done\necho \"$1 $last\" >> {}\nexec nix \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(log, "").unwrap();
}

pub fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// Mount points and types only (mount ids change with every mount).
pub fn mount_table() -> Vec<(String, String)> {
    mountinfo()
        .lines()
        .map(|l| {
            let (pre, post) = l.split_once(" - ").unwrap();
            (
                pre.split(' ').nth(4).unwrap().to_owned(),
                post.split(' ').next().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A digest of every entry under `dir`: names, types, modes, mtimes,
/// symlink targets and file contents.
pub fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.unwrap();
        let m = e.path().symlink_metadata().unwrap();
        let mut h = Sha256::new();
        h.update(format!("{:o} {} {} ", m.mode(), m.mtime(), m.mtime_nsec()));
        if m.file_type().is_symlink() {
            h.update(
                std::fs::read_link(e.path())
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        } else if m.is_file() {
            let mut f = std::fs::File::open(e.path()).unwrap();
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).unwrap();
            h.update(&buf);
        }
        let rel = e.path().strip_prefix(dir).unwrap().to_owned();
        out.insert(rel, format!("{:x}", h.finalize()));
    }
    out
}

/// Entries of a directory, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The suffix of the pin every upper holds (`…-nixfs-layer-lowers`): the
/// store path that keeps lower paths alive for Nix's GC.
pub const PIN_SUFFIX: &str = "-nixfs-layer-lowers";

/// `<hash>-<name>` of a store path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

/// An upper's store entries, but for the pin and an empty `.links` (the
/// opaque directory `mount` makes for Nix's hard links).
pub fn upper_entries(upper: &Path) -> Vec<String> {
    let store = upper.join("store");
    let links = store.join(".links");
    let links_empty = !links.is_dir() || entries(&links).is_empty();
    entries(&store)
        .into_iter()
        .filter(|e| !(e.ends_with(PIN_SUFFIX) || (e == ".links" && links_empty)))
        .collect()
}

/// The names an upper's store whites out (overlayfs' 0/0 character
/// devices), sorted.
pub fn whiteouts(upper: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut v: Vec<String> = std::fs::read_dir(upper.join("store"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_char_device())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The number of valid paths in the database of a Nix root or an upper
/// (`var/nix/db/db.sqlite` under `root`).
pub fn valid_count(root: &Path) -> i64 {
    rusqlite::Connection::open(root.join("var/nix/db/db.sqlite"))
        .unwrap()
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .unwrap()
}

/// Stock `nix-store --verify --check-contents` on /nix passes without a
/// complaint.
pub fn verify_contents(w: &World) {
    verify_contents_of(w, &TestNix::from_env());
}

/// [`verify_contents`] with a given Nix.
pub fn verify_contents_of(w: &World, which: &TestNix) {
    let out = w
        .nix_of(which, "nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "nix-store --verify ({which:?}) failed: {err}"
    );
    for bad in ["error", "corrupt", "disappeared", "modified", "warning"] {
        assert!(
            !err.to_lowercase().contains(bad),
            "nix-store --verify ({which:?}) complains: {err}"
        );
    }
}

/// A lower built by real Nix (tests/fixtures/store.nix attributes) and an
/// initialised upper, not yet mounted. Test files add their own methods.
pub struct Stack {
    pub w: World,
    pub lower: PathBuf,
    pub upper: PathBuf,
    /// Every valid path of the lower.
    pub lower_paths: std::collections::BTreeSet<String>,
}

impl Stack {
    pub fn new(attrs: &[&str]) -> Stack {
        let w = World::new();
        let lower = w.path("lower");
        let lower_paths = w.with_nix_at(&lower, || {
            w.build(attrs);
            w.nix_ok("nix", ["path-info", "--all"])
                .lines()
                .map(str::to_owned)
                .collect()
        });
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        Stack {
            w,
            lower,
            upper,
            lower_paths,
        }
    }

    /// Mounts the lower under `upper` at /nix, without the flake tree.
    pub fn mount_upper(&self, upper: &Path) {
        self.w.tool_ok([
            "mount",
            "--lower",
            self.lower.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
            "--no-flake-fs",
        ]);
    }

    pub fn mount(&self) {
        self.mount_upper(&self.upper);
    }

    pub fn umount(&self) {
        self.w.tool_ok(["umount"]);
    }

    /// Whether Nix holds `path` valid in the store at /nix.
    pub fn valid(&self, path: &str) -> bool {
        self.w.valid(path)
    }

    /// Names the upper store whites out.
    pub fn whiteouts(&self) -> Vec<String> {
        whiteouts(&self.upper)
    }

    /// The lower path whose name ends with `-<name>`.
    pub fn lower_path(&self, name: &str) -> String {
        let suffix = format!("-{name}");
        self.lower_paths
            .iter()
            .find(|p| p.ends_with(&suffix))
            .unwrap_or_else(|| panic!("no lower path {name}: {:?}", self.lower_paths))
            .clone()
    }
}

/// The daemon socket of the store at /nix.
pub const DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// A nix-daemon of the suite's Nix serving the store at /nix, as on a
/// multi-user machine; killed when dropped.
pub struct NixDaemon {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Drop for NixDaemon {
    /// Kills it and its workers (its descendants: a worker may have a
    /// session of its own), and waits until none is left.
    fn drop(&mut self) {
        let mut family = vec![self.child.id()];
        let mut i = 0;
        while i < family.len() {
            family.extend(children_of(family[i]));
            i += 1;
        }
        for &pid in &family {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
        let t = std::time::Instant::now();
        // Gone, or a zombie (the test, PID 1 of its namespace, inherits
        // them and does not reap them).
        let alive = |p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|st| st.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
        };
        while family[1..].iter().any(alive) && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl NixDaemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl World {
    /// Starts a nix-daemon on /nix (the World's settings, plus
    /// `extra_conf` lines, e.g. `build-users-group = nixbld`) and waits for
    /// its socket. `wait_socket`: false for a daemon whose socket the test
    /// expects to be hidden.
    pub fn start_nix_daemon(&self, extra_conf: &str, wait_socket: bool) -> NixDaemon {
        let log = self.path("daemon.log");
        let mut c = self.nix("nix-daemon");
        if !extra_conf.is_empty() {
            c.env(
                "NIX_CONFIG",
                format!("{}\n{extra_conf}\n", self.nix_config()),
            );
        }
        let child = c
            .env_remove("NIX_REMOTE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run nix-daemon");
        let d = NixDaemon { child, log };
        if wait_socket {
            let t = std::time::Instant::now();
            while std::os::unix::net::UnixStream::connect(DAEMON_SOCKET).is_err() {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(20),
                    "nix-daemon did not come up: {}",
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        d
    }

    /// A command of the suite's Nix run as `uid` (gid the same, no
    /// supplementary groups) through the nix-daemon, with a HOME of its
    /// own: a user of a multi-user machine.
    pub fn nix_as(&self, uid: u32, program: &str) -> Command {
        let home = self.path(&format!("home-{uid}"));
        std::fs::create_dir_all(&home).unwrap();
        sh(&format!("chown {uid}:{uid} {}", home.display()));
        let mut c = self.nix("setpriv");
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
            program.into(),
        ])
        .env("NIX_REMOTE", "daemon")
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"));
        c
    }
}

/// An unprivileged user made for one test (`useradd`), removed again when
/// dropped (`userdel`), with a home directory of its own under the test's
/// scratch directory.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    /// Makes the user; the scratch directory of `w` (and the directories
    /// above it) become traversable by it, so that lowers built there can
    /// be read.
    pub fn new(w: &World) -> TestUser {
        use std::os::unix::fs::PermissionsExt;
        // Named after the scratch directory: tests run in PID namespaces
        // of their own, so their pids are all alike.
        let digest = Sha256::digest(w.tmp.path().as_os_str().as_encoded_bytes());
        let name = format!("nxl-{:x}", digest)[..14].to_owned();
        let home = w.path(&format!("home-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        let out = Command::new("useradd")
            .args(["-M", "-U", "-s", "/bin/sh", "-d"])
            .arg(&home)
            .arg(&name)
            .output()
            .expect("run useradd (passwd)");
        assert!(out.status.success(), "useradd {name}: {}", stderr(&out));
        let id = |flag: &str| -> u32 { sh(&format!("id {flag} {name}")).trim().parse().unwrap() };
        let (uid, gid) = (id("-u"), id("-g"));
        let user = TestUser {
            name,
            uid,
            gid,
            home,
        };
        sh(&format!("chown {uid}:{gid} {}", user.home.display()));
        // Every directory from / down to the scratch directory must let the
        // user through (tempfile makes the scratch directory 0700).
        for d in w.tmp.path().ancestors() {
            let mode = std::fs::metadata(d).unwrap().permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o055)).unwrap();
            }
        }
        user
    }

    /// `program` run as this user (setpriv: its uid, gid and no other
    /// group), in its home, with a PATH it may search.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        self.env(&mut c);
        c
    }

    /// Its environment on `c`: HOME, caches, PATH, the working directory.
    pub fn env(&self, c: &mut Command) {
        c.env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .env("USER", &self.name)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .current_dir(&self.home);
    }

    /// The binary under test run as this user, with the Nix environment of
    /// [`World::nix`] (its HOME is the user's).
    pub fn tool(&self, w: &World) -> Command {
        let mut c = self.command(env!("CARGO_BIN_EXE_nixfs-layer"));
        w.nix_env(&mut c);
        self.env(&mut c);
        c.stdin(Stdio::null());
        c
    }
}

/// Runs a command line under a pseudo-terminal (util-linux `script`) with
/// the Nix environment of [`World::nix`]; returns everything the terminal
/// showed.
pub fn on_terminal(w: &World, cmdline: &str) -> String {
    let mut c = Command::new("script");
    w.nix_env(&mut c);
    let out = c
        .args(["-qfec", cmdline, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{cmdline}` on a terminal failed: {shown} {}",
        stderr(&out)
    );
    shown
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
