//! `run`: a stack mounted in a mount namespace of its own, for one
//! command. As root that is a private mount namespace; as any other user
//! a user namespace too, where the user is uid 0 (the mounts need it) and
//! stock Nix runs as a single-user store. Nothing is mounted on the host
//! either way, and nothing needs root.
//!
//! ```text
//! enter      unshare (user +) mount namespace, make / private, make room
//!            for the target and the flake tree, lifecycle::mount
//! Session    the stack mounted in this process's namespace
//! exec       CMD as a child; its status is run's; then the stack is
//!            unmounted (the namespace goes with the last process in it)
//! ```
//!
//! The target need not exist: a target whose top directory the host lacks
//! (`/nix` on a machine without Nix) is made in a new root, a tmpfs
//! holding binds of the host's top-level entries, which the process
//! pivots into. An existing target gets a tmpfs of its own, so that
//! `TARGET/store` and `TARGET/var` exist whatever the host has there. A
//! lower that is the target itself (the machine's own `/nix`) is bound at
//! [`OWN_LOWERS`]`/N` in such a new root.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::{Gid, Pid, Uid};

use super::lifecycle::{self, MountOptions, Mounting, Progress};
use super::{find_mounted, lock_upper, Stack};
use crate::error::{Error, Result};
use crate::overlay;
use crate::pathdb::journal;

/// Set for the command `run` runs (and in `run` itself): the target of the
/// stack this mount namespace was made for. Commands inside see that the
/// namespace is a private one (no target lock under /run).
pub const RUN_ENV: &str = "NIXFS_LAYER_RUN";
/// The mount namespace `run` made (`mnt:[…]`), beside [`RUN_ENV`]: what
/// tells a command that it runs in that namespace itself.
pub const RUN_NS_ENV: &str = "NIXFS_LAYER_RUN_NS";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("unprivileged user namespaces are disabled on this machine ({setting}): `run` needs one to mount without root; {fix}")]
    UserNsDisabled { setting: String, fix: String },
    #[error("creating a user namespace failed ({errno}){hint}")]
    UserNs { errno: Errno, hint: String },
    #[error("{what} failed: {errno}")]
    Namespace { what: String, errno: Errno },
    #[error("{path} does not exist, and making it would change the host's {parent}: create it first (as its owner), or pick a target whose top directory the host lacks (such as /nix), which `run` makes in a private root")]
    NoRoom { path: PathBuf, parent: PathBuf },
    #[error("{program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

impl RunError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            RunError::UserNsDisabled { .. } | RunError::UserNs { .. } => Kind::Unavailable,
            RunError::Namespace { .. } => Kind::OsErr,
            RunError::NoRoom { .. } => Kind::CantCreat,
            RunError::Spawn { .. } => match self.spawn_status() {
                Some(code) => Kind::CommandNotStarted(code),
                None => Kind::Unavailable,
            },
        }
    }
}

impl RunError {
    /// The exit status of a command that could not be started, as shells
    /// give it (127 not found, 126 not executable).
    pub fn spawn_status(&self) -> Option<u8> {
        match self {
            RunError::Spawn { source, .. } => Some(match source.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            }),
            _ => None,
        }
    }
}

/// How `run` got the right to mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// It had CAP_SYS_ADMIN: a private mount namespace.
    Root,
    /// A user namespace mapping this user (and group) to 0.
    User { uid: Uid, gid: Gid },
}

/// The stack mounted in the namespace of this process.
pub struct Session {
    pub mode: Mode,
    pub mounting: Mounting,
    /// Why the flake tree is not mounted though it was asked for.
    pub flake_tree_skipped: Option<String>,
    target: PathBuf,
}

