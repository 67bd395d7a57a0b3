//! Running the tree: mounting it and serving it in the foreground, starting
//! that in the background and waiting until it is mounted, and stopping it.

use std::ffi::OsString;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{MountOption, Session, SessionACL};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

use super::cache::CacheFile;
use super::fs::FlakeFs;
use super::policy::{Policy, PolicyError};
use super::resolver::Resolver;
use super::{cache_file, Settings};
use crate::config::FlakeFsConfig;
use crate::nixcli::{self, Nix};
use crate::overlay;
use crate::pathdb::lookup::Lookup;

/// How long `mount`/`flakefs` wait for the tree to appear.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The FUSE subtype: mountinfo shows the type `fuse.<subtype>` when
/// fusermount mounts the tree, plain `fuse` when it is mounted directly (as
/// root); the source, [`FS_NAME`], tells it apart from other FUSE mounts.
pub const FS_SUBTYPE: &str = "nixfs-flake";
/// The source mountinfo shows for the tree.
pub const FS_NAME: &str = "nixfs-layer";

#[derive(Debug, thiserror::Error)]
pub enum FlakeFsError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("flake tree mount point {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is already a mount point; unmount it or mount the flake tree elsewhere (`mount --flake-mount DIR`, `flakefs --mountpoint DIR`, or [flakefs] mountpoint)")]
    AlreadyMounted(PathBuf),
    #[error(
        "mounting the flake tree on {path} failed: {source}; is /dev/fuse present (modprobe fuse)?"
    )]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting the flake tree at {path} failed: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving the flake tree at {path} failed: {source}")]
    Serve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start the flake tree server: {0}")]
    Spawn(std::io::Error),
    #[error("could not create the flake tree server's log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the flake tree server did not come up on {mountpoint} ({why}); its log {log}: {tail}"
    )]
    NotReady {
        mountpoint: PathBuf,
        why: String,
        log: PathBuf,
        tail: String,
    },
    #[error("the flake tree server (pid {0}) did not stop; end it with `kill {0}` and run `nixfs-layer umount` again")]
    DidNotStop(u32),
}

impl FlakeFsError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            FlakeFsError::Policy(_) => Kind::Config,
            FlakeFsError::Mountpoint { .. } => Kind::CantCreat,
            FlakeFsError::AlreadyMounted(_) | FlakeFsError::DidNotStop(_) => Kind::TempFail,
            FlakeFsError::Mount { .. }
            | FlakeFsError::Unmount { .. }
            | FlakeFsError::Serve { .. }
            | FlakeFsError::Spawn(_)
            | FlakeFsError::NotReady { .. } => Kind::OsErr,
            FlakeFsError::Log { .. } => Kind::IoErr,
        }
    }
}

/// What serving the tree needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mountpoint: PathBuf,
    /// The store whose database is asked (TARGET/var/nix/db).
    pub target: PathBuf,
    pub config: FlakeFsConfig,
}

/// A resolver for the store at `target`, as `serve` and `resolve` use it.
pub fn resolver(target: &Path, config: &FlakeFsConfig) -> Result<Resolver, FlakeFsError> {
    Ok(Resolver::new(
        Nix::default(),
        Lookup::for_target(target),
        Policy::from_config(config)?,
        Settings::from_config(config),
        Some(CacheFile::new(&cache_file(target))),
    )
    .with_gc_roots(target.join("var/nix/gcroots/nixfs-layer-flakes"))
    .with_daemon_socket(target.join("var/nix/daemon-socket/socket"))
    .with_indexes(&target.join("var/nix/db/db.sqlite")))
}

/// The topmost mount at exactly `mountpoint`, whoever's.
fn mount_at(mountpoint: &Path) -> Option<overlay::MountInfo> {
    overlay::mount_at(&overlay::mounts().ok()?, mountpoint)
}

/// Whether the flake tree is mounted at `mountpoint` (not just any FUSE
/// file system).
pub fn is_mounted(mountpoint: &Path) -> bool {
    mount_at(mountpoint).is_some_and(|m| {
        m.source == FS_NAME && (m.fs_type == "fuse" || m.fs_type == format!("fuse.{FS_SUBTYPE}"))
    })
}

/// The signal that tells a running server the stack changed (`sync` sends
/// it): it invalidates the kernel's entries of the tree.
pub const REFRESH: Signal = Signal::SIGUSR1;

/// Where a server counts the refreshes it has done (so that `sync` can wait
/// for its own to be done).
fn refreshed_file(target: &Path, pid: u32) -> PathBuf {
    target.join(format!("var/nixfs-layer/flakefs-refreshed.{pid}"))
}

