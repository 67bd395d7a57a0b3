//! `verify --repair` on a damaged merged database: a new one is made from
//! the layers, and swapped in for the damaged one, which is kept aside.
//!
//! 1. Nix is locked out (its `big-lock`, exclusively; the caller holds the
//!    upper's lock), so nothing writes the database meanwhile.
//! 2. A fresh database next to the damaged one gets the lowers' paths from
//!    their databases: the merge that `mount` runs into a fresh upper.
//! 3. Every entry of the upper's store that is not valid then is an upper
//!    path: its row comes from the journal of the upper's registrations
//!    (`pathdb/journal.rs`: deriver, signatures, registration time, CA
//!    field, references, derivation outputs as Nix recorded them) if its
//!    content still hashes to the journal's narHash; otherwise it is hashed
//!    and its references are found by scanning it, as for an unregistered
//!    entry. An entry whose references are not all valid is left out.
//! 4. The pin is made as in every merge; GC roots live outside the
//!    database (`var/nix/gcroots`) and stay as they are.
//! 5. The new file is renamed over `db.sqlite` (one rename: Nix finds either
//!    the old file or the new one); the damaged one stays as
//!    `db.sqlite.damaged-<unix time>` (with its `-wal`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::{is_bookkeeping, scan_upper, Entry, VerifyError};
use crate::layer::{Lower, Upper};
use crate::nar::NarHash;
use crate::pathdb::journal::{self, Registration};
use crate::pathdb::merge::{self, Needed, SyncOptions};
use crate::pathdb::{self, adopt, health, sql_err, DbError};
use crate::refscan;
use crate::storepath::StorePath;

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rebuilt {
    /// Where the damaged database was kept.
    pub damaged_copy: String,
    /// Lower paths the new database took from the lowers' databases.
    pub lower_paths: u64,
    /// Upper paths registered with their journal row.
    pub from_journal: Vec<String>,
    /// Upper paths the journal lacked (or whose content changed since),
    /// registered by hashing and scanning their content.
    pub scanned: Vec<String>,
}

/// The lowers to rebuild from: the mounted stack's, else those the journal
/// recorded at the last sync, else those the damaged file still names.
pub fn lowers_for(upper: &Upper, mounted: Option<&[PathBuf]>) -> Result<Vec<Lower>, VerifyError> {
    let dirs = match mounted {
        Some(m) => m.to_vec(),
        None => {
            let recorded = journal::load(upper)?.lowers;
            if recorded.is_empty() {
                lowers_in_damaged(&upper.db()).unwrap_or_default()
            } else {
                recorded
            }
        }
    };
    if dirs.is_empty() {
        return Err(VerifyError::NoLowers {
            upper: upper.dir().to_owned(),
        });
    }
    Ok(dirs
        .iter()
        .map(|d| Lower::open(d))
        .collect::<Result<Vec<_>, _>>()?)
}

/// The lowers a damaged merged database still lists, if it can be read.
fn lowers_in_damaged(db: &Path) -> Option<Vec<PathBuf>> {
    let c = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let mut stmt = c
        .prepare("select dir from NixfsLayerLower where priority is not null order by priority")
        .ok()?;
    let dirs = stmt
        .query_map([], |r| Ok(PathBuf::from(r.get::<_, String>(0)?)))
        .ok()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ok();
    dirs
}

/// Rebuilds the upper's merged database from `lowers` and the upper's
/// store (see the module docs). `mounted_store` is `TARGET/store` when the
/// stack is mounted. The caller holds the upper's lock.
pub fn rebuild(
    upper: &Upper,
    lowers: &[Lower],
    mounted_store: Option<&Path>,
) -> Result<Rebuilt, VerifyError> {
    let db_dir = upper.db_dir();
    let Some(_nix) = health::lock_out_nix(&db_dir)? else {
        return Err(DbError::NixBusy { db_dir }.into());
    };
    let db = upper.db();
    let fresh = db_dir.join("db.sqlite.rebuild");
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(sidecar(&fresh, suffix));
    }
    pathdb::create(&fresh)?;
    let summary = merge::sync(
        upper,
        lowers,
        &SyncOptions {
            needed: Needed::KeepBroken,
            force: true,
            mounted_store,
            db: Some(&fresh),
            ..Default::default()
        },
    )?;
    tracing::info!(%summary, "new merged database: the lowers' paths");
    let journal = journal::load(upper)?;
    let mut conn = pathdb::open(&fresh)?;
    let mut out = Rebuilt {
        lower_paths: summary.added,
        ..Default::default()
    };
    register_upper(&mut conn, &fresh, upper, &journal.registrations, &mut out)?;
    conn.pragma_update(None, "wal_checkpoint", "truncate")
        .map_err(sql_err(&fresh))?;
    drop(conn);

    // Keep the damaged file aside (a second name for it, so `db.sqlite`
    // never goes missing), then rename the new one over it.
    let aside = db_dir.join(format!("db.sqlite.damaged-{}", merge::now()));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VerifyError::Io { path, source }
    };
    if db.exists() {
        fs::hard_link(&db, &aside).map_err(io(&aside))?;
    }
    let wal = sidecar(&db, "-wal");
    if wal.exists() {
        fs::rename(&wal, sidecar(&aside, "-wal")).map_err(io(&wal))?;
    }
    adopt::replace_db(&fresh, &db)?;
    out.damaged_copy = aside.display().to_string();
    tracing::warn!(damaged = %aside.display(), "the damaged merged database was replaced by one rebuilt from the layers");

    // The journal follows the new file.
    let conn = pathdb::open(&db)?;
    let dirs: Vec<PathBuf> = lowers.iter().map(|l| l.dir().to_owned()).collect();
    journal::record_or_warn(&conn, upper, &dirs);
    Ok(out)
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An upper entry to register, and how.
struct Entry2 {
    path: StorePath,
    row: Registration,
    from_journal: bool,
}

