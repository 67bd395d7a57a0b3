//! Every `--json` document the tool prints has the shape its page in docs/
//! shows: the same fields at every level, each of the documented type (a
//! field the example shows as `null` may hold anything; a field may be
//! printed as `null` only where the doc's table says so). Each command runs for real on a stack
//! of real Nix builds, in its own mount namespace; its report goes to
//! stdout, parsed whole, with nothing else there.

mod common;

use std::path::Path;

use common::hosts::BUILDS;
use common::{sh, stderr, Stack};
use serde_json::Value;

/// The ```json block under the heading of docs/`page` that names the
/// command line `heading` (the page's only block when `heading` is empty).
fn documented(page: &str, heading: &str) -> (Value, std::collections::BTreeSet<String>) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(page),
    )
    .unwrap();
    let section = if heading.is_empty() {
        text.as_str()
    } else {
        let start = text
            .lines()
            .position(|l| l.starts_with("## ") && l.contains(&format!("`nixfs-layer {heading}`")))
            .unwrap_or_else(|| panic!("docs/{page} has no heading with {heading:?}"));
        let rest: Vec<&str> = text.lines().skip(start + 1).collect();
        let end = rest
            .iter()
            .position(|l| l.starts_with("## "))
            .unwrap_or(rest.len());
        let section = rest[..end].join("\n");
        return (block(&section, page, heading), nullable(&section));
    };
    (block(section, page, heading), nullable(section))
}

/// The fields whose row in the section's tables says they may be `null`
/// (`` `a.b` `` or `` `a[].b` `` in the first column, `null` in the second).
fn nullable(section: &str) -> std::collections::BTreeSet<String> {
    section
        .lines()
        .filter_map(|l| {
            let row = l.strip_prefix("| `")?;
            let (field, rest) = row.split_once('`')?;
            rest.contains("`null`").then(|| field.to_owned())
        })
        .collect()
}

/// `.a[2].b` as the tables name it: `a[].b`.
fn table_name(at: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for c in at.trim_start_matches('.').chars() {
        match c {
            '[' => {
                out.push_str("[]");
                skip = true;
            }
            ']' => skip = false,
            _ if skip => {}
            c => out.push(c),
        }
    }
    out
}

