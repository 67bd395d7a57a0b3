//! `nixfs-layer export [PATH…] -o FILE [--compress zstd|xz|none] [--full]`:
//! the closures of the named paths (default: of every GC root of the upper),
//! less what the lowers have unless `--full`, in the format `nix-store
//! --import` reads (see `crate::export`). NARs are streamed from the merged
//! store to the (compressing) output; memory use does not grow with them.

use std::collections::BTreeSet;
use std::path::Path;

use crate::cli::ExportArgs;
use crate::closure::Graph;
use crate::config::Config;
use crate::error::Result;
use crate::export::{ExportError, Output, PathMeta, Writer};
use crate::gcroots;
use crate::pathdb;
use crate::storepath::{base_name, STORE_DIR};

use super::resolve_target;
use crate::stack::require_mounted;

/// The store path `arg` names: a store path (or a path inside one), or a
/// link leading to one (`./result`).
pub(crate) fn store_path_of(arg: &str, store: &Path) -> Option<String> {
    let resolved = if arg.starts_with(STORE_DIR) {
        arg.to_owned()
    } else {
        let real = std::fs::canonicalize(arg).ok()?;
        let real = real.to_string_lossy().into_owned();
        // Canonical paths in a store mounted elsewhere than /nix/store.
        match real.strip_prefix(&*store.to_string_lossy()) {
            Some(rest) => format!("{STORE_DIR}{rest}"),
            None => real,
        }
    };
    let rest = resolved.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let base = rest.split('/').next()?;
    Some(format!("{STORE_DIR}/{base}"))
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    if args.json && args.output == Path::new("-") {
        return Err(crate::error::Error::Usage(
            "export --json prints its report on stdout: write the export to a file (-o FILE), not to stdout (-o -)".into(),
        ));
    }
    let mounted = require_mounted(&target)?;
    let store = mounted.store();
    let db = mounted.upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let graph = Graph::load(&conn, &db)?;
    drop(conn);

    let mut roots = Vec::new();
    if args.paths.is_empty() {
        for (_, p) in gcroots::user_roots(&mounted.upper) {
            roots.extend(graph.get(&p));
        }
    } else {
        for a in &args.paths {
            let i = store_path_of(a, &store)
                .and_then(|p| graph.get(&p))
                .ok_or_else(|| ExportError::NotValid { path: a.clone() })?;
            roots.push(i);
        }
    }
    let items: BTreeSet<usize> = graph
        .closure(roots)
        .into_iter()
        .filter(|&i| {
            let n = &graph.nodes[i];
            !n.is_pin() && (args.full || !n.lower_has())
        })
        .collect();
    let order = graph.export_order(&items);

    let out = Output::create(&args.output, args.compress)?;
    let mut w = Writer::new(out, &args.output);
    let total: u64 = order.iter().map(|&i| graph.nodes[i].nar_size).sum();
    let stage = crate::progress::stage(
        &format!("exporting {} path(s)", order.len()),
        (total > 0).then_some(total),
        crate::progress::Unit::Bytes,
    );
    for &i in &order {
        let n = &graph.nodes[i];
        let meta = PathMeta {
            path: &n.path,
            references: n
                .refs
                .iter()
                .map(|&r| graph.nodes[r].path.as_str())
                .collect(),
            deriver: n.deriver.as_deref(),
            nar_hash: &n.hash,
        };
        // The writer counts the NAR bytes on the stage as they pass.
        w.path(&store.join(base_name(&n.path)), &meta)?;
    }
    drop(stage);
    let nar_bytes = w.nar_bytes;
    let out = w.finish(true).map_err(|source| ExportError::Io {
        path: args.output.clone(),
        source,
    })?;
    out.finish()?;
    if args.json {
        let paths: Vec<&str> = order
            .iter()
            .map(|&i| graph.nodes[i].path.as_str())
            .collect();
        super::print_json(&serde_json::json!({
            "format": 1,
            "output": args.output,
            "compress": args.compress,
            "paths": paths,
            "nar_bytes": nar_bytes,
        }));
        return Ok(());
    }
    let summary = format!(
        "exported {} path(s), {} bytes of NAR, to {}",
        order.len(),
        nar_bytes,
        args.output.display()
    );
    if args.output == Path::new("-") {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
        for &i in &order {
            println!("{}", graph.nodes[i].path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_store_paths_as_nix_does() {
        let s = Path::new("/nix/store");
        let h = "/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a";
        assert_eq!(store_path_of(h, s).as_deref(), Some(h));
        assert_eq!(store_path_of(&format!("{h}/bin/x"), s).as_deref(), Some(h));
        assert_eq!(store_path_of("/nonexistent/link", s), None);
    }
}
