//! `nixfs-layer mount --lower DIR… --upper DIR [--target DIR]`: the
//! options from the flags and the config, then `stack::lifecycle::mount`.

use std::path::Path;

use serde::Serialize;

use crate::cli::MountArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pathdb::merge::SyncSummary;
use crate::stack::lifecycle::{self, FlakeTree, MountOptions};

use super::{flakefs, resolve_target, Progress};

pub fn run(args: &MountArgs, quiet: bool) -> Result<()> {
    let opts = mount_options(
        "mount",
        &StackFlags {
            lowers: &args.lowers,
            upper: args.upper.as_deref(),
            target: args.target.as_deref(),
            no_flake_fs: args.no_flake_fs,
            flake_mount: args.flake_mount.as_deref(),
            config: args.config.config.as_deref(),
        },
        args.foreground,
    )?;
    let progress = Progress::new(quiet, "merging lower databases");
    let phase = |p: &str| progress.phase(p);
    let mounting = lifecycle::mount(&opts, Some(&phase))?;
    drop(progress);
    warn_hidden_sockets(&mounting);
    if args.json {
        warn_merge(&mounting.summary);
        super::print_json(&mounted_doc(&mounting, None));
    } else {
        print_mounted(&mounting, quiet);
    }
    mounting.serve()
}

/// The flags that name a stack (`mount`'s and `run`'s).
pub struct StackFlags<'a> {
    pub lowers: &'a [std::path::PathBuf],
    pub upper: Option<&'a Path>,
    pub target: Option<&'a Path>,
    pub no_flake_fs: bool,
    pub flake_mount: Option<&'a Path>,
    pub config: Option<&'a Path>,
}

/// What to mount: the flags over the config file over the defaults.
pub fn mount_options(command: &str, f: &StackFlags<'_>, foreground: bool) -> Result<MountOptions> {
    let config = Config::load(f.config)?;
    let lowers = if f.lowers.is_empty() {
        config.lowers.clone()
    } else {
        f.lowers.to_vec()
    };
    let upper = f
        .upper
        .map(Path::to_owned)
        .or_else(|| config.upper.clone())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{command} needs --upper DIR (or `upper` in the config)"
            ))
        })?;
    let target = resolve_target(f.target, &config)?;
    let flake = !f.no_flake_fs && config.flakefs.enable.unwrap_or(true);
    Ok(MountOptions {
        lowers,
        upper,
        target,
        flake_tree: flake.then(|| FlakeTree {
            mountpoint: flakefs::mountpoint(f.flake_mount, &config),
            config_file: f.config.map(Path::to_owned),
            config: config.flakefs.clone(),
        }),
        foreground,
    })
}

/// `mount --json`'s document (and `sync --lower --json`'s, with `kept`).
#[derive(Serialize)]
pub struct MountedDoc<'a> {
    format: u32,
    target: &'a Path,
    upper: &'a Path,
    lowers: Vec<&'a Path>,
    summary: &'a SyncSummary,
    finished_switch: usize,
    flake_tree: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept: Option<&'a [String]>,
}

pub fn mounted_doc<'a>(m: &'a lifecycle::Mounting, kept: Option<&'a [String]>) -> MountedDoc<'a> {
    MountedDoc {
        format: 1,
        target: &m.target,
        upper: m.stack.upper.dir(),
        lowers: m.stack.lowers.iter().map(|l| l.dir()).collect(),
        summary: &m.summary,
        finished_switch: m.finished_switch,
        flake_tree: m.flake_mountpoint.as_deref(),
        kept,
    }
}

/// A warning for each listening socket the mount covered: a nix-daemon
/// (or systemd's socket for it) started before the mount serves nobody.
pub fn warn_hidden_sockets(m: &lifecycle::Mounting) {
    for h in &m.hidden_sockets {
        let who = h
            .holders
            .iter()
            .map(|h| format!("{} (pid {})", h.command, h.pid))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "nixfs-layer: warning: {who} listens on {} from before the mount, which now covers it: clients find the stack's {} there and cannot connect; restart it now (systemctl restart nix-daemon.socket nix-daemon.service), and order it after nixfs-layer",
            h.path.display(),
            m.target.join("var").display()
        );
    }
}

/// The warnings of a merge: paths the upper needs that left the lowers,
/// lower paths whose store entry vanished.
pub fn warn_merge(summary: &SyncSummary) {
    for p in &summary.broken {
        eprintln!("nixfs-layer: warning: {p} left the lowers but upper paths need it; its content is missing (see `nixfs-layer verify`)");
    }
    super::warn_vanished(summary);
}

/// The warnings of a mount's merge, and (unless `quiet`) what was mounted,
/// on stdout.
pub fn print_mounted(m: &lifecycle::Mounting, quiet: bool) {
    warn_merge(&m.summary);
    if !quiet {
        println!("{}", mounted_line(m));
    }
}

/// The one line that says what was mounted.
pub fn mounted_line(m: &lifecycle::Mounting) -> String {
    format!(
        "mounted {} lower(s) and upper {} at {} ({}){}",
        m.stack.lowers.len(),
        m.stack.upper.dir().display(),
        m.target.display(),
        m.summary,
        match &m.flake_mountpoint {
            Some(mp) => format!("; flake tree at {}", mp.display()),
            None => String::new(),
        }
    )
}
