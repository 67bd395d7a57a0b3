//! `nixfs-layer sync [--target DIR]`

use crate::cli::TargetArgs;
use crate::config::Config;
use crate::error::Result;
use crate::overlay;
use crate::pathdb::merge;

use super::{lock_upper, require_mounted, resolve_target};

pub fn run(args: &TargetArgs) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let target = resolve_target(args.target.as_deref(), &config)?;
    overlay::check_privileges("sync")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let lowers = mounted.lowers()?;
    let summary = merge::sync(&mounted.upper, &lowers)?;
    if summary.changed() {
        // Drop the overlay's cached (possibly negative) entries for lower paths.
        overlay::refresh(&mounted.store())?;
    }
    println!("sync: {summary}");
    Ok(())
}
