//! The journal of the upper's own registrations: a small side database,
//! `UPPER/nixfs-layer/journal.sqlite`, holding a copy of every row Nix
//! registered through the merged store (provenance 0) — its ValidPaths
//! columns, its references and derivation outputs by path text — and the
//! lowers of the stack. It is what `verify --repair` rebuilds a damaged
//! merged database from: the lowers' databases give the lower paths, the
//! journal the upper's with their deriver, signatures, registration time
//! and CA field (a rebuild by hashing and scanning alone would lose them).
//!
//! It is brought up to date whenever the tool syncs the merged database
//! (`mount`, `sync`, `umount`, `verify`). Cheaply: new rows are those
//! whose id is above the last one copied (ids only grow), rows changed in
//! place are listed by triggers in `NixfsLayerJournalDirty`; with neither
//! it reads four small values and writes nothing. Paths registered after
//! the last catch-up are not in it: a rebuild hashes and scans those.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{sql_err, DbError};
use crate::layer::Upper;

const JOURNAL_SQL: &str = "
create table if not exists Paths (
    path text primary key not null,
    hash text not null,
    registrationTime integer not null,
    deriver text,
    narSize integer,
    ultimate integer,
    sigs text,
    ca text
) without rowid;
create table if not exists Refs (
    referrer text not null,
    reference text not null,
    primary key (referrer, reference)
) without rowid;
create table if not exists DerivationOutputs (
    drv text not null,
    id text not null,
    path text not null,
    primary key (drv, id)
) without rowid;
create table if not exists State (
    key text primary key not null,
    value
) without rowid;
create table if not exists Lowers (
    priority integer primary key not null,
    dir text not null
);
";

/// Where an upper keeps its journal.
pub fn file(upper: &Upper) -> PathBuf {
    upper.tool_dir().join("journal.sqlite")
}

fn open_journal(path: &Path) -> Result<Connection, DbError> {
    let err = sql_err(path);
    let j = Connection::open(path).map_err(&err)?;
    j.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(&err)?;
    j.execute_batch(JOURNAL_SQL).map_err(&err)?;
    Ok(j)
}

/// One upper registration as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub path: String,
    pub hash: String,
    pub registration_time: i64,
    pub deriver: Option<String>,
    pub nar_size: Option<i64>,
    pub ultimate: Option<i64>,
    pub sigs: Option<String>,
    pub ca: Option<String>,
    /// Store paths it refers to.
    pub references: Vec<String>,
    /// (output name, output path), for a `.drv`.
    pub outputs: Vec<(String, String)>,
}

