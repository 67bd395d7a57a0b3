//! Man pages and completions come from the clap definitions: every
//! subcommand has a page that renders, and each shell's completion, run as
//! the shell runs it, completes subcommands, their options and values.

use std::process::Command;

use clap::CommandFactory;
use nixfs_layer::cli::Cli;

fn tool(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_nixfs-layer"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn every_subcommand_has_a_man_page_that_renders() {
    let dir = tempfile::tempdir().unwrap();
    tool(&["generate", "man", "--out", dir.path().to_str().unwrap()]);
    let cli = Cli::command();
    for sub in cli.get_subcommands() {
        let page = dir.path().join(format!("nixfs-layer-{}.1", sub.get_name()));
        assert!(page.exists(), "{}", page.display());
        let out = Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "man -l {}", page.display());
        let text = String::from_utf8_lossy(&out.stdout).replace(['\u{2010}', '\u{2212}'], "-");
        let about = sub.get_about().unwrap().to_string();
        let first_words: String = about
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            text.contains(&first_words),
            "{} says what it does ({first_words}): {text}",
            page.display()
        );
    }
    assert!(dir.path().join("nixfs-layer.1").exists());
}

fn completions(shell: &str) -> tempfile::NamedTempFile {
    let out = tool(&["generate", "completions", shell]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), out.stdout).unwrap();
    file
}

fn run_shell(shell: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(shell)
        .args(args)
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("{shell}: {e} (scripts/install-deps.sh installs it)"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{shell}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// What bash completes for `words` (the last one the word under the
/// cursor), the way readline calls it: the function `complete -p` names,
/// with COMP_WORDS, COMP_CWORD and the command, current and previous words.
/// One line per case, in order.
fn bash_complete(cases: &[&str]) -> Vec<String> {
    let file = completions("bash");
    let mut script = format!(
        "source {}\nf=$(complete -p nixfs-layer | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')\n\
         [ -n \"$f\" ] || exit 3\n\
         comp() {{ COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=(); \
         \"$f\" nixfs-layer \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
         echo \"${{COMPREPLY[*]}}\"; }}\n",
        file.path().display()
    );
    for c in cases {
        // An empty last word: the cursor after a space.
        let quoted: Vec<String> = c.split(' ').map(|w| format!("'{w}'")).collect();
        script.push_str(&format!("comp {}\n", quoted.join(" ")));
    }
    let out = run_shell("bash", &["--norc", "--noprofile", "-c"], &script);
    out.lines().map(str::to_owned).collect()
}

#[test]
fn bash_completes_subcommands_their_options_and_values() {
    let got = bash_complete(&[
        "nixfs-layer status --",
        "nixfs-layer export --compress z",
        "nixfs-layer export --compress ",
        "nixfs-layer st",
        "nixfs-layer ",
        "nixfs-layer generate completions f",
        "nixfs-layer sync --keep",
    ]);
    let status = words(&got[0]);
    for opt in ["--json", "--upper", "--target", "--config", "--help"] {
        assert!(status.contains(&opt), "status --<TAB>: {status:?}");
    }
    assert!(
        !status.contains(&"--lower"),
        "only status's own: {status:?}"
    );
    assert_eq!(words(&got[1]), ["zstd"], "export --compress z<TAB>");
    assert_eq!(
        words(&got[2]),
        ["zstd", "xz", "none"],
        "export --compress <TAB>"
    );
    assert_eq!(words(&got[3]), ["status"], "st<TAB>");
    let top = words(&got[4]);
    for sub in Cli::command().get_subcommands() {
        assert!(
            top.contains(&sub.get_name()),
            "<TAB> lacks {}: {top:?}",
            sub.get_name()
        );
    }
    assert_eq!(words(&got[5]), ["fish"], "generate completions f<TAB>");
    assert_eq!(words(&got[6]), ["--keep-needed"], "sync --keep<TAB>");
}

/// fish runs its completion engine on a command line with `complete -C`.
#[test]
fn fish_completes_subcommands_their_options_and_values() {
    let file = completions("fish");
    let script = format!(
        "source {}\ncomplete -C 'nixfs-layer status --j'\necho @@\n\
         complete -C 'nixfs-layer export --compress z'\necho @@\ncomplete -C 'nixfs-layer st'\n",
        file.path().display()
    );
    let out = run_shell("fish", &["--no-config", "-c"], &script);
    let parts: Vec<Vec<&str>> = out
        .split("@@\n")
        .map(|p| p.lines().map(|l| l.split('\t').next().unwrap()).collect())
        .collect();
    assert_eq!(
        parts,
        [vec!["--json"], vec!["zstd"], vec!["status"]],
        "{out}"
    );
}

/// zsh: the script loads into the completion system without a message and
/// registers its function for the command.
#[test]
fn zsh_loads_its_completions() {
    let file = completions("zsh");
    let script = format!(
        "autoload -U compinit && compinit -u -D && source {} && print -r -- $_comps[nixfs-layer]",
        file.path().display()
    );
    let out = run_shell("zsh", &["-f", "-c"], &script);
    assert_eq!(out.trim(), "_nixfs-layer");
}

#[test]
fn bash_parses_its_completions() {
    let file = completions("bash");
    let check = Command::new("bash")
        .arg("-n")
        .arg(file.path())
        .status()
        .unwrap();
    assert!(check.success(), "bash parses its completions");
}
