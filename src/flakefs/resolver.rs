//! From a flake reference to a store path: evaluate, then answer from the
//! layer that already has the path, or build it into the upper.
//!
//! * Whose rights: root evaluates (with its own rights) for root and the
//!   trusted users and groups only. Everyone else's references are
//!   evaluated and built as that user, through the nix-daemon, so Nix's own
//!   multi-user model decides what they may read and add; with no daemon
//!   answering, they get only what needs no evaluation (results root or
//!   they themselves already have).
//! * Whose word: a result root evaluated is answered to everyone (and the
//!   kernel may keep it); a result evaluated as a user is that user's word,
//!   answered to that user only, never kept by the kernel's shared cache.
//! * Results are cached in two LRUs of `cache-entries` each (root's, and
//!   every user's own), so a flood of names from one user never evicts
//!   root's results and memory stays bounded: locked references for good
//!   (and on disk, at most `saved-per-uid` per user, so a restarted daemon
//!   answers them without evaluating), unlocked ones for `ttl`, failures for
//!   `failure-ttl`, refusals (permission, rate, no daemon) for `refusal-ttl`
//!   and only for the uid they were given to.
//! * Single flight: concurrent requests for one reference (of one owner)
//!   share one evaluation and at most one build.
//! * Evaluations and builds run in limited numbers (`max-parallel-builds`,
//!   `evals-per-uid` at once and `evals-per-minute` for each non-root uid,
//!   root's in slots of their own), with timeouts; callers block in their
//!   own thread, never the FUSE loop.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::Serialize;

use super::cache::CacheFile;
use super::index::Indexes;
use super::names::{FlakeRef, Source};
use super::policy::{may_read, Caller, Policy};
use super::{Failure, ResolveMode, Settings};
use crate::nixcli::{AsUser, Nix};
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
    /// Published in a lower's index: nothing evaluated, nothing written.
    Published,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub how: How,
    /// The reference is pinned: its result is kept for good.
    pub locked: bool,
    /// How long the answer may be cached by whoever receives it (None: for good).
    pub valid_for: Option<Duration>,
    /// Root's word, the same for every caller: the kernel may keep it. A
    /// result evaluated as the caller is not.
    pub shared: bool,
    /// The index entry that answered, for `How::Published`.
    pub published: Option<crate::published::Entry>,
}

pub type Outcome = Result<Resolved, Failure>;

/// What the lowers' published indexes say about a reference.
enum Published {
    /// Nothing: no index has it.
    None,
    /// An entry whose path is valid in the merged store (or a database
    /// error looking it up).
    Answer(Outcome),
    /// An entry whose path is not valid in the merged store.
    Ignored {
        entry: crate::published::Entry,
        lower: PathBuf,
    },
}

/// Whose word a cached result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    /// Evaluated by root (for root or a trusted user): answered to everyone.
    Root,
    /// Evaluated as this user, or a refusal given to them: theirs only.
    Uid(u32),
}

type Key = (Owner, String);

#[derive(Debug, Clone)]
struct Entry {
    result: Result<PathBuf, Failure>,
    expires: Option<Instant>,
    /// Loaded from disk and not yet checked against the database.
    unverified: bool,
}

