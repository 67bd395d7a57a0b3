//! `nixfs-layer umount [--target DIR] [--wait SECONDS]`: see
//! `stack::lifecycle::unmount`.

use std::time::Duration;

use crate::cli::UmountArgs;
use crate::config::Config;
use crate::error::Result;
use crate::stack::lifecycle;

use super::resolve_target;

pub fn run(args: &UmountArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    lifecycle::unmount(&target, args.wait.map(Duration::from_secs))?;
    eprintln!("unmounted {}", target.display());
    Ok(())
}