/// Enters a mount namespace of its own (and a user namespace, without
/// root), makes room for the target and the flake tree there, and mounts
/// the stack as `mount` does (the merged database brought up to date
/// first). Must be called while this process has one thread.
pub fn enter(opts: &MountOptions, progress: Progress<'_>) -> Result<Session> {
    // The layers are checked on the host's paths first: each error names
    // what the user gave, before any namespace exists.
    let stack = Stack::open(&opts.lowers, &opts.upper)?;
    // A lower that is the target itself (the machine's own /nix, under a
    // user's upper) is bound elsewhere in a private root, where the target
    // is a fresh directory: the stack does not show up inside its lower.
    let own: Vec<usize> = (0..stack.lowers.len())
        .filter(|&i| same_dir(stack.lowers[i].dir(), &opts.target))
        .collect();
    let others: Vec<_> = (0..stack.lowers.len())
        .filter(|i| !own.contains(i))
        .map(|i| stack.lowers[i].clone())
        .collect();
    super::layer::check_target(&opts.target, &others, &stack.upper)?;
    let mut opts = opts.clone();
    let mut binds = Vec::new();
    for &i in &own {
        let inside = Path::new(OWN_LOWERS).join(i.to_string());
        binds.push((stack.lowers[i].dir().to_owned(), inside.clone()));
        opts.lowers[i] = inside;
    }
    let mut flake_tree_skipped = None;
    if opts.flake_tree.is_some() {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            flake_tree_skipped = Some(format!(
                "/dev/fuse cannot be opened ({e}); `chmod 0666 /dev/fuse`, as most distributions have it, makes the flake tree available"
            ));
            opts.flake_tree = None;
        }
    }
    let mode = enter_namespace()?;
    // Single-threaded still. The flake tree's server and the command
    // inherit both.
    std::env::set_var(RUN_ENV, &opts.target);
    if let Ok(ns) = std::fs::read_link("/proc/self/ns/mnt") {
        std::env::set_var(RUN_NS_ENV, ns);
    }
    if let Some(c) = nix_config(mode) {
        std::env::set_var("NIX_CONFIG", c);
    }
    let mut places = vec![opts.target.clone()];
    if let Some(t) = &opts.flake_tree {
        places.push(t.mountpoint.clone());
    }
    make_room(&places, &binds)?;
    mount_tmpfs(&opts.target)?;
    for d in ["store", "var"] {
        let p = opts.target.join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    let mounting = lifecycle::mount(&opts, progress)?;
    Ok(Session {
        mode,
        mounting,
        flake_tree_skipped,
        target: opts.target,
    })
}

impl Session {
    /// Runs `command` with the stack mounted and returns its exit status
    /// (128 + n for a signal n), having unmounted the stack after it.
    pub fn exec(self, command: &[OsString]) -> Result<u8> {
        let Session {
            mounting, target, ..
        } = self;
        // The upper's lock goes: commands inside (sync, gc…) take it.
        drop(mounting);
        let status = run_command(command);
        let teardown = tear_down(&target);
        let status = status?;
        if let Err(e) = teardown {
            tracing::warn!(target = %target.display(), error = %e, "could not unmount the stack after the command; it goes with the last process of this namespace");
        }
        Ok(status)
    }
}

/// A mount namespace of its own for this process: private if it may
/// mount, else in a user namespace of its own where it is uid 0.
fn enter_namespace() -> Result<Mode, RunError> {
    let mode = if overlay::check_privileges("run").is_ok() {
        unshare(CloneFlags::CLONE_NEWNS).map_err(|errno| RunError::Namespace {
            what: "unshare(CLONE_NEWNS)".into(),
            errno,
        })?;
        Mode::Root
    } else {
        let (uid, gid) = (Uid::current(), Gid::current());
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
            .map_err(|errno| userns_refused(errno, &sysctl))?;
        let write = |file: &str, text: String| {
            std::fs::write(file, text).map_err(|e| {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(0));
                restricted(&sysctl).unwrap_or(RunError::Namespace {
                    what: format!("writing {file}"),
                    errno,
                })
            })
        };
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/uid_map", format!("0 {uid} 1"))?;
        write("/proc/self/gid_map", format!("0 {gid} 1"))?;
        Mode::User { uid, gid }
    };
    // Nothing mounted from here on reaches the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|errno| {
        restricted(&sysctl).unwrap_or(RunError::Namespace {
            what: "making / private in the new mount namespace".into(),
            errno,
        })
    })?;
    Ok(mode)
}

