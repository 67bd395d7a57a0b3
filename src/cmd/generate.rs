//! `nixfs-layer generate man --out DIR` and `generate completions SHELL`:
//! documentation generated from the clap definitions, so it cannot drift.
//! The main page also gets EXIT STATUS (README's exit-code table), EXAMPLES
//! (README's "Use" block), FILES and ENVIRONMENT.

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
            clap_mangen::generate_to(cmd.clone(), out).map_err(io)?;
            append_sections(&cmd, out).map_err(io)?;
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

/// The README, whose exit-code table and usage block the man page repeats.
const README: &str = include_str!("../../README.md");

/// The rows of README's "Exit codes" table: (code, meaning in Markdown).
pub fn exit_codes() -> Vec<(String, String)> {
    let section = README
        .split_once("\n## Exit codes\n")
        .expect("README has an Exit codes section")
        .1;
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and rule
        .filter_map(|l| {
            let row = l.strip_prefix("| ")?.strip_suffix(" |")?;
            let (code, meaning) = row.split_once(" | ")?;
            Some((code.trim().to_owned(), meaning.trim().to_owned()))
        })
        .collect()
}

/// README's "Use" code block, the commands in the order a user runs them.
fn usage_block() -> &'static str {
    let section = README
        .split_once("\n## Use\n")
        .expect("README has a Use section")
        .1;
    let block = section.split_once("```sh\n").expect("Use has a sh block").1;
    block.split_once("```").expect("the sh block ends").0
}

