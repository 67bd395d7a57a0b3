//! `nixfs-layer mount --lower DIR… --upper DIR [--target DIR]`
//!
//! Order matters for "no half-made mounts": everything is checked and the
//! merged database is brought up to date before the first mount call, and a
//! failure after it unmounts what was already mounted. The flake tree comes
//! last: `mount` returns once its server has it mounted (or, with
//! `--foreground`, serves it itself).

use std::path::{Path, PathBuf};

use crate::cli::MountArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flakefs::daemon::{self, ServeOptions};
use crate::flakefs::log_file;
use crate::layer::{self, Lower, Stack};
use crate::overlay::{self, MountError};
use crate::pathdb::merge::{self, Needed, SyncOptions};
use crate::pathdb::{health, keep};

use super::flakefs;
use super::{resolve_target, Progress};
use crate::stack::{lock_upper, FlakeFsRecord, MountRecord};

pub fn run(args: &MountArgs, quiet: bool) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let lowers = if args.lowers.is_empty() {
        config.lowers.clone()
    } else {
        args.lowers.clone()
    };
    let upper = args
        .upper
        .clone()
        .or_else(|| config.upper.clone())
        .ok_or_else(|| Error::Usage("mount needs --upper DIR (or `upper` in the config)".into()))?;
    let target = resolve_target(args.target.as_deref(), &config)?;

    overlay::check_privileges("mount")?;
    overlay::check_overlay_available()?;
    let stack = Stack::open(&lowers, &upper)?;
    layer::check_target(&target, &stack.lowers, &stack.upper)?;
    // The locks first (target, then upper, always in that order): two
    // mounts racing on one upper or one target must not both find it free;
    // the second waits, then finds it mounted.
    let _target_lock = crate::stack::lock_target(&target)?;
    let _lock = lock_upper(&stack.upper)?;
    check_target_free(&target, &stack)?;
    // A damaged merged database is refused before anything is written or
    // mounted (Nix would go on writing into it).
    health::quick_check(&stack.upper.db())?;
    // A switch to new lowers cut short: its verified copies become the
    // upper's, whichever lowers are mounted now.
    let finished = keep::finish_switch(&stack.upper)?;
    if !finished.is_empty() {
        tracing::warn!(
            count = finished.len(),
            "finished an interrupted `sync --lower`: the paths it had copied are the upper's now"
        );
    }

    let progress = Progress::new(quiet, "merging lower databases");
    let phase = |p: &str| progress.phase(p);
    let summary = merge::sync(
        &stack.upper,
        &stack.lowers,
        &SyncOptions {
            // The lower may have lost paths while nothing was mounted (a
            // template updated while its AppVM was off): mount anyway and
            // report what broke; `verify` lists it.
            needed: Needed::KeepBroken,
            progress: Some(&phase),
            ..Default::default()
        },
    )?;
    drop(progress);
    crate::failpoint::hit("mount:merged");
    tracing::info!(%summary, "merged database up to date");
    for p in &summary.broken {
        eprintln!("nixfs-layer: warning: {p} left the lowers but upper paths need it; its content is missing (see `nixfs-layer verify`)");
    }
    super::warn_vanished(&summary);

    let store = target.join("store");
    let var = target.join("var");
    for d in [&store, &var] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }
    // The record goes first, so that whatever is mounted from here on can
    // always be found and undone by `umount`, even if this process is killed.
    let mut record = MountRecord {
        target: target.clone(),
        lowers: stack.lowers.iter().map(|l| l.dir().to_owned()).collect(),
        lower_ids: stack
            .lowers
            .iter()
            .map(Lower::identity)
            .collect::<Result<_, _>>()?,
        flakefs: None,
    };
    let rec_path = stack.upper.mount_record();
    write_record(&rec_path, &record)?;
    crate::failpoint::hit("mount:recorded");
    let mut guard = MountGuard {
        mounts: Vec::new(),
        record: Some(rec_path.clone()),
    };
    overlay::mount_overlay(&stack.lowers, &stack.upper, &store)?;
    guard.mounts.push(store.clone());
    crate::failpoint::hit("mount:overlay");
    overlay::bind(&stack.upper.var(), &var)?;
    guard.mounts.push(var.clone());
    crate::failpoint::hit("mount:var");
    let flake = !args.no_flake_fs && config.flakefs.enable.unwrap_or(true);
    let mountpoint = flakefs::mountpoint(args.flake_mount.as_deref(), &config);
    let mut serve_here = None;
    if flake && args.foreground {
        record.flakefs = Some(FlakeFsRecord {
            pid: std::process::id(),
            mountpoint: mountpoint.clone(),
        });
        serve_here = Some(ServeOptions {
            mountpoint: mountpoint.clone(),
            target: target.clone(),
            config: config.flakefs.clone(),
        });
    } else if flake {
        let spawned = daemon::spawn(
            &flakefs::serve_args(&mountpoint, &target, args.config.config.as_deref()),
            &mountpoint,
            &log_file(&target),
        );
        match spawned {
            Ok(pid) => {
                crate::failpoint::hit("mount:server");
                record.flakefs = Some(FlakeFsRecord {
                    pid,
                    mountpoint: mountpoint.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    write_record(&rec_path, &record)?;
    guard.disarm();
    drop(_target_lock);
    crate::failpoint::hit("mount:done");
    if !quiet {
        eprintln!(
            "mounted {} lower(s) and upper {} at {} ({summary}){}",
            stack.lowers.len(),
            stack.upper.dir().display(),
            target.display(),
            if flake {
                format!("; flake tree at {}", mountpoint.display())
            } else {
                String::new()
            }
        );
    }
    if let Some(opts) = serve_here {
        // `umount` takes the upper's lock: let go of it while serving.
        drop(_lock);
        daemon::serve(&opts)?;
        // Stopped by a signal (a service manager's stop) or by `umount`:
        // either way leave nothing mounted. `umount` holds the lock while it
        // works, so after it there is nothing left to do here.
        crate::sdnotify::notify("STOPPING=1");
        stop_here(&stack, &target)?;
    } else if args.foreground {
        // No tree to serve: wait for a stop, then unmount.
        drop(_lock);
        wait_for_stop(&stack, &target)?;
    }
    Ok(())
}

/// `mount --foreground` without the flake tree: ready now; on SIGTERM,
/// SIGINT or SIGHUP unmount and return; if `umount` unmounted the stack
/// meanwhile, return as well.
fn wait_for_stop(stack: &Stack, target: &Path) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| Error::Io {
        path: target.to_owned(),
        source: e.into(),
    })?;
    crate::sdnotify::notify("READY=1");
    let half_second = libc::timespec {
        tv_sec: 0,
        tv_nsec: 500_000_000,
    };
    loop {
        // SAFETY: a valid signal set and timeout; no siginfo wanted.
        let sig =
            unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &half_second) };
        if sig > 0 {
            break;
        }
        if crate::stack::find_mounted(target)?.is_none() {
            return Ok(());
        }
    }
    crate::sdnotify::notify("STOPPING=1");
    stop_here(stack, target)
}

