//! Command-line definitions. The names here are relied on by scripts,
//! the NixOS module and the docs: change them only with care.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nixfs-layer",
    version,
    about = "Stack read-only lower Nix stores under a writable upper",
    long_about = "Stack read-only lower Nix stores (a template VM's /nix, a shared NFS /nix) under a \
                  writable upper with kernel overlayfs and a merged Nix path database, so stock Nix \
                  sees every lower path as valid and builds land only in the upper."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); NIXFS_LAYER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an upper layer: store, overlay work dir, Nix state with a fresh database.
    Init(InitArgs),
    /// Mount lowers and an upper as one Nix store at the target.
    Mount(MountArgs),
    /// Unmount what `mount` mounted at the target, all of it or nothing.
    Umount(UmountArgs),
    /// Run a command with the stack mounted at the target in a mount
    /// namespace of its own; no root needed (a user namespace then).
    Run(RunArgs),
    /// Show whether the target is mounted and what each layer holds.
    Status(StatusArgs),
    /// Re-read the lower databases and apply what changed to the merged database.
    Sync(SyncArgs),
    /// Serve the /nixfs/flake tree over an existing store (`mount` does this itself).
    Flakefs(FlakeFsArgs),
    /// Print the store path a flake reference resolves to, as /nixfs/flake does.
    Resolve(ResolveArgs),
    /// Check the merged database against every layer's store, and the
    /// lowers' published references against the merged store; optionally repair.
    Verify(VerifyArgs),
    /// Free the upper's unreachable paths with Nix's own collector (never a lower path).
    Gc(GcArgs),
    /// Write the man pages or a shell's completions (for packaging).
    #[command(subcommand)]
    Generate(GenerateCommand),
    /// List the paths only the upper has, with the GC roots that hold them.
    Diff(DiffArgs),
    /// Write closures of upper paths in the format `nix-store --import` reads.
    Export(ExportArgs),
    /// Import a `nixfs-layer export` or `nix-store --export` file into the mounted stack.
    Import(ImportArgs),
    /// Drop the upper's copies of paths a lower has with the same contents.
    Optimise(OptimiseArgs),
    /// Copy closures of upper paths into a lower you own and register them there.
    Promote(PromoteArgs),
    /// Publish flake references into a lower you own: their closures and
    /// an index every host reads offline, evaluated and built here.
    Publish(PublishArgs),
    /// List the flake references a lower (or every lower of the stack)
    /// publishes.
    Published(PublishedArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// TOML config file with the same settings as the flags (flags win);
    /// /etc/nixfs-layer/config.toml is read when present.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for the upper layer (created if missing).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// A lower Nix root (holding store/ and var/nix/db/); repeat for more, first on top.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// The upper made by `nixfs-layer init`.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Where the merged store appears: TARGET/store and TARGET/var [default: /nix].
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Do not serve the /nixfs/flake tree.
    #[arg(long)]
    pub no_flake_fs: bool,
    /// Where the flake tree is mounted (created if missing) [default: /nixfs].
    #[arg(long, value_name = "DIR", conflicts_with = "no_flake_fs")]
    pub flake_mount: Option<PathBuf>,
    /// Stay in the foreground until SIGTERM/SIGINT or `umount`, serving the
    /// flake tree from this process; reports readiness to systemd
    /// (Type=notify) and unmounts everything when stopped.
    #[arg(long)]
    pub foreground: bool,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A lower Nix root (holding store/ and var/nix/db/); repeat for more, first on top.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// The upper made by `nixfs-layer init` (yours, for an unprivileged run).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Where the merged store appears inside: TARGET/store and TARGET/var
    /// [default: /nix]; made in a private root when the host lacks it.
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Do not serve the /nixfs/flake tree.
    #[arg(long)]
    pub no_flake_fs: bool,
    /// Where the flake tree is mounted inside [default: /nixfs].
    #[arg(long, value_name = "DIR", conflicts_with = "no_flake_fs")]
    pub flake_mount: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// The command and its arguments (after `--`), e.g. `bash` for a shell;
    /// its exit status is run's (128+N when killed by signal N).
    #[arg(value_name = "CMD", required = true, num_args = 1.., last = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct FlakeFsArgs {
    /// Where the tree is mounted (created if missing) [default: /nixfs].
    #[arg(long, value_name = "DIR")]
    pub mountpoint: Option<PathBuf>,
    /// The store the tree resolves into (its TARGET/var/nix/db) [default: /nix].
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Stay in the foreground (else: return once the tree is mounted; stop
    /// it by unmounting the mount point).
    #[arg(long)]
    pub foreground: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// A flake reference, as under /nixfs/flake/str (e.g. nixpkgs#hello^dev).
    #[arg(value_name = "FLAKEREF")]
    pub reference: String,
    /// Print a JSON object: ref, path, how (lower-hit, upper-hit, built, cached, published), locked, and the published entry if any (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The mount's target [default: /nix].
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// While processes still use the stack (a running build), wait up to
    /// this many seconds for them to end instead of refusing at once.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The upper to report on when nothing is mounted.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Machine-readable output (see docs/status-json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Re-read every lower, even those whose database has not changed.
    #[arg(long)]
    pub force: bool,
    /// Switch to these lowers (a new generation; repeat for several, first
    /// on top): the stack is remounted with them.
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<std::path::PathBuf>,
    /// With --lower: first copy into the upper the paths its own paths and
    /// GC roots need that the new lowers lack (else the switch is refused).
    #[arg(long, requires = "lowers")]
    pub keep_needed: bool,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The upper to verify when nothing is mounted at the target.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Also hash every valid path and compare with its recorded narHash.
    #[arg(long)]
    pub check_contents: bool,
    /// Fix what needs no network: whiteouts over lower paths, upper
    /// duplicates of lower paths, unregistered upper paths, partial upper
    /// entries an interrupted import left; rebuild a damaged merged database
    /// from the layers (with no Nix process running on the store).
    #[arg(long)]
    pub repair: bool,
    /// Machine-readable output (see docs/verify-json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// List the unreachable upper paths; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after freeing this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_freed: Option<u64>,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Man pages: nixfs-layer.1 and one nixfs-layer-<command>.1 per subcommand.
    Man {
        /// Directory to write them to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Completions for a shell, on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Machine-readable output (see docs/diff-json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Store paths (or links to them) whose closures to export [default:
    /// the closures of every GC root of the upper].
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// The file to write ("-" for stdout); written under a temporary name
    /// and renamed when complete.
    #[arg(short, long, value_name = "FILE")]
    pub output: std::path::PathBuf,
    /// Compress through the `zstd` or `xz` program.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: crate::export::Compression,
    /// Also export the paths the lowers have (for a machine without them).
    #[arg(long)]
    pub full: bool,
    /// Machine-readable output on stdout (see docs/json.md); not with `-o -`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An export file, plain or compressed with zstd or xz.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct OptimiseArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Machine-readable output: the dropped and kept paths, bytes freed (see docs/json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Store paths (or links to them) whose closures to promote.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,
    /// The lower (a Nix root holding store/ and var/nix/db/) to copy them
    /// into; you must own it (the template, the NFS publisher).
    #[arg(long, value_name = "LOWERDIR")]
    pub into: PathBuf,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Flake references as readers will type them (e.g. myenvs#python,
    /// nixpkgs#hello^dev); the text is the key.
    #[arg(value_name = "FLAKEREF", required = true)]
    pub refs: Vec<String>,
    /// The lower (a Nix root you own) to publish into.
    #[arg(long, value_name = "LOWERDIR")]
    pub into: PathBuf,
    /// Drop these references from the index instead (their paths stay).
    #[arg(long)]
    pub remove: bool,
    /// Machine-readable output on stdout (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, Args)]
pub struct PublishedArgs {
    /// Only this lower's index [default: every lower of the mounted stack, top first].
    #[arg(long, value_name = "DIR")]
    pub lower: Option<PathBuf>,
    /// Print a JSON array of {ref, path, output, locked, system, time, lower} (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}
