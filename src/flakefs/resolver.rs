//! From a flake reference to a store path: evaluate, then answer from the
//! layer that already has the path, or build it into the upper.
//!
//! * Results are cached: locked references for good (and on disk, so a
//!   restarted daemon answers them without evaluating), unlocked ones for
//!   `ttl`, failures for `failure-ttl`. Answers that depend on who asks
//!   (permission, rate) are never cached.
//! * Single flight: concurrent requests for one reference share one
//!   evaluation and at most one build.
//! * Evaluations and builds run in limited numbers (`max-parallel-builds`),
//!   with timeouts; callers block in their own thread, never the FUSE loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cache::CacheFile;
use super::names::{FlakeRef, Source};
use super::policy::{may_read, Caller, Policy};
use super::{Failure, Settings};
use crate::nixcli::Nix;
use crate::pathdb::lookup::{Found, Lookup};
use crate::stack::Origin;

/// How a result was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// A lower has the path: nothing was built or written.
    LowerHit,
    /// The upper already had it.
    UpperHit,
    /// Built now, into the upper.
    Built,
    /// Answered from the cache, without evaluating.
    Cached,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub how: How,
    /// The reference is pinned: its result is kept for good.
    pub locked: bool,
    /// How long the answer may be cached by whoever receives it (None: for good).
    pub valid_for: Option<Duration>,
}

pub type Outcome = Result<Resolved, Failure>;

#[derive(Debug, Clone)]
struct Entry {
    result: Result<PathBuf, Failure>,
    expires: Option<Instant>,
    /// Loaded from disk and not yet checked against the database.
    unverified: bool,
}

#[derive(Default)]
struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
    /// The first waiting caller that may start builds.
    builder: Mutex<Option<u32>>,
}

/// Entries the cache holds before expired ones are dropped.
const PRUNE_AT: usize = 1024;

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub evaluations: AtomicU64,
    pub builds: AtomicU64,
}

pub struct Resolver {
    nix: Nix,
    lookup: Lookup,
    policy: Policy,
    settings: Settings,
    cache: Mutex<HashMap<String, Entry>>,
    /// Size of `cache` at which expired entries are dropped next (changed
    /// with the cache's lock held): twice what is left after each pruning,
    /// so that a cache of lasting entries is not scanned on every insert.
    prune_at: AtomicUsize,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    build_slots: Slots,
    eval_slots: Slots,
    file: Option<CacheFile>,
    /// Where results served from the upper get a GC root of their own.
    gc_roots: Option<PathBuf>,
    pub counters: Counters,
}

/// A counting semaphore.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        {
            let mut free = self.free.lock().unwrap();
            while *free == 0 {
                free = self.cv.wait(free).unwrap();
            }
            *free -= 1;
        }
        struct Release<'a>(&'a Slots);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                *self.0.free.lock().unwrap() += 1;
                self.0.cv.notify_one();
            }
        }
        let _r = Release(self);
        f()
    }
}

impl Resolver {
    pub fn new(
        nix: Nix,
        lookup: Lookup,
        policy: Policy,
        settings: Settings,
        file: Option<CacheFile>,
    ) -> Resolver {
        let mut cache = HashMap::new();
        if let Some(f) = &file {
            match f.load() {
                Ok(entries) => {
                    for (r, path) in entries {
                        cache.insert(
                            r,
                            Entry {
                                result: Ok(path),
                                expires: None,
                                unverified: true,
                            },
                        );
                    }
                    tracing::info!(file = %f.path().display(), entries = cache.len(), "loaded locked flake results");
                }
                Err(e) => tracing::warn!(error = %e, "flake cache not loaded; starting empty"),
            }
        }
        Resolver {
            nix,
            lookup,
            policy,
            build_slots: Slots::new(settings.max_parallel_builds),
            eval_slots: Slots::new(settings.max_parallel_evals),
            settings,
            prune_at: AtomicUsize::new(PRUNE_AT.max(2 * cache.len())),
            cache: Mutex::new(cache),
            flights: Mutex::default(),
            file,
            gc_roots: None,
            counters: Counters::default(),
        }
    }

    /// Roots every result served from the upper (built or found there) in
    /// `dir` (a directory under the store's gcroots), so that Nix's garbage
    /// collector does not take a path the tree points at. Removing the
    /// directory releases them.
    pub fn with_gc_roots(mut self, dir: PathBuf) -> Resolver {
        self.gc_roots = Some(dir);
        self
    }

