//! The error every command returns, and the [`Kind`] of failure each one
//! is, which alone decides the exit code (the sysexits.h convention; 2
//! stays clap's for malformed arguments). Each module's error says its
//! variants' kinds beside its definition (`kind()`), so a new variant
//! touches one file.

use crate::config::ConfigError;
use crate::export::ExportError;
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
    /// A copy `sync --lower --keep-needed` made did not check out.
    #[error("{0}; nothing was switched: run `nixfs-layer verify --check-contents`")]
    SwitchCopy(crate::storecopy::CopyError),
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

    /// What kind of failure this is; each module's error says so beside
    /// its definition.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Config(_) => Kind::Config,
            Error::Layer(e) => e.kind(),
            Error::Mount(e) => e.kind(),
            Error::Db(e) => e.kind(),
            Error::Verify(e) => e.kind(),
            Error::Gc(e) => e.kind(),
            Error::Export(e) => e.kind(),
            Error::Optimise(e) => e.kind(),
            Error::Promote(e) => e.kind(),
            Error::FlakeFs(e) => e.kind(),
            Error::Name(_) => Kind::DataErr,
            Error::Run(e) => e.kind(),
            Error::SwitchCopy(e) => e.kind(),
            Error::Resolve(f) => f.kind(),
            Error::Usage(_) => Kind::Usage,
            Error::Io { .. } => Kind::IoErr,
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.kind().code()
    }
}

/// What kind of failure an error is: the sysexits.h categories, this
/// tool's own two codes, and the status of a command `run` could not
/// start. Every module's error maps each of its variants to one
/// (`kind()` beside the definition); the exit code follows from it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `umount`, `sync`, …: nothing of nixfs-layer is mounted at the target.
    NotMounted,
    /// `verify`: problems found, or left after `--repair`.
    Problems,
    /// Missing or conflicting arguments.
    Usage,
    /// Damaged or malformed data: a database, a lower, an export.
    DataErr,
    /// Something named does not exist.
    NoInput,
    /// A facility or program is missing.
    Unavailable,
    /// An internal failure (SQLite, Nix's own commands).
    Software,
    /// A mount, unmount or namespace call failed.
    OsErr,
    /// Something cannot be created where it must be.
    CantCreat,
    /// An I/O error.
    IoErr,
    /// Busy: try again once the holder is gone.
    TempFail,
    /// Not allowed.
    NoPerm,
    /// The configuration is wrong.
    Config,
    /// `run`: the command could not be started (127 not found, 126 else).
    CommandNotStarted(u8),
}

impl Kind {
    /// The exit code (README, "Exit codes").
    pub const fn code(self) -> u8 {
        match self {
            Kind::NotMounted => EXIT_NOT_MOUNTED,
            Kind::Problems => EXIT_PROBLEMS,
            Kind::Usage => EX_USAGE,
            Kind::DataErr => EX_DATAERR,
            Kind::NoInput => EX_NOINPUT,
            Kind::Unavailable => EX_UNAVAILABLE,
            Kind::Software => EX_SOFTWARE,
            Kind::OsErr => EX_OSERR,
            Kind::CantCreat => EX_CANTCREAT,
            Kind::IoErr => EX_IOERR,
            Kind::TempFail => EX_TEMPFAIL,
            Kind::NoPerm => EX_NOPERM,
            Kind::Config => EX_CONFIG,
            Kind::CommandNotStarted(c) => c,
        }
    }

    /// The kind of a flake tree failure, by the errno its lookup answers
    /// (`resolve` exits with the code of this kind).
    pub const fn of_errno(errno: i32) -> Kind {
        match errno {
            libc::ENOENT => Kind::NoInput,
            libc::EACCES => Kind::NoPerm,
            libc::EINVAL | libc::ENAMETOOLONG => Kind::DataErr,
            libc::ETIMEDOUT | libc::EAGAIN => Kind::TempFail,
            _ => Kind::IoErr,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind, with its code: what scripts and the README rely on.
    const TABLE: &[(Kind, u8)] = &[
        (Kind::NotMounted, 1),
        (Kind::Problems, 1),
        (Kind::Usage, 64),
        (Kind::DataErr, 65),
        (Kind::NoInput, 66),
        (Kind::Unavailable, 69),
        (Kind::Software, 70),
        (Kind::OsErr, 71),
        (Kind::CantCreat, 73),
        (Kind::IoErr, 74),
        (Kind::TempFail, 75),
        (Kind::NoPerm, 77),
        (Kind::Config, 78),
        (Kind::CommandNotStarted(126), 126),
        (Kind::CommandNotStarted(127), 127),
    ];

    #[test]
    fn each_kind_has_its_exit_code() {
        for (k, code) in TABLE {
            assert_eq!(k.code(), *code, "{k:?}");
        }
    }

    #[test]
    fn the_readme_lists_every_exit_code_and_no_other() {
        let readme: std::collections::BTreeSet<u8> = crate::cmd::generate::exit_codes()
            .iter()
            .map(|(c, _)| c.parse().expect("a numeric code"))
            .collect();
        // 0 (done) and 2 (clap's malformed command line) are no kind's;
        // 126/127 are `run`'s, explained under the table.
        let kinds: std::collections::BTreeSet<u8> = TABLE
            .iter()
            .map(|(_, c)| *c)
            .filter(|c| *c < 126)
            .chain([0, 2])
            .collect();
        assert_eq!(readme, kinds);
    }

    #[test]
    fn a_flake_failure_errno_gives_resolve_its_exit_code() {
        for (errno, code) in [
            (libc::ENOENT, 66),
            (libc::EACCES, 77),
            (libc::EINVAL, 65),
            (libc::ENAMETOOLONG, 65),
            (libc::ETIMEDOUT, 75),
            (libc::EAGAIN, 75),
            (libc::EIO, 74),
        ] {
            assert_eq!(Kind::of_errno(errno).code(), code, "errno {errno}");
            let f = crate::flakefs::Failure::new(errno, "x".into());
            assert_eq!(Error::Resolve(f).exit_code(), code, "errno {errno}");
        }
    }
}
