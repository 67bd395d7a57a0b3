//! `nixfs-layer flakefs [--mountpoint DIR] [--target DIR] [--foreground]`

use std::path::{Path, PathBuf};

use crate::cli::FlakeFsArgs;
use crate::config::Config;
use crate::error::Result;
use crate::flakefs::daemon::{self, ServeOptions};
use crate::flakefs::{log_file, serve_args, DEFAULT_MOUNTPOINT};
use crate::overlay;

use super::resolve_target;

pub fn run(args: &FlakeFsArgs) -> Result<()> {
    let config = Config::load(args.config.config.as_deref())?;
    let target = resolve_target(args.target.as_deref(), &config)?;
    let mountpoint = mountpoint(args.mountpoint.as_deref(), &config);
    overlay::check_privileges("flakefs")?;
    let opts = ServeOptions {
        mountpoint: mountpoint.clone(),
        target: target.clone(),
        config: config.flakefs.clone(),
    };
    if args.foreground {
        daemon::serve(&opts)?;
        return Ok(());
    }
    let pid = daemon::spawn(
        &serve_args(&mountpoint, &target, args.config.config.as_deref()),
        &mountpoint,
        &log_file(&target),
    )?;
    eprintln!(
        "flake tree mounted at {} for the store at {} (server pid {pid}; `umount {}` stops it)",
        mountpoint.display(),
        target.display(),
        mountpoint.display()
    );
    Ok(())
}

/// The flag, else the config, else `/nixfs`.
pub fn mountpoint(flag: Option<&Path>, config: &Config) -> PathBuf {
    flag.map(Path::to_owned)
        .or_else(|| config.flakefs.mountpoint.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNTPOINT))
}
