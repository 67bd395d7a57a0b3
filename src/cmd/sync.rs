//! `nixfs-layer sync [--target DIR] [--force]`, and switching to a new
//! lower generation: `sync --lower NEWDIR… [--keep-needed]` (see
//! `stack::lifecycle::{sync, switch_lowers}`).

use crate::cli::SyncArgs;
use crate::config::Config;
use crate::error::Result;
use crate::stack::lifecycle::{self, SwitchOptions};

use super::{resolve_target, Progress};

pub fn run(args: &SyncArgs, quiet: bool) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    if !args.lowers.is_empty() {
        let opts = SwitchOptions {
            lowers: args.lowers.clone(),
            keep_needed: args.keep_needed,
            config_file: args.target.config.config.clone(),
            flakefs: config.flakefs.clone(),
        };
        let progress = Progress::new(quiet, "merging lower databases");
        let phase = |p: &str| progress.phase(p);
        let switched = lifecycle::switch_lowers(&target, &opts, Some(&phase))?;
        drop(progress);
        super::mount::warn_hidden_sockets(&switched.mounting);
        if args.json {
            super::mount::warn_merge(&switched.mounting.summary);
            super::print_json(&super::mount::mounted_doc(
                &switched.mounting,
                Some(&switched.kept),
            ));
            return Ok(());
        }
        if !quiet && !switched.kept.is_empty() {
            eprintln!(
                "kept {} path(s) the upper needs and the new lowers lack: {}",
                switched.kept.len(),
                switched.kept.join(", ")
            );
        }
        super::mount::print_mounted(&switched.mounting, quiet);
        return Ok(());
    }
    let progress = Progress::new(quiet, "syncing lower databases");
    let phase = |p: &str| progress.phase(p);
    let synced = lifecycle::sync(&target, args.force, Some(&phase))?;
    drop(progress);
    let store = crate::stack::Target::new(&target).store();
    if args.json {
        super::warn_vanished(&synced.summary);
        let replaced: Vec<_> = synced
            .replaced
            .iter()
            .map(|r| serde_json::json!({ "lower": r.dir, "store": store }))
            .collect();
        super::print_json(&serde_json::json!({
            "format": 1,
            "target": target,
            "summary": synced.summary,
            "replaced": replaced,
            "sealed": synced.sealed,
        }));
        return Ok(());
    }
    if !quiet {
        for r in &synced.replaced {
            eprintln!(
                "sync: lower {} was replaced since it was mounted; mounted {} afresh on the new one",
                r.dir.display(),
                store.display()
            );
        }
    }
    super::warn_vanished(&synced.summary);
    if !quiet {
        println!("sync: {}", synced.summary);
    }
    Ok(())
}
