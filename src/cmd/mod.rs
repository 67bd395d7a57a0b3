//! One module per subcommand, plus what they share: the target, finding
//! what is mounted there, and the upper's lock.

pub mod diff;
pub mod export;
pub mod flakefs;
pub mod gc;
pub mod generate;
pub mod import;
pub mod init;
pub mod mount;
pub mod optimise;
pub mod promote;
pub mod publish;
pub mod resolve;
pub mod status;
pub mod sync;
pub mod umount;
pub mod verify;

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer::{self, Lower, LowerIdentity, Upper};
use crate::overlay::{self, MountError};
use crate::pathdb::merge;

pub const DEFAULT_TARGET: &str = "/nix";

/// The target from the flag, else the config, else `/nix`; made absolute.
pub fn resolve_target(flag: Option<&Path>, config: &Config) -> Result<PathBuf> {
    let t = flag
        .map(Path::to_owned)
        .or_else(|| config.target.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TARGET));
    let t = if t.is_absolute() {
        t
    } else {
        std::env::current_dir()
            .map_err(|source| Error::Io {
                path: t.clone(),
                source,
            })?
            .join(t)
    };
    // A target that exists is compared with mountinfo by its real path.
    Ok(std::fs::canonicalize(&t).unwrap_or(t))
}

/// What `mount` records in the upper, for `sync`/`umount`/`status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub target: PathBuf,
    pub lowers: Vec<PathBuf>,
    /// What each lower directory was when the overlay was mounted (same
    /// order as `lowers`); empty in records of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower_ids: Vec<LowerIdentity>,
    /// The /nixfs/flake tree served with this mount, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flakefs: Option<FlakeFsRecord>,
}

impl MountRecord {
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("mount record serialises");
        std::fs::write(path, json).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// The flake tree's server, for `umount` to stop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlakeFsRecord {
    pub pid: u32,
    pub mountpoint: PathBuf,
}

/// A stack found mounted at a target.
#[derive(Debug)]
pub struct Mounted {
    pub target: PathBuf,
    pub upper: Upper,
    pub record: MountRecord,
}

impl Mounted {
    pub fn store(&self) -> PathBuf {
        self.target.join("store")
    }
    /// The lowers whose directory is another one than the overlay was
    /// mounted with (see [`layer::replaced`]).
    pub fn replaced_lowers(&self) -> Vec<layer::Replaced> {
        layer::replaced(&self.record.lowers, &self.record.lower_ids)
    }
    pub fn lowers(&self) -> Result<Vec<Lower>> {
        Ok(self
            .record
            .lowers
            .iter()
            .map(|l| Lower::open(l))
            .collect::<Result<Vec<_>, _>>()?)
    }
}

/// Finds our overlay at `TARGET/store` and the upper behind it.
pub fn find_mounted(target: &Path) -> Result<Option<Mounted>> {
    let mounts = overlay::mounts()?;
    let Some(m) = overlay::mount_at(&mounts, &target.join("store")) else {
        return Ok(None);
    };
    let Some(upper_store) = m
        .option("upperdir")
        .filter(|_| m.fs_type == "overlay")
        .map(PathBuf::from)
    else {
        return Ok(None);
    };
    let Some(upper_dir) = upper_store
        .parent()
        .filter(|_| upper_store.ends_with("store"))
    else {
        return Ok(None);
    };
    let Ok(upper) = Upper::open(upper_dir) else {
        return Ok(None);
    };
    let rec_path = upper.mount_record();
    let read = std::fs::read(&rec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<MountRecord>(&b).map_err(|e| e.to_string()));
    let record = match read {
        Ok(r) => r,
        Err(why) => {
            // The overlay itself says which lowers it stacks (mount
            // refuses lower paths with ':' or ','); only the flake tree's
            // server is unknown then, and umount/status/sync still work.
            tracing::warn!(record = %rec_path.display(), %why, "mount record unreadable; using the lowers the overlay at {} lists", target.display());
            MountRecord {
                target: target.to_owned(),
                lowers: lowers_of(&m),
                lower_ids: Vec::new(),
                flakefs: None,
            }
        }
    };
    Ok(Some(Mounted {
        target: target.to_owned(),
        upper,
        record,
    }))
}

