//! Man pages and completions come from the clap definitions: every
//! subcommand has a page that renders, and each shell's completion, run as
//! the shell runs it (bash: its function with COMP_WORDS; fish: complete
//! -C; zsh: a line typed with TAB on a pseudo-terminal), completes
//! subcommands, their options and values.

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

/// Types a line and TAB into an interactive zsh (on a pseudo-terminal,
/// zsh/zpty) whose fpath holds the completions, and waits up to 15 s for
/// `want` on its screen: "ok", or what the screen showed.
const ZSH_TYPE: &str = r#"
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='>'; fpath=($1 \$fpath); autoload -U compinit; compinit -u -D"
zpty -w -n z "$2"$'\t'
out=
integer deadline=$(( SECONDS + 15 ))
while (( SECONDS < deadline )); do
  if zpty -r -t z chunk; then out+=$chunk; else sleep 0.1; fi
  [[ $out == *"$3"* ]] && break
done
zpty -d z
[[ $out == *"$3"* ]] && print ok || print -r -- "$out"
"#;

#[test]
fn zsh_completes_subcommands_their_options_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = tool(&["generate", "completions", "zsh"]);
    std::fs::write(dir.path().join("_nixfs-layer"), out.stdout).unwrap();
    for (typed, want) in [
        ("nixfs-layer status --j", "--json"),
        ("nixfs-layer export --compress z", "--compress zstd"),
        ("nixfs-layer st", "nixfs-layer status"),
    ] {
        let out = Command::new("zsh")
            .args(["-f", "-c", ZSH_TYPE, "zsh"])
            .arg(dir.path())
            .args([typed, want])
            .output()
            .unwrap();
        let screen = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            screen.trim(),
            "ok",
            "{typed}<TAB> shows no {want}: {screen:?}"
        );
    }
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

/// The main page, rendered by man as plain text.
fn main_page() -> String {
    let dir = tempfile::tempdir().unwrap();
    tool(&["generate", "man", "--out", dir.path().to_str().unwrap()]);
    let out = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("nixfs-layer.1"))
        .env("MANWIDTH", "2000")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Without a terminal man still overstrikes bold ("b\x08b"): keep the
    // character that stays.
    let raw = String::from_utf8_lossy(&out.stdout);
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
            continue;
        }
        text.push(c);
    }
    text.replace(['\u{2010}', '\u{2212}'], "-")
}

/// The lines of `page`'s section `name` (up to the next heading).
fn section<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = page.lines().skip_while(|l| *l != name);
    assert!(lines.next().is_some(), "the page has {name}: {page}");
    lines
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

fn repo_file(p: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap()
}

/// README's exit-code table: (code, meaning), in order.
fn readme_exit_codes() -> Vec<(String, String)> {
    let readme = repo_file("README.md");
    let table = readme.split_once("\n## Exit codes\n").unwrap().1;
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').splitn(2, '|').collect();
            (
                cells[0].trim().to_owned(),
                cells[1].trim().trim_end_matches('|').trim().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_main_page_has_exit_status_examples_files_and_environment() {
    let page = main_page();
    for s in ["EXIT STATUS", "EXAMPLES", "FILES", "ENVIRONMENT"] {
        assert!(!section(&page, s).is_empty(), "{s} is empty: {page}");
    }

    // EXIT STATUS lists README's codes, in its order, with its words.
    let readme = readme_exit_codes();
    let exit = section(&page, "EXIT STATUS");
    let codes: Vec<&str> = exit
        .iter()
        .filter_map(|l| {
            let t = l.trim_start();
            let code = t.split_whitespace().next()?;
            (code.parse::<u8>().is_ok() && l.len() - t.len() <= 8).then_some(code)
        })
        .collect();
    let want: Vec<&str> = readme.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, want, "{exit:#?}");
    let text = exit
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (code, meaning) in &readme {
        let plain = meaning.replace('`', "");
        assert!(
            text.contains(&format!("{code} {plain}")),
            "{code}: {plain} in {text}"
        );
    }

    // …and README's table has every code src/error.rs defines, and 0 and 2.
    let mut defined: Vec<String> = repo_file("src/error.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("pub const ")?.split_once(": u8 = "))
        .map(|(_, v)| v.trim_end_matches(';').to_owned())
        .chain(["0".to_owned(), "2".to_owned()])
        .collect();
    defined.sort_by_key(|c| c.parse::<u8>().unwrap());
    defined.dedup();
    assert_eq!(want, defined, "README's exit codes are src/error.rs's");

    // EXAMPLES: every subcommand that reports or changes something appears.
    let examples = section(&page, "EXAMPLES").join("\n");
    for sub in [
        "init", "mount", "sync", "status", "verify", "gc", "export", "import", "umount",
    ] {
        assert!(
            examples.contains(&format!("nixfs-layer {sub}")),
            "{sub}: {examples}"
        );
    }

    // FILES: the config file, the flake tree's files and every file the
    // tool keeps in an upper's nixfs-layer/ (as the source names them).
    let files = section(&page, "FILES").join("\n");
    let target = std::path::Path::new("TARGET");
    let mut want_files = vec![
        nixfs_layer::config::DEFAULT_CONFIG.to_owned(),
        nixfs_layer::flakefs::cache_file(target)
            .display()
            .to_string(),
        nixfs_layer::flakefs::log_file(target).display().to_string(),
        "UPPER/nixfs-layer/upper.toml".to_owned(),
        "UPPER/var/nix/db/db.sqlite".to_owned(),
        "/run/nixfs-layer".to_owned(),
    ];
    for f in walkdir::WalkDir::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
        let f = f.unwrap();
        if f.path().extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(f.path()).unwrap();
        for part in text.split("tool_dir().join(\"").skip(1) {
            let name = part.split('"').next().unwrap();
            want_files.push(format!("UPPER/nixfs-layer/{name}"));
        }
    }
    assert!(want_files.len() > 10, "{want_files:?}");
    for f in &want_files {
        assert!(files.contains(f.as_str()), "FILES lacks {f}: {files}");
    }

    // ENVIRONMENT: every NIXFS_LAYER_* variable the tool reads but the
    // test suite's failpoint.
    let env = section(&page, "ENVIRONMENT").join("\n");
    let mut vars = Vec::new();
    for f in walkdir::WalkDir::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
        let f = f.unwrap();
        if f.path().extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(f.path()).unwrap();
        for part in text.split("\"NIXFS_LAYER_").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            vars.push(format!("NIXFS_LAYER_{name}"));
        }
    }
    vars.retain(|v| v != "NIXFS_LAYER_KILL_AT");
    assert!(vars.len() >= 2, "{vars:?}");
    for v in vars.iter().chain(&["NOTIFY_SOCKET".to_owned()]) {
        assert!(env.contains(v.as_str()), "ENVIRONMENT lacks {v}: {env}");
    }
}
