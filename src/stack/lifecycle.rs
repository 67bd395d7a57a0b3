//! The stack's lifecycle as library functions: [`mount`], [`unmount`],
//! [`sync`] (which remounts when a lower was replaced) and
//! [`switch_lowers`]. The commands in `cmd/` parse their flags into these
//! options and print what comes back.
//!
//! Each step that changes what is on disk or mounted is preceded by what
//! lets a later process finish or undo it: the mount record (written
//! before the first mount call, naming the flake tree before its server is
//! started), the switch journal (`pathdb::keep`). `crate::failpoint` names
//! the points between the steps where the tests kill the process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::layer::{self, Lower, Replaced, Stack, Upper};
use super::{
    find_mounted, find_stack, lock_target, lock_upper, read_record, try_lock_upper, FlakeFsRecord,
    MountRecord, Mounted, Target, Transaction, UpperLock,
};
use crate::config::FlakeFsConfig;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::flakefs::daemon::{self, ServeOptions};
use crate::overlay::{self, MountError};
use crate::pathdb::merge::{self, Needed, SyncOptions, SyncSummary};
use crate::pathdb::{self, health, journal, keep, ClosureBroken, DbError};
use crate::storecopy::{self, CopyError};
use crate::storepath::base_name;

/// Reports the merge's phases (a spinner on a terminal).
pub type Progress<'a> = Option<&'a dyn Fn(&str)>;

/// The flake tree served with a stack.
#[derive(Debug, Clone)]
pub struct FlakeTree {
    pub mountpoint: PathBuf,
    /// The configuration file a spawned server is to read.
    pub config_file: Option<PathBuf>,
    /// The configuration a server in this process uses.
    pub config: FlakeFsConfig,
}

/// What to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// First on top.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub target: PathBuf,
    pub flake_tree: Option<FlakeTree>,
    /// Stay: serve the tree in this process (or, without one, wait for a
    /// stop signal), and unmount when stopped. See [`Mounting::serve`].
    pub foreground: bool,
}

/// A stack just mounted. Holds the upper's lock until dropped or served.
pub struct Mounting {
    pub stack: Stack,
    pub target: PathBuf,
    pub summary: SyncSummary,
    /// Paths an interrupted `sync --lower` had copied, made the upper's now.
    pub finished_switch: usize,
    /// Where the flake tree is, if one is served.
    pub flake_mountpoint: Option<PathBuf>,
    /// Listening sockets under `TARGET/var` the mount covered (a nix-daemon
    /// started before it): to be restarted.
    pub hidden_sockets: Vec<overlay::ListeningSocket>,
    serve_here: Option<ServeOptions>,
    foreground: bool,
    lock: UpperLock,
}

impl Mounting {
    /// For a foreground mount: serves the flake tree (or waits for a stop
    /// signal), then unmounts what is left. Returns at once otherwise.
    pub fn serve(self) -> Result<()> {
        let Mounting {
            stack,
            target,
            serve_here,
            foreground,
            lock,
            ..
        } = self;
        if let Some(opts) = serve_here {
            // `umount` takes the upper's lock: let go of it while serving.
            drop(lock);
            daemon::serve(&opts)?;
            // Stopped by a signal (a service manager's stop) or by `umount`:
            // either way leave nothing mounted. `umount` holds the lock while
            // it works, so after it there is nothing left to do here.
            crate::sdnotify::notify("STOPPING=1");
            stop_here(&stack, &target)
        } else if foreground {
            drop(lock);
            wait_for_stop(&stack, &target)
        } else {
            Ok(())
        }
    }
}