/// The merged database's token, made on first use.
fn db_token(conn: &Connection, db: &Path) -> Result<String, DbError> {
    let err = sql_err(db);
    let get = || {
        conn.query_row("select token from NixfsLayerDbId limit 1", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()
    };
    if let Some(t) = get().map_err(&err)? {
        return Ok(t);
    }
    conn.execute(
        "insert into NixfsLayerDbId (token) select lower(hex(randomblob(16)))
         where not exists (select 1 from NixfsLayerDbId)",
        [],
    )
    .map_err(&err)?;
    Ok(get().map_err(&err)?.unwrap_or_default())
}

/// Copies into the journal the upper's rows of the merged database `conn`
/// (the upper's, open read-write) that are new or changed since the last
/// time, and the stack's lowers if they changed. Returns how many rows it
/// copied. The caller holds the upper's lock.
pub fn record(conn: &Connection, upper: &Upper, lowers: &[PathBuf]) -> Result<usize, DbError> {
    let db = upper.db();
    let err = sql_err(&db);
    let jpath = file(upper);
    let jerr = sql_err(&jpath);
    let mut j = open_journal(&jpath)?;
    let token = db_token(conn, &db)?;
    let state = |key: &str| -> Result<Option<rusqlite::types::Value>, DbError> {
        j.query_row("select value from State where key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(&jerr)
    };
    let same_db = matches!(state("token")?, Some(rusqlite::types::Value::Text(t)) if t == token);
    let mark = match state("mark")? {
        Some(rusqlite::types::Value::Integer(m)) if same_db => m,
        _ => -1,
    };
    let dirs: Vec<String> = lowers
        .iter()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let recorded: Vec<String> = j
        .prepare("select dir from Lowers order by priority")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(&jerr)?;
    let max_id: i64 = conn
        .query_row("select coalesce(max(id), 0) from ValidPaths", [], |r| {
            r.get(0)
        })
        .map_err(&err)?;
    let dirty: i64 = conn
        .query_row(
            "select count(*) from (select 1 from NixfsLayerJournalDirty limit 1)",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    // Ids below the mark in a database that has fewer rows than that: a
    // file restored from an older copy. Start over.
    let from = if max_id < mark { -1 } else { mark };
    if from == max_id && dirty == 0 && recorded == dirs {
        return Ok(0);
    }

    // Read the rows while Nix cannot change them (a changed row is listed
    // once in NixfsLayerJournalDirty; the list is cleared in the same
    // transaction, after the journal has them).
    let tx = conn.unchecked_transaction().map_err(&err)?;
    if dirty > 0 {
        // Upgrade to a write lock now rather than at the delete below.
        tx.execute("delete from NixfsLayerJournalDirty where 0", [])
            .map_err(&err)?;
    }
    let rows = read_rows(&tx, from).map_err(&err)?;
    let max_id: i64 = tx
        .query_row("select coalesce(max(id), 0) from ValidPaths", [], |r| {
            r.get(0)
        })
        .map_err(&err)?;
    {
        let jt = j
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&jerr)?;
        // Rows of another file are kept (not wiped) when it starts over: a
        // rebuild checks every row against the content it is about anyway.
        for r in &rows {
            write_row(&jt, r).map_err(&jerr)?;
        }
        jt.execute(
            "insert or replace into State (key, value) values ('token', ?1), ('mark', ?2)",
            params![token, max_id],
        )
        .map_err(&jerr)?;
        if recorded != dirs {
            jt.execute("delete from Lowers", []).map_err(&jerr)?;
            for (i, d) in dirs.iter().enumerate() {
                jt.execute(
                    "insert into Lowers (priority, dir) values (?1, ?2)",
                    params![i as i64, d],
                )
                .map_err(&jerr)?;
            }
        }
        jt.commit().map_err(&jerr)?;
    }
    if dirty > 0 {
        tx.execute("delete from NixfsLayerJournalDirty", [])
            .map_err(&err)?;
    }
    tx.commit().map_err(&err)?;
    tracing::debug!(
        rows = rows.len(),
        "journal of the upper's registrations up to date"
    );
    Ok(rows.len())
}

/// [`record`], but a failure is only warned about: the journal is a
/// safety net, not worth failing a mount or sync over.
pub fn record_or_warn(conn: &Connection, upper: &Upper, lowers: &[PathBuf]) {
    if let Err(e) = record(conn, upper, lowers) {
        tracing::warn!(error = %e, "could not bring the journal of the upper's registrations up to date; `verify --repair` would hash and scan the upper's paths it lacks");
    }
}

/// Opens the upper's merged database and [`record_or_warn`]s (`umount`
/// does, for what Nix registered since the last sync).
pub fn catch_up(upper: &Upper, lowers: &[PathBuf]) {
    match super::open(&upper.db()) {
        Ok(conn) => record_or_warn(&conn, upper, lowers),
        Err(e) => {
            tracing::warn!(error = %e, "could not bring the journal of the upper's registrations up to date")
        }
    }
}

/// The upper's rows with an id above `from`, and those listed as changed:
/// a range of ids and a few lookups, not a scan of every row.
fn read_rows(conn: &Connection, from: i64) -> rusqlite::Result<Vec<Registration>> {
    let mut stmt = conn.prepare(
        "select v.id, v.path, v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca
         from ValidPaths v cross join NixfsLayerOrigin o on o.path = v.path
         where o.layer = 0 and v.id in (
           select id from ValidPaths where id > ?1
           union select w.id from NixfsLayerJournalDirty d cross join ValidPaths w on w.path = d.path)
         order by v.id",
    )?;
    let mut refs = conn.prepare(
        "select d.path from Refs r cross join ValidPaths d on d.id = r.reference
         where r.referrer = ?1 order by 1",
    )?;
    let mut outs =
        conn.prepare("select id, path from DerivationOutputs where drv = ?1 order by 1")?;
    let mut out = Vec::new();
    let mut rows = stmt.query([from])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        out.push(Registration {
            path: r.get(1)?,
            hash: r.get(2)?,
            registration_time: r.get(3)?,
            deriver: r.get(4)?,
            nar_size: r.get(5)?,
            ultimate: r.get(6)?,
            sigs: r.get(7)?,
            ca: r.get(8)?,
            references: refs
                .query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?,
            outputs: outs
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?,
        });
    }
    Ok(out)
}

fn write_row(j: &Connection, r: &Registration) -> rusqlite::Result<()> {
    j.execute(
        "insert or replace into Paths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            r.path,
            r.hash,
            r.registration_time,
            r.deriver,
            r.nar_size,
            r.ultimate,
            r.sigs,
            r.ca
        ],
    )?;
    j.execute("delete from Refs where referrer = ?1", [&r.path])?;
    j.execute("delete from DerivationOutputs where drv = ?1", [&r.path])?;
    for x in &r.references {
        j.execute(
            "insert or ignore into Refs (referrer, reference) values (?1, ?2)",
            params![r.path, x],
        )?;
    }
    for (id, p) in &r.outputs {
        j.execute(
            "insert or replace into DerivationOutputs (drv, id, path) values (?1, ?2, ?3)",
            params![r.path, id, p],
        )?;
    }
    Ok(())
}

/// What a journal holds.
#[derive(Debug, Default)]
pub struct Journal {
    /// The stack's lowers at the last catch-up, first on top.
    pub lowers: Vec<PathBuf>,
    /// By store path.
    pub registrations: HashMap<String, Registration>,
}

/// Reads an upper's journal (empty if it has none).
pub fn load(upper: &Upper) -> Result<Journal, DbError> {
    let jpath = file(upper);
    if !jpath.exists() {
        return Ok(Journal::default());
    }
    let jerr = sql_err(&jpath);
    let j = open_journal(&jpath)?;
    let lowers = j
        .prepare("select dir from Lowers order by priority")
        .and_then(|mut s| {
            s.query_map([], |r| Ok(PathBuf::from(r.get::<_, String>(0)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&jerr)?;
    let mut registrations = HashMap::new();
    let mut read = || -> rusqlite::Result<()> {
        let mut stmt = j.prepare(
            "select path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from Paths",
        )?;
        let mut refs = j.prepare("select reference from Refs where referrer = ?1 order by 1")?;
        let mut outs =
            j.prepare("select id, path from DerivationOutputs where drv = ?1 order by 1")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let path: String = r.get(0)?;
            let reg = Registration {
                hash: r.get(1)?,
                registration_time: r.get(2)?,
                deriver: r.get(3)?,
                nar_size: r.get(4)?,
                ultimate: r.get(5)?,
                sigs: r.get(6)?,
                ca: r.get(7)?,
                references: refs
                    .query_map([&path], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?,
                outputs: outs
                    .query_map([&path], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?,
                path: path.clone(),
            };
            registrations.insert(path, reg);
        }
        Ok(())
    };
    read().map_err(&jerr)?;
    Ok(Journal {
        lowers,
        registrations,
    })
}
