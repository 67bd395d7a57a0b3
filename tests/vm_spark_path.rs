//! vm-tests scenario "spark-path" (vm-tests/README.md): three executor
//! hosts resolve the same static path, `/nixfs/flake/str/myflake#hello`,
//! at the same time. The lower's owner (the publisher host) publishes the
//! reference into the Nix root it serves over sshfs; the executors stack
//! that root as their lower and resolve the path from its index, with the
//! flake out of reach and no Nix process at all. Then an unpublished
//! reference: each host builds it once, into its own upper, however many
//! readers ask at once. Builds are counted exactly: the fixture flake's
//! builders append their name to a counter file, and each host has its own;
//! every `nix` the tool runs on an executor is recorded.

mod common;

use std::time::Instant;

use base64::Engine;
use common::hosts::{bridge, cable, Host, Sshd};
use common::{base_name, fixture, nix_recorder, tree_digest, upper_entries, World};

const REF: &str = "myflake#hello";
const UNPUBLISHED: &str = "myflake#extra";

fn str_entry(r: &str) -> String {
    format!("/nixfs/flake/str/{r}")
}
fn b64_entry(r: &str) -> String {
    format!(
        "/nixfs/flake/b64/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r)
    )
}

/// Two readers per host (the `str` and `b64` names of `r`), all hosts at
/// once: each reads the link and runs `bin/<bin>`. Panics with the host's
/// flake tree log if one fails; asserts each got `path` and ran.
fn read_everywhere(execs: &[Host], r: &str, bin: &str, path: &str) {
    let readers: Vec<_> = execs
        .iter()
        .flat_map(|h| {
            [str_entry(r), b64_entry(r)].map(|e| {
                let child = h
                    .command("sh")
                    .args(["-c", &format!("readlink {e} && {e}/bin/{bin}")])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (h, e, child)
            })
        })
        .collect();
    for (h, e, child) in readers {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            let log = h.run(&format!(
                "cat /nix/var/log/nixfs-layer/flakefs.log; grep -v cgroup /proc/self/mountinfo; tail -5 {}",
                h.dir.join("ssh.log").display()
            ));
            panic!(
                "[{}] {e}: {}\nflake tree log, mounts, ssh log:\n{}",
                h.name,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&log.stdout)
            );
        }
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{path}\nhello from {bin}\n"),
            "[{}] {e} is the same static path everywhere and runs",
            h.name
        );
    }
}

