//! NAR (Nix ARchive) serialisation and hashing: the canonical byte stream
//! Nix hashes to get a path's `narHash`, and the payload of `nix-store
//! --export`.
//!
//! ```text
//! nar      = str("nix-archive-1") node
//! node     = str("(") str("type") ( regular | symlink | directory ) str(")")
//! regular  = str("regular") [ str("executable") str("") ] str("contents") str(<bytes>)
//! symlink  = str("symlink") str("target") str(<target>)
//! directory= str("directory") { str("entry") str("(") str("name") str(<name>) str("node") node str(")") }
//! str(s)   = u64 little-endian length, the bytes, zero padding to a multiple of 8
//! ```
//! Directory entries come in byte order of their names.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::storepath::nixbase32_encode;

const PAD: [u8; 8] = [0; 8];

/// A Nix wire string: u64 little-endian length, the bytes, zero padding to
/// a multiple of 8 (NAR and `nix-store --export` framing alike).
pub(crate) fn write_str<W: Write>(out: &mut W, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)?;
    let rem = s.len() % 8;
    if rem != 0 {
        out.write_all(&PAD[..8 - rem])?;
    }
    Ok(())
}

/// Writes the NAR serialisation of the file tree at `path`.
pub fn dump<W: Write>(path: &Path, out: &mut W) -> io::Result<()> {
    write_str(out, b"nix-archive-1")?;
    dump_node(path, out)
}

fn dump_node<W: Write>(path: &Path, out: &mut W) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    write_str(out, b"(")?;
    write_str(out, b"type")?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        write_str(out, b"symlink")?;
        write_str(out, b"target")?;
        write_str(out, fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        write_str(out, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(out, b"executable")?;
            write_str(out, b"")?;
        }
        write_str(out, b"contents")?;
        let len = meta.len();
        out.write_all(&len.to_le_bytes())?;
        let copied = io::copy(&mut fs::File::open(path)?.take(len), out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed size while being read", path.display()),
            ));
        }
        let rem = (len % 8) as usize;
        if rem != 0 {
            out.write_all(&PAD[..8 - rem])?;
        }
    } else if ft.is_dir() {
        write_str(out, b"directory")?;
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(out, b"entry")?;
            write_str(out, b"(")?;
            write_str(out, b"name")?;
            write_str(out, name.as_bytes())?;
            write_str(out, b"node")?;
            dump_node(&path.join(&name), out)?;
            write_str(out, b")")?;
        }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not a regular file, directory or symlink; a store path cannot hold it",
                path.display()
            ),
        ));
    }
    write_str(out, b")")
}

/// A path's NAR hash and size, as Nix records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarHash {
    pub sha256: [u8; 32],
    pub size: u64,
}

impl NarHash {
    /// The form of the `hash` column of Nix's ValidPaths: `sha256:<hex>`.
    pub fn to_db_string(&self) -> String {
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in self.sha256 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Whether `db`, a `hash` column of Nix's ValidPaths, names this hash:
    /// `sha256:` then base16 (in either case) or nixbase32, the forms Nix
    /// reads there. Every comparison of content against a recorded narHash
    /// goes through here, so no caller rejects a row for its spelling.
    pub fn matches_db(&self, db: &str) -> bool {
        let Some(rest) = db.strip_prefix("sha256:") else {
            return false;
        };
        match rest.len() {
            64 => rest.eq_ignore_ascii_case(&self.to_db_string()["sha256:".len()..]),
            52 => rest == nixbase32_encode(&self.sha256),
            _ => false,
        }
    }
}

struct HashWriter {
    hasher: Sha256,
    size: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        crate::progress::advance(crate::progress::Unit::Bytes, buf.len() as u64);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The NAR hash of a non-executable regular file holding `contents`,
/// without a file.
pub fn hash_file_contents(contents: &[u8]) -> NarHash {
    let mut w = HashWriter {
        hasher: Sha256::new(),
        size: 0,
    };
    for s in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents,
        b")",
    ] {
        write_str(&mut w, s).expect("hashing does not fail");
    }
    NarHash {
        sha256: w.hasher.finalize().into(),
        size: w.size,
    }
}

/// Hashes the NAR serialisation of `path` without holding it in memory.
pub fn hash_path(path: &Path) -> io::Result<NarHash> {
    let mut w = io::BufWriter::with_capacity(
        256 * 1024,
        HashWriter {
            hasher: Sha256::new(),
            size: 0,
        },
    );
    dump(path, &mut w)?;
    let w = w.into_inner().map_err(|e| e.into_error())?;
    Ok(NarHash {
        sha256: w.hasher.finalize().into(),
        size: w.size,
    })
}

/// Apparent size of the files under `path` (not following symlinks).
pub fn apparent_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| !m.is_dir())
        .map(|m| m.len())
        .sum()
}