/// Reads a sysctl (`/proc/sys/...`), trimmed.
fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// AppArmor's restriction: a user namespace is made, but without the
/// capabilities to use it.
fn restricted(sysctl: &dyn Fn(&str) -> Option<String>) -> Option<RunError> {
    (sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1"))
        .then(|| RunError::UserNsDisabled {
            setting: "kernel.apparmor_restrict_unprivileged_userns = 1".into(),
            fix: "have an administrator run `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or load an AppArmor profile that allows `userns` for nixfs-layer".into(),
        })
}

/// Why `unshare(CLONE_NEWUSER)` failed, naming the setting to change.
fn userns_refused(errno: Errno, sysctl: &dyn Fn(&str) -> Option<String>) -> RunError {
    if sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return RunError::UserNsDisabled {
            setting: "kernel.unprivileged_userns_clone = 0".into(),
            fix: "have an administrator run `sysctl -w kernel.unprivileged_userns_clone=1` (and set it in /etc/sysctl.d/ to keep it)".into(),
        };
    }
    if let Some(max) = sysctl("/proc/sys/user/max_user_namespaces") {
        if max == "0" {
            return RunError::UserNsDisabled {
                setting: "user.max_user_namespaces = 0".into(),
                fix: "have an administrator run `sysctl -w user.max_user_namespaces=15000` (and set it in /etc/sysctl.d/ to keep it); in a container, its runtime sets this limit".into(),
            };
        }
        if errno == Errno::ENOSPC {
            return RunError::UserNs {
                errno,
                hint: format!(": the limit user.max_user_namespaces ({max}) is reached; end other sandboxes or containers, or raise it (`sysctl -w user.max_user_namespaces=…`)"),
            };
        }
    }
    if let Some(e) = restricted(sysctl) {
        return e;
    }
    RunError::UserNs {
        errno,
        hint: match errno {
            Errno::EPERM => "; in a container, its seccomp profile may forbid unshare(CLONE_NEWUSER) (Docker: `--security-opt seccomp=unconfined`, or run the job with user namespaces allowed); a chroot forbids it too".into(),
            _ => String::new(),
        },
    }
}

