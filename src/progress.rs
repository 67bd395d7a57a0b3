//! Progress of long operations. The library reports a stage (what, how
//! much in all, in bytes or paths) and how far it got; what draws it is
//! installed once by the command line ([`install`]): a bar on a terminal,
//! nothing otherwise (`--quiet`, a log, a pipe), so the library never
//! prints. One stage at a time; a stage ends when its [`Stage`] is dropped.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// What a stage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes read, hashed or copied.
    Bytes,
    /// Store paths handled.
    Paths,
}

/// Draws stages: implemented by the command line (see `cmd::Meter`).
pub trait Meter: Send + Sync {
    /// A stage begins: `what` it does, its `total` if known.
    fn start(&self, what: &str, total: Option<u64>, unit: Unit);
    /// `n` more units of the current stage done (from any thread).
    fn advance(&self, n: u64);
    /// The stage ended: take it off the screen.
    fn finish(&self);
}

static METER: OnceLock<Box<dyn Meter>> = OnceLock::new();

/// The unit of the stage under way: 0 none, 1 bytes, 2 paths.
static CURRENT: AtomicU8 = AtomicU8::new(0);

fn code(unit: Unit) -> u8 {
    match unit {
        Unit::Bytes => 1,
        Unit::Paths => 2,
    }
}

/// Installs what draws the stages; the first call wins.
pub fn install(meter: Box<dyn Meter>) {
    let _ = METER.set(meter);
}

/// A stage under way; drawn until dropped.
#[must_use = "the stage ends when this is dropped"]
pub struct Stage(Unit);

/// Begins a stage.
pub fn stage(what: &str, total: Option<u64>, unit: Unit) -> Stage {
    if let Some(m) = METER.get() {
        m.start(what, total, unit);
    }
    CURRENT.store(code(unit), Ordering::Relaxed);
    Stage(unit)
}

impl Stage {
    /// `n` more units done.
    pub fn advance(&self, n: u64) {
        advance(self.0, n);
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        CURRENT.store(0, Ordering::Relaxed);
        if let Some(m) = METER.get() {
            m.finish();
        }
    }
}

/// `n` more `unit`s done, counted if the stage under way counts `unit`s;
/// for code deep inside a stage that does not hold its [`Stage`] (NAR
/// hashing counts the bytes it hashed, whichever stage it serves).
pub fn advance(unit: Unit, n: u64) {
    if CURRENT.load(Ordering::Relaxed) == code(unit) {
        if let Some(m) = METER.get() {
            m.advance(n);
        }
    }
}
