use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use nixfs_layer::cli::{Cli, Command};
use nixfs_layer::cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("NIXFS_LAYER_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Plain text when stderr is a log (journald), colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match &cli.command {
        Command::Init(a) => cmd::init::run(a),
        Command::Mount(a) => cmd::mount::run(a, cli.quiet),
        Command::Umount(a) => cmd::umount::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Sync(a) => cmd::sync::run(a, cli.quiet),
        Command::Flakefs(a) => cmd::flakefs::run(a),
        Command::Resolve(a) => cmd::resolve::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Gc(a) => cmd::gc::run(a),
        Command::Generate(g) => cmd::generate::run(g),
        Command::Diff(a) => cmd::diff::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Optimise(a) => cmd::optimise::run(a),
        Command::Promote(a) => cmd::promote::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixfs-layer: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
