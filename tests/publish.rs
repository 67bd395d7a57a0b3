//! Fleet flake resolution: the lower's owner publishes flake references
//! (git flakes with an input, made here), and executors whose HOME is fresh
//! and who cannot reach the flakes' repositories resolve them through the
//! tree with no Nix process at all. Real Nix, real overlay and FUSE mounts,
//! each test in its own mount and PID namespace.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use common::hosts::BUILDS;
use common::{sh, stderr, upper_entries, World, FLAKE_MOUNT};

struct Fleet {
    w: World,
    lower: PathBuf,
    publisher: PathBuf,
    app: PathBuf,
    dep: PathBuf,
    /// Every `nix` the tool runs, one line each.
    nix_log: PathBuf,
}

fn git(dir: &Path, args: &str) -> String {
    sh(&format!(
        "cd {} && git -c user.email=t@t -c user.name=t {args}",
        dir.display()
    ))
}

fn setup() -> Fleet {
    let w = World::new();
    std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
    sh(&format!(
        "mount -t tmpfs nixfs-layer-test /run/nixfs-layer-test && touch {BUILDS}"
    ));
    let dep = w.path("dep");
    std::fs::create_dir(&dep).unwrap();
    std::fs::write(dep.join("greeting"), "hello from v1").unwrap();
    git(
        &dep,
        "init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm v1",
    );
    let app = w.path("app");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(
        app.join("flake.nix"),
        format!(
            r#"{{
  inputs.dep = {{ url = "git+file://{}"; flake = false; }};
  outputs = {{ self, dep }}: {{
    packages.x86_64-linux.tool = builtins.derivation {{
      name = "tool";
      system = "x86_64-linux";
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      greeting = builtins.readFile "${{dep}}/greeting";
      args = [ "-c" ''
        echo tool >> /run/nixfs-layer-test/builds
        mkdir -p $out/bin
        printf '#!/bin/sh\necho %s\n' "$greeting" > $out/bin/tool
        chmod +x $out/bin/tool
      '' ];
    }};
  }};
}}"#,
            dep.display()
        ),
    )
    .unwrap();
    git(
        &app,
        "init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm app",
    );
    let registry = w.path("registry.json");
    std::fs::write(
        &registry,
        serde_json::json!({"version": 2, "flakes": [
            {"from": {"type": "indirect", "id": "app"}, "to": {"type": "git", "url": format!("file://{}", app.display())}},
        ]})
        .to_string(),
    )
    .unwrap();
    *w.nix_conf.lock().unwrap() = format!("flake-registry = {}\n", registry.display());
    // The lower starts with a store of its own (one unrelated path).
    let lower = w.path("lower");
    w.with_nix_at(&lower, || {
        w.nix_ok(
            "nix-store",
            ["--add", common::fixture("flake/flake.nix").as_str()],
        );
    });
    let publisher = w.path("publisher");
    w.tool_ok(["init", "--upper", publisher.to_str().unwrap()]);
    let nix_log = w.path("nix.log");
    common::nix_recorder(&w.path("nix-wrapper"), &nix_log);
    Fleet {
        w,
        lower,
        publisher,
        app,
        dep,
        nix_log,
    }
}

