//! vm-tests scenario "nfs-fleet" (vm-tests/README.md): a publisher host
//! owns a Nix root and serves it read-only over the network (sshfs over
//! veths, on 10.231.0.0/24); two runner hosts, each with its own network
//! and mount namespace and its own /nix, stack it as their lower under
//! private uppers, build at the same time, pick up what the publisher adds
//! with `sync`, and live through a network cut.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::hosts::{bridge, cable, fleet_nix, wait_for, Host, Sshd};
use common::{base_name, fixture, sh, tree_digest, upper_entries, World};

/// A runner: sshfs of the publisher's root as its lower, an upper on its
/// own disk, the stack mounted on its /nix.
fn start_runner(
    w: &World,
    name: &str,
    publisher: &Host,
    ip: &str,
    sshd: &Sshd,
    root: &Path,
) -> Host {
    let r = Host::start(w, name);
    cable(publisher, &r, ip);
    let lower = r.dir.join("lower");
    sshd.sshfs(&r, root, &lower, true);
    let upper = r.dir.join("upper");
    r.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
    r.tool_ok([
        "mount",
        "--lower",
        lower.to_str().unwrap(),
        "--upper",
        upper.to_str().unwrap(),
        "--no-flake-fs",
    ]);
    r
}

fn valid(h: &Host, path: &str) -> bool {
    h.ok(&format!("nix-store --check-validity {path}"))
}

/// The mount id of the overlay on /nix/store in a host.
fn store_mount_id(h: &Host) -> String {
    h.sh("awk '$5 == \"/nix/store\" { print $1 }' /proc/self/mountinfo")
        .trim()
        .to_owned()
}

fn upper_digest(h: &Host) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    tree_digest(&h.dir.join("upper/store"))
}

