//! `nixfs-layer promote PATH… --into LOWERDIR`

use crate::cli::PromoteArgs;
use crate::closure::Graph;
use crate::config::Config;
use crate::error::Result;
use crate::layer::{self, Lower};
use crate::pathdb;
use crate::promote::{self, PromoteError};

use super::export::store_path_of;
use super::resolve_target;
use crate::stack::require_mounted;

pub fn run(args: &PromoteArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    let mounted = require_mounted(&target)?;
    let lower = Lower::open(&args.into)?;
    layer::check_target(&target, std::slice::from_ref(&lower), &mounted.upper)?;
    let db = mounted.upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let graph = Graph::load(&conn, &db)?;
    let store = mounted.store();
    let roots = args
        .paths
        .iter()
        .map(|a| {
            store_path_of(a, &store)
                .and_then(|p| graph.get(&p))
                .ok_or_else(|| PromoteError::NotValid(a.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let done = promote::promote(&graph, &roots, &store, &conn, &db, &lower, &[])?;
    if args.json {
        super::print_json(&serde_json::json!({
            "format": 1,
            "into": lower.dir(),
            "promoted": done.paths,
            "already": done.already,
        }));
        return Ok(());
    }
    println!(
        "promoted {} path(s) into {} ({} already there); run `nixfs-layer sync` then `nixfs-layer optimise` on its readers",
        done.paths.len(),
        lower.dir().display(),
        done.already
    );
    for p in &done.paths {
        println!("{p}");
    }
    Ok(())
}
