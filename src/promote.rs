//! Promoting upper paths into a lower: for whoever owns a lower (a
//! template VM, an NFS publisher). The closure of the given paths, minus
//! what the lower has, is copied into its `store/` and registered in its
//! database, published so that a reader never sees a half-written or
//! uncheckpointed state:
//!
//! 1. take Nix's big lock of the lower exclusively (no Nix process of the
//!    lower runs meanwhile) and checkpoint its database (WAL emptied);
//! 2. copy each path's contents under a temporary name, check its NAR hash,
//!    rename it into place (entries without a database row are not valid,
//!    so readers ignore them until step 3);
//! 3. write the new rows (and the changes to the index of published flake
//!    references, [`crate::published`]) into a copy of the database, in rollback-journal
//!    mode (one self-contained file), fsync it, and rename it over
//!    `db.sqlite`: a reader copies either the old file or the new one
//!    (its copy is retried if the file changed meanwhile).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OptionalExtension};

use crate::closure::Graph;
use crate::layer::Lower;
use crate::pathdb::{adopt, DbError};
use crate::published;
use crate::storecopy::{self, CopyError};
use crate::storepath::base_name;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Copying a path's contents into the lower failed (reading the
    /// merged store or writing the lower).
    #[error(transparent)]
    Copy(CopyError),
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: its contents hash to {actual}, the database says {expected}; nothing of it was promoted (run `nixfs-layer verify --check-contents`)")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0} is not a valid path of the mounted store; name a store path (or a link to one) that `nix-store --check-validity` accepts")]
    NotValid(String),
}

impl PromoteError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            PromoteError::NotValid(_) => Kind::NoInput,
            PromoteError::HashMismatch { .. } => Kind::DataErr,
            PromoteError::Sqlite { .. } => Kind::Software,
            PromoteError::Io { .. } => Kind::IoErr,
            PromoteError::Copy(e) => e.kind(),
            PromoteError::Db(e) => e.kind(),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PromoteError + '_ {
    move |source| PromoteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What was promoted.
#[derive(Debug, Default)]
pub struct Promoted {
    pub paths: Vec<String>,
    pub already: usize,
}

/// Copies the closure of `roots` (indexes into `graph`) that `lower` lacks
/// from the merged store at `store` into `lower`, and registers it there.
/// `merged` is the merged database, opened from `merged_db` (for rows'
/// full metadata).
pub fn promote(
    graph: &Graph,
    roots: &[usize],
    store: &Path,
    merged: &Connection,
    merged_db: &Path,
    lower: &Lower,
    index: &[published::Change],
) -> Result<Promoted, PromoteError> {
    let db = lower.db();
    let sql = |path: &Path| {
        let path = path.to_owned();
        move |source| PromoteError::Sqlite { path, source }
    };
    // 1. Exclusive use of the lower's database.
    let lock_path = lower.db_dir().join("big-lock");
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let lock_err = |e: Errno| PromoteError::Io {
        path: lock_path.clone(),
        source: e.into(),
    };
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((file, Errno::EWOULDBLOCK)) => {
            tracing::warn!(
                lock = %lock_path.display(),
                "Nix processes of this lower hold its big lock; waiting until none does: stop the nix-daemon and Nix commands that use {}",
                lower.dir().display()
            );
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| lock_err(e))?
        }
        Err((_, e)) => return Err(lock_err(e)),
    };
    {
        let c = Connection::open(&db).map_err(sql(&db))?;
        c.busy_timeout(std::time::Duration::from_secs(60))
            .map_err(sql(&db))?;
        c.query_row("pragma wal_checkpoint(truncate)", [], |_| Ok(()))
            .map_err(sql(&db))?;
    }

    let items: BTreeSet<usize> = graph
        .closure(roots.iter().copied())
        .into_iter()
        .filter(|&i| !graph.nodes[i].is_pin())
        .collect();
    let order = graph.export_order(&items);
    let tmp_db = lower.db_dir().join("db.sqlite.promote-tmp");
    let _ = fs::remove_file(&tmp_db);
    storecopy::copy_entry(&db, &tmp_db).map_err(PromoteError::Copy)?;
    let mut conn = Connection::open(&tmp_db).map_err(sql(&tmp_db))?;
    conn.pragma_update(None, "journal_mode", "delete")
        .map_err(sql(&tmp_db))?;
    let mut out = Promoted::default();
    let mut todo = Vec::new();
    for &i in &order {
        let n = &graph.nodes[i];
        let have: Option<i64> = conn
            .query_row("select 1 from ValidPaths where path = ?1", [&n.path], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(&tmp_db))?;
        if have.is_some() {
            out.already += 1;
        } else {
            todo.push(i);
        }
    }

    // 2. Contents, each checked against its recorded hash.
    let total: u64 = todo.iter().map(|&i| graph.nodes[i].nar_size).sum();
    let _stage = crate::progress::stage(
        &format!("copying into {}", lower.dir().display()),
        (total > 0).then_some(total),
        crate::progress::Unit::Bytes,
    );
    for &i in &todo {
        let n = &graph.nodes[i];
        let base = base_name(&n.path);
        let (src, dst) = (store.join(base), lower.store().join(base));
        // An entry without a row (a dangling symlink included) goes.
        storecopy::remove_tree(&dst).map_err(io(&dst))?;
        let tmp = lower.store().join(format!(".{base}.promote-tmp"));
        let _ = storecopy::remove_tree(&tmp);
        if let Err(e) = storecopy::copy_verified(&src, &tmp, &n.hash) {
            let _ = fs::remove_file(&tmp_db);
            return Err(match e {
                CopyError::Mismatch {
                    expected, actual, ..
                } => PromoteError::HashMismatch {
                    path: n.path.clone(),
                    expected,
                    actual,
                },
                e => PromoteError::Copy(e),
            });
        }
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
    }

    // 3. Rows, then publish the database in one rename.
    let tx = conn.transaction().map_err(sql(&tmp_db))?;
    for &i in &todo {
        let n = &graph.nodes[i];
        let row = merged
            .query_row(
                "select hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths where path = ?1",
                [&n.path],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(sql(merged_db))?
            .ok_or_else(|| PromoteError::NotValid(n.path.clone()))?;
        tx.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![n.path, row.0, row.1, row.2, row.3, row.4, row.5, row.6],
        )
        .map_err(sql(&tmp_db))?;
    }
    for &i in &todo {
        let n = &graph.nodes[i];
        for &r in &n.refs {
            tx.execute(
                "insert or ignore into Refs (referrer, reference)
                 select a.id, b.id from ValidPaths a, ValidPaths b where a.path = ?1 and b.path = ?2",
                params![n.path, graph.nodes[r].path],
            )
            .map_err(sql(&tmp_db))?;
        }
        let outputs: Vec<(String, String)> = merged
            .prepare(
                "select o.id, o.path from DerivationOutputs o join ValidPaths v on v.id = o.drv where v.path = ?1",
            )
            .and_then(|mut s| s.query_map([&n.path], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(sql(merged_db))?;
        for (id, path) in outputs {
            tx.execute(
                "insert or ignore into DerivationOutputs (drv, id, path)
                 select id, ?2, ?3 from ValidPaths where path = ?1",
                params![n.path, id, path],
            )
            .map_err(sql(&tmp_db))?;
        }
        out.paths.push(n.path.clone());
    }
    // The index of published references, in the same database.
    published::apply(&tx, index).map_err(sql(&tmp_db))?;
    tx.commit().map_err(sql(&tmp_db))?;
    drop(conn);
    File::open(&tmp_db)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp_db))?;
    adopt::replace_db(&tmp_db, &db)?;
    Ok(out)
}