/// Mounts a stack: checks everything and brings the merged database up to
/// date before the first mount call; records the mount (flake tree
/// included) before it; undoes what was mounted if a later step fails.
pub fn mount(opts: &MountOptions, progress: Progress<'_>) -> Result<Mounting> {
    let target = &opts.target;
    overlay::check_privileges("mount")?;
    overlay::check_overlay_available()?;
    let stack = Stack::open(&opts.lowers, &opts.upper)?;
    layer::check_target(target, &stack.lowers, &stack.upper)?;
    // The locks first (target, then upper, always in that order): two
    // mounts racing on one upper or one target must not both find it free;
    // the second waits, then finds it mounted.
    let target_lock = lock_target(target)?;
    let lock = lock_upper(&stack.upper)?;
    check_target_free(target, &stack)?;
    // A damaged merged database is refused before anything is written or
    // mounted (Nix would go on writing into it).
    health::quick_check(&stack.upper.db())?;
    // A switch to new lowers cut short: its verified copies become the
    // upper's, whichever lowers are mounted now.
    let finished = keep::finish_switch(&stack.upper)?;
    if !finished.is_empty() {
        tracing::warn!(
            count = finished.len(),
            "finished an interrupted `sync --lower`: the paths it had copied are the upper's now"
        );
    }

    // An `optimise` cut short: what it had moved out of the store goes.
    crate::optimise::finish_unmounted(&stack.upper)?;
    // A record left with nothing mounted (a `mount` killed before its
    // first mount call, or by a version that removed it last): nothing of
    // it is left to undo (`check_target_free` found nothing mounted), and
    // the record written below replaces it.
    if let Ok(old) = read_record(&stack.upper) {
        tracing::info!(target = %old.target.display(), transaction = ?old.transaction, "a mount record is left from an earlier stack with nothing mounted; replacing it");
    }
    let summary = merge::sync(
        &stack.upper,
        &stack.lowers,
        &SyncOptions {
            // The lower may have lost paths while nothing was mounted (a
            // template updated while its AppVM was off): mount anyway and
            // report what broke; `verify` lists it.
            needed: Needed::KeepBroken,
            progress,
            ..Default::default()
        },
    )?;
    failpoint::hit("mount:merged");
    tracing::info!(%summary, "merged database up to date");

    let layout = Target::new(target);
    let (store, var) = (layout.store(), layout.var());
    for d in [&store, &var] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }
    // The record goes first, so that whatever is mounted from here on can
    // always be found and undone by `umount`, even if this process is
    // killed. It names the flake tree before its server starts: a mount
    // killed before the server shows a tree without one (`status`), which
    // `umount` clears.
    let serve_here = opts.foreground && opts.flake_tree.is_some();
    let mut record = MountRecord {
        target: target.clone(),
        lowers: stack.lowers.iter().map(|l| l.dir().to_owned()).collect(),
        lower_ids: stack
            .lowers
            .iter()
            .map(Lower::identity)
            .collect::<Result<_, _>>()?,
        flakefs: opts.flake_tree.as_ref().map(|t| FlakeFsRecord {
            pid: serve_here.then(std::process::id),
            mountpoint: t.mountpoint.clone(),
        }),
        transaction: Some(Transaction::Mount),
    };
    let rec_path = stack.upper.mount_record();
    record.write(&rec_path)?;
    failpoint::hit("mount:recorded");
    let mut guard = MountGuard {
        mounts: Vec::new(),
        record: Some(rec_path.clone()),
        server: None,
    };
    overlay::mount_overlay(&stack.lowers, &stack.upper, &store)?;
    guard.mounts.push(store.clone());
    // A fresh overlay has nothing cached.
    let _ = std::fs::remove_file(stack.upper.refresh_pending());
    failpoint::hit("mount:overlay");
    overlay::bind(&stack.upper.var(), &var)?;
    guard.mounts.push(var.clone());
    failpoint::hit("mount:var");
    let mut serve = None;
    if let Some(tree) = &opts.flake_tree {
        if serve_here {
            serve = Some(ServeOptions {
                mountpoint: tree.mountpoint.clone(),
                target: target.clone(),
                config: tree.config.clone(),
            });
        } else {
            let pid = daemon::spawn(
                &crate::flakefs::serve_args(&tree.mountpoint, target, tree.config_file.as_deref()),
                &tree.mountpoint,
                &layout.flake_log(),
            )?;
            failpoint::hit("mount:server");
            guard.server = Some((pid, tree.mountpoint.clone()));
            if let Some(f) = &mut record.flakefs {
                f.pid = Some(pid);
            }
        }
    }
    // The transaction is over: the stack is whole.
    record.write_with(None, &rec_path)?;
    guard.disarm();
    drop(target_lock);
    failpoint::hit("mount:done");
    // Listeners in TARGET/var bound before this mount covered it.
    let mut hidden_sockets = overlay::listening_sockets(&var, target);
    for s in &mut hidden_sockets {
        s.holders.retain(|h| h.view == overlay::SocketView::Covered);
    }
    hidden_sockets.retain(|s| !s.holders.is_empty());
    Ok(Mounting {
        hidden_sockets,
        flake_mountpoint: opts.flake_tree.as_ref().map(|t| t.mountpoint.clone()),
        stack,
        target: target.clone(),
        summary,
        finished_switch: finished.len(),
        serve_here: serve,
        foreground: opts.foreground,
        lock,
    })
}

