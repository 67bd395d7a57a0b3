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
//!        <dir>/nixfs-layer/               this tool's state (marker, lock, mount record and
//!                                         transaction journal, snapshots, a lower switch's
//!                                         staging and journal, a pending overlay refresh)
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
    #[error("lower {dir}: cannot read its database {file} ({source}); the user running nixfs-layer must be able to read it: have the lower's owner make it readable (`chmod a+r {file}`), or run as a user who may")]
    LowerDbUnreadable {
        dir: PathBuf,
        file: PathBuf,
        source: io::Error,
    },
    #[error("upper {0}: not initialised; run `nixfs-layer init --upper {0}` first")]
    UpperNotInitialised(PathBuf),
    #[error("upper {0}: directory is not empty and is not a nixfs-layer upper; pick an empty or new directory")]
    UpperForeign(PathBuf),
    #[error("lower {lower} and upper {upper} are the same directory (given twice, or through a symlink or bind mount); the upper must be a separate, writable directory")]
    SameDir { lower: PathBuf, upper: PathBuf },
    #[error("lower {lower} and upper {upper} overlap ({how}); keep them in separate trees")]
    Overlap {
        lower: PathBuf,
        upper: PathBuf,
        how: String,
    },
    #[error("target {target} and {kind} {layer} overlap ({how}); the target must lie outside every layer and every layer outside the target: pick another target or layer directory")]
    TargetOverlap {
        target: PathBuf,
        kind: &'static str,
        layer: PathBuf,
        how: String,
    },
    #[error("lower {0} is given twice")]
    DuplicateLower(PathBuf),
    #[error("{0}: overlayfs cannot take ',', ':', '\\' or whitespace in a layer path; use a path (or a symlink) without them")]
    UnmountablePath(PathBuf),
    #[error("{count} lowers given; at most {MAX_LOWERS} are supported")]
    TooManyLowers { count: usize },
    #[error("no --lower given (and none in the config file)")]
    NoLower,
    #[error(transparent)]
    Full(#[from] Full),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl LayerError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            LayerError::LowerMissing(_) | LayerError::UpperNotInitialised(_) => Kind::NoInput,
            LayerError::LowerNoStore(_)
            | LayerError::LowerNoDb { .. }
            | LayerError::LowerSchema { .. } => Kind::DataErr,
            LayerError::UpperForeign(_) => Kind::CantCreat,
            LayerError::LowerDbUnreadable { .. } => Kind::NoPerm,
            LayerError::Io { .. } | LayerError::LowerUnreadable { .. } | LayerError::Full(_) => {
                Kind::IoErr
            }
            LayerError::SameDir { .. }
            | LayerError::TargetOverlap { .. }
            | LayerError::Overlap { .. }
            | LayerError::DuplicateLower(_)
            | LayerError::UnmountablePath(_)
            | LayerError::TooManyLowers { .. }
            | LayerError::NoLower => Kind::Usage,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| {
        if no_space(&source) {
            return Full::of(path).into();
        }
        LayerError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A write that found its file system full (ENOSPC, EDQUOT, SQLITE_FULL):
/// named after the upper holding the file, never after a lower.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .upper {
    Some(upper) => format!("upper {} is full (writing {}): free space there and retry", upper.display(), .file.display()),
    None => format!("the file system holding {} is full: free space there and retry", .file.display()),
})]
pub struct Full {
    /// The upper the file is in, when it is in one.
    pub upper: Option<PathBuf>,
    pub file: PathBuf,
}

impl Full {
    /// For a file in an upper (found by its marker) or elsewhere.
    pub fn of(file: &Path) -> Full {
        let upper = file
            .ancestors()
            .skip(1)
            .find(|d| d.join(UPPER_MARKER).is_file())
            .map(Path::to_owned);
        Full {
            upper,
            file: file.to_owned(),
        }
    }
}

