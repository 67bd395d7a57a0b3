//! Per-layer figures from the merged database, for `status`.

use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use super::{sql_err, DbError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpperStats {
    /// Valid paths registered through the merged store (builds, adds).
    pub paths: u64,
    /// Their summed NAR size in bytes.
    pub bytes: u64,
    /// Of those, the ones no lower has.
    pub upper_only_paths: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LowerStats {
    pub dir: String,
    /// Position in the stack: 0 is the first --lower, on top.
    pub priority: u64,
    /// Valid paths in the lower (with their store entry present) at the last sync.
    pub paths: u64,
    /// Their summed NAR size in bytes.
    pub bytes: u64,
    /// How many valid paths of the merged store this lower provides.
    pub provided_paths: u64,
    /// Unix time of the last sync.
    pub synced_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbStats {
    /// Valid paths of the layers (the pin left out).
    pub valid_paths: u64,
    /// Every row of ValidPaths, the pin too: what `nix path-info --all` lists.
    pub nix_valid_paths: u64,
    pub upper: UpperStats,
    pub lowers: Vec<LowerStats>,
}

/// Reads the figures of the merged database at `db`.
pub fn read(conn: &Connection, db: &Path) -> Result<DbStats, DbError> {
    let err = sql_err(db);
    let valid_paths = conn
        .query_row(
            "select count(*) from NixfsLayerOrigin where layer >= 0",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    let nix_valid_paths = conn
        .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
        .map_err(&err)?;
    let upper = conn
        .query_row(
            "select count(*), coalesce(sum(v.narSize), 0),
                    coalesce(sum(not exists (select 1 from NixfsLayerLower l
                                             cross join NixfsLayerLowerPath lp on lp.lower = l.id and lp.path = o.path
                                             where l.priority is not null)), 0)
             from NixfsLayerOrigin o join ValidPaths v on v.path = o.path
             where o.layer = 0",
            [],
            |r| {
                Ok(UpperStats {
                    paths: r.get(0)?,
                    bytes: r.get(1)?,
                    upper_only_paths: r.get(2)?,
                })
            },
        )
        .map_err(&err)?;
    let lowers = conn
        .prepare(
            "select l.dir, l.priority,
                    (select count(*) from NixfsLayerLowerPath m where m.lower = l.id),
                    (select coalesce(sum(m.narSize), 0) from NixfsLayerLowerPath m where m.lower = l.id),
                    (select count(*) from NixfsLayerOrigin o where o.layer = l.id), l.syncedAt
             from NixfsLayerLower l where l.priority is not null order by l.priority",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(LowerStats {
                    dir: r.get(0)?,
                    priority: r.get(1)?,
                    paths: r.get(2)?,
                    bytes: r.get(3)?,
                    provided_paths: r.get(4)?,
                    synced_at: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&err)?;
    Ok(DbStats {
        valid_paths,
        nix_valid_paths,
        upper,
        lowers,
    })
}