/// `mount --foreground` without the flake tree: ready now; on SIGTERM,
/// SIGINT or SIGHUP unmount and return; if `umount` unmounted the stack
/// meanwhile, return as well.
fn wait_for_stop(stack: &Stack, target: &Path) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| Error::Io {
        path: target.to_owned(),
        source: e.into(),
    })?;
    crate::sdnotify::notify("READY=1");
    let half_second = libc::timespec {
        tv_sec: 0,
        tv_nsec: 500_000_000,
    };
    loop {
        // SAFETY: a valid signal set and timeout; no siginfo wanted.
        let sig =
            unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &half_second) };
        if sig > 0 {
            break;
        }
        if find_mounted(target)?.is_none() {
            return Ok(());
        }
    }
    crate::sdnotify::notify("STOPPING=1");
    stop_here(stack, target)
}

/// After a foreground mount stopped serving: unmount what is left, unless
/// `umount` is at work (it holds the lock and waits for this process).
fn stop_here(stack: &Stack, target: &Path) -> Result<()> {
    let Some(_lock) = try_lock_upper(&stack.upper)? else {
        return Ok(());
    };
    if let Some(m) = find_mounted(target)? {
        unmount_stack(&m, false)?;
    }
    Ok(())
}

/// Refuses a target that already has something mounted where we would mount,
/// and an upper that already serves another mount.
fn check_target_free(target: &Path, stack: &Stack) -> Result<()> {
    let mounts = overlay::mounts()?;
    for lower in &stack.lowers {
        overlay::check_lower_sees_target(&mounts, lower.dir(), target)?;
    }
    let layout = Target::new(target);
    for p in [layout.store(), layout.var()] {
        if overlay::visible_mount_at(&mounts, &p).is_some() {
            return Err(MountError::AlreadyMounted(p, target.to_owned()).into());
        }
    }
    overlay::check_not_held_elsewhere(&stack.upper)?;
    let upper_store = stack.upper.store();
    if let Some(m) = mounts.iter().find(|m| {
        m.fs_type == "overlay"
            && m.option("upperdir").map(PathBuf::from).as_deref() == Some(&upper_store)
    }) {
        return Err(MountError::UpperInUse {
            upper: stack.upper.dir().to_owned(),
            at: m.mount_point.clone(),
        }
        .into());
    }
    Ok(())
}

/// Stops the flake tree's server it names and unmounts (in reverse)
/// whatever it still lists when dropped.
struct MountGuard {
    mounts: Vec<PathBuf>,
    record: Option<PathBuf>,
    /// A server started for the tree: its pid and mountpoint.
    server: Option<(u32, PathBuf)>,
}

impl MountGuard {
    /// Everything went well: keep the server, the mounts and the record.
    fn disarm(&mut self) {
        self.mounts.clear();
        self.record = None;
        self.server = None;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some((pid, mountpoint)) = &self.server {
            if let Err(e) = daemon::stop(Some(*pid), mountpoint) {
                tracing::error!(pid, error = %e, "could not stop the flake tree's server after a failure");
            }
        }
        for p in self.mounts.iter().rev() {
            if let Err(e) = overlay::unmount(p) {
                tracing::error!(path = %p.display(), error = %e, "could not undo a mount after a failure");
            }
        }
        if let Some(r) = &self.record {
            let _ = std::fs::remove_file(r);
        }
    }
}

/// What [`unmount`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmounted {
    /// A stack (whole or half-mounted) was taken down.
    Stack,
    /// Nothing was mounted, but `upper` (the one the caller named) had a
    /// record of a stack at this target left by a command killed midway:
    /// the record is gone and the seal lifted.
    StaleRecord(PathBuf),
}

/// Unmounts the stack at `target`, all or nothing: while anything uses it
/// (after waiting up to `wait`, if given) nothing is torn down and the
/// error names the holders. A stack half-mounted or half-unmounted by a
/// killed command is taken down too. With nothing mounted, the record an
/// interrupted command left in `upper` (if given: the configured one) is
/// cleared; else it is an error.
pub fn unmount(target: &Path, wait: Option<Duration>, upper: Option<&Path>) -> Result<Unmounted> {
    overlay::check_privileges("umount")?;
    let Some(mounted) = find_stack(target)? else {
        return clear_stale_record(target, upper);
    };
    let _lock = lock_upper(&mounted.upper)?;
    wait_until_unused(&mounted, wait)?;
    // What Nix registered since the last sync goes into the journal that
    // `verify --repair` would rebuild a damaged database from.
    journal::catch_up(&mounted.upper, &mounted.record.lowers);
    unmount_stack(&mounted, true)?;
    Ok(Unmounted::Stack)
}

