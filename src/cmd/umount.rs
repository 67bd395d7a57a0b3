//! `nixfs-layer umount [--target DIR]`

use crate::cli::UmountArgs;
use crate::config::Config;
use crate::error::Result;
use crate::flakefs::daemon;
use crate::pathdb::journal;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::overlay::{self, MountError};

use super::resolve_target;
use crate::stack::{lock_upper, require_mounted, Mounted};

pub fn run(args: &UmountArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    overlay::check_privileges("umount")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    wait_until_unused(&mounted, args.wait.map(Duration::from_secs))?;
    // What Nix registered since the last sync goes into the journal that
    // `verify --repair` would rebuild a damaged database from.
    journal::catch_up(&mounted.upper, &mounted.record.lowers);
    unmount_stack(&mounted, true)?;
    eprintln!("unmounted {}", target.display());
    Ok(())
}

/// What keeps a stack from going: processes of this namespace using the
/// target (but the flake tree's server and what it started: they are
/// stopped first), and other mount namespaces holding the overlay (a
/// build in a namespace of its own). Nothing at all is torn down while
/// any remains: after `wait`, if given, it is an error naming them.
fn wait_until_unused(mounted: &Mounted, wait: Option<Duration>) -> Result<()> {
    let servers: Vec<u32> = servers(mounted).iter().map(|s| s.pid).collect();
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let mut holders = overlay::users_of(&mounted.target, |pid| {
            servers.iter().any(|s| overlay::descends_from(pid, *s))
        });
        holders.extend(overlay::holders_elsewhere(&mounted.upper));
        if holders.is_empty() {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() < d) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let mut named: Vec<String> = holders
            .iter()
            .take(5)
            .map(|h| format!("pid {} ({}, {})", h.pid, h.command, h.mount_point.display()))
            .collect();
        if holders.len() > 5 {
            named.push(format!("{} more", holders.len() - 5));
        }
        return Err(MountError::InUse {
            target: mounted.target.clone(),
            holders: named.join(", "),
        }
        .into());
    }
}

/// Unmounts a stack (the caller holds the upper's lock): the flake tree
/// first when `stop_tree` (its server keeps the store's database open),
/// then the state bind and the overlay; if the overlay is busy, the state
/// is bound again so nothing is left half-unmounted.
pub fn unmount_stack(mounted: &Mounted, stop_tree: bool) -> Result<()> {
    if stop_tree {
        let running = servers(mounted);
        for s in &running {
            daemon::stop(Some(s.pid), &s.mountpoint)?;
        }
        // A tree whose server died is still mounted (and answers ENOTCONN).
        if let Some(f) = &mounted.record.flakefs {
            if !running.iter().any(|s| s.mountpoint == f.mountpoint) {
                daemon::stop(None, &f.mountpoint)?;
            }
        }
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
    // The seal stays while another namespace still has the overlay (a
    // build in a namespace of its own): it protects the lowers there.
    match overlay::holders_elsewhere(&mounted.upper).first() {
        None => overlay::unseal(&mounted.upper)?,
        Some(h) => tracing::warn!(
            pid = h.pid,
            command = %h.command,
            "upper {} is still mounted in another mount namespace; its overlay work directory stays sealed",
            mounted.upper.dir().display()
        ),
    }
    Ok(())
}

/// The flake tree's servers of this stack, running: any serving its
/// target (also one a `mount` killed before recording it).
fn servers(mounted: &Mounted) -> Vec<daemon::Server> {
    daemon::servers_for(&mounted.target)
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