ns_test! {
    fn nfs_fleet() {
        let t0 = Instant::now();
        let w = World::new();
        let mut publisher = Host::start(&w, "publisher");
        bridge(&publisher, "10.231.0.1");
        let root = w.path("publisher/nixroot");
        let built = publisher.build_into(&root, &fixture("store.nix"), &["app", "tool"]);
        let app = built.iter().find(|p| p.ends_with("-app")).unwrap().clone();
        let liba_dev = publisher
            .with_root(&root, &format!("nix-store -q --references {app}"))
            .lines()
            .find(|l| l.ends_with("-liba-dev"))
            .unwrap()
            .to_owned();
        let sshd = Sshd::start(&mut publisher, "10.231.0.1", &w.path("publisher/ssh"));
        let r1 = start_runner(&w, "runner1", &publisher, "10.231.0.2", &sshd, &root);
        let r2 = start_runner(&w, "runner2", &publisher, "10.231.0.3", &sshd, &root);
        eprintln!("fleet up after {:?}", t0.elapsed());

        // Each runner has its own mounts: its sshfs and overlay only.
        for (me, other) in [(&r1, &r2), (&r2, &r1)] {
            let mi = me.sh("cat /proc/self/mountinfo");
            assert!(mi.contains(&format!("{} ", me.dir.join("lower").display())), "{mi}");
            assert!(mi.contains("fuse.sshfs"), "{mi}");
            assert!(!mi.contains(&other.dir.display().to_string()), "{} sees {}'s mounts: {mi}", me.name, other.name);
            assert!(valid(me, &app), "{}: the published app is valid", me.name);
            assert_eq!(me.sh(&format!("{app}/bin/app")), "hello from app\n");
            assert!(upper_entries(&me.dir.join("upper")).is_empty(), "reading wrote nothing to {}'s upper", me.name);
        }
        let published = tree_digest(&root);

        // Both runners build at the same time, different jobs.
        let start = |h: &Host, job: &str| {
            h.command("nix-build")
                .args(["--no-out-link", &fleet_nix(), "--argstr", "job", job, "-A", "job"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (b1, b2) = (start(&r1, "r1"), start(&r2, "r2"));
        let (o1, o2) = (b1.wait_with_output().unwrap(), b2.wait_with_output().unwrap());
        assert!(o1.status.success(), "runner1's build: {}", String::from_utf8_lossy(&o1.stderr));
        assert!(o2.status.success(), "runner2's build: {}", String::from_utf8_lossy(&o2.stderr));
        let j1 = String::from_utf8(o1.stdout).unwrap().trim().to_owned();
        let j2 = String::from_utf8(o2.stdout).unwrap().trim().to_owned();
        assert!(j1.ends_with("-job-r1") && j2.ends_with("-job-r2"), "{j1} {j2}");
        let time = |h: &Host, p: &str, f: &str| -> f64 { h.sh(&format!("cat {p}/{f}")).trim().parse().unwrap() };
        let (s1, f1, s2, f2) = (time(&r1, &j1, "started"), time(&r1, &j1, "finished"), time(&r2, &j2, "started"), time(&r2, &j2, "finished"));
        assert!(s1 < f2 && s2 < f1, "the two builds overlapped in time: r1 {s1}..{f1}, r2 {s2}..{f2}");
        for (me, mine, theirs, tag) in [(&r1, &j1, &j2, "job-r1"), (&r2, &j2, &j1, "job-r2")] {
            assert_eq!(me.sh(&format!("cat {mine}/app-said")), "hello from app\n", "the job ran the lower's app");
            assert!(valid(me, mine));
            // No trace of the other runner's build: not valid, no file, not listed.
            assert!(!valid(me, theirs), "{} sees {theirs}", me.name);
            assert!(!me.ok(&format!("test -e {theirs}")), "{} has {theirs} on disk", me.name);
            let all = me.sh("nix path-info --all");
            assert!(!all.contains(base_name(theirs)), "{}: {all}", me.name);
            let ups = upper_entries(&me.dir.join("upper"));
            assert!(!ups.is_empty() && ups.iter().all(|e| e.contains(tag)), "{}'s upper holds its own job only: {ups:?}", me.name);
        }
        assert_eq!(tree_digest(&root), published, "runners wrote nothing to the published root");
        eprintln!("concurrent builds done after {:?}", t0.elapsed());

        // The publisher adds a path; the runners sync and use it, with the
        // overlay (and the upper's builds) left mounted.
        let extra = publisher.build_into(&root, &fixture("store.nix"), &["extra"]).remove(0);
        let ids = (store_mount_id(&r1), store_mount_id(&r2));
        for me in [&r1, &r2] {
            assert!(!valid(me, &extra), "not valid before sync");
            let out = me.tool_ok(["sync"]);
            assert!(out.starts_with("sync: added ") && !out.starts_with("sync: added 0"), "{out}");
            assert!(valid(me, &extra), "{}: published path valid after sync", me.name);
            assert_eq!(me.sh(&format!("{extra}/bin/extra")), "hello from extra\n");
        }
        assert_eq!((store_mount_id(&r1), store_mount_id(&r2)), ids, "sync did not remount the stacks");
        assert!(valid(&r1, &j1) && valid(&r2, &j2), "the runners' builds stay valid across sync");
        let uses = r1.sh(&format!("nix-build --no-out-link {} --argstr job r1 -A usesExtra", fleet_nix()));
        let uses = uses.trim();
        assert_eq!(r1.sh(&format!("cat {uses}/extra-said")), "hello from extra\n");
        let ups = upper_entries(&r1.dir.join("upper"));
        assert!(
            ups.iter().all(|e| e.contains("job-r1") || e.contains("uses-extra-r1")),
            "nothing of the published path was built or copied into the upper: {ups:?}"
        );

        // Cut runner1's network (the publisher's side of its cable).
        let before_cut = upper_digest(&r1);
        publisher.sh("ip link set to-runner1 down");
        let header = format!("{liba_dev}/include/liba.h");
        let t = Instant::now();
        let cut = r1.run(&format!("timeout 60 cat {header}"));
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&cut.stderr).into_owned();
        eprintln!("read of an uncached lower file with the network cut: {took:?}: {err}");
        assert!(!cut.status.success(), "a not-yet-read lower file cannot be read with the network down");
        assert!(
            err.contains("Input/output error") || err.contains("Transport endpoint is not connected"),
            "the read fails with an I/O error, not a hang or wrong data: {err}"
        );
        assert!(took < Duration::from_secs(30), "it fails within the ssh keep-alive, took {took:?}");
        let sync = r1.tool(["sync"]);
        let serr = String::from_utf8_lossy(&sync.stderr).into_owned();
        assert_eq!(sync.status.code(), Some(74), "sync with the lower unreachable: {serr}");
        assert!(
            serr.contains(&r1.dir.join("lower").display().to_string()) && serr.contains("cannot be read"),
            "sync names the unreachable lower: {serr}"
        );
        // The other runner goes on.
        assert_eq!(r2.sh(&format!("cat {header}")), "liba\n");
        assert!(r2.tool_ok(["sync"]).starts_with("sync: added 0"));
        // Nothing of runner1's upper is lost: same bytes, same rows.
        assert_eq!(upper_digest(&r1), before_cut, "runner1's upper is intact during the outage");
        let db = r1.dir.join("upper/var/nix/db/db.sqlite");
        let rows = sh(&format!(
            "sqlite3 -readonly {} \"select count(*) from ValidPaths where path in ('{j1}', '{uses}')\"",
            db.display()
        ));
        assert_eq!(rows.trim(), "2", "runner1's builds are still registered");

        // Restore: sshfs reconnects on demand, sync and the paths work again.
        publisher.sh("ip link set to-runner1 up");
        let t = Instant::now();
        assert!(
            wait_for(60, || r1.ok(&format!("cat {header} >/dev/null"))),
            "runner1 reads the lower again after the network is back"
        );
        eprintln!("lower readable again {:?} after the link came back", t.elapsed());
        assert_eq!(r1.sh(&format!("cat {header}")), "liba\n");
        let out = r1.tool_ok(["sync"]);
        assert!(out.starts_with("sync: "), "{out}");
        for p in [&j1, &app, &extra] {
            assert!(valid(&r1, p), "{p} valid after recovery");
        }
        assert_eq!(r1.sh(&format!("cat {j1}/app-said && {uses}/bin/uses-extra-r1")), "hello from app\nhello from uses-extra-r1\n");
        assert_eq!(r1.sh(&format!("{app}/bin/app")), "hello from app\n");
        let verify = r1.tool(["verify"]);
        assert!(verify.status.success(), "verify after recovery: {}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
        assert_eq!(upper_digest(&r1), before_cut, "recovery changed nothing in the upper");

        for me in [&r1, &r2] {
            me.tool_ok(["umount"]);
            me.sh(&format!("umount {}", me.dir.join("lower").display()));
        }
        eprintln!("nfs-fleet done in {:?}", t0.elapsed());
    }
}