/// Text for roff: backslashes escaped, a leading '.' or '\'' kept literal.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// Markdown inline text to roff: `code` in bold.
fn roff_inline(md: &str) -> String {
    let mut out = String::new();
    for (i, part) in md.split('`').enumerate() {
        let t = roff_text(part).trim_start_matches("\\&").to_owned();
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{t}\\fR"));
        } else {
            out.push_str(&t);
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

fn tagged(roff: &mut String, tag: &str, text: &str) {
    roff.push_str(&format!(".TP\n{tag}\n{text}\n"));
}

/// The sections the main page gets beyond clap's, in roff.
pub fn extra_sections() -> String {
    let mut r = String::new();

    r.push_str(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in exit_codes() {
        tagged(&mut r, &format!("\\fB{code}\\fR"), &roff_inline(&meaning));
    }
    r.push_str(".PP\n\\fBrun\\fR exits with its command's status (128+N when signal N ended it; 127 or 126 when the command cannot be found or started), or with one of the codes above when the stack could not be set up.\n");
    r.push_str(".PP\nErrors are one line on stderr naming the path and what to do.\n");

    r.push_str(".SH EXAMPLES\n.PP\n.nf\n");
    for line in usage_block().lines() {
        r.push_str(&roff_text(line));
        r.push('\n');
    }
    r.push_str(".fi\n");

    r.push_str(".SH FILES\n");
    let target = std::path::Path::new("TARGET");
    let files: &[(String, &str)] = &[
        (
            crate::config::DEFAULT_CONFIG.to_owned(),
            "The config file, read when present and no \\fB\\-\\-config\\fR names another (every key: docs/configuration.md).",
        ),
        (
            "LOWER/store, LOWER/var/nix/db/db.sqlite".to_owned(),
            "A lower: its store and its Nix database (schema 10), never written to (but by \\fBpromote\\fR).",
        ),
        (
            "UPPER/store, UPPER/work".to_owned(),
            "The overlay's upper and work directories.",
        ),
        (
            "UPPER/var/nix/db/db.sqlite".to_owned(),
            "The merged database stock Nix uses, on TARGET/var/nix/db.",
        ),
        (
            "UPPER/nixfs\\-layer/upper.toml".to_owned(),
            "Marks the directory as an upper (\\fBinit\\fR writes it).",
        ),
        (
            "UPPER/nixfs\\-layer/mount.json".to_owned(),
            "The mount record: target, lowers and the flake tree's server, for \\fBsync\\fR, \\fBstatus\\fR and \\fBumount\\fR; also the journal of a mount, unmount or remount under way (its \\fBtransaction\\fR), finished by the next \\fBumount\\fR (a remount: \\fBsync\\fR).",
        ),
        (
            "UPPER/nixfs\\-layer/lock".to_owned(),
            "Held by \\fBmount\\fR, \\fBsync\\fR and \\fBumount\\fR: one at a time per upper.",
        ),
        (
            "UPPER/nixfs\\-layer/tmp/".to_owned(),
            "Scratch space for snapshots of the lowers' databases (on the upper's file system).",
        ),
        (
            "UPPER/nixfs\\-layer/journal.sqlite".to_owned(),
            "The upper's own registrations, from which \\fBverify \\-\\-repair\\fR rebuilds a damaged merged database.",
        ),
        (
            "UPPER/nixfs\\-layer/switch.json, UPPER/nixfs\\-layer/staging".to_owned(),
            "A \\fBsync \\-\\-keep\\-needed\\fR switch under way, finished by the next \\fBmount\\fR.",
        ),
        (
            "UPPER/nixfs\\-layer/refresh\\-pending".to_owned(),
            "A \\fBsync\\fR between its merge and the overlay's refresh; the next \\fBsync\\fR refreshes the overlay.",
        ),
        (
            "UPPER/nixfs\\-layer/optimise\\-trash".to_owned(),
            "Upper copies an \\fBoptimise\\fR run moved out of the store and has not deleted yet; the next \\fBoptimise\\fR (or \\fBmount\\fR) deletes them.",
        ),
        (
            "TARGET/var/nixfs\\-layer/flakefs\\-refreshed.PID".to_owned(),
            "How many times the flake tree server PID invalidated the kernel's entries (\\fBsync\\fR waits for its count to grow).",
        ),
        (
            "TARGET/var/nix/gcroots/nixfs\\-layer\\-lowers".to_owned(),
            "The GC root of the pin path that keeps every lower path alive for Nix's collector.",
        ),
        (
            "TARGET/var/nix/gcroots/nixfs\\-layer\\-flakes/".to_owned(),
            "GC roots of what the flake tree served from the upper.",
        ),
        (
            roff_text(&crate::flakefs::cache_file(target).display().to_string()),
            "Results of locked flake references, kept across restarts.",
        ),
        (
            roff_text(&crate::flakefs::log_file(target).display().to_string()),
            "The flake tree server's log when it runs in the background.",
        ),
        (
            "/run/nixfs\\-layer/".to_owned(),
            "Locks that let one \\fBmount\\fR at a time use a target in one mount namespace.",
        ),
    ];
    for (path, what) in files {
        tagged(&mut r, &format!("\\fI{path}\\fR"), what);
    }

    r.push_str(".SH ENVIRONMENT\n");
    tagged(
        &mut r,
        "\\fBNIXFS_LAYER_LOG\\fR",
        "A tracing filter for the log on stderr (e.g. \\fBinfo\\fR, \\fBnixfs_layer=debug\\fR); it overrides \\fB\\-v\\fR and \\fB\\-q\\fR. (\\fBRUST_LOG\\fR is not read.)",
    );
    tagged(
        &mut r,
        &format!("\\fB{}\\fR", crate::nixcli::NIX_PROGRAM_ENV),
        "The \\fBnix\\fR program the flake tree and \\fBresolve\\fR run (default: \\fBnix\\fR on PATH).",
    );
    tagged(
        &mut r,
        &format!("\\fB{}\\fR", crate::stack::run::RUN_ENV),
        "Set by \\fBrun\\fR for its command: the target of the stack its mount namespace was made for.",
    );
    tagged(
        &mut r,
        &format!("\\fB{}\\fR", crate::stack::run::RUN_NS_ENV),
        "Set by \\fBrun\\fR beside it: that mount namespace. Commands in that namespace itself (and only there) take no target lock under /run/nixfs\\-layer.",
    );
    tagged(
        &mut r,
        "\\fBNOTIFY_SOCKET\\fR",
        "Set by systemd: \\fBmount \\-\\-foreground\\fR reports readiness there (Type=notify).",
    );
    tagged(
        &mut r,
        "\\fBPATH\\fR",
        "Where \\fBnix\\-store\\fR, \\fBnix\\fR, \\fBzstd\\fR and \\fBxz\\fR are found.",
    );
    tagged(
        &mut r,
        "\\fBNIX_CONFIG\\fR and Nix's other settings",
        "Passed on to the Nix programs this tool runs.",
    );
    r
}

/// Appends [`extra_sections`] to the main page and a SEE ALSO naming it to
/// every subcommand's.
fn append_sections(cmd: &clap::Command, out: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let append = |name: &str, text: &str| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(out.join(format!("{name}.1")))?;
        f.write_all(text.as_bytes())
    };
    append(BIN, &extra_sections())?;
    fn subpages(cmd: &clap::Command, stem: &str, names: &mut Vec<String>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let name = format!("{stem}-{}", sub.get_name());
            subpages(sub, &name, names);
            names.push(name);
        }
    }
    let mut names = Vec::new();
    subpages(cmd, BIN, &mut names);
    for name in names {
        append(
            &name,
            ".SH \"SEE ALSO\"\n\\fBnixfs\\-layer\\fR(1): exit status, files, environment.\n",
        )?;
    }
    Ok(())
}
