//! `optimise`: drops the upper's copies of paths a lower has too.
//!
//! A path built (or imported) through the merged store lands in the upper;
//! when a lower later gains the same path (the template built it too), the
//! upper copy shadows an identical lower copy. Where the upper copy, the
//! top lower's copy and the recorded narHash all agree, the path becomes
//! lower-provided in one database transaction (provenance moves to that
//! lower, and the pin refers to it so Nix's collector keeps it, see
//! `pathdb::pin`), then the upper copy is moved out of the store (one
//! rename each, into `UPPER/nixfs-layer/optimise-trash`), the overlay is
//! remounted so that it forgets the removed entries, and the moved copies
//! are deleted.
//!
//! Killed at any point, the next `optimise` completes the run: a path
//! already lower-provided whose upper copy is still there is dropped like
//! any other (both copies are identical), and a trash directory left
//! behind is emptied, the overlay refreshed, then removed. The store holds
//! each copy whole or not at all, so what Nix sees is the same content
//! throughout. `mount` deletes such a trash directory too.

use std::path::PathBuf;

use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;

use crate::failpoint;
use crate::layer::Upper;
use crate::nar::{apparent_size, hash_parallel};
use crate::overlay::{self, MountError};
use crate::pathdb::{pin, sql_err, DbError};
use crate::stack::{LowerLayer, Origin};
use crate::storecopy;
use crate::storepath::base_name;

#[derive(Debug, thiserror::Error)]
pub enum OptimiseError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("{path}: {source}; the paths being dropped are lower-provided now (the upper copies hold the same bytes): run `nixfs-layer optimise` again to finish removing them")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl OptimiseError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            OptimiseError::Db(e) => e.kind(),
            OptimiseError::Mount(e) => e.kind(),
            OptimiseError::Remove { .. } => Kind::IoErr,
        }
    }
}

/// An upper copy that was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub path: String,
    /// The lower that provides it now.
    pub lower: String,
    /// Apparent size of the removed copy.
    pub bytes: u64,
}

/// A path both have that was left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Optimised {
    pub dropped: Vec<Dropped>,
    pub kept: Vec<Kept>,
    pub bytes_freed: u64,
    pub remounted: bool,
}