/// Nothing is mounted at `target`: a record `upper` still has of a stack
/// there (its command killed before it mounted anything, or by a version
/// that removed the record after the overlay) goes, and the seal with it;
/// not while another namespace holds the upper.
fn clear_stale_record(target: &Path, upper: Option<&Path>) -> Result<Unmounted> {
    let not_mounted = || Err(MountError::NotMounted(target.to_owned()).into());
    let Some(upper) = upper.and_then(|u| Upper::open(u).ok()) else {
        return not_mounted();
    };
    let _lock = lock_upper(&upper)?;
    match read_record(&upper) {
        Ok(r) if r.target == target => {}
        _ => return not_mounted(),
    }
    if !overlay::holders_elsewhere(&upper).is_empty() || find_mounted_upper(&upper)?.is_some() {
        return not_mounted();
    }
    overlay::unseal(&upper)?;
    let rec = upper.mount_record();
    std::fs::remove_file(&rec).map_err(|source| Error::Io { path: rec, source })?;
    Ok(Unmounted::StaleRecord(upper.dir().to_owned()))
}

/// Where the upper's overlay is mounted in this namespace, if anywhere.
fn find_mounted_upper(upper: &Upper) -> Result<Option<PathBuf>> {
    let upper_store = upper.store();
    Ok(overlay::mounts()?
        .into_iter()
        .find(|m| {
            m.fs_type == "overlay"
                && m.option("upperdir").map(PathBuf::from).as_deref() == Some(&upper_store)
        })
        .map(|m| m.mount_point))
}

/// What keeps a stack from going: processes of this namespace using the
/// target (but the flake tree's server and what it started: they are
/// stopped first), and other mount namespaces holding the overlay (a
/// build in a namespace of its own). Nothing at all is torn down while
/// any remains: after `wait`, if given, it is an error naming them.
pub(crate) fn wait_until_unused(mounted: &Mounted, wait: Option<Duration>) -> Result<()> {
    // The tree's servers: standalone ones, and a `mount --foreground`
    // serving it itself (the record names it). They are stopped first.
    let mut servers: Vec<u32> = daemon::servers_for(&mounted.target)
        .iter()
        .map(|s| s.pid)
        .collect();
    servers.extend(mounted.record.flakefs.as_ref().and_then(|f| f.pid));
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let mut holders = overlay::users_of(&mounted.target, |pid| {
            servers.iter().any(|s| overlay::descends_from(pid, *s))
        });
        holders.extend(overlay::holders_elsewhere(&mounted.upper));
        // A nix-daemon serving the stack holds no file of it between
        // clients, only its socket in TARGET/var.
        // Only the listeners on this stack's own socket files count: one
        // a mount covered serves what lies beneath, another namespace's its
        // own store.
        for s in overlay::listening_sockets(&mounted.var(), &mounted.target) {
            for h in s.holders {
                if h.view == overlay::SocketView::Same && !holders.iter().any(|x| x.pid == h.pid) {
                    holders.push(overlay::Holder {
                        pid: h.pid,
                        command: h.command,
                        mount_point: s.path.clone(),
                    });
                }
            }
        }
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

/// Unmounts a stack (the caller holds the upper's lock), a transaction
/// whose journal is the mount record: it is marked `unmount` first, so
/// that a later `umount` knows to finish it; then the flake tree goes
/// (when `stop_tree`: its server keeps the store's database open), the
/// state bind, the seal, the record, and last the overlay, so that until
/// the end the overlay on `TARGET/store` leads any later process to the
/// upper. If the overlay is busy, the rest is put back.
pub fn unmount_stack(mounted: &Mounted, stop_tree: bool) -> Result<()> {
    let rec_path = mounted.upper.mount_record();
    let mut record = mounted.record.clone();
    record.write_with(Some(Transaction::Unmount), &rec_path)?;
    failpoint::hit("umount:journaled");
    if stop_tree {
        // Any server serving this target (also one a `mount` killed before
        // recording its pid).
        let running = daemon::servers_for(&mounted.target);
        for s in &running {
            daemon::stop(Some(s.pid), &s.mountpoint)?;
        }
        // A tree whose server died is still mounted (and answers ENOTCONN).
        if let Some(f) = &mounted.record.flakefs {
            if !running.iter().any(|s| s.mountpoint == f.mountpoint) {
                daemon::stop(None, &f.mountpoint)?;
            }
        }
        failpoint::hit("umount:tree");
    }
    let (var, store) = (mounted.var(), mounted.store());
    let mounts = overlay::mounts()?;
    let var_is_ours = overlay::mount_at(&mounts, &var).is_some();
    if var_is_ours {
        unmount_settling(&var)?;
    }
    failpoint::hit("umount:var");
    // The seal stays while another namespace still has the overlay (a
    // build in a namespace of its own): it protects the lowers there.
    let unsealed = match overlay::holders_elsewhere(&mounted.upper).first() {
        None => {
            overlay::unseal(&mounted.upper)?;
            true
        }
        Some(h) => {
            tracing::warn!(
                pid = h.pid,
                command = %h.command,
                "upper {} is still mounted in another mount namespace; its overlay work directory stays sealed",
                mounted.upper.dir().display()
            );
            false
        }
    };
    failpoint::hit("umount:unsealed");
    match std::fs::remove_file(&rec_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Io {
                path: rec_path,
                source,
            })
        }
    }
    failpoint::hit("umount:unrecorded");
    let store_is_ours = mounted.store_mounted && overlay::mount_at(&mounts, &store).is_some();
    if store_is_ours {
        if let Err(e) = unmount_settling(&store) {
            // Leave things as they were: the seal, the record, the state.
            if unsealed {
                overlay::seal(&mounted.upper)?;
            }
            record.write_with(None, &rec_path)?;
            if var_is_ours {
                overlay::bind(&mounted.upper.var(), &var)?;
            }
            return Err(e.into());
        }
    }
    // Nothing cached is left to forget.
    let _ = std::fs::remove_file(mounted.upper.refresh_pending());
    Ok(())
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

