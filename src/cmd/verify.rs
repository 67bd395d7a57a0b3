//! `nixfs-layer verify [--target DIR] [--upper DIR] [--check-contents] [--repair] [--json]`
//!
//! The JSON shape is documented in docs/verify-json.md.

use serde::Serialize;

use crate::cli::VerifyArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layer::Upper;
use crate::overlay;
use crate::pathdb;
use crate::stack::Layers;
use crate::verify::rebuild;
use crate::verify::repair::{self, Repairs};
use crate::verify::{self, Problems, StaleReason, VerifyError};

use super::resolve_target;
use crate::stack::{find_mounted, lock_upper};

/// Version of the JSON document; bumped only for incompatible changes.
pub const VERIFY_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: u32,
    pub target: String,
    pub mounted: bool,
    pub upper: String,
    pub checked_contents: bool,
    /// No problem left (after repairing, with `--repair`).
    pub clean: bool,
    pub problems: usize,
    pub categories: Problems,
    /// What `--repair` did; null without it.
    pub repaired: Option<Repairs>,
}

pub fn run(args: &VerifyArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    let mounted = find_mounted(&target)?;
    let named = args.upper.clone().or(config.upper.clone());
    let (upper, mounted_store) = match (&mounted, named) {
        (Some(m), None) => (m.upper.clone(), Some(m.store())),
        (Some(m), Some(dir)) if Upper::open(&dir)? == m.upper => (m.upper.clone(), Some(m.store())),
        (_, Some(dir)) => (Upper::open(&dir)?, None),
        (None, None) => {
            return Err(Error::Usage(format!(
            "nothing of nixfs-layer is mounted at {}; name the upper to verify with --upper DIR",
            target.display()
        )))
        }
    };
    let _lock = if args.repair {
        if mounted_store.is_some() {
            overlay::check_privileges("verify --repair")?;
        }
        Some(lock_upper(&upper)?)
    } else {
        None
    };
    // SQLite's own check first: the other checks read the database.
    let damage = verify::damaged_database(&upper)?;
    let mut rebuilt = None;
    if !damage.is_empty() {
        if !args.repair {
            let problems = Problems {
                damaged_database: damage,
                ..Default::default()
            };
            return finish(
                args,
                &target,
                &upper,
                mounted_store.is_some(),
                problems,
                None,
            );
        }
        let mounted_lowers = mounted
            .as_ref()
            .filter(|_| mounted_store.is_some())
            .map(|m| m.record.lowers.as_slice());
        let lowers = rebuild::lowers_for(&upper, mounted_lowers)?;
        rebuilt = Some(rebuild::rebuild(&upper, &lowers, mounted_store.as_deref())?);
    }
    let db = upper.db();
    let mut conn = if args.repair {
        pathdb::open(&db)?
    } else {
        pathdb::open_read_only(&db)?
    };
    let layers = Layers::read(&conn, &upper, mounted_store.as_deref())?;
    let found = verify::check(&conn, &layers, args.check_contents)?;
    let (problems, repaired) = if args.repair {
        let mut done = repair::repair(&mut conn, &layers, &found.problems)?;
        done.rebuilt = rebuilt;
        let after = if done.changed() || done.resynced {
            verify::check_after_repair(&conn, &layers, &found, &done)?
        } else {
            found.problems
        };
        (after, Some(done))
    } else {
        (found.problems, None)
    };
    finish(
        args,
        &target,
        &upper,
        mounted_store.is_some(),
        problems,
        repaired,
    )
}

/// Prints the report; the exit status follows from it.
fn finish(
    args: &VerifyArgs,
    target: &std::path::Path,
    upper: &Upper,
    mounted: bool,
    problems: Problems,
    repaired: Option<Repairs>,
) -> Result<()> {
    let report = Report {
        format: VERIFY_FORMAT,
        target: target.display().to_string(),
        mounted,
        upper: upper.dir().display().to_string(),
        checked_contents: args.check_contents,
        clean: problems.count() == 0,
        problems: problems.count(),
        repaired,
        categories: problems,
    };
    if args.json {
        super::print_json(&report);
    } else {
        print_text(&report);
    }
    if report.clean {
        return Ok(());
    }
    let c = &report.categories;
    let repairable = c.repairable();
    let published_only = c.stale_published.len() == report.problems;
    Err(VerifyError::ProblemsRemain {
        count: report.problems,
        state: if args.repair { "remain after repairing" } else { "found" },
        hint: if !c.damaged_database.is_empty() {
            "the merged database is damaged: with no Nix process using the store, `nixfs-layer verify --repair` rebuilds it from the layers"
        } else if repairable > 0 && !args.repair {
            "`nixfs-layer verify --repair` fixes whiteouts, upper duplicates, unregistered and partial upper entries"
        } else if published_only {
            STALE_HINT
        } else {
            "missing lower content and hash mismatches need the lower's content back (or a rebuild of the upper path)"
        },
    }
    .into())
}

