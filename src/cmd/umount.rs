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
    match lifecycle::unmount(
        &target,
        args.wait.map(Duration::from_secs),
        config.upper.as_deref(),
    )? {
        lifecycle::Unmounted::Stack => eprintln!("unmounted {}", target.display()),
        lifecycle::Unmounted::StaleRecord(upper) => eprintln!(
            "nothing was mounted at {}; cleared the record an interrupted command had left in upper {}",
            target.display(),
            upper.display()
        ),
    }
    Ok(())
}
