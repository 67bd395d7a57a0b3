//! What the upper needs from the lowers: the lower-provided paths in the
//! closures of the upper's own paths and of the merged store's GC roots.
//! Used when switching to a new lower generation, to copy exactly those a
//! new lower lacks into the upper before the old lower goes away.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{params, Connection};

use super::{pin, snapshot, sql_err, DbError};
use crate::gcroots;
use crate::layer::{Lower, Upper};

/// A lower-provided path the upper needs, with its recorded NAR hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub path: String,
    pub nar_hash: String,
    /// The upper path or GC root that needs it, or for a path deeper in
    /// such a closure the first path there that refers to it (for messages).
    pub needed_by: String,
}

/// The lower-provided paths reachable from upper paths and GC roots.
pub fn needed(conn: &Connection, upper: &Upper) -> Result<Vec<Needed>, DbError> {
    let db = upper.db();
    let err = sql_err(&db);
    conn.execute_batch(
        "create temp table if not exists keep_start (id integer primary key, why text not null);
         delete from temp.keep_start;",
    )
    .map_err(&err)?;
    conn.execute(
        "insert or ignore into temp.keep_start (id, why)
         select v.id, v.path from ValidPaths v join NixfsLayerOrigin o on o.path = v.path where o.layer = 0",
        [],
    )
    .map_err(&err)?;
    for (root, target) in gcroots::user_roots(upper) {
        conn.execute(
            "insert or ignore into temp.keep_start (id, why) select id, ?2 from ValidPaths where path = ?1",
            params![target, format!("GC root {}", root.display())],
        )
        .map_err(&err)?;
    }
    // The closure once, by id (carrying the reason along would walk it
    // once per upper path and root); the reason is looked up afterwards:
    // the start itself, else its first referrer inside the closure.
    conn.execute_batch(
        "create temp table if not exists keep_closure (id integer primary key);
         delete from temp.keep_closure;
         insert into temp.keep_closure (id)
           with recursive closure(id) as (
             select id from temp.keep_start
             union
             select r.reference from Refs r join closure c on r.referrer = c.id
           )
           select id from closure;",
    )
    .map_err(&err)?;
    let mut stmt = conn
        .prepare(
            "select v.path, v.hash,
                    coalesce((select s.why from temp.keep_start s where s.id = v.id),
                             (select min(u.path) from Refs r
                              join temp.keep_closure k on k.id = r.referrer
                              join ValidPaths u on u.id = r.referrer
                              where r.reference = v.id and r.referrer != v.id))
             from temp.keep_closure c
             join ValidPaths v on v.id = c.id
             join NixfsLayerOrigin o on o.path = v.path
             where o.layer > 0
             order by v.path",
        )
        .map_err(&err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Needed {
                path: r.get(0)?,
                nar_hash: r.get(1)?,
                needed_by: r.get(2)?,
            })
        })
        .map_err(&err)?;
    rows.collect::<Result<_, _>>().map_err(&err)
}

/// Of `paths`, those none of `lowers` has (in its database with its store
/// entry present).
pub fn missing_from(
    lowers: &[Lower],
    scratch: &Path,
    paths: &[Needed],
) -> Result<Vec<Needed>, DbError> {
    let mut have: HashSet<String> = HashSet::new();
    for lower in lowers {
        let snap = snapshot::take(lower, scratch)?;
        // Errors name the lower's database, not the private copy (gone by then).
        let db = lower.db();
        let err = |e| snap.blame(e, sql_err(&db));
        let conn = Connection::open(snap.db()).map_err(|e| {
            snap.blame(e, |e| DbError::NotNixDb {
                path: lower.db(),
                detail: e.to_string(),
            })
        })?;
        let mut q = conn
            .prepare("select 1 from ValidPaths where path = ?1")
            .map_err(&err)?;
        for p in paths {
            let base = crate::storepath::base_name(&p.path);
            let present = std::fs::symlink_metadata(lower.store().join(base)).is_ok();
            if present && q.exists([&p.path]).map_err(&err)? {
                have.insert(p.path.clone());
            }
        }
    }
    Ok(paths
        .iter()
        .filter(|p| !have.contains(&p.path))
        .cloned()
        .collect())
}