/// What [`sync`] did.
pub struct Synced {
    pub summary: SyncSummary,
    /// Lowers replaced under the mount: `TARGET/store` was mounted afresh.
    pub replaced: Vec<Replaced>,
    /// The overlay was found unsealed (a mount killed before its seal) and
    /// sealed.
    pub sealed: bool,
}

/// Brings the mounted stack's merged database in line with its lowers,
/// mounting `TARGET/store` afresh first if a lower was replaced under it,
/// and refreshing the overlay when something changed.
pub fn sync(target: &Path, force: bool, progress: Progress<'_>) -> Result<Synced> {
    overlay::check_privileges("sync")?;
    let mounted = find_stack(target)?.ok_or_else(|| MountError::NotMounted(target.to_owned()))?;
    let _lock = lock_upper(&mounted.upper)?;
    let lowers = mounted.lowers()?;
    let (replaced, sealed) = if mounted.store_mounted {
        let sealed = overlay::can_seal() && !overlay::is_sealed(&mounted.upper);
        if sealed {
            overlay::seal(&mounted.upper)?;
            tracing::warn!(upper = %mounted.upper.dir().display(), "the overlay was not sealed; sealed it");
        }
        (remount_if_replaced(&mounted, &lowers)?, sealed)
    } else {
        (finish_remount(&mounted, &lowers)?, false)
    };
    // The overlay forgets its cached entries after the merge; a sync killed
    // in between leaves this, and the next one refreshes whatever it finds.
    let pending = mounted.upper.refresh_pending();
    let refresh_owed = pending.exists();
    std::fs::write(&pending, b"").map_err(|source| Error::io(&pending, source))?;
    let summary = merge::sync(
        &mounted.upper,
        &lowers,
        &SyncOptions {
            force,
            progress,
            mounted_store: Some(&mounted.store()),
            check_before_changes: true,
            ..Default::default()
        },
    )?;
    failpoint::hit("sync:merged");
    if summary.changed() || refresh_owed {
        // Drop the overlay's cached (possibly negative) entries for lower paths.
        overlay::refresh(&mounted.store())?;
    }
    let _ = std::fs::remove_file(&pending);
    // The flake tree's entries: answers (a lower's published index above
    // all, which may change with no path changing) may differ now.
    crate::flakefs::daemon::refresh(target);
    Ok(Synced {
        summary,
        replaced,
        sealed,
    })
}

/// A lower directory replaced under the mount (a new tree renamed into
/// place): the overlay still shows the old one, perhaps deleted by now, so
/// `TARGET/store` is mounted afresh, onto what the lowers' paths are now,
/// before the merge reads their databases. Busy: refused, nothing changed.
///
/// A transaction: the record is marked `remount` before the old overlay is
/// unmounted and cleared once the new one is mounted and sealed; killed in
/// between, the state bind and the record are left, and the next `sync`
/// mounts the overlay ([`finish_remount`]) or `umount` clears the rest.
fn remount_if_replaced(mounted: &Mounted, lowers: &[Lower]) -> Result<Vec<Replaced>> {
    let replaced = mounted.replaced_lowers();
    let Some(first) = replaced.first() else {
        return Ok(replaced);
    };
    let store = mounted.store();
    let rec_path = mounted.upper.mount_record();
    let mut record = mounted.record.clone();
    record.write_with(Some(Transaction::Remount), &rec_path)?;
    failpoint::hit("sync:remount-journaled");
    if let Err(e) = overlay::mount_afresh(lowers, &mounted.upper, &store) {
        // The old overlay is back (or, failing that, nothing is mounted
        // there and the record says so).
        if find_mounted(&mounted.target)?.is_some() {
            record.write_with(None, &rec_path)?;
        }
        return Err(match e {
            MountError::Busy(_) => MountError::ReplacedBusy {
                lower: first.dir.clone(),
                store: store.clone(),
            },
            e => e,
        }
        .into());
    }
    failpoint::hit("sync:remounted");
    record.lower_ids = lowers
        .iter()
        .map(Lower::identity)
        .collect::<Result<_, _>>()?;
    record.write_with(None, &rec_path)?;
    for r in &replaced {
        tracing::info!(lower = %r.dir.display(), was = %r.was, now = ?r.now.map(|n| n.to_string()), "lower replaced under the mount");
    }
    Ok(replaced)
}