/// The lower directories of one of our overlays, top first.
fn lowers_of(m: &overlay::MountInfo) -> Vec<PathBuf> {
    m.option("lowerdir")
        .unwrap_or("")
        .split(':')
        .filter_map(|d| Path::new(d).parent().map(Path::to_owned))
        .collect()
}

/// Like [`find_mounted`], but nothing mounted is an error.
pub fn require_mounted(target: &Path) -> Result<Mounted> {
    find_mounted(target)?.ok_or_else(|| MountError::NotMounted(target.to_owned()).into())
}

/// How many vanished lower paths get a warning line each.
const VANISHED_WARNINGS: usize = 10;

/// One warning line per lower path whose store entry vanished behind its
/// lower's database (the first few, then a count).
pub fn warn_vanished(summary: &merge::SyncSummary) {
    for v in summary.vanished.iter().take(VANISHED_WARNINGS) {
        eprintln!(
            "nixfs-layer: warning: missing content: {} is valid in the database of lower {} but its store entry is gone from {}; put it back there (see `nixfs-layer verify`)",
            v.path,
            v.lower.display(),
            v.lower.join("store").display()
        );
    }
    if summary.vanished.len() > VANISHED_WARNINGS {
        eprintln!(
            "nixfs-layer: warning: missing content: {} more lower path(s) whose store entry is gone (`nixfs-layer verify` lists them all)",
            summary.vanished.len() - VANISHED_WARNINGS
        );
    }
}

/// Prints a command's `--json` document (the shapes are in docs/*-json.md).
pub fn print_json<T: Serialize>(doc: &T) {
    // Plain structs of strings and numbers: serialising cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(doc).expect("report serialises")
    );
}

/// A spinner naming the merge's phases on a terminal; nothing otherwise.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    pub fn new(quiet: bool, what: &str) -> Progress {
        use std::io::IsTerminal;
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                .expect("valid template"),
        );
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(bar))
    }

    pub fn phase(&self, name: &str) {
        if let Some(b) = &self.0 {
            b.set_message(name.to_owned());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Holds the upper's lock: one mount/sync/umount at a time per upper.
pub struct UpperLock(#[allow(dead_code)] Flock<File>);

fn lock_file(upper: &Upper) -> Result<(File, std::path::PathBuf)> {
    let path = upper.lock_file();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// The upper's lock if nobody holds it, else None (without waiting).
pub fn try_lock_upper(upper: &Upper) -> Result<Option<UpperLock>> {
    let (file, _) = lock_file(upper)?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .ok()
        .map(UpperLock))
}

/// Holds a target's lock (see [`lock_target`]).
pub struct TargetLock(#[allow(dead_code)] Flock<File>);

/// Where mounts of one target in one mount namespace take turns.
const TARGET_LOCKS: &str = "/run/nixfs-layer";

/// Holds the lock of a target in this mount namespace, so that two mounts
/// of different uppers on one target cannot both find it free. None when
/// the lock directory cannot be made (a read-only /run): the upper's lock
/// and the mount table checks still apply.
pub fn lock_target(target: &Path) -> Result<Option<TargetLock>> {
    let ns = std::fs::read_link("/proc/self/ns/mnt")
        .map(|l| {
            l.to_string_lossy()
                .replace(|c: char| !c.is_ascii_digit(), "")
        })
        .unwrap_or_default();
    let name: String = target
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = Path::new(TARGET_LOCKS);
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "no target lock");
        return Ok(None);
    }
    let path = dir.join(format!("mnt-{ns}-{name}.lock"));
    let file = match File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no target lock");
            return Ok(None);
        }
    };
    Flock::lock(file, FlockArg::LockExclusive)
        .map(|l| Some(TargetLock(l)))
        .map_err(|(_, errno)| Error::Io {
            path,
            source: errno.into(),
        })
}

pub fn lock_upper(upper: &Upper) -> Result<UpperLock> {
    let (file, path) = lock_file(upper)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(UpperLock(l)),
        Err((file, _)) => {
            tracing::warn!(upper = %upper.dir().display(), "another nixfs-layer holds this upper; waiting");
            Flock::lock(file, FlockArg::LockExclusive)
                .map(UpperLock)
                .map_err(|(_, errno)| Error::Io {
                    path,
                    source: errno.into(),
                })
        }
    }
}
