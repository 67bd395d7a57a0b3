//! `verify`: one consistency check across every layer of a stack — the
//! merged database against the upper's store and the lowers' stores.
//!
//! Each category of problem has its own check function; [`check`] runs them
//! all. Everything here reads; [`repair`] changes what can be fixed without
//! a network. Store entries are looked at in the layers' own directories
//! (never through overlayfs, whose dentry cache may be stale); content is
//! hashed through the merged `TARGET/store` when mounted (what Nix sees),
//! else in the layer it comes from.

pub mod rebuild;
pub mod repair;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use crate::layer::{LayerError, Upper};
pub(crate) use crate::nar::{apparent_size, hash_parallel};
use crate::overlay::MountError;
use crate::pathdb::{sql_err, DbError};
use crate::stack::{Layers, Origin};
use crate::storepath::{StorePath, STORE_DIR};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("upper {}: no record of its lowers (nothing mounted, no journal, and the damaged database does not name them); mount needs a whole database, so restore {}/var/nix/db/db.sqlite from a backup or run `nixfs-layer verify --repair` while the stack is mounted", .upper.display(), .upper.display())]
    NoLowers { upper: PathBuf },
    #[error("verify: {count} problem(s) {state}; {hint}")]
    ProblemsRemain {
        count: usize,
        state: &'static str,
        hint: &'static str,
    },
}

impl VerifyError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            VerifyError::ProblemsRemain { .. } => Kind::Problems,
            VerifyError::NoLowers { .. } => Kind::NoInput,
            VerifyError::Db(e) => e.kind(),
            VerifyError::Mount(e) => e.kind(),
            VerifyError::Layer(e) => e.kind(),
            VerifyError::Io { .. } => Kind::IoErr,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an entry of the upper's store directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// An overlayfs whiteout (a 0/0 character device): hides a lower entry.
    Whiteout,
    Real,
}

pub(crate) type UpperStore = HashMap<String, Entry>;

fn scan_upper(store: &Path) -> Result<UpperStore, VerifyError> {
    let mut out = HashMap::new();
    for e in fs::read_dir(store).map_err(io_err(store))? {
        let e = e.map_err(io_err(store))?;
        let Ok(name) = e.file_name().into_string() else {
            tracing::warn!(entry = ?e.path(), "upper store entry with a non-UTF-8 name; ignored");
            continue;
        };
        let ft = e.file_type().map_err(io_err(&e.path()))?;
        let kind = if ft.is_char_device() && e.metadata().map_err(io_err(&e.path()))?.rdev() == 0 {
            Entry::Whiteout
        } else {
            Entry::Real
        };
        out.insert(name, kind);
    }
    Ok(out)
}

/// Entries of a store directory that are Nix's own bookkeeping, not store
/// paths: `.links`, temporary and lock files (`.*`, `*.lock`), and entries
/// with a `<name>.lock` next to them (being written, or left partial: see
/// [`partial_entries`]).
fn is_bookkeeping(name: &str, upper: &UpperStore) -> bool {
    name.starts_with('.') || name.ends_with(".lock") || upper.contains_key(&format!("{name}.lock"))
}

/// One valid path of the merged database.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub path: StorePath,
    pub hash: String,
    pub origin: Origin,
    /// The recorded NAR size (0 when Nix did not record one).
    pub nar_size: u64,
}