/// Optimises the stack mounted with `store` as its `TARGET/store`. The
/// caller holds the upper's lock.
pub fn optimise(
    conn: &mut Connection,
    upper: &Upper,
    lowers: &[LowerLayer],
    store: &std::path::Path,
) -> Result<Optimised, OptimiseError> {
    let db = upper.db();
    let err = sql_err(&db);
    let mut out = Optimised::default();
    // A run cut short after it moved copies out of the store: finish it.
    if upper.optimise_trash().exists() {
        tracing::warn!(
            "finishing an interrupted `optimise`: removing the copies it had moved out of the store"
        );
        empty_trash(upper, store)?;
        out.remounted = true;
    }
    // Registered paths (upper or lower, not the pin) with an upper entry
    // that a current lower has too.
    let rows: Vec<(String, String)> = conn
        .prepare("select o.path, v.hash, o.layer from NixfsLayerOrigin o join ValidPaths v on v.path = o.path order by o.path")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Origin>(2)?)))?
                .filter(|r| !matches!(r, Ok((_, _, Origin::Pin))))
                .map(|r| r.map(|(p, h, _)| (p, h)))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&err)?;
    let mut candidates: Vec<(String, String, &LowerLayer)> = Vec::new();
    for (path, hash) in rows {
        let name = base_name(&path);
        if std::fs::symlink_metadata(upper.store().join(name)).is_err() {
            continue;
        }
        // The overlay shows the first lower that has the entry.
        if let Some(l) = lowers.iter().find(|l| l.has(name)) {
            candidates.push((path, hash, l));
        }
    }
    if candidates.is_empty() {
        return Ok(out);
    }
    let pairs: Vec<PathBuf> = candidates
        .iter()
        .flat_map(|(p, _, l)| {
            let name = base_name(p);
            [upper.store().join(name), l.store().join(name)]
        })
        .collect();
    let hashes = hash_parallel(&pairs);
    let mut moving: Vec<(&str, &LowerLayer, PathBuf)> = Vec::new();
    for ((path, recorded, lower), pair) in candidates.iter().zip(hashes.chunks(2)) {
        let reason = match (&pair[0], &pair[1]) {
            (Ok(up), Ok(low)) if up == low && up.matches_db(recorded) => {
                moving.push((path, lower, upper.store().join(base_name(path))));
                continue;
            }
            (Ok(up), Ok(low)) if up == low => format!(
                "both copies hash to {}, the database records {recorded}; run `nixfs-layer verify --check-contents`",
                up.to_db_string()
            ),
            (Ok(_), Ok(_)) => format!("the copy in {} differs from the upper's", lower.dir.display()),
            (Err(e), _) | (_, Err(e)) => format!("could not be read: {e}"),
        };
        out.kept.push(Kept {
            path: path.clone(),
            reason,
        });
    }
    if moving.is_empty() {
        return Ok(out);
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let pin_id = pin::ensure(&tx, upper, store)?;
    tx.execute_batch(
        "create temp table if not exists optimised (path text primary key not null); delete from temp.optimised;",
    )
    .map_err(&err)?;
    for (path, lower, _) in &moving {
        tx.execute(
            "update NixfsLayerOrigin set layer = ?2 where path = ?1 and layer = ?3",
            params![path, Origin::Lower(lower.id), Origin::Upper],
        )
        .map_err(&err)?;
        tx.execute(
            "insert or ignore into temp.optimised (path) values (?1)",
            [path],
        )
        .map_err(&err)?;
    }
    pin::pin_tops(&tx, pin_id, "optimised").map_err(&err)?;
    tx.execute_batch("drop table temp.optimised")
        .map_err(&err)?;
    tx.commit().map_err(&err)?;
    failpoint::hit("optimise:committed");

    let trash = upper.optimise_trash();
    let remove_err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| OptimiseError::Remove { path, source }
    };
    std::fs::create_dir_all(&trash).map_err(remove_err(&trash))?;
    for (path, lower, entry) in moving {
        let bytes = apparent_size(&entry);
        std::fs::rename(&entry, trash.join(base_name(path))).map_err(remove_err(&entry))?;
        failpoint::hit("optimise:moved");
        tracing::info!(%path, bytes, "removed the upper copy of a path a lower has");
        out.bytes_freed += bytes;
        out.dropped.push(Dropped {
            path: path.to_owned(),
            lower: lower.dir.display().to_string(),
            bytes,
        });
    }
    empty_trash(upper, store)?;
    out.remounted = true;
    Ok(out)
}

/// Before a mount (no overlay to refresh): deletes the copies a killed
/// `optimise` had moved out of the store, completing its run.
pub fn finish_unmounted(upper: &Upper) -> Result<(), OptimiseError> {
    let trash = upper.optimise_trash();
    if !trash.exists() {
        return Ok(());
    }
    tracing::warn!(
        "finishing an interrupted `optimise`: removing the copies it had moved out of the store"
    );
    storecopy::remove_tree(&trash).map_err(|source| OptimiseError::Remove {
        path: trash.clone(),
        source,
    })
}

/// Makes the overlay forget the copies moved into the trash, then deletes
/// them and the trash directory (its absence says the run is complete).
fn empty_trash(upper: &Upper, store: &std::path::Path) -> Result<(), OptimiseError> {
    let trash = upper.optimise_trash();
    overlay::refresh(store)?;
    failpoint::hit("optimise:refreshed");
    storecopy::remove_tree(&trash).map_err(|source| OptimiseError::Remove {
        path: trash.clone(),
        source,
    })
}
