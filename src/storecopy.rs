//! Copying a store path's tree exactly (modes, symlinks, contents), so its
//! NAR hash is unchanged: used to bring lower paths into the upper and
//! upper paths into a lower. And removing a store entry, the one way every
//! command does it.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// Copies the tree at `src` to `dst` (which must not exist).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        symlink(fs::read_link(src)?, dst)
    } else if ft.is_file() {
        fs::copy(src, dst)?;
        fs::set_permissions(
            dst,
            fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        )
    } else if ft.is_dir() {
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        // Directories last: a read-only one could not be filled.
        fs::set_permissions(
            dst,
            fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        )
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a file, directory or symlink", src.display()),
        ))
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
        copy_tree(&src, &dst).unwrap();
        assert_eq!(
            crate::nar::hash_path(&src).unwrap(),
            crate::nar::hash_path(&dst).unwrap()
        );
        remove_tree(&dst).unwrap();
        assert!(!dst.exists());
        fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
    }
}
