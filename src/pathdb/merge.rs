//! Merging the lowers' databases into the upper's: the `sync` algorithm.
//!
//! The merged database is the upper's own Nix database. Next to Nix's
//! tables it records, per lower, the paths that lower had at the last sync
//! (`NixfsLayerLowerPath`) and a fingerprint of its database files. A sync:
//!
//! 1. skips every lower whose fingerprint is unchanged (a few `stat`s);
//! 2. copies each changed lower's database (with its WAL) and diffs it
//!    against the recorded paths: new paths and gone paths;
//! 3. registers new paths the merged database lacks, if their store entry
//!    exists, no whiteout in the upper hides them and everything they
//!    reference is or becomes valid;
//! 4. invalidates gone paths no other lower has, unless a path that stays
//!    valid (or a GC root) still needs them: then, by default, nothing
//!    changes and the sync fails naming them;
//! 5. moves paths between lowers when the one providing them lost them or a
//!    higher one gained them.
//!
//! All of it is one SQLite transaction. A path Nix registered through the
//! merged store (provenance 0, "upper") always wins and is never touched.
//! Rows are matched by `path` text, never by id: ids are per database.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use super::{
    adopt, health, journal, open, pin, realisations, snapshot, sql_err, ClosureBroken, DbError,
};
use crate::gcroots;
use crate::layer::{Lower, Upper};
use crate::storepath::StorePath;

/// What to do with lower paths that are gone but still needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Needed {
    /// Change nothing and fail naming them (`sync`).
    #[default]
    Refuse,
    /// Keep their rows (their content is missing now), report them, go on
    /// (`mount`, when the old lower is already gone).
    KeepBroken,
}

/// How a sync runs.
#[derive(Clone, Copy, Default)]
pub struct SyncOptions<'a> {
    pub needed: Needed,
    /// Re-read every lower even if its fingerprint is unchanged.
    pub force: bool,
    /// Told the name of each phase while a long merge runs.
    pub progress: Option<&'a dyn Fn(&str)>,
    /// The merged store (`TARGET/store`) when mounted: files this tool adds
    /// to the upper go through it, not behind overlayfs' back.
    pub mounted_store: Option<&'a Path>,
    /// Build into this database instead of the upper's (a rebuild of a
    /// damaged one: `verify --repair`). No journal is kept of it.
    pub db: Option<&'a Path>,
    /// Run `PRAGMA quick_check` on the merged database before changing it,
    /// and refuse a damaged one ([`DbError::Damaged`]). An idle sync (no
    /// lower changed) changes nothing and skips it.
    pub check_before_changes: bool,
}

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
    /// Paths a lower gained that the upper has registered itself (built
    /// there, then promoted): the upper's copies serve them until
    /// `optimise` drops those.
    pub upper_copies: u64,
    /// Gone lower paths kept because the upper still needs them (content missing).
    pub broken: Vec<String>,
    /// Valid paths whose lower lost their store entry while its database
    /// still lists them (content missing).
    pub vanished: Vec<Vanished>,
}

/// A path the merged store takes from a lower whose store entry has gone
/// from that lower while the lower's database still lists it as valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vanished {
    pub path: String,
    pub lower: PathBuf,
}

/// How many paths a one-line summary names before "…".
pub const SHOWN: usize = 3;

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
                "; skipped {} lower path(s) whose store entry is missing or hidden",
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
        if self.upper_copies > 0 {
            write!(
                f,
                "; {} path(s) the lowers gained are served from the upper's own copies (`nixfs-layer optimise` drops them)",
                self.upper_copies
            )?;
        }
        if !self.broken.is_empty() {
            write!(
                f,
                "; BROKEN: {} path(s) left the lowers but upper paths still need them: {}",
                self.broken.len(),
                self.broken.join(", ")
            )?;
        }
        if !self.vanished.is_empty() {
            let shown: Vec<&str> = self
                .vanished
                .iter()
                .take(SHOWN)
                .map(|v| v.path.as_str())
                .collect();
            write!(
                f,
                "; missing content: {} lower path(s) whose store entry vanished behind the lower's database: {}",
                self.vanished.len(),
                shown.join(" ")
            )?;
            if self.vanished.len() > SHOWN {
                write!(f, " … (+{} more)", self.vanished.len() - SHOWN)?;
            }
        }
        Ok(())
    }
}

/// Unix time in seconds (0 if the clock is before 1970).
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One lower as the merge sees it.
struct LowerState<'a> {
    lower: &'a Lower,
    /// NixfsLayerLower.id
    id: crate::stack::LowerId,
    /// Its fingerprint now.
    fingerprint: snapshot::Fingerprint,
    /// Schema name of its attached snapshot, when it changed.
    alias: Option<String>,
}