/// Registers the upper's store entries the new database lacks, in one
/// transaction.
fn register_upper(
    conn: &mut Connection,
    db: &Path,
    upper: &Upper,
    journal: &HashMap<String, Registration>,
    out: &mut Rebuilt,
) -> Result<(), VerifyError> {
    let err = sql_err(db);
    let listing = scan_upper(&upper.store())?;
    let valid: Vec<StorePath> = conn
        .prepare("select path from ValidPaths")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&err)?
        .into_iter()
        .filter_map(|p| StorePath::parse(&p).ok())
        .collect();
    let valid_names: HashSet<&str> = valid.iter().map(StorePath::base_name).collect();
    let mut todo: Vec<StorePath> = listing
        .iter()
        .filter(|(name, kind)| {
            **kind == Entry::Real
                && !is_bookkeeping(name, &listing)
                && !valid_names.contains(name.as_str())
        })
        .filter_map(|(name, _)| StorePath::from_base_name(name).ok())
        .collect();
    todo.sort_by(|a, b| a.base_name().cmp(b.base_name()));
    let wanted = refscan::candidates(valid.iter().chain(&todo));
    let mut entries = Vec::new();
    for p in todo {
        let abs = p.to_absolute();
        let at = upper.store().join(p.base_name());
        let (h, scanned): (NarHash, BTreeSet<String>) =
            refscan::hash_and_scan(&at, &wanted).map_err(super::io_err(&at))?;
        let entry = match journal.get(&abs).filter(|r| h.matches_db(&r.hash)) {
            Some(r) => Entry2 {
                path: p,
                row: r.clone(),
                from_journal: true,
            },
            None => Entry2 {
                row: Registration {
                    path: abs,
                    hash: h.to_db_string(),
                    registration_time: merge::now(),
                    deriver: None,
                    nar_size: Some(h.size as i64),
                    ultimate: Some(1),
                    sigs: None,
                    ca: None,
                    references: scanned.into_iter().collect(),
                    outputs: Vec::new(),
                },
                path: p,
                from_journal: false,
            },
        };
        entries.push(entry);
    }
    // Only entries whose every reference is valid: drop the others until
    // none is left to drop (one may refer to another dropped one).
    let valid_abs: HashSet<String> = valid.iter().map(StorePath::to_absolute).collect();
    loop {
        let here: HashSet<String> = entries.iter().map(|e| e.row.path.clone()).collect();
        let before = entries.len();
        entries.retain(|e| {
            let missing = e
                .row
                .references
                .iter()
                .find(|r| !valid_abs.contains(*r) && !here.contains(*r));
            if let Some(m) = missing {
                tracing::warn!(path = %e.row.path, reference = %m, "upper path not registered: it refers to a path no layer has");
            }
            missing.is_none()
        });
        if entries.len() == before {
            break;
        }
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    for e in &entries {
        let r = &e.row;
        tx.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![r.path, r.hash, r.registration_time, r.deriver, r.nar_size, r.ultimate, r.sigs, r.ca],
        )
        .map_err(&err)?;
    }
    let id_of = |tx: &Connection, p: &str| -> Result<Option<i64>, DbError> {
        tx.query_row("select id from ValidPaths where path = ?1", [p], |r| {
            r.get(0)
        })
        .optional()
        .map_err(&err)
    };
    for e in &entries {
        let r = &e.row;
        let Some(id) = id_of(&tx, &r.path)? else {
            continue;
        };
        for x in &r.references {
            if let Some(rid) = id_of(&tx, x)? {
                tx.execute(
                    "insert or ignore into Refs (referrer, reference) values (?1, ?2)",
                    params![id, rid],
                )
                .map_err(&err)?;
            }
        }
        for (name, p) in &r.outputs {
            tx.execute(
                "insert or replace into DerivationOutputs (drv, id, path) values (?1, ?2, ?3)",
                params![id, name, p],
            )
            .map_err(&err)?;
        }
        let abs = e.path.to_absolute();
        if e.from_journal {
            out.from_journal.push(abs);
        } else {
            out.scanned.push(abs);
        }
    }
    tx.commit().map_err(&err)?;
    tracing::info!(
        from_journal = out.from_journal.len(),
        scanned = out.scanned.len(),
        "registered the upper's paths"
    );
    Ok(())
}
