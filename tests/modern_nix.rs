//! Two Nix versions on one stack: a lower written by a modern Nix (Debian
//! trixie's 2.26, run from the chroot scripts/modern-nix-chroot.sh makes)
//! merged for the host's Nix (bookworm's 2.8), and the reverse. These tests
//! pick their Nixes themselves, whatever `NIXFS_LAYER_TEST_NIX` says; the
//! chroot is built (once per machine, cached) if missing.

mod common;

use std::path::Path;

use common::{base_name, stderr, upper_entries, verify_contents_of, TestNix, World, PIN_SUFFIX};

fn modern() -> TestNix {
    TestNix::Chroot(common::modern_chroot())
}

fn version(w: &World, nix: &TestNix) -> String {
    w.nix_ok_of(nix, "nix-store", ["--version"])
        .trim()
        .to_owned()
}

/// Valid paths as `nix path-info --all` of `nix` lists them, sorted, but
/// for the pin.
fn all_paths(w: &World, nix: &TestNix) -> Vec<String> {
    let mut v: Vec<String> = w
        .nix_ok_of(nix, "nix", ["path-info", "--all"])
        .lines()
        .filter(|l| !l.ends_with(PIN_SUFFIX))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// `nix path-info --json` of `nix` for `paths`: (path, narHash, narSize,
/// references) with the hash in one spelling (2.26 prints SRI, 2.8 base32
/// with an algorithm prefix... both print `sha256-…` or `sha256:…`).
fn path_info(
    w: &World,
    nix: &TestNix,
    paths: &[String],
) -> Vec<(String, String, u64, Vec<String>)> {
    // `--all`, then filtered: 2.26 takes a `.drv` named on the command
    // line for its outputs.
    let v: serde_json::Value =
        serde_json::from_str(&w.nix_ok_of(nix, "nix", ["path-info", "--json", "--all"])).unwrap();
    // 2.8 prints a list of objects with a "path" key; 2.26 an object keyed
    // by path.
    let entries: Vec<(String, serde_json::Value)> = match v {
        serde_json::Value::Array(a) => a
            .into_iter()
            .map(|o| (o["path"].as_str().unwrap().to_owned(), o))
            .collect(),
        serde_json::Value::Object(m) => m.into_iter().collect(),
        other => panic!("unexpected path-info output {other}"),
    };
    let mut out: Vec<_> = entries
        .into_iter()
        .filter(|(p, _)| paths.contains(p))
        .map(|(p, o)| {
            let mut refs: Vec<String> = o["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let r = r.as_str().unwrap();
                    // 2.26 lists base names, 2.8 absolute paths.
                    base_name(r).to_owned()
                })
                .filter(|r| !r.ends_with(PIN_SUFFIX))
                .collect();
            refs.sort();
            (
                p,
                sri_sha256(o["narHash"].as_str().unwrap()),
                o["narSize"].as_u64().unwrap(),
                refs,
            )
        })
        .collect();
    out.sort();
    out
}

/// A narHash in one form: `sha256:<nixbase32>` as Nix 2.8 prints it, via
/// `nix hash to-base32` would need a Nix; the SRI form is decoded here.
fn sri_sha256(h: &str) -> String {
    use base64::Engine;
    if let Some(b64) = h.strip_prefix("sha256-") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        return format!("sha256:{}", nixbase32(&raw));
    }
    h.to_owned()
}

fn nixbase32(bytes: &[u8]) -> String {
    const CHARS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = (bytes.len() * 8).div_ceil(5);
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let c = (bytes[i] as u16 >> j)
            | if i + 1 < bytes.len() {
                (bytes[i + 1] as u16) << (8 - j)
            } else {
                0
            };
        s.push(CHARS[(c & 0x1f) as usize] as char);
    }
    s
}