/// A `sync` killed while it mounted `TARGET/store` afresh left the state
/// bind and the record (marked `remount`) but no overlay: mounts it, onto
/// what the lowers are now, and clears the mark. Any other half-unmounted
/// stack is `umount`'s to clear.
fn finish_remount(mounted: &Mounted, lowers: &[Lower]) -> Result<Vec<Replaced>> {
    if mounted.record.transaction != Some(Transaction::Remount) {
        return Err(MountError::AlreadyMounted(mounted.var(), mounted.target.clone()).into());
    }
    let replaced = mounted.replaced_lowers();
    overlay::mount_overlay(lowers, &mounted.upper, &mounted.store())?;
    let mut record = mounted.record.clone();
    record.lower_ids = lowers
        .iter()
        .map(Lower::identity)
        .collect::<Result<_, _>>()?;
    record.write_with(None, &mounted.upper.mount_record())?;
    tracing::warn!(target = %mounted.target.display(), "finished an interrupted remount: {} is mounted again", mounted.store().display());
    Ok(replaced)
}

/// How to switch a mounted stack to new lowers.
#[derive(Debug, Clone)]
pub struct SwitchOptions {
    /// The new lowers, first on top.
    pub lowers: Vec<PathBuf>,
    /// Copy what the upper needs and the new lowers lack (else refuse).
    pub keep_needed: bool,
    /// For the flake tree, served again if it was: the configuration file
    /// its server reads, and whether the configuration enables it.
    pub config_file: Option<PathBuf>,
    pub flakefs: FlakeFsConfig,
}

/// What [`switch_lowers`] did.
pub struct Switched {
    /// Paths the upper needed and the new lowers lacked, copied into it.
    pub kept: Vec<String>,
    /// The stack on the new lowers.
    pub mounting: Mounting,
}

