//! nixfs-layer: read-only lower Nix stores under a writable upper, combined
//! with kernel overlayfs and a merged Nix path database.
//!
//! Data flows one way: `cli`/`config` → `stack` (the layers the user named,
//! their layout, provenance) → `pathdb` (merge the lowers' databases into
//! the upper's) → `overlay` (mount), driven by `stack::lifecycle`. `cmd`
//! holds one module per subcommand, parsing and printing. `flakefs` serves the
//! `/nixfs/flake` tree on top, running Nix through `nixcli`.

pub mod cli;
pub mod closure;
pub mod cmd;
pub mod config;
pub mod error;
pub mod export;
pub mod failpoint;
pub mod flakefs;
pub mod gc;
pub mod gcroots;
pub mod nar;
pub mod nixcli;
pub mod optimise;
pub mod overlay;
pub mod pathdb;
pub mod progress;
pub mod promote;
pub mod published;
pub mod refscan;
pub mod sdnotify;
pub mod stack;
pub mod storecopy;
pub mod storepath;
#[cfg(feature = "testing")]
pub mod synth;
pub mod verify;

/// The layers' own checks and layout, part of the stack model.
pub use stack::layer;