fn tables(db: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut s = c
        .prepare("select name from sqlite_master where type = 'table' order by name")
        .unwrap();
    s.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// One direction: `writer` builds a lower (app, tool, and their .drvs),
/// the tool stacks it under a fresh upper, and `user` works on the merged
/// store: lists, checks, builds on top, collects garbage. Then the other
/// Nix checks the same merged store, and a remount (re-merging the lower
/// into the upper's database `user` has written to) keeps it all.
fn round_trip(writer: &TestNix, user: &TestNix) {
    let w = World::new();
    eprintln!(
        "lower written by {}, merged store used by {}",
        version(&w, writer),
        version(&w, user)
    );
    let lower = w.path("lower");
    let (built, lower_paths) = w.with_nix_at(&lower, || {
        let built = w.build_of(writer, &["app", "tool"]);
        verify_contents_of(&w, writer);
        (built, all_paths(&w, writer))
    });
    assert!(
        lower_paths.len() >= 8,
        "outputs and .drv files: {lower_paths:?}"
    );
    let lower_info = w.with_nix_at(&lower, || path_info(&w, writer, &lower_paths));
    let lower_tables = tables(&lower.join("var/nix/db/db.sqlite"));
    eprintln!("lower database tables: {lower_tables:?}");

    let upper = w.path("upper");
    w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
    let mount = || {
        let out = w
            .tool_command()
            .args(["mount", "--lower", lower.to_str().unwrap()])
            .args(["--upper", upper.to_str().unwrap(), "--no-flake-fs"])
            .env("NIXFS_LAYER_LOG", "nixfs_layer=info")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
        stderr(&out)
    };
    // Either Nix's database (2.26's has a SchemaMigrations table) takes the
    // fast first merge: it becomes the merged database as it is.
    let log = mount();
    assert!(log.contains("by adopting the lower's database"), "{log}");
    assert!(!log.contains("row by row"), "{log}");
    let merged_tables = tables(&upper.join("var/nix/db/db.sqlite"));
    for t in &lower_tables {
        assert!(
            merged_tables.contains(t),
            "{t} of the lower is kept: {merged_tables:?}"
        );
    }

    // What the user's Nix sees: every lower path, as the writer recorded it.
    assert_eq!(all_paths(&w, user), lower_paths);
    assert_eq!(path_info(&w, user, &lower_paths), lower_info);
    verify_contents_of(&w, user);
    let app = built.iter().find(|p| p.ends_with("-app")).unwrap();
    assert_eq!(common::sh(&format!("{app}/bin/app")), "hello from app\n");

    // A build on top lands in the upper, referring to lower paths.
    let on_top = w.build_of(user, &["onTop"]).remove(0);
    assert!(upper.join("store").join(base_name(&on_top)).is_dir());
    assert!(!lower.join("store").join(base_name(&on_top)).exists());
    verify_contents_of(&w, user);

    // Unrooted, it is garbage; the lower paths are not.
    w.nix_ok_of(user, "nix-collect-garbage", ["-d"]);
    assert!(!w.valid_of(user, &on_top), "{on_top} was collected");
    assert_eq!(
        all_paths(&w, user),
        lower_paths,
        "lower paths survive the collector"
    );
    assert!(
        upper_entries(&upper).is_empty(),
        "the collector left nothing (no whiteout) in the upper: {:?}",
        upper_entries(&upper)
    );
    verify_contents_of(&w, user);

    // Built again and kept by a root, then checked by the writer's Nix too:
    // the merged database as the user's Nix left it is one both accept.
    let link = w.path("result");
    let on_top = w
        .nix_ok_of(
            user,
            "nix-build",
            [
                "-o",
                link.to_str().unwrap(),
                &common::fixture("store.nix"),
                "-A",
                "onTop",
            ],
        )
        .trim()
        .to_owned();
    let mut everything = lower_paths.clone();
    everything.push(on_top.clone());
    everything.extend(
        w.nix_ok_of(user, "nix-store", ["-q", "--deriver", &on_top])
            .lines()
            .map(str::to_owned),
    );
    everything.sort();
    assert_eq!(all_paths(&w, user), everything);
    assert_eq!(all_paths(&w, writer), everything);
    assert_eq!(
        path_info(&w, writer, &everything),
        path_info(&w, user, &everything)
    );
    verify_contents_of(&w, writer);
    eprintln!(
        "merged database tables after both: {:?}",
        tables(&upper.join("var/nix/db/db.sqlite"))
    );

    // The tool's own view agrees, and a remount re-merges cleanly.
    let out = w.tool(["verify", "--check-contents"]);
    assert!(out.status.success(), "verify: {}", stderr(&out));
    w.tool_ok(["umount"]);
    mount();
    let out = w.tool_ok(["sync", "--force"]);
    assert!(out.starts_with("sync: added 0, removed 0"), "{out}");
    for nix in [user, writer] {
        assert_eq!(all_paths(&w, nix), everything, "{nix:?} after a remount");
        verify_contents_of(&w, nix);
        w.nix_ok_of(nix, "nix-collect-garbage", ["-d"]);
        assert_eq!(
            all_paths(&w, nix),
            everything,
            "{nix:?}: the root keeps {on_top}"
        );
    }
    std::fs::remove_file(&link).unwrap();
    w.nix_ok_of(user, "nix-collect-garbage", ["-d"]);
    assert_eq!(all_paths(&w, writer), lower_paths);
    assert!(
        upper_entries(&upper).is_empty(),
        "{:?}",
        upper_entries(&upper)
    );
}

ns_test! {
    fn a_lower_written_by_modern_nix_serves_nix_2_8() {
        round_trip(&modern(), &TestNix::Host);
    }
}

ns_test! {
    fn a_lower_written_by_nix_2_8_serves_modern_nix() {
        round_trip(&TestNix::Host, &modern());
    }
}

// Nix's own `local-overlay` store (experimental, Nix ≥ 2.22) pointed at
// the overlayfs this tool mounts, with a state directory of its own: what
// works and where it parts from the merged database. See
// docs/local-overlay.md.
ns_test! {
    fn nix_local_overlay_store_over_our_mount() {
        let nix = modern();
        let w = World::new();
        w.features.lock().unwrap().push_str("local-overlay-store read-only-local-store");
        let lower = w.path("lower");
        let built = w.with_nix_at(&lower, || w.build_of(&nix, &["app", "tool"]));
        let lower_paths = w.with_nix_at(&lower, || all_paths(&w, &nix));
        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        w.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap(), "--no-flake-fs"]);
        let pin = common::entries(&upper.join("store")).into_iter().find(|e| e.ends_with(PIN_SUFFIX)).unwrap();

        let state = w.path("local-overlay-state");
        std::fs::create_dir_all(&state).unwrap();
        let store_uri = |lower: &Path, check_mount: bool| {
            let lower_store = format!(
                "local?real={}/store&state={}/var/nix&read-only=true",
                lower.display(),
                lower.display()
            );
            let enc: String = lower_store
                .chars()
                .map(|c| match c {
                    '?' => "%3F".to_owned(),
                    '&' => "%26".to_owned(),
                    '=' => "%3D".to_owned(),
                    c => c.to_string(),
                })
                .collect();
            format!(
                "local-overlay://?state={}&lower-store={enc}&upper-layer={}/store&check-mount={check_mount}",
                state.display(),
                upper.display()
            )
        };
        let run = |uri: &str, program: &str, args: &[&str]| {
            w.nix_of(&nix, program).args(["--store", uri]).args(args).output().unwrap()
        };

        // check-mount looks for a mount whose source is "overlay"; ours is
        // "nixfs-layer", so the check refuses it.
        let out = run(&store_uri(&lower, true), "nix", &["path-info", "--all"]);
        assert!(!out.status.success() && stderr(&out).contains("mounted incorrectly"), "{}", stderr(&out));

        let uri = store_uri(&lower, false);
        // Lower paths are valid (looked up in the lower's own database).
        // `--all` does not list them all (seen: none, or 3 of 9), so it is
        // only printed.
        let mut args = vec!["path-info"];
        args.extend(lower_paths.iter().filter(|p| !p.ends_with(".drv")).map(String::as_str));
        let out = run(&uri, "nix", &args);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = run(&uri, "nix", &["path-info", "--all"]);
        eprintln!("local-overlay path-info --all: {:?}", String::from_utf8_lossy(&out.stdout));
        let out = run(&uri, "nix-store", &["--verify", "--check-contents"]);
        assert!(out.status.success(), "{}", stderr(&out));

        // A build lands in the upper layer, registered in its own database
        // only: the merged database (what 2.8 and a plain 2.26 read) does
        // not know it.
        let out = run(&uri, "nix-build", &["--no-out-link", &common::fixture("store.nix"), "-A", "onTop"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let on_top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(upper.join("store").join(base_name(&on_top)).is_dir());
        assert!(!w.valid_of(&TestNix::Host, &on_top), "the merged database does not have {on_top}");

        // Its collector, with nothing rooted: the lower's files stay (no
        // whiteouts), but the pin of the merged database is deleted from
        // the upper (it is not valid in local-overlay's database).
        let out = run(&uri, "nix-collect-garbage", &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!upper.join("store").join(&pin).exists(), "local-overlay's GC deleted the pin");
        assert!(upper_entries(&upper).is_empty(), "{:?}", common::entries(&upper.join("store")));
        for p in &built {
            assert!(lower.join("store").join(base_name(p)).exists());
        }
        let out = run(&uri, "nix", &["path-info", "--all"]);
        eprintln!(
            "local-overlay path-info --all after its GC: {:?} (stderr: {})",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        // This tool's verify notices the missing pin: valid in the merged
        // database, absent from the upper (docs/verify-json.md).
        let out = w.tool(["verify", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "verify notices the pin is gone: {text}{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["clean"], false, "{v}");
        assert_eq!(v["problems"], 1, "the only problem: {v}");
        let missing = v["categories"]["missing_content"].as_array().unwrap();
        assert_eq!(
            missing.as_slice(),
            [serde_json::json!({"path": format!("/nix/store/{pin}"), "layer": "upper", "reason": "absent"})],
            "{v}"
        );

        // A lower written by Nix 2.8 has no SchemaMigrations table; 2.26
        // wants to create it and cannot in a read-only lower store.
        let old_lower = w.path("old-lower");
        w.with_nix_at(&old_lower, || w.build_of(&TestNix::Host, &["tool"]));
        let out = run(&store_uri(&old_lower, false), "nix", &["path-info", "--all"]);
        assert!(!out.status.success() && stderr(&out).contains("readonly database"), "{}", stderr(&out));
    }
}
