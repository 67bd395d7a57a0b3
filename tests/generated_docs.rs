//! Man pages and completions come from the clap definitions: every
//! subcommand has a page that renders, and every shell's completions know
//! every subcommand.

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

#[test]
fn completions_know_every_subcommand() {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for shell in ["bash", "zsh", "fish"] {
        let out = tool(&["generate", "completions", shell]);
        let text = String::from_utf8(out.stdout).unwrap();
        for n in &names {
            assert!(text.contains(n.as_str()), "{shell} completions lack {n}");
        }
        if shell == "bash" {
            let check = Command::new("bash")
                .args(["-n", "-c", &text])
                .status()
                .unwrap();
            assert!(check.success(), "bash parses its completions");
        }
    }
}