/// Brings the upper's merged database in line with the lowers (see the
/// module docs). Nothing is written under any lower.
pub fn sync(
    upper: &Upper,
    lowers: &[Lower],
    opts: &SyncOptions<'_>,
) -> Result<SyncSummary, DbError> {
    let started = Instant::now();
    let db = opts.db.map_or_else(|| upper.db(), Path::to_owned);
    // The journal follows the upper's own database only.
    let journal = |conn: &Connection| {
        if opts.db.is_none() {
            let dirs: Vec<_> = lowers.iter().map(|l| l.dir().to_owned()).collect();
            journal::record_or_warn(conn, upper, &dirs);
        }
    };
    let err = sql_err(&db);
    let phase = |name: &str| {
        tracing::debug!(elapsed = ?started.elapsed(), "sync: {name}");
        if let Some(p) = opts.progress {
            p(name);
        }
    };
    let mut conn = open_for_merge(&db)?;
    clean_scratch(upper);

    let mut states = Vec::with_capacity(lowers.len());
    for lower in lowers {
        states.push(LowerState {
            lower,
            id: 0,
            fingerprint: snapshot::fingerprint(lower),
            alias: None,
        });
    }
    let pin_store = opts
        .mounted_store
        .map_or_else(|| upper.store(), Path::to_owned);
    let mut changes = stack_changed(&conn, &states).map_err(&err)?;
    if opts.force {
        changes.store.extend(0..states.len());
    }
    let changed: Vec<usize> = (0..states.len())
        .filter(|&i| opts.force || changes.stale.contains(&i))
        .collect();
    if changed.is_empty() && !stack_left(&conn, &states).map_err(&err)? {
        pin::ensure(&conn, upper, &pin_store)?;
        journal(&conn);
        let provided = super::provided_count(&conn).map_err(&err)?;
        let vanished = check_vanished(&conn, &states, &HashSet::new(), &db)?;
        return Ok(SyncSummary {
            unchanged: provided,
            vanished,
            ..Default::default()
        });
    }

    if opts.check_before_changes {
        phase("checking the merged database");
        health::quick_check(&db)?;
    }
    let whiteouts = upper_whiteouts(&upper.store())?;
    let mut adopted = 0u64;
    let mut declined = None;
    let mut changed = changed;
    if opts.mounted_store.is_none()
        && changed.first() == Some(&0)
        && adopt::is_fresh(&conn).map_err(&err)?
    {
        phase("adopting the first lower's database");
        let snap = snapshot::take(states[0].lower, &upper.tmp_dir())?;
        drop(conn);
        let result = adopt::adopt(
            upper,
            states[0].lower,
            &snap,
            &whiteouts,
            &states[0].fingerprint.encode(),
            &db,
        )?;
        conn = open_for_merge(&db)?;
        match result {
            // Not adoptable: the same copy serves the row-by-row merge.
            None => declined = Some(snap),
            Some(n) => {
                adopted = n;
                changed.remove(0);
                if changed.is_empty() && states.len() == 1 {
                    journal(&conn);
                    tracing::info!(elapsed = ?started.elapsed(), paths = n, "sync done by adopting the lower's database");
                    return Ok(SyncSummary {
                        added: n,
                        ..Default::default()
                    });
                }
            }
        }
    }

    phase("copying lower databases");
    let mut snapshots = Vec::new();
    for &i in &changed {
        let lower = states[i].lower;
        let snap = match declined.take().filter(|_| i == 0) {
            Some(snap) => snap,
            None => snapshot::take(lower, &upper.tmp_dir())?,
        };
        let alias = format!("lower{i}");
        attach(&conn, &snap, &alias, lower)?;
        states[i].alias = Some(alias);
        snapshots.push(snap);
    }

    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(&err)?;
    register_lowers(&tx, &mut states).map_err(&err)?;
    let pin_id = pin::ensure(&tx, upper, &pin_store)?;
    create_temp_tables(&tx).map_err(&err)?;

    let mut summary = SyncSummary::default();
    phase("comparing lower databases with the last sync");
    for (i, s) in states.iter().enumerate().filter(|(_, s)| s.alias.is_some()) {
        let full = opts.force || changes.full.contains(&i);
        summary.missing_content += diff_lower(&tx, &db, s, &whiteouts, full)?;
    }
    forget_departed_lowers(&tx).map_err(&err)?;

    phase("deciding what changes");
    tx.execute_batch(PLAN_SQL).map_err(&err)?;
    summary.upper_copies = tx
        .query_row(
            "select count(distinct c.path) from temp.cand c
               join main.NixfsLayerOrigin o on o.path = c.path
             where c.hidden = 0 and o.layer = ?1",
            [crate::stack::Origin::Upper],
            |r| r.get(0),
        )
        .map_err(&err)?;
    summary.incomplete_closure = drop_incomplete(&tx, &states).map_err(&err)?;
    tx.execute_batch(
        "insert into temp.removed (id, path)
           select v.id, v.path from temp.orphaned o join main.ValidPaths v on v.path = o.path
           where not exists (select 1 from temp.moved m where m.path = o.path);",
    )
    .map_err(&err)?;

    let broken = check_removals(&tx, upper, pin_id).map_err(&err)?;
    if let Some(b) = broken {
        match opts.needed {
            Needed::Refuse => return Err(DbError::ClosureBroken(b)),
            Needed::KeepBroken => summary.broken = keep_needed(&tx, upper, pin_id).map_err(&err)?,
        }
    }

    phase("applying changes");
    realisations::release_removed(&tx).map_err(&err)?;
    tx.execute_batch(
        "create temp table exposed as
           select distinct r.reference as id from main.Refs r
           where r.referrer in (select id from temp.removed) and r.reference not in (select id from temp.removed);
         delete from main.Refs where referrer in (select id from temp.removed);
         delete from main.Refs where reference in (select id from temp.removed);
         delete from main.ValidPaths where id in (select id from temp.removed);",
    )
    .map_err(&err)?;
    for s in &states {
        if let Some(alias) = &s.alias {
            register_paths(&tx, alias, s.id).map_err(&err)?;
        }
    }
    for s in &states {
        if let Some(alias) = &s.alias {
            link_paths(&tx, alias, s.id).map_err(&err)?;
            if realisations::has_table(&tx, alias, "Realisations").map_err(&err)? {
                realisations::ensure_tables(&tx, alias, &s.lower.db_dir(), &upper.db_dir())
                    .map_err(&err)?;
                realisations::add(&tx, alias, s.id).map_err(&err)?;
            }
        }
    }
    move_paths(&tx, &states).map_err(&err)?;
    summary.vanished = check_vanished(&tx, &states, &changes.store, &db)?;
    // A path the lower dropped from its database too is reported as broken
    // (left the lowers, still needed), not as vanished behind the database.
    summary
        .vanished
        .retain(|v| !summary.broken.contains(&v.path));
    for p in &summary.broken {
        tx.execute("delete from main.NixfsLayerVanished where path = ?1", [p])
            .map_err(&err)?;
    }
    pin::pin_tops(&tx, pin_id, "added").map_err(&err)?;
    pin::pin_tops_of(&tx, pin_id, "select id from temp.exposed").map_err(&err)?;
    for s in &states {
        tx.execute(
            "update main.NixfsLayerLower set fingerprint = ?2, syncedAt = ?3 where id = ?1",
            params![s.id, s.fingerprint.encode(), now()],
        )
        .map_err(&err)?;
    }
    let count = |sql: &str| tx.query_row(sql, [], |r| r.get::<_, u64>(0));
    summary.added = adopted + count("select count(*) from temp.added").map_err(&err)?;
    summary.removed = count("select count(*) from temp.removed").map_err(&err)?;
    summary.moved = count("select count(*) from temp.moved").map_err(&err)?;
    let provided = super::provided_count(&tx).map_err(&err)?;
    summary.unchanged = provided - summary.added - summary.moved;
    tx.execute_batch(DROP_TEMP_SQL).map_err(&err)?;
    phase("committing");
    tx.commit().map_err(&err)?;
    phase("cleaning up");
    for s in &states {
        if let Some(alias) = &s.alias {
            conn.execute("detach database ?1", [alias]).map_err(&err)?;
        }
    }
    drop(snapshots);
    journal(&conn);
    phase("done");
    tracing::info!(elapsed = ?started.elapsed(), %summary, "sync done");
    Ok(summary)
}