fn block(section: &str, page: &str, heading: &str) -> Value {
    let start = section
        .find("```json\n")
        .unwrap_or_else(|| panic!("docs/{page} {heading:?}: no ```json block"))
        + 8;
    let end = start + section[start..].find("```").unwrap();
    serde_json::from_str(&section[start..end])
        .unwrap_or_else(|e| panic!("docs/{page} {heading:?}: the example is not JSON: {e}"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences between the documented shape and the printed one.
fn shape_diff(
    doc: &Value,
    got: &Value,
    at: &str,
    nullable: &std::collections::BTreeSet<String>,
    out: &mut Vec<String>,
) {
    match (doc, got) {
        (Value::Null, _) => {}
        // A table names a field by its whole path or, in a table of its
        // own (verify's categories), by its last part.
        (_, Value::Null)
            if nullable.contains(&table_name(at))
                || table_name(at)
                    .rsplit('.')
                    .next()
                    .is_some_and(|leaf| nullable.contains(leaf)) => {}
        (_, Value::Null) => out.push(format!(
            "{at}: printed null, which the doc does not allow (no `null` in its row)"
        )),
        (Value::Object(d), Value::Object(g)) => {
            for k in d.keys() {
                if !g.contains_key(k) {
                    out.push(format!("{at}.{k}: documented, not printed"));
                }
            }
            for (k, v) in g {
                match d.get(k) {
                    None => out.push(format!("{at}.{k}: printed, not documented")),
                    Some(dv) => shape_diff(dv, v, &format!("{at}.{k}"), nullable, out),
                }
            }
        }
        (Value::Array(d), Value::Array(g)) => {
            if let Some(first) = d.first() {
                for (i, v) in g.iter().enumerate() {
                    shape_diff(first, v, &format!("{at}[{i}]"), nullable, out);
                }
            }
        }
        (d, g) if kind(d) != kind(g) => out.push(format!(
            "{at}: documented as {}, printed as {}",
            kind(d),
            kind(g)
        )),
        _ => {}
    }
}

/// The arrays the run must have filled, so that their elements were checked.
fn assert_filled(got: &Value, pointers: &[&str], what: &str) {
    for p in pointers {
        let v = got
            .pointer(p)
            .unwrap_or_else(|| panic!("{what}: no {p} in {got:#}"));
        assert!(
            v.as_array().is_some_and(|a| !a.is_empty()),
            "{what}: {p} is empty, so its elements' shape went unchecked: {got:#}"
        );
    }
}

/// Runs the tool with `args`; its stdout must be one JSON document of the
/// shape docs/`page` documents under `heading`.
fn check(s: &Stack, args: &[&str], page: &str, heading: &str) -> Value {
    let out = s.w.tool(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let got: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}): {text}"));
    let mut diffs = Vec::new();
    let (doc, nullable) = documented(page, heading);
    shape_diff(&doc, &got, "", &nullable, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{args:?} against docs/{page} {heading:?}:\n{}\nprinted: {got:#}",
        diffs.join("\n")
    );
    if let Some(f) = got.get("format") {
        assert_eq!(f, 1, "{args:?}: format");
    }
    got
}

fn build_rooted(s: &Stack, attr: &str) -> String {
    let link = s.w.path(&format!("result-{attr}"));
    s.w.nix_ok(
        "nix-build",
        [
            "-o",
            link.to_str().unwrap(),
            &common::fixture("store.nix"),
            "-A",
            attr,
        ],
    )
    .trim()
    .to_owned()
}

ns_test! {
    fn every_json_report_has_the_documented_shape() {
        let s = Stack::new(&["app", "tool"]);
        let (lower, upper) = (s.lower.to_str().unwrap(), s.upper.to_str().unwrap());
        let fresh = s.w.path("upper-2");
        let got = check(&s, &["init", "--upper", fresh.to_str().unwrap(), "--json"], "json.md", "init --json");
        assert_eq!(got["created"], true);
        assert_eq!(check(&s, &["init", "--upper", fresh.to_str().unwrap(), "--json"], "json.md", "init --json")["created"], false);

        let got = check(&s, &["mount", "--no-flake-fs", "--lower", lower, "--upper", upper, "--json"], "json.md", "mount --json");
        assert_eq!(got["summary"]["added"].as_u64(), Some(s.lower_paths.len() as u64), "{got:#}");
        assert_filled(&got, &["/lowers"], "mount");

        // Upper paths: one rooted (app's closure is the lower's), one not.
        let extra = build_rooted(&s, "extra");
        let on_top = s.w.nix_ok("nix-build", ["--no-out-link", &common::fixture("store.nix"), "-A", "onTop"]);
        let on_top = on_top.trim();

        check(&s, &["status", "--json"], "status-json.md", "");
        check(&s, &["diff", "--json"], "diff-json.md", "");
        let got = check(&s, &["verify", "--json"], "verify-json.md", "");
        assert_eq!(got["clean"], true, "{got:#}");
        check(&s, &["sync", "--json"], "json.md", "sync --json");

        let got = check(&s, &["gc", "--dry-run", "--json"], "json.md", "gc --json");
        assert!(got["paths"].as_array().unwrap().iter().any(|p| p["path"] == on_top), "{got:#}");
        assert_filled(&got, &["/paths"], "gc --dry-run");

        let file = s.w.path("extra.export");
        let got = check(&s, &["export", &extra, "-o", file.to_str().unwrap(), "--json"], "json.md", "export --json");
        assert_eq!(got["paths"], serde_json::json!([extra]), "{got:#}");
        let out = s.w.tool(["export", &extra, "-o", "-", "--json"]);
        assert_eq!(out.status.code(), Some(64), "export -o - --json: {}", stderr(&out));

        let got = check(&s, &["gc", "--json"], "json.md", "gc --json");
        assert_eq!(got["dry_run"], false);
        // extra is rooted: gone only once its root is.
        std::fs::remove_file(s.w.path("result-extra")).unwrap();
        let got = check(&s, &["gc", "--json"], "json.md", "gc --json");
        assert!(got["paths"].as_array().unwrap().iter().any(|p| p["path"] == extra.as_str()), "{got:#}");
        assert!(!s.valid(&extra));

        let got = check(&s, &["import", file.to_str().unwrap(), "--json"], "json.md", "import --json");
        assert_eq!(got["imported"], serde_json::json!([extra]), "{got:#}");
        assert!(s.valid(&extra));

        check(&s, &["optimise", "--json"], "json.md", "optimise --json");

        // A lower of our own to promote into, then a switch onto it.
        let mine = s.w.path("mine");
        sh(&format!("cp -a {lower} {}", mine.display()));
        let got = check(&s, &["promote", &extra, "--into", mine.to_str().unwrap(), "--json"], "json.md", "promote --json");
        assert_eq!(got["promoted"], serde_json::json!([extra]), "{got:#}");
        let got = check(&s, &["sync", "--lower", mine.to_str().unwrap(), "--keep-needed", "--json"], "json.md", "sync --lower NEW… --json");
        assert_filled(&got, &["/lowers"], "sync --lower");
        s.umount();
    }
}

ns_test! {
    fn publish_published_and_resolve_print_their_documented_shapes() {
        let s = Stack::new(&["tool"]);
        std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
        sh(&format!("mount -t tmpfs nixfs-layer-test /run/nixfs-layer-test && touch {BUILDS}"));
        let flake = s.w.path("flake");
        std::fs::create_dir(&flake).unwrap();
        std::fs::copy(common::fixture("flake/flake.nix"), flake.join("flake.nix")).unwrap();
        let registry = s.w.path("registry.json");
        std::fs::write(&registry, serde_json::json!({"version": 2, "flakes": [
            {"from": {"type": "indirect", "id": "myflake"}, "to": {"type": "path", "path": flake}},
        ]}).to_string()).unwrap();
        *s.w.nix_conf.lock().unwrap() = format!("flake-registry = {}\n", registry.display());
        s.mount();
        let lower = s.lower.to_str().unwrap();
        let got = check(&s, &["publish", "myflake#hello", "--into", lower, "--json"], "json.md", "publish --json");
        assert_filled(&got, &["/published"], "publish");
        let published = got["published"][0]["path"].clone();
        s.w.tool_ok(["sync"]);
        let got = check(&s, &["published", "--json"], "json.md", "published --json");
        assert_eq!(got[0]["path"], published, "{got:#}");
        let got = check(&s, &["resolve", "myflake#hello", "--json"], "json.md", "resolve --json");
        assert_eq!((&got["how"], &got["path"]), (&Value::from("published"), &published), "{got:#}");
        let got = check(&s, &["publish", "myflake#hello", "--into", lower, "--remove", "--json"], "json.md", "publish --json");
        assert_eq!(got["removed"], serde_json::json!(["myflake#hello"]), "{got:#}");
        s.umount();
    }
}
