//! `verify --repair`: fixes what needs no network.
//!
//! * whiteouts over lower paths are removed (the lower path shows again);
//! * upper copies of lower paths are removed when they hash the same as the
//!   lower's copy (an upper copy that differs is left and stays reported);
//! * partial upper entries (an interrupted import's, with a `<name>.lock`
//!   no process holds) are removed with their lock file, under that lock;
//! * upper entries that are not valid paths are registered: narHash and
//!   narSize from their content, `ultimate`, references found by scanning
//!   the content for the hash parts of valid store paths, as Nix does.
//!
//! Entries are changed in the upper's own directory; when the stack is
//! mounted the overlay is then remounted so that it forgets what it cached.
//! Missing lower content and hash mismatches cannot be fixed here.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;

use super::{apparent_size, hash_parallel, valid_rows, Layers, Problems, VerifyError};
use crate::layer::Lower;
use crate::overlay;
use crate::pathdb::merge::{self, Needed, SyncOptions};
use crate::pathdb::sql_err;
use crate::refscan;
use crate::storecopy;
use crate::storepath::{base_name, StorePath};

/// A problem `--repair` looked at and left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// What a repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Repairs {
    /// Paths whose whiteout was removed.
    pub whiteouts_removed: Vec<String>,
    /// Paths whose upper copy was removed.
    pub duplicates_removed: Vec<String>,
    /// Apparent size of the removed upper copies.
    pub bytes_freed: u64,
    /// Partial upper entries removed, with their lock files.
    pub partial_removed: Vec<String>,
    /// Upper entries registered as valid paths.
    pub registered: Vec<String>,
    pub skipped: Vec<Skipped>,
    /// Whether the lowers were re-read (paths that were hidden at the last
    /// sync were not registered then).
    pub resynced: bool,
    /// Whether the overlay was remounted.
    pub remounted: bool,
    /// The damaged merged database was rebuilt from the layers (null when
    /// it was whole).
    pub rebuilt: Option<super::rebuild::Rebuilt>,
}

impl Repairs {
    pub fn changed(&self) -> bool {
        self.rebuilt.is_some()
            || !(self.whiteouts_removed.is_empty()
                && self.duplicates_removed.is_empty()
                && self.partial_removed.is_empty()
                && self.registered.is_empty())
    }
}

/// Repairs what [`super::check`] found. The caller holds the upper's lock.
pub fn repair(
    conn: &mut Connection,
    layers: &Layers,
    found: &Problems,
) -> Result<Repairs, VerifyError> {
    let mut out = Repairs::default();
    let store = layers.upper.store();
    let mut resync = false;
    for h in &found.hidden {
        let entry = store.join(base_name(&h.path));
        let is_whiteout = fs::symlink_metadata(&entry)
            .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
            .unwrap_or(false);
        if !is_whiteout {
            continue;
        }
        fs::remove_file(&entry).map_err(super::io_err(&entry))?;
        tracing::info!(path = %h.path, "removed the whiteout hiding a lower path");
        resync |= !h.valid;
        out.whiteouts_removed.push(h.path.clone());
    }
    remove_duplicates(layers, found, &mut out)?;
    remove_partial(conn, layers, found, &mut out)?;
    if let Some(m) = &layers.mounted_store {
        if !out.whiteouts_removed.is_empty()
            || !out.duplicates_removed.is_empty()
            || !out.partial_removed.is_empty()
        {
            overlay::refresh(m)?;
            out.remounted = true;
        }
    }
    if resync {
        let lowers = layers
            .lowers
            .iter()
            .map(|l| Lower::open(&l.dir))
            .collect::<Result<Vec<_>, _>>()?;
        let summary = merge::sync(
            &layers.upper,
            &lowers,
            &SyncOptions {
                needed: Needed::KeepBroken,
                force: true,
                mounted_store: layers.mounted_store.as_deref(),
                ..Default::default()
            },
        )?;
        tracing::info!(%summary, "re-read the lowers after removing whiteouts");
        if let (true, Some(m)) = (summary.changed(), &layers.mounted_store) {
            overlay::refresh(m)?;
        }
        out.resynced = true;
    }
    register(conn, layers, found, &mut out)?;
    Ok(out)
}

fn remove_duplicates(
    layers: &Layers,
    found: &Problems,
    out: &mut Repairs,
) -> Result<(), VerifyError> {
    if found.duplicates.is_empty() {
        return Ok(());
    }
    let store = layers.upper.store();
    let mut pairs: Vec<PathBuf> = Vec::new();
    for d in &found.duplicates {
        let name = base_name(&d.path);
        pairs.push(store.join(name));
        pairs.push(Path::new(&d.lower).join("store").join(name));
    }
    let hashes = hash_parallel(&pairs);
    for (d, pair) in found.duplicates.iter().zip(hashes.chunks(2)) {
        match (&pair[0], &pair[1]) {
            (Ok(up), Ok(low)) if up == low => {
                let entry = store.join(base_name(&d.path));
                let bytes = apparent_size(&entry);
                storecopy::remove_tree(&entry).map_err(super::io_err(&entry))?;
                tracing::info!(path = %d.path, bytes, "removed the upper copy of a lower path");
                out.bytes_freed += bytes;
                out.duplicates_removed.push(d.path.clone());
            }
            (Ok(_), Ok(_)) => out.skipped.push(Skipped {
                path: d.path.clone(),
                reason: "the upper copy differs from the lower's".into(),
            }),
            (Err(e), _) | (_, Err(e)) => out.skipped.push(Skipped {
                path: d.path.clone(),
                reason: format!("could not be read: {e}"),
            }),
        }
    }
    Ok(())
}

