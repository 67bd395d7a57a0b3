//! Merging the lowers' databases into the upper's: the `sync` algorithm.
//!
//! The merged database is the upper's own Nix database. Every sync computes,
//! from fresh snapshots of the lowers, the set of lower paths that should be
//! valid ("wanted") and moves the merged database to it in one transaction:
//!
//! * a lower path is wanted when its row is in the lower's database, its
//!   entry is in the lower's `store/`, no whiteout in the upper hides it, and
//!   everything it references is wanted or registered in the upper;
//! * the first lower (in mount order) that offers a path provides it;
//! * a path Nix registered through the merged store (provenance 0, "upper")
//!   always wins and is never touched;
//! * lower-provided paths no longer wanted are invalidated, unless a path that
//!   stays valid still refers to them: then nothing changes and the sync
//!   fails naming them.
//!
//! Rows are matched by `path` text, never by id: ids are per database.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{open, realisations, snapshot, sql_err, ClosureBroken, DbError};
use crate::layer::{Lower, Upper};
use crate::storepath::StorePath;

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SyncSummary {
    /// Lower paths that became valid.
    pub added: u64,
    /// Lower paths that stopped being valid.
    pub removed: u64,
    /// Paths now provided by another lower than before.
    pub moved: u64,
    /// Lower-provided paths left as they were.
    pub unchanged: u64,
    /// Lower rows not registered because their store entry is missing (or
    /// hidden by a whiteout in the upper).
    pub missing_content: u64,
    /// Lower rows not registered because something they reference is not available.
    pub incomplete_closure: u64,
}

impl SyncSummary {
    pub fn changed(&self) -> bool {
        self.added + self.removed + self.moved > 0
    }
}

impl std::fmt::Display for SyncSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "added {}, removed {}, unchanged {}",
            self.added,
            self.removed,
            self.unchanged + self.moved
        )?;
        if self.moved > 0 {
            write!(f, " ({} now from another lower)", self.moved)?;
        }
        if self.missing_content > 0 {
            write!(
                f,
                "; skipped {} lower row(s) whose store entry is missing",
                self.missing_content
            )?;
        }
        if self.incomplete_closure > 0 {
            write!(
                f,
                "; skipped {} lower path(s) with references that are not available",
                self.incomplete_closure
            )?;
        }
        Ok(())
    }
}

/// Entries of a store directory.
fn list_store(dir: &Path) -> Result<HashSet<OsString>, DbError> {
    let io = |source| DbError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.file_name()).map_err(io))
        .collect()
}

/// Names the upper hides with an overlayfs whiteout (a 0/0 character device).
fn upper_whiteouts(store: &Path) -> Result<HashSet<OsString>, DbError> {
    let io = |source| DbError::Io {
        path: store.to_owned(),
        source,
    };
    let mut out = HashSet::new();
    for entry in fs::read_dir(store).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_char_device()
            && entry.metadata().map_err(io)?.rdev() == 0
        {
            out.insert(entry.file_name());
        }
    }
    Ok(out)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One lower as the merge sees it.
struct Attached<'a> {
    lower: &'a Lower,
    /// NixfsLayerLower.id
    id: i64,
    /// schema name of the attached snapshot
    alias: String,
}

