//! `gc`: frees the upper's unreachable paths with the installed Nix's own
//! collector (`nix-store --gc`) run against the mounted merged store.
//!
//! That is sound because of the pin (`pathdb::pin`): every lower path is
//! reachable from a GC root, so Nix's collector only ever deletes upper
//! paths. Two cases the pin does not cover are handled here, before Nix runs:
//!
//! * an entry of a lower's store that is not a valid path of the merged
//!   store (a publisher is copying paths in, its database comes last): Nix
//!   deletes invalid store entries. The sealed overlay (`overlay::seal`)
//!   refuses that, so Nix's collector would stop there with EPERM, having
//!   unregistered nothing of the lowers; such a stack is refused up front,
//!   and a lower that gains entries while Nix runs gets the same message.
//! * a path registered through the merged store that a lower has as well:
//!   deleting it would white out the lower's copy. It gets a GC root for the
//!   length of the run (under `var/nix/gcroots/nixfs-layer-gc/`).
//!
//! And `--print-dead` runs first: if Nix counted any lower path as dead,
//! nothing is deleted.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use rusqlite::Connection;
use serde::Serialize;

use crate::export::last_line;
use crate::layer::Upper;
use crate::nar::apparent_size;
use crate::pathdb::{self, sql_err, DbError};
use crate::stack::{LowerLayer, Origin};
use crate::storepath::{base_name, STORE_DIR};

/// Where the roots that keep shared paths alive during a run live.
const RUN_ROOTS: &str = "nix/gcroots/nixfs-layer-gc";

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("gc runs the installed Nix, whose store is /nix/store, so the stack must be mounted at /nix, not {0}")]
    TargetNotNix(PathBuf),
    #[error("could not run {program}: {source}; is Nix installed and on PATH?")]
    Spawn {
        program: &'static str,
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {message}")]
    Nix {
        command: String,
        status: ExitStatus,
        message: String,
    },
    #[error("lower {lower}: {count} store entr(y/ies) are not valid paths of the merged store (first: {first}); Nix's collector would try to delete them (the overlay refuses), so nothing was collected: run `nixfs-layer sync` once the lower's database lists them (`sync --force` if it already does), or remove them from the lower")]
    LowerEntriesInvalid {
        lower: PathBuf,
        count: usize,
        first: String,
    },
    #[error("Nix's collector stopped at {entry}, which a lower holds but the merged database does not list (the lower gained it while the collector ran); the overlay kept it, nothing of the lowers was touched: run `nixfs-layer sync` and `nixfs-layer gc` again")]
    LowerChanged { entry: String },
    #[error("Nix's collector counts {count} lower path(s) as dead (first: {first}), so nothing was collected; run `nixfs-layer sync --force` to restore the pin and try again")]
    LowerPathsDead { count: usize, first: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl GcError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            GcError::TargetNotNix(_) => Kind::Usage,
            GcError::Spawn { .. } => Kind::Unavailable,
            GcError::Nix { .. } => Kind::Software,
            GcError::LowerChanged { .. } => Kind::TempFail,
            GcError::LowerEntriesInvalid { .. } | GcError::LowerPathsDead { .. } => Kind::DataErr,
            GcError::Db(e) => e.kind(),
            GcError::Io { .. } => Kind::IoErr,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Only list what would be freed.
    pub dry_run: bool,
    /// Stop once this many bytes are freed (Nix's `--max-freed`).
    pub max_freed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Freed {
    pub path: String,
    /// narSize from the database before collecting (apparent size for an
    /// entry that was not a valid path).
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Freed (or, with `dry_run`, unreachable) upper paths, sorted.
    pub paths: Vec<Freed>,
    pub bytes: u64,
}

/// A valid path's size and provenance.
struct Info {
    nar_size: u64,
    origin: Origin,
}

fn valid_paths(conn: &Connection, db: &Path) -> Result<HashMap<String, Info>, GcError> {
    let rows = conn
        .prepare(
            "select v.path, coalesce(v.narSize, 0), coalesce(o.layer, 0) from ValidPaths v
             left join NixfsLayerOrigin o on o.path = v.path",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Info {
                        nar_size: r.get(1)?,
                        origin: r.get(2)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()
        })
        .map_err(sql_err(db))?;
    Ok(rows)
}

/// Collects garbage in the stack mounted at `target` (which must be /nix).
/// The caller holds the upper's lock.
pub fn collect(
    target: &Path,
    upper: &Upper,
    lowers: &[LowerLayer],
    opts: GcOptions,
) -> Result<GcReport, GcError> {
    if target
        != Path::new(STORE_DIR)
            .parent()
            .expect("store dir has a parent")
    {
        return Err(GcError::TargetNotNix(target.to_owned()));
    }
    let db = upper.db();
    let conn = pathdb::open_read_only(&db)?;
    let before = valid_paths(&conn, &db)?;
    check_lower_entries(upper, lowers, &before)?;
    let roots = RunRoots::create(upper, lowers, &before)?;

    let dead = run_nix_store(&["--gc", "--print-dead"])?;
    let dead: BTreeSet<String> = dead
        .lines()
        .filter(|l| l.starts_with(STORE_DIR))
        .map(str::to_owned)
        .collect();
    let lower_dead: Vec<&String> = dead
        .iter()
        .filter(|p| {
            before.get(*p).is_some_and(|i| !i.origin.is_upper())
                || lowers.iter().any(|l| l.has(base_name(p)))
        })
        .collect();
    if let Some(first) = lower_dead.first() {
        return Err(GcError::LowerPathsDead {
            count: lower_dead.len(),
            first: (*first).clone(),
        });
    }
    let size_of = |p: &str| {
        before.get(p).map_or_else(
            || apparent_size(&upper.store().join(base_name(p))),
            |i| i.nar_size,
        )
    };
    let paths: Vec<Freed> = if opts.dry_run {
        dead.iter()
            .map(|p| Freed {
                path: p.clone(),
                bytes: size_of(p),
            })
            .collect()
    } else {
        let max = opts.max_freed.map(|m| m.to_string());
        let mut args = vec!["--gc"];
        if let Some(m) = &max {
            args.extend(["--max-freed", m]);
        }
        let stage = crate::progress::stage(
            "collecting with nix-store --gc",
            Some(dead.len() as u64),
            crate::progress::Unit::Paths,
        );
        run_nix_store_counting(&args, &stage).map_err(refused_by_seal)?;
        drop(stage);
        let after = valid_paths(&conn, &db)?;
        let candidates: BTreeSet<&String> = dead
            .iter()
            .chain(
                before
                    .iter()
                    .filter(|(_, i)| i.origin.is_upper())
                    .map(|(p, _)| p),
            )
            .collect();
        candidates
            .into_iter()
            .filter(|p| {
                !after.contains_key(*p)
                    && fs::symlink_metadata(upper.store().join(base_name(p))).is_err()
            })
            .map(|p| Freed {
                path: p.clone(),
                bytes: size_of(p),
            })
            .collect()
    };
    drop(roots);
    Ok(GcReport {
        dry_run: opts.dry_run,
        bytes: paths.iter().map(|f| f.bytes).sum(),
        paths,
    })
}

/// A collector run that the sealed overlay stopped: Nix tried to delete
/// (or make writable, before deleting) an entry a lower holds.
fn refused_by_seal(e: GcError) -> GcError {
    if let GcError::Nix { message, .. } = &e {
        if message.ends_with("Operation not permitted") {
            if let Some(entry) = message.split('\'').find(|s| s.starts_with(STORE_DIR)) {
                return GcError::LowerChanged {
                    entry: entry.to_owned(),
                };
            }
        }
    }
    e
}

/// Refuses a stack where a lower's store holds entries the merged database
/// does not list as valid (and no whiteout already hides): Nix would
/// delete them.
fn check_lower_entries(
    upper: &Upper,
    lowers: &[LowerLayer],
    valid: &HashMap<String, Info>,
) -> Result<(), GcError> {
    for l in lowers {
        let store = l.store();
        let io = |source| GcError::Io {
            path: store.clone(),
            source,
        };
        let mut bad = Vec::new();
        for e in fs::read_dir(&store).map_err(io)? {
            let name = e.map_err(io)?.file_name().to_string_lossy().into_owned();
            if name == ".links" || valid.contains_key(&format!("{STORE_DIR}/{name}")) {
                continue;
            }
            let upper_entry = upper.store().join(&name);
            if fs::symlink_metadata(&upper_entry).is_ok() {
                // Hidden by a whiteout or shadowed by an upper entry: Nix
                // deals with the upper's entry.
                continue;
            }
            bad.push(name);
        }
        bad.sort();
        if let Some(first) = bad.first() {
            return Err(GcError::LowerEntriesInvalid {
                lower: l.dir.clone(),
                count: bad.len(),
                first: first.clone(),
            });
        }
    }
    Ok(())
}

/// GC roots for upper-registered paths that a lower has too, removed on drop.
struct RunRoots(PathBuf);

impl RunRoots {
    fn create(
        upper: &Upper,
        lowers: &[LowerLayer],
        valid: &HashMap<String, Info>,
    ) -> Result<RunRoots, GcError> {
        let dir = upper.var().join(RUN_ROOTS);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| GcError::Io { path, source }
        };
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        for (p, _) in valid.iter().filter(|(_, i)| i.origin.is_upper()) {
            let name = base_name(p);
            if lowers.iter().any(|l| l.has(name)) {
                symlink(p, dir.join(name)).map_err(io(&dir))?;
                tracing::info!(path = %p, "a lower has this upper path too: kept for this run");
            }
        }
        Ok(RunRoots(dir))
    }
}

