//! Finding a path's references the way Nix does: by scanning its NAR
//! serialisation (file contents, names and symlink targets) for the
//! 32-character hash parts of candidate store paths. Hashing happens in the
//! same pass, so a path is read once.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::nar::{self, NarHash};
use crate::storepath::{StorePath, NIXBASE32_ALPHABET};

const HASH_LEN: usize = 32;

/// Looks for hash parts in a byte stream, across write boundaries.
struct Scanner<'a> {
    /// Hash part → the store path it names.
    wanted: &'a HashMap<[u8; HASH_LEN], String>,
    found: BTreeSet<String>,
    /// The last bytes of the previous write (a hash part may straddle two).
    tail: Vec<u8>,
}

impl Scanner<'_> {
    fn scan(&mut self, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        let mut run = 0usize;
        for (i, b) in buf.iter().enumerate() {
            if NIXBASE32_ALPHABET.contains(b) {
                run += 1;
                if run >= HASH_LEN {
                    let window: &[u8; HASH_LEN] = buf[i + 1 - HASH_LEN..=i]
                        .try_into()
                        .expect("window is HASH_LEN bytes");
                    if let Some(p) = self.wanted.get(window) {
                        self.found.insert(p.clone());
                    }
                }
            } else {
                run = 0;
            }
        }
        let keep = buf.len().min(HASH_LEN - 1);
        self.tail = buf[buf.len() - keep..].to_vec();
    }
}

struct HashScanWriter<'a> {
    hasher: Sha256,
    size: u64,
    scanner: Scanner<'a>,
}

impl Write for HashScanWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        self.scanner.scan(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Candidate references, indexed by hash part.
pub fn candidates<'a>(paths: impl IntoIterator<Item = &'a StorePath>) -> HashMap<[u8; 32], String> {
    paths
        .into_iter()
        .map(|p| {
            let h: [u8; HASH_LEN] = p
                .hash_part()
                .as_bytes()
                .try_into()
                .expect("store path hash parts are 32 bytes");
            (h, p.to_absolute())
        })
        .collect()
}

/// The NAR hash of `path` and the candidates (absolute store paths) whose
/// hash part occurs in its NAR serialisation.
pub fn hash_and_scan(
    path: &Path,
    wanted: &HashMap<[u8; 32], String>,
) -> io::Result<(NarHash, BTreeSet<String>)> {
    let mut w = io::BufWriter::with_capacity(
        256 * 1024,
        HashScanWriter {
            hasher: Sha256::new(),
            size: 0,
            scanner: Scanner {
                wanted,
                found: BTreeSet::new(),
                tail: Vec::new(),
            },
        },
    );
    nar::dump(path, &mut w)?;
    let w = w.into_inner().map_err(|e| e.into_error())?;
    Ok((
        NarHash {
            sha256: w.hasher.finalize().into(),
            size: w.size,
        },
        w.scanner.found,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const A: &str = "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-liba";
    const B: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-libb";
    const C: &str = "1c9c73877wk11c9c73877wk11c9c7387-unused";

    fn wanted() -> HashMap<[u8; 32], String> {
        let paths: Vec<StorePath> = [A, B, C]
            .iter()
            .map(|b| StorePath::from_base_name(b).unwrap())
            .collect();
        candidates(&paths)
    }

    #[test]
    fn finds_hash_parts_in_contents_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("p");
        fs::create_dir(&root).unwrap();
        // A hash part straddling the scanner's 256 KiB buffer boundary, one
        // in a symlink target, and a near miss (31 characters).
        let mut big = vec![b'.'; 256 * 1024 - 100];
        big.extend_from_slice(format!("/nix/store/{A}/lib").as_bytes());
        big.extend(vec![b'.'; 1000]);
        fs::write(root.join("big"), &big).unwrap();
        std::os::unix::fs::symlink(format!("/nix/store/{B}/bin"), root.join("link")).unwrap();
        fs::write(root.join("near"), &C[..31]).unwrap();
        let (h, found) = hash_and_scan(&root, &wanted()).unwrap();
        let expected: BTreeSet<String> = [A, B].iter().map(|b| format!("/nix/store/{b}")).collect();
        assert_eq!(found, expected);
        assert_eq!(
            h,
            nar::hash_path(&root).unwrap(),
            "same hash as nar::hash_path"
        );
    }

    #[test]
    fn finds_nothing_in_unrelated_content() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(
            &f,
            "no store paths here, just 0123456789abcdfghijklmnpqrsvwxy",
        )
        .unwrap();
        let (_, found) = hash_and_scan(&f, &wanted()).unwrap();
        assert!(found.is_empty(), "{found:?}");
    }
}
