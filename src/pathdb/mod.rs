//! The Nix path database: creating the upper's, snapshotting the lowers',
//! merging them, and the provenance of every valid path.

pub mod adopt;
pub mod health;
pub mod journal;
pub mod keep;
pub mod lookup;
pub mod merge;
pub mod pin;
pub mod realisations;
pub mod snapshot;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::layer::{self, Full, NIX_SCHEMA_VERSION};

/// Nix's own tables, schema version 10.
pub const NIX_SCHEMA_SQL: &str = include_str!("../../sqlite-schema/nix-schema-10.sql");
/// This tool's tables and triggers inside the merged database.
pub const LAYER_SCHEMA_SQL: &str = include_str!("../../sqlite-schema/nixfs-layer.sql");

/// How long to wait for Nix (or another sync) to release the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: not a Nix database ({detail}); is this the right lower?")]
    NotNixDb { path: PathBuf, detail: String },
    #[error("{path}: could not take a consistent copy (it kept changing over {tries} tries); retry when the lower's publisher is idle")]
    Unstable { path: PathBuf, tries: u32 },
    #[error("lower {lower}: its database lists {bad} rows that are not store paths under /nix/store (first: {first}); this tool serves /nix/store only")]
    ForeignStoreDir {
        lower: PathBuf,
        bad: usize,
        first: String,
    },
    #[error("{0}")]
    ClosureBroken(ClosureBroken),
    #[error(transparent)]
    Full(#[from] Full),
    #[error("{db}: the merged database is damaged ({detail}); nothing was changed or mounted; with no Nix process using this store, rebuild it from the layers: `nixfs-layer verify --repair --upper {upper}`")]
    Damaged {
        db: PathBuf,
        upper: PathBuf,
        detail: String,
    },
    #[error("{}: Nix is using this store (a process holds its big-lock: nix-daemon, a build, a nix command); stop it, then run the repair again", .db_dir.display())]
    NixBusy { db_dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DbError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            DbError::NotNixDb { .. }
            | DbError::ForeignStoreDir { .. }
            | DbError::ClosureBroken(_)
            | DbError::Damaged { .. } => Kind::DataErr,
            DbError::Unstable { .. } | DbError::NixBusy { .. } => Kind::TempFail,
            DbError::Io { .. } | DbError::Full(_) => Kind::IoErr,
            DbError::Sqlite { .. } => Kind::Software,
        }
    }
}

/// Paths a sync would drop while paths that stay valid still need them.
#[derive(Debug)]
pub struct ClosureBroken {
    /// (path that would go, a valid path that refers to it)
    pub needed: Vec<(String, String)>,
    pub total: usize,
}

impl std::fmt::Display for ClosureBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .needed
            .iter()
            .map(|(gone, by)| format!("{gone} (needed by {by})"))
            .collect();
        write!(
            f,
            "sync refused, the merged database is unchanged: {} path(s) left the lowers but upper paths still need them: {}{}; put them back in a lower, delete the upper paths that need them (nix-store --delete), or switch with `nixfs-layer sync --lower NEWDIR --keep-needed` while the old lower is still mounted",
            self.total,
            shown.join(", "),
            if self.total > shown.len() { ", …" } else { "" }
        )
    }
}

/// An SQLite error on the file at `path`: one that says its file system is
/// full becomes [`DbError::Full`], one that says the merged database's file
/// is damaged [`DbError::Damaged`].
pub(crate) fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> DbError + '_ {
    move |source| {
        if out_of_space(&source, path) {
            return Full::of(path).into();
        }
        health::classify(path, source)
    }
}

/// Whether an SQLite error on the file at `path` came from a full file
/// system: SQLITE_FULL, or an I/O error (a shared-memory file that could
/// not grow, say) while that file system has no room left.
pub(crate) fn out_of_space(e: &rusqlite::Error, path: &Path) -> bool {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => true,
        Some(rusqlite::ErrorCode::SystemIoFailure) => layer::nearly_full(path),
        _ => false,
    }
}

