//! The first merge into a fresh upper, fast: instead of copying a lower's
//! rows one by one into the upper's database, the private copy of the
//! lower's database becomes the merged database, and this tool's tables are
//! filled around it. Ids stay the lower's (ids are per database anyway).
//!
//! Only taken when it gives the same result as the row-by-row merge: the
//! merged database holds nothing but the pin, nothing is mounted, the
//! lower's database has exactly Nix's schema-10 objects (plus the CA tables
//! and the `SchemaMigrations` table of Nix ≥ 2.20),
//! and every row's store entry exists and is not hidden by a whiteout.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::path::Path;

use rusqlite::{params, Connection};

use super::snapshot::Snapshot;
use super::{pin, sql_err, DbError, LAYER_SCHEMA_SQL, NIX_SCHEMA_SQL};
use crate::layer::{Lower, Upper};
use crate::storepath::StorePath;

/// Tables a lower's database may have for it to be adopted as it is.
const KNOWN_TABLES: &[&str] = &[
    "ValidPaths",
    "Refs",
    "DerivationOutputs",
    "Realisations",
    "RealisationsRefs",
    // Nix ≥ 2.20 records its schema migrations here (the only one so far
    // makes the CA tables above); older Nix never reads it, newer Nix finds
    // its own rows where it left them.
    "SchemaMigrations",
    "sqlite_sequence",
];

/// Whether the merged database holds nothing but (at most) the pin.
pub fn is_fresh(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "select (select count(*) from (select 1 from ValidPaths limit 2)) <= 1
            and not exists (select 1 from NixfsLayerOrigin where layer != ?1)
            and not exists (select 1 from NixfsLayerLowerPath)",
        [pin::PIN_LAYER],
        |r| r.get(0),
    )
}

/// Nix's own objects (type, name, SQL without comments, whitespace
/// normalised) in a database.
fn nix_objects(conn: &Connection, schema: &str) -> rusqlite::Result<Vec<(String, String, String)>> {
    conn.prepare(&format!(
        "select type, name, sql from {schema}.sqlite_master
         where sql is not null and tbl_name in ('ValidPaths', 'Refs', 'DerivationOutputs')
           and name not like 'NixfsLayer%' order by type, name"
    ))?
    .query_map([], |r| {
        let sql: String = r.get(2)?;
        // Comments differ between Nix versions (2.26 has "-- base16
        // representation" after ValidPaths.hash); the statements do not.
        let sql: Vec<&str> = sql
            .lines()
            .flat_map(|l| l.split("--").next().unwrap_or("").split_whitespace())
            .collect();
        Ok((r.get(0)?, r.get(1)?, sql.join(" ")))
    })?
    .collect()
}

