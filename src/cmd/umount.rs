//! `nixfs-layer umount [--target DIR]`

use crate::cli::TargetArgs;
use crate::config::Config;
use crate::error::Result;
use crate::flakefs::daemon;
use crate::overlay;

use super::{lock_upper, require_mounted, resolve_target};

pub fn run(args: &TargetArgs) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let target = resolve_target(args.target.as_deref(), &config)?;
    overlay::check_privileges("umount")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    // First the flake tree: its server keeps the store's database open.
    if let Some(f) = &mounted.record.flakefs {
        daemon::stop(Some(f.pid), &f.mountpoint)?;
    }
    let var = target.join("var");
    let store = mounted.store();
    let mounts = overlay::mounts()?;
    let var_is_ours = overlay::mount_at(&mounts, &var).is_some();
    if var_is_ours {
        overlay::unmount(&var)?;
    }
    if let Err(e) = overlay::unmount(&store) {
        // Leave things as they were: put the state back.
        if var_is_ours {
            overlay::bind(&mounted.upper.var(), &var)?;
        }
        return Err(e.into());
    }
    let _ = std::fs::remove_file(mounted.upper.mount_record());
    eprintln!("unmounted {}", target.display());
    Ok(())
}
