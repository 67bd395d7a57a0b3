//! Where a stack mounted at a target puts what.

use std::path::{Path, PathBuf};

/// The target a stack is mounted at (`/nix` by default) and its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    dir: PathBuf,
}

impl Target {
    pub fn new(dir: &Path) -> Target {
        Target {
            dir: dir.to_owned(),
        }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The overlay: lowers' `store/` below, the upper's on top.
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    /// The bind mount of the upper's `var/`.
    pub fn var(&self) -> PathBuf {
        self.dir.join("var")
    }
    /// The database stock Nix opens on this target (the merged one when
    /// our stack is mounted).
    pub fn db(&self) -> PathBuf {
        self.dir.join("var/nix/db/db.sqlite")
    }
    /// The flake tree server's log.
    pub fn flake_log(&self) -> PathBuf {
        self.dir.join("var/log/nixfs-layer/flakefs.log")
    }
    /// The flake tree's results of locked references, kept across restarts.
    pub fn flake_cache(&self) -> PathBuf {
        self.dir.join("var/nixfs-layer/flake-cache.jsonl")
    }
}