/// An I/O error writing `path` (in the upper): "full" when it says so.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DbError + '_ {
    move |source| {
        if layer::no_space(&source) {
            return Full::of(path).into();
        }
        DbError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Creates a fresh merged database (Nix schema 10 plus this tool's tables)
/// at `db`, and Nix's `schema` file next to it. Leaves an existing one as it
/// is. The database is made under a temporary name and renamed into place
/// once complete, so a failure (a full disk) leaves no half-made one behind.
pub fn create(db: &Path) -> Result<(), DbError> {
    let schema_file = db.with_file_name("schema");
    if !db.exists() {
        let dir = db.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".db.sqlite-new-")
            .tempfile_in(dir)
            .map_err(io_err(db))?
            .into_temp_path();
        let made = (|| {
            let conn = Connection::open(&tmp)?;
            conn.pragma_update(None, "journal_mode", "wal")?;
            conn.execute_batch(NIX_SCHEMA_SQL)?;
            conn.execute_batch(LAYER_SCHEMA_SQL)?;
            init_counts(&conn)?;
            conn.close().map_err(|(_, e)| e)
        })();
        if let Err(e) = made {
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(snapshot::sidecar(&tmp, suffix));
            }
            return Err(sql_err(db)(e));
        }
        std::fs::rename(&tmp, db).map_err(io_err(db))?;
        // Renamed: nothing left for the guard to remove.
        let _ = tmp.keep();
    }
    if !schema_file.exists() {
        std::fs::write(&schema_file, NIX_SCHEMA_VERSION).map_err(io_err(&schema_file))?;
    }
    Ok(())
}

/// Opens the merged database for reading and writing, the way Nix does
/// (foreign keys on, waiting on locks), with this tool's tables present.
pub fn open(db: &Path) -> Result<Connection, DbError> {
    let mut conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(db))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(db))?;
    conn.pragma_update(None, "foreign_keys", "on")
        .map_err(sql_err(db))?;
    trace_statements(&mut conn);
    // Never write this tool's tables into a file that lost Nix's.
    health::require_tables(&conn, db)?;
    ensure_layer_tables(&mut conn).map_err(sql_err(db))?;
    Ok(conn)
}

/// Creates this tool's tables and triggers where they are missing. In a
/// database that had paths before them (one Nix made), every existing path
/// is recorded as the upper's, in the same transaction; from then on the
/// triggers keep provenance inside every transaction, Nix's included.
fn ensure_layer_tables(conn: &mut Connection) -> rusqlite::Result<()> {
    let has = |conn: &Connection| {
        conn.query_row(
            "select count(*) = 2 from sqlite_master where type = 'trigger'
             and name in ('NixfsLayerOriginOnInsert', 'NixfsLayerOriginOnDelete')",
            [],
            |r| r.get::<_, bool>(0),
        )
    };
    if has(conn)? {
        // Later additions to the schema (all idempotent) still apply.
        conn.execute_batch(LAYER_SCHEMA_SQL)?;
        return init_counts(conn);
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(LAYER_SCHEMA_SQL)?;
    tx.execute_batch(
        "delete from NixfsLayerOrigin where path not in (select path from ValidPaths);
         insert or ignore into NixfsLayerOrigin (path, layer) select path, 0 from ValidPaths;",
    )?;
    init_counts(&tx)?;
    tx.commit()
}

/// Gives the database its `NixfsLayerCounts` row if it has none (one made
/// before that table), counted once. Its triggers already exist (the
/// schema makes them first), so every change from here on is counted.
fn init_counts(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row("select exists (select 1 from NixfsLayerCounts)", [], |r| {
        r.get(0)
    })?;
    if !has {
        conn.execute(
            "insert into NixfsLayerCounts (provided)
             select (select count(*) from NixfsLayerOrigin where layer > 0)
             where not exists (select 1 from NixfsLayerCounts)",
            [],
        )?;
    }
    Ok(())
}

/// How many valid paths the lowers provide, from `NixfsLayerCounts` (kept
/// by triggers): one row read, whatever the size of the store.
pub(crate) fn provided_count(conn: &Connection) -> rusqlite::Result<u64> {
    use rusqlite::OptionalExtension;
    let kept: Option<i64> = conn
        .query_row("select provided from main.NixfsLayerCounts", [], |r| {
            r.get(0)
        })
        .optional()?;
    match kept {
        Some(n) => Ok(n.max(0) as u64),
        None => conn.query_row(
            "select count(*) from main.NixfsLayerOrigin where layer > 0",
            [],
            |r| r.get(0),
        ),
    }
}

/// With `NIXFS_LAYER_LOG=nixfs_layer::sql=trace`, logs every statement that
/// takes over a millisecond, with its time: the way to see where a slow
/// merge spends it.
fn trace_statements(conn: &mut Connection) {
    if tracing::enabled!(target: "nixfs_layer::sql", tracing::Level::TRACE) {
        let _ = conn.trace_v2(
            rusqlite::trace::TraceEventCodes::SQLITE_TRACE_PROFILE,
            Some(|e: rusqlite::trace::TraceEvent<'_>| {
                if let rusqlite::trace::TraceEvent::Profile(stmt, d) = e {
                    if d.as_micros() >= 1000 {
                        let sql = stmt.sql();
                        let sql: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                        tracing::trace!(target: "nixfs_layer::sql", elapsed = ?d, "{}", &sql[..sql.len().min(160)]);
                    }
                }
            }),
        );
    }
}

