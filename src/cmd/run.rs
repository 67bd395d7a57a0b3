//! `nixfs-layer run [--lower DIR…] [--upper DIR] [--target DIR] -- CMD…`:
//! the options from the flags and the config, then `stack::run`.

use crate::cli::RunArgs;
use crate::error::Result;
use crate::stack::run::{self, Mode};

use super::mount::{mount_options, mounted_line, warn_merge, StackFlags};

/// Runs the command; returns its exit status.
pub fn run(args: &RunArgs, quiet: bool) -> Result<u8> {
    let opts = mount_options(
        "run",
        &StackFlags {
            lowers: &args.lowers,
            upper: args.upper.as_deref(),
            target: args.target.as_deref(),
            no_flake_fs: args.no_flake_fs,
            flake_mount: args.flake_mount.as_deref(),
            config: args.config.config.as_deref(),
        },
        false,
    )?;
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
