//! The locks that keep two commands from working on one upper, or two
//! mounts on one target, at once.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::Upper;
use crate::error::{Error, Result};

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
/// the lock directory cannot be made (a read-only /run), and inside `run`:
/// the upper's lock and the mount table checks still apply.
pub fn lock_target(target: &Path) -> Result<Option<TargetLock>> {
    // A `run`'s mount namespace is its own: nothing else mounts there, and
    // /run is the host's.
    // Only in the run's namespace itself: the variable alone (inherited,
    // or set by anyone) does not switch the lock off.
    if std::env::var_os(super::run::RUN_ENV).is_some()
        && std::env::var_os(super::run::RUN_NS_ENV).is_some_and(|ns| {
            std::fs::read_link("/proc/self/ns/mnt").is_ok_and(|own| own.as_os_str() == ns)
        })
    {
        return Ok(None);
    }
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

/// Whether a process holds the upper's lock now (a command at work on
/// it), read from /proc/locks without taking the lock: `status` must not
/// hold it even briefly (a foreground mount stopping skips its cleanup
/// while the lock is held).
pub fn upper_locked(upper: &Upper) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(upper.lock_file()) else {
        return false;
    };
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", md.ino());
    std::fs::read_to_string("/proc/locks").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            f.get(1) == Some(&"FLOCK") && f.iter().any(|x| *x == want)
        })
    })
}
