//! The resolver's results that outlive the daemon: locked references and
//! the store path they resolved to, one JSON object per line, appended as
//! results come in and compacted when loaded.

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
}

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
    pub fn load(&self) -> Result<HashMap<String, PathBuf>, CacheError> {
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
                    out.insert(l.reference, l.path);
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

    fn rewrite(&self, entries: &HashMap<String, PathBuf>) -> Result<(), CacheError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(self.io())?;
        for (r, p) in entries {
            let line = serde_json::to_string(&Line {
                reference: r.clone(),
                path: p.clone(),
            })
            .expect("cache line serialises");
            writeln!(tmp, "{line}").map_err(self.io())?;
        }
        tmp.persist(&self.path).map_err(|e| self.io()(e.error))?;
        Ok(())
    }

    /// Appends one result.
    pub fn append(&self, reference: &str, path: &Path) -> Result<(), CacheError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let mut line = serde_json::to_string(&Line {
            reference: reference.to_owned(),
            path: path.to_owned(),
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
        c.append("a#x", Path::new("/nix/store/1-x")).unwrap();
        c.append("a#x", Path::new("/nix/store/2-x")).unwrap();
        c.append("b#y", Path::new("/nix/store/3-y")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(c.path())
            .unwrap()
            .write_all(b"{\"ref\": \"cut")
            .unwrap();
        let m = c.load().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["a#x"], Path::new("/nix/store/2-x"));
        let text = std::fs::read_to_string(c.path()).unwrap();
        assert_eq!(text.lines().count(), 2, "compacted: {text}");
    }
}
