//! vm-tests scenario "spark-path" (vm-tests/README.md): three executor
//! hosts resolve the same static path, `/nixfs/flake/str/myflake#hello`,
//! at the same time. A publisher serves two Nix roots over sshfs: one with
//! the flake's `hello` built (executor A's lower), one without (B's and
//! C's). A builds nothing; B and C each build once, into their own upper.
//! Builds are counted exactly: the fixture flake's builders append their
//! name to a counter file, and each host has its own.

mod common;

use std::time::Instant;

use base64::Engine;
use common::hosts::{bridge, cable, Host, Sshd};
use common::{base_name, fixture, tree_digest, upper_entries, World};

const REF: &str = "myflake#hello";

fn str_entry() -> String {
    format!("/nixfs/flake/str/{REF}")
}
fn b64_entry() -> String {
    format!(
        "/nixfs/flake/b64/{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(REF)
    )
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

        let mut publisher = Host::start(&w, "publisher");
        bridge(&publisher, "10.231.0.1");
        let with_hello = w.path("publisher/with-hello");
        let without = w.path("publisher/without-hello");
        let fl = flake.display();
        publisher.with_root(&with_hello, &format!("nix build --no-link 'path:{fl}#hello' 'path:{fl}#\"with.dot\"'"));
        publisher.with_root(&without, &format!("nix build --no-link 'path:{fl}#\"with.dot\"'"));
        let hello: String = serde_json::from_str(
            &publisher.with_root(&without, &format!("nix eval --read-only --json 'path:{fl}#hello.outPath'")),
        )
        .unwrap();
        assert!(with_hello.join("store").join(base_name(&hello)).is_dir());
        assert!(!without.join("store").join(base_name(&hello)).exists());
        let roots = (tree_digest(&with_hello), tree_digest(&without));
        let sshd = Sshd::start(&mut publisher, "10.231.0.1", &w.path("publisher/ssh"));

        let mut execs = Vec::new();
        for (name, ip, root) in [("exec-a", "10.231.0.2", &with_hello), ("exec-b", "10.231.0.3", &without), ("exec-c", "10.231.0.4", &without)] {
            let h = Host::start(&w, name);
            cable(&publisher, &h, ip);
            let lower = h.dir.join("lower");
            // No sshfs reconnect and a patient keepalive (see Sshd::sshfs):
            // a 3 s keepalive dropped the link when the machine was loaded,
            // failing lookups with EIO (reconnect) or ENOTCONN (without).
            sshd.sshfs(&h, root, &lower, false);
            let upper = h.dir.join("upper");
            h.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
            // With the flake tree at /nixfs (the default).
            h.tool_ok(["mount", "--lower", lower.to_str().unwrap(), "--upper", upper.to_str().unwrap()]);
            assert!(h.builds().is_empty());
            execs.push(h);
        }
        eprintln!("hosts up after {:?}", t0.elapsed());

        // Every executor starts two readers at once (str and b64 names of
        // the same reference), all hosts at the same time.
        let t = Instant::now();
        let readers: Vec<_> = execs
            .iter()
            .flat_map(|h| [str_entry(), b64_entry()].map(|e| {
                (h, e.clone(), h.command("sh")
                    .args(["-c", &format!("readlink {e} && {e}/bin/hello")])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap())
            }))
            .collect();
        for (h, e, child) in readers {
            let out = child.wait_with_output().unwrap();
            if !out.status.success() {
                let log = h.run("cat /nix/var/log/nixfs-layer/flakefs.log");
                panic!(
                    "[{}] {e}: {}\nflake tree log:\n{}",
                    h.name,
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&log.stdout)
                );
            }
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                format!("{hello}\nhello from hello\n"),
                "[{}] {e} is the same static path everywhere and runs", h.name
            );
        }
        eprintln!("six concurrent first accesses done in {:?}", t.elapsed());

        let (a, b, c) = (&execs[0], &execs[1], &execs[2]);
        assert_eq!(a.builds(), Vec::<String>::new(), "exec-a's lower has the path: nothing built");
        assert!(upper_entries(&a.dir.join("upper")).is_empty(), "exec-a's upper stays empty: {:?}", upper_entries(&a.dir.join("upper")));
        for h in [b, c] {
            assert_eq!(h.builds(), vec!["hello".to_owned()], "[{}] exactly one build for two readers", h.name);
            assert!(h.dir.join("upper/store").join(base_name(&hello)).is_dir(), "[{}] built into its own upper", h.name);
            assert!(!h.dir.join("lower/store").join(base_name(&hello)).exists());
        }
        let how = |h: &Host| -> String {
            let v: serde_json::Value = serde_json::from_str(&h.tool_ok(["resolve", "--json", REF])).unwrap();
            assert_eq!(v["path"], hello.as_str(), "{v}");
            v["how"].as_str().unwrap().to_owned()
        };
        assert_eq!(how(a), "lower-hit");
        assert_eq!(how(b), "upper-hit");
        assert_eq!(how(c), "upper-hit");

        // Again, warm: still nothing more built anywhere.
        for h in &execs {
            assert_eq!(h.sh(&format!("{}/bin/hello", str_entry())), "hello from hello\n");
        }
        assert_eq!((a.builds().len(), b.builds().len(), c.builds().len()), (0, 1, 1));
        // The publisher's roots are untouched by three executors.
        assert_eq!((tree_digest(&with_hello), tree_digest(&without)), roots);

        for h in &execs {
            h.tool_ok(["umount"]);
            assert!(!h.sh("cat /proc/self/mountinfo").contains(" /nixfs "), "[{}] the flake tree is gone", h.name);
            h.sh(&format!("umount {}", h.dir.join("lower").display()));
        }
        eprintln!("spark-path done in {:?}", t0.elapsed());
    }
}
