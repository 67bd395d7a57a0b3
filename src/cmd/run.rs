//! `nixfs-layer run [--lower DIR…] [--upper DIR] [--target DIR] -- CMD…`:
//! the options from the flags and the config, then `stack::run`.

use crate::cli::RunArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::stack::lifecycle::{FlakeTree, MountOptions};
use crate::stack::run::{self, Mode};

use super::mount::{mounted_line, warn_merge};
use super::{flakefs, resolve_target};

/// Runs the command; returns its exit status.
pub fn run(args: &RunArgs, quiet: bool) -> Result<u8> {
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
        .ok_or_else(|| Error::Usage("run needs --upper DIR (or `upper` in the config)".into()))?;
    let target = resolve_target(args.target.as_deref(), &config)?;
    let flake = !args.no_flake_fs && config.flakefs.enable.unwrap_or(true);
    let opts = MountOptions {
        lowers,
        upper,
        target,
        flake_tree: flake.then(|| FlakeTree {
            mountpoint: flakefs::mountpoint(args.flake_mount.as_deref(), &config),
            config_file: args.config.config.clone(),
            config: config.flakefs.clone(),
        }),
        foreground: false,
    };
    // No spinner: its thread would keep the process from entering a
    // namespace (run::enter needs a single thread).
    let session = run::enter(&opts, None)?;
    if let Some(why) = session.flake_tree_skipped.as_ref().filter(|_| !quiet) {
        eprintln!("nixfs-layer: the flake tree is not mounted: {why}");
    }
    // Stdout is the command's: what was mounted goes to stderr.
    warn_merge(&session.mounting.summary);
    if !quiet {
        eprintln!("{}", mounted_line(&session.mounting));
        if let Mode::User { uid, .. } = session.mode {
            eprintln!(
                "in a user namespace: uid {uid} is root here, Nix runs single-user (build-users-group empty)"
            );
        }
    }
    session.exec(&args.command)
}