fn refreshes(target: &Path, pid: u32) -> u64 {
    std::fs::read_to_string(refreshed_file(target, pid))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Tells the servers of the tree over the store at `target` that the stack
/// changed, and waits (up to two seconds) until each has invalidated the
/// kernel's entries, so that no lookup after `sync` sees an old answer.
pub fn refresh(target: &Path) {
    let servers: Vec<(u32, u64)> = servers_for(target)
        .into_iter()
        .map(|s| (s.pid, refreshes(target, s.pid)))
        .collect();
    for (pid, _) in &servers {
        let _ = kill(nix::unistd::Pid::from_raw(*pid as i32), REFRESH);
    }
    let until = Instant::now() + Duration::from_secs(2);
    for (pid, before) in servers {
        while refreshes(target, pid) <= before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Mounts the tree and serves it until it is unmounted or a signal
/// (TERM, INT, HUP) arrives; then unmounts it and stops running builds.
pub fn serve(opts: &ServeOptions) -> Result<(), FlakeFsError> {
    // Before any thread exists, so that every thread inherits the mask and
    // only the waiter below receives these signals.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, REFRESH] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| FlakeFsError::Spawn(e.into()))?;

    std::fs::create_dir_all(&opts.mountpoint).map_err(|source| FlakeFsError::Mountpoint {
        path: opts.mountpoint.clone(),
        source,
    })?;
    let mountpoint =
        std::fs::canonicalize(&opts.mountpoint).map_err(|source| FlakeFsError::Mountpoint {
            path: opts.mountpoint.clone(),
            source,
        })?;
    if mount_at(&mountpoint).is_some() {
        return Err(FlakeFsError::AlreadyMounted(mountpoint));
    }
    let resolver = Arc::new(resolver(&opts.target, &opts.config)?);
    let fs = FlakeFs::new(Arc::clone(&resolver));
    let names = fs.names_handle();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_SUBTYPE.into()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    config.acl = SessionACL::All;
    let session = Session::new(fs, &mountpoint, &config).map_err(|source| FlakeFsError::Mount {
        path: mountpoint.clone(),
        source,
    })?;
    // Nothing below needs the caller's directory.
    let _ = std::env::set_current_dir("/");
    tracing::info!(mountpoint = %mountpoint.display(), target = %opts.target.display(), pid = std::process::id(), "flake tree mounted");
    // Everything (store, merged database, tree) is up: tell systemd.
    crate::sdnotify::notify("READY=1");

    let mp = mountpoint.clone();
    let notifier = session.notifier();
    let refreshed = refreshed_file(&opts.target, std::process::id());
    let mut done = 0u64;
    std::thread::Builder::new()
        .name("flakefs-signals".into())
        .spawn(move || {
            while let Ok(sig) = signals.wait() {
                if sig == REFRESH {
                    // The stack changed (a sync): answers, the published
                    // ones above all, may differ now. The kernel asks again.
                    let all = names.all();
                    for (dir, name) in &all {
                        let _ = notifier.inval_entry(fuser::INodeNo(*dir), name);
                    }
                    tracing::info!(
                        entries = all.len(),
                        "stack changed: the kernel's entries of the tree invalidated"
                    );
                    done += 1;
                    let _ = std::fs::write(&refreshed, done.to_string());
                    continue;
                }
                tracing::info!(?sig, "stopping the flake tree");
                // The loop ends when the mount goes (the kernel answers ENODEV).
                let _ = umount2(&mp, MntFlags::MNT_DETACH);
                break;
            }
        })
        .map_err(FlakeFsError::Spawn)?;

    let result = session.run();
    nixcli::terminate_all();
    let _ = std::fs::remove_file(refreshed_file(&opts.target, std::process::id()));
    // After an external unmount the mount is gone already; otherwise undo it.
    if is_mounted(&mountpoint) {
        let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
    }
    tracing::info!(
        evaluations = resolver
            .counters
            .evaluations
            .load(std::sync::atomic::Ordering::SeqCst),
        builds = resolver
            .counters
            .builds
            .load(std::sync::atomic::Ordering::SeqCst),
        "flake tree stopped"
    );
    result.map_err(|source| FlakeFsError::Serve {
        path: mountpoint,
        source,
    })
}

/// A running server of the tree for a store, found by its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub pid: u32,
    pub mountpoint: PathBuf,
}

/// The tree's servers in this mount namespace that serve the store at
/// `target`: what [`spawn`] started (`nixfs-layer flakefs --mountpoint M
/// --target T … --foreground`), whether or not a mount record names them
/// (a `mount` killed between starting one and recording it).
pub fn servers_for(target: &Path) -> Vec<Server> {
    let own_ns = overlay::own_mnt_ns();
    let mut out = Vec::new();
    for p in overlay::processes() {
        if p.mnt_ns != own_ns {
            continue;
        }
        let pid = p.pid;
        let ours = std::fs::read_link(p.dir.join("exe")).is_ok_and(|e| {
            e.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nixfs-layer"))
        });
        if !ours {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let value = |flag: &str| {
            args.iter()
                .position(|a| *a == flag.as_bytes())
                .and_then(|i| args.get(i + 1))
                .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        };
        let serving =
            args.contains(&b"flakefs".as_slice()) && args.contains(&b"--foreground".as_slice());
        if serving && value("--target").as_deref() == Some(target) {
            if let Some(mountpoint) = value("--mountpoint") {
                out.push(Server { pid, mountpoint });
            }
        }
    }
    out
}

/// Starts `nixfs-layer <args> --foreground` detached, with its output in
/// `log`, and returns its pid once the tree is mounted at `mountpoint`.
pub fn spawn(args: &[OsString], mountpoint: &Path, log: &Path) -> Result<u32, FlakeFsError> {
    // Made by the child when missing (and then nothing is mounted there).
    let mountpoint = std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_owned());
    // The child would refuse it too, but whatever is mounted there would
    // pass for the tree coming up.
    if mount_at(&mountpoint).is_some() {
        return Err(FlakeFsError::AlreadyMounted(mountpoint));
    }
    let log_err = |path: &Path| {
        let path = path.to_owned();
        move |source| FlakeFsError::Log { path, source }
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(log_err(dir))?;
    }
    // Root's evaluations log what Nix said, which may quote what it read
    // as root: the log is root's alone.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(log_err(log))?;
    let _ = std::fs::set_permissions(log, std::fs::Permissions::from_mode(0o600));
    let err = out.try_clone().map_err(FlakeFsError::Spawn)?;
    let log_start = out.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(FlakeFsError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // Inside `run` the server is the run's: it must not outlive it (a
    // killed `run` would leave it holding the namespace and the upper).
    let in_run = std::env::var_os(crate::stack::run::RUN_ENV).is_some();
    let parent = nix::unistd::getpid();
    // SAFETY: setsid, prctl and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if in_run {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The run died before the signal was armed.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(FlakeFsError::Spawn)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let not_ready = |why: String| {
        let text = std::fs::read(log).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[(log_start as usize).min(text.len())..])
            .trim()
            .to_owned();
        FlakeFsError::NotReady {
            mountpoint: mountpoint.clone(),
            why,
            log: log.to_owned(),
            tail: new
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | "),
        }
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(not_ready(format!("it exited with {status}")));
        }
        if is_mounted(&mountpoint) {
            return Ok(child.id());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(not_ready(format!(
                "not mounted after {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Unmounts the tree and waits for its server to exit (TERM, then KILL).
pub fn stop(pid: Option<u32>, mountpoint: &Path) -> Result<(), FlakeFsError> {
    if is_mounted(mountpoint) {
        // Detach: a process with its cwd in the tree must not keep it alive.
        umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|e| FlakeFsError::Unmount {
            path: mountpoint.to_owned(),
            source: e.into(),
        })?;
    }
    let Some(pid) = pid else { return Ok(()) };
    let p = Pid::from_raw(pid as i32);
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("nixfs-layer"))
        .unwrap_or(false);
    if !ours {
        return Ok(());
    }
    // Running until it is gone, or a zombie with no open file left: only
    // then is the store database closed. (Its command line reads empty
    // earlier, and its main thread turns zombie while other threads may
    // still be exiting.)
    let running = || {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        let zombie = state.starts_with('Z') || state.starts_with('X');
        let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() > 0)
            .unwrap_or(false);
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        !zombie || open_files || threads > 1
    };
    for (signal, wait) in [
        (None, Duration::from_secs(5)),
        (Some(Signal::SIGTERM), Duration::from_secs(5)),
        (Some(Signal::SIGKILL), Duration::from_secs(5)),
    ] {
        if !running() {
            return Ok(());
        }
        if let Some(s) = signal {
            let _ = kill(p, s);
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if !running() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Err(FlakeFsError::DidNotStop(pid))
}