/// NAR-hashes `paths` on every core; results in input order.
pub fn hash_parallel(paths: &[PathBuf]) -> Vec<io::Result<NarHash>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, io::Result<NarHash>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = paths.get(i) else { break };
                        mine.push((i, hash_path(p)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("hashing thread panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    /// A tree with every kind of node NAR knows, and names that sort
    /// differently by bytes than by locale.
    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("share/empty")).unwrap();
        fs::write(root.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(root.join("share/eight-by"), "12345678").unwrap();
        fs::write(root.join("share/empty-file"), "").unwrap();
        fs::write(root.join("B-upper"), vec![0u8, 1, 2, 255]).unwrap();
        fs::write(root.join("a-lower"), "x".repeat(100_003)).unwrap();
        symlink("bin/tool", root.join("link")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
    }

    #[test]
    fn serialisation_matches_nix_store_dump() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        sample_tree(&root);
        for p in [
            root.clone(),
            root.join("bin/tool"),
            root.join("link"),
            root.join("share/empty"),
        ] {
            let mut ours = Vec::new();
            dump(&p, &mut ours).unwrap();
            let nix = Command::new("nix-store")
                .arg("--dump")
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                nix.status.success(),
                "{}",
                String::from_utf8_lossy(&nix.stderr)
            );
            assert_eq!(ours, nix.stdout, "NAR of {}", p.display());
        }
    }

    #[test]
    fn hash_matches_nix_hash() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        sample_tree(&root);
        let ours = hash_path(&root).unwrap();
        let nix = Command::new("nix-hash")
            .args(["--type", "sha256"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(nix.status.success());
        assert_eq!(
            ours.to_db_string(),
            format!("sha256:{}", String::from_utf8(nix.stdout).unwrap().trim())
        );
        let mut bytes = Vec::new();
        dump(&root, &mut bytes).unwrap();
        assert_eq!(ours.size, bytes.len() as u64);
    }

    #[test]
    fn in_memory_file_hash_matches_the_files() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "twelve bytes").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o444)).unwrap();
        assert_eq!(hash_file_contents(b"twelve bytes"), hash_path(&f).unwrap());
    }

    #[test]
    fn hash_column_spellings_all_match() {
        let h = NarHash {
            sha256: [7; 32],
            size: 1,
        };
        assert!(h.matches_db(&h.to_db_string()));
        assert!(h.matches_db(&format!(
            "sha256:{}",
            h.to_db_string()["sha256:".len()..].to_uppercase()
        )));
        assert!(h.matches_db(&format!("sha256:{}", nixbase32_encode(&h.sha256))));
        let other = NarHash {
            sha256: [8; 32],
            size: 1,
        };
        assert!(!h.matches_db(&other.to_db_string()));
        assert!(!h.matches_db(&format!("sha256:{}", nixbase32_encode(&other.sha256))));
        assert!(!h.matches_db("md5:abc"));
        assert!(!h.matches_db(&h.to_db_string()["sha256:".len()..]));
        assert!(!h.matches_db("sha256:"));
    }

    #[test]
    fn refuses_what_a_store_cannot_hold() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = hash_path(&fifo).unwrap_err();
        assert!(e.to_string().contains("fifo"), "{e}");
    }
}