/// Removes partial upper entries and their lock files. Each is removed
/// holding its lock (taken where Nix takes it, through the merged store
/// when mounted), and only if the lock file is still the one Nix left: a
/// Nix that finished meanwhile deleted it, or marked it stale by writing
/// into it. Before unlinking the lock file, a token is written into it the
/// way Nix does, so that a Nix waiting for that lock takes a fresh one.
fn remove_partial(
    conn: &Connection,
    layers: &Layers,
    found: &Problems,
    out: &mut Repairs,
) -> Result<(), VerifyError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let store = layers.upper.store();
    let db = layers.upper.db();
    for p in &found.partial_entries {
        let name = base_name(&p.path);
        let skip = |out: &mut Repairs, reason: &str| {
            out.skipped.push(Skipped {
                path: p.path.clone(),
                reason: reason.into(),
            })
        };
        // The merged store's lock file first (Nix's), then the upper's own
        // (checked before taking ours, which it might share an inode with).
        let paths = super::lock_paths(layers, name);
        let others_hold = paths[1..]
            .iter()
            .filter_map(|q| fs::File::open(q).ok())
            .any(|f| super::locked(&f));
        let Ok(mut lock) = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths[0])
        else {
            skip(out, "its lock file is gone (a Nix finished with it)");
            continue;
        };
        // SAFETY: a valid descriptor; LOCK_NB never blocks.
        if others_hold
            || unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0
        {
            skip(out, "a process holds its lock now");
            continue;
        }
        let others_hold = super::posix_locked(&lock);
        let stale_marked = lock.metadata().map_or(true, |m| m.len() != 0);
        let valid: bool = conn
            .query_row(
                "select count(*) > 0 from ValidPaths where path = ?1",
                [&p.path],
                |r| r.get(0),
            )
            .map_err(sql_err(&db))?;
        if others_hold || stale_marked || valid {
            skip(out, "a process took it up meanwhile");
            continue;
        }
        let entry = store.join(name);
        storecopy::remove_tree(&entry).map_err(super::io_err(&entry))?;
        let lock_file = store.join(format!("{name}.lock"));
        lock.write_all(b"d").map_err(super::io_err(&lock_file))?;
        match fs::remove_file(&lock_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(super::io_err(&lock_file)(e))
            }
            _ => {}
        }
        drop(lock);
        tracing::info!(path = %p.path, bytes = p.bytes, "removed a partial upper entry and its lock");
        out.partial_removed.push(p.path.clone());
    }
    Ok(())
}

/// Registers the upper entries that are not valid paths, in one transaction.
fn register(
    conn: &mut Connection,
    layers: &Layers,
    found: &Problems,
    out: &mut Repairs,
) -> Result<(), VerifyError> {
    let db = layers.upper.db();
    let orphans: Vec<StorePath> = found
        .unregistered
        .iter()
        .filter_map(|u| StorePath::parse(&u.path).ok())
        .collect();
    for u in found.unregistered.iter().filter(|u| !u.registrable) {
        out.skipped.push(Skipped {
            path: u.path.clone(),
            reason: "not a store path name; remove it by hand if it is not needed".into(),
        });
    }
    if orphans.is_empty() {
        return Ok(());
    }
    let valid: Vec<StorePath> = valid_rows(conn, &db)?.into_iter().map(|r| r.path).collect();
    // References may point at valid paths and at the other entries
    // registered now.
    let wanted = refscan::candidates(valid.iter().chain(&orphans));
    let read_from = |p: &StorePath| match &layers.mounted_store {
        Some(m) => m.join(p.base_name()),
        None => layers.upper.store().join(p.base_name()),
    };
    let mut scanned = Vec::new();
    for p in &orphans {
        let at = read_from(p);
        match refscan::hash_and_scan(&at, &wanted) {
            Ok((h, refs)) => scanned.push((p, h, refs)),
            Err(e) => out.skipped.push(Skipped {
                path: p.to_absolute(),
                reason: format!("could not be read: {e}"),
            }),
        }
    }
    let err = sql_err(&db);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    for (p, h, _) in &scanned {
        tx.execute(
            "insert into ValidPaths (path, hash, registrationTime, narSize, ultimate) values (?1, ?2, ?3, ?4, 1)",
            params![p.to_absolute(), h.to_db_string(), merge::now(), h.size as i64],
        )
        .map_err(&err)?;
    }
    for (p, _, refs) in &scanned {
        for r in refs {
            tx.execute(
                "insert or ignore into Refs (referrer, reference)
                 select a.id, b.id from ValidPaths a, ValidPaths b where a.path = ?1 and b.path = ?2",
                params![p.to_absolute(), r],
            )
            .map_err(&err)?;
        }
        tracing::info!(path = %p, references = refs.len(), "registered an upper entry");
    }
    tx.commit().map_err(&err)?;
    out.registered = scanned.iter().map(|(p, _, _)| p.to_absolute()).collect();
    Ok(())
}