    fn root(&self, path: &Path) {
        let (Some(dir), Some(base)) = (&self.gc_roots, path.file_name()) else {
            return;
        };
        let made = std::fs::create_dir_all(dir)
            .and_then(|()| std::os::unix::fs::symlink(path, dir.join(base)));
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not add a GC root for a flake result")
            }
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// An answer that needs no evaluation, no database and no caller check:
    /// what the FUSE loop itself may answer. None means "ask [`Self::resolve`]".
    pub fn peek(&self, r: &FlakeRef) -> Option<Outcome> {
        if matches!(r.source, Source::Local(_)) {
            return None;
        }
        self.cached(r)
    }

    /// The cached answer for `r`, if any and fresh.
    fn cached(&self, r: &FlakeRef) -> Option<Outcome> {
        let cache = self.cache.lock().unwrap();
        let e = cache.get(&r.text)?;
        if e.unverified {
            return None;
        }
        let now = Instant::now();
        let valid_for = match e.expires {
            Some(t) if t <= now => return None,
            Some(t) => Some(t - now),
            None => None,
        };
        Some(match &e.result {
            Ok(path) => Ok(Resolved {
                path: path.clone(),
                how: How::Cached,
                locked: r.locked,
                valid_for,
            }),
            Err(f) => Err(f.clone().valid_for(valid_for.unwrap_or_default())),
        })
    }

    /// Resolves `r` for `caller`, blocking until done.
    #[tracing::instrument(skip_all, fields(reference = %r.text, uid = caller.uid))]
    pub fn resolve(&self, r: &FlakeRef, caller: &Caller) -> Outcome {
        let outcome = self.resolve_inner(r, caller);
        match &outcome {
            Ok(res) => tracing::info!(path = %res.path.display(), how = ?res.how, "resolved"),
            Err(f) => tracing::warn!(errno = f.errno, message = %f.message, "not resolved"),
        }
        outcome
    }

    fn resolve_inner(&self, r: &FlakeRef, caller: &Caller) -> Outcome {
        self.policy.check_ref(r)?;
        if let Source::Local(path) = &r.source {
            may_read(caller, path)?;
        }
        if let Some(o) = self.cached(r) {
            return o;
        }
        if let Some(o) = self.verify_loaded(r) {
            return o;
        }
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&r.text) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    flights.insert(r.text.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if self.policy.may_build(caller) {
            flight.builder.lock().unwrap().get_or_insert(caller.uid);
        }
        if leader {
            let outcome = self.compute(r, &flight);
            *flight.done.lock().unwrap() = Some(outcome.clone());
            self.flights.lock().unwrap().remove(&r.text);
            flight.cv.notify_all();
            outcome
        } else {
            let mut done = flight.done.lock().unwrap();
            while done.is_none() {
                done = flight.cv.wait(done).unwrap();
            }
            done.clone().expect("flight finished")
        }
    }

    /// A result loaded from disk is used once the database confirms that
    /// its path is still valid; otherwise it is dropped.
    fn verify_loaded(&self, r: &FlakeRef) -> Option<Outcome> {
        let path = {
            let cache = self.cache.lock().unwrap();
            let e = cache.get(&r.text).filter(|e| e.unverified)?;
            e.result.clone().ok()?
        };
        let still_valid = matches!(self.lookup.layer(&path), Ok(Some(_)));
        let mut cache = self.cache.lock().unwrap();
        if still_valid && r.locked {
            if let Some(e) = cache.get_mut(&r.text) {
                e.unverified = false;
            }
            Some(Ok(Resolved {
                path,
                how: How::Cached,
                locked: true,
                valid_for: None,
            }))
        } else {
            cache.remove(&r.text);
            None
        }
    }

