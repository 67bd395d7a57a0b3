//! `nixfs-layer mount --lower DIR… --upper DIR [--target DIR]`
//!
//! Order matters for "no half-made mounts": everything is checked and the
//! merged database is brought up to date before the first mount call, and a
//! failure after it unmounts what was already mounted.

use std::path::{Path, PathBuf};

use crate::cli::MountArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer::Stack;
use crate::overlay::{self, MountError};
use crate::pathdb::merge::{self, Needed, SyncOptions};

use super::{lock_upper, resolve_target, MountRecord, Progress};

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
    check_target_free(&target, &stack)?;

    let _lock = lock_upper(&stack.upper)?;
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
    tracing::info!(%summary, "merged database up to date");
    for p in &summary.broken {
        eprintln!("nixfs-layer: warning: {p} left the lowers but upper paths need it; its content is missing (see `nixfs-layer verify`)");
    }

    let store = target.join("store");
    let var = target.join("var");
    for d in [&store, &var] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }
    let mut guard = MountGuard::default();
    overlay::mount_overlay(&stack.lowers, &stack.upper, &store)?;
    guard.0.push(store.clone());
    overlay::bind(&stack.upper.var(), &var)?;
    guard.0.push(var.clone());

    let record = MountRecord {
        target: target.clone(),
        lowers: stack.lowers.iter().map(|l| l.dir().to_owned()).collect(),
    };
    let rec_path = stack.upper.mount_record();
    let json = serde_json::to_vec_pretty(&record).expect("mount record serialises");
    std::fs::write(&rec_path, json).map_err(|source| Error::Io {
        path: rec_path.clone(),
        source,
    })?;
    guard.0.clear();
    if !args.no_flake_fs && config.flakefs.enable.unwrap_or(true) {
        tracing::debug!("the /nixfs/flake tree is not served by this build");
    }
    if !quiet {
        eprintln!(
            "mounted {} lower(s) and upper {} at {} ({summary})",
            stack.lowers.len(),
            stack.upper.dir().display(),
            target.display()
        );
    }
    Ok(())
}

/// Refuses a target that already has something mounted where we would mount,
/// and an upper that already serves another mount.
fn check_target_free(target: &Path, stack: &Stack) -> Result<()> {
    let mounts = overlay::mounts()?;
    for sub in ["store", "var"] {
        let p = target.join(sub);
        if overlay::mount_at(&mounts, &p).is_some() {
            return Err(MountError::AlreadyMounted(p, target.to_owned()).into());
        }
    }
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
#[derive(Default)]
struct MountGuard(Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            if let Err(e) = overlay::unmount(p) {
                tracing::error!(path = %p.display(), error = %e, "could not undo a mount after a failure");
            }
        }
    }
}