/// Whether the lower's database can become the merged one as it is.
fn qualifies(
    snap: &Connection,
    copy: &Snapshot,
    lower: &Lower,
    whiteouts: &HashSet<OsString>,
) -> Result<bool, DbError> {
    let err = |e: rusqlite::Error| {
        copy.blame(e, |e| DbError::NotNixDb {
            path: lower.db(),
            detail: e.to_string(),
        })
    };
    let reference = Connection::open_in_memory().map_err(&err)?;
    reference.execute_batch(NIX_SCHEMA_SQL).map_err(&err)?;
    if nix_objects(snap, "main").map_err(&err)? != nix_objects(&reference, "main").map_err(&err)? {
        tracing::info!(lower = %lower.dir().display(), "lower database schema differs from Nix 2.x's schema 10 layout; merging row by row");
        return Ok(false);
    }
    let tables: Vec<String> = snap
        .prepare("select name from sqlite_master where type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(&err)?;
    if let Some(t) = tables.iter().find(|t| !KNOWN_TABLES.contains(&t.as_str())) {
        tracing::info!(lower = %lower.dir().display(), table = %t, "lower database has a table this Nix may not expect; merging row by row");
        return Ok(false);
    }
    let store = lower.store();
    let present = super::merge::list_store(&store)?;
    let mut stmt = snap.prepare("select path from ValidPaths").map_err(&err)?;
    let mut rows = stmt.query([]).map_err(&err)?;
    while let Some(row) = rows.next().map_err(&err)? {
        let path: String = row.get(0).map_err(&err)?;
        let ok = StorePath::parse(&path).is_ok_and(|sp| {
            let name = OsString::from(sp.base_name());
            present.contains(&name) && !whiteouts.contains(&name)
        });
        if !ok {
            tracing::info!(lower = %lower.dir().display(), %path, "a lower row has no usable store entry; merging row by row");
            return Ok(false);
        }
    }
    Ok(true)
}

/// Makes the snapshot of `lower` the upper's merged database, if it
/// qualifies (at `target`); returns how many paths it registered, or None when it does
/// not qualify (nothing was changed then).
pub fn adopt(
    upper: &Upper,
    lower: &Lower,
    snap: &Snapshot,
    whiteouts: &HashSet<OsString>,
    fingerprint: &str,
    target: &Path,
) -> Result<Option<u64>, DbError> {
    let db = snap.db();
    // The copy becomes the merged database (`target`, normally the
    // upper's): errors name that.
    let err = sql_err(target);
    let mut conn = Connection::open(db).map_err(&err)?;
    if !qualifies(&conn, snap, lower, whiteouts)? {
        return Ok(None);
    }
    conn.pragma_update(None, "journal_mode", "wal")
        .map_err(&err)?;
    conn.pragma_update(None, "foreign_keys", "on")
        .map_err(&err)?;
    let tx = conn.transaction().map_err(&err)?;
    tx.execute_batch(LAYER_SCHEMA_SQL).map_err(&err)?;
    // Every row is the lower's: counted once below rather than one by one
    // by the trigger (the schema puts it back).
    tx.execute_batch("drop trigger NixfsLayerCountOnInsert")
        .map_err(&err)?;
    let id: i64 = tx
        .query_row(
            "insert into NixfsLayerLower (dir, priority, fingerprint, syncedAt)
             values (?1, 0, ?2, strftime('%s', 'now')) returning id",
            params![lower.dir().to_string_lossy(), fingerprint],
            |r| r.get(0),
        )
        .map_err(&err)?;
    tx.execute(
        "insert into NixfsLayerOrigin (path, layer) select path, ?1 from ValidPaths",
        [id],
    )
    .map_err(&err)?;
    tx.execute(
        "insert into NixfsLayerLowerPath (lower, path, narSize) select ?1, path, narSize from ValidPaths",
        [id],
    )
    .map_err(&err)?;
    let n: u64 = tx
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .map_err(&err)?;
    tx.execute_batch(LAYER_SCHEMA_SQL).map_err(&err)?;
    tx.execute("delete from NixfsLayerCounts", [])
        .map_err(&err)?;
    tx.execute(
        "insert into NixfsLayerCounts (provided) values (?1)",
        [n as i64],
    )
    .map_err(&err)?;
    let pin_id = pin::ensure(&tx, upper, &upper.store())?;
    // Every path but the pin comes from this lower: the tops are the paths
    // nothing else refers to.
    tx.execute(
        "insert or ignore into Refs (referrer, reference)
         select ?1, v.id from ValidPaths v
         where v.id != ?1 and not exists
           (select 1 from Refs r indexed by IndexReference where r.reference = v.id and r.referrer != v.id)",
        [pin_id],
    )
    .map_err(&err)?;
    tx.commit().map_err(&err)?;
    conn.pragma_update(None, "wal_checkpoint", "truncate")
        .map_err(&err)?;
    drop(conn);

    let ca_schema = lower.db_dir().join("ca-schema");
    if ca_schema.exists() {
        let _ = fs::copy(&ca_schema, upper.db_dir().join("ca-schema"));
    }
    replace_db(db, target)?;
    Ok(Some(n))
}

/// Puts `new` in place of the database at `target` (same filesystem),
/// dropping the old one's WAL and shared-memory files first so SQLite never
/// applies them to the new file.
pub(crate) fn replace_db(new: &Path, target: &Path) -> Result<(), DbError> {
    let io = super::io_err;
    for suffix in ["-wal", "-shm"] {
        let side = super::snapshot::sidecar(target, suffix);
        match fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&side)(e)),
        }
    }
    fs::rename(new, target).map_err(io(target))?;
    if let Some(dir) = target.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}