/// Moves the stack mounted at `target` to new lowers. While the old lowers
/// are still mounted, the paths the upper needs (closures of its own paths
/// and of the GC roots) that the new lowers lack are copied into a staging
/// directory and checked against their NAR hashes; then the stack is
/// unmounted, the copies become upper paths, and it is mounted again with
/// the new lowers. Nothing else is copied. Without `keep_needed`, such
/// paths make the switch fail before anything changes.
pub fn switch_lowers(
    target: &Path,
    opts: &SwitchOptions,
    progress: Progress<'_>,
) -> Result<Switched> {
    overlay::check_privileges("sync")?;
    let mounted = super::require_mounted(target)?;
    let upper = &mounted.upper;
    let lock = lock_upper(upper)?;
    // Refused before the old stack is unmounted: mount would refuse it then.
    pathdb::health::quick_check(&upper.db())?;
    let new = Stack::open(&opts.lowers, upper.dir())?;
    layer::check_target(&mounted.target, &new.lowers, upper)?;
    let conn = pathdb::open(&upper.db())?;
    let needed = keep::needed(&conn, upper)?;
    let missing = keep::missing_from(&new.lowers, &upper.tmp_dir(), &needed)?;
    drop(conn);
    if !missing.is_empty() && !opts.keep_needed {
        return Err(DbError::ClosureBroken(ClosureBroken {
            total: missing.len(),
            needed: missing
                .iter()
                .take(10)
                .map(|n| (n.path.clone(), n.needed_by.clone()))
                .collect(),
        })
        .into());
    }

    // Copy what is missing, through the merged view, and check it. A
    // journal left by a switch killed before it unmounted (the stack is
    // still on its old lowers) is dropped with its copies.
    let staging = upper.staging_dir();
    keep::abandon_switch(upper);
    let io = |path: PathBuf| move |source| Error::io(&path, source);
    std::fs::create_dir_all(&staging).map_err(io(staging.clone()))?;
    let stage = crate::progress::stage(
        "copying what the upper needs",
        Some(missing.len() as u64),
        crate::progress::Unit::Paths,
    );
    for n in &missing {
        let base = base_name(&n.path);
        let (src, dst) = (mounted.store().join(base), staging.join(base));
        if let Err(e) = storecopy::copy_verified(&src, &dst, &n.nar_hash) {
            keep::abandon_switch(upper);
            return Err(match e {
                // Damaged content: the same kind as promote's and export's.
                e @ CopyError::Mismatch { .. } => Error::SwitchCopy(e),
                CopyError::Read { path, source } | CopyError::Write { path, source } => {
                    Error::io(&path, source)
                }
            });
        }
        stage.advance(1);
    }
    drop(stage);
    failpoint::hit("sync-lower:copied");
    let kept: Vec<String> = missing.iter().map(|n| n.path.clone()).collect();
    // From here on the copies are good: whatever stops this process, the
    // next mount of this upper makes them the upper's (keep::finish_switch).
    keep::begin_switch(upper, &kept)?;
    failpoint::hit("sync-lower:journaled");

    // Unmount, make the copies the upper's, mount with the new lowers.
    let flake_tree = mounted
        .record
        .flakefs
        .as_ref()
        .filter(|_| opts.flakefs.enable.unwrap_or(true))
        .map(|f| FlakeTree {
            mountpoint: f.mountpoint.clone(),
            config_file: opts.config_file.clone(),
            config: opts.flakefs.clone(),
        });
    let mount_opts = |lowers: Vec<PathBuf>| MountOptions {
        lowers,
        upper: upper.dir().to_owned(),
        target: mounted.target.clone(),
        flake_tree: flake_tree.clone(),
        foreground: false,
    };
    let old_lowers = mounted.record.lowers.clone();
    drop(lock);
    if let Err(e) = unmount(&mounted.target, None, None) {
        // Still on the old lowers: nothing to finish.
        keep::abandon_switch(upper);
        return Err(e);
    }
    // From here on nothing is mounted: whatever fails, put the old stack
    // back rather than leave the target empty. Copies already moved into
    // the upper hold the same bytes as the old lowers' paths; `verify
    // --repair` tidies them.
    let restore = |e: Error| -> Error {
        match mount(&mount_opts(old_lowers.clone()), None) {
            Ok(_) => {
                tracing::warn!(target = %mounted.target.display(), "the switch failed; the old lowers are mounted again")
            }
            Err(back) => {
                tracing::error!(error = %back, target = %mounted.target.display(), "the switch failed and the old lowers could not be mounted again either; nothing is mounted there")
            }
        }
        e
    };
    failpoint::hit("sync-lower:unmounted");
    let adopted = (|| -> Result<()> {
        let _lock = lock_upper(upper)?;
        keep::finish_switch(upper)?;
        Ok(())
    })();
    adopted.map_err(restore)?;
    failpoint::hit("sync-lower:adopted");
    let mounting = mount(&mount_opts(opts.lowers.clone()), progress).map_err(restore)?;
    Ok(Switched { kept, mounting })
}

/// The flake tree served with a mounted stack, as `status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct FlakeTreeStatus {
    pub mountpoint: String,
    /// The server's pid (null when none runs).
    pub pid: Option<u32>,
    /// Mounted and served by a running server.
    pub alive: bool,
    /// Results of locked references kept across restarts.
    pub locked_results: u64,
}

/// A transaction its record names, as `status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct TransactionStatus {
    /// "mount", "unmount" or "remount".
    pub kind: &'static str,
    /// No process is at work on the upper: the command was killed (else
    /// it is under way).
    pub interrupted: bool,
    /// What finishes it.
    pub run: String,
}

/// The transaction a stack's record names, if any.
pub fn transaction(m: &Mounted) -> Option<TransactionStatus> {
    let t = m.record.transaction?;
    let target = m.target.display();
    let run = match t {
        // (`umount` clears it as well.)
        Transaction::Remount => format!("nixfs-layer sync --target {target}"),
        _ => format!("nixfs-layer umount --target {target}"),
    };
    Some(TransactionStatus {
        kind: t.name(),
        interrupted: !super::upper_locked(&m.upper),
        run,
    })
}

