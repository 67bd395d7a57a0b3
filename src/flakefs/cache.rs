//! The resolver's results that outlive the daemon: locked references and
//! the store path they resolved to, one JSON object per line, appended as
//! results come in and compacted when loaded. A result evaluated as a
//! non-root user carries that uid: it is that user's word, answered to
//! that user only.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("flake cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    #[serde(rename = "ref")]
    reference: String,
    path: PathBuf,
    /// Evaluated as this uid (absent: by root, for everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
}

/// A saved result's key: who evaluated it (None: root) and the reference.
pub type SavedKey = (Option<u32>, String);

/// The file of locked results.
#[derive(Debug, Clone)]
pub struct CacheFile {
    path: PathBuf,
}

impl CacheFile {
    pub fn new(path: &Path) -> CacheFile {
        CacheFile {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
        |source| CacheError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads every entry (the last line for a reference wins; unreadable
    /// lines, e.g. one cut short by a crash, are skipped) and rewrites the
    /// file without duplicates.
    pub fn load(&self) -> Result<HashMap<SavedKey, PathBuf>, CacheError> {
        let mut out = HashMap::new();
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.io()(e)),
        };
        let mut lines = 0;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(self.io())?;
            lines += 1;
            match serde_json::from_str::<Line>(&line) {
                Ok(l) => {
                    out.insert((l.uid, l.reference), l.path);
                }
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "skipping an unreadable flake cache line")
                }
            }
        }
        if lines != out.len() {
            self.rewrite(&out)?;
        }
        Ok(out)
    }

    fn rewrite(&self, entries: &HashMap<SavedKey, PathBuf>) -> Result<(), CacheError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(self.io())?;
        for ((uid, r), p) in entries {
            let line = serde_json::to_string(&Line {
                reference: r.clone(),
                path: p.clone(),
                uid: *uid,
            })
            .expect("cache line serialises");
            writeln!(tmp, "{line}").map_err(self.io())?;
        }
        tmp.persist(&self.path).map_err(|e| self.io()(e.error))?;
        Ok(())
    }

    /// Appends one result.
    pub fn append(&self, uid: Option<u32>, reference: &str, path: &Path) -> Result<(), CacheError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let mut line = serde_json::to_string(&Line {
            reference: reference.to_owned(),
            path: path.to_owned(),
            uid,
        })
        .expect("cache line serialises");
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(self.io())?;
        // One write per line: concurrent appenders never interleave within it.
        f.write_all(line.as_bytes()).map_err(self.io())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_compacts() {
        let t = tempfile::tempdir().unwrap();
        let c = CacheFile::new(&t.path().join("sub/cache.jsonl"));
        assert!(c.load().unwrap().is_empty());
        c.append(None, "a#x", Path::new("/nix/store/1-x")).unwrap();
        c.append(None, "a#x", Path::new("/nix/store/2-x")).unwrap();
        c.append(None, "b#y", Path::new("/nix/store/3-y")).unwrap();
        c.append(Some(1000), "b#y", Path::new("/nix/store/4-y"))
            .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(c.path())
            .unwrap()
            .write_all(b"{\"ref\": \"cut")
            .unwrap();
        let m = c.load().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[&(None, "a#x".into())], Path::new("/nix/store/2-x"));
        assert_eq!(m[&(Some(1000), "b#y".into())], Path::new("/nix/store/4-y"));
        assert_eq!(m[&(None, "b#y".into())], Path::new("/nix/store/3-y"));
        let text = std::fs::read_to_string(c.path()).unwrap();
        assert_eq!(text.lines().count(), 3, "compacted: {text}");
    }
}
