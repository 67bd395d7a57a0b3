//! The layer model: where each layer keeps its store, its Nix database and
//! this tool's state.
//!
//! ```text
//! lower  <dir>/store                      read-only store tree
//!        <dir>/var/nix/db/db.sqlite       its Nix database (schema 10)
//! upper  <dir>/store                      overlayfs upperdir
//!        <dir>/work                       overlayfs workdir
//!        <dir>/var/nix/db/db.sqlite       the merged database Nix uses
//!        <dir>/var/{nix,log}/...          the rest of Nix's state (bound on TARGET/var)
//!        <dir>/nixfs-layer/               this tool's state (marker, lock, snapshots)
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The Nix database schema version this tool reads and writes.
pub const NIX_SCHEMA_VERSION: &str = "10";

/// The most lowers one stack may have (SQLite attaches each lower's
/// database while merging, and allows ten attached databases in all).
pub const MAX_LOWERS: usize = 8;

const UPPER_MARKER: &str = "nixfs-layer/upper.toml";
const UPPER_MARKER_TEXT: &str = "# This directory is a nixfs-layer upper layer.\nformat = 1\n";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("lower {0}: no such directory; pass the directory that holds the lower's store/ and var/nix/db/")]
    LowerMissing(PathBuf),
    #[error("lower {dir}: cannot be read ({source}); if it is a network file system, check that its server is reachable and its mount is up, then retry")]
    LowerUnreadable { dir: PathBuf, source: io::Error },
    #[error("lower {0}: no store/ directory in it; a lower is a Nix root holding store/ and var/nix/db/db.sqlite")]
    LowerNoStore(PathBuf),
    #[error("lower {dir}: no Nix database at {db}; a lower is a Nix root holding store/ and var/nix/db/db.sqlite")]
    LowerNoDb { dir: PathBuf, db: PathBuf },
    #[error("lower {dir}: {schema} says schema version '{found}', this tool reads version {NIX_SCHEMA_VERSION}; open the lower once with a Nix of version 2.0 or later to upgrade it")]
    LowerSchema {
        dir: PathBuf,
        schema: PathBuf,
        found: String,
    },
    #[error("upper {0}: not initialised; run `nixfs-layer init --upper {0}` first")]
    UpperNotInitialised(PathBuf),
    #[error("upper {0}: directory is not empty and is not a nixfs-layer upper; pick an empty or new directory")]
    UpperForeign(PathBuf),
    #[error("{0} is given both as a lower and as the upper; the upper must be a separate, writable directory")]
    SameDir(PathBuf),
    #[error("lower {lower} and upper {upper} overlap (one lies inside the other); keep them in separate trees")]
    Overlap { lower: PathBuf, upper: PathBuf },
    #[error("lower {0} is given twice")]
    DuplicateLower(PathBuf),
    #[error("{0}: overlayfs cannot take ',', ':', '\\' or whitespace in a layer path; use a path (or a symlink) without them")]
    UnmountablePath(PathBuf),
    #[error("{count} lowers given; at most {MAX_LOWERS} are supported")]
    TooManyLowers { count: usize },
    #[error("no --lower given (and none in the config file)")]
    NoLower,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A validated read-only lower: a Nix root with `store/` and a schema-10 DB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lower {
    dir: PathBuf,
}

impl Lower {
    /// Checks that `dir` looks like a Nix root and returns it canonicalised.
    pub fn open(dir: &Path) -> Result<Lower, LayerError> {
        // A lower on a network file system whose server is gone answers
        // EIO/ENOTCONN/ESTALE: say so rather than "no such directory".
        let unreadable = |dir: &Path, source: io::Error| LayerError::LowerUnreadable {
            dir: dir.to_owned(),
            source,
        };
        let dir = match fs::canonicalize(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayerError::LowerMissing(dir.to_owned()))
            }
            Err(e) => return Err(unreadable(dir, e)),
        };
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(unreadable(&dir, e)),
            _ => return Err(LayerError::LowerMissing(dir)),
        }
        let lower = Lower { dir };
        match fs::metadata(lower.store()) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(unreadable(&lower.dir, e)),
            _ => return Err(LayerError::LowerNoStore(lower.dir)),
        }
        if let Err(e) = fs::metadata(lower.db()) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(unreadable(&lower.dir, e));
            }
        }
        if !lower.db().is_file() {
            return Err(LayerError::LowerNoDb {
                db: lower.db(),
                dir: lower.dir,
            });
        }
        let schema = lower.db_dir().join("schema");
        let found = fs::read_to_string(&schema).unwrap_or_else(|_| "<missing>".into());
        if found.trim() != NIX_SCHEMA_VERSION {
            return Err(LayerError::LowerSchema {
                dir: lower.dir,
                schema,
                found: found.trim().to_owned(),
            });
        }
        check_mountable(&lower.dir)?;
        Ok(lower)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("var/nix/db")
    }
    pub fn db(&self) -> PathBuf {
        self.db_dir().join("db.sqlite")
    }
}

