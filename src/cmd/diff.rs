//! `nixfs-layer diff [--target DIR] [--json]`: the paths only the upper has
//! (registered through the merged store, in no lower), their narSize, and
//! the GC roots whose closures hold them. The JSON shape is documented in
//! docs/diff-json.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::DiffArgs;
use crate::closure::Graph;
use crate::config::Config;
use crate::error::Result;
use crate::gcroots;
use crate::layer::Upper;
use crate::pathdb;

use super::resolve_target;
use crate::stack::require_mounted;

/// Version of the JSON document; bumped only for incompatible changes.
pub const DIFF_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct UpperPath {
    pub path: String,
    pub nar_size: u64,
    /// The roots (as in [`Root::root`]) whose closure holds it; empty when
    /// nothing roots it (the next `gc` frees it).
    pub roots: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Root {
    /// The root's symlink, as seen under the target (`/nix/var/nix/gcroots/…`).
    pub root: String,
    /// Where an indirect root (`gcroots/auto/…`) points, e.g. a `result` link.
    pub indirect: Option<String>,
    /// The store path it keeps alive.
    pub path: String,
    /// The upper-only paths of that store path's closure, sorted.
    pub upper_only: Vec<String>,
    /// Their summed narSize.
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: u32,
    pub target: String,
    pub upper: String,
    /// Upper-only paths, sorted.
    pub paths: Vec<UpperPath>,
    pub roots: Vec<Root>,
    pub total_paths: usize,
    pub total_bytes: u64,
    /// How many upper-only paths no root holds.
    pub unrooted_paths: usize,
}

/// The root's link as Nix names it: under `TARGET/var` rather than the upper's `var/`.
fn as_seen(upper: &Upper, target: &Path, link: &Path) -> PathBuf {
    match link.strip_prefix(upper.var()) {
        Ok(rest) => crate::stack::Target::new(target).var().join(rest),
        Err(_) => link.to_owned(),
    }
}

pub fn report(target: &Path, upper: &Upper) -> Result<Report> {
    let db = upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let graph = Graph::load(&conn, &db)?;
    let mut paths: BTreeMap<usize, Vec<String>> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.upper_only())
        .map(|(i, _)| (i, Vec::new()))
        .collect();
    let mut roots = Vec::new();
    let mut user_roots = gcroots::user_roots(upper);
    user_roots.sort();
    for (link, path) in user_roots {
        let Some(i) = graph.get(&path) else { continue };
        let seen = as_seen(upper, target, &link).display().to_string();
        let indirect = std::fs::read_link(&link)
            .ok()
            .filter(|t| !t.starts_with(crate::storepath::STORE_DIR))
            .map(|t| t.display().to_string());
        let mut upper_only = Vec::new();
        let mut bytes = 0;
        for j in graph.closure([i]) {
            if let Some(holders) = paths.get_mut(&j) {
                holders.push(seen.clone());
                upper_only.push(graph.nodes[j].path.clone());
                bytes += graph.nodes[j].nar_size;
            }
        }
        roots.push(Root {
            root: seen,
            indirect,
            path,
            upper_only,
            bytes,
        });
    }
    let paths: Vec<UpperPath> = paths
        .into_iter()
        .map(|(i, roots)| UpperPath {
            path: graph.nodes[i].path.clone(),
            nar_size: graph.nodes[i].nar_size,
            roots,
        })
        .collect();
    Ok(Report {
        format: DIFF_FORMAT,
        target: target.display().to_string(),
        upper: upper.dir().display().to_string(),
        total_paths: paths.len(),
        total_bytes: paths.iter().map(|p| p.nar_size).sum(),
        unrooted_paths: paths.iter().filter(|p| p.roots.is_empty()).count(),
        paths,
        roots,
    })
}

pub fn run(args: &DiffArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    let mounted = require_mounted(&target)?;
    let r = report(&target, &mounted.upper)?;
    if args.json {
        super::print_json(&r);
        return Ok(());
    }
    println!(
        "upper-only: {} path(s), {} bytes, {} unrooted",
        r.total_paths, r.total_bytes, r.unrooted_paths
    );
    for p in &r.paths {
        let roots = if p.roots.is_empty() {
            "-".to_owned()
        } else {
            p.roots.join(",")
        };
        println!("{}\t{}\t{}", p.path, p.nar_size, roots);
    }
    Ok(())
}