fn valid_rows(conn: &Connection, db: &Path) -> Result<Vec<Row>, VerifyError> {
    let raw: Vec<(String, String, Origin, i64)> = conn
        .prepare(
            "select v.path, v.hash, coalesce(o.layer, 0), coalesce(v.narSize, 0) from ValidPaths v
             left join NixfsLayerOrigin o on o.path = v.path order by v.path",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_err(db))?;
    Ok(raw
        .into_iter()
        .filter_map(|(path, hash, origin, size)| match StorePath::parse(&path) {
            Ok(path) => Some(Row {
                path,
                hash,
                origin,
                nar_size: size.max(0) as u64,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "valid path outside /nix/store; not checked");
                None
            }
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingReason {
    /// No store entry in the layer (nor, for an upper path, in any lower).
    Absent,
    /// A whiteout in the upper hides it.
    Whiteout,
}

/// A valid path whose content is not there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingContent {
    pub path: String,
    /// "upper", or the lower directory the path comes from.
    pub layer: String,
    pub reason: MissingReason,
}

/// A store entry in the upper that is not a valid path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unregistered {
    pub path: String,
    /// Apparent size of its files.
    pub bytes: u64,
    /// Whether its name is a store path name (only then can it be registered).
    pub registrable: bool,
}

/// What an interrupted `nix-store --import`, substitution or build leaves:
/// an upper entry that is not a valid path, with `<name>.lock` beside it,
/// whose lock no process holds any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partial {
    pub path: String,
    /// Apparent size of what was written of it.
    pub bytes: u64,
}

/// A whiteout in the upper over a path a lower has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hidden {
    pub path: String,
    pub lower: String,
    /// Whether the merged database lists the path as valid.
    pub valid: bool,
}

/// A real upper entry for a path a lower has too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Duplicate {
    pub path: String,
    pub lower: String,
    /// Apparent size of the upper copy: the space a repair frees.
    pub bytes: u64,
}

/// A Refs row whose referrer or reference is not a valid path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DanglingReference {
    /// The path, or `#<id>` when no valid path has that id.
    pub referrer: String,
    pub reference: String,
}

/// A path whose content does not hash to the recorded narHash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HashMismatch {
    pub path: String,
    pub layer: String,
    /// The database's `hash` column.
    pub expected: String,
    /// `sha256:<hex>` of the content, or why it could not be read.
    pub actual: String,
}

/// Why a published entry's path is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StaleReason {
    /// The lower's store no longer has the path (its owner deleted or
    /// garbage-collected it) while its index kept the entry.
    GoneFromLower,
    /// The lower's store has it, but the merged database does not list it
    /// (published after the last sync).
    NotSynced,
}

/// An entry of a lower's published index whose store path is not valid in
/// the merged store: the tree ignores it (and evaluates the reference, or
/// refuses it with `resolve = "published-only"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StalePublished {
    /// The lower whose index has the entry.
    pub lower: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub path: String,
    pub reason: StaleReason,
}

/// What SQLite's `integrity_check` says about the merged database file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseDamage {
    /// The database file.
    pub database: String,
    /// One line of `PRAGMA integrity_check` (or why the file cannot be read).
    pub problem: String,
}

/// Every problem found, by category (see docs/verify-json.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Problems {
    /// Non-empty when the merged database file is damaged: then the other
    /// categories are not checked (they would read a damaged file).
    pub damaged_database: Vec<DatabaseDamage>,
    pub missing_content: Vec<MissingContent>,
    pub unregistered: Vec<Unregistered>,
    pub partial_entries: Vec<Partial>,
    pub hidden: Vec<Hidden>,
    pub duplicates: Vec<Duplicate>,
    pub dangling_references: Vec<DanglingReference>,
    /// `None` when contents were not checked.
    pub hash_mismatches: Option<Vec<HashMismatch>>,
    /// Entries of the lowers' published indexes that name a path the
    /// merged store lacks.
    pub stale_published: Vec<StalePublished>,
}

impl Problems {
    pub fn count(&self) -> usize {
        self.damaged_database.len()
            + self.missing_content.len()
            + self.unregistered.len()
            + self.partial_entries.len()
            + self.hidden.len()
            + self.duplicates.len()
            + self.dangling_references.len()
            + self.hash_mismatches.as_ref().map_or(0, Vec::len)
            + self.stale_published.len()
    }

    /// Problems `--repair` may fix.
    pub fn repairable(&self) -> usize {
        self.damaged_database.len()
            + self.unregistered.iter().filter(|u| u.registrable).count()
            + self.partial_entries.len()
            + self.hidden.len()
            + self.duplicates.len()
    }
}

/// `PRAGMA integrity_check` of the upper's merged database: the
/// problems, an empty list when the file is whole.
pub fn damaged_database(upper: &Upper) -> Result<Vec<DatabaseDamage>, VerifyError> {
    let db = upper.db();
    Ok(crate::pathdb::health::problems(&db, true)?
        .into_iter()
        .map(|problem| DatabaseDamage {
            database: db.display().to_string(),
            problem,
        })
        .collect())
}

