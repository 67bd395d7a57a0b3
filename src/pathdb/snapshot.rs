//! Consistent private copies of a lower's database.
//!
//! A lower is read-only (often NFS), so it is never opened in place: SQLite
//! would want to create `-shm`/`-wal` files next to it, and `immutable=1`
//! would ignore rows that sit in the `-wal` file, not yet checkpointed. Instead
//! the database file and its `-wal` (or hot `-journal`) are copied into the
//! upper's scratch directory and opened there, where SQLite replays the WAL
//! as usual. The copy is retried if the lower changed while it was taken.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

use super::DbError;
use crate::layer::Lower;

const TRIES: u32 = 8;

/// A private copy of a lower's `db.sqlite` (plus WAL), removed on drop.
#[derive(Debug)]
pub struct Snapshot {
    _dir: TempDir,
    db: PathBuf,
}

impl Snapshot {
    /// The copied database file; attach or open it like any SQLite file.
    pub fn db(&self) -> &Path {
        &self.db
    }

    /// An SQLite error reading the copy: the upper's file system being full
    /// when that is the cause (the copy lives there), else `otherwise(e)`,
    /// which names the lower.
    pub fn blame(
        &self,
        e: rusqlite::Error,
        otherwise: impl FnOnce(rusqlite::Error) -> DbError,
    ) -> DbError {
        if super::out_of_space(&e, &self.db) {
            return crate::layer::Full::of(&self.db).into();
        }
        otherwise(e)
    }
}

/// What identifies one state of a file: size, mtime, device, inode, and
/// ctime (which no one can set back: `rsync -a`, `cp -a` and `touch -d`
/// restore mtimes, not ctimes).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime: m.modified().ok(),
        dev: m.dev(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The WAL header carries salts that change whenever the WAL restarts.
fn wal_header(p: &Path) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    fs::File::open(p).ok()?.read_exact(&mut h).ok()?;
    Some(h)
}

/// `db` with `suffix` appended to its name (`-wal`, `-shm`, `-journal`).
pub(super) fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Copies the lower's database into a fresh directory under `scratch`.
pub fn take(lower: &Lower, scratch: &Path) -> Result<Snapshot, DbError> {
    let src = lower.db();
    let io = super::io_err;
    fs::create_dir_all(scratch).map_err(io(scratch))?;
    for attempt in 1..=TRIES {
        let dir = tempfile::Builder::new()
            .prefix("lower-db-")
            .tempdir_in(scratch)
            .map_err(io(scratch))?;
        let dst = dir.path().join("db.sqlite");
        let (src_wal, src_journal) = (sidecar(&src, "-wal"), sidecar(&src, "-journal"));

        let before = (stamp(&src), wal_header(&src_wal), stamp(&src_journal));
        copy(&src, &dst)?;
        let wal_copied = copy_if_present(&src_wal, &sidecar(&dst, "-wal"))?;
        copy_if_present(&src_journal, &sidecar(&dst, "-journal"))?;
        let after = (stamp(&src), wal_header(&src_wal), stamp(&src_journal));

        // A checkpoint rewrites db.sqlite and, once complete, lets the next
        // writer restart the WAL with new salts. If neither the main file nor
        // the WAL header moved, the copied WAL still covers every page of the
        // copied main file that a checkpoint could have half-written.
        let main_stable = before.0 == after.0;
        let wal_stable =
            before.1 == after.1 && (!wal_copied || wal_header(&sidecar(&dst, "-wal")) == after.1);
        let journal_stable = before.2 == after.2;
        if main_stable && wal_stable && journal_stable {
            tracing::debug!(lower = %lower.dir().display(), attempt, wal = wal_copied, "lower database copied");
            return Ok(Snapshot { _dir: dir, db: dst });
        }
        tracing::info!(lower = %lower.dir().display(), attempt, "lower database changed while copying; retrying");
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
    }
    Err(DbError::Unstable {
        path: src,
        tries: TRIES,
    })
}

/// A cheap summary of a lower's state, a few `stat`s, in three parts:
/// which directories its path names (device and inode of the lower and of
/// its `store/`), its database files (main, WAL header, hot journal) and
/// its store directory (which changes with every entry added or removed).
/// Equal fingerprints mean the lower has not changed since they were taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub identity: String,
    pub db: String,
    pub store: String,
}

/// Marks the fingerprints of this version (older ones are one string).
const FINGERPRINT_VERSION: &str = "fp2";

impl Fingerprint {
    /// The text kept in the merged database (`NixfsLayerLower.fingerprint`).
    pub fn encode(&self) -> String {
        format!(
            "{FINGERPRINT_VERSION}|{}|{}|{}",
            self.identity, self.db, self.store
        )
    }

    /// Reads what [`Fingerprint::encode`] wrote; None for an older
    /// version's (or no) fingerprint.
    pub fn decode(text: &str) -> Option<Fingerprint> {
        let mut parts = text.split('|');
        if parts.next() != Some(FINGERPRINT_VERSION) {
            return None;
        }
        let (identity, db, store) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Fingerprint {
            identity: identity.to_owned(),
            db: db.to_owned(),
            store: store.to_owned(),
        })
    }
}

fn write_stamp(out: &mut String, p: &Path) {
    use std::fmt::Write;
    match stamp(p) {
        Some(s) => {
            let mtime = s
                .mtime
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let _ = write!(
                out,
                "{}:{}:{}:{}:{}.{};",
                s.len, mtime, s.dev, s.ino, s.ctime.0, s.ctime.1
            );
        }
        None => out.push_str("-;"),
    }
}

/// The lower's [`Fingerprint`] now.
pub fn fingerprint(lower: &Lower) -> Fingerprint {
    use std::fmt::Write;
    let db = lower.db();
    let identity = lower
        .identity()
        .map_or_else(|_| "-".to_owned(), |i| i.to_string());
    let mut db_part = String::new();
    for p in [db.clone(), sidecar(&db, "-wal"), sidecar(&db, "-journal")] {
        write_stamp(&mut db_part, &p);
    }
    if let Some(h) = wal_header(&sidecar(&db, "-wal")) {
        for b in &h[16..24] {
            let _ = write!(db_part, "{b:02x}");
        }
    }
    let mut store = String::new();
    write_stamp(&mut store, &lower.store());
    Fingerprint {
        identity,
        db: db_part,
        store,
    }
}

/// Copies `src` (in a lower) to `dst` (in the upper). Running out of space
/// is the upper's fault and named so; anything else is reading the lower.
fn copy(src: &Path, dst: &Path) -> Result<(), DbError> {
    match fs::copy(src, dst) {
        Ok(_) => Ok(()),
        Err(e) if crate::layer::no_space(&e) => Err(super::io_err(dst)(e)),
        Err(source) => Err(DbError::Io {
            path: src.to_owned(),
            source,
        }),
    }
}

fn copy_if_present(src: &Path, dst: &Path) -> Result<bool, DbError> {
    match copy(src, dst) {
        Ok(()) => Ok(true),
        Err(DbError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