/// Mounts a tmpfs on `dir` (mode 0755), in this namespace.
fn mount_tmpfs(dir: &Path) -> Result<(), RunError> {
    mount(
        Some("nixfs-layer-run"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|errno| RunError::Namespace {
        what: format!("mounting a tmpfs on {}", dir.display()),
        errno,
    })
}

/// Where a lower that is the run's target is bound inside (by its index).
pub const OWN_LOWERS: &str = "/.nixfs-layer-lowers";

/// Whether two paths name one directory (device and inode).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Makes sure each of `paths` exists in this namespace without writing
/// to the host, and that each host directory of `binds` shows at its
/// place inside: a path whose top directory the host lacks, and every
/// bind, are made in a new root (see [`new_root`]); a path below an
/// existing directory must exist.
fn make_room(paths: &[PathBuf], binds: &[(PathBuf, PathBuf)]) -> Result<(), RunError> {
    let mut missing = Vec::new();
    for p in paths {
        if p.exists() {
            continue;
        }
        let top = p.components().take(2).collect::<PathBuf>();
        if top.exists() {
            let parent = p
                .ancestors()
                .find(|a| a.exists())
                .unwrap_or(Path::new("/"))
                .to_owned();
            return Err(RunError::NoRoom {
                path: p.clone(),
                parent,
            });
        }
        missing.push(p.clone());
    }
    if missing.is_empty() && binds.is_empty() {
        return Ok(());
    }
    new_root(&missing, binds)
}

fn ns_err(what: impl Into<String>) -> impl FnOnce(Errno) -> RunError {
    let what = what.into();
    move |errno| RunError::Namespace { what, errno }
}

fn io_ns_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |e| RunError::Namespace {
        what,
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Pivots this namespace into a new root: a tmpfs holding a bind of every
/// top-level entry of the old root (symlinks copied), plus the directories
/// `make` and the host directories of `binds` at their places (as
/// bubblewrap does: the tmpfs is mounted on /tmp, pivoted into with the
/// old root under it, the binds made, then pivoted once more).
fn new_root(make: &[PathBuf], binds: &[(PathBuf, PathBuf)]) -> Result<(), RunError> {
    use nix::unistd::{chdir, pivot_root};
    let cwd = std::env::current_dir().ok();
    let base = Path::new("/tmp");
    mount_tmpfs(base)?;
    let (old, new) = (base.join("oldroot"), base.join("newroot"));
    for d in [&old, &new] {
        std::fs::create_dir(d).map_err(io_ns_err(format!("mkdir {}", d.display())))?;
    }
    chdir(base).map_err(ns_err("chdir to the new root"))?;
    pivot_root(base, &old).map_err(ns_err("pivot_root into a tmpfs"))?;
    chdir("/").map_err(ns_err("chdir /"))?;
    let (old, new) = (Path::new("/oldroot"), Path::new("/newroot"));
    mount(Some(new), new, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(ns_err("binding the new root on itself"))?;
    let entries = std::fs::read_dir(old).map_err(io_ns_err("reading the host's /"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let (from, to) = (old.join(&name), new.join(&name));
        let Ok(meta) = std::fs::symlink_metadata(&from) else {
            continue;
        };
        let made = if meta.file_type().is_symlink() {
            std::fs::read_link(&from).and_then(|l| std::os::unix::fs::symlink(l, &to))
        } else if meta.is_dir() {
            std::fs::create_dir(&to)
        } else if meta.is_file() {
            std::fs::write(&to, b"")
        } else {
            continue;
        };
        made.map_err(io_ns_err(format!("making {}", to.display())))?;
        if !meta.file_type().is_symlink() {
            mount(
                Some(&from),
                &to,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(ns_err(format!(
                "binding the host's /{} in the new root",
                name.to_string_lossy()
            )))?;
        }
    }
    let rel = |p: &Path| p.strip_prefix("/").unwrap_or(p).to_owned();
    for p in make {
        let inside = new.join(rel(p));
        std::fs::create_dir_all(&inside)
            .map_err(io_ns_err(format!("mkdir {}", inside.display())))?;
    }
    for (from, to) in binds {
        let (src, dst) = (old.join(rel(from)), new.join(rel(to)));
        std::fs::create_dir_all(&dst).map_err(io_ns_err(format!("mkdir {}", dst.display())))?;
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(ns_err(format!(
            "binding {} on {} in the new root",
            from.display(),
            to.display()
        )))?;
    }
    chdir(new).map_err(ns_err("chdir to the new root"))?;
    pivot_root(".", ".").map_err(ns_err("pivot_root into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(ns_err("detaching the old root"))?;
    let back = cwd.filter(|c| chdir(c.as_path()).is_ok());
    if back.is_none() {
        chdir("/").map_err(ns_err("chdir /"))?;
    }
    Ok(())
}

/// What Nix needs to run as a single-user store here: as the namespace's
/// root without build users (there are none to switch to).
fn nix_config(mode: Mode) -> Option<OsString> {
    match mode {
        Mode::Root => None,
        Mode::User { .. } => {
            let mut c = std::env::var_os("NIX_CONFIG").unwrap_or_default();
            if !c.is_empty() {
                c.push("\n");
            }
            c.push("build-users-group =");
            Some(c)
        }
    }
}

/// Runs the command and waits for it; TERM and HUP sent to `run` are
/// passed on, and INT and QUIT when a process sent them to `run` itself
/// (the terminal sends them to the command too: those are left to it).
fn run_command(command: &[OsString]) -> Result<u8> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Error::Usage("run needs a command after `--`".into()))?;
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
    ] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| RunError::Namespace {
        what: "blocking signals".into(),
        errno: e,
    })?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    // SAFETY: sigprocmask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut all = SigSet::empty();
            for s in [
                Signal::SIGTERM,
                Signal::SIGHUP,
                Signal::SIGINT,
                Signal::SIGQUIT,
            ] {
                all.add(s);
            }
            all.thread_unblock().map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: program.to_string_lossy().into_owned(),
        source,
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::io(Path::new(program), e))?
        {
            break st;
        }
        // SAFETY: a valid signal set, siginfo buffer and timeout.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigtimedwait(signals.as_ref(), &mut info, &tick) };
        // INT and QUIT from the terminal reach the command itself (it is in
        // the foreground process group): only those a process sent to
        // `run` alone (si_code ≤ 0: kill, sigqueue, tkill) are passed on.
        let sent_to_run = info.si_code <= 0;
        let pass = match sig {
            libc::SIGTERM | libc::SIGHUP => true,
            libc::SIGINT | libc::SIGQUIT => sent_to_run,
            _ => false,
        };
        if pass {
            if let Ok(s) = Signal::try_from(sig) {
                let _ = kill(pid, s);
            }
        }
    };
    let _ = signals.thread_unblock();
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.saturating_add(s as u8),
        _ => 1,
    })
}