impl Fleet {
    fn tool(&self, args: &[&str]) -> std::process::Output {
        self.w
            .tool_command()
            .env("NIXFS_LAYER_NIX", self.w.path("nix-wrapper"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
    fn tool_ok(&self, args: &[&str]) -> String {
        let o = self.tool(args);
        assert!(o.status.success(), "nixfs-layer {args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    }
    fn nix_calls(&self) -> usize {
        std::fs::read_to_string(&self.nix_log)
            .unwrap()
            .lines()
            .count()
    }
    /// Publishes `refs` from a publisher stack mounted in a mount namespace
    /// of its own (an executor may hold /nix in this one).
    fn publish(&self, refs: &[&str]) -> String {
        let tool = env!("CARGO_BIN_EXE_nixfs-layer");
        let quoted: Vec<String> = refs.iter().map(|r| format!("'{r}'")).collect();
        let script = format!(
            "set -e; umount -R {FLAKE_MOUNT} 2>/dev/null || true; umount -R /nix 2>/dev/null || true
             {tool} mount --lower {} --upper {} --no-flake-fs >&2
             {tool} publish {} --into {}",
            self.lower.display(),
            self.publisher.display(),
            quoted.join(" "),
            self.lower.display()
        );
        let mut c = std::process::Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        self.w.nix_env(&mut c);
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "publish {refs:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    }
    /// The flakes' origin goes away (executors cannot reach it) and HOME
    /// starts empty (no fetcher cache).
    fn cut_off(&self) {
        for d in [&self.app, &self.dep] {
            std::fs::rename(d, d.with_extension("away")).unwrap();
        }
        let home = self.w.path("home");
        std::fs::remove_dir_all(&home).unwrap();
        std::fs::create_dir(&home).unwrap();
    }
    fn reconnect(&self) {
        for d in [&self.app, &self.dep] {
            std::fs::rename(d.with_extension("away"), d).unwrap();
        }
    }
    fn executor(&self, name: &str, flakefs: &str) -> PathBuf {
        let upper = self.w.path(name);
        self.w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        let config = self.w.path(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "lowers = [\"{}\"]\nupper = \"{}\"\n[flakefs]\n{flakefs}\n",
                self.lower.display(),
                upper.display()
            ),
        )
        .unwrap();
        self.tool_ok(&["mount", "--config", config.to_str().unwrap()]);
        upper
    }
}

fn readlink(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
        .display()
        .to_string()
}
fn str_(r: &str) -> PathBuf {
    Path::new(FLAKE_MOUNT).join("flake/str").join(r)
}
fn b64(r: &str) -> PathBuf {
    Path::new(FLAKE_MOUNT)
        .join("flake/b64")
        .join(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r))
}

ns_test! {
    fn published_refs_resolve_offline_with_no_nix_and_follow_a_republish_at_sync() {
        let f = setup();
        let rev = git(&f.app, "rev-parse HEAD").trim().to_owned();
        let locked = format!("git+file://{}?rev={rev}#tool", f.app.display());
        let out = f.publish(&["app#tool", &locked]);
        let v1: Vec<&str> = out.lines().filter_map(|l| l.split(" -> ").nth(1)).collect();
        assert_eq!(v1.len(), 2, "{out}");
        assert_eq!(v1[0], v1[1], "the alias and the locked ref are one path");
        let v1 = v1[0].to_owned();
        assert!(f.lower.join("store").join(v1.trim_start_matches("/nix/store/")).is_dir());
        let listed = f.tool_ok(&["published", "--lower", f.lower.to_str().unwrap(), "--json"]);
        let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|e| e["path"] == v1.as_str()));
        assert!(listed.iter().any(|e| e["locked"].as_str().unwrap().contains(&rev)), "{listed:?}");

        f.cut_off();
        let builds = std::fs::read_to_string(BUILDS).unwrap();
        let upper = f.executor("executor", "");
        let calls = f.nix_calls();
        assert_eq!(readlink(&str_("app#tool")), v1);
        assert_eq!(readlink(&b64(&locked)), v1);
        let ran = std::process::Command::new(str_("app#tool").join("bin/tool")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello from v1\n");
        let json = f.tool_ok(&["resolve", "--json", "app#tool"]);
        let a: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(a["how"], "published", "{json}");
        assert!(a["published"]["locked"].as_str().unwrap().contains("rev="), "{json}");
        assert_eq!(f.nix_calls(), calls, "no Nix process on the executor");
        assert_eq!(std::fs::read_to_string(BUILDS).unwrap(), builds, "nothing built");
        assert!(upper_entries(&upper).is_empty(), "nothing written: {:?}", upper_entries(&upper));

        // The alias's flake changes and is published again while the
        // executor stays mounted; its `sync` follows, still with no Nix.
        f.reconnect();
        std::fs::write(f.dep.join("greeting"), "hello from v2").unwrap();
        git(&f.dep, "commit -qam v2");
        let out = f.publish(&["app#tool"]);
        let v2 = out.lines().next().unwrap().split(" -> ").nth(1).unwrap().to_owned();
        assert_ne!(v2, v1);
        f.cut_off();
        let calls = f.nix_calls();
        // Until this host syncs, verify says the entry names a path the
        // lower has and this store does not list yet.
        let o = f.tool(&["verify", "--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["categories"]["stale_published"][0]["path"], v2.as_str(), "{v}");
        assert_eq!(v["categories"]["stale_published"][0]["reason"], "not_synced", "{v}");
        assert!(stderr(&o).contains("nixfs-layer sync"), "{}", stderr(&o));
        f.tool_ok(&["sync"]);
        f.tool_ok(&["verify"]);
        assert_eq!(readlink(&str_("app#tool")), v2, "no stale kernel entry after sync");
        let ran = std::process::Command::new(str_("app#tool").join("bin/tool")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello from v2\n");
        assert_eq!(readlink(&b64(&locked)), v1, "the locked ref keeps its entry");
        assert_eq!(f.nix_calls(), calls, "still no Nix process");
        // Dropped entries: the alias is evaluated again (and fails offline).
        f.reconnect();
        let roots = || -> Vec<PathBuf> {
            let mut l: Vec<PathBuf> = std::fs::read_dir(f.lower.join("var/nix/gcroots/nixfs-layer-published"))
                .unwrap()
                .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
                .collect();
            l.sort();
            l
        };
        let mut both = vec![PathBuf::from(&v1), PathBuf::from(&v2)];
        both.sort();
        assert_eq!(roots(), both, "the republished alias roots v2, the locked ref v1");
        f.publish(&["--remove", "app#tool"]);
        let listed = f.tool_ok(&["published", "--lower", f.lower.to_str().unwrap()]);
        assert_eq!(listed.lines().count(), 1, "{listed}");
        assert_eq!(roots(), [PathBuf::from(&v1)], "a removed reference's root goes with it");
    }
}

ns_test! {
    fn published_only_refuses_what_is_not_published_and_a_damaged_index_is_skipped() {
        let f = setup();
        f.publish(&["app#tool"]);
        f.cut_off();
        let _upper = f.executor("executor", "resolve = \"published-only\"");
        let calls = f.nix_calls();
        let e = std::fs::metadata(str_("other#x").join("bin")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let config = f.w.path("executor.toml");
        let config = config.to_str().unwrap();
        let o = f.tool(&["resolve", "--config", config, "other#x"]);
        assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
        assert!(stderr(&o).contains("nixfs-layer publish"), "{}", stderr(&o));
        assert_eq!(f.nix_calls(), calls, "no Nix for an unpublished ref");
        assert!(readlink(&str_("app#tool")).starts_with("/nix/store/"));

        // A row that is not an entry (a hostile or broken index): skipped
        // with a warning; the rest still answers.
        let db = f.lower.join("var/nix/db/db.sqlite");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "insert into NixfsLayerPublished values ('evil#x', '/etc/shadow', 'out', null, null, 1)",
            [],
        )
        .unwrap();
        drop(c);
        let o = f.tool(&["resolve", "--config", config, "evil#x"]);
        assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
        assert!(stderr(&o).contains("malformed published entry"), "{}", stderr(&o));
        let o = f.tool(&["resolve", "--config", config, "app#tool"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(f.nix_calls(), calls);
    }
}

ns_test! {
    fn an_entry_whose_path_the_owner_collected_is_ignored_once_and_verify_lists_it() {
        let f = setup();
        let out = f.publish(&["app#tool"]);
        let path = out.lines().next().unwrap().split(" -> ").nth(1).unwrap().to_owned();
        f.cut_off();
        let upper = f.executor("executor", "resolve = \"published-only\"\nfailure-ttl = 0");
        let config = f.w.path("executor.toml");
        let config = config.to_str().unwrap();
        assert_eq!(readlink(&str_("app#tool")), path);
        let o = f.tool(&["verify", "--config", config]);
        assert!(o.status.success(), "clean while the path is there: {}", stderr(&o));

        // The lower's owner collects garbage in the lower with its own Nix:
        // publish rooted the path there, so it stays.
        let rooted = f.lower.join("var/nix/gcroots/nixfs-layer-published");
        let links: Vec<_> = std::fs::read_dir(&rooted).unwrap().map(|e| std::fs::read_link(e.unwrap().path()).unwrap()).collect();
        assert_eq!(links, [PathBuf::from(&path)], "one root per published reference");
        f.w.with_nix_at(&f.lower, || {
            f.w.nix_ok("nix-store", ["--gc"]);
            assert!(f.w.valid(&path), "the owner's GC keeps a published path");
            let o = f.w.nix("nix-store").args(["--delete", path.as_str()]).output().unwrap();
            assert!(!o.status.success(), "a published path is alive for Nix: {}", stderr(&o));
        });
        // An owner who clears the roots by hand and collects loses it; the
        // index (a table Nix does not know) keeps the entry.
        std::fs::remove_dir_all(&rooted).unwrap();
        f.w.with_nix_at(&f.lower, || {
            f.w.nix_ok("nix-store", ["--delete", path.as_str()]);
        });
        assert!(!f.lower.join("store").join(path.trim_start_matches("/nix/store/")).exists());
        let listed = f.tool_ok(&["published", "--lower", f.lower.to_str().unwrap()]);
        assert!(listed.contains(&path), "{listed}");
        f.tool_ok(&["sync", "--config", config]);

        // The tree ignores the entry: with published-only, ENOENT, however
        // often it is asked (failures are kept for no time here, so every
        // lookup reaches the server), and the server warns once.
        let calls = f.nix_calls();
        for i in 0..50 {
            let name = if i % 2 == 0 { str_("app#tool") } else { b64("app#tool") };
            let e = std::fs::metadata(name.join("bin")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
        let log = std::fs::read_to_string(upper.join("var/log/nixfs-layer/flakefs.log")).unwrap();
        assert_eq!(
            log.matches("published path is not valid in this store").count(),
            1,
            "one warning for 50 lookups: {log}"
        );
        assert!(log.contains(&path), "{log}");
        let o = f.tool(&["resolve", "--config", config, "app#tool"]);
        assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
        assert!(stderr(&o).contains("not valid in this store"), "{}", stderr(&o));
        assert!(stderr(&o).contains(&format!("nixfs-layer publish 'app#tool' --into {}", f.lower.display())), "{}", stderr(&o));
        assert_eq!(f.nix_calls(), calls, "no Nix for an ignored entry with published-only");

        // verify lists it (which lower, the ref, the path); --repair leaves it.
        let stale = |args: &[&str]| {
            let mut a = vec!["verify", "--config", config, "--json"];
            a.extend_from_slice(args);
            let o = f.tool(&a);
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["problems"], 1, "{v}");
            assert!(stderr(&o).contains("publish --remove"), "{}", stderr(&o));
            v
        };
        let v = stale(&[]);
        assert_eq!(
            v["categories"]["stale_published"],
            serde_json::json!([{
                "lower": f.lower.display().to_string(),
                "ref": "app#tool",
                "path": path,
                "reason": "gone_from_lower",
            }]),
            "{v}"
        );
        let v = stale(&["--repair"]);
        assert_eq!(v["categories"]["stale_published"][0]["ref"], "app#tool", "{v}");
        let text = f.tool(&["verify", "--config", config]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(&format!("app#tool -> {path} in {} (the lower no longer has it)", f.lower.display())),
            "{text}"
        );

        // The owner drops the entry; after sync the stack is clean again.
        f.reconnect();
        f.publish(&["--remove", "app#tool"]);
        f.tool_ok(&["sync", "--config", config]);
        let o = f.tool(&["verify", "--config", config]);
        assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    }
}