/// After a foreground mount stopped serving: unmount what is left, unless
/// `umount` is at work (it holds the lock and waits for this process).
fn stop_here(stack: &Stack, target: &Path) -> Result<()> {
    let Some(_lock) = crate::stack::try_lock_upper(&stack.upper)? else {
        return Ok(());
    };
    if let Some(m) = crate::stack::find_mounted(target)? {
        super::umount::unmount_stack(&m, false)?;
    }
    Ok(())
}

fn write_record(rec_path: &Path, record: &MountRecord) -> Result<()> {
    record.write(rec_path)
}

/// Refuses a target that already has something mounted where we would mount,
/// and an upper that already serves another mount.
fn check_target_free(target: &Path, stack: &Stack) -> Result<()> {
    let mounts = overlay::mounts()?;
    for lower in &stack.lowers {
        overlay::check_lower_sees_target(&mounts, lower.dir(), target)?;
    }
    for sub in ["store", "var"] {
        let p = target.join(sub);
        if overlay::mount_at(&mounts, &p).is_some() {
            return Err(MountError::AlreadyMounted(p, target.to_owned()).into());
        }
    }
    overlay::check_not_held_elsewhere(&stack.upper)?;
    let upper_store = stack.upper.store();
    if let Some(m) = mounts.iter().find(|m| {
        m.fs_type == "overlay"
            && m.option("upperdir").map(PathBuf::from).as_deref() == Some(&upper_store)
    }) {
        return Err(MountError::UpperInUse {
            upper: stack.upper.dir().to_owned(),
            at: m.mount_point.clone(),
        }
        .into());
    }
    Ok(())
}

/// Unmounts (in reverse) whatever it still lists when dropped.
struct MountGuard {
    mounts: Vec<PathBuf>,
    record: Option<PathBuf>,
}

impl MountGuard {
    /// Everything went well: keep the mounts and the record.
    fn disarm(&mut self) {
        self.mounts.clear();
        self.record = None;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for p in self.mounts.iter().rev() {
            if let Err(e) = overlay::unmount(p) {
                tracing::error!(path = %p.display(), error = %e, "could not undo a mount after a failure");
            }
        }
        if let Some(r) = &self.record {
            let _ = std::fs::remove_file(r);
        }
    }
}
