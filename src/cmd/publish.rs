//! `nixfs-layer publish REF… --into LOWERDIR [--remove]` and
//! `nixfs-layer published [--lower DIR] [--json]`.

use std::time::Duration;

use serde::Serialize;

use crate::cli::{PublishArgs, PublishedArgs};
use crate::closure::Graph;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flakefs::names::FlakeRef;
use crate::flakefs::{Failure, Settings};
use crate::layer::{self, Lower};
use crate::nixcli::Nix;
use crate::pathdb;
use crate::promote::{self, PromoteError};
use crate::published::{self, Change, Entry};

use super::resolve_target;
use crate::stack::require_mounted;

pub fn run(args: &PublishArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    let mounted = require_mounted(&target)?;
    let lower = Lower::open(&args.into)?;
    layer::check_target(&target, std::slice::from_ref(&lower), &mounted.upper)?;
    let refs = args
        .refs
        .iter()
        .map(|r| FlakeRef::parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    let changes: Vec<Change> = if args.remove {
        refs.iter()
            .map(|r| Change::Remove(r.text.clone()))
            .collect()
    } else {
        let settings = Settings::from_config(&config.flakefs);
        let nix = Nix::default();
        refs.iter()
            .map(|r| evaluate(&nix, r, &settings).map(Change::Set))
            .collect::<Result<Vec<_>>>()?
    };
    let db = mounted.upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let graph = Graph::load(&conn, &db)?;
    let roots = changes
        .iter()
        .filter_map(|c| match c {
            Change::Set(e) => Some(
                graph
                    .get(&e.path)
                    .ok_or_else(|| PromoteError::NotValid(e.path.clone())),
            ),
            Change::Remove(_) => None,
        })
        .collect::<Result<Vec<_>, _>>()?;
    let root_dir = lower.published_roots();
    let root_err = |source| Error::Io {
        path: root_dir.clone(),
        source,
    };
    published::add_roots(&root_dir, &changes).map_err(root_err)?;
    let done = promote::promote(
        &graph,
        &roots,
        &mounted.store(),
        &conn,
        &db,
        &lower,
        &changes,
    )?;
    published::drop_roots(&root_dir, &changes).map_err(root_err)?;
    if args.json {
        let published: Vec<&Entry> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Set(e) => Some(e),
                Change::Remove(_) => None,
            })
            .collect();
        let removed: Vec<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Remove(r) => Some(r.as_str()),
                Change::Set(_) => None,
            })
            .collect();
        super::print_json(&serde_json::json!({
            "format": 1,
            "into": lower.dir(),
            "published": published,
            "removed": removed,
            "copied": done.paths,
            "already": done.already,
        }));
        return Ok(());
    }
    for c in &changes {
        match c {
            Change::Set(e) => println!("{} -> {}", e.reference, e.path),
            Change::Remove(r) => println!("removed {r}"),
        }
    }
    println!(
        "published {} reference(s) into {}: {} path(s) copied, {} already there; readers follow at their next `nixfs-layer sync`",
        changes.len(),
        lower.dir().display(),
        done.paths.len(),
        done.already
    );
    Ok(())
}

/// Evaluates and builds `r` as root on the mounted stack: its index entry.
fn evaluate(nix: &Nix, r: &FlakeRef, s: &Settings) -> Result<Entry> {
    let fail = |e: crate::nixcli::NixError, what: &str| {
        Error::Resolve(Failure::new(e.errno(), format!("{}: {what}: {e}", r.text)))
    };
    let ev = nix
        .eval(&r.installable(), s.eval_timeout, None)
        .map_err(|e| fail(e, "evaluation failed"))?;
    let output = r.output.clone().unwrap_or(ev.default.clone());
    if !ev.outputs.contains_key(&output) {
        return Err(Error::Resolve(Failure::new(
            libc::ENOENT,
            format!("{}: has no output '{output}'", r.text),
        )));
    }
    let path = nix
        .build(&r.output_installable(&output), s.build_timeout, None)
        .map_err(|e| fail(e, "build failed"))?;
    let locked = nix
        .locked_url(&r.flake, s.eval_timeout.min(Duration::from_secs(600)))
        .map_err(|e| fail(e, "no locked form"))?;
    let locked = match &r.attr {
        Some(a) => format!("{locked}#{a}"),
        None => locked,
    };
    Ok(Entry {
        reference: r.text.clone(),
        path: path.display().to_string(),
        output,
        locked: Some(locked),
        system: Some(format!("{}-linux", std::env::consts::ARCH)),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    })
}

#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    entry: &'a Entry,
    lower: String,
}

pub fn list(args: &PublishedArgs) -> Result<()> {
    let lowers = match &args.lower {
        Some(d) => vec![Lower::open(d)?],
        None => {
            let config = Config::load(args.target.config.config.as_deref())?;
            let target = resolve_target(args.target.target.as_deref(), &config)?;
            require_mounted(&target)?.lowers()?
        }
    };
    let mut all = Vec::new();
    for l in &lowers {
        let db = l.db();
        let entries = published::read(&db).map_err(|source| {
            Error::Db(pathdb::DbError::Sqlite {
                path: db.clone(),
                source,
            })
        })?;
        all.push((l.dir().display().to_string(), entries));
    }
    if args.json {
        let listed: Vec<Listed> = all
            .iter()
            .flat_map(|(lower, es)| {
                es.iter().map(move |entry| Listed {
                    entry,
                    lower: lower.clone(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string(&listed).expect("entries serialise")
        );
    } else {
        for (lower, es) in &all {
            for e in es {
                println!("{}\t{}\t{lower}", e.reference, e.path);
            }
        }
    }
    Ok(())
}