/// Opens the merged database read-only (for `status`).
pub fn open_read_only(db: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(db))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(db))?;
    health::require_tables(&conn, db)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_database_nix_made_records_its_paths_as_the_uppers() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(NIX_SCHEMA_SQL).unwrap();
        for p in ["/nix/store/a", "/nix/store/b"] {
            c.execute(
                "insert into ValidPaths (path, hash, registrationTime) values (?1, 'sha256:x', 0)",
                [p],
            )
            .unwrap();
        }
        drop(c);
        let origin = |c: &Connection| -> Vec<(String, i64)> {
            c.prepare("select path, layer from NixfsLayerOrigin order by path")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let c = open(&db).unwrap();
        let expect = vec![
            ("/nix/store/a".to_owned(), 0),
            ("/nix/store/b".to_owned(), 0),
        ];
        assert_eq!(origin(&c), expect);
        // From then on the triggers keep it.
        c.execute("delete from ValidPaths where path = '/nix/store/a'", [])
            .unwrap();
        drop(c);
        let c = open(&db).unwrap();
        assert_eq!(origin(&c), expect[1..]);
    }

    #[test]
    fn the_provided_count_follows_every_change_of_provenance() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        create(&db).unwrap();
        let c = open(&db).unwrap();
        let check = |c: &Connection| {
            let counted: u64 = c
                .query_row(
                    "select count(*) from NixfsLayerOrigin where layer > 0",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(provided_count(c).unwrap(), counted);
            counted
        };
        assert_eq!(check(&c), 0);
        let add = |p: &str| {
            c.execute(
                "insert into ValidPaths (path, hash, registrationTime) values (?1, 'sha256:x', 0)",
                [p],
            )
            .unwrap();
        };
        for p in [
            "/nix/store/a",
            "/nix/store/b",
            "/nix/store/c",
            "/nix/store/d",
        ] {
            add(p);
        }
        assert_eq!(check(&c), 0, "Nix's registrations are the upper's");
        // A merge's registrations: an upsert over existing rows as well.
        c.execute_batch(
            "insert into NixfsLayerOrigin (path, layer) values ('/nix/store/e', 2)
               on conflict (path) do update set layer = excluded.layer;
             insert into NixfsLayerOrigin (path, layer) values ('/nix/store/a', 1)
               on conflict (path) do update set layer = excluded.layer;
             insert into NixfsLayerOrigin (path, layer) values ('/nix/store/b', -1)
               on conflict (path) do update set layer = excluded.layer;",
        )
        .unwrap();
        assert_eq!(check(&c), 2);
        // Moved between lowers, adopted by the upper, given to a lower.
        c.execute_batch(
            "update NixfsLayerOrigin set layer = 3 where path = '/nix/store/a';
             update NixfsLayerOrigin set layer = 0 where path = '/nix/store/e';
             update NixfsLayerOrigin set layer = 1 where path in ('/nix/store/c', '/nix/store/d');",
        )
        .unwrap();
        assert_eq!(check(&c), 3);
        // Invalidated by Nix: provenance goes, and the count with it.
        c.execute("delete from ValidPaths where path = '/nix/store/c'", [])
            .unwrap();
        assert_eq!(check(&c), 2);
        // A database from before the count: counted once when opened.
        c.execute_batch("drop table NixfsLayerCounts").unwrap();
        drop(c);
        let c = open(&db).unwrap();
        assert_eq!(check(&c), 2);
        c.execute("delete from ValidPaths where path = '/nix/store/d'", [])
            .unwrap();
        assert_eq!(check(&c), 1);
    }
}
