//! Kernel mounts: the overlayfs on `TARGET/store`, the bind of the upper's
//! state on `TARGET/var`, and reading `/proc/self/mountinfo`.

use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::layer::{Lower, Upper};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting needs root (CAP_SYS_ADMIN); run nixfs-layer {0} as root, or inside `nixfs-layer run`")]
    NotPermitted(&'static str),
    #[error(
        "this kernel has no overlayfs (not in /proc/filesystems); load it with `modprobe overlay`"
    )]
    OverlayUnavailable,
    #[error("{0} is already a mount point; run `nixfs-layer umount --target {1}` first")]
    AlreadyMounted(PathBuf, PathBuf),
    #[error("upper {upper} is already mounted at {at}; one upper serves one mount at a time")]
    UpperInUse { upper: PathBuf, at: PathBuf },
    #[error("lower {lower} receives the mounts made on {target} (a shared bind of it?): the stack would show up inside its own lower; make it private first (`mount --make-private {lower}`, or bind it with `mount --bind --make-private`)")]
    LowerSeesTarget { lower: PathBuf, target: PathBuf },
    #[error("nothing of nixfs-layer is mounted at {0}")]
    NotMounted(PathBuf),
    #[error(
        "{0} is busy (a process has files open there); stop it (e.g. nix-daemon) and try again"
    )]
    Busy(PathBuf),
    #[error("lower {lower} was replaced since {store} was mounted (the overlay still shows the directory it had then), and {store} is busy (a process has files open there), so it cannot be mounted afresh; nothing was changed: stop those processes (`fuser -vm {store}` lists them, e.g. nix-daemon) and run `nixfs-layer sync` again")]
    ReplacedBusy { lower: PathBuf, store: PathBuf },
    #[error("mounting {what} on {target} failed: {errno}{hint}")]
    Mount {
        what: String,
        target: PathBuf,
        errno: Errno,
        hint: &'static str,
    },
    #[error(
        "unmounting {target} failed: {errno}; see `findmnt {target}` for what is mounted there"
    )]
    Umount { target: PathBuf, errno: Errno },
    #[error("upper {upper}: its file system cannot make {dir} immutable ({errno}); nixfs-layer needs that to keep overlayfs from copying up or whiting out lower paths: put the upper on ext4, xfs, btrfs or tmpfs (Linux 6.0 or later)")]
    SealUnsupported {
        upper: PathBuf,
        dir: PathBuf,
        errno: Errno,
    },
    #[error("upper {upper} is still mounted at {at} in another mount namespace (pid {pid}, {command}); stop that process (a build or a service holding the store) and try again")]
    HeldElsewhere {
        upper: PathBuf,
        at: PathBuf,
        pid: u32,
        command: String,
    },
    #[error("{target} is in use by {holders}; nothing was unmounted: stop them first (`nixfs-layer umount --wait SECONDS` waits for them)")]
    InUse { target: PathBuf, holders: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl MountError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            MountError::NotPermitted(_) => Kind::NoPerm,
            MountError::OverlayUnavailable | MountError::SealUnsupported { .. } => {
                Kind::Unavailable
            }
            MountError::AlreadyMounted(..)
            | MountError::UpperInUse { .. }
            | MountError::HeldElsewhere { .. }
            | MountError::InUse { .. }
            | MountError::Busy(_)
            | MountError::ReplacedBusy { .. } => Kind::TempFail,
            MountError::NotMounted(_) => Kind::NotMounted,
            MountError::LowerSeesTarget { .. } => Kind::Usage,
            MountError::Mount { .. } | MountError::Umount { .. } => Kind::OsErr,
            MountError::Io { .. } => Kind::IoErr,
        }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The device of its file system (`major:minor`).
    pub dev: String,
    /// The directory of its file system that is mounted (`/` unless a bind
    /// of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Its mount id, unique on the system, and its parent's.
    pub id: u64,
    pub parent: u64,
    /// Peer group it shares mount events with (`shared:N`).
    pub shared: Option<u32>,
    /// Peer group it receives mount events from (`master:N`).
    pub master: Option<u32>,
    pub fs_type: String,
    pub source: String,
    /// The superblock options (for overlayfs: lowerdir=…,upperdir=…).
    pub super_options: String,
}