/// What fixes a published entry whose path the store lacks (not `--repair`:
/// the index is the lower owner's).
const STALE_HINT: &str = "published entries name paths this store lacks, which `--repair` does not change: `nixfs-layer sync` if they were published since the last sync (not_synced); else the lower's owner publishes the reference again (`nixfs-layer publish REF --into LOWER`) or drops it (`nixfs-layer publish --remove REF --into LOWER`)";

/// How many paths a category line names before "…".
const SHOWN: usize = 3;

fn line(name: &str, paths: &[&str], extra: &str) {
    let mut s = format!("{name}: {}{extra}", paths.len());
    if !paths.is_empty() {
        s += "  ";
        s += &paths[..paths.len().min(SHOWN)].join(" ");
        if paths.len() > SHOWN {
            s += &format!(" … (+{} more)", paths.len() - SHOWN);
        }
    }
    println!("{s}");
}

fn print_text(r: &Report) {
    println!(
        "verify {} ({}, upper {})",
        r.target,
        if r.mounted { "mounted" } else { "not mounted" },
        r.upper
    );
    if let Some(b) = r.repaired.as_ref().and_then(|rep| rep.rebuilt.as_ref()) {
        println!(
            "rebuilt the damaged merged database from the layers: {} lower path(s), {} upper path(s) from the journal, {} upper path(s) hashed and scanned; the damaged file is kept as {}",
            b.lower_paths,
            b.from_journal.len(),
            b.scanned.len(),
            b.damaged_copy
        );
    }
    if let Some(rep) = &r.repaired {
        println!(
            "repaired: removed {} whiteout(s), removed {} upper duplicate(s) ({} bytes), removed {} partial entr(ies), registered {} path(s){}",
            rep.whiteouts_removed.len(),
            rep.duplicates_removed.len(),
            rep.bytes_freed,
            rep.partial_removed.len(),
            rep.registered.len(),
            if rep.skipped.is_empty() {
                String::new()
            } else {
                format!("; left {} alone", rep.skipped.len())
            }
        );
        for s in &rep.skipped {
            println!("  left {}: {}", s.path, s.reason);
        }
    }
    let c = &r.categories;
    if !c.damaged_database.is_empty() {
        let lines: Vec<&str> = c
            .damaged_database
            .iter()
            .map(|d| d.problem.as_str())
            .collect();
        println!(
            "damaged database: {}  {}: {}{}",
            lines.len(),
            c.damaged_database[0].database,
            lines[..lines.len().min(SHOWN)].join("; "),
            if lines.len() > SHOWN {
                format!(" … (+{} more)", lines.len() - SHOWN)
            } else {
                String::new()
            }
        );
        println!("other checks: skipped (they read the damaged database)");
        println!("{} problem(s)", r.problems);
        return;
    }
    println!("damaged database: 0");
    line(
        "missing content",
        &(c.missing_content
            .iter()
            .map(|m| m.path.as_str())
            .collect::<Vec<_>>()),
        "",
    );
    line(
        "unregistered",
        &(c.unregistered
            .iter()
            .map(|m| m.path.as_str())
            .collect::<Vec<_>>()),
        "",
    );
    line(
        "partial entries (interrupted imports or builds)",
        &(c.partial_entries
            .iter()
            .map(|m| m.path.as_str())
            .collect::<Vec<_>>()),
        "",
    );
    line(
        "hidden by whiteouts",
        &(c.hidden.iter().map(|m| m.path.as_str()).collect::<Vec<_>>()),
        "",
    );
    let dup_bytes: u64 = c.duplicates.iter().map(|d| d.bytes).sum();
    line(
        "duplicates of lower paths",
        &(c.duplicates
            .iter()
            .map(|m| m.path.as_str())
            .collect::<Vec<_>>()),
        &format!(" ({dup_bytes} bytes)"),
    );
    let dangling: Vec<String> = c
        .dangling_references
        .iter()
        .map(|d| format!("{}->{}", d.referrer, d.reference))
        .collect();
    line(
        "dangling references",
        &dangling.iter().map(String::as_str).collect::<Vec<_>>(),
        "",
    );
    match &c.hash_mismatches {
        Some(h) => line(
            "hash mismatches",
            &h.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(),
            "",
        ),
        None => println!("hash mismatches: not checked (--check-contents)"),
    }
    println!(
        "published entries whose path is not in this store: {}",
        c.stale_published.len()
    );
    for s in &c.stale_published {
        let why = match s.reason {
            StaleReason::GoneFromLower => "the lower no longer has it",
            StaleReason::NotSynced => "published since the last sync",
        };
        println!("  {} -> {} in {} ({why})", s.reference, s.path, s.lower);
    }
    println!(
        "{}",
        if r.clean {
            "clean".to_owned()
        } else {
            format!("{} problem(s)", r.problems)
        }
    );
}