impl Drop for RunRoots {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "could not remove the run's GC roots");
        }
    }
}

/// [`run_nix_store`], counting each path Nix says it deletes on `stage`.
fn run_nix_store_counting(
    args: &[&str],
    stage: &crate::progress::Stage,
) -> Result<String, GcError> {
    use std::io::{BufRead, Read};
    let command = format!("nix-store {}", args.join(" "));
    tracing::info!(%command, "running Nix's collector");
    let mut child = Command::new("nix-store")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| GcError::Spawn {
            program: "nix-store",
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let mut errors = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().expect("piped stderr")).split(b'\n') {
        let Ok(line) = line else { break };
        if line.starts_with(b"deleting '") {
            stage.advance(1);
        }
        tracing::debug!(target: "nixfs_layer::nix", "{}", String::from_utf8_lossy(&line));
        errors.extend_from_slice(&line);
        errors.push(b'\n');
    }
    let status = child.wait().map_err(|source| GcError::Spawn {
        program: "nix-store",
        source,
    })?;
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(GcError::Nix {
            command,
            status,
            message: last_line(&errors),
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs the installed `nix-store` with `args`; its stdout, or its last
/// error line.
fn run_nix_store(args: &[&str]) -> Result<String, GcError> {
    let command = format!("nix-store {}", args.join(" "));
    tracing::info!(%command, "running Nix's collector");
    let out = Command::new("nix-store")
        .args(args)
        .output()
        .map_err(|source| GcError::Spawn {
            program: "nix-store",
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        tracing::debug!(target: "nixfs_layer::nix", "{line}");
    }
    if !out.status.success() {
        return Err(GcError::Nix {
            command,
            status: out.status,
            message: last_line(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