/// Records that `paths` (now copied into the upper's store) are the upper's
/// own, and keeps the pin's invariant: what they refer to that is still
/// lower-provided and no other lower-provided path refers to gets pinned.
pub fn adopt_into_upper(
    conn: &mut Connection,
    upper: &Upper,
    paths: &[String],
) -> Result<(), DbError> {
    let db = upper.db();
    let err = sql_err(&db);
    let tx = conn.transaction().map_err(&err)?;
    let pin_id = pin::ensure(&tx, upper, &upper.store())?;
    tx.execute_batch(
        "create temp table if not exists kept (path text primary key) without rowid; delete from temp.kept;
         create temp table if not exists kept_refs (path text primary key) without rowid; delete from temp.kept_refs;",
    )
    .map_err(&err)?;
    for p in paths {
        tx.execute("insert or ignore into temp.kept (path) values (?1)", [p])
            .map_err(&err)?;
    }
    tx.execute_batch(
        "update NixfsLayerOrigin set layer = 0 where path in (select path from temp.kept);
         insert or ignore into temp.kept_refs (path)
           select d.path from temp.kept k join ValidPaths v on v.path = k.path
           join Refs r on r.referrer = v.id join ValidPaths d on d.id = r.reference;",
    )
    .map_err(&err)?;
    tx.execute(
        "delete from Refs where referrer = ?1 and reference in
           (select v.id from temp.kept k join ValidPaths v on v.path = k.path)",
        [pin_id],
    )
    .map_err(&err)?;
    pin::pin_tops(&tx, pin_id, "kept_refs").map_err(&err)?;
    tx.commit().map_err(&err)
}

/// Where a switch to new lowers keeps its verified copies until they are
/// the upper's.
pub fn staging_dir(upper: &Upper) -> std::path::PathBuf {
    upper.staging_dir()
}

/// The journal of a switch to new lowers: written once the copies of the
/// paths the upper needs are verified in [`staging_dir`], removed once they
/// are the upper's. Its presence means: these copies are good, make them
/// the upper's (see [`finish_switch`]).
fn switch_journal(upper: &Upper) -> std::path::PathBuf {
    upper.switch_journal()
}

fn journal_io(path: &Path) -> impl FnOnce(std::io::Error) -> DbError + '_ {
    move |source| DbError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether a switch to new lowers was cut short after verifying its
/// copies: the next `mount` of the upper finishes it.
pub fn switch_pending(upper: &Upper) -> bool {
    switch_journal(upper).exists()
}

/// Drops a switch's journal and copies (a switch that cannot go on while
/// its stack is still on the old lowers).
pub fn abandon_switch(upper: &Upper) {
    let _ = std::fs::remove_file(switch_journal(upper));
    let _ = crate::storecopy::remove_tree(&staging_dir(upper));
}

/// Records that the copies of `kept` in [`staging_dir`] are verified.
pub fn begin_switch(upper: &Upper, kept: &[String]) -> Result<(), DbError> {
    let path = switch_journal(upper);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(kept).expect("a list of strings serialises");
    std::fs::write(&tmp, text).map_err(journal_io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(journal_io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(journal_io(&path))
}

/// Finishes a switch that was cut short (or completes the current one):
/// moves the verified copies still in [`staging_dir`] into the upper's
/// store, records them as the upper's own, then drops the journal and the
/// staging directory. With no journal it only removes a staging directory
/// left by a switch that never got as far as verifying its copies. The
/// upper must not be mounted, and the caller holds its lock. Returns the
/// paths made the upper's.
pub fn finish_switch(upper: &Upper) -> Result<Vec<String>, DbError> {
    let journal = switch_journal(upper);
    let staging = staging_dir(upper);
    let kept: Vec<String> = match std::fs::read(&journal) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = crate::storecopy::remove_tree(&staging);
            return Ok(Vec::new());
        }
        Err(e) => return Err(journal_io(&journal)(e)),
    };
    let mut adopted = Vec::new();
    for p in &kept {
        let base = crate::storepath::base_name(p);
        let (from, to) = (staging.join(base), upper.store().join(base));
        if std::fs::symlink_metadata(&to).is_err() {
            if std::fs::symlink_metadata(&from).is_err() {
                continue;
            }
            std::fs::rename(&from, &to).map_err(journal_io(&to))?;
        }
        adopted.push(p.clone());
    }
    crate::failpoint::hit("sync-lower:moved");
    let mut conn = super::open(&upper.db())?;
    adopt_into_upper(&mut conn, upper, &adopted)?;
    drop(conn);
    std::fs::remove_file(&journal).map_err(journal_io(&journal))?;
    let _ = crate::storecopy::remove_tree(&staging);
    Ok(adopted)
}
