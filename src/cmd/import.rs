//! `nixfs-layer import FILE`: imports an export (this tool's or a plain
//! `nix-store --export`, compressed with zstd or xz or not) into the stack
//! mounted at /nix.
//!
//! Two passes, memory flat in both:
//! 1. the whole file is read and checked without writing anything: its
//!    structure and every NAR's syntax as Nix parses them, each NAR hashed,
//!    the checksum trailer when present, the decompressor's verdict; every
//!    reference must be a path earlier in the file or valid here, and a
//!    path already valid here must have the NAR hash the file's NAR has.
//! 2. only then is the stream fed to the installed Nix's `nix-store
//!    --import`, which registers the paths through the merged store (so
//!    they land in the upper) with its own checks.
//!
//! A truncated or corrupt file therefore fails in pass 1 and registers
//! nothing. What pass 1 cannot foresee (the disk filling up while Nix
//! writes) can leave the paths Nix imported so far: each complete and
//! valid with its references; importing the file again finishes the job.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rusqlite::OptionalExtension;

use crate::cli::ImportArgs;
use crate::config::Config;
use crate::error::Result;
use crate::export::{last_line, Contents, ExportError, Input};
use crate::pathdb::{self, sql_err};
use crate::storepath::STORE_DIR;

use super::resolve_target;
use crate::stack::{lock_upper, require_mounted};

/// Pass 1's checks against the store: which entries are new.
fn check_against_store(
    file: &Path,
    contents: &Contents,
    db: &Path,
) -> Result<Vec<String>, ExportError> {
    let conn = pathdb::open_read_only(db)?;
    let err = sql_err(db);
    let mut stmt = conn
        .prepare("select hash from ValidPaths where path = ?1")
        .map_err(&err)?;
    let mut hash_of = |p: &str| -> Result<Option<String>, ExportError> {
        Ok(stmt.query_row([p], |r| r.get(0)).optional().map_err(&err)?)
    };
    let mut earlier: HashSet<String> = HashSet::new();
    let mut new = Vec::new();
    for e in &contents.entries {
        let path = e.path.to_absolute();
        match hash_of(&path)? {
            Some(here) if !e.nar.matches_db(&here) => {
                return Err(ExportError::Conflict {
                    file: file.to_owned(),
                    path,
                    here,
                    file_hash: e.nar.to_db_string(),
                })
            }
            Some(_) => {}
            None => new.push(path.clone()),
        }
        for r in &e.references {
            let r = r.to_absolute();
            if r != path && !earlier.contains(&r) && hash_of(&r)?.is_none() {
                return Err(ExportError::MissingReference {
                    file: file.to_owned(),
                    path,
                    reference: r,
                });
            }
        }
        earlier.insert(path);
    }
    Ok(new)
}

/// Pass 2: the stream through `nix-store --import`.
fn nix_import(file: &Path) -> Result<(), ExportError> {
    let command = "nix-store --import".to_owned();
    let mut child = Command::new("nix-store")
        .arg("--import")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ExportError::Spawn {
            program: "nix-store",
            source,
        })?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errs = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut stdin = child.stdin.take().expect("piped stdin");
    let fed = Input::open(file).and_then(|i| i.read(Some(&mut stdin)));
    drop(stdin);
    let status = child.wait().map_err(|source| ExportError::Io {
        path: PathBuf::from("nix-store"),
        source,
    })?;
    let errs = errs.join().unwrap_or_default();
    for line in String::from_utf8_lossy(&errs).lines() {
        tracing::debug!(target: "nixfs_layer::nix", "{line}");
    }
    if !status.success() {
        return Err(ExportError::Nix {
            command,
            status,
            message: last_line(&errs),
        });
    }
    fed.map(|_| ())
}

pub fn run(args: &ImportArgs) -> Result<()> {
    let config = Config::load(args.target.config.config.as_deref())?;
    let target = resolve_target(args.target.target.as_deref(), &config)?;
    if target
        != Path::new(STORE_DIR)
            .parent()
            .expect("store dir has a parent")
    {
        return Err(ExportError::TargetNotNix { target }.into());
    }
    let mounted = require_mounted(&target)?;
    let _lock = lock_upper(&mounted.upper)?;
    let stage = crate::progress::stage(
        &format!("checking {}", args.file.display()),
        None,
        crate::progress::Unit::Bytes,
    );
    let contents = Input::open(&args.file)?.read(None)?;
    drop(stage);
    let new = check_against_store(&args.file, &contents, &mounted.upper.db())?;
    if !contents.checksummed {
        tracing::warn!(file = %args.file.display(), "no nixfs-layer checksum trailer (a plain nix-store --export?): checked structurally only");
    }
    if !new.is_empty() {
        let total: u64 = contents.entries.iter().map(|e| e.nar.size).sum();
        let _stage = crate::progress::stage(
            "importing with nix-store --import",
            Some(total),
            crate::progress::Unit::Bytes,
        );
        nix_import(&args.file)?;
    }
    let db = mounted.upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let err = sql_err(&db);
    let mut valid = conn
        .prepare("select 1 from ValidPaths where path = ?1")
        .map_err(&err)
        .map_err(ExportError::from)?;
    for p in &new {
        if !valid.exists([p]).map_err(&err).map_err(ExportError::from)? {
            return Err(ExportError::NotRegistered { path: p.clone() }.into());
        }
    }
    if args.json {
        super::print_json(&serde_json::json!({
            "format": 1,
            "file": args.file,
            "imported": new,
            "already_present": contents.entries.len() - new.len(),
            "checksummed": contents.checksummed,
        }));
        return Ok(());
    }
    println!(
        "imported {} path(s), {} already present{}",
        new.len(),
        contents.entries.len() - new.len(),
        if contents.checksummed {
            ""
        } else {
            " (no checksum trailer: checked structurally only)"
        }
    );
    for p in &new {
        println!("{p}");
    }
    Ok(())
}