/// What [`check`] found, with the valid paths it looked at: what
/// [`check_after_repair`] needs to hash only what a repair changed.
#[derive(Debug, Clone)]
pub struct Checked {
    pub problems: Problems,
    /// Sorted by path.
    rows: Vec<Row>,
}

/// Runs every check.
pub fn check(
    conn: &Connection,
    layers: &Layers,
    check_contents: bool,
) -> Result<Checked, VerifyError> {
    let upper = scan_upper(&layers.upper.store())?;
    let mut rows = valid_rows(conn, &layers.upper.db())?;
    rows.sort_by(|a, b| a.path.cmp(&b.path));
    let missing = missing_content(layers, &upper, &rows);
    let hash_mismatches = check_contents.then(|| {
        let skip: HashSet<&str> = missing.iter().map(|m| m.path.as_str()).collect();
        let todo: Vec<&Row> = rows
            .iter()
            .filter(|r| !skip.contains(r.path.to_absolute().as_str()))
            .collect();
        hash_mismatches(layers, &upper, &todo)
    });
    let problems = problems(conn, layers, &upper, &rows, missing, hash_mismatches)?;
    Ok(Checked { problems, rows })
}

/// Runs every check again after `done` repaired what `before` found. The
/// result is what [`check`] would say now, but contents are hashed only
/// where they may have changed: valid paths the first check could not hash
/// (their content was missing, or hidden by a whiteout the repair removed)
/// and rows that are new or whose recorded hash or layer changed (a
/// re-read of the lowers); the first check's verdicts stand for the rest.
pub fn check_after_repair(
    conn: &Connection,
    layers: &Layers,
    before: &Checked,
    done: &repair::Repairs,
) -> Result<Problems, VerifyError> {
    let upper = scan_upper(&layers.upper.store())?;
    let rows = valid_rows(conn, &layers.upper.db())?;
    let missing = missing_content(layers, &upper, &rows);
    let hash_mismatches =
        before.problems.hash_mismatches.as_deref().map(|found| {
            mismatches_after_repair(layers, &upper, &rows, &missing, before, found, done)
        });
    problems(conn, layers, &upper, &rows, missing, hash_mismatches)
}

/// The checks that hash nothing, around the two that may.
fn problems(
    conn: &Connection,
    layers: &Layers,
    upper: &UpperStore,
    rows: &[Row],
    missing_content: Vec<MissingContent>,
    hash_mismatches: Option<Vec<HashMismatch>>,
) -> Result<Problems, VerifyError> {
    Ok(Problems {
        damaged_database: Vec::new(),
        unregistered: unregistered(layers, upper, rows),
        partial_entries: partial_entries(layers, upper, rows),
        hidden: hidden(conn, layers, upper, rows)?,
        duplicates: duplicates(layers, upper),
        dangling_references: dangling_references(conn, &layers.upper.db())?,
        missing_content,
        hash_mismatches,
        stale_published: stale_published(layers, rows),
    })
}

/// Entries of the lowers' published indexes whose path is not a valid path
/// of the merged database. An index that cannot be read is logged and
/// skipped (the tree skips it too).
pub(crate) fn stale_published(layers: &Layers, rows: &[Row]) -> Vec<StalePublished> {
    let valid: HashSet<&str> = rows.iter().map(|r| r.path.base_name()).collect();
    let mut out = Vec::new();
    for lower in &layers.lowers {
        let db = lower.dir.join("var/nix/db/db.sqlite");
        if !db.exists() {
            continue;
        }
        let entries = match crate::published::read(&db) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(db = %db.display(), error = %e, "cannot read the lower's published index; not checked");
                continue;
            }
        };
        for e in entries {
            let name = e.path.trim_start_matches("/nix/store/");
            if valid.contains(name) {
                continue;
            }
            out.push(StalePublished {
                lower: lower.dir.display().to_string(),
                reason: if lower.has(name) {
                    StaleReason::NotSynced
                } else {
                    StaleReason::GoneFromLower
                },
                reference: e.reference,
                path: e.path,
            });
        }
    }
    out.sort_by(|a, b| (&a.lower, &a.reference).cmp(&(&b.lower, &b.reference)));
    out
}