    /// Evaluates, looks the path up, builds if needed; caches what may be cached.
    fn compute(&self, r: &FlakeRef, flight: &Flight) -> Outcome {
        let fail = |f: Failure| {
            if f.cacheable {
                let _ = self.remember(r, Err(f.clone()), How::Built);
            }
            Err(f.valid_for(self.settings.failure_ttl))
        };
        self.counters.evaluations.fetch_add(1, Ordering::SeqCst);
        let ev = match self
            .eval_slots
            .run(|| self.nix.eval(&r.installable(), self.settings.eval_timeout))
        {
            Ok(ev) => ev,
            Err(e) => {
                return fail(Failure::new(
                    e.errno(),
                    format!("{}: evaluation failed: {e}", r.text),
                ))
            }
        };
        let output = r.output.clone().unwrap_or(ev.default.clone());
        let Some(path) = ev.outputs.get(&output).cloned() else {
            return fail(Failure::new(
                libc::ENOENT,
                format!(
                    "{}: has no output '{output}'; its outputs: {}",
                    r.text,
                    ev.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        match self.lookup.layer(&path) {
            Ok(Some(layer)) => {
                let how = match layer {
                    Found::Stack(Origin::Lower(_)) => How::LowerHit,
                    Found::Stack(Origin::Upper | Origin::Pin) | Found::PlainStore => How::UpperHit,
                };
                return Ok(self.remember(r, Ok(path), how).expect("success"));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Failure::new(
                    libc::EIO,
                    format!("{}: {path:?}: store database: {e}", r.text),
                )
                .uncached())
            }
        }
        let builder = *flight.builder.lock().unwrap();
        let Some(uid) = builder else {
            return Err(Failure::new(
                libc::EACCES,
                format!(
                    "{}: {} is in no layer and this user may not start builds ([flakefs] build-users / build-groups)",
                    r.text,
                    path.display()
                ),
            )
            .uncached());
        };
        self.policy.take_build(uid).map_err(Failure::uncached)?;
        let installable = r.output_installable(&output);
        tracing::info!(reference = %r.text, %installable, path = %path.display(), uid, "building");
        let built = self.build_slots.run(|| {
            self.counters.builds.fetch_add(1, Ordering::SeqCst);
            self.nix.build(&installable, self.settings.build_timeout)
        });
        match built {
            Ok(p) => {
                if p != path {
                    tracing::warn!(reference = %r.text, evaluated = %path.display(), built = %p.display(), "the reference changed between evaluation and build; using what was built");
                }
                Ok(self.remember(r, Ok(p), How::Built).expect("success"))
            }
            Err(e) => fail(Failure::new(
                e.errno(),
                format!("{}: build failed: {e}", r.text),
            )),
        }
    }

    /// Caches a result (successes of locked references also on disk).
    fn remember(&self, r: &FlakeRef, result: Result<PathBuf, Failure>, how: How) -> Outcome {
        let ttl = match (&result, r.locked) {
            (Err(_), _) => Some(self.settings.failure_ttl),
            (Ok(_), true) => None,
            (Ok(_), false) => Some(self.settings.ttl),
        };
        if let (Ok(path), How::Built | How::UpperHit) = (&result, how) {
            self.root(path);
        }
        if let (Ok(path), true, Some(file)) = (&result, r.locked, &self.file) {
            if let Err(e) = file.append(&r.text, path) {
                tracing::warn!(error = %e, "could not record a locked result");
            }
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap();
        cache.insert(
            r.text.clone(),
            Entry {
                result: result.clone(),
                expires: ttl.map(|t| now + t),
                unverified: false,
            },
        );
        if cache.len() >= self.prune_at.load(Ordering::Relaxed) {
            // Expired entries are never answered again, only replaced.
            cache.retain(|_, e| e.expires.is_none_or(|t| t > now));
            self.prune_at
                .store(PRUNE_AT.max(2 * cache.len()), Ordering::Relaxed);
        }
        drop(cache);
        result.map(|path| Resolved {
            path,
            how,
            locked: r.locked,
            valid_for: ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlakeFsConfig;

    #[test]
    fn expired_entries_are_dropped_as_the_cache_grows() {
        let t = tempfile::tempdir().unwrap();
        let config = FlakeFsConfig {
            ttl: Some(0),
            failure_ttl: Some(0),
            ..FlakeFsConfig::default()
        };
        let resolver = Resolver::new(
            Nix::default(),
            Lookup::for_target(t.path()),
            Policy::from_config(&config).unwrap(),
            Settings::from_config(&config),
            None,
        );
        for i in 0..10 * PRUNE_AT {
            let r = FlakeRef::parse(&format!("nixpkgs#p{i}")).unwrap();
            let result = if i % 2 == 0 {
                Ok(PathBuf::from(format!("/nix/store/p{i}")))
            } else {
                Err(Failure::new(libc::ENOENT, "no".into()))
            };
            let _ = resolver.remember(&r, result, How::UpperHit);
        }
        let len = resolver.cache.lock().unwrap().len();
        assert!(len < PRUNE_AT, "{len} entries kept");

        let locked = FlakeRef::parse(&format!("github:o/r/{}#p", "0".repeat(40))).unwrap();
        assert!(locked.locked);
        resolver
            .remember(&locked, Ok("/nix/store/locked".into()), How::UpperHit)
            .unwrap();
        for i in 0..2 * PRUNE_AT {
            let r = FlakeRef::parse(&format!("nixpkgs#q{i}")).unwrap();
            let _ = resolver.remember(&r, Ok("/nix/store/q".into()), How::UpperHit);
        }
        assert!(
            resolver.cache.lock().unwrap().contains_key(&locked.text),
            "results kept for good stay"
        );
    }
}
