//! `nixfs-layer gc [--target DIR] [--dry-run] [--max-freed BYTES]`

use crate::cli::GcArgs;
use crate::config::Config;
use crate::error::Result;
use crate::gc::{self, GcOptions};
use crate::overlay;
use crate::stack::Layers;

use super::resolve_target;
use crate::stack::{lock_upper, require_mounted};

pub fn run(args: &GcArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    overlay::check_privileges("gc")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let lowers = Layers::of_mounted(&mounted)?.lowers;
    let report = gc::collect(
        &target,
        &mounted.upper,
        &lowers,
        GcOptions {
            dry_run: args.dry_run,
            max_freed: args.max_freed,
        },
    )?;
    if args.json {
        super::print_json(&serde_json::json!({
            "format": 1,
            "dry_run": report.dry_run,
            "paths": report.paths,
            "bytes": report.bytes,
        }));
        return Ok(());
    }
    println!(
        "{} {} path(s), {} bytes",
        if report.dry_run {
            "would free"
        } else {
            "freed"
        },
        report.paths.len(),
        report.bytes
    );
    for f in &report.paths {
        println!("{}\t{}", f.path, f.bytes);
    }
    Ok(())
}