/// Hash mismatches after a repair: the first check's verdict for content
/// that is what it hashed then, a fresh hash for the rest.
fn mismatches_after_repair(
    layers: &Layers,
    upper: &UpperStore,
    rows: &[Row],
    missing: &[MissingContent],
    before: &Checked,
    found: &[HashMismatch],
    done: &repair::Repairs,
) -> Vec<HashMismatch> {
    let missing_now: HashSet<&str> = missing.iter().map(|m| m.path.as_str()).collect();
    let missing_before: HashSet<&str> = before
        .problems
        .missing_content
        .iter()
        .map(|m| m.path.as_str())
        .collect();
    let registered: HashSet<&str> = done.registered.iter().map(String::as_str).collect();
    let removed: HashSet<&str> = done.duplicates_removed.iter().map(String::as_str).collect();
    let found: HashMap<&str, &HashMismatch> = found.iter().map(|m| (m.path.as_str(), m)).collect();
    let mut out = Vec::new();
    let mut todo = Vec::new();
    for row in rows {
        let path = row.path.to_absolute();
        // Nothing to hash, or registered just now with the hash of this
        // very content.
        if missing_now.contains(path.as_str()) || registered.contains(path.as_str()) {
            continue;
        }
        let hashed_before = !missing_before.contains(path.as_str())
            && before
                .rows
                .binary_search_by(|b| b.path.cmp(&row.path))
                .is_ok_and(|i| {
                    before.rows[i].hash == row.hash && before.rows[i].origin == row.origin
                });
        match (hashed_before, found.get(path.as_str())) {
            (false, _) => todo.push(row),
            // It hashed right then. So does a removed upper copy's lower
            // copy: the repair removes a copy only where both hash alike.
            (true, None) => {}
            // A removed copy's mismatch may have been its unreadability.
            (true, Some(_)) if removed.contains(path.as_str()) => todo.push(row),
            (true, Some(m)) => out.push(HashMismatch {
                path,
                layer: layers.label(row.origin),
                expected: row.hash.clone(),
                actual: m.actual.clone(),
            }),
        }
    }
    out.extend(hash_mismatches(layers, upper, &todo));
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Whether some lower has `name` and no whiteout in the upper hides it.
fn visible_in_a_lower(layers: &Layers, upper: &UpperStore, name: &str) -> bool {
    upper.get(name) != Some(&Entry::Whiteout) && layers.lowers.iter().any(|l| l.has(name))
}

/// Valid paths whose content is missing in their layer: a lower path whose
/// lower lacks the entry or whose name the upper whites out; an upper path
/// with no entry in the upper and none visible in any lower.
pub(crate) fn missing_content(
    layers: &Layers,
    upper: &UpperStore,
    rows: &[Row],
) -> Vec<MissingContent> {
    let mut out = Vec::new();
    for row in rows {
        let name = row.path.base_name();
        let reason = if let Origin::Lower(id) = row.origin {
            match (upper.get(name), layers.lower(id)) {
                (Some(Entry::Whiteout), _) => Some(MissingReason::Whiteout),
                (_, Some(l)) if l.has(name) => None,
                _ => Some(MissingReason::Absent),
            }
        } else if upper.get(name) == Some(&Entry::Real) || visible_in_a_lower(layers, upper, name) {
            None
        } else if upper.get(name) == Some(&Entry::Whiteout) {
            Some(MissingReason::Whiteout)
        } else {
            Some(MissingReason::Absent)
        };
        if let Some(reason) = reason {
            out.push(MissingContent {
                path: row.path.to_absolute(),
                layer: layers.label(row.origin),
                reason,
            });
        }
    }
    out
}

/// Entries of the upper store that are not valid paths (Nix's bookkeeping
/// and whiteouts aside).
pub(crate) fn unregistered(layers: &Layers, upper: &UpperStore, rows: &[Row]) -> Vec<Unregistered> {
    let valid: HashSet<&str> = rows.iter().map(|r| r.path.base_name()).collect();
    let mut out: Vec<Unregistered> = upper
        .iter()
        .filter(|(name, kind)| {
            **kind == Entry::Real && !is_bookkeeping(name, upper) && !valid.contains(name.as_str())
        })
        .map(|(name, _)| Unregistered {
            path: format!("{STORE_DIR}/{name}"),
            bytes: apparent_size(&layers.upper.store().join(name)),
            registrable: StorePath::from_base_name(name).is_ok(),
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Upper entries that are not valid paths and have a `<name>.lock` that
/// no process holds: left by a Nix that was killed while it wrote them.
/// While a process holds the lock, the entry is work in progress and not
/// reported.
pub(crate) fn partial_entries(layers: &Layers, upper: &UpperStore, rows: &[Row]) -> Vec<Partial> {
    let valid: HashSet<&str> = rows.iter().map(|r| r.path.base_name()).collect();
    let mut out: Vec<Partial> = upper
        .iter()
        .filter(|(name, kind)| {
            **kind == Entry::Real
                && !name.starts_with('.')
                && !name.ends_with(".lock")
                && !valid.contains(name.as_str())
                && upper.contains_key(&format!("{name}.lock"))
        })
        .filter(|(name, _)| !lock_held(layers, name))
        .map(|(name, _)| Partial {
            path: format!("{STORE_DIR}/{name}"),
            bytes: apparent_size(&layers.upper.store().join(name)),
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Where a process may have locked `<name>.lock`: through the merged store
/// (where Nix opens it; overlayfs gives that file its own inode, so a lock
/// taken there is not seen through the upper's directory) and in the
/// upper's own directory.
pub(crate) fn lock_paths(layers: &Layers, name: &str) -> Vec<PathBuf> {
    let lock = format!("{name}.lock");
    layers
        .mounted_store
        .iter()
        .map(|m| m.join(&lock))
        .chain([layers.upper.store().join(&lock)])
        .collect()
}

/// Whether a process holds the lock on `<name>.lock`: Nix takes it with
/// flock(2); a POSIX (fcntl) lock counts too. A lock file that cannot be
/// opened counts as held (nothing is reported or touched then).
fn lock_held(layers: &Layers, name: &str) -> bool {
    lock_paths(layers, name)
        .iter()
        .any(|p| match fs::File::open(p) {
            Ok(f) => locked(&f),
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        })
}

/// Whether another process holds a flock or fcntl lock on `f`. Takes the
/// flock for a moment to tell.
pub(crate) fn locked(f: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; LOCK_NB never blocks.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return true;
    }
    // SAFETY: as above; our own flock goes with the unlock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    posix_locked(f)
}

/// Whether some process holds a POSIX (fcntl) lock on any part of `f`.
pub(crate) fn posix_locked(f: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid argument; F_GETLK only reads.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid descriptor and a valid flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut l) };
    r != 0 || l.l_type != libc::F_UNLCK as libc::c_short
}

/// Whiteouts in the upper over paths a lower of the stack has (as its
/// database listed them at the last sync).
pub(crate) fn hidden(
    conn: &Connection,
    layers: &Layers,
    upper: &UpperStore,
    rows: &[Row],
) -> Result<Vec<Hidden>, VerifyError> {
    let db = layers.upper.db();
    let valid: HashSet<&str> = rows.iter().map(|r| r.path.base_name()).collect();
    let mut stmt = conn
        .prepare(
            "select l.dir from NixfsLayerLower l cross join NixfsLayerLowerPath lp on lp.lower = l.id and lp.path = ?1
             where l.priority is not null order by l.priority limit 1",
        )
        .map_err(sql_err(&db))?;
    let mut out = Vec::new();
    for (name, kind) in upper {
        if *kind != Entry::Whiteout {
            continue;
        }
        let path = format!("{STORE_DIR}/{name}");
        let lower: Option<String> = stmt
            .query_row([&path], |r| r.get(0))
            .optional()
            .map_err(sql_err(&db))?;
        if let Some(lower) = lower {
            out.push(Hidden {
                valid: valid.contains(name.as_str()),
                path,
                lower,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Real upper entries for paths a lower's store has too.
pub(crate) fn duplicates(layers: &Layers, upper: &UpperStore) -> Vec<Duplicate> {
    let mut out: Vec<Duplicate> = upper
        .iter()
        .filter(|(name, kind)| **kind == Entry::Real && !is_bookkeeping(name, upper))
        .filter_map(|(name, _)| {
            let lower = layers.lowers.iter().find(|l| l.has(name))?;
            Some(Duplicate {
                path: format!("{STORE_DIR}/{name}"),
                lower: lower.dir.display().to_string(),
                bytes: apparent_size(&layers.upper.store().join(name)),
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// References whose referrer or reference is not a valid path: Refs rows
/// with no ValidPaths row at either end. This is what SQLite's foreign key
/// check on Refs reports for Nix's schema, and it also finds them in a
/// database whose foreign key definitions were lost.
pub fn dangling_references(
    conn: &Connection,
    db: &Path,
) -> Result<Vec<DanglingReference>, VerifyError> {
    let err = sql_err(db);
    let mut pairs: BTreeSet<(i64, i64)> = BTreeSet::new();
    conn.prepare(
        "select r.referrer, r.reference from Refs r
         where not exists (select 1 from ValidPaths v where v.id = r.reference)
            or not exists (select 1 from ValidPaths v where v.id = r.referrer)",
    )
    .and_then(|mut s| {
        for p in s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
            pairs.insert(p?);
        }
        Ok(())
    })
    .map_err(&err)?;
    let name = |id: i64| -> Result<String, VerifyError> {
        Ok(conn
            .query_row("select path from ValidPaths where id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(&err)?
            .unwrap_or_else(|| format!("#{id}")))
    };
    pairs
        .into_iter()
        .map(|(a, b)| {
            Ok(DanglingReference {
                referrer: name(a)?,
                reference: name(b)?,
            })
        })
        .collect()
}

/// Where a valid path's content is read from for hashing: the merged view
/// when mounted, else the layer it comes from.
fn content_location(layers: &Layers, upper: &UpperStore, row: &Row) -> Option<PathBuf> {
    let name = row.path.base_name();
    if let Some(m) = &layers.mounted_store {
        return Some(m.join(name));
    }
    if upper.get(name) == Some(&Entry::Real) {
        return Some(layers.upper.store().join(name));
    }
    let preferred = (row.origin.lower())
        .and_then(|id| layers.lower(id))
        .filter(|l| l.has(name));
    preferred
        .or_else(|| layers.lowers.iter().find(|l| l.has(name)))
        .map(|l| l.store().join(name))
}

/// Valid paths whose content does not hash to their recorded narHash.
fn hash_mismatches(layers: &Layers, upper: &UpperStore, rows: &[&Row]) -> Vec<HashMismatch> {
    let located: Vec<(&Row, PathBuf)> = rows
        .iter()
        .filter_map(|r| content_location(layers, upper, r).map(|p| (*r, p)))
        .collect();
    let paths: Vec<PathBuf> = located.iter().map(|(_, p)| p.clone()).collect();
    tracing::info!(paths = paths.len(), "hashing contents");
    let total: u64 = located.iter().map(|(r, _)| r.nar_size).sum();
    let stage = crate::progress::stage(
        "hashing contents",
        (total > 0).then_some(total),
        crate::progress::Unit::Bytes,
    );
    let hashes = hash_parallel(&paths);
    drop(stage);
    located
        .into_iter()
        .zip(hashes)
        .filter_map(|((row, _), h)| {
            let actual = match h {
                Ok(h) if h.matches_db(&row.hash) => return None,
                Ok(h) => h.to_db_string(),
                Err(e) => format!("unreadable: {e}"),
            };
            Some(HashMismatch {
                path: row.path.to_absolute(),
                layer: layers.label(row.origin),
                expected: row.hash.clone(),
                actual,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Upper;
    use crate::nar;
    use crate::stack::LowerLayer;

    #[test]
    fn bookkeeping_entries_are_not_store_content() {
        let mut upper = UpperStore::new();
        upper.insert(
            "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-building".into(),
            Entry::Real,
        );
        upper.insert(
            "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-building.lock".into(),
            Entry::Real,
        );
        assert!(is_bookkeeping(".links", &upper));
        assert!(is_bookkeeping("x.lock", &upper));
        assert!(is_bookkeeping(
            "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-building",
            &upper
        ));
        assert!(!is_bookkeeping(
            "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-done",
            &upper
        ));
    }

    #[test]
    fn after_a_repair_only_changed_contents_are_hashed() {
        const H: &str = "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5";
        let t = tempfile::tempdir().unwrap();
        let layers = Layers {
            upper: Upper::init(&t.path().join("upper")).unwrap(),
            lowers: vec![LowerLayer {
                id: 1,
                dir: t.path().join("lower"),
            }],
            mounted_store: None,
        };
        fs::create_dir_all(layers.lowers[0].store()).unwrap();
        let good = nar::hash_file_contents(b"good").to_db_string();
        // Each row's content (in the lower, or the upper for `d`) and
        // whether it hashes to the row's recorded hash; hashing a row whose
        // verdict is reused would change the answer.
        let path = |n: &str| StorePath::parse(&format!("/nix/store/{H}-{n}")).unwrap();
        let row = |n: &str, origin: Origin| Row {
            path: path(n),
            hash: good.clone(),
            origin,
            nar_size: 0,
        };
        for (n, content) in [
            ("a", "changed behind our back"), // hashed fine before: not again
            ("b", "good"),                    // mismatched before: stays so
            ("c", "bad"),                     // was behind a whiteout: hashed
            ("e", "changed too"),             // removed duplicate, fine before
            ("f", "good"),                    // a new row: hashed
            ("g", "bad"),                     // a new row: hashed
        ] {
            fs::write(layers.lowers[0].store().join(path(n).base_name()), content).unwrap();
        }
        fs::write(layers.upper.store().join(path("d").base_name()), "unhashed").unwrap();
        let mismatch = |n: &str, actual: &str| HashMismatch {
            path: path(n).to_absolute(),
            layer: layers.label(Origin::Lower(1)),
            expected: good.clone(),
            actual: actual.into(),
        };
        let before = Checked {
            problems: Problems {
                missing_content: vec![MissingContent {
                    path: path("c").to_absolute(),
                    layer: layers.label(Origin::Lower(1)),
                    reason: MissingReason::Whiteout,
                }],
                hash_mismatches: Some(vec![mismatch("b", "sha256:as-found-then")]),
                ..Default::default()
            },
            rows: ["a", "b", "c", "e"]
                .map(|n| row(n, Origin::Lower(1)))
                .to_vec(),
        };
        let done = repair::Repairs {
            whiteouts_removed: vec![path("c").to_absolute()],
            duplicates_removed: vec![path("e").to_absolute()],
            registered: vec![path("d").to_absolute()],
            ..Default::default()
        };
        let rows: Vec<Row> = ["a", "b", "c"]
            .map(|n| row(n, Origin::Lower(1)))
            .into_iter()
            .chain([row("d", Origin::Upper)])
            .chain(["e", "f", "g"].map(|n| row(n, Origin::Lower(1))))
            .collect();
        let upper = scan_upper(&layers.upper.store()).unwrap();
        let missing = missing_content(&layers, &upper, &rows);
        assert_eq!(missing, vec![]);
        let found = before.problems.hash_mismatches.as_deref().unwrap();
        let bad = nar::hash_file_contents(b"bad").to_db_string();
        assert_eq!(
            mismatches_after_repair(&layers, &upper, &rows, &missing, &before, found, &done),
            vec![
                mismatch("b", "sha256:as-found-then"),
                mismatch("c", &bad),
                mismatch("g", &bad),
            ]
        );
    }

    #[test]
    fn a_dangling_symlink_is_a_lower_entry() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("store")).unwrap();
        std::os::unix::fs::symlink(
            "/nonexistent/target",
            t.path().join("store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-link"),
        )
        .unwrap();
        let l = LowerLayer {
            id: 1,
            dir: t.path().to_owned(),
        };
        assert!(l.has("3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-link"));
        assert!(!l.has("3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-absent"));
    }

    #[test]
    fn hashes_in_parallel_in_input_order() {
        let t = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..9)
            .map(|i| {
                let p = t.path().join(format!("f{i}"));
                fs::write(&p, "x".repeat(i * 1000)).unwrap();
                p
            })
            .collect();
        let got = hash_parallel(&paths);
        for (p, h) in paths.iter().zip(got) {
            assert_eq!(h.unwrap(), nar::hash_path(p).unwrap());
        }
        assert!(hash_parallel(&[t.path().join("missing")])[0].is_err());
    }
}
