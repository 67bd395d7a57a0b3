//! Published references, as the tree reads them: the indexes of the
//! stack's lowers ([`crate::published`]), in stack order, each read again
//! only when its database file changes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::pathdb::open_read_only;
use crate::published::{self, Entry};

/// What identifies one version of a lower's database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(file: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(file)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

type Index = Arc<HashMap<String, Entry>>;

/// The stack's published references.
#[derive(Debug)]
pub struct Indexes {
    /// The merged database: its `NixfsLayerLower` table lists the lowers.
    merged: PathBuf,
    loaded: Mutex<HashMap<PathBuf, (Stamp, Index)>>,
    /// Lowers whose database could not be looked at, warned about once
    /// until it can be again.
    unreadable: Mutex<std::collections::HashSet<PathBuf>>,
}

impl Indexes {
    pub fn for_merged_db(merged: &Path) -> Indexes {
        Indexes {
            merged: merged.to_owned(),
            loaded: Mutex::default(),
            unreadable: Mutex::default(),
        }
    }

    /// The lowers' directories, top first, as of the last sync.
    fn lowers(&self) -> Vec<PathBuf> {
        let Ok(conn) = open_read_only(&self.merged) else {
            return Vec::new();
        };
        let dirs = conn
            .prepare("select dir from NixfsLayerLower where priority is not null order by priority")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            });
        dirs.map(|d| d.into_iter().map(PathBuf::from).collect())
            .unwrap_or_default()
    }

    fn index_of(&self, lower: &Path) -> Option<Index> {
        let db = lower.join("var/nix/db/db.sqlite");
        let st = match stamp(&db) {
            Ok(st) => {
                self.unreadable.lock().unwrap().remove(lower);
                st
            }
            // A lower with no database publishes nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                if self.unreadable.lock().unwrap().insert(lower.to_owned()) {
                    tracing::warn!(db = %db.display(), error = %e, "cannot look at the lower's database; its published references are not answered until it can be read (is the lower's server reachable?)");
                }
                return None;
            }
        };
        if let Some((s, idx)) = self.loaded.lock().unwrap().get(lower) {
            if *s == st {
                return Some(idx.clone());
            }
        }
        let entries = match published::read(&db) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(db = %db.display(), error = %e, "cannot read the lower's published index; ignoring it");
                Vec::new()
            }
        };
        let idx: Index = Arc::new(
            entries
                .into_iter()
                .map(|e| (e.reference.clone(), e))
                .collect(),
        );
        self.loaded
            .lock()
            .unwrap()
            .insert(lower.to_owned(), (st, idx.clone()));
        Some(idx)
    }

    /// The first lower's entry for `reference`, with that lower's directory.
    pub fn find(&self, reference: &str) -> Option<(Entry, PathBuf)> {
        self.lowers().into_iter().find_map(|dir| {
            let e = self.index_of(&dir)?.get(reference)?.clone();
            Some((e, dir))
        })
    }
}
