//! `nixfs-layer generate man --out DIR` and `generate completions SHELL`:
//! documentation generated from the clap definitions, so it cannot drift.

use clap::CommandFactory;

use crate::cli::{Cli, GenerateCommand};
use crate::error::{Error, Result};

const BIN: &str = "nixfs-layer";

/// clap_complete's bash script tracks the subcommand typed so far in `cmd`,
/// spelling the binary's '-' as `__` (`nixfs__layer__subcmd__status`), but
/// labels the cases that complete each subcommand with the '-' spelt as its
/// subcommand separator (`nixfs__subcmd__layer__subcmd__status`): no label
/// ever matches, so no subcommand's options or values complete
/// (clap-rs/clap#6421, open in clap_complete 4.6.11). Spell the labels as
/// the state is spelt.
fn fix_bash_state_names(script: &str) -> String {
    let wrong = BIN.replace('-', "__subcmd__");
    let right = BIN.replace('-', "__");
    script.replace(&format!("{wrong}__subcmd__"), &format!("{right}__subcmd__"))
}

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
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, BIN, &mut script);
            let mut script = String::from_utf8(script).expect("clap_complete writes UTF-8");
            if *shell == clap_complete::Shell::Bash {
                script = fix_bash_state_names(&script);
            }
            std::io::Write::write_all(&mut std::io::stdout(), script.as_bytes()).map_err(
                |source| Error::Io {
                    path: "<stdout>".into(),
                    source,
                },
            )?;
        }
    }
    Ok(())
}
