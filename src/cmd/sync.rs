//! `nixfs-layer sync [--target DIR] [--force]`, and switching to a new
//! lower generation: `sync --lower NEWDIR… [--keep-needed]`.

use std::path::PathBuf;

use crate::cli::{ConfigArg, MountArgs, SyncArgs, TargetArgs, UmountArgs};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer::{self, Lower, Stack};
use crate::overlay::{self, MountError};
use crate::pathdb::merge::{self, SyncOptions};
use crate::pathdb::{self, keep, ClosureBroken, DbError};
use crate::storecopy::{self, CopyError};
use crate::storepath::base_name;

use super::{resolve_target, Progress};
use crate::stack::{lock_upper, require_mounted, Mounted};

pub fn run(args: &SyncArgs, quiet: bool) -> Result<()> {
    let args_target = &args.target;
    let config = Config::load(args_target.config.config.as_deref())?;
    let target = resolve_target(args_target.target.as_deref(), &config)?;
    overlay::check_privileges("sync")?;
    let mounted = require_mounted(&target)?;
    if !args.lowers.is_empty() {
        return switch_lowers(args, &mounted, quiet);
    }
    let _lock = lock_upper(&mounted.upper)?;
    if !overlay::is_sealed(&mounted.upper) {
        // A mount killed between its mount call and the seal.
        overlay::seal(&mounted.upper)?;
        tracing::warn!(upper = %mounted.upper.dir().display(), "the overlay was not sealed; sealed it");
    }
    let lowers = mounted.lowers()?;
    remount_if_replaced(&mounted, &lowers, quiet)?;
    let progress = Progress::new(quiet, "syncing lower databases");
    let phase = |p: &str| progress.phase(p);
    let summary = merge::sync(
        &mounted.upper,
        &lowers,
        &SyncOptions {
            force: args.force,
            progress: Some(&phase),
            mounted_store: Some(&mounted.store()),
            check_before_changes: true,
            ..Default::default()
        },
    )?;
    drop(progress);
    super::warn_vanished(&summary);
    if summary.changed() {
        // Drop the overlay's cached (possibly negative) entries for lower paths.
        overlay::refresh(&mounted.store())?;
    }
    if !quiet {
        println!("sync: {summary}");
    }
    Ok(())
}

/// A lower directory replaced under the mount (a new tree renamed into
/// place): the overlay still shows the old one, perhaps deleted by now, so
/// `TARGET/store` is mounted afresh, onto what the lowers' paths are now,
/// before the merge reads their databases. Busy: refused, nothing changed.
fn remount_if_replaced(mounted: &Mounted, lowers: &[Lower], quiet: bool) -> Result<()> {
    let replaced = mounted.replaced_lowers();
    let Some(first) = replaced.first() else {
        return Ok(());
    };
    let store = mounted.store();
    overlay::mount_afresh(lowers, &mounted.upper, &store).map_err(|e| match e {
        MountError::Busy(_) => MountError::ReplacedBusy {
            lower: first.dir.clone(),
            store: store.clone(),
        },
        e => e,
    })?;
    let mut record = mounted.record.clone();
    record.lower_ids = lowers
        .iter()
        .map(Lower::identity)
        .collect::<Result<_, _>>()?;
    record.write(&mounted.upper.mount_record())?;
    for r in &replaced {
        tracing::info!(lower = %r.dir.display(), was = %r.was, now = ?r.now.map(|n| n.to_string()), "lower replaced under the mount");
        if !quiet {
            eprintln!(
                "sync: lower {} was replaced since it was mounted; mounted {} afresh on the new one",
                r.dir.display(),
                store.display()
            );
        }
    }
    Ok(())
}

