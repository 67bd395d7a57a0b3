//! Copying a store path's tree exactly (modes, symlinks, contents), so its
//! NAR hash is unchanged: used to bring lower paths into the upper and
//! upper paths into a lower. And removing a store entry, the one way every
//! command does it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::nar::{self, NarHash};

/// A failed copy, naming the side that failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the source (or, when checking it, the copy) failed.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// Writing the copy failed.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// The copy is complete but does not hash to the recorded narHash.
    #[error("{path}: its contents hash to {actual}, the database records {expected}")]
    Mismatch {
        /// The source.
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl CopyError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            CopyError::Mismatch { .. } => Kind::DataErr,
            CopyError::Read { .. } | CopyError::Write { .. } => Kind::IoErr,
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Copies the file, symlink or tree at `src` to `dst` (which must not
/// exist), modes included; errors name the side that failed.
pub fn copy_entry(src: &Path, dst: &Path) -> Result<(), CopyError> {
    copy_node(src, dst, &mut vec![0u8; 256 * 1024])
}

/// Copies the tree at `src` to `dst` (which must not exist) and checks that
/// the copy hashes to `expected`, a ValidPaths `hash` column. On any
/// failure nothing is left at `dst`.
pub fn copy_verified(src: &Path, dst: &Path, expected: &str) -> Result<NarHash, CopyError> {
    if fs::symlink_metadata(dst).is_ok() {
        // Not ours to remove when something fails.
        return Err(write_err(dst)(io::ErrorKind::AlreadyExists.into()));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let checked = copy_node(src, dst, &mut buf).and_then(|()| {
        let got = nar::hash_path(dst).map_err(read_err(dst))?;
        if got.matches_db(expected) {
            Ok(got)
        } else {
            Err(CopyError::Mismatch {
                path: src.to_owned(),
                expected: expected.to_owned(),
                actual: got.to_db_string(),
            })
        }
    });
    if checked.is_err() {
        if let Err(e) = remove_tree(dst) {
            tracing::warn!(path = %dst.display(), error = %e, "could not remove a failed copy");
        }
    }
    checked
}

fn mode_of(meta: &fs::Metadata) -> fs::Permissions {
    fs::Permissions::from_mode(meta.permissions().mode() & 0o7777)
}

fn copy_node(src: &Path, dst: &Path, buf: &mut [u8]) -> Result<(), CopyError> {
    let meta = fs::symlink_metadata(src).map_err(read_err(src))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(read_err(src))?;
        symlink(target, dst).map_err(write_err(dst))
    } else if ft.is_file() {
        copy_file(src, dst, buf)?;
        fs::set_permissions(dst, mode_of(&meta)).map_err(write_err(dst))
    } else if ft.is_dir() {
        fs::create_dir(dst).map_err(write_err(dst))?;
        for e in fs::read_dir(src).map_err(read_err(src))? {
            let e = e.map_err(read_err(src))?;
            copy_node(&e.path(), &dst.join(e.file_name()), buf)?;
        }
        // Directories last: a read-only one could not be filled.
        fs::set_permissions(dst, mode_of(&meta)).map_err(write_err(dst))
    } else {
        Err(CopyError::Read {
            path: src.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "not a file, directory or symlink",
            ),
        })
    }
}

/// Copies a regular file's bytes, each read and each write failing as
/// its own side.
fn copy_file(src: &Path, dst: &Path, buf: &mut [u8]) -> Result<(), CopyError> {
    let mut from = File::open(src).map_err(read_err(src))?;
    let mut to = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(write_err(dst))?;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(src)(e)),
        };
        to.write_all(&buf[..n]).map_err(write_err(dst))?;
    }
}

/// Removes a store entry: a directory tree (its read-only directories made
/// writable first, as store directories are), a file or a symlink. An
/// entry that is not there is no error. Errors do not name `p`: the caller
/// says which entry it was removing.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
        for e in fs::read_dir(p)? {
            remove_tree(&e?.path())?;
        }
        fs::remove_dir(p)
    } else {
        fs::remove_file(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_the_nar_hash() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/x"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("bin/x"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(src.join("data"), "d").unwrap();
        symlink("bin/x", src.join("link")).unwrap();
        fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        let dst = t.path().join("dst");
        copy_entry(&src, &dst).unwrap();
        assert_eq!(
            crate::nar::hash_path(&src).unwrap(),
            crate::nar::hash_path(&dst).unwrap()
        );
        remove_tree(&dst).unwrap();
        assert!(!dst.exists());
        fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn verified_copies_name_the_side_that_failed() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/x"), "#!/bin/sh\n").unwrap();
        symlink("bin/x", src.join("link")).unwrap();
        let h = crate::nar::hash_path(&src).unwrap();

        let dst = t.path().join("dst");
        assert_eq!(copy_verified(&src, &dst, &h.to_db_string()).unwrap(), h);
        assert_eq!(crate::nar::hash_path(&dst).unwrap(), h);
        remove_tree(&dst).unwrap();

        let other = crate::nar::hash_file_contents(b"other").to_db_string();
        match copy_verified(&src, &dst, &other) {
            Err(CopyError::Mismatch { path, expected, .. }) => {
                assert_eq!((path, expected), (src.clone(), other.clone()));
            }
            r => panic!("{r:?}"),
        }
        assert!(fs::symlink_metadata(&dst).is_err(), "nothing left behind");

        fs::create_dir(&dst).unwrap();
        assert!(matches!(
            copy_verified(&src, &dst, &h.to_db_string()),
            Err(CopyError::Write { .. })
        ));
        assert!(dst.is_dir(), "an entry that was there is left alone");
        fs::remove_dir(&dst).unwrap();

        match copy_verified(&t.path().join("absent"), &dst, &other) {
            Err(e @ CopyError::Read { .. }) => assert!(e.to_string().contains("absent"), "{e}"),
            r => panic!("{r:?}"),
        }
        match copy_verified(&src, &t.path().join("no/such/dir"), &other) {
            Err(e @ CopyError::Write { .. }) => {
                assert!(e.to_string().contains("no/such/dir"), "{e}")
            }
            r => panic!("{r:?}"),
        }
    }
}