/// Whether an I/O error says the file system (or the user's quota) is full.
pub fn no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Whether the file system holding `path` has (almost) no room left: less
/// than 1 MiB free. SQLite reports some writes that ran out of space (the
/// growth of its shared-memory file) as a plain I/O error.
pub fn nearly_full(path: &Path) -> bool {
    let at = path
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    nix::sys::statvfs::statvfs(at)
        .is_ok_and(|v| v.blocks_free().saturating_mul(v.fragment_size()) < 1 << 20)
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
        // Read, never written: every file the snapshot copies must open
        // for reading (an unprivileged user's `run`, a lower of another
        // user's).
        let wal = lower.db_dir().join("db.sqlite-wal");
        for file in [lower.db(), wal] {
            match fs::File::open(&file) {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(LayerError::LowerDbUnreadable {
                        dir: lower.dir,
                        file,
                        source: e,
                    })
                }
                _ => {}
            }
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

    /// A lower at `dir`, unchecked (unit tests of what is derived from it).
    #[cfg(test)]
    pub fn for_tests(dir: &str) -> Lower {
        Lower { dir: dir.into() }
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
    /// GC roots of the paths the lower publishes (`publish`), so that its
    /// owner's collector keeps them: one symlink per reference.
    pub fn published_roots(&self) -> PathBuf {
        self.dir.join("var/nix/gcroots/nixfs-layer-published")
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
        let io_err = |path: &Path| {
            let (upper, path) = (upper.dir.clone(), path.to_owned());
            move |source: io::Error| {
                if no_space(&source) {
                    return LayerError::Full(Full {
                        upper: Some(upper),
                        file: path,
                    });
                }
                LayerError::Io { path, source }
            }
        };
        // The marker first: a retry after a failure further on (a full
        // disk) then finds a directory it may complete. A marker that
        // could not be written whole is removed again.
        let marker = upper.dir.join(UPPER_MARKER);
        if !marker.exists() {
            fs::create_dir_all(upper.tool_dir()).map_err(io_err(&upper.tool_dir()))?;
            if let Err(e) = fs::write(&marker, UPPER_MARKER_TEXT) {
                let _ = fs::remove_file(&marker);
                let _ = fs::remove_dir(upper.tool_dir());
                return Err(io_err(&marker)(e));
            }
        }
        for d in [
            upper.store(),
            upper.work(),
            upper.db_dir(),
            upper.gcroots(),
            upper.var().join("nix/profiles"),
            upper.var().join("nix/temproots"),
            upper.var().join("log/nix/drvs"),
            upper.tool_dir(),
            upper.tmp_dir(),
        ] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(upper)
    }

    /// An upper at `dir`, unchecked (unit tests of what is derived from it).
    #[cfg(test)]
    pub fn for_tests(dir: &str) -> Upper {
        Upper { dir: dir.into() }
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
    /// What `mount` recorded (`stack::MountRecord`), and the journal of
    /// the lifecycle's transactions: its `transaction` names the one under
    /// way (mount, unmount, remount) until it is done.
    pub fn mount_record(&self) -> PathBuf {
        self.tool_dir().join("mount.json")
    }
    /// Made by `sync` before its merge and removed once the overlay has
    /// forgotten its cached entries: while it exists, a merge may have
    /// made paths valid that the overlay still hides.
    pub fn refresh_pending(&self) -> PathBuf {
        self.tool_dir().join("refresh-pending")
    }
    /// Where a switch to new lowers keeps its verified copies until they
    /// are the upper's (`pathdb::keep`).
    pub fn staging_dir(&self) -> PathBuf {
        self.tool_dir().join("staging")
    }
    /// The journal of a switch to new lowers (`pathdb::keep`).
    pub fn switch_journal(&self) -> PathBuf {
        self.tool_dir().join("switch.json")
    }
    /// Where `optimise` moves the upper copies it drops before deleting
    /// them; while it exists, the overlay has yet to forget them.
    pub fn optimise_trash(&self) -> PathBuf {
        self.tool_dir().join("optimise-trash")
    }
    /// Nix's GC roots: the pin's, the collector's and the user's.
    pub fn gcroots(&self) -> PathBuf {
        self.var().join("nix/gcroots")
    }
    /// The directory overlayfs makes its copy-ups and whiteouts in, made
    /// immutable while mounted (`overlay::seal`).
    pub fn seal_dir(&self) -> PathBuf {
        self.work().join("work")
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
        // Compared by device and inode: a symlink or a bind mount of a
        // directory is that directory.
        let upper_dir = Place::of(upper);
        let mut seen: Vec<Place> = Vec::new();
        for l in lowers {
            let l = Place::of(l);
            match l.relation_to(&upper_dir) {
                Some(Relation::Same) => {
                    return Err(LayerError::SameDir {
                        lower: l.path,
                        upper: upper_dir.path,
                    })
                }
                Some(how) => {
                    return Err(LayerError::Overlap {
                        lower: l.path,
                        upper: upper_dir.path,
                        how: how.describe("the lower", "the upper"),
                    })
                }
                None => {}
            }
            if seen
                .iter()
                .any(|s| s.relation_to(&l) == Some(Relation::Same))
            {
                return Err(LayerError::DuplicateLower(l.path));
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

/// How one directory overlaps another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relation {
    /// One directory, possibly under two names (a symlink, a bind mount).
    Same,
    /// The first lies inside the second.
    Inside,
    /// The second lies inside the first.
    Holds,
}

impl Relation {
    /// Says how, naming the two as `a` and `b`.
    fn describe(self, a: &str, b: &str) -> String {
        match self {
            Relation::Same => "they are the same directory".into(),
            Relation::Inside => format!("{a} lies inside {b}"),
            Relation::Holds => format!("{b} lies inside {a}"),
        }
    }
}

/// The device and inode of a directory: what a symlink or a bind mount
/// of it shows too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId {
    dev: u64,
    ino: u64,
}

impl DirId {
    fn of(p: &Path) -> Option<DirId> {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).ok().map(|m| DirId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A directory a user named, with the identities of it and of each of its
/// ancestors (symlinks resolved). For a path that does not exist (yet),
/// the chain starts at its nearest existing ancestor.
#[derive(Debug, Clone)]
struct Place {
    /// The path, resolved as far as it exists.
    path: PathBuf,
    /// Whether `chain[0]` is the directory itself.
    exists: bool,
    chain: Vec<DirId>,
}

impl Place {
    fn of(p: &Path) -> Place {
        let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
        let mut at = p;
        let base = loop {
            if let Ok(c) = fs::canonicalize(at) {
                break Some(c);
            }
            match (at.file_name(), at.parent()) {
                (Some(name), Some(parent)) => {
                    missing.push(name);
                    at = parent;
                }
                _ => break None,
            }
        };
        let Some(base) = base else {
            return Place {
                path: p.to_owned(),
                exists: false,
                chain: Vec::new(),
            };
        };
        let chain = base.ancestors().filter_map(DirId::of).collect();
        let mut path = base;
        for name in missing.iter().rev() {
            path.push(name);
        }
        Place {
            path,
            exists: missing.is_empty(),
            chain,
        }
    }

    /// Its own identity, if it exists.
    fn id(&self) -> Option<DirId> {
        self.chain.first().copied().filter(|_| self.exists)
    }

    /// Whether `self` is `other`, lies inside it or holds it.
    fn relation_to(&self, other: &Place) -> Option<Relation> {
        match (self.id(), other.id()) {
            (Some(a), Some(b)) if a == b => Some(Relation::Same),
            (_, Some(b)) if self.chain.contains(&b) => Some(Relation::Inside),
            (Some(a), _) if other.chain.contains(&a) => Some(Relation::Holds),
            _ => None,
        }
    }
}

/// Refuses a target that is, holds or lies inside the upper or a lower
/// (compared by device and inode, so neither a symlink nor a bind mount
/// hides it): mounted there, the stack would show up inside its own
/// layers, and what the tool later reads as a layer would be the stack.
///
/// One layout is fine though: a lower that is the target's directory
/// through a *different* mount point (the machine's own `/nix`, bound
/// privately elsewhere and stacked over itself, docs/guide-qubes.md). The
/// lower's path does not lead into the mounts made on the target then
/// (unless they propagate to it, which `overlay::check_lower_sees_target`
/// refuses).
pub fn check_target(target: &Path, lowers: &[Lower], upper: &Upper) -> Result<(), LayerError> {
    let t = Place::of(target);
    let layers =
        std::iter::once(("upper", upper.dir())).chain(lowers.iter().map(|l| ("lower", l.dir())));
    for (kind, dir) in layers {
        let l = Place::of(dir);
        match t.relation_to(&l) {
            None => {}
            Some(Relation::Same) if kind == "lower" && t.path != l.path => {}
            Some(how) => {
                return Err(LayerError::TargetOverlap {
                    how: how.describe("the target", &format!("the {kind}")),
                    target: t.path,
                    kind,
                    layer: l.path,
                })
            }
        }
    }
    Ok(())
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
    fn a_target_overlapping_a_layer_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let lower = Lower::open(&fake_lower(t.path(), "10")).unwrap();
        let upper = Upper::init(&t.path().join("up")).unwrap();
        let lowers = std::slice::from_ref(&lower);
        let check = |target: &Path| check_target(target, lowers, &upper).map_err(|e| e.to_string());
        assert!(check(&t.path().join("target")).is_ok());
        assert!(check(&t.path().join("new/target")).is_ok());
        let link = t.path().join("link");
        std::os::unix::fs::symlink(lower.dir(), &link).unwrap();
        for (target, how) in [
            (lower.dir().to_owned(), "they are the same directory"),
            (link.clone(), "they are the same directory"),
            (link.join("sub"), "the target lies inside the lower"),
            (
                lower.dir().join("missing/dirs"),
                "the target lies inside the lower",
            ),
            (upper.dir().to_owned(), "they are the same directory"),
            (upper.var(), "the target lies inside the upper"),
            (t.path().to_owned(), "the upper lies inside the target"),
        ] {
            let e = check(&target).unwrap_err();
            assert!(e.contains(how), "{}: {e}", target.display());
            assert!(e.starts_with("target "), "{e}");
        }
        let e = check(&link).unwrap_err();
        assert!(
            e.contains(&format!("lower {}", lower.dir().display())),
            "{e}"
        );
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
        assert!(matches!(e, LayerError::SameDir { .. }), "{e}");

        let nested = lower.join("nested-upper");
        Upper::init(&nested).unwrap();
        let e = Stack::open(std::slice::from_ref(&lower), &nested).unwrap_err();
        assert!(matches!(e, LayerError::Overlap { .. }), "{e}");

        // Through a symlink: the same directory, by device and inode.
        let link = t.path().join("link-to-lower");
        std::os::unix::fs::symlink(&lower, &link).unwrap();
        let e = Stack::open(&[lower.clone(), link.clone()], &up).unwrap_err();
        assert!(matches!(e, LayerError::DuplicateLower(_)), "{e}");
        let e = Stack::open(std::slice::from_ref(&link), &lower).unwrap_err();
        assert!(matches!(e, LayerError::SameDir { .. }), "{e}");
        let e = Stack::open(std::slice::from_ref(&link), &nested).unwrap_err();
        assert!(
            e.to_string().contains("the upper lies inside the lower"),
            "{e}"
        );

        let e = Upper::init(&t.path().join("a,b")).unwrap_err();
        assert!(matches!(e, LayerError::UnmountablePath(_)), "{e}");
    }
}
