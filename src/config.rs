//! The TOML configuration file. It carries the same settings as the
//! command-line flags; a flag given on the command line wins.
//!
//! ```toml
//! lowers = ["/mnt/template-nix"]   # first = on top
//! upper = "/var/lib/nixfs-layer/upper"
//! target = "/nix"
//!
//! [flakefs]
//! enable = true
//! mountpoint = "/nixfs"
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
"#,
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.upper.as_deref(), Some(Path::new("/u")));
        assert_eq!(c.flakefs.enable, Some(false));
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
