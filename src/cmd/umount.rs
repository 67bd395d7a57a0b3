//! `nixfs-layer umount [--target DIR]`

use crate::cli::TargetArgs;
use crate::config::Config;
use crate::error::Result;
use crate::flakefs::daemon;
use crate::pathdb::journal;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::overlay::{self, MountError};

use super::{lock_upper, require_mounted, resolve_target, Mounted};

pub fn run(args: &TargetArgs) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let target = resolve_target(args.target.as_deref(), &config)?;
    overlay::check_privileges("umount")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    // What Nix registered since the last sync goes into the journal that
    // `verify --repair` would rebuild a damaged database from.
    journal::catch_up(&mounted.upper, &mounted.record.lowers);
    unmount_stack(&mounted, true)?;
    eprintln!("unmounted {}", target.display());
    Ok(())
}

/// Unmounts a stack (the caller holds the upper's lock): the flake tree
/// first when `stop_tree` (its server keeps the store's database open),
/// then the state bind and the overlay; if the overlay is busy, the state
/// is bound again so nothing is left half-unmounted.
pub fn unmount_stack(mounted: &Mounted, stop_tree: bool) -> Result<()> {
    if let (true, Some(f)) = (stop_tree, &mounted.record.flakefs) {
        daemon::stop(Some(f.pid), &f.mountpoint)?;
    }
    let var = mounted.target.join("var");
    let store = mounted.store();
    let mounts = overlay::mounts()?;
    let var_is_ours = overlay::mount_at(&mounts, &var).is_some();
    if var_is_ours {
        unmount_settling(&var)?;
    }
    if let Err(e) = unmount_settling(&store) {
        // Leave things as they were: put the state back.
        if var_is_ours {
            overlay::bind(&mounted.upper.var(), &var)?;
        }
        return Err(e.into());
    }
    let _ = std::fs::remove_file(mounted.upper.mount_record());
    Ok(())
}

/// Unmounts `target`, retrying EBUSY for a moment: processes that just
/// exited (the flake tree's server) can hold it briefly after they are gone.
fn unmount_settling(target: &Path) -> Result<(), MountError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match overlay::unmount(target) {
            Err(MountError::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r,
        }
    }
}