impl Entry {
    fn fresh(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

#[derive(Default)]
struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
    /// The first waiting caller that may start builds.
    builder: Mutex<Option<u32>>,
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub evaluations: AtomicU64,
    pub builds: AtomicU64,
}

/// The two bounded maps of results: root's, and every user's own.
struct Cache {
    shared: LruCache<String, Entry>,
    own: LruCache<(u32, String), Entry>,
}

impl Cache {
    fn new(cap: usize) -> Cache {
        let cap = NonZeroUsize::new(cap.max(1)).expect("not zero");
        Cache {
            shared: LruCache::new(cap),
            own: LruCache::new(cap),
        }
    }
    fn get(&mut self, key: &Key) -> Option<&Entry> {
        match key.0 {
            Owner::Root => self.shared.get(&key.1),
            Owner::Uid(u) => self.own.get(&(u, key.1.clone())),
        }
    }
    fn get_mut(&mut self, key: &Key) -> Option<&mut Entry> {
        match key.0 {
            Owner::Root => self.shared.get_mut(&key.1),
            Owner::Uid(u) => self.own.get_mut(&(u, key.1.clone())),
        }
    }
    fn put(&mut self, key: Key, e: Entry) {
        match key.0 {
            Owner::Root => {
                self.shared.put(key.1, e);
            }
            Owner::Uid(u) => {
                self.own.put((u, key.1), e);
            }
        }
    }
    fn remove(&mut self, key: &Key) {
        match key.0 {
            Owner::Root => {
                self.shared.pop(&key.1);
            }
            Owner::Uid(u) => {
                self.own.pop(&(u, key.1.clone()));
            }
        }
    }
    fn len(&self) -> usize {
        self.shared.len() + self.own.len()
    }
    fn grow_shared(&mut self, cap: usize) {
        if cap > self.shared.cap().get() {
            self.shared
                .resize(NonZeroUsize::new(cap).expect("not zero"));
        }
    }
}

pub struct Resolver {
    nix: Nix,
    lookup: Lookup,
    policy: Policy,
    settings: Settings,
    cache: Mutex<Cache>,
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    build_slots: Slots,
    eval_slots: Slots,
    /// Root's evaluations: never queued behind other users'.
    root_eval_slots: Slots,
    file: Option<CacheFile>,
    /// Locked results each non-root uid has in `file`.
    saved: Mutex<HashMap<u32, usize>>,
    /// Where results served from the upper get a GC root of their own.
    gc_roots: Option<PathBuf>,
    /// The nix-daemon's socket, through which users' references are
    /// evaluated as themselves.
    daemon_socket: Option<PathBuf>,
    /// The lowers' published references.
    indexes: Option<Indexes>,
    /// Published entries already warned about as not valid here (lower,
    /// reference, path): one warning each, however often they are asked.
    ignored: Mutex<std::collections::HashSet<(PathBuf, String, String)>>,
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
        let mut cache = Cache::new(settings.cache_entries);
        let mut saved: HashMap<u32, usize> = HashMap::new();
        if let Some(f) = &file {
            match f.load() {
                Ok(entries) => {
                    let n = entries.len();
                    // Root's map holds every locked result root has on disk
                    // and room besides: only root and trusted users add to
                    // it, so no flood can grow it.
                    let roots = entries.keys().filter(|(uid, _)| uid.is_none()).count();
                    cache.grow_shared(roots + settings.cache_entries);
                    for ((uid, r), path) in entries {
                        let owner = match uid {
                            Some(u) => {
                                *saved.entry(u).or_default() += 1;
                                Owner::Uid(u)
                            }
                            None => Owner::Root,
                        };
                        cache.put(
                            (owner, r),
                            Entry {
                                result: Ok(path),
                                expires: None,
                                unverified: true,
                            },
                        );
                    }
                    tracing::info!(file = %f.path().display(), entries = n, kept = cache.len(), "loaded locked flake results");
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
            root_eval_slots: Slots::new(settings.max_parallel_evals),
            settings,
            cache: Mutex::new(cache),
            flights: Mutex::default(),
            file,
            saved: Mutex::new(saved),
            gc_roots: None,
            daemon_socket: None,
            indexes: None,
            ignored: Mutex::default(),
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

    /// Evaluates users' references as themselves through the nix-daemon
    /// listening on `socket`.
    pub fn with_daemon_socket(mut self, socket: PathBuf) -> Resolver {
        self.daemon_socket = Some(socket);
        self
    }

    /// Answers references the lowers publish from their indexes (listed in
    /// the merged database `merged_db`), as `[flakefs] resolve` says.
    pub fn with_indexes(mut self, merged_db: &Path) -> Resolver {
        self.indexes = Some(Indexes::for_merged_db(merged_db));
        self
    }

    /// The answer of the lowers' published indexes: an entry whose path is
    /// valid in the merged store answers; one whose path is not is ignored
    /// (with one warning per entry, and `verify` lists it).
    fn published(&self, r: &FlakeRef) -> Published {
        let Some((entry, lower)) = self.indexes.as_ref().and_then(|i| i.find(&r.text)) else {
            return Published::None;
        };
        match self.lookup.layer(Path::new(&entry.path)) {
            Ok(Some(_)) => Published::Answer(Ok(Resolved {
                path: PathBuf::from(&entry.path),
                how: How::Published,
                locked: r.locked,
                valid_for: Some(self.settings.ttl),
                shared: true,
                published: Some(entry),
            })),
            Ok(None) => {
                let first = self.ignored.lock().unwrap().insert((
                    lower.clone(),
                    entry.reference.clone(),
                    entry.path.clone(),
                ));
                if first {
                    tracing::warn!(reference = %r.text, path = %entry.path, lower = %lower.display(), "published path is not valid in this store; ignoring the entry (`nixfs-layer sync` if it was published since the last sync; else the lower no longer has it: its owner publishes the reference again or runs `nixfs-layer publish --remove`; `nixfs-layer verify` lists such entries)");
                } else {
                    tracing::debug!(reference = %r.text, path = %entry.path, "published path still not valid; entry ignored");
                }
                Published::Ignored { entry, lower }
            }
            Err(e) => Published::Answer(Err(Failure::new(
                libc::EIO,
                format!("{}: {}: store database: {e}", r.text, entry.path),
            )
            .uncached())),
        }
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

    /// Results held in memory (root's and users' own).
    pub fn cached_entries(&self) -> usize {
        self.cache.lock().unwrap().len()
    }

    /// An answer for `uid` that needs no evaluation, no database and no
    /// permission check: what the FUSE loop itself may answer. None means
    /// "ask [`Self::resolve`]".
    pub fn peek(&self, r: &FlakeRef, uid: u32) -> Option<Outcome> {
        if matches!(r.source, Source::Local(_)) {
            return None;
        }
        self.cached(&(Owner::Root, r.text.clone()), r).or_else(|| {
            (uid != 0)
                .then(|| self.cached(&(Owner::Uid(uid), r.text.clone()), r))
                .flatten()
        })
    }

    /// The cached answer under `key`, if any and fresh.
    fn cached(&self, key: &Key, r: &FlakeRef) -> Option<Outcome> {
        let mut cache = self.cache.lock().unwrap();
        let e = cache.get(key)?;
        if e.unverified {
            return None;
        }
        let now = Instant::now();
        if !e.fresh(now) {
            return None;
        }
        let valid_for = e.expires.map(|t| t - now);
        Some(match &e.result {
            Ok(path) => Ok(Resolved {
                path: path.clone(),
                how: How::Cached,
                locked: r.locked,
                valid_for,
                shared: key.0 == Owner::Root,
                published: None,
            }),
            Err(f) => Err(Failure {
                repeated: true,
                ..f.clone().valid_for(valid_for.unwrap_or_default())
            }),
        })
    }

    /// Resolves `r` for `caller`, blocking until done.
    #[tracing::instrument(skip_all, fields(reference = %r.text, uid = caller.uid))]
    pub fn resolve(&self, r: &FlakeRef, caller: &Caller) -> Outcome {
        let outcome = self.resolve_inner(r, caller);
        match &outcome {
            Ok(res) => tracing::info!(path = %res.path.display(), how = ?res.how, "resolved"),
            // One line per failure: its repetitions from the cache are
            // not news.
            Err(f) if f.repeated => {
                tracing::debug!(errno = f.errno, message = %f.message, "not resolved (cached)")
            }
            Err(f) => {
                tracing::warn!(errno = f.errno, message = %f.message, "not resolved");
                self.remember_refusal(r, caller, f);
            }
        }
        outcome
    }

    /// Keeps a refusal (a failure that depends on who asked) for the uid it
    /// was given to, for `refusal-ttl`: asking again starts nothing.
    fn remember_refusal(&self, r: &FlakeRef, caller: &Caller, f: &Failure) {
        if f.cacheable || caller.uid == 0 || self.settings.refusal_ttl.is_zero() {
            return;
        }
        let key = (Owner::Uid(caller.uid), r.text.clone());
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap();
        if cache.get(&key).is_some_and(|e| e.fresh(now)) {
            return;
        }
        cache.put(
            key,
            Entry {
                result: Err(f.clone()),
                expires: Some(now + self.settings.refusal_ttl),
                unverified: false,
            },
        );
    }

    /// Whether root's rights would be lent by evaluating as root for
    /// `caller`: only a root process can lend them, to someone else.
    fn lends_rights(&self, caller: &Caller) -> bool {
        nix::unistd::geteuid().is_root() && !self.policy.evaluates_as_root(caller)
    }

    /// How to run Nix as `caller`: through the nix-daemon, if one answers.
    fn as_user(&self, r: &FlakeRef, caller: &Caller) -> Result<AsUser, Failure> {
        let socket = self
            .daemon_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/nix/var/nix/daemon-socket/socket"));
        if let Err(e) = std::os::unix::net::UnixStream::connect(&socket) {
            return Err(Failure::new(
                libc::EACCES,
                format!(
                    "{}: references of uid {} are evaluated as that user through the nix-daemon, and none answers at {} ({e}); start nix-daemon, have root resolve or publish the reference, or list the user in [flakefs] trusted-users",
                    r.text,
                    caller.uid,
                    socket.display()
                ),
            )
            .uncached());
        }
        Ok(AsUser {
            uid: caller.uid,
            gid: caller.gid,
            groups: caller.groups.clone(),
            socket,
        })
    }

    fn resolve_inner(&self, r: &FlakeRef, caller: &Caller) -> Outcome {
        self.policy.check_ref(r)?;
        // The lower owner's word: nothing of the caller's is read.
        if self.settings.resolve != ResolveMode::Evaluate {
            let ignored = match self.published(r) {
                Published::Answer(o) => return o,
                Published::Ignored { entry, lower } => Some((entry, lower)),
                Published::None => None,
            };
            if self.settings.resolve == ResolveMode::PublishedOnly {
                let message = match ignored {
                    Some((e, lower)) => format!(
                        "{}: published in {} as {}, which is not valid in this store, and this host only resolves published references ([flakefs] resolve = \"published-only\"); run `nixfs-layer sync` if it was published since the last sync, else the lower's owner publishes it again: nixfs-layer publish '{}' --into {}",
                        r.text,
                        lower.display(),
                        e.path,
                        r.text,
                        lower.display()
                    ),
                    None => format!(
                        "{}: not published in any lower of this stack, and this host only resolves published references ([flakefs] resolve = \"published-only\"); publish it on the lower's owner: nixfs-layer publish '{}' --into LOWERDIR",
                        r.text, r.text
                    ),
                };
                return Err(
                    Failure::new(libc::ENOENT, message).valid_for(self.settings.failure_ttl)
                );
            }
        }
        if let Source::Local(path) = &r.source {
            may_read(caller, path)?;
        }
        // A local flake's answer is never shared, whoever evaluated it:
        // what a caller's own files make Nix say is for that caller alone.
        let local = matches!(r.source, Source::Local(_));
        let root_key = (!local).then(|| (Owner::Root, r.text.clone()));
        if let Some(k) = &root_key {
            if let Some(o) = self.cached(k, r).or_else(|| self.verify_loaded(k, r)) {
                return o;
            }
        }
        let own = (Owner::Uid(caller.uid), r.text.clone());
        if local || caller.uid != 0 {
            if let Some(o) = self.cached(&own, r).or_else(|| self.verify_loaded(&own, r)) {
                return o;
            }
        }
        let lends = self.lends_rights(caller);
        let key = match root_key {
            Some(k) if !lends => k,
            _ => own,
        };
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    flights.insert(key.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if self.policy.may_build(caller) {
            flight.builder.lock().unwrap().get_or_insert(caller.uid);
        }
        if leader {
            // The limits first: a refused flood never reaches the daemon.
            let outcome = self
                .policy
                .take_eval(caller.uid)
                .map_err(Failure::uncached)
                .and_then(|_permit| {
                    let as_user = lends.then(|| self.as_user(r, caller)).transpose()?;
                    self.compute(r, &key, caller.uid, as_user.as_ref(), &flight)
                });
            *flight.done.lock().unwrap() = Some(outcome.clone());
            self.flights.lock().unwrap().remove(&key);
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
    fn verify_loaded(&self, key: &Key, r: &FlakeRef) -> Option<Outcome> {
        let path = {
            let mut cache = self.cache.lock().unwrap();
            let e = cache.get(key).filter(|e| e.unverified)?;
            e.result.clone().ok()?
        };
        let still_valid = matches!(self.lookup.layer(&path), Ok(Some(_)));
        let mut cache = self.cache.lock().unwrap();
        if still_valid && r.locked {
            if let Some(e) = cache.get_mut(key) {
                e.unverified = false;
            }
            Some(Ok(Resolved {
                path,
                how: How::Cached,
                locked: true,
                valid_for: None,
                shared: key.0 == Owner::Root,
                published: None,
            }))
        } else {
            cache.remove(key);
            None
        }
    }

    /// Evaluates (as `as_user`, or as root), looks the path up, builds if
    /// needed; caches what may be cached under `key`.
    fn compute(
        &self,
        r: &FlakeRef,
        key: &Key,
        leader: u32,
        as_user: Option<&AsUser>,
        flight: &Flight,
    ) -> Outcome {
        let fail = |f: Failure| {
            if f.cacheable {
                let _ = self.remember(key, r, Err(f.clone()), How::Built);
            }
            Err(self.mark(key, f).valid_for(self.settings.failure_ttl))
        };
        self.counters.evaluations.fetch_add(1, Ordering::SeqCst);
        let slots = if leader == 0 {
            &self.root_eval_slots
        } else {
            &self.eval_slots
        };
        let ev = match slots.run(|| {
            self.nix
                .eval(&r.installable(), self.settings.eval_timeout, as_user)
        }) {
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
                return Ok(self.remember(key, r, Ok(path), how).expect("success"));
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
            self.nix
                .build(&installable, self.settings.build_timeout, as_user)
        });
        match built {
            Ok(p) => {
                if p != path {
                    tracing::warn!(reference = %r.text, evaluated = %path.display(), built = %p.display(), "the reference changed between evaluation and build; using what was built");
                }
                Ok(self.remember(key, r, Ok(p), How::Built).expect("success"))
            }
            Err(e) => fail(Failure::new(
                e.errno(),
                format!("{}: build failed: {e}", r.text),
            )),
        }
    }

    /// A failure under a user's key is their word: never kept by the kernel.
    fn mark(&self, key: &Key, f: Failure) -> Failure {
        match key.0 {
            Owner::Root => f,
            Owner::Uid(_) => Failure {
                cacheable: false,
                valid_for: Duration::ZERO,
                ..f
            },
        }
    }

    /// Caches a result under `key` (successes of locked references also on
    /// disk, at most `saved-per-uid` of each user's).
    fn remember(
        &self,
        key: &Key,
        r: &FlakeRef,
        result: Result<PathBuf, Failure>,
        how: How,
    ) -> Outcome {
        let ttl = match (&result, r.locked) {
            (Err(_), _) => Some(self.settings.failure_ttl),
            (Ok(_), true) => None,
            (Ok(_), false) => Some(self.settings.ttl),
        };
        if let (Ok(path), How::Built | How::UpperHit) = (&result, how) {
            self.root(path);
        }
        if let (Ok(path), true, Some(file)) = (&result, r.locked, &self.file) {
            let uid = match key.0 {
                Owner::Root => Some(None),
                Owner::Uid(u) => {
                    let mut saved = self.saved.lock().unwrap();
                    let n = saved.entry(u).or_default();
                    (*n < self.settings.saved_per_uid).then(|| {
                        *n += 1;
                        Some(u)
                    })
                }
            };
            match uid {
                Some(uid) => {
                    if let Err(e) = file.append(uid, &r.text, path) {
                        tracing::warn!(error = %e, "could not record a locked result");
                    }
                }
                None => {
                    tracing::debug!(reference = %r.text, "not saved: the user has saved-per-uid results on disk")
                }
            }
        }
        let now = Instant::now();
        let result = result.map_err(|f| self.mark(key, f));
        self.cache.lock().unwrap().put(
            key.clone(),
            Entry {
                result: result.clone(),
                expires: ttl.map(|t| now + t),
                unverified: false,
            },
        );
        let shared = key.0 == Owner::Root;
        result.map(|path| Resolved {
            path,
            how,
            locked: r.locked,
            valid_for: if shared { ttl } else { Some(Duration::ZERO) },
            shared,
            published: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlakeFsConfig;

    fn resolver(config: &FlakeFsConfig, file: Option<CacheFile>, dir: &Path) -> Resolver {
        Resolver::new(
            Nix::default(),
            Lookup::for_target(dir),
            Policy::from_config(config).unwrap(),
            Settings::from_config(config),
            file,
        )
    }

    #[test]
    fn memory_is_bounded_and_a_users_flood_never_evicts_roots_results() {
        let t = tempfile::tempdir().unwrap();
        let config = FlakeFsConfig {
            cache_entries: Some(100),
            ..FlakeFsConfig::default()
        };
        let resolver = resolver(&config, None, t.path());
        let root = (Owner::Root, "nixpkgs#kept".to_owned());
        let kept = FlakeRef::parse("nixpkgs#kept").unwrap();
        resolver
            .remember(&root, &kept, Ok("/nix/store/kept".into()), How::UpperHit)
            .unwrap();
        for i in 0..10_000 {
            let r = FlakeRef::parse(&format!("nixpkgs#p{i}")).unwrap();
            let key = (Owner::Uid(1000 + i % 7), r.text.clone());
            let _ = resolver.remember(
                &key,
                &r,
                Err(Failure::new(libc::ENOENT, "no".into())),
                How::Built,
            );
        }
        assert_eq!(resolver.cached_entries(), 101);
        let hit = resolver.peek(&kept, 1000).unwrap().unwrap();
        assert!(hit.shared);
        assert_eq!(hit.path, Path::new("/nix/store/kept"));
    }

    #[test]
    fn a_users_results_are_theirs_alone_and_never_kept_by_the_kernel() {
        let t = tempfile::tempdir().unwrap();
        let file = CacheFile::new(&t.path().join("cache.jsonl"));
        let config = FlakeFsConfig {
            saved_per_uid: Some(2),
            ..FlakeFsConfig::default()
        };
        let resolver = resolver(&config, Some(file.clone()), t.path());
        let rev = "0".repeat(40);
        for i in 0..5 {
            let r = FlakeRef::parse(&format!("github:o/r/{rev}#p{i}")).unwrap();
            let res = resolver
                .remember(
                    &(Owner::Uid(1000), r.text.clone()),
                    &r,
                    Ok(format!("/nix/store/p{i}").into()),
                    How::LowerHit,
                )
                .unwrap();
            assert!(!res.shared);
            assert_eq!(res.valid_for, Some(Duration::ZERO));
            assert!(
                resolver.peek(&r, 1001).is_none(),
                "another user does not get it"
            );
            assert!(resolver.peek(&r, 0).is_none(), "nor does root");
            assert!(resolver.peek(&r, 1000).is_some());
        }
        let saved = file.load().unwrap();
        assert_eq!(saved.len(), 2, "saved-per-uid bounds the file: {saved:?}");
        assert!(saved.keys().all(|(uid, _)| *uid == Some(1000)));
    }
}
