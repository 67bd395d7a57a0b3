//! docs/configuration.md against the real parser: every TOML example in it
//! parses with `Config::parse`, it documents exactly the keys the parser
//! accepts (the parser's own list, read from its unknown-field error), one
//! example sets every key, a misspelt key is refused, and the defaults it
//! states for `[flakefs]` are the ones the code applies.

use std::collections::BTreeSet;
use std::path::Path;

use nixfs_layer::config::{Config, FlakeFsConfig};
use nixfs_layer::flakefs::Settings;

const DOC: &str = "docs/configuration.md";

fn doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC)).unwrap()
}

/// The bodies of the ```toml blocks, with the line each starts on.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => {
                current = Some((n + 2, String::new()));
            }
            Some(_) if line.trim_start().starts_with("```") => {
                blocks.push(current.take().unwrap());
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "{DOC}: a ```toml block is not closed");
    blocks
}

/// The keys the parser accepts at the top level (`table == None`) or in a
/// table: serde's unknown-field error lists them.
fn parser_keys(table: Option<&str>) -> BTreeSet<String> {
    let text = match table {
        None => "nixfs-layer-no-such-key = 1\n".to_owned(),
        Some(t) => format!("[{t}]\nnixfs-layer-no-such-key = 1\n"),
    };
    let e = Config::parse(&text, Path::new("probe.toml"))
        .unwrap_err()
        .to_string();
    let list = e
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("serde lists the known fields: {e}"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Keys set in a TOML text, split into top level and `[flakefs]`.
fn keys_set(body: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let value: toml::Table = toml::from_str(body).unwrap();
    let mut top = BTreeSet::new();
    let mut flakefs = BTreeSet::new();
    for (k, v) in &value {
        top.insert(k.clone());
        if k == "flakefs" {
            flakefs.extend(v.as_table().unwrap().keys().cloned());
        }
    }
    (top, flakefs)
}

/// The key reference: the doc from "## Top level" up to "## Full example".
fn reference(text: &str) -> &str {
    let start = text
        .find("\n## Top level\n")
        .expect("a \"## Top level\" section");
    let end = text
        .find("\n## Full example\n")
        .expect("a \"## Full example\" section");
    &text[start..end]
}

/// The reference table's row for a key: the line starting with "| `key` |".
fn row<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = format!("| `{key}` |");
    reference(text).lines().find(|l| l.starts_with(&start))
}

#[test]
fn every_toml_example_in_the_doc_parses() {
    let text = doc();
    let blocks = toml_blocks(&text);
    assert!(
        blocks.len() >= 3,
        "{DOC} has its examples: {}",
        blocks.len()
    );
    for (line, body) in &blocks {
        if let Err(e) = Config::parse(body, Path::new(DOC)) {
            panic!("{DOC}, the ```toml block at line {line}: {e}\n{body}");
        }
    }
}

#[test]
fn the_doc_documents_exactly_the_keys_the_parser_accepts() {
    let text = doc();
    let top = parser_keys(None);
    let flakefs = parser_keys(Some("flakefs"));
    assert!(top.contains("lowers") && top.contains("flakefs"), "{top:?}");
    assert!(flakefs.contains("build-users"), "{flakefs:?}");

    // A row in the reference tables for every key the parser knows
    // (`flakefs` is the table itself, documented by its keys).
    for k in top.iter().filter(|k| *k != "flakefs").chain(&flakefs) {
        assert!(row(&text, k).is_some(), "{DOC} has no row for `{k}`");
    }
    // And no row for a key the parser does not know.
    for l in reference(&text).lines().filter(|l| l.starts_with("| `")) {
        let k = l.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            top.contains(k) || flakefs.contains(k),
            "{DOC} documents `{k}`, which the parser does not accept: {l}"
        );
    }

    // One example sets every key, and it parses (checked above) to values
    // that are all set.
    let full = toml_blocks(&text)
        .into_iter()
        .find(|(_, body)| keys_set(body) == (top.clone(), flakefs.clone()))
        .unwrap_or_else(|| {
            panic!("{DOC} has no example setting every key of {top:?} / {flakefs:?}")
        });
    let c = Config::parse(&full.1, Path::new(DOC)).unwrap();
    let f = &c.flakefs;
    assert!(!c.lowers.is_empty() && c.upper.is_some() && c.target.is_some());
    assert!(f.enable.is_some() && f.mountpoint.is_some());
    assert!(!f.allow.is_empty() && !f.deny.is_empty());
    assert!(!f.build_users.is_empty() && !f.build_groups.is_empty());
    assert!(f.max_parallel_builds.is_some() && f.build_timeout.is_some());
    assert!(f.eval_timeout.is_some() && f.ttl.is_some() && f.failure_ttl.is_some());
    assert!(f.builds_per_minute.is_some());
    assert!(!f.trusted_users.is_empty() && !f.trusted_groups.is_empty());
    assert!(f.evals_per_uid.is_some() && f.evals_per_minute.is_some());
    assert!(f.refusal_ttl.is_some() && f.cache_entries.is_some() && f.saved_per_uid.is_some());
}

#[test]
fn a_misspelt_key_in_the_full_example_is_refused() {
    let text = doc();
    let top = parser_keys(None);
    let flakefs = parser_keys(Some("flakefs"));
    let (line, full) = toml_blocks(&text)
        .into_iter()
        .find(|(_, body)| keys_set(body) == (top.clone(), flakefs.clone()))
        .expect("a full example");
    for key in top.iter().filter(|k| *k != "flakefs").chain(&flakefs) {
        // Misspell the key where it is set (at the start of a line).
        let wrong = format!("{key}s");
        let body: String = full
            .lines()
            .map(|l| match l.strip_prefix(key.as_str()) {
                Some(rest) if rest.trim_start().starts_with('=') => format!("{wrong}{rest}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        assert_ne!(body, full, "the example at line {line} sets `{key}`");
        let e = Config::parse(&body, Path::new(DOC))
            .expect_err(&format!("`{wrong}` is refused"))
            .to_string();
        assert!(
            e.contains(&format!("unknown field `{wrong}`")) && e.contains("(line "),
            "{e}"
        );
    }
}

#[test]
fn the_defaults_the_doc_states_are_the_codes() {
    let text = doc();
    let d = Settings::from_config(&FlakeFsConfig::default());
    for (key, default) in [
        ("ttl", d.ttl.as_secs().to_string()),
        ("failure-ttl", d.failure_ttl.as_secs().to_string()),
        ("build-timeout", d.build_timeout.as_secs().to_string()),
        ("eval-timeout", d.eval_timeout.as_secs().to_string()),
        ("max-parallel-builds", d.max_parallel_builds.to_string()),
        ("refusal-ttl", d.refusal_ttl.as_secs().to_string()),
        ("cache-entries", d.cache_entries.to_string()),
        ("saved-per-uid", d.saved_per_uid.to_string()),
        (
            "mountpoint",
            nixfs_layer::flakefs::DEFAULT_MOUNTPOINT.to_owned(),
        ),
        ("target", nixfs_layer::cmd::DEFAULT_TARGET.to_owned()),
    ] {
        let r = row(&text, key).unwrap_or_else(|| panic!("no row for `{key}`"));
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        // | key | type | default | flag | meaning |
        assert_eq!(
            cells[3].trim_matches('`'),
            default,
            "{DOC}: default of `{key}`: {r}"
        );
    }
    // The default config file the doc names is the one the code reads.
    assert!(text.contains(nixfs_layer::config::DEFAULT_CONFIG));
}
