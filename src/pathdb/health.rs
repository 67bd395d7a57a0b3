//! Whether the merged database is whole: SQLite's own checks of its pages
//! (`PRAGMA quick_check` before `mount` and `sync` change anything,
//! `PRAGMA integrity_check` in `verify`), Nix's tables being there, and
//! telling a damaged file from other SQLite failures.
//!
//! A damaged merged database is never written to: `mount` and `sync` refuse
//! it, and `verify --repair` rebuilds it from the layers (`rebuild.rs`).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::DbError;

/// Nix's tables every merged database has.
const NIX_TABLES: [&str; 3] = ["ValidPaths", "Refs", "DerivationOutputs"];

/// How many problems `integrity_check` lists at most.
const MAX_PROBLEMS: usize = 100;

/// The upper whose merged database `db` is (`UPPER/var/nix/db/db.sqlite`).
pub fn upper_of(db: &Path) -> PathBuf {
    db.ancestors()
        .nth(4)
        .map_or_else(|| db.to_owned(), Path::to_owned)
}

/// Whether `db` is an upper's merged database (not a lower's or a copy).
fn is_merged_db(db: &Path) -> bool {
    db.ends_with("var/nix/db/db.sqlite") && upper_of(db).join("nixfs-layer/upper.toml").is_file()
}

/// Whether a SQLite error says the file itself is damaged.
pub fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

pub fn damaged(db: &Path, detail: impl Into<String>) -> DbError {
    DbError::Damaged {
        db: db.to_owned(),
        upper: upper_of(db),
        detail: detail.into(),
    }
}

/// A SQLite failure on `db`: [`DbError::Damaged`] when it says the merged
/// database's file is damaged, else [`DbError::Sqlite`].
pub(crate) fn classify(db: &Path, source: rusqlite::Error) -> DbError {
    if is_damage(&source) && is_merged_db(db) {
        return damaged(db, source.to_string());
    }
    DbError::Sqlite {
        path: db.to_owned(),
        source,
    }
}

/// Nix's tables missing from the database `conn` has open (a truncated
/// file reads as an empty database).
pub(crate) fn missing_tables(conn: &Connection) -> rusqlite::Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for t in NIX_TABLES {
        let n: i64 = conn.query_row(
            "select count(*) from main.sqlite_master where type = 'table' and name = ?1",
            [t],
            |r| r.get(0),
        )?;
        if n == 0 {
            out.push(t);
        }
    }
    Ok(out)
}

/// Fails with [`DbError::Damaged`] unless Nix's tables are in `db`.
pub(crate) fn require_tables(conn: &Connection, db: &Path) -> Result<(), DbError> {
    let missing = missing_tables(conn).map_err(|e| classify(db, e))?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(damaged(
        db,
        format!(
            "Nix's table(s) {} are missing: the file is truncated or emptied",
            missing.join(", ")
        ),
    ))
}

fn open_checked(db: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify(db, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(120))
        .map_err(|e| classify(db, e))?;
    Ok(conn)
}

/// What one of SQLite's checks says about `db`: an empty list when whole.
/// `full` runs `integrity_check` (also compares every index with its
/// table), else `quick_check` (every page's structure, in about the time
/// of reading the file once). Missing Nix tables count as damage.
pub fn problems(db: &Path, full: bool) -> Result<Vec<String>, DbError> {
    let conn = match open_checked(db) {
        Ok(c) => c,
        Err(DbError::Damaged { detail, .. }) => return Ok(vec![detail]),
        Err(e) => return Err(e),
    };
    let pragma = if full {
        "integrity_check"
    } else {
        "quick_check"
    };
    let run = || -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("pragma {pragma}({MAX_PROBLEMS})"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        // One problem a line; SQLite heads them with the schema's name.
        let mut out = Vec::new();
        for row in rows {
            for line in row?.lines() {
                let line = line.trim();
                if !(line.is_empty() || line == "ok" || line.starts_with("*** in database")) {
                    out.push(line.to_owned());
                }
            }
        }
        for t in missing_tables(&conn)? {
            out.push(format!(
                "Nix's table {t} is missing: the file is truncated or emptied"
            ));
        }
        Ok(out)
    };
    match run() {
        Ok(v) => Ok(v),
        // So damaged that the check itself cannot read it.
        Err(e) if is_damage(&e) => Ok(vec![e.to_string()]),
        Err(e) => Err(DbError::Sqlite {
            path: db.to_owned(),
            source: e,
        }),
    }
}

/// `PRAGMA quick_check` on the merged database `db`: [`DbError::Damaged`]
/// naming the first problem when it is not whole.
pub fn quick_check(db: &Path) -> Result<(), DbError> {
    let found = problems(db, false)?;
    match found.first() {
        None => Ok(()),
        Some(first) => {
            let more = if found.len() > 1 {
                format!(" and {} more problem(s)", found.len() - 1)
            } else {
                String::new()
            };
            Err(damaged(db, format!("{first}{more}")))
        }
    }
}

/// Nix's store lock (`var/nix/db/big-lock`): every Nix process that opens
/// the store holds it shared (`flock`) for as long as it runs. Holding it
/// exclusively means no Nix process has the database open, and none can
/// start until it is dropped.
pub struct NixLock(#[allow(dead_code)] Flock<File>);

/// Takes Nix's store lock exclusively, without waiting; `None` when some
/// Nix process (a build, `nix-daemon`) holds it.
pub fn lock_out_nix(db_dir: &Path) -> Result<Option<NixLock>, DbError> {
    let path = db_dir.join("big-lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| DbError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .ok()
        .map(NixLock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_lacks_nix_tables() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("db.sqlite");
        std::fs::write(&db, b"").unwrap();
        let p = problems(&db, false).unwrap();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("ValidPaths") && p[0].contains("truncated"),
            "{p:?}"
        );
        std::fs::write(&db, vec![7u8; 8192]).unwrap();
        let p = problems(&db, true).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        let c = Connection::open(t.path().join("ok.sqlite")).unwrap();
        c.execute_batch(super::super::NIX_SCHEMA_SQL).unwrap();
        drop(c);
        assert_eq!(
            problems(&t.path().join("ok.sqlite"), true).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_upper_of_a_merged_database() {
        assert_eq!(
            upper_of(Path::new("/srv/up/var/nix/db/db.sqlite")),
            Path::new("/srv/up")
        );
    }
}
