//! The TOML configuration file: the stack's settings (which also have
//! command-line flags; a flag given on the command line wins) and the
//! flake tree's policy and limits (file only). One file is read: `--config
//! FILE`, else /etc/nixfs-layer/config.toml when present. docs/configuration.md
//! lists every key; tests/config_reference.rs keeps the two in step.
//!
//! ```toml
//! lowers = ["/mnt/template-nix"]   # first = on top
//! upper = "/var/lib/nixfs-layer/upper"
//! target = "/nix"
//!
//! [flakefs]
//! enable = true
//! mountpoint = "/nixfs"
//! allow = ["nixpkgs#*", "github:myorg/*"]
//! deny = ["git+ssh:*"]
//! build-users = ["spark"]
//! build-groups = ["wheel"]
//! max-parallel-builds = 2
//! build-timeout = 3600      # seconds
//! eval-timeout = 300        # seconds
//! ttl = 300                 # seconds, unlocked references
//! failure-ttl = 10          # seconds
//! builds-per-minute = 30    # per uid
//! trusted-users = []        # evaluated by root, with root's rights
//! trusted-groups = []
//! evals-per-uid = 2         # running at once, per non-root uid
//! evals-per-minute = 30     # per non-root uid
//! refusal-ttl = 5           # seconds
//! cache-entries = 10000
//! saved-per-uid = 100
//! resolve = "published-first"  # or "published-only", "evaluate"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/nixfs-layer/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Lower Nix roots, first on top.
    #[serde(default)]
    pub lowers: Vec<PathBuf>,
    /// The upper directory (made by `nixfs-layer init`).
    pub upper: Option<PathBuf>,
    /// Where the merged store appears (default `/nix`).
    pub target: Option<PathBuf>,
    #[serde(default)]
    pub flakefs: FlakeFsConfig,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FlakeFsConfig {
    /// Serve the /nixfs/flake tree alongside the store (default true).
    pub enable: Option<bool>,
    /// Where the tree is mounted (default `/nixfs`).
    pub mountpoint: Option<PathBuf>,
    /// Glob patterns a reference must match one of (default: any), e.g.
    /// `"nixpkgs#*"`, `"github:myorg/*"`. `*` also matches `/`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Glob patterns of references refused even if allowed.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Users (names or uids) whose accesses may start a build; others only
    /// get what a layer already has. Default: root only.
    #[serde(default)]
    pub build_users: Vec<String>,
    /// Groups (names or gids) whose members may start a build.
    #[serde(default)]
    pub build_groups: Vec<String>,
    /// Builds of distinct references run at once (default 2).
    pub max_parallel_builds: Option<usize>,
    /// Seconds a build may take before it is stopped (default 3600).
    pub build_timeout: Option<u64>,
    /// Seconds an evaluation may take before it is stopped (default 300).
    pub eval_timeout: Option<u64>,
    /// Seconds an unlocked reference's result is kept before it is
    /// evaluated again (default 300). Locked ones are kept for good.
    pub ttl: Option<u64>,
    /// Seconds a failure is kept before the reference is tried again (default 10).
    pub failure_ttl: Option<u64>,
    /// Builds one uid may start per minute (default 30; 0 = no limit).
    pub builds_per_minute: Option<u32>,
    /// Users (names or uids) whose references root evaluates with root's
    /// rights, as for root itself. Default: none; everyone else's are
    /// evaluated as themselves through the nix-daemon, or not at all.
    #[serde(default)]
    pub trusted_users: Vec<String>,
    /// Groups (names or gids) whose members are trusted like `trusted-users`.
    #[serde(default)]
    pub trusted_groups: Vec<String>,
    /// Evaluations one non-root uid may have running at once (default 2).
    pub evals_per_uid: Option<usize>,
    /// Evaluations one non-root uid may start per minute (default 30; 0 = no limit).
    pub evals_per_minute: Option<u32>,
    /// Seconds a refusal (permission, rate, no daemon) is kept for the uid
    /// it was given to, so repeating the lookup starts nothing (default 5).
    pub refusal_ttl: Option<u64>,
    /// Results the server keeps in memory, least recently used dropped
    /// first (default 10000).
    pub cache_entries: Option<usize>,
    /// Locked results one non-root uid may add to the file of results kept
    /// across restarts (default 100).
    pub saved_per_uid: Option<usize>,
    /// What answers a reference: "published-first" (default: the lowers'
    /// published indexes, then evaluation), "published-only", "evaluate".
    pub resolve: Option<crate::flakefs::ResolveMode>,
}

impl Config {
    /// Parses TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })?;
        for p in config
            .lowers
            .iter()
            .chain(&config.upper)
            .chain(&config.target)
            .chain(&config.flakefs.mountpoint)
        {
            if !p.is_absolute() {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!(
                        "'{}' is not an absolute path; paths in the config must be absolute",
                        p.display()
                    ),
                });
            }
        }
        Ok(config)
    }

    /// Loads `explicit` if given (it must exist), else the default file if
    /// present, else an empty config.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&text, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = Config::parse(
            r#"
lowers = ["/a", "/b"]
upper = "/u"
target = "/nix"
[flakefs]
enable = false
mountpoint = "/nixfs"
allow = ["nixpkgs#*"]
deny = ["git+ssh:*"]
build-users = ["root", "1000"]
build-groups = ["wheel"]
max-parallel-builds = 3
build-timeout = 600
eval-timeout = 60
ttl = 30
failure-ttl = 5
builds-per-minute = 10
"#,
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.upper.as_deref(), Some(Path::new("/u")));
        assert_eq!(c.flakefs.enable, Some(false));
        assert_eq!(c.flakefs.build_users, vec!["root", "1000"]);
        assert_eq!(c.flakefs.max_parallel_builds, Some(3));
        assert_eq!(c.flakefs.ttl, Some(30));
        assert_eq!(c.flakefs.builds_per_minute, Some(10));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_line() {
        let e = Config::parse(
            "lowers = [\"/a\"]\nuper = \"/u\"\n",
            Path::new("/etc/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/x.toml") && e.contains("uper") && e.contains("line 2"),
            "{e}"
        );
        let e = Config::parse("upper = 3\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("line 1"), "{e}");
        let e = Config::parse("upper = \"rel/dir\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn every_example_in_layers_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("layers");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(Some(&p)).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    !c.lowers.is_empty() && c.upper.is_some(),
                    "{} names its layers",
                    p.display()
                );
                n += 1;
            }
        }
        assert!(n >= 3, "layers/ holds the example stacks, found {n}");
    }
}
