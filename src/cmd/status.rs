//! `nixfs-layer status [--target DIR] [--upper DIR] [--json]`
//!
//! The JSON shape is documented in docs/status-json.md; it only grows.

use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::Config;
use crate::error::Result;
use crate::layer::Upper;
use crate::pathdb::{self, stats};
use crate::stack::lifecycle::{self, FlakeTreeStatus, TransactionStatus};

use super::resolve_target;
use crate::stack::find_stack;

/// Version of the JSON document; bumped only for incompatible changes.
pub const STATUS_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Status {
    pub format: u32,
    pub target: String,
    pub mounted: bool,
    pub upper: Option<UpperStatus>,
    pub lowers: Vec<LowerStatus>,
    /// Valid paths of the layers in the merged database, the pin left out
    /// (null when no upper is known).
    pub valid_paths: Option<u64>,
    /// What `nix path-info --all` lists: `valid_paths` and the pin
    /// (`…-nixfs-layer-lowers`), null when no upper is known.
    pub nix_valid_paths: Option<u64>,
    /// Whether the mounted overlay's work directory is sealed (null when
    /// nothing is mounted): see `overlay::seal`.
    pub sealed: Option<bool>,
    /// "mounted", "half-mounted" (a command was killed midway: see
    /// `problems`) or "not mounted".
    pub state: &'static str,
    /// What is wrong with a half-mounted stack, each with what to run.
    pub problems: Vec<String>,
    /// The flake tree served with the mounted stack, if any.
    pub flake_tree: Option<FlakeTreeStatus>,
    /// The transaction the stack's mount record names: one under way, or
    /// one cut short (then `state` is "half-mounted").
    pub transaction: Option<TransactionStatus>,
}

#[derive(Debug, Serialize)]
pub struct LowerStatus {
    #[serde(flatten)]
    pub stats: stats::LowerStats,
    /// Mounted, and the lower's directory (or its `store/`) is another one
    /// than the overlay was mounted with: `TARGET/store` shows the old one
    /// until `nixfs-layer sync` mounts it afresh.
    pub replaced: bool,
}

#[derive(Debug, Serialize)]
pub struct UpperStatus {
    pub dir: String,
    #[serde(flatten)]
    pub stats: stats::UpperStats,
}

pub fn run(args: &StatusArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    // (Also a stack whose overlay a killed `sync` had unmounted.)
    let mounted = find_stack(&target)?;
    let upper = match &mounted {
        Some(m) => Some(m.upper.clone()),
        None => match args.upper.clone().or(config.upper.clone()) {
            Some(dir) => Some(Upper::open(&dir)?),
            None => None,
        },
    };
    let db_stats = match &upper {
        Some(u) => {
            let conn = pathdb::open_read_only(&u.db())?;
            Some(stats::read(&conn, &u.db())?)
        }
        None => None,
    };
    let (mut state, mut problems, flake_tree) = match &mounted {
        Some(m) => lifecycle::health(m),
        None => ("not mounted", Vec::new(), None),
    };
    if let (None, Some(u)) = (&mounted, &upper) {
        problems.extend(lifecycle::stale_record(u, &target));
    }
    if let Some(u) = &upper {
        let pending = lifecycle::pending(u);
        if !pending.is_empty() && state == "mounted" {
            state = "half-mounted";
        }
        problems.extend(pending);
    }
    let replaced = mounted
        .as_ref()
        .map(|m| m.replaced_lowers())
        .unwrap_or_default();
    for r in &replaced {
        problems.push(format!(
            "lower {} is another directory than the one mounted (replaced under the mount): run `nixfs-layer sync`",
            r.dir.display()
        ));
        if state == "mounted" {
            state = "half-mounted";
        }
    }
    let status = Status {
        format: STATUS_FORMAT,
        target: target.display().to_string(),
        mounted: mounted.as_ref().is_some_and(|m| m.store_mounted),
        valid_paths: db_stats.as_ref().map(|s| s.valid_paths),
        nix_valid_paths: db_stats.as_ref().map(|s| s.nix_valid_paths),
        upper: upper
            .as_ref()
            .zip(db_stats.as_ref())
            .map(|(u, s)| UpperStatus {
                dir: u.dir().display().to_string(),
                stats: s.upper.clone(),
            }),
        lowers: db_stats
            .map(|s| s.lowers)
            .unwrap_or_default()
            .into_iter()
            .map(|l| LowerStatus {
                replaced: replaced.iter().any(|r| r.dir.to_string_lossy() == l.dir),
                stats: l,
            })
            .collect(),
        sealed: mounted
            .as_ref()
            .map(|m| crate::overlay::is_sealed(&m.upper)),
        state,
        problems,
        flake_tree,
        transaction: mounted.as_ref().and_then(lifecycle::transaction),
    };
    if args.json {
        super::print_json(&status);
    } else {
        print_text(&status);
    }
    Ok(())
}

fn print_text(s: &Status) {
    println!("{}: {}", s.target, s.state);
    for p in &s.problems {
        println!("  problem: {p}");
    }
    if let Some(t) = &s.flake_tree {
        println!(
            "  flake tree {}: {}, {} locked result(s) kept",
            t.mountpoint,
            match t.pid {
                Some(pid) if t.alive => format!("served by pid {pid}"),
                Some(pid) => format!("server pid {pid}, not mounted"),
                None => "no server running".to_owned(),
            },
            t.locked_results
        );
    }
    if let Some(u) = &s.upper {
        println!(
            "  upper {}: {} paths, {} ({} upper-only)",
            u.dir,
            u.stats.paths,
            human_bytes(u.stats.bytes),
            u.stats.upper_only_paths
        );
    }
    for l in &s.lowers {
        let st = &l.stats;
        println!(
            "  lower {}: {} paths, {} ({} provided)",
            st.dir,
            st.paths,
            human_bytes(st.bytes),
            st.provided_paths
        );
        if l.replaced {
            println!(
                "    REPLACED since it was mounted: {}/store still shows the directory it was then; run `nixfs-layer sync` to mount the new one",
                s.target
            );
        }
    }
    if let Some(n) = s.valid_paths {
        match s.nix_valid_paths {
            Some(all) if all != n => println!(
                "  valid paths: {n} of the layers; `nix path-info --all` lists {all}, with the pin (…-nixfs-layer-lowers)"
            ),
            _ => println!("  valid paths: {n}"),
        }
    }
    if s.sealed == Some(false) && !crate::overlay::can_seal() {
        println!("  not sealed (a user namespace cannot seal): the lowers' entries are safe by their owners' permissions and the GC pin");
    } else if s.sealed == Some(false) {
        println!("  not sealed: lower paths can be copied up or whited out through the store; run `nixfs-layer sync` to seal it");
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