/// The merged database, set up for a bulk merge: temporary tables in
/// memory, a 64 MiB page cache, no fsync per commit (WAL stays safe
/// against crashes of this process).
fn open_for_merge(db: &Path) -> Result<Connection, DbError> {
    let err = sql_err(db);
    let conn = open(db)?;
    conn.pragma_update(None, "temp_store", "memory")
        .map_err(&err)?;
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(&err)?;
    conn.pragma_update(None, "synchronous", "normal")
        .map_err(&err)?;
    Ok(conn)
}

/// Removes snapshot directories a killed sync may have left behind (the
/// caller holds the upper's lock).
fn clean_scratch(upper: &Upper) {
    if let Ok(entries) = fs::read_dir(upper.tmp_dir()) {
        for e in entries.flatten() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn attach(
    conn: &Connection,
    snap: &snapshot::Snapshot,
    alias: &str,
    lower: &Lower,
) -> Result<(), DbError> {
    let not_nix = |detail: String| DbError::NotNixDb {
        path: lower.db(),
        detail,
    };
    let err = |e| snap.blame(e, |e| not_nix(e.to_string()));
    conn.execute(
        "attach database ?1 as ?2",
        params![snap.db().to_string_lossy(), alias],
    )
    .map_err(err)?;
    for table in ["ValidPaths", "Refs", "DerivationOutputs"] {
        if !realisations::has_table(conn, alias, table).map_err(err)? {
            return Err(not_nix(format!("no {table} table")));
        }
    }
    Ok(())
}

/// Which lowers changed since the last sync, by their fingerprints.
#[derive(Debug, Default)]
struct Changes {
    /// Their database must be read again: anything changed, or they were
    /// not at this place in the stack.
    stale: HashSet<usize>,
    /// Every row must be examined again: new to the stack or at another
    /// place in it (which lower provides each path must be worked out
    /// again), or another directory than last time (a tree renamed into
    /// place: rows an earlier view of it lost may be back).
    full: HashSet<usize>,
    /// Their store directory changed (or nothing is known of it): its
    /// listing is compared with the paths they provide.
    store: HashSet<usize>,
}

fn stack_changed(conn: &Connection, states: &[LowerState]) -> rusqlite::Result<Changes> {
    let mut out = Changes::default();
    for (i, s) in states.iter().enumerate() {
        let rec: Option<(Option<i64>, Option<String>)> = conn
            .query_row(
                "select priority, fingerprint from NixfsLayerLower where dir = ?1",
                [s.lower.dir().to_string_lossy()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let now = &s.fingerprint;
        match rec {
            Some((Some(p), f)) if p == i as i64 => {
                match f.as_deref().and_then(snapshot::Fingerprint::decode) {
                    Some(then) if then == *now => {}
                    Some(then) => {
                        out.stale.insert(i);
                        if then.identity != now.identity {
                            tracing::info!(lower = %s.lower.dir().display(), then = %then.identity, now = %now.identity, "lower directory is another one than at the last sync; reading all of it again");
                            out.full.insert(i);
                            out.store.insert(i);
                        }
                        if then.store != now.store {
                            out.store.insert(i);
                        }
                    }
                    // An older version's fingerprint: changed, identity unknown.
                    None => {
                        out.stale.insert(i);
                        out.store.insert(i);
                    }
                }
            }
            _ => {
                out.stale.insert(i);
                out.full.insert(i);
                out.store.insert(i);
            }
        }
    }
    Ok(out)
}

/// Whether a lower of the previous stack is no longer part of it.
fn stack_left(conn: &Connection, states: &[LowerState]) -> rusqlite::Result<bool> {
    let n: i64 = conn.query_row(
        "select count(*) from NixfsLayerLower where priority is not null",
        [],
        |r| r.get(0),
    )?;
    Ok(n as usize != states.len())
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

/// Gives each lower its stable id and its place in the current stack.
fn register_lowers(tx: &Connection, states: &mut [LowerState]) -> rusqlite::Result<()> {
    tx.execute("update main.NixfsLayerLower set priority = null", [])?;
    for (prio, s) in states.iter_mut().enumerate() {
        let dir = s.lower.dir().to_string_lossy();
        s.id = tx.query_row(
            "insert into main.NixfsLayerLower (dir, priority) values (?1, ?2)
             on conflict (dir) do update set priority = excluded.priority
             returning id",
            params![dir, prio as i64],
            |r| r.get(0),
        )?;
    }
    Ok(())
}

fn create_temp_tables(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch(
        "create temp table cand (lower integer not null, lid integer not null, path text not null,
                                 hidden integer not null default 0, primary key (lower, lid)) without rowid;
         create index temp.cand_path on cand(path);
         create temp table gone (lower integer not null, path text not null, primary key (lower, path)) without rowid;
         create temp table added (lower integer not null, lid integer not null, path text not null unique,
                                  primary key (lower, lid)) without rowid;
         create temp table orphaned (path text primary key not null) without rowid;
         create temp table moved (path text primary key not null, lower integer not null) without rowid;
         create temp table removed (id integer primary key, path text not null unique);
         create temp table idmap (lower integer not null, lid integer not null, mid integer not null,
                                  primary key (lower, lid)) without rowid;
         create temp table ext (lower integer not null, lid integer not null, rlid integer not null, rpath text not null);
         create index temp.ext_rpath on ext(rpath);
         create temp table newly (lower integer not null, lid integer not null, primary key (lower, lid)) without rowid;
         create temp table prev (lower integer not null, lid integer not null, primary key (lower, lid)) without rowid;",
    )
}

const DROP_TEMP_SQL: &str = "drop table temp.cand; drop table temp.gone; drop table temp.added;
     drop table temp.orphaned; drop table temp.moved; drop table temp.removed; drop table temp.idmap;
     drop table temp.exposed; drop table temp.ext; drop table temp.newly; drop table temp.prev;";

/// Fills `temp.cand` with the lower's new rows whose store entry exists
/// (marking those a whiteout hides) and `temp.gone` with recorded paths it
/// no longer lists, and brings its recorded paths up to date. Returns how
/// many new rows were passed over for a missing or hidden store entry.
fn diff_lower(
    tx: &Transaction,
    db: &Path,
    s: &LowerState,
    whiteouts: &HashSet<OsString>,
    full: bool,
) -> Result<u64, DbError> {
    let alias = s.alias.as_deref().expect("changed lowers are attached");
    // Reading the lower's copy fails in the lower's name; writing, in the
    // merged database's.
    // (Its copy is in the upper: a full file system there is the upper's.)
    let lower_db = s.lower.db();
    let (new, gone) = diff_paths(tx, alias, s.id, full).map_err(|e| {
        if super::out_of_space(&e, db) {
            return crate::layer::Full::of(db).into();
        }
        DbError::Sqlite {
            path: lower_db.clone(),
            source: e,
        }
    })?;
    let err = sql_err(db);
    if full {
        tx.execute(
            "delete from main.NixfsLayerLowerPath where lower = ?1",
            [s.id],
        )
        .map_err(&err)?;
    }
    {
        let mut ins = tx
            .prepare_cached("insert into temp.gone (lower, path) values (?1, ?2)")
            .map_err(&err)?;
        for path in &gone {
            ins.execute(params![s.id, path]).map_err(&err)?;
        }
    }

    // Check the new rows against the lower's store directory.
    let store = s.lower.store();
    let listing = if new.len() > 2000 {
        Some(list_store(&store)?)
    } else {
        None
    };
    let (mut missing, mut foreign, mut first_foreign) = (0u64, 0usize, None);
    {
        let mut ins = tx
            .prepare_cached(
                "insert into temp.cand (lower, lid, path, hidden) values (?1, ?2, ?3, ?4)",
            )
            .map_err(&err)?;
        for (lid, path) in &new {
            let Ok(sp) = StorePath::parse(path) else {
                foreign += 1;
                first_foreign.get_or_insert_with(|| path.clone());
                continue;
            };
            let name = OsString::from(sp.base_name());
            let present = match &listing {
                Some(l) => l.contains(&name),
                None => fs::symlink_metadata(store.join(&name)).is_ok(),
            };
            if !present {
                missing += 1;
                tracing::warn!(lower = %s.lower.dir().display(), %path, "lower database lists a path its store does not have; not registering it");
                continue;
            }
            let hidden = whiteouts.contains(&name);
            missing += u64::from(hidden);
            ins.execute(params![s.id, lid, path, hidden])
                .map_err(&err)?;
        }
    }
    if foreign > 0 {
        return Err(DbError::ForeignStoreDir {
            lower: s.lower.dir().to_owned(),
            bad: foreign,
            first: first_foreign.unwrap_or_default(),
        });
    }
    tx.execute(
        "delete from main.NixfsLayerLowerPath where lower = ?1 and path in (select path from temp.gone where lower = ?1)",
        [s.id],
    )
    .map_err(&err)?;
    tx.execute(
        &format!(
            "insert or replace into main.NixfsLayerLowerPath (lower, path, narSize)
             select c.lower, c.path, v.narSize from temp.cand c join {alias}.ValidPaths v on v.id = c.lid
             where c.lower = ?1"
        ),
        [s.id],
    )
    .map_err(&err)?;
    Ok(missing)
}

/// A lower row to examine: its id in the lower's database, its path.
type NewRow = (i64, String);

/// The lower's rows the last sync did not record, or all of
/// them when `full` (to re-examine every row), and the recorded paths it
/// no longer lists: one pass over both path lists in index order, so the
/// cost is two sequential scans, not 2 × N lookups.
fn diff_paths(
    tx: &Connection,
    alias: &str,
    lower: i64,
    full: bool,
) -> rusqlite::Result<(Vec<NewRow>, Vec<String>)> {
    let mut now = tx.prepare(&format!(
        "select path, id from {alias}.ValidPaths order by path"
    ))?;
    let mut then =
        tx.prepare("select path from main.NixfsLayerLowerPath where lower = ?1 order by path")?;
    let mut now_rows = now.query([])?;
    let mut then_rows = then.query([lower])?;
    let (mut new, mut gone) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (now_rows.next()?, then_rows.next()?);
    loop {
        use std::cmp::Ordering::*;
        // A side that ended compares greater: the other one drains.
        let order = match (a, b) {
            (None, None) => break,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some(ra), Some(rb)) => ra.get_ref(0)?.as_bytes()?.cmp(rb.get_ref(0)?.as_bytes()?),
        };
        if order == Less || (order == Equal && full) {
            let ra = a.expect("a row on this side");
            new.push((ra.get(1)?, ra.get(0)?));
        }
        if order == Greater {
            gone.push(b.expect("a row on this side").get(0)?);
        }
        if order != Greater {
            a = now_rows.next()?;
        }
        if order != Less {
            b = then_rows.next()?;
        }
    }
    Ok((new, gone))
}

/// Lowers no longer in the stack: everything they had is gone.
fn forget_departed_lowers(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch(
        "insert or ignore into temp.gone (lower, path)
           select m.lower, m.path from main.NixfsLayerLower l
           cross join main.NixfsLayerLowerPath m on m.lower = l.id where l.priority is null;
         delete from main.NixfsLayerLowerPath
           where lower in (select id from main.NixfsLayerLower where priority is null);",
    )
}

/// From the differences to the decisions:
/// * added: new, unhidden rows the merged database lacks, from the highest lower;
/// * moved: lower-provided paths whose provider lost them, or that a higher
///   lower gained, to the highest lower that has them now;
/// * orphaned: lower-provided paths whose provider lost them and no other has.
const PLAN_SQL: &str = "
insert or ignore into temp.added (lower, lid, path)
  select c.lower, c.lid, c.path from temp.cand c
  join main.NixfsLayerLower l on l.id = c.lower
  where c.hidden = 0
    and not exists (select 1 from main.ValidPaths v where v.path = c.path)
  order by l.priority;

insert or ignore into temp.moved (path, lower)
  select path, best from (
    select a.path, a.layer,
           (select m.lower from main.NixfsLayerLower l
            cross join main.NixfsLayerLowerPath m on m.lower = l.id and m.path = a.path
            where l.priority is not null order by l.priority limit 1) as best
    from (select o.path, o.layer from temp.gone g
            join main.NixfsLayerOrigin o on o.path = g.path and o.layer = g.lower
          union
          select o.path, o.layer from temp.cand c
            join main.NixfsLayerOrigin o on o.path = c.path
          where c.hidden = 0 and o.layer > 0) a)
  where best is not null and best != layer;

insert or ignore into temp.orphaned (path)
  select g.path from temp.gone g join main.NixfsLayerOrigin o on o.path = g.path and o.layer = g.lower
  where not exists (select 1 from temp.moved m where m.path = g.path);
";

/// Removes from `added` every path with a reference that will not be
/// valid, until none is left; returns how many.
///
/// `temp.ext` gets, once, the references of added rows to rows outside the
/// same lower's additions (normally few: a lower's closure is complete); each
/// round then drops rows whose outside target is neither added by another
/// lower nor staying valid, and the same lower's referrers of the rows the
/// previous round dropped.
fn drop_incomplete(tx: &Connection, states: &[LowerState]) -> rusqlite::Result<u64> {
    for s in states {
        let Some(l) = &s.alias else { continue };
        tx.execute(
            &format!(
                "insert into temp.ext (lower, lid, rlid, rpath)
                 select a.lower, a.lid, r.reference, d.path
                 from temp.added a
                 cross join {l}.Refs r on r.referrer = a.lid
                 cross join {l}.ValidPaths d on d.id = r.reference
                 where a.lower = ?1
                   and not exists (select 1 from temp.added x where x.lower = ?1 and x.lid = r.reference)"
            ),
            [s.id],
        )?;
    }
    let mut dropped = 0u64;
    loop {
        tx.execute("delete from temp.newly", [])?;
        tx.execute(
            "insert or ignore into temp.newly (lower, lid)
             select e.lower, e.lid from temp.ext e
             where exists (select 1 from temp.added a where a.lower = e.lower and a.lid = e.lid)
               and not exists (select 1 from temp.added y where y.path = e.rpath)
               and not (exists (select 1 from main.ValidPaths v where v.path = e.rpath)
                        and not exists (select 1 from temp.orphaned o where o.path = e.rpath))",
            [],
        )?;
        for s in states {
            let Some(l) = &s.alias else { continue };
            tx.execute(
                &format!(
                    "insert or ignore into temp.newly (lower, lid)
                     select a.lower, a.lid from temp.prev p
                     cross join {l}.Refs r on r.reference = p.lid
                     cross join temp.added a on a.lower = p.lower and a.lid = r.referrer
                     where p.lower = ?1"
                ),
                [s.id],
            )?;
        }
        let n = tx.execute(
            "delete from temp.added where exists
               (select 1 from temp.newly n where n.lower = added.lower and n.lid = added.lid)",
            [],
        )?;
        if n == 0 {
            return Ok(dropped);
        }
        tracing::warn!(
            paths = n,
            "lower paths whose references are not available are not registered"
        );
        dropped += n as u64;
        tx.execute_batch(
            "delete from temp.prev; insert into temp.prev select lower, lid from temp.newly;",
        )?;
    }
}

/// The paths to be removed that stay needed: by a valid path outside the
/// removal, or by a GC root of the merged store.
fn check_removals(
    tx: &Connection,
    upper: &Upper,
    pin_id: i64,
) -> rusqlite::Result<Option<ClosureBroken>> {
    let query = "select g.path, u.path from temp.removed g
                 cross join main.Refs r indexed by IndexReference on r.reference = g.id
                 cross join main.ValidPaths u on u.id = r.referrer
                 where r.referrer not in (select id from temp.removed) and r.referrer != ?1";
    let total: usize = tx.query_row(&format!("select count(*) from ({query})"), [pin_id], |r| {
        r.get(0)
    })?;
    let mut needed = tx
        .prepare(&format!("{query} order by 1, 2 limit 10"))?
        .query_map([pin_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?;
    let removed: HashSet<String> = names_of(tx, "select path from temp.removed")?
        .into_iter()
        .collect();
    let mut rooted = 0;
    if !removed.is_empty() {
        for (root, target) in gcroots::user_roots(upper) {
            if removed.contains(&target) {
                rooted += 1;
                if needed.len() < 10 {
                    needed.push((target, format!("GC root {}", root.display())));
                }
            }
        }
    }
    Ok((total + rooted > 0).then_some(ClosureBroken {
        needed,
        total: total + rooted,
    }))
}

/// Takes the still-needed paths (and, transitively, what they reference)
/// out of the removal; returns them.
fn keep_needed(tx: &Connection, upper: &Upper, pin_id: i64) -> rusqlite::Result<Vec<String>> {
    let roots: Vec<String> = gcroots::user_roots(upper)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    for t in &roots {
        tx.execute("delete from temp.removed where path = ?1", [t])?;
    }
    loop {
        let n = tx.execute(
            "delete from temp.removed where id in (
               select r.reference from main.Refs r
               where r.reference in (select id from temp.removed)
                 and r.referrer not in (select id from temp.removed) and r.referrer != ?1)",
            [pin_id],
        )?;
        if n == 0 {
            break;
        }
    }
    // What stays but no lower has any more: report it.
    let broken = names_of(
        tx,
        "select o.path from temp.orphaned o where o.path not in (select path from temp.removed) order by 1",
    )?;
    for p in &broken {
        tracing::error!(path = %p, "a lower lost this path but upper paths need it; its content is missing now (see `nixfs-layer verify`)");
    }
    Ok(broken)
}

fn names_of(tx: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    tx.prepare(sql)?.query_map([], |r| r.get(0))?.collect()
}

/// Registers the paths this lower provides that the merged database lacks
/// (rows only: references follow in [`link_paths`], once every lower's
/// rows exist, since one lower's new path may refer to another's).
fn register_paths(tx: &Connection, l: &str, id: i64) -> rusqlite::Result<()> {
    tx.execute(
        "insert into main.NixfsLayerOrigin (path, layer) select path, lower from temp.added where lower = ?1
         on conflict (path) do update set layer = excluded.layer",
        [id],
    )?;
    tx.execute(
        &format!(
            "insert into main.ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             select v.path, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca
             from temp.added a cross join {l}.ValidPaths v on v.id = a.lid where a.lower = ?1 order by a.lid"
        ),
        [id],
    )?;
    Ok(())
}

/// The references and derivation outputs of this lower's added paths.
fn link_paths(tx: &Connection, l: &str, id: i64) -> rusqlite::Result<()> {
    // Lower ids to merged ids: the added rows, then the outside targets.
    tx.execute(
        "insert into temp.idmap (lower, lid, mid)
         select a.lower, a.lid, v.id from temp.added a cross join main.ValidPaths v on v.path = a.path
         where a.lower = ?1",
        [id],
    )?;
    tx.execute(
        "insert or ignore into temp.idmap (lower, lid, mid)
         select e.lower, e.rlid, v.id from temp.ext e cross join main.ValidPaths v on v.path = e.rpath
         where e.lower = ?1",
        [id],
    )?;
    // Driven by the added rows in lower-id order, which is also merged-id
    // order: the rows arrive sorted for Refs' indexes.
    tx.execute(
        &format!(
            "insert or ignore into main.Refs (referrer, reference)
             select m1.mid, m2.mid from temp.added a
             cross join {l}.Refs r on r.referrer = a.lid
             cross join temp.idmap m1 on m1.lower = ?1 and m1.lid = r.referrer
             cross join temp.idmap m2 on m2.lower = ?1 and m2.lid = r.reference
             where a.lower = ?1"
        ),
        [id],
    )?;
    tx.execute(
        &format!(
            "insert or ignore into main.DerivationOutputs (drv, id, path)
             select m.mid, o.id, o.path from temp.added a
             cross join {l}.DerivationOutputs o on o.drv = a.lid
             cross join temp.idmap m on m.lower = ?1 and m.lid = a.lid
             where a.lower = ?1"
        ),
        [id],
    )?;
    Ok(())
}

/// Paths another lower now provides: provenance follows, and the metadata
/// too when that lower's database is at hand (it is the same path, so it
/// only differs in details such as signatures).
fn move_paths(tx: &Connection, states: &[LowerState]) -> rusqlite::Result<()> {
    for s in states {
        if let Some(l) = &s.alias {
            tx.execute(
                &format!(
                    "update main.ValidPaths set (hash, registrationTime, deriver, narSize, ultimate, sigs, ca) =
                       (select v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca
                        from {l}.ValidPaths v where v.path = ValidPaths.path)
                     where path in (select path from temp.moved where lower = ?1)"
                ),
                [s.id],
            )?;
        }
    }
    tx.execute(
        "update main.NixfsLayerOrigin set layer = (select m.lower from temp.moved m where m.path = NixfsLayerOrigin.path)
         where path in (select path from temp.moved)",
        [],
    )?;
    Ok(())
}

/// The lower paths whose store entry vanished behind their lower's
/// database (see [`Vanished`]), kept in `NixfsLayerVanished` from one sync
/// to the next. For the lowers in `list` (their store directory changed:
/// an entry removed changes its mtime and ctime) the directory's listing is
/// compared with every path they provide; for the others only the paths
/// already known to have vanished are looked at again (a `stat` each), so
/// a sync with nothing changed stays as cheap as it was.
fn check_vanished(
    conn: &Connection,
    states: &[LowerState],
    list: &HashSet<usize>,
    db: &Path,
) -> Result<Vec<Vanished>, DbError> {
    let err = sql_err(db);
    let known: i64 = conn
        .query_row("select count(*) from main.NixfsLayerVanished", [], |r| {
            r.get(0)
        })
        .map_err(&err)?;
    if known == 0 && list.is_empty() {
        return Ok(Vec::new());
    }
    conn.execute(
        "delete from main.NixfsLayerVanished where lower not in
           (select id from main.NixfsLayerLower where priority is not null)",
        [],
    )
    .map_err(&err)?;
    let entry = |path: &str| path.rsplit('/').next().unwrap_or(path).to_owned();
    let mut out = Vec::new();
    for (i, s) in states.iter().enumerate() {
        let id: Option<i64> = conn
            .query_row(
                "select id from main.NixfsLayerLower where dir = ?1",
                [s.lower.dir().to_string_lossy()],
                |r| r.get(0),
            )
            .optional()
            .map_err(&err)?;
        let Some(id) = id else { continue };
        let store = s.lower.store();
        let gone: Vec<String> = if list.contains(&i) {
            let listing = list_store(&store)?;
            let provided: Vec<String> = conn
                .prepare("select path from main.NixfsLayerOrigin where layer = ?1 order by path")
                .and_then(|mut q| q.query_map([id], |r| r.get(0))?.collect())
                .map_err(&err)?;
            provided
                .into_iter()
                .filter(|p| !listing.contains(&OsString::from(entry(p))))
                .collect()
        } else {
            let known: Vec<(String, bool)> = conn
                .prepare(
                    "select v.path, exists (select 1 from main.NixfsLayerOrigin o
                                            where o.path = v.path and o.layer = v.lower)
                     from main.NixfsLayerVanished v where v.lower = ?1 order by v.path",
                )
                .and_then(|mut q| q.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(&err)?;
            if known.is_empty() {
                continue;
            }
            known
                .into_iter()
                .filter(|(p, provided)| {
                    *provided && fs::symlink_metadata(store.join(entry(p))).is_err()
                })
                .map(|(p, _)| p)
                .collect()
        };
        conn.execute("delete from main.NixfsLayerVanished where lower = ?1", [id])
            .map_err(&err)?;
        let mut ins = conn
            .prepare_cached("insert into main.NixfsLayerVanished (lower, path) values (?1, ?2)")
            .map_err(&err)?;
        for p in gone {
            tracing::debug!(lower = %s.lower.dir().display(), path = %p, "lower store entry vanished behind its database");
            ins.execute(params![id, p]).map_err(&err)?;
            out.push(Vanished {
                path: p,
                lower: s.lower.dir().to_owned(),
            });
        }
    }
    Ok(out)
}

/// Entries of a store directory.
pub(super) fn list_store(dir: &Path) -> Result<HashSet<OsString>, DbError> {
    let io = |source| DbError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.file_name()).map_err(io))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upper-like database with recorded paths for lower 1, and a
    /// lower database attached as `l` listing `now`.
    fn setup(recorded: &[&str], now: &[&str]) -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(super::super::NIX_SCHEMA_SQL).unwrap();
        c.execute_batch(super::super::LAYER_SCHEMA_SQL).unwrap();
        c.execute_batch("attach ':memory:' as l").unwrap();
        c.execute_batch(
            &super::super::NIX_SCHEMA_SQL.replace("if not exists ", "if not exists l."),
        )
        .unwrap();
        for p in recorded {
            c.execute(
                "insert into NixfsLayerLowerPath (lower, path) values (1, ?1)",
                [p],
            )
            .unwrap();
        }
        // Inserted out of order: the diff must not depend on id order.
        for p in now.iter().rev() {
            c.execute(
                "insert into l.ValidPaths (path, hash, registrationTime) values (?1, 'sha256:x', 0)",
                [p],
            )
            .unwrap();
        }
        c
    }

    fn paths(new: &[NewRow]) -> Vec<&str> {
        new.iter().map(|(_, p)| p.as_str()).collect()
    }

    #[test]
    fn diff_of_sorted_path_lists() {
        let c = setup(&["/b", "/c", "/e", "/g"], &["/a", "/c", "/d", "/g", "/h"]);
        let (new, gone) = diff_paths(&c, "l", 1, false).unwrap();
        assert_eq!(paths(&new), ["/a", "/d", "/h"]);
        assert_eq!(gone, ["/b", "/e"]);
        // Ids are the lower's.
        let id: i64 = c
            .query_row("select id from l.ValidPaths where path = '/d'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(new.contains(&(id, "/d".to_owned())));

        let (new, gone) = diff_paths(&c, "l", 1, true).unwrap();
        assert_eq!(paths(&new), ["/a", "/c", "/d", "/g", "/h"]);
        assert_eq!(gone, ["/b", "/e"]);

        // Another lower's records do not count; an empty side is all new or all gone.
        let (new, gone) = diff_paths(&c, "l", 2, false).unwrap();
        assert_eq!(new.len(), 5);
        assert!(gone.is_empty());
        let c = setup(&["/x", "/y"], &[]);
        let (new, gone) = diff_paths(&c, "l", 1, false).unwrap();
        assert!(new.is_empty());
        assert_eq!(gone, ["/x", "/y"]);
    }
}