/// What a mounted stack is missing: the overlay (a `sync` killed while it
/// mounted it afresh), the state bind, its flake tree or the tree's server
/// (a `mount`, `umount` or `sync --lower` killed midway), and a transaction
/// its record names.
pub fn health(m: &Mounted) -> (&'static str, Vec<String>, Option<FlakeTreeStatus>) {
    let mut problems = Vec::new();
    if let Some(t) = transaction(m) {
        let what = match t.kind {
            "mount" => "mounting",
            "unmount" => "unmounting",
            _ => "remounting",
        };
        let cmd = m.record.transaction.map_or("", Transaction::command);
        problems.push(if t.interrupted {
            format!(
                "{what} (interrupted): a `nixfs-layer {cmd}` of {} was cut short: run `{}`",
                m.target.display(),
                t.run
            )
        } else {
            format!(
                "{what}: a `nixfs-layer {cmd}` of {} is under way (if it hangs, stop it and run `{}`)",
                m.target.display(),
                t.run
            )
        });
    }
    if !m.store_mounted {
        let t = m.target.display();
        problems.push(format!(
            "{} is not mounted while its state is bound on {}: {}",
            m.store().display(),
            m.var().display(),
            if m.record.transaction == Some(Transaction::Remount) {
                format!("run `nixfs-layer sync --target {t}` to mount it again, or `nixfs-layer umount --target {t}`")
            } else {
                format!("run `nixfs-layer umount --target {t}`")
            }
        ));
    }
    let var = m.var();
    let mounts = overlay::mounts().unwrap_or_default();
    if overlay::mount_at(&mounts, &var).is_none() {
        problems.push(format!(
            "{} is not bound (Nix there would use an empty state): run `nixfs-layer umount --target {}`, then mount again",
            var.display(),
            m.target.display()
        ));
    }
    let servers = daemon::servers_for(&m.target);
    let tree = m.record.flakefs.as_ref().map(|f| {
        let server = servers.iter().find(|s| s.mountpoint == f.mountpoint);
        let mounted = daemon::is_mounted(&f.mountpoint);
        let locked_results = std::fs::read_to_string(m.layout().flake_cache())
            .map(|t| t.lines().count() as u64)
            .unwrap_or(0);
        FlakeTreeStatus {
            mountpoint: f.mountpoint.display().to_string(),
            pid: server.map(|s| s.pid),
            alive: mounted && server.is_some(),
            locked_results,
        }
    });
    if let Some(t) = &tree {
        if !t.alive {
            problems.push(format!(
                "the flake tree at {} has no running server: run `nixfs-layer umount --target {}`, then mount again",
                t.mountpoint,
                m.target.display()
            ));
        }
    }
    for s in &servers {
        if m.record.flakefs.as_ref().map(|f| &f.mountpoint) != Some(&s.mountpoint) {
            problems.push(format!(
                "a flake tree server (pid {}) serves this store at {} without a record: run `nixfs-layer umount --target {}`",
                s.pid,
                s.mountpoint.display(),
                m.target.display()
            ));
        }
    }
    let state = if problems.is_empty() {
        "mounted"
    } else {
        "half-mounted"
    };
    (state, problems, tree)
}

/// With nothing mounted at `target`: a record of a stack there that
/// `upper` still has (a `mount` killed before its first mount call, or an
/// older version's `umount` killed before it removed it), with what clears
/// it. Nothing is left mounted of it.
pub fn stale_record(upper: &Upper, target: &Path) -> Option<String> {
    let r = read_record(upper).ok().filter(|r| r.target == target)?;
    if super::upper_locked(upper) {
        return None;
    }
    Some(format!(
        "upper {} has a record of a stack at {} with nothing mounted{}: the next `nixfs-layer mount` replaces it, `nixfs-layer umount` (with this upper configured) removes it",
        upper.dir().display(),
        target.display(),
        r.transaction
            .map(|t| format!(" (a `nixfs-layer {}` was cut short)", t.command()))
            .unwrap_or_default()
    ))
}

/// Transactions on `upper` cut short that a command other than `umount`
/// finishes: one line each, naming it.
pub fn pending(upper: &Upper) -> Vec<String> {
    let mut problems = Vec::new();
    if keep::switch_pending(upper) {
        problems.push(format!(
            "a `sync --lower` on {} was cut short after copying what the upper needs: the next `nixfs-layer mount` of this upper finishes it",
            upper.dir().display()
        ));
    }
    if upper.refresh_pending().exists() && !super::upper_locked(upper) {
        problems.push(format!(
            "a `sync` of {} did not get to refresh the overlay after its merge (paths it made valid may look missing through the store): run `nixfs-layer sync`",
            upper.dir().display()
        ));
    }
    if upper.optimise_trash().exists() {
        problems.push(format!(
            "an `optimise` on {} was cut short after it moved upper copies out of the store: run `nixfs-layer optimise` to finish it",
            upper.dir().display()
        ));
    }
    problems
}
