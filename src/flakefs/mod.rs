//! The `/nixfs/flake` tree: FUSE symlinks named after flake references that
//! resolve to store paths, answered from a layer that has the path or built
//! into the upper when none does.
//!
//! ```text
//! MOUNTPOINT/flake/str/<ref>       the reference as typed (no '/')
//! MOUNTPOINT/flake/b64/<base64>    URL-safe or standard alphabet, padded or not
//! MOUNTPOINT/flake/urlenc/<%-enc>  percent-encoded
//! ```
//!
//! `names` decodes and checks names, `policy` decides who may do what,
//! `resolver` evaluates/looks up/builds with a cache and single flight,
//! `cache` keeps locked results across restarts, `fs` is the FUSE side and
//! `daemon` mounts it and runs it in the background.

pub mod cache;
pub mod daemon;
pub mod fs;
pub mod index;
pub mod names;
pub mod policy;
pub mod resolver;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::FlakeFsConfig;

/// Where the tree is mounted unless configured otherwise.
pub const DEFAULT_MOUNTPOINT: &str = "/nixfs";

/// Why a reference gave no store path: the errno a lookup answers and the
/// message in the entry's `user.nixfs.error` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub errno: i32,
    pub message: String,
    /// The same reference fails the same way for everyone for a while.
    pub cacheable: bool,
    /// How long the kernel may keep the failed entry.
    pub valid_for: Duration,
    /// Served from the resolver's cache: logged when it happened, not
    /// again for every lookup that meets it.
    pub repeated: bool,
}

impl Failure {
    /// What kind of failure, by its errno (`resolve`'s exit code).
    pub fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::of_errno(self.errno)
    }
    pub fn new(errno: i32, message: String) -> Failure {
        Failure {
            errno,
            message,
            cacheable: true,
            valid_for: Duration::ZERO,
            repeated: false,
        }
    }
    /// A failure that depends on who asked: never cached.
    pub fn uncached(mut self) -> Failure {
        self.cacheable = false;
        self.valid_for = Duration::ZERO;
        self
    }
    pub fn valid_for(mut self, d: Duration) -> Failure {
        if self.cacheable {
            self.valid_for = d;
        }
        self
    }
}

/// The tunables of `[flakefs]`, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub ttl: Duration,
    pub failure_ttl: Duration,
    pub build_timeout: Duration,
    pub eval_timeout: Duration,
    pub max_parallel_builds: usize,
    pub max_parallel_evals: usize,
    /// How long a refusal is kept for the uid it was given to.
    pub refusal_ttl: Duration,
    /// Results kept in memory (least recently used dropped first).
    pub cache_entries: usize,
    /// Locked results one non-root uid may add to the file kept across restarts.
    pub saved_per_uid: usize,
    /// Where answers come from: published indexes and/or evaluation.
    pub resolve: ResolveMode,
}

/// `[flakefs] resolve`: what answers a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResolveMode {
    /// The lowers' published indexes, then evaluation.
    #[default]
    PublishedFirst,
    /// Only the published indexes: an unpublished reference fails at once.
    PublishedOnly,
    /// Evaluation only (indexes ignored).
    Evaluate,
}

impl Settings {
    pub fn from_config(c: &FlakeFsConfig) -> Settings {
        let builds = c.max_parallel_builds.unwrap_or(2).max(1);
        Settings {
            ttl: Duration::from_secs(c.ttl.unwrap_or(300)),
            failure_ttl: Duration::from_secs(c.failure_ttl.unwrap_or(10)),
            build_timeout: Duration::from_secs(c.build_timeout.unwrap_or(3600)),
            eval_timeout: Duration::from_secs(c.eval_timeout.unwrap_or(300)),
            max_parallel_builds: builds,
            max_parallel_evals: builds.max(4),
            refusal_ttl: Duration::from_secs(c.refusal_ttl.unwrap_or(5)),
            cache_entries: c.cache_entries.unwrap_or(10_000).max(16),
            saved_per_uid: c.saved_per_uid.unwrap_or(100),
            resolve: c.resolve.unwrap_or_default(),
        }
    }
}

/// Where the daemon keeps locked results for the store at `target`: in its
/// state (`TARGET/var`, the upper's `var/` when stacked).
pub fn cache_file(target: &Path) -> PathBuf {
    crate::stack::Target::new(target).flake_cache()
}

/// The daemon's log when it runs in the background.
pub fn log_file(target: &Path) -> PathBuf {
    crate::stack::Target::new(target).flake_log()
}

/// The arguments that make a child serve the tree (`--foreground` is added).
pub fn serve_args(
    mountpoint: &Path,
    target: &Path,
    config: Option<&Path>,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "flakefs".into(),
        "--mountpoint".into(),
        mountpoint.into(),
        "--target".into(),
        target.into(),
    ];
    if let Some(c) = config {
        a.push("--config".into());
        a.push(c.into());
    }
    a
}