fn nix_calls(h: &Host) -> Vec<String> {
    std::fs::read_to_string(h.dir.join("nix.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn resolve(h: &Host, r: &str) -> serde_json::Value {
    serde_json::from_str(&h.tool_ok(["resolve", "--json", r])).unwrap()
}

ns_test! {
    fn spark_path() {
        let t0 = Instant::now();
        let w = World::new();
        // The fixture flake, reachable as `myflake` through a local registry.
        let flake = w.path("flake");
        std::fs::create_dir(&flake).unwrap();
        std::fs::copy(fixture("flake/flake.nix"), flake.join("flake.nix")).unwrap();
        let registry = w.path("registry.json");
        std::fs::write(
            &registry,
            serde_json::json!({"version": 2, "flakes": [
                {"from": {"type": "indirect", "id": "myflake"}, "to": {"type": "path", "path": flake}},
            ]})
            .to_string(),
        )
        .unwrap();
        *w.nix_conf.lock().unwrap() = format!("flake-registry = {}\n", registry.display());

        // The owner's Nix root (a store of its own), and the owner's stack
        // over it, from which it publishes the reference into it.
        let publisher = Host::start(&w, "publisher");
        bridge(&publisher, "10.231.0.1");
        let shared = w.path("publisher/shared");
        let fl = flake.display();
        publisher.with_root(&shared, &format!("nix build --no-link 'path:{fl}#\"with.dot\"'"));
        let owner = w.path("publisher/upper");
        publisher.tool_ok(["init", "--upper", owner.to_str().unwrap()]);
        publisher.tool_ok(["mount", "--lower", shared.to_str().unwrap(), "--upper", owner.to_str().unwrap(), "--no-flake-fs"]);
        let out = publisher.tool_ok(["publish", REF, "--into", shared.to_str().unwrap()]);
        let hello = out.lines().next().and_then(|l| l.strip_prefix(&format!("{REF} -> "))).unwrap_or_else(|| panic!("{out}")).to_owned();
        publisher.tool_ok(["umount"]);
        assert!(shared.join("store").join(base_name(&hello)).is_dir(), "published into the shared root");
        assert_eq!(publisher.builds(), vec!["dotted".to_owned(), "hello".to_owned()]);
        let root = tree_digest(&shared);
        let mut publisher = publisher;
        let sshd = Sshd::start(&mut publisher, "10.231.0.1", &w.path("publisher/ssh"));

        let mut execs = Vec::new();
        for (name, ip) in [("exec-a", "10.231.0.2"), ("exec-b", "10.231.0.3"), ("exec-c", "10.231.0.4")] {
            let mut h = Host::start(&w, name);
            cable(&publisher, &h, ip);
            let wrapper = h.dir.join("nix-wrapper");
            nix_recorder(&wrapper, &h.dir.join("nix.log"));
            h.set_env("NIXFS_LAYER_NIX", wrapper.to_str().unwrap());
            let lower = h.dir.join("lower");
            // No sshfs reconnect (see Sshd::sshfs and bridge).
            sshd.sshfs(&h, &shared, &lower, false);
            let upper = h.dir.join("upper");
            h.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
            // With the flake tree at /nixfs (the default).
            h.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap()]);
            assert!(h.builds().is_empty());
            execs.push(h);
        }
        eprintln!("published and hosts up after {:?}", t0.elapsed());

        // The flake goes out of reach: only the index can answer.
        let away = w.path("flake.away");
        std::fs::rename(&flake, &away).unwrap();
        let t = Instant::now();
        read_everywhere(&execs, REF, "hello", &hello);
        eprintln!("six concurrent first accesses of a published ref done in {:?}", t.elapsed());
        for h in &execs {
            let v = resolve(h, REF);
            assert_eq!((v["path"].as_str(), v["how"].as_str()), (Some(hello.as_str()), Some("published")), "[{}] {v}", h.name);
            assert_eq!(nix_calls(h), Vec::<String>::new(), "[{}] no Nix process ran", h.name);
            assert_eq!(h.builds(), Vec::<String>::new(), "[{}] nothing built", h.name);
            let upper = h.dir.join("upper");
            assert!(upper_entries(&upper).is_empty(), "[{}] nothing written: {:?}", h.name, upper_entries(&upper));
        }

        // An unpublished reference, the flake back: every host evaluates
        // and builds it once (two readers share one build), into its own
        // upper, never its lower.
        std::fs::rename(&away, &flake).unwrap();
        let extra: String = serde_json::from_str(
            &execs[0].sh(&format!("nix eval --read-only --json 'path:{fl}#extra.outPath'")),
        )
        .unwrap();
        let t = Instant::now();
        read_everywhere(&execs, UNPUBLISHED, "extra", &extra);
        eprintln!("six concurrent first accesses of an unpublished ref done in {:?}", t.elapsed());
        for h in &execs {
            assert_eq!(h.builds(), vec!["extra".to_owned()], "[{}] exactly one build for two readers", h.name);
            assert!(h.dir.join("upper/store").join(base_name(&extra)).is_dir(), "[{}] built into its own upper", h.name);
            assert!(!h.dir.join("lower/store").join(base_name(&extra)).exists());
            assert_eq!(resolve(h, UNPUBLISHED)["how"], "upper-hit", "[{}]", h.name);
        }

        // Again, warm: nothing more built or run anywhere.
        let calls: Vec<usize> = execs.iter().map(|h| nix_calls(h).len()).collect();
        for h in &execs {
            assert_eq!(h.sh(&format!("{}/bin/hello && {}/bin/extra", str_entry(REF), str_entry(UNPUBLISHED))), "hello from hello\nhello from extra\n");
        }
        assert_eq!(execs.iter().map(|h| h.builds().len()).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert_eq!(execs.iter().map(|h| nix_calls(h).len()).collect::<Vec<_>>(), calls);
        // The owner's root is untouched by three executors.
        assert_eq!(tree_digest(&shared), root);

        for h in &execs {
            h.tool_ok(["umount"]);
            assert!(!h.sh("cat /proc/self/mountinfo").contains(" /nixfs "), "[{}] the flake tree is gone", h.name);
            h.sh(&format!("umount {}", h.dir.join("lower").display()));
        }
        eprintln!("spark-path done in {:?}", t0.elapsed());
    }
}
