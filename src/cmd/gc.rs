//! `nixfs-layer gc [--target DIR] [--dry-run] [--max-freed BYTES]`

use crate::cli::GcArgs;
use crate::config::Config;
use crate::error::Result;
use crate::gc::{self, GcOptions};
use crate::overlay;
use crate::pathdb;
use crate::verify::Layers;

use super::{lock_upper, require_mounted, resolve_target};

pub fn run(args: &GcArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    overlay::check_privileges("gc")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let lowers = {
        let conn = pathdb::open_read_only(&mounted.upper.db())?;
        Layers::read(&conn, &mounted.upper, Some(&mounted.store()))?.lowers
    };
    let report = gc::collect(
        &target,
        &mounted.upper,
        &lowers,
        GcOptions {
            dry_run: args.dry_run,
            max_freed: args.max_freed,
        },
    )?;
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