/// Which directories a lower's path names right now: device and inode of
/// the lower directory and of its `store/`. overlayfs holds on to the
/// `store/` it was mounted with, so when a publisher renames a new tree into
/// place (or replaces `store/`), the mounted overlay still shows the old one
/// while the path shows the new one: these numbers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LowerIdentity {
    pub dev: u64,
    pub ino: u64,
    pub store_dev: u64,
    pub store_ino: u64,
}

impl std::fmt::Display for LowerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{},{}:{}",
            self.dev, self.ino, self.store_dev, self.store_ino
        )
    }
}

impl Lower {
    /// The lower's [`LowerIdentity`] now.
    pub fn identity(&self) -> Result<LowerIdentity, LayerError> {
        use std::os::unix::fs::MetadataExt;
        let stat = |p: &Path| {
            fs::metadata(p).map_err(|source| LayerError::LowerUnreadable {
                dir: self.dir.clone(),
                source,
            })
        };
        let (d, s) = (stat(&self.dir)?, stat(&self.store())?);
        Ok(LowerIdentity {
            dev: d.dev(),
            ino: d.ino(),
            store_dev: s.dev(),
            store_ino: s.ino(),
        })
    }
}

/// A lower directory that is not the one a mount recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub dir: PathBuf,
    pub was: LowerIdentity,
    /// None when the directory (or its `store/`) cannot be found or read now.
    pub now: Option<LowerIdentity>,
}

/// The lowers of `dirs` whose identity differs from the one `recorded`
/// for them (same order; a record without identities tells nothing).
pub fn replaced(dirs: &[PathBuf], recorded: &[LowerIdentity]) -> Vec<Replaced> {
    dirs.iter()
        .zip(recorded)
        .filter_map(|(dir, was)| {
            let now = Lower { dir: dir.clone() }.identity().ok();
            (now.as_ref() != Some(was)).then(|| Replaced {
                dir: dir.clone(),
                was: *was,
                now,
            })
        })
        .collect()
}

/// The writable upper layer this tool owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upper {
    dir: PathBuf,
}

impl Upper {
    /// Opens an upper made by [`Upper::init`].
    pub fn open(dir: &Path) -> Result<Upper, LayerError> {
        let canon =
            fs::canonicalize(dir).map_err(|_| LayerError::UpperNotInitialised(dir.to_owned()))?;
        let upper = Upper { dir: canon };
        if !upper.dir.join(UPPER_MARKER).is_file() {
            return Err(LayerError::UpperNotInitialised(upper.dir));
        }
        check_mountable(&upper.dir)?;
        Ok(upper)
    }

