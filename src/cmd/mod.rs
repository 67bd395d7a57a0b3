//! One module per subcommand: each parses its flags, calls the library
//! (the stack model and its lifecycle are in `crate::stack`) and prints.
//! What they share: resolving the target, warnings, JSON, progress.

pub mod diff;
pub mod export;
pub mod flakefs;
pub mod gc;
pub mod generate;
pub mod import;
pub mod init;
pub mod mount;
pub mod optimise;
pub mod promote;
pub mod publish;
pub mod resolve;
pub mod run;
pub mod status;
pub mod sync;
pub mod umount;
pub mod verify;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pathdb::merge;

pub const DEFAULT_TARGET: &str = "/nix";

/// The target from the flag, else the config, else `/nix`; made absolute.
pub fn resolve_target(flag: Option<&Path>, config: &Config) -> Result<PathBuf> {
    let t = flag
        .map(Path::to_owned)
        .or_else(|| config.target.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TARGET));
    let t = if t.is_absolute() {
        t
    } else {
        std::env::current_dir()
            .map_err(|source| Error::Io {
                path: t.clone(),
                source,
            })?
            .join(t)
    };
    // A target that exists is compared with mountinfo by its real path.
    Ok(std::fs::canonicalize(&t).unwrap_or(t))
}

/// How many vanished lower paths get a warning line each.
const VANISHED_WARNINGS: usize = 10;

/// One warning line per lower path whose store entry vanished behind its
/// lower's database (the first few, then a count).
pub fn warn_vanished(summary: &merge::SyncSummary) {
    for v in summary.vanished.iter().take(VANISHED_WARNINGS) {
        eprintln!(
            "nixfs-layer: warning: missing content: {} is valid in the database of lower {} but its store entry is gone from {}; put it back there (see `nixfs-layer verify`)",
            v.path,
            v.lower.display(),
            v.lower.join("store").display()
        );
    }
    if summary.vanished.len() > VANISHED_WARNINGS {
        eprintln!(
            "nixfs-layer: warning: missing content: {} more lower path(s) whose store entry is gone (`nixfs-layer verify` lists them all)",
            summary.vanished.len() - VANISHED_WARNINGS
        );
    }
}

/// Prints a command's `--json` document (the shapes are in docs/*-json.md).
pub fn print_json<T: Serialize>(doc: &T) {
    // Plain structs of strings and numbers: serialising cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(doc).expect("report serialises")
    );
}

/// A spinner naming the merge's phases on a terminal; nothing otherwise.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    pub fn new(quiet: bool, what: &str) -> Progress {
        use std::io::IsTerminal;
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = bars().add(indicatif::ProgressBar::new_spinner());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                .expect("valid template"),
        );
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(bar))
    }

    pub fn phase(&self, name: &str) {
        if let Some(b) = &self.0 {
            b.set_message(name.to_owned());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Every bar on the terminal, so that a stage's bar and the merge's
/// spinner (`sync --lower --keep-needed` has both) draw on lines of their own.
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(indicatif::MultiProgress::new)
}

/// Draws the library's stages (`crate::progress`) on a terminal: a bar
/// with the count, the rate and the time left when the total is known, a
/// spinner with the count and the rate when not.
struct Meter(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl crate::progress::Meter for Meter {
    fn start(&self, what: &str, total: Option<u64>, unit: crate::progress::Unit) {
        use crate::progress::Unit;
        let template = match (unit, total) {
            (Unit::Bytes, Some(_)) => {
                "{prefix}: [{bar:30}] {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, {eta} left"
            }
            (Unit::Bytes, None) => "{spinner} {prefix}: {binary_bytes}, {binary_bytes_per_sec} [{elapsed}]",
            (Unit::Paths, Some(_)) => "{prefix}: [{bar:30}] {pos}/{len} paths, {per_sec}, {eta} left",
            (Unit::Paths, None) => "{spinner} {prefix}: {pos} paths, {per_sec} [{elapsed}]",
        };
        let bar = match total {
            Some(t) => indicatif::ProgressBar::new(t),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        let bar = bars().add(bar);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        if let Some(old) = self.0.lock().expect("meter lock").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &*self.0.lock().expect("meter lock") {
            b.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.0.lock().expect("meter lock").take() {
            b.finish_and_clear();
        }
    }
}

/// Shows the library's progress on a terminal, unless `quiet`.
pub fn install_meter(quiet: bool) {
    use std::io::IsTerminal;
    if !quiet && std::io::stderr().is_terminal() {
        crate::progress::install(Box::new(Meter(std::sync::Mutex::new(None))));
    }
}
