//! `nixfs-layer generate man --out DIR` and `generate completions SHELL`:
//! documentation generated from the clap definitions, so it cannot drift.

use clap::CommandFactory;

use crate::cli::{Cli, GenerateCommand};
use crate::error::{Error, Result};

pub fn run(what: &GenerateCommand) -> Result<()> {
    let mut cmd = Cli::command();
    match what {
        GenerateCommand::Man { out } => {
            let io = |source| Error::Io {
                path: out.clone(),
                source,
            };
            std::fs::create_dir_all(out).map_err(io)?;
            clap_mangen::generate_to(cmd, out).map_err(io)?;
        }
        GenerateCommand::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "nixfs-layer", &mut std::io::stdout());
        }
    }
    Ok(())
}