    /// Creates the directory skeleton of an upper (idempotent). The merged
    /// database itself is created by the caller (see `pathdb`).
    pub fn init(dir: &Path) -> Result<Upper, LayerError> {
        if dir.exists() {
            let canon = fs::canonicalize(dir).map_err(io_err(dir))?;
            let marked = canon.join(UPPER_MARKER).is_file();
            let empty = fs::read_dir(&canon)
                .map_err(io_err(&canon))?
                .next()
                .is_none();
            if !marked && !empty {
                return Err(LayerError::UpperForeign(canon));
            }
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let upper = Upper {
            dir: fs::canonicalize(dir).map_err(io_err(dir))?,
        };
        check_mountable(&upper.dir)?;
        for d in [
            upper.store(),
            upper.work(),
            upper.db_dir(),
            upper.var().join("nix/gcroots"),
            upper.var().join("nix/profiles"),
            upper.var().join("nix/temproots"),
            upper.var().join("log/nix/drvs"),
            upper.tool_dir(),
            upper.tmp_dir(),
        ] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let marker = upper.dir.join(UPPER_MARKER);
        if !marker.exists() {
            fs::write(&marker, UPPER_MARKER_TEXT).map_err(io_err(&marker))?;
        }
        Ok(upper)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The overlayfs upperdir.
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    /// The overlayfs workdir.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Bound on `TARGET/var`: Nix's state (`var/nix`) and logs (`var/log`).
    pub fn var(&self) -> PathBuf {
        self.dir.join("var")
    }
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("var/nix/db")
    }
    /// The merged database: what `TARGET/var/nix/db/db.sqlite` shows.
    pub fn db(&self) -> PathBuf {
        self.db_dir().join("db.sqlite")
    }
    /// This tool's own state.
    pub fn tool_dir(&self) -> PathBuf {
        self.dir.join("nixfs-layer")
    }
    /// Scratch space for lower database snapshots (same filesystem as the upper).
    pub fn tmp_dir(&self) -> PathBuf {
        self.tool_dir().join("tmp")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.tool_dir().join("lock")
    }
    pub fn mount_record(&self) -> PathBuf {
        self.tool_dir().join("mount.json")
    }
}

/// Lowers (first = top priority) under one upper, mounted at a target.
#[derive(Debug, Clone)]
pub struct Stack {
    pub lowers: Vec<Lower>,
    pub upper: Upper,
}

impl Stack {
    /// Opens and validates a stack from the paths a user gave. The layers'
    /// relative placement is checked before each layer's own contents, so
    /// that "the same directory as lower and upper" is reported as such.
    pub fn open(lowers: &[PathBuf], upper: &Path) -> Result<Stack, LayerError> {
        if lowers.is_empty() {
            return Err(LayerError::NoLower);
        }
        if lowers.len() > MAX_LOWERS {
            return Err(LayerError::TooManyLowers {
                count: lowers.len(),
            });
        }
        let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let upper_dir = canon(upper);
        let mut seen: Vec<PathBuf> = Vec::new();
        for l in lowers {
            let l = canon(l);
            if l == upper_dir {
                return Err(LayerError::SameDir(l));
            }
            if l.starts_with(&upper_dir) || upper_dir.starts_with(&l) {
                return Err(LayerError::Overlap {
                    lower: l,
                    upper: upper_dir,
                });
            }
            if seen.contains(&l) {
                return Err(LayerError::DuplicateLower(l));
            }
            seen.push(l);
        }
        let lowers = lowers
            .iter()
            .map(|l| Lower::open(l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Stack {
            lowers,
            upper: Upper::open(upper)?,
        })
    }
}

/// overlayfs takes its layers as one comma/colon separated option string.
fn check_mountable(dir: &Path) -> Result<(), LayerError> {
    let s = dir.to_string_lossy();
    if s.chars()
        .any(|c| c == ',' || c == ':' || c == '\\' || c.is_whitespace())
    {
        return Err(LayerError::UnmountablePath(dir.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_lower(root: &Path, schema: &str) -> PathBuf {
        let dir = root.join("lower");
        fs::create_dir_all(dir.join("store")).unwrap();
        fs::create_dir_all(dir.join("var/nix/db")).unwrap();
        fs::write(dir.join("var/nix/db/db.sqlite"), b"").unwrap();
        fs::write(dir.join("var/nix/db/schema"), schema).unwrap();
        dir
    }

    #[test]
    fn lower_checks_name_the_path_and_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope");
        let e = Lower::open(&missing).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("no such directory"), "{e}");

        let empty = t.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let e = Lower::open(&empty).unwrap_err().to_string();
        assert!(e.contains("no store/"), "{e}");

        fs::create_dir(empty.join("store")).unwrap();
        let e = Lower::open(&empty).unwrap_err().to_string();
        assert!(e.contains("var/nix/db/db.sqlite"), "{e}");

        let dir = fake_lower(t.path(), "7");
        let e = Lower::open(&dir).unwrap_err().to_string();
        assert!(
            e.contains("schema version '7'") && e.contains("version 10"),
            "{e}"
        );

        fs::write(dir.join("var/nix/db/schema"), "10").unwrap();
        assert!(Lower::open(&dir).is_ok());
    }

    #[test]
    fn init_is_idempotent_and_refuses_foreign_dirs() {
        let t = tempfile::tempdir().unwrap();
        let up = t.path().join("up");
        let a = Upper::init(&up).unwrap();
        fs::write(a.store().join("keep"), "x").unwrap();
        let b = Upper::init(&up).unwrap();
        assert_eq!(a, b);
        assert!(b.store().join("keep").exists(), "re-init keeps content");
        assert!(Upper::open(&up).is_ok());

        let foreign = t.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("data"), "x").unwrap();
        let e = Upper::init(&foreign).unwrap_err().to_string();
        assert!(e.contains("not a nixfs-layer upper"), "{e}");
        let e = Upper::open(&foreign).unwrap_err().to_string();
        assert!(e.contains("nixfs-layer init --upper"), "{e}");
    }

    #[test]
    fn stack_refuses_same_overlapping_and_odd_dirs() {
        let t = tempfile::tempdir().unwrap();
        let lower = fake_lower(t.path(), "10");
        let up = t.path().join("up");
        Upper::init(&up).unwrap();
        assert!(Stack::open(std::slice::from_ref(&lower), &up).is_ok());
        let e = Stack::open(&[lower.clone(), lower.clone()], &up).unwrap_err();
        assert!(matches!(e, LayerError::DuplicateLower(_)), "{e}");
        let e = Stack::open(&[], &up).unwrap_err();
        assert!(matches!(e, LayerError::NoLower), "{e}");
        // Same directory as both: reported as such even though it is no upper.
        let e = Stack::open(std::slice::from_ref(&lower), &lower).unwrap_err();
        assert!(matches!(e, LayerError::SameDir(_)), "{e}");

        let nested = lower.join("nested-upper");
        Upper::init(&nested).unwrap();
        let e = Stack::open(std::slice::from_ref(&lower), &nested).unwrap_err();
        assert!(matches!(e, LayerError::Overlap { .. }), "{e}");

        let e = Upper::init(&t.path().join("a,b")).unwrap_err();
        assert!(matches!(e, LayerError::UnmountablePath(_)), "{e}");
    }
}