/// After the command: the flake tree's server stopped, what Nix
/// registered journalled, the stack unmounted and its record removed (so
/// the upper is free for the next `run` or `mount`). Processes the command
/// left behind keep it busy: then it stays until they end.
fn tear_down(target: &Path) -> Result<()> {
    // The command may have unmounted it itself.
    let Some(mounted) = find_mounted(target)? else {
        return Ok(());
    };
    let _lock = lock_upper(&mounted.upper)?;
    journal::catch_up(&mounted.upper, &mounted.record.lowers);
    // A build's processes may take a moment to go; processes the command
    // left running keep the stack (in this namespace, which ends with
    // them): say so once, tear nothing down.
    match lifecycle::wait_until_unused(&mounted, Some(Duration::from_secs(1))) {
        Err(Error::Mount(overlay::MountError::InUse { holders, .. })) => {
            eprintln!(
                "nixfs-layer: run: {holders} still use {}: the stack stays in the run's namespace until they end, then the upper is free",
                target.display()
            );
            return Ok(());
        }
        other => other?,
    }
    lifecycle::unmount_stack(&mounted, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagnosis with these sysctls set (the others absent, as on a
    /// kernel without them).
    fn refused(errno: Errno, set: &[(&str, &str)]) -> String {
        let set: Vec<(String, String)> = set
            .iter()
            .map(|(k, v)| (format!("/proc/sys/{k}"), v.to_string()))
            .collect();
        let read = move |p: &str| set.iter().find(|(k, _)| k == p).map(|(_, v)| v.clone());
        userns_refused(errno, &read).to_string()
    }

    #[test]
    fn each_disabling_setting_is_named_with_its_fix() {
        let e = refused(Errno::EPERM, &[("kernel/unprivileged_userns_clone", "0")]);
        assert!(e.contains("(kernel.unprivileged_userns_clone = 0)"), "{e}");
        assert!(
            e.contains("sysctl -w kernel.unprivileged_userns_clone=1"),
            "{e}"
        );
        let e = refused(Errno::ENOSPC, &[("user/max_user_namespaces", "0")]);
        assert!(e.contains("(user.max_user_namespaces = 0)"), "{e}");
        assert!(
            e.contains("sysctl -w user.max_user_namespaces=15000"),
            "{e}"
        );
        let e = refused(
            Errno::EPERM,
            &[
                ("user/max_user_namespaces", "15000"),
                ("kernel/apparmor_restrict_unprivileged_userns", "1"),
            ],
        );
        assert!(
            e.contains("kernel.apparmor_restrict_unprivileged_userns = 1"),
            "{e}"
        );
        let e = refused(Errno::ENOSPC, &[("user/max_user_namespaces", "12")]);
        assert!(
            e.contains("the limit user.max_user_namespaces (12) is reached"),
            "{e}"
        );
        let e = refused(Errno::EPERM, &[("user/max_user_namespaces", "15000")]);
        assert!(e.contains("seccomp"), "{e}");
    }
}
