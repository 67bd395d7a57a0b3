//! Read-only questions to the merged database: is a store path valid, and
//! which layer provides it. Used by the `/nixfs/flake` resolver to answer
//! without building when a layer already has a path.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

use super::realisations::has_table;
use super::{open_read_only, sql_err, DbError};
use crate::stack::{Origin, Target};

/// Where a valid path was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// In a layer of our stack.
    Stack(Origin),
    /// Valid in a plain Nix store that is not a nixfs-layer stack.
    PlainStore,
}

/// The database of the store at `TARGET`, for a long-lived server: one
/// read-only connection, kept between questions (each is one statement:
/// no read transaction stays open) and opened afresh whenever the file on
/// the path is another one than it was opened on (`verify --repair`
/// rebuilds the database by renaming a new one into place), or after an
/// error.
#[derive(Debug, Clone)]
pub struct Lookup {
    db: PathBuf,
    conn: std::sync::Arc<std::sync::Mutex<Option<Opened>>>,
}

#[derive(Debug)]
struct Opened {
    /// Device and inode of the file it was opened on.
    file: (u64, u64),
    conn: Connection,
}

impl Lookup {
    /// The database Nix uses for the store at `target` (`TARGET/var/nix/db/db.sqlite`).
    pub fn for_target(target: &Path) -> Lookup {
        Lookup {
            db: Target::new(target).db(),
            conn: Default::default(),
        }
    }

    /// Which layer has `path` valid, or None when it is not valid.
    pub fn layer(&self, path: &Path) -> Result<Option<Found>, DbError> {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.db)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| DbError::Io {
                path: self.db.clone(),
                source,
            })?;
        let mut held = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_none_or(|o| o.file != now) {
            *held = Some(Opened {
                file: now,
                conn: open_read_only(&self.db)?,
            });
        }
        let opened = held.as_ref().expect("opened above");
        let answer = layer_of(&opened.conn, &self.db, path);
        if answer.is_err() {
            *held = None;
        }
        answer
    }
}

fn layer_of(conn: &Connection, db: &Path, path: &Path) -> Result<Option<Found>, DbError> {
    let err = sql_err(db);
    let path = path.to_string_lossy();
    if !has_table(conn, "main", "NixfsLayerOrigin").map_err(&err)? {
        let valid = conn
            .query_row("select 1 from ValidPaths where path = ?1", [&path], |_| {
                Ok(())
            })
            .optional()
            .map_err(&err)?;
        return Ok(valid.map(|()| Found::PlainStore));
    }
    let row: Option<Origin> = conn
        .query_row(
            "select o.layer from ValidPaths v left join NixfsLayerOrigin o on o.path = v.path
             where v.path = ?1",
            [&path],
            |r| r.get(0),
        )
        .optional()
        .map_err(&err)?;
    Ok(row.map(Found::Stack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_layer() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("var/nix/db/db.sqlite");
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        crate::pathdb::create(&db).unwrap();
        let c = crate::pathdb::open(&db).unwrap();
        for p in ["/nix/store/aaaa-up", "/nix/store/bbbb-low"] {
            c.execute(
                "insert into ValidPaths (path, hash, registrationTime, narSize) values (?1, 'sha256:x', 1, 1)",
                [p],
            )
            .unwrap();
        }
        c.execute(
            "update NixfsLayerOrigin set layer = 3 where path = '/nix/store/bbbb-low'",
            [],
        )
        .unwrap();
        let l = Lookup::for_target(t.path());
        assert_eq!(
            l.layer(Path::new("/nix/store/aaaa-up")).unwrap(),
            Some(Found::Stack(Origin::Upper))
        );
        assert_eq!(
            l.layer(Path::new("/nix/store/bbbb-low")).unwrap(),
            Some(Found::Stack(Origin::Lower(3)))
        );
        assert_eq!(l.layer(Path::new("/nix/store/cccc-none")).unwrap(), None);
    }

    #[test]
    fn a_plain_store_answers_store() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("var/nix/db/db.sqlite");
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        // Nix's own schema, without this tool's tables.
        let c = Connection::open(&db).unwrap();
        c.execute_batch(crate::pathdb::NIX_SCHEMA_SQL).unwrap();
        c.execute(
            "insert into ValidPaths (path, hash, registrationTime, narSize) values ('/nix/store/aaaa-x', 'sha256:x', 1, 1)",
            [],
        )
        .unwrap();
        let l = Lookup::for_target(t.path());
        assert_eq!(
            l.layer(Path::new("/nix/store/aaaa-x")).unwrap(),
            Some(Found::PlainStore)
        );
        assert_eq!(l.layer(Path::new("/nix/store/bbbb-y")).unwrap(), None);
    }
}