impl MountInfo {
    /// The value of a `key=value` superblock option.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.super_options
            .split(',')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Undoes the octal escapes (`\040` for space…) mountinfo uses.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let tag = |name: &str| {
                pre.iter()
                    .skip(6)
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            };
            let mut post = post.split(' ');
            Some(MountInfo {
                dev: pre.get(2)?.to_string(),
                id: pre.first()?.parse().ok()?,
                parent: pre.get(1)?.parse().ok()?,
                root: PathBuf::from(unescape(pre.get(3)?)),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                shared: tag("shared"),
                master: tag("master"),
                fs_type: post.next()?.to_owned(),
                source: unescape(post.next()?),
                super_options: unescape(post.next().unwrap_or("")),
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountInfo>, MountError> {
    let p = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(p).map_err(|source| MountError::Io {
        path: p.to_owned(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Where the directory a bind mount shows is reachable in this namespace
/// other than through the bind: a mount of the same file system whose root
/// lies above the bind's, checked to be the same directory (device and
/// inode). None if no such path is mounted.
pub fn bind_source(all: &[MountInfo], bind: &MountInfo) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let shown = fs::metadata(&bind.mount_point).ok()?;
    all.iter()
        .filter(|m| m.dev == bind.dev && m.mount_point != bind.mount_point)
        .filter_map(|m| {
            let rest = bind.root.strip_prefix(&m.root).ok()?;
            Some(m.mount_point.join(rest))
        })
        .find(|p| {
            fs::metadata(p).is_ok_and(|md| md.dev() == shown.dev() && md.ino() == shown.ino())
        })
}

/// The topmost mount at exactly `point`, if any.
pub fn mount_at(all: &[MountInfo], point: &Path) -> Option<MountInfo> {
    all.iter().rev().find(|m| m.mount_point == point).cloned()
}

/// The mount at exactly `point` that is visible there, if any: the one
/// reached by walking the mount tree from the root down `point`'s
/// components, taking at each the last mount made on it (a mount made on
/// a mount point is its child). A mount another one covers (a `run`
/// mounts a tmpfs over a target the host has a stack on) is not.
pub fn visible_mount_at(all: &[MountInfo], point: &Path) -> Option<MountInfo> {
    let ids: std::collections::HashSet<u64> = all.iter().map(|m| m.id).collect();
    let root = Path::new("/");
    // The namespace's root: its parent is not in this namespace (or it is
    // its own, after a pivot_root).
    let mut cur = all
        .iter()
        .find(|m| m.mount_point == root && (!ids.contains(&m.parent) || m.parent == m.id))
        .or_else(|| all.iter().find(|m| m.mount_point == root))?;
    let mut prefixes: Vec<&Path> = point.ancestors().collect();
    prefixes.reverse();
    for q in prefixes {
        while let Some(c) = all
            .iter()
            .rev()
            .find(|c| c.parent == cur.id && c.id != cur.id && c.mount_point == q)
        {
            cur = c;
        }
    }
    (cur.mount_point == point).then(|| cur.clone())
}

/// The mount `path` lies on (the last of the longest mount point above it).
fn containing(all: &[MountInfo], path: &Path) -> Option<MountInfo> {
    all.iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .cloned()
}

/// Where a mount made at `point` would also appear through mount
/// propagation, if `into` (another mount) receives it: `into` must be a
/// peer or a slave of the mount `point` lies on and show the directory
/// `point` is in its file system.
fn propagated_to(all: &[MountInfo], point: &Path, into: &MountInfo) -> Option<PathBuf> {
    let on = containing(all, point)?;
    let group = on.shared?;
    if on == *into || (into.shared != Some(group) && into.master != Some(group)) {
        return None;
    }
    let in_fs = on.root.join(point.strip_prefix(&on.mount_point).ok()?);
    let rel = in_fs.strip_prefix(&into.root).ok()?;
    Some(into.mount_point.join(rel))
}

/// Refuses a lower that would see the stack: when mounts on `target`'s
/// `store`/`var` propagate to the mount the lower lies on, at a place
/// inside the lower (a shared bind of the target itself, as systemd makes
/// binds by default), the lower would show the stack over itself and its
/// database would be the merged one.
pub fn check_lower_sees_target(
    all: &[MountInfo],
    lower: &Path,
    target: &Path,
) -> Result<(), MountError> {
    let Some(on) = containing(all, lower) else {
        return Ok(());
    };
    for sub in ["store", "var"] {
        if let Some(image) = propagated_to(all, &target.join(sub), &on) {
            if image.starts_with(lower) {
                return Err(MountError::LowerSeesTarget {
                    lower: lower.to_owned(),
                    target: target.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Whether this process may mount: CAP_SYS_ADMIN in its effective set.
pub fn check_privileges(command: &'static str) -> Result<(), MountError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    if has_cap_sys_admin(&status) {
        Ok(())
    } else {
        Err(MountError::NotPermitted(command))
    }
}

fn has_cap_sys_admin(proc_status: &str) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Whether the kernel offers overlayfs.
pub fn check_overlay_available() -> Result<(), MountError> {
    let text = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if filesystems_has_overlay(&text) {
        Ok(())
    } else {
        Err(MountError::OverlayUnavailable)
    }
}

fn filesystems_has_overlay(text: &str) -> bool {
    text.lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
}

/// Whether this process runs in a user namespace other than the initial
/// one (`nixfs-layer run` as an unprivileged user): overlayfs then keeps
/// its whiteout and opaque markers in `user.overlay.*` attributes
/// (`userxattr`), and the seal, which needs CAP_LINUX_IMMUTABLE of the
/// initial namespace, cannot be set.
pub fn in_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !is_initial_uid_map(&m))
}

fn is_initial_uid_map(map: &str) -> bool {
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// Whether overlays mounted by this process can be sealed (see [`seal`]).
pub fn can_seal() -> bool {
    !in_user_namespace()
}

/// The overlayfs option string for a stack (first lower on top).
pub fn overlay_options(lowers: &[Lower], upper: &Upper) -> String {
    overlay_options_for(lowers, upper, in_user_namespace())
}

/// [`overlay_options`] for a mount in the initial user namespace or in
/// another one (`userxattr`: the trusted.* attributes are out of reach
/// there, and `redirect_dir=nofollow` is the setting that needs none).
fn overlay_options_for(lowers: &[Lower], upper: &Upper, userns: bool) -> String {
    let lowerdir = lowers
        .iter()
        .map(|l| l.store().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    // index/metacopy/redirect_dir stay off: they record lower file handles,
    // and our lowers legitimately change between mounts.
    let (redirect, xattr) = if userns {
        ("nofollow", ",userxattr")
    } else {
        ("off", "")
    };
    format!(
        "lowerdir={lowerdir},upperdir={},workdir={},index=off,metacopy=off,redirect_dir={redirect}{xattr}",
        upper.store().display(),
        upper.work().display()
    )
}

/// Mounts the overlay on `target_store`, sealed (see [`seal`]): the upper
/// is prepared for it first, and if the seal cannot be set the overlay is
/// unmounted again.
pub fn mount_overlay(
    lowers: &[Lower],
    upper: &Upper,
    target_store: &Path,
) -> Result<(), MountError> {
    prepare_upper(upper, lowers)?;
    mount_unsealed(lowers, upper, target_store)?;
    crate::failpoint::hit("mount:overlay-unsealed");
    if let Err(e) = seal(upper) {
        if let Err(u) = unmount(target_store) {
            tracing::error!(target = %target_store.display(), error = %u, "could not undo the overlay mount after the seal failed");
        }
        return Err(e);
    }
    Ok(())
}

fn mount_unsealed(lowers: &[Lower], upper: &Upper, target_store: &Path) -> Result<(), MountError> {
    let opts = overlay_options(lowers, upper);
    tracing::debug!(target = %target_store.display(), %opts, "mounting overlayfs");
    mount(
        Some("nixfs-layer"),
        target_store,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|errno| MountError::Mount {
        what: "overlayfs".into(),
        target: target_store.to_owned(),
        errno,
        hint: match errno {
            Errno::EINVAL => " (the upper's filesystem may lack what overlayfs needs for an upperdir, e.g. NFS; keep the upper on a local disk or tmpfs)",
            Errno::ENODEV => " (no overlayfs in this kernel; `modprobe overlay`)",
            _ => "",
        },
    })
}

/// Bind-mounts `src` on `target`.
pub fn bind(src: &Path, target: &Path) -> Result<(), MountError> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::Mount {
        what: src.display().to_string(),
        target: target.to_owned(),
        errno,
        hint: "",
    })
}

/// Unmounts `target`; EBUSY becomes [`MountError::Busy`].
pub fn unmount(target: &Path) -> Result<(), MountError> {
    umount2(target, MntFlags::empty()).map_err(|errno| match errno {
        Errno::EBUSY => MountError::Busy(target.to_owned()),
        errno => MountError::Umount {
            target: target.to_owned(),
            errno,
        },
    })
}

/// Mounts the overlay on `target_store` afresh, with the layers it is
/// given: the way to make it take up a lower directory that was replaced
/// since it was mounted (overlayfs looks its layers up once, at mount time;
/// a remount cannot change them). The old overlay is held on to, as a
/// detached copy of its mount, until the new one is up, and put back where
/// it was if mounting the new one fails. Files open on `target_store` make
/// this fail with [`MountError::Busy`] before anything changed.
pub fn mount_afresh(
    lowers: &[Lower],
    upper: &Upper,
    target_store: &Path,
) -> Result<(), MountError> {
    let old = DetachedMount::clone_of(target_store)?;
    unmount(target_store)?;
    crate::failpoint::hit("sync:old-unmounted");
    match mount_overlay(lowers, upper, target_store) {
        Ok(()) => Ok(()),
        Err(e) => {
            match old.put_back(target_store) {
                Ok(()) => {
                    tracing::warn!(target = %target_store.display(), "mounting the overlay afresh failed; the old one is back")
                }
                Err(back) => {
                    tracing::error!(target = %target_store.display(), error = %back, "mounting the overlay afresh failed, and the old one could not be put back: nothing is mounted there")
                }
            }
            Err(e)
        }
    }
}

/// A copy of a mount attached nowhere (`open_tree(OPEN_TREE_CLONE)`): it
/// keeps the file system it shows alive until it is dropped, and can be
/// attached again (`move_mount`).
struct DetachedMount(std::os::fd::OwnedFd);

impl DetachedMount {
    fn clone_of(point: &Path) -> Result<DetachedMount, MountError> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        const OPEN_TREE_CLONE: libc::c_uint = 1;
        let failed = |errno| MountError::Mount {
            what: format!("a copy of the mount at {} (open_tree)", point.display()),
            target: point.to_owned(),
            errno,
            hint: " (needs Linux 5.2 or later)",
        };
        let c = std::ffi::CString::new(point.as_os_str().as_bytes())
            .map_err(|_| failed(Errno::EINVAL))?;
        // SAFETY: a valid NUL-terminated path; the fd returned is ours.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                c.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(failed(Errno::last()));
        }
        // SAFETY: open_tree returned a new file descriptor.
        Ok(DetachedMount(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }

    fn put_back(self, point: &Path) -> Result<(), MountError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
        let failed = |errno| MountError::Mount {
            what: "the previous overlay (move_mount)".into(),
            target: point.to_owned(),
            errno,
            hint: "",
        };
        let c = std::ffi::CString::new(point.as_os_str().as_bytes())
            .map_err(|_| failed(Errno::EINVAL))?;
        // SAFETY: a valid fd, an empty path (F_EMPTY_PATH), a valid target.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if r < 0 {
            return Err(failed(Errno::last()));
        }
        Ok(())
    }
}

/// Remounts the overlay in place. overlayfs keeps negative and stale
/// dentries for lower entries; a remount drops them, so paths added to or
/// removed from a lower since the mount show up as they now are.
pub fn refresh(target_store: &Path) -> Result<(), MountError> {
    mount(
        None::<&str>,
        target_store,
        None::<&str>,
        MsFlags::MS_REMOUNT,
        None::<&str>,
    )
    .map_err(|errno| MountError::Mount {
        what: "overlayfs (remount)".into(),
        target: target_store.to_owned(),
        errno,
        hint: "",
    })
}

// The seal.
//
// Through the merged store, overlayfs changes a lower entry only by first
// copying it up (chmod, a hard link, a write) or by whiting it out (a
// delete, a rename away), and it makes both in its work directory
// (`UPPER/work/work`) before moving them into the upper. While that
// directory is immutable, the kernel refuses every such step with EPERM,
// whoever asks (root included): stock `nix-store --delete`, the collector,
// `nix-store --optimise` cannot hide, copy or change anything a lower
// holds, while everything that only touches the upper (builds, imports,
// deleting upper paths) works as before. overlayfs itself clears and
// recreates the work directory when it mounts, so the seal is lifted just
// before each mount and set right after it.

/// FS_IMMUTABLE_FL of linux/fs.h (`chattr +i`).
const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// The directory overlayfs makes its copy-ups and whiteouts in.
pub fn seal_dir(upper: &Upper) -> PathBuf {
    upper.seal_dir()
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Sets or clears the immutable flag of `dir`.
fn set_immutable(dir: &Path, on: bool) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(dir).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let flags = inode_flags(&f)?;
    let new = if on {
        flags | FS_IMMUTABLE_FL
    } else {
        flags & !FS_IMMUTABLE_FL
    };
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer.
    if new != flags && unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Whether the upper's work directory is sealed now.
pub fn is_sealed(upper: &Upper) -> bool {
    fs::File::open(seal_dir(upper))
        .ok()
        .and_then(|f| inode_flags(&f).ok())
        .is_some_and(|flags| flags & FS_IMMUTABLE_FL != 0)
}

/// The inode flags of an open file (`lsattr`).
fn inode_flags(f: &fs::File) -> Result<libc::c_int, Errno> {
    use std::os::fd::AsRawFd;
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return Err(Errno::last());
    }
    Ok(flags)
}

/// Seals the work directory of a mounted overlay. In a user namespace
/// (see [`can_seal`]) there is no seal to set: the kernel's permission
/// checks stand in (the lowers' entries belong to users the namespace does
/// not map, so nothing there may change them), with the GC pin.
pub fn seal(upper: &Upper) -> Result<(), MountError> {
    if !can_seal() {
        return Ok(());
    }
    let dir = seal_dir(upper);
    set_immutable(&dir, true).map_err(|errno| match errno {
        Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL => MountError::SealUnsupported {
            upper: upper.dir().to_owned(),
            dir: dir.clone(),
            errno,
        },
        errno => MountError::Io {
            path: dir.clone(),
            source: errno.into(),
        },
    })
}

/// Lifts the seal (before a mount, or once no overlay uses the upper, so
/// that the upper can be removed like any directory).
pub fn unseal(upper: &Upper) -> Result<(), MountError> {
    let dir = seal_dir(upper);
    match set_immutable(&dir, false) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        // A file system that cannot seal was never sealed.
        Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => Ok(()),
        Err(errno) => Err(MountError::Io {
            path: dir,
            source: errno.into(),
        }),
    }
}

/// Readies an unmounted upper for a sealed mount: no seal left over from
/// an earlier mount (overlayfs would fall back to read-only), an opaque
/// `store/.links` (Nix's hard-link directory: a lower's would otherwise
/// make Nix link lower files, a copy-up, whenever it optimises), and no
/// whiteout that hides nothing (creating a path over a whiteout needs the
/// work directory).
fn prepare_upper(upper: &Upper, lowers: &[Lower]) -> Result<(), MountError> {
    unseal(upper)?;
    let links = upper.store().join(".links");
    match fs::create_dir(&links) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(&links)(e)),
    }
    set_opaque(&links)?;
    remove_idle_whiteouts(upper, lowers)
}

fn set_opaque(dir: &Path) -> Result<(), MountError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| MountError::Io {
        path: dir.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // In a user namespace overlayfs reads the user.* twin (`userxattr`).
    let name = if in_user_namespace() {
        c"user.overlay.opaque"
    } else {
        c"trusted.overlay.opaque"
    };
    // SAFETY: NUL-terminated strings and a one-byte value.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if rc != 0 {
        return Err(io_at(dir)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Removes whiteouts in the upper's store that no lower entry lies under.
fn remove_idle_whiteouts(upper: &Upper, lowers: &[Lower]) -> Result<(), MountError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let store = upper.store();
    for e in fs::read_dir(&store).map_err(io_at(&store))? {
        let e = e.map_err(io_at(&store))?;
        let Ok(meta) = e.metadata() else { continue };
        if !(meta.file_type().is_char_device() && meta.rdev() == 0) {
            continue;
        }
        let name = e.file_name();
        // Only where every lower says "no such entry": a lower that cannot
        // be read now keeps its whiteouts.
        let covers_nothing = lowers.iter().all(|l| {
            matches!(fs::symlink_metadata(l.store().join(&name)), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        });
        if covers_nothing {
            let p = e.path();
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
    }
    Ok(())
}

/// The mount ids (first field) of mountinfo lines.
fn mount_ids(text: &str) -> std::collections::HashSet<u64> {
    text.lines()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// A process other than this one, as /proc shows it.
pub struct Process {
    pub pid: u32,
    /// Its /proc directory.
    pub dir: PathBuf,
    /// Its mount namespace (`mnt:[inode]`), if readable.
    pub mnt_ns: Option<PathBuf>,
}

impl Process {
    /// Its command name (`comm`).
    pub fn command(&self) -> String {
        fs::read_to_string(self.dir.join("comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default()
    }
}

/// This process's mount namespace.
pub fn own_mnt_ns() -> Option<PathBuf> {
    fs::read_link("/proc/self/ns/mnt").ok()
}

/// Every process but this one.
pub fn processes() -> impl Iterator<Item = Process> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            (pid != me).then(|| Process {
                pid,
                mnt_ns: fs::read_link(p.path().join("ns/mnt")).ok(),
                dir: p.path(),
            })
        })
}

/// A process whose mount namespace (other than this one) still has an
/// overlay of `upper` mounted: where, and who.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub mount_point: PathBuf,
}

/// The other mount namespaces holding an overlay of `upper` (one process
/// each), found through /proc. A build in a namespace of its own (Nix 2.8's
/// sandbox) keeps the overlay alive there after this namespace unmounted it.
pub fn holders_elsewhere(upper: &Upper) -> Vec<Holder> {
    let upper_store = upper.store();
    let own = own_mnt_ns();
    // Mount ids are unique across namespaces: a process whose namespace
    // link cannot be read (one in another user namespace, for an
    // unprivileged caller) still shows whether its overlay is one of ours.
    let own_ids = fs::read_to_string("/proc/self/mountinfo")
        .map(|t| mount_ids(&t))
        .unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut seen_ids = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in processes() {
        if let Some(ns) = &p.mnt_ns {
            if Some(ns) == own.as_ref() || !seen.insert(ns.clone()) {
                continue;
            }
        }
        let Ok(text) = fs::read_to_string(p.dir.join("mountinfo")) else {
            continue;
        };
        let is_ours = |line: &&str| {
            parse_mountinfo(line).first().is_some_and(|m| {
                m.fs_type == "overlay" && m.option("upperdir").map(Path::new) == Some(&upper_store)
            })
        };
        let Some(line) = text.lines().find(is_ours) else {
            continue;
        };
        let id = mount_ids(line).into_iter().next();
        if p.mnt_ns.is_none() && id.is_some_and(|id| own_ids.contains(&id) || !seen_ids.insert(id))
        {
            continue;
        }
        if let Some(m) = parse_mountinfo(line).into_iter().next() {
            out.push(Holder {
                pid: p.pid,
                command: p.command(),
                mount_point: m.mount_point,
            });
        }
    }
    out
}

/// Processes of this mount namespace that use files under `target` (their
/// working or root directory, executable, open files or mapped files),
/// but for this process and the processes `exclude` says to leave out.
pub fn users_of(target: &Path, exclude: impl Fn(u32) -> bool) -> Vec<Holder> {
    let own_ns = own_mnt_ns();
    let under = |p: &Path| p.starts_with(target);
    let mut out = Vec::new();
    for p in processes() {
        if p.mnt_ns != own_ns || exclude(p.pid) {
            continue;
        }
        let dir = &p.dir;
        // A process without an executable is exiting (its memory is gone,
        // its files are being closed: the unmount retries that moment) or a
        // kernel thread: no holder either way.
        if fs::read_link(dir.join("exe")).is_err() {
            continue;
        }
        let mut hit = ["cwd", "root", "exe"]
            .iter()
            .filter_map(|l| fs::read_link(dir.join(l)).ok())
            .find(|t| under(t) && t != Path::new("/"));
        if hit.is_none() {
            hit = fs::read_dir(dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .find(|t| under(t));
        }
        if hit.is_none() {
            hit = fs::read_to_string(dir.join("maps"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5).map(PathBuf::from))
                .find(|t| under(t));
        }
        if let Some(at) = hit {
            out.push(Holder {
                pid: p.pid,
                command: p.command(),
                mount_point: at,
            });
        }
    }
    out
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        if p == ancestor {
            return true;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            return false;
        };
        let Some(ppid) = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return false;
        };
        if ppid <= 1 {
            return false;
        }
        p = ppid;
    }
    false
}

/// Refuses an upper that another mount namespace still has mounted.
pub fn check_not_held_elsewhere(upper: &Upper) -> Result<(), MountError> {
    match holders_elsewhere(upper).into_iter().next() {
        Some(h) => Err(MountError::HeldElsewhere {
            upper: upper.dir().to_owned(),
            at: h.mount_point,
            pid: h.pid,
            command: h.command,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
67 63 0:40 / /nix/store rw,relatime - overlay nixfs-layer rw,lowerdir=/l/a/store:/l/b/store,upperdir=/u/store,workdir=/u/work,uuid=on
68 63 0:41 /var /nix/var rw,relatime - ext4 /dev/vda rw
70 22 0:42 / /mnt/with\\040space rw - tmpfs none rw,size=10k
";

    #[test]
    fn parses_mountinfo_lines() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        let ov = mount_at(&m, Path::new("/nix/store")).unwrap();
        assert_eq!(ov.fs_type, "overlay");
        assert_eq!(ov.source, "nixfs-layer");
        assert_eq!(ov.option("upperdir"), Some("/u/store"));
        assert_eq!(ov.option("lowerdir"), Some("/l/a/store:/l/b/store"));
        assert_eq!(ov.option("index"), None);
        assert!(mount_at(&m, Path::new("/mnt/with space")).is_some());
        assert!(mount_at(&m, Path::new("/nix")).is_none());
    }

    #[test]
    fn a_lower_receiving_the_targets_mounts_is_refused() {
        // / is shared (peer group 1, as systemd makes it); /run/own is a
        // bind of /nix (same group); /run/priv a private bind of it; /srv/x
        // a shared bind of /srv (same group, but /nix is not under it);
        // /run/slave a slave of group 1 that shows /nix.
        let m = parse_mountinfo(
            "\
1 0 8:1 / / rw shared:1 - ext4 /dev/vda rw
2 1 8:1 /nix /run/own rw shared:1 - ext4 /dev/vda rw
3 1 8:1 /nix /run/priv rw - ext4 /dev/vda rw
4 1 8:1 /srv /srv/x rw shared:1 - ext4 /dev/vda rw
5 1 8:1 / /run/slave rw master:1 - ext4 /dev/vda rw
",
        );
        let target = Path::new("/nix");
        let check = |lower: &str| check_lower_sees_target(&m, Path::new(lower), target);
        assert!(matches!(
            check("/run/own"),
            Err(MountError::LowerSeesTarget { .. })
        ));
        assert!(check("/run/slave/nix").is_err());
        assert!(check("/run/priv").is_ok());
        assert!(check("/srv/x/lower").is_ok());
        // Same mount as the target, elsewhere on it: mounts on /nix/store
        // do not show up there.
        assert!(check("/var/lib/lower").is_ok());
        // A slave shows /nix/store elsewhere than inside this lower.
        assert!(check("/run/slave/srv/lower").is_ok());
    }

    #[test]
    fn reads_cap_sys_admin_from_proc_status() {
        assert!(has_cap_sys_admin("Name:\tx\nCapEff:\t000001ffffffffff\n"));
        assert!(!has_cap_sys_admin("CapEff:\t0000000000000000\n"));
        // Everything but CAP_SYS_ADMIN (bit 21).
        assert!(!has_cap_sys_admin("CapEff:\t000001ffffdfffff\n"));
        assert!(!has_cap_sys_admin(""));
    }

    #[test]
    fn finds_overlay_in_proc_filesystems() {
        assert!(filesystems_has_overlay("nodev\tsysfs\nnodev\toverlay\n"));
        assert!(!filesystems_has_overlay("nodev\tsysfs\n\text4\n"));
    }

    #[test]
    fn a_mount_covered_by_a_later_one_above_it_is_not_visible() {
        // The host's stack on /nix (a tmpfs, its overlay and bind), then a
        // tmpfs over /nix (a mount on a mount point is its child) and a new
        // overlay on it, as `run` makes them.
        let m = parse_mountinfo(
            "\
1 0 8:1 / / rw - ext4 /dev/vda rw
2 1 0:30 / /nix rw - tmpfs t rw
3 2 0:31 / /nix/store rw - overlay nixfs-layer rw,upperdir=/u/store
4 2 8:1 /u/var /nix/var rw - ext4 /dev/vda rw
5 2 0:32 / /nix rw - tmpfs nixfs-layer-run rw
",
        );
        let store = Path::new("/nix/store");
        assert!(mount_at(&m, store).is_some());
        assert!(visible_mount_at(&m, store).is_none());
        assert!(visible_mount_at(&m, Path::new("/nix/var")).is_none());
        assert_eq!(visible_mount_at(&m, Path::new("/nix")).unwrap().id, 5);
        let mut m = m;
        m.extend(parse_mountinfo(
            "6 5 0:33 / /nix/store rw - overlay nixfs-layer rw,upperdir=/v/store\n",
        ));
        assert_eq!(visible_mount_at(&m, store).unwrap().id, 6);
        // Two mounts stacked on one point: the upper one is visible.
        let m = parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/vda rw\n2 1 0:30 / /x rw - tmpfs a rw\n3 2 0:31 / /x rw - tmpfs b rw\n",
        );
        assert_eq!(visible_mount_at(&m, Path::new("/x")).unwrap().id, 3);
    }

    #[test]
    fn a_user_namespace_mounts_with_userxattr() {
        assert!(is_initial_uid_map("         0          0 4294967295\n"));
        assert!(!is_initial_uid_map("         0       1000          1\n"));
        assert!(!is_initial_uid_map("         0          0      65536\n"));
        let lower = Lower::for_tests("/l/a");
        let upper = Upper::for_tests("/u");
        let lowers = std::slice::from_ref(&lower);
        let host = overlay_options_for(lowers, &upper, false);
        assert!(host.ends_with("redirect_dir=off"), "{host}");
        let userns = overlay_options_for(lowers, &upper, true);
        assert_eq!(
            userns,
            "lowerdir=/l/a/store,upperdir=/u/store,workdir=/u/work,index=off,metacopy=off,redirect_dir=nofollow,userxattr"
        );
    }
}

/// A listening Unix socket bound to a path under a directory (a
/// nix-daemon's, or systemd's `nix-daemon.socket`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListeningSocket {
    /// The path it was bound to.
    pub path: PathBuf,
    /// The processes holding it, each with what it sees at that path.
    pub holders: Vec<SocketHolder>,
}

/// A process holding a listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketHolder {
    pub pid: u32,
    pub command: String,
    pub view: SocketView,
}

/// How the socket's path looks from its holder's mount namespace, against
/// this one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketView {
    /// The same file: clients here reach it; it serves what is mounted here.
    Same,
    /// Another file at the path, in a namespace that shares the directory
    /// the mount covered (`target`): it was bound before the mount and is
    /// covered now (a nix-daemon started before the stack).
    Covered,
    /// Another namespace's own file system: nothing of this one.
    Unrelated,
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// What `pid` sees at `path` (through /proc/PID/root, which resolves in
/// its mount namespace) against what this process sees; `target` is the
/// directory whose covering tells a covered socket from an unrelated one.
fn socket_view(pid: u32, path: &Path, target: &Path) -> SocketView {
    let theirs = |p: &Path| {
        let rel = p.strip_prefix("/").unwrap_or(p);
        file_id(&Path::new(&format!("/proc/{pid}/root")).join(rel))
    };
    match (theirs(path), file_id(path)) {
        (Some(t), Some(o)) if t == o => SocketView::Same,
        _ if theirs(target).is_some() && theirs(target) == file_id(target) => SocketView::Covered,
        _ => SocketView::Unrelated,
    }
}

/// The listening Unix sockets bound under `dir` (by the paths they were
/// bound to, from /proc/net/unix, which every mount namespace shares) that
/// some process holds, with those processes and what each sees there
/// ([`SocketView`], `target` being the directory a mount may have covered).
pub fn listening_sockets(dir: &Path, target: &Path) -> Vec<ListeningSocket> {
    use std::collections::BTreeMap;
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    // Num RefCount Protocol Flags Type St Inode Path; listening sockets
    // have the flag __SO_ACCEPTCON.
    let mut by_inode: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let listening = f
            .get(3)
            .and_then(|flags| u32::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 0x10000 != 0);
        if f.len() < 8 || !listening || !f[7].starts_with('/') {
            continue;
        }
        let (Ok(inode), path) = (f[6].parse::<u64>(), PathBuf::from(f[7])) else {
            continue;
        };
        if path.starts_with(dir) {
            by_inode.insert(inode, path);
        }
    }
    if by_inode.is_empty() {
        return Vec::new();
    }
    let mut holders: BTreeMap<u64, Vec<(u32, String)>> = BTreeMap::new();
    // Any mount namespace: nix-daemon runs in one of its own, copied from
    // its parent's when it starts.
    for p in processes() {
        let Ok(fds) = fs::read_dir(p.dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(i) = fs::read_link(fd.path()).ok().and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) else {
                continue;
            };
            if by_inode.contains_key(&i) {
                let h = holders.entry(i).or_default();
                if !h.iter().any(|(pid, _)| *pid == p.pid) {
                    h.push((p.pid, p.command()));
                }
            }
        }
    }
    // One per path: a path can show twice (a socket no process holds any
    // more, a daemon started again), the holders of all of them together.
    let mut by_path: BTreeMap<PathBuf, Vec<(u32, String)>> = BTreeMap::new();
    for (i, path) in by_inode {
        let h = by_path.entry(path).or_default();
        for x in holders.remove(&i).unwrap_or_default() {
            if !h.contains(&x) {
                h.push(x);
            }
        }
    }
    by_path
        .into_iter()
        .filter(|(_, holders)| !holders.is_empty())
        .map(|(path, holders)| ListeningSocket {
            holders: holders
                .into_iter()
                .map(|(pid, command)| SocketHolder {
                    pid,
                    command,
                    view: socket_view(pid, &path, target),
                })
                .collect(),
            path,
        })
        .collect()
}
