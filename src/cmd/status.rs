//! `nixfs-layer status [--target DIR] [--upper DIR] [--json]`
//!
//! The JSON shape is documented in docs/status-json.md; it only grows.

use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::Config;
use crate::error::Result;
use crate::layer::Upper;
use crate::pathdb::{self, stats};

use super::resolve_target;
use crate::stack::find_mounted;

/// Version of the JSON document; bumped only for incompatible changes.
pub const STATUS_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Status {
    pub format: u32,
    pub target: String,
    pub mounted: bool,
    pub upper: Option<UpperStatus>,
    pub lowers: Vec<LowerStatus>,
    /// Valid paths in the merged database (null when no upper is known).
    pub valid_paths: Option<u64>,
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
}

#[derive(Debug, Serialize)]
pub struct FlakeTreeStatus {
    pub mountpoint: String,
    /// The server's pid (null when none runs).
    pub pid: Option<u32>,
    /// Mounted and served by a running server.
    pub alive: bool,
    /// Results of locked references kept across restarts.
    pub locked_results: u64,
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
    let mounted = find_mounted(&target)?;
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
        Some(m) => health(m),
        None => ("not mounted", Vec::new(), None),
    };
    if let Some(u) = upper.as_ref().filter(|u| pathdb::keep::switch_pending(u)) {
        problems.push(format!(
            "a `sync --lower` on {} was cut short after copying what the upper needs: the next `nixfs-layer mount` of this upper finishes it",
            u.dir().display()
        ));
        if state == "mounted" {
            state = "half-mounted";
        }
    }
    if let Some(u) = upper.as_ref().filter(|u| u.optimise_trash().exists()) {
        problems.push(format!(
            "an `optimise` on {} was cut short after it moved upper copies out of the store: run `nixfs-layer optimise` to finish it",
            u.dir().display()
        ));
        if state == "mounted" {
            state = "half-mounted";
        }
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
        mounted: mounted.is_some(),
        valid_paths: db_stats.as_ref().map(|s| s.valid_paths),
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
    };
    if args.json {
        super::print_json(&status);
    } else {
        print_text(&status);
    }
    Ok(())
}

/// What a mounted stack is missing: the state bind, its flake tree or the
/// tree's server (a `mount` or `sync --lower` killed midway).
fn health(m: &crate::stack::Mounted) -> (&'static str, Vec<String>, Option<FlakeTreeStatus>) {
    let mut problems = Vec::new();
    let var = m.var();
    let mounts = crate::overlay::mounts().unwrap_or_default();
    if crate::overlay::mount_at(&mounts, &var).is_none() {
        problems.push(format!(
            "{} is not bound (Nix there would use an empty state): run `nixfs-layer umount --target {}`, then mount again",
            var.display(),
            m.target.display()
        ));
    }
    let servers = crate::flakefs::daemon::servers_for(&m.target);
    let tree = m.record.flakefs.as_ref().map(|f| {
        let server = servers.iter().find(|s| s.mountpoint == f.mountpoint);
        let mounted = crate::flakefs::daemon::is_mounted(&f.mountpoint);
        let locked_results = std::fs::read_to_string(m.layout().flake_cache())
            .map(|t| t.lines().count() as u64)
            .unwrap_or(0);
        FlakeTreeStatus {
            mountpoint: f.mountpoint.display().to_string(),
            pid: server.map(|s| s.pid),
            alive: mounted && server.is_some(),
            locked_results,
        }
    });
    if let Some(t) = &tree {
        if !t.alive {
            problems.push(format!(
                "the flake tree at {} has no running server: run `nixfs-layer umount --target {}`, then mount again",
                t.mountpoint,
                m.target.display()
            ));
        }
    }
    for s in &servers {
        if m.record.flakefs.as_ref().map(|f| &f.mountpoint) != Some(&s.mountpoint) {
            problems.push(format!(
                "a flake tree server (pid {}) serves this store at {} without a record: run `nixfs-layer umount --target {}`",
                s.pid,
                s.mountpoint.display(),
                m.target.display()
            ));
        }
    }
    let state = if problems.is_empty() {
        "mounted"
    } else {
        "half-mounted"
    };
    (state, problems, tree)
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
        println!("  valid paths: {n}");
    }
    if s.sealed == Some(false) {
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
