//! `nixfs-layer optimise [--target DIR] [--json]`: drops the upper's copies
//! of paths a lower has with the same contents (see `crate::optimise`).

use crate::cli::OptimiseArgs;
use crate::config::Config;
use crate::error::Result;
use crate::optimise;
use crate::overlay;
use crate::pathdb;
use crate::stack::Layers;

use super::resolve_target;
use crate::stack::{lock_upper, require_mounted};

pub fn run(args: &OptimiseArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    overlay::check_privileges("optimise")?;
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let mut conn = pathdb::open(&mounted.upper.db())?;
    let layers = Layers::read(&conn, &mounted.upper, Some(&mounted.store()))?;
    let r = optimise::optimise(&mut conn, &mounted.upper, &layers.lowers, &mounted.store())?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            format: u32,
            #[serde(flatten)]
            report: &'a optimise::Optimised,
        }
        super::print_json(&Doc {
            format: 1,
            report: &r,
        });
        return Ok(());
    }
    println!(
        "dropped {} upper cop(y/ies), freed {} bytes",
        r.dropped.len(),
        r.bytes_freed
    );
    for d in &r.dropped {
        println!("{}\t{}\t{}", d.path, d.bytes, d.lower);
    }
    for k in &r.kept {
        println!("kept {}: {}", k.path, k.reason);
    }
    Ok(())
}