/// Moves the mounted stack to new lowers. While the old lowers are still
/// mounted, the paths the upper needs (closures of its own paths and of the
/// GC roots) that the new lowers lack are copied into a staging directory
/// and checked against their NAR hashes; then the stack is unmounted, the
/// copies become upper paths, and it is mounted again with the new lowers.
/// Nothing else is copied. Without `--keep-needed`, such paths make the
/// switch fail before anything changes.
fn switch_lowers(args: &SyncArgs, mounted: &Mounted, quiet: bool) -> Result<()> {
    let upper = &mounted.upper;
    let lock = lock_upper(upper)?;
    // Refused before the old stack is unmounted: mount would refuse it then.
    pathdb::health::quick_check(&upper.db())?;
    let new = Stack::open(&args.lowers, upper.dir())?;
    layer::check_target(&mounted.target, &new.lowers, upper)?;
    let conn = pathdb::open(&upper.db())?;
    let needed = keep::needed(&conn, upper)?;
    let missing = keep::missing_from(&new.lowers, &upper.tmp_dir(), &needed)?;
    drop(conn);
    if !missing.is_empty() && !args.keep_needed {
        return Err(DbError::ClosureBroken(ClosureBroken {
            total: missing.len(),
            needed: missing
                .iter()
                .take(10)
                .map(|n| (n.path.clone(), n.needed_by.clone()))
                .collect(),
        })
        .into());
    }

    // Copy what is missing, through the merged view, and check it. A
    // journal left by a switch killed before it unmounted (the stack is
    // still on its old lowers) is dropped with its copies.
    let staging = keep::staging_dir(upper);
    keep::abandon_switch(upper);
    let io = |path: PathBuf| move |source| Error::io(&path, source);
    std::fs::create_dir_all(&staging).map_err(io(staging.clone()))?;
    for n in &missing {
        let base = base_name(&n.path);
        let (src, dst) = (mounted.store().join(base), staging.join(base));
        if let Err(e) = storecopy::copy_verified(&src, &dst, &n.nar_hash) {
            keep::abandon_switch(upper);
            return Err(match e {
                CopyError::Mismatch {
                    expected, actual, ..
                } => Error::Io {
                    path: src,
                    source: std::io::Error::other(format!(
                        "its contents do not match its recorded hash {expected} (got {actual}); nothing was switched, run `nixfs-layer verify --check-contents`"
                    )),
                },
                CopyError::Read { path, source } | CopyError::Write { path, source } => {
                    Error::io(&path, source)
                }
            });
        }
    }
    crate::failpoint::hit("sync-lower:copied");
    let kept: Vec<String> = missing.iter().map(|n| n.path.clone()).collect();
    // From here on the copies are good: whatever stops this process, the
    // next mount of this upper makes them the upper's (keep::finish_switch).
    keep::begin_switch(upper, &kept)?;
    crate::failpoint::hit("sync-lower:journaled");

    // Unmount, make the copies the upper's, mount with the new lowers.
    let flake_mount = mounted
        .record
        .flakefs
        .as_ref()
        .map(|f| f.mountpoint.clone());
    let old_lowers = mounted.record.lowers.clone();
    drop(lock);
    let target_args = TargetArgs {
        target: Some(mounted.target.clone()),
        config: ConfigArg {
            config: args.target.config.config.clone(),
        },
    };
    let umount_args = UmountArgs {
        target: target_args,
        wait: None,
    };
    if let Err(e) = super::umount::run(&umount_args) {
        // Still on the old lowers: nothing to finish.
        keep::abandon_switch(upper);
        return Err(e);
    }
    let mount_args = |lowers: Vec<PathBuf>| MountArgs {
        lowers,
        upper: Some(upper.dir().to_owned()),
        target: Some(mounted.target.clone()),
        no_flake_fs: flake_mount.is_none(),
        flake_mount: flake_mount.clone(),
        foreground: false,
        config: ConfigArg {
            config: args.target.config.config.clone(),
        },
    };
    // From here on nothing is mounted: whatever fails, put the old stack
    // back rather than leave the target empty. Copies already moved into
    // the upper hold the same bytes as the old lowers' paths; `verify
    // --repair` tidies them.
    let restore = |e: Error| -> Error {
        match super::mount::run(&mount_args(old_lowers.clone()), true) {
            Ok(()) => {
                tracing::warn!(target = %mounted.target.display(), "the switch failed; the old lowers are mounted again")
            }
            Err(back) => {
                tracing::error!(error = %back, target = %mounted.target.display(), "the switch failed and the old lowers could not be mounted again either; nothing is mounted there")
            }
        }
        e
    };
    crate::failpoint::hit("sync-lower:unmounted");
    let adopted = (|| -> Result<()> {
        let _lock = lock_upper(upper)?;
        keep::finish_switch(upper)?;
        Ok(())
    })();
    adopted.map_err(restore)?;
    crate::failpoint::hit("sync-lower:adopted");
    if !quiet && !kept.is_empty() {
        eprintln!(
            "kept {} path(s) the upper needs and the new lowers lack: {}",
            kept.len(),
            kept.join(", ")
        );
    }
    super::mount::run(&mount_args(args.lowers.clone()), quiet).map_err(restore)
}
