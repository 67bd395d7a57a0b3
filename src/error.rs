//! The error every command returns, and the exit code each kind maps to
//! (the sysexits.h convention; 2 stays clap's for malformed arguments).

use crate::config::ConfigError;
use crate::export::{ExportError, FormatError};
use crate::flakefs::daemon::FlakeFsError;
use crate::flakefs::names::NameError;
use crate::flakefs::Failure;
use crate::gc::GcError;
use crate::layer::LayerError;
use crate::optimise::OptimiseError;
use crate::overlay::MountError;
use crate::pathdb::DbError;
use crate::promote::PromoteError;
use crate::stack::run::RunError;
use crate::storecopy::CopyError;
use crate::verify::VerifyError;

pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOINPUT: u8 = 66;
pub const EX_UNAVAILABLE: u8 = 69;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_OSERR: u8 = 71;
pub const EX_CANTCREAT: u8 = 73;
pub const EX_IOERR: u8 = 74;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_NOPERM: u8 = 77;
pub const EX_CONFIG: u8 = 78;
/// `umount`/`sync` on a target where nothing of ours is mounted.
pub const EXIT_NOT_MOUNTED: u8 = 1;
/// `verify`: problems found (or left after `--repair`).
pub const EXIT_PROBLEMS: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Optimise(#[from] OptimiseError),
    #[error(transparent)]
    Promote(#[from] PromoteError),
    #[error(transparent)]
    FlakeFs(#[from] FlakeFsError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{}", .0.message)]
    Resolve(Failure),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error on `path`; [`LayerError::Full`] when its file system is
    /// full (naming the upper that holds `path`, if one does).
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        if crate::layer::no_space(&source) {
            return Error::Layer(crate::layer::Full::of(path).into());
        }
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Verify(e) => match e {
                VerifyError::ProblemsRemain { .. } => EXIT_PROBLEMS,
                VerifyError::NoLowers { .. } => EX_NOINPUT,
                VerifyError::Db(e) => Error::db_code(e),
                VerifyError::Mount(e) => Error::mount_code(e),
                VerifyError::Layer(e) => Error::layer_code(e),
                VerifyError::Io { .. } => EX_IOERR,
            },
            Error::Gc(e) => match e {
                GcError::TargetNotNix(_) => EX_USAGE,
                GcError::Spawn { .. } => EX_UNAVAILABLE,
                GcError::Nix { .. } => EX_SOFTWARE,
                GcError::LowerChanged { .. } => EX_TEMPFAIL,
                GcError::LowerEntriesInvalid { .. } | GcError::LowerPathsDead { .. } => EX_DATAERR,
                GcError::Db(e) => Error::db_code(e),
                GcError::Io { .. } => EX_IOERR,
            },
            Error::Export(e) => match e {
                ExportError::Format {
                    source: FormatError::Io(_),
                    ..
                }
                | ExportError::Io { .. }
                | ExportError::Compress { .. } => EX_IOERR,
                ExportError::Format { .. }
                | ExportError::Decompress { .. }
                | ExportError::HashChanged { .. }
                | ExportError::MissingReference { .. }
                | ExportError::Conflict { .. } => EX_DATAERR,
                ExportError::NotValid { .. } => EX_NOINPUT,
                ExportError::TargetNotNix { .. } => EX_USAGE,
                ExportError::Spawn { .. } => EX_UNAVAILABLE,
                ExportError::Nix { .. } | ExportError::NotRegistered { .. } => EX_SOFTWARE,
                ExportError::Db(e) => Error::db_code(e),
            },
            Error::Optimise(e) => match e {
                OptimiseError::Db(e) => Error::db_code(e),
                OptimiseError::Mount(e) => Error::mount_code(e),
                OptimiseError::Remove { .. } => EX_IOERR,
            },
            Error::Promote(e) => match e {
                PromoteError::NotValid(_) => EX_NOINPUT,
                PromoteError::HashMismatch { .. } => EX_DATAERR,
                PromoteError::Sqlite { .. } => EX_SOFTWARE,
                PromoteError::Io { .. } => EX_IOERR,
                PromoteError::Copy(CopyError::Mismatch { .. }) => EX_DATAERR,
                PromoteError::Copy(_) => EX_IOERR,
                PromoteError::Db(e) => Error::db_code(e),
            },
            Error::Name(_) => EX_DATAERR,
            Error::Run(e) => match e {
                RunError::UserNsDisabled { .. } | RunError::UserNs { .. } => EX_UNAVAILABLE,
                RunError::Namespace { .. } => EX_OSERR,
                RunError::NoRoom { .. } => EX_CANTCREAT,
                RunError::Spawn { .. } => e.spawn_status().unwrap_or(EX_UNAVAILABLE),
            },
            Error::Resolve(f) => match f.errno {
                libc::ENOENT => EX_NOINPUT,
                libc::EACCES => EX_NOPERM,
                libc::EINVAL | libc::ENAMETOOLONG => EX_DATAERR,
                libc::ETIMEDOUT | libc::EAGAIN => EX_TEMPFAIL,
                _ => EX_IOERR,
            },
            Error::FlakeFs(e) => match e {
                FlakeFsError::Policy(_) => EX_CONFIG,
                FlakeFsError::Mountpoint { .. } => EX_CANTCREAT,
                FlakeFsError::AlreadyMounted(_) | FlakeFsError::DidNotStop(_) => EX_TEMPFAIL,
                FlakeFsError::Mount { .. }
                | FlakeFsError::Unmount { .. }
                | FlakeFsError::Serve { .. }
                | FlakeFsError::Spawn(_)
                | FlakeFsError::NotReady { .. } => EX_OSERR,
                FlakeFsError::Log { .. } => EX_IOERR,
            },
            Error::Config(_) => EX_CONFIG,
            Error::Usage(_) => EX_USAGE,
            Error::Io { .. } => EX_IOERR,
            Error::Layer(e) => Error::layer_code(e),
            Error::Mount(e) => Error::mount_code(e),
            Error::Db(e) => Error::db_code(e),
        }
    }

    fn layer_code(e: &LayerError) -> u8 {
        match e {
            LayerError::LowerMissing(_) | LayerError::UpperNotInitialised(_) => EX_NOINPUT,
            LayerError::LowerNoStore(_)
            | LayerError::LowerNoDb { .. }
            | LayerError::LowerSchema { .. } => EX_DATAERR,
            LayerError::UpperForeign(_) => EX_CANTCREAT,
            LayerError::LowerDbUnreadable { .. } => EX_NOPERM,
            LayerError::Io { .. } | LayerError::LowerUnreadable { .. } | LayerError::Full(_) => {
                EX_IOERR
            }
            LayerError::SameDir { .. }
            | LayerError::TargetOverlap { .. }
            | LayerError::Overlap { .. }
            | LayerError::DuplicateLower(_)
            | LayerError::UnmountablePath(_)
            | LayerError::TooManyLowers { .. }
            | LayerError::NoLower => EX_USAGE,
        }
    }

    fn mount_code(e: &MountError) -> u8 {
        match e {
            MountError::NotPermitted(_) => EX_NOPERM,
            MountError::OverlayUnavailable | MountError::SealUnsupported { .. } => EX_UNAVAILABLE,
            MountError::AlreadyMounted(..)
            | MountError::UpperInUse { .. }
            | MountError::HeldElsewhere { .. }
            | MountError::InUse { .. }
            | MountError::Busy(_)
            | MountError::ReplacedBusy { .. } => EX_TEMPFAIL,
            MountError::NotMounted(_) => EXIT_NOT_MOUNTED,
            MountError::LowerSeesTarget { .. } => EX_USAGE,
            MountError::Mount { .. } | MountError::Umount { .. } => EX_OSERR,
            MountError::Io { .. } => EX_IOERR,
        }
    }

    fn db_code(e: &DbError) -> u8 {
        match e {
            DbError::NotNixDb { .. }
            | DbError::ForeignStoreDir { .. }
            | DbError::ClosureBroken(_)
            | DbError::Damaged { .. } => EX_DATAERR,
            DbError::Unstable { .. } | DbError::NixBusy { .. } => EX_TEMPFAIL,
            DbError::Io { .. } | DbError::Full(_) => EX_IOERR,
            DbError::Sqlite { .. } => EX_SOFTWARE,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
