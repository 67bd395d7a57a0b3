use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    // fuser warns when the session it ends finds its mount gone, which is
    // every clean stop (`umount` unmounted the tree first): its only
    // warning, so that module logs errors only.
    let default_filter = format!("{default_level},fuser::session=error");
    // `resolve` prints its failure as the error message: the resolver's log
    // line for it (the flake tree server's record) would say it twice.
    let resolve = matches!(cli.command, Command::Resolve(_));
    let not_resolved = tracing_subscriber::filter::filter_fn(move |meta| {
        !(resolve
            && meta.is_event()
            && meta.target() == "nixfs_layer::flakefs::resolver"
            && meta.fields().field("errno").is_some())
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Plain text when stderr is a log (journald), colours on a terminal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                // One filter: nested per-layer filters drop the first
                // event of some callsites.
                .with_filter(
                    EnvFilter::try_from_env("NIXFS_LAYER_LOG")
                        .unwrap_or_else(|_| EnvFilter::new(&default_filter))
                        .and(not_resolved),
                ),
        )
        .init();

    cmd::install_meter(cli.quiet);
    let result = match &cli.command {
        Command::Init(a) => cmd::init::run(a),
        Command::Mount(a) => cmd::mount::run(a, cli.quiet),
        Command::Umount(a) => cmd::umount::run(a),
        Command::Run(a) => match cmd::run::run(a, cli.quiet) {
            Ok(status) => return ExitCode::from(status),
            Err(e) => Err(e),
        },
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
        Command::Publish(a) => cmd::publish::run(a),
        Command::Published(a) => cmd::publish::list(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixfs-layer: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
