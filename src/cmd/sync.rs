//! `nixfs-layer sync [--target DIR]`

use crate::cli::SyncArgs;
use crate::config::Config;
use crate::error::Result;
use crate::overlay;
use crate::pathdb::merge::{self, SyncOptions};

use super::{lock_upper, require_mounted, resolve_target, Progress};

pub fn run(args: &SyncArgs, quiet: bool) -> Result<()> {
    let args_target = &args.target;
    let config = Config::load(args_target.config.config.as_deref())?;
    let target = resolve_target(args_target.target.as_deref(), &config)?;
    overlay::check_privileges("sync")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let lowers = mounted.lowers()?;
    let progress = Progress::new(quiet, "syncing lower databases");
    let phase = |p: &str| progress.phase(p);
    let summary = merge::sync(
        &mounted.upper,
        &lowers,
        &SyncOptions {
            force: args.force,
            progress: Some(&phase),
            mounted_store: Some(&mounted.store()),
            ..Default::default()
        },
    )?;
    drop(progress);
    if summary.changed() {
        // Drop the overlay's cached (possibly negative) entries for lower paths.
        overlay::refresh(&mounted.store())?;
    }
    if !quiet {
        println!("sync: {summary}");
    }
    Ok(())
}