/// Brings the upper's merged database in line with the lowers (see the
/// module docs). Nothing is written under any lower.
pub fn sync(upper: &Upper, lowers: &[Lower]) -> Result<SyncSummary, DbError> {
    let db = upper.db();
    let err = sql_err(&db);
    let snapshots = lowers
        .iter()
        .map(|l| snapshot::take(l, &upper.tmp_dir()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut conn = open(&db)?;
    conn.pragma_update(None, "temp_store", "memory")
        .map_err(&err)?;
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(&err)?;

    let mut attached = Vec::new();
    for (i, (lower, snap)) in lowers.iter().zip(&snapshots).enumerate() {
        let alias = format!("lower{i}");
        let not_nix = |detail: String| DbError::NotNixDb {
            path: lower.db(),
            detail,
        };
        conn.execute(
            "attach database ?1 as ?2",
            params![snap.db().to_string_lossy(), alias],
        )
        .map_err(|e| not_nix(e.to_string()))?;
        let has_table: Option<i64> = conn
            .query_row(
                &format!("select 1 from {alias}.sqlite_master where type = 'table' and name = 'ValidPaths'"),
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| not_nix(e.to_string()))?;
        if has_table.is_none() {
            return Err(not_nix("no ValidPaths table".into()));
        }
        attached.push(Attached {
            lower,
            id: 0,
            alias,
        });
    }

    let whiteouts = upper_whiteouts(&upper.store())?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(&err)?;
    reconcile_provenance(&tx).map_err(&err)?;
    register_lowers(&tx, &mut attached).map_err(&err)?;

    let mut summary = SyncSummary::default();
    tx.execute_batch(
        "create temp table lp (path text not null, lower integer not null, prio integer not null, lid integer not null, primary key (path, lower)) without rowid;
         create temp table want (path text primary key not null, lower integer not null, lid integer not null) without rowid;
         create index temp.want_lower on want(lower);",
    )
    .map_err(&err)?;

    for (prio, a) in attached.iter().enumerate() {
        summary.missing_content += load_lower_paths(&tx, a, prio, &whiteouts)?;
        tx.execute(
            "insert or ignore into want (path, lower, lid) select path, lower, lid from lp where lower = ?1",
            [a.id],
        )
        .map_err(&err)?;
    }
    summary.incomplete_closure = drop_incomplete(&tx, &attached).map_err(&err)?;

    tx.execute_batch(
        "create temp table added as
           select w.path, w.lower, w.lid from want w
           where not exists (select 1 from main.ValidPaths v where v.path = w.path);
         create temp table removed as
           select v.id, v.path from main.ValidPaths v join main.NixfsLayerOrigin o on o.path = v.path
           where o.layer != 0 and not exists (select 1 from want w where w.path = v.path);
         create index temp.removed_id on removed(id);
         create temp table moved as
           select w.path, w.lower, w.lid from want w join main.NixfsLayerOrigin o on o.path = w.path
           where o.layer != 0 and o.layer != w.lower;",
    )
    .map_err(&err)?;

    check_removals(&tx)
        .map_err(&err)?
        .map_or(Ok(()), |b| Err(DbError::ClosureBroken(b)))?;

    realisations::release_removed(&tx).map_err(&err)?;
    summary.removed = tx
        .execute_batch(
            "delete from main.Refs where referrer in (select id from removed);
             delete from main.ValidPaths where id in (select id from removed);",
        )
        .and_then(|_| tx.query_row("select count(*) from removed", [], |r| r.get(0)))
        .map_err(&err)?;
    summary.added = tx
        .query_row("select count(*) from added", [], |r| r.get(0))
        .map_err(&err)?;
    summary.moved = tx
        .query_row("select count(*) from moved", [], |r| r.get(0))
        .map_err(&err)?;
    for a in &attached {
        add_paths(&tx, a).map_err(&err)?;
        move_paths(&tx, a).map_err(&err)?;
        if realisations::has_table(&tx, &a.alias, "Realisations").map_err(&err)? {
            realisations::ensure_tables(&tx, &a.alias, &a.lower.db_dir(), &upper.db_dir())
                .map_err(&err)?;
            realisations::add(&tx, &a.alias, a.id).map_err(&err)?;
        }
    }
    update_membership(&tx, &attached).map_err(&err)?;
    let provided: u64 = tx
        .query_row(
            "select count(*) from main.NixfsLayerOrigin where layer != 0",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    summary.unchanged = provided - summary.added - summary.moved;
    tx.execute_batch(
        "drop table temp.lp; drop table temp.want; drop table temp.added;
         drop table temp.removed; drop table temp.moved;",
    )
    .map_err(&err)?;
    tx.commit().map_err(&err)?;
    for a in &attached {
        conn.execute("detach database ?1", [&a.alias])
            .map_err(&err)?;
    }
    Ok(summary)
}

/// Provenance rows are kept by triggers; this repairs what predates them
/// (a database Nix created) or what someone changed with triggers off.
fn reconcile_provenance(tx: &Connection) -> rusqlite::Result<()> {
    let (paths, origins): (i64, i64) = tx.query_row(
        "select (select count(*) from main.ValidPaths), (select count(*) from main.NixfsLayerOrigin)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let orphans: i64 = if paths == origins {
        tx.query_row(
            "select count(*) from main.NixfsLayerOrigin o where not exists (select 1 from main.ValidPaths v where v.path = o.path)",
            [],
            |r| r.get(0),
        )?
    } else {
        1
    };
    if orphans > 0 {
        tx.execute_batch(
            "delete from main.NixfsLayerOrigin where path not in (select path from main.ValidPaths);
             insert or ignore into main.NixfsLayerOrigin (path, layer) select path, 0 from main.ValidPaths;",
        )?;
    }
    Ok(())
}

/// Gives each lower its stable id and its place in the current stack.
fn register_lowers(tx: &Connection, attached: &mut [Attached]) -> rusqlite::Result<()> {
    tx.execute("update main.NixfsLayerLower set priority = null", [])?;
    for (prio, a) in attached.iter_mut().enumerate() {
        let dir = a.lower.dir().to_string_lossy();
        tx.execute(
            "insert into main.NixfsLayerLower (dir, priority) values (?1, ?2)
             on conflict (dir) do update set priority = excluded.priority",
            params![dir, prio as i64],
        )?;
        a.id = tx.query_row(
            "select id from main.NixfsLayerLower where dir = ?1",
            [dir],
            |r| r.get(0),
        )?;
    }
    Ok(())
}

/// Fills `temp.lp` with the lower's usable rows; returns how many rows were
/// passed over because their store entry is absent or whited out.
fn load_lower_paths(
    tx: &Connection,
    a: &Attached,
    prio: usize,
    whiteouts: &HashSet<OsString>,
) -> Result<u64, DbError> {
    let lower_db = a.lower.db();
    let err = sql_err(&lower_db);
    let present = list_store(&a.lower.store())?;
    let mut select = tx
        .prepare(&format!("select id, path from {}.ValidPaths", a.alias))
        .map_err(&err)?;
    let mut insert = tx
        .prepare("insert into temp.lp (path, lower, prio, lid) values (?1, ?2, ?3, ?4)")
        .map_err(&err)?;
    let mut rows = select.query([]).map_err(&err)?;
    let (mut missing, mut foreign, mut first_foreign) = (0u64, 0usize, None);
    while let Some(row) = rows.next().map_err(&err)? {
        let lid: i64 = row.get(0).map_err(&err)?;
        let path: String = row.get(1).map_err(&err)?;
        let sp = match StorePath::parse(&path) {
            Ok(sp) => sp,
            Err(_) => {
                foreign += 1;
                first_foreign.get_or_insert(path);
                continue;
            }
        };
        let name = OsString::from(sp.base_name());
        if !present.contains(&name) || whiteouts.contains(&name) {
            missing += 1;
            tracing::warn!(lower = %a.lower.dir().display(), %path, "lower database lists a path its store does not have (or the upper hides); not registering it");
            continue;
        }
        insert
            .execute(params![path, a.id, prio as i64, lid])
            .map_err(sql_err(&lower_db))?;
    }
    if foreign > 0 {
        return Err(DbError::ForeignStoreDir {
            lower: a.lower.dir().to_owned(),
            bad: foreign,
            first: first_foreign.unwrap_or_default(),
        });
    }
    Ok(missing)
}

/// Removes from `want` every path with a reference that is neither wanted
/// nor registered in the upper, until none is left; returns how many.
fn drop_incomplete(tx: &Connection, attached: &[Attached]) -> rusqlite::Result<u64> {
    let mut dropped = 0u64;
    loop {
        let mut round = 0usize;
        for a in attached {
            round += tx.execute(
                &format!(
                    "delete from want where lower = ?1 and lid in (
                       select r.referrer from {l}.Refs r
                       join {l}.ValidPaths d on d.id = r.reference
                       where r.referrer in (select lid from want where lower = ?1)
                         and not exists (select 1 from want x where x.path = d.path)
                         and not exists (select 1 from main.NixfsLayerOrigin o where o.path = d.path and o.layer = 0))",
                    l = a.alias
                ),
                [a.id],
            )?;
        }
        if round == 0 {
            return Ok(dropped);
        }
        tracing::warn!(
            paths = round,
            "lower paths whose references are not available are not registered"
        );
        dropped += round as u64;
    }
}

/// The paths to be removed that valid paths outside the removal still use.
fn check_removals(tx: &Connection) -> rusqlite::Result<Option<ClosureBroken>> {
    let query = "select g.path, u.path from removed g
                 join main.Refs r on r.reference = g.id
                 join main.ValidPaths u on u.id = r.referrer
                 where r.referrer not in (select id from removed)";
    let total: usize =
        tx.query_row(&format!("select count(*) from ({query})"), [], |r| r.get(0))?;
    if total == 0 {
        return Ok(None);
    }
    let needed = tx
        .prepare(&format!("{query} order by 1, 2 limit 10"))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    Ok(Some(ClosureBroken { needed, total }))
}

/// Registers the paths this lower provides that the merged database lacks.
fn add_paths(tx: &Connection, a: &Attached) -> rusqlite::Result<()> {
    let l = &a.alias;
    tx.execute(
        "insert or replace into main.NixfsLayerOrigin (path, layer) select path, lower from added where lower = ?1",
        [a.id],
    )?;
    tx.execute(
        &format!(
            "insert into main.ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             select v.path, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca
             from added a join {l}.ValidPaths v on v.id = a.lid where a.lower = ?1"
        ),
        [a.id],
    )?;
    tx.execute(
        &format!(
            "insert or ignore into main.Refs (referrer, reference)
             select mr.id, md.id from added a
             join {l}.Refs r on r.referrer = a.lid
             join {l}.ValidPaths d on d.id = r.reference
             join main.ValidPaths mr on mr.path = a.path
             join main.ValidPaths md on md.path = d.path
             where a.lower = ?1"
        ),
        [a.id],
    )?;
    tx.execute(
        &format!(
            "insert or ignore into main.DerivationOutputs (drv, id, path)
             select m.id, o.id, o.path from added a
             join {l}.DerivationOutputs o on o.drv = a.lid
             join main.ValidPaths m on m.path = a.path
             where a.lower = ?1"
        ),
        [a.id],
    )?;
    Ok(())
}

/// Paths that another lower now provides take that lower's metadata.
fn move_paths(tx: &Connection, a: &Attached) -> rusqlite::Result<()> {
    let l = &a.alias;
    tx.execute(
        &format!(
            "update main.ValidPaths set (hash, registrationTime, deriver, narSize, ultimate, sigs, ca) =
               (select v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca
                from moved m join {l}.ValidPaths v on v.id = m.lid where m.path = ValidPaths.path)
             where path in (select path from moved where lower = ?1)"
        ),
        [a.id],
    )?;
    tx.execute(
        "update main.NixfsLayerOrigin set layer = ?1 where path in (select path from moved where lower = ?1)",
        [a.id],
    )?;
    Ok(())
}

/// Records each lower's current paths and totals; forgets lowers that left.
fn update_membership(tx: &Connection, attached: &[Attached]) -> rusqlite::Result<()> {
    for a in attached {
        tx.execute(
            "delete from main.NixfsLayerLowerPath where lower = ?1
               and path not in (select path from lp where lower = ?1)",
            [a.id],
        )?;
        tx.execute(
            "insert or ignore into main.NixfsLayerLowerPath (lower, path) select ?1, path from lp where lower = ?1",
            [a.id],
        )?;
        tx.execute(
            &format!(
                "update main.NixfsLayerLower set
                   paths = (select count(*) from lp where lower = ?1),
                   narBytes = (select coalesce(sum(v.narSize), 0) from lp join {l}.ValidPaths v on v.id = lp.lid where lp.lower = ?1),
                   syncedAt = ?2
                 where id = ?1",
                l = a.alias
            ),
            params![a.id, now()],
        )?;
    }
    tx.execute(
        "delete from main.NixfsLayerLowerPath where lower in (select id from main.NixfsLayerLower where priority is null)",
        [],
    )?;
    Ok(())
}
