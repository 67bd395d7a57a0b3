//! Crashes, concurrency and progress: `sync` and `mount` killed with
//! SIGKILL at random points over a large synthetic lower, `sync` while real
//! Nix builds write into the merged store, and what a long merge shows on a
//! terminal and off one. Every test runs in its own mount namespace with a
//! tmpfs on /nix.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    base_name, entries, mount_table, on_terminal, stderr, valid_count, verify_contents, World,
    PIN_SUFFIX,
};
use nixfs_layer::synth::{self, Rng};
use rusqlite::Connection;
use wait_timeout::ChildExt;

/// Seed of the random kill delays (and of the synthetic lowers): fixed, so
/// a failure replays the same schedule.
const SEED: u64 = 0x5eed_2026;

/// A synthetic lower and an initialised upper.
struct Stack {
    w: World,
    lower: PathBuf,
    upper: PathBuf,
}

fn stack(paths: usize) -> Stack {
    let w = World::new();
    let lower = w.path("lower");
    let t = Instant::now();
    synth::generate(&lower, paths, SEED).unwrap();
    eprintln!(
        "generated a synthetic lower of {paths} paths in {:.1?}",
        t.elapsed()
    );
    let upper = w.path("upper");
    init(&w, &upper);
    Stack { w, lower, upper }
}

fn init(w: &World, upper: &Path) {
    w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
}

impl Stack {
    fn mount_args(&self, upper: &Path) -> Vec<String> {
        vec![
            "mount".into(),
            "--no-flake-fs".into(),
            "--lower".into(),
            self.lower.display().to_string(),
            "--upper".into(),
            upper.display().to_string(),
        ]
    }
    fn mount(&self) {
        self.w.tool_ok(self.mount_args(&self.upper));
    }
    /// Publishes a change to the lower: `remove` unreferenced paths go,
    /// `add` new ones come.
    fn publish(&self, remove: usize, add: usize, seed: u64) -> (Vec<String>, Vec<String>) {
        synth::mutate(&self.lower, remove, add, seed).unwrap()
    }
}

fn db_of(upper: &Path) -> PathBuf {
    upper.join("var/nix/db/db.sqlite")
}

/// `PRAGMA integrity_check` is ok and `PRAGMA foreign_key_check` finds
/// nothing, on the merged database as a crash left it.
fn assert_db_sound(upper: &Path, when: &str) {
    let c = Connection::open(db_of(upper)).unwrap();
    let integrity: Vec<String> = c
        .prepare("pragma integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(integrity, vec!["ok".to_owned()], "integrity_check {when}");
    let fk: Vec<(String, Option<i64>, String)> = c
        .prepare("pragma foreign_key_check")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(fk.is_empty(), "foreign_key_check {when}: {fk:?}");
}

/// The merged database says exactly what the lower's does: the same valid
/// paths with the same hashes and references, each with one provenance row
/// naming a lower, and nothing else but the pin.
fn assert_db_matches_lower(upper: &Path, lower: &Path, when: &str) {
    let c = Connection::open(db_of(upper)).unwrap();
    c.execute(
        "attach database ?1 as lower",
        [format!(
            "file:{}?mode=ro",
            lower.join("var/nix/db/db.sqlite").display()
        )],
    )
    .unwrap();
    let pin = format!("%{PIN_SUFFIX}");
    let paths = |schema: &str| {
        format!("select path, hash from {schema}.ValidPaths where path not like '{pin}'")
    };
    let refs = |schema: &str| {
        format!(
            "select a.path, b.path from {schema}.Refs r join {schema}.ValidPaths a on a.id = r.referrer
             join {schema}.ValidPaths b on b.id = r.reference where a.path not like '{pin}'"
        )
    };
    let differ = |q: &dyn Fn(&str) -> String| -> Vec<(String, String)> {
        c.prepare(&format!(
            "select * from ({} except {}) union all select * from ({} except {}) limit 5",
            q("main"),
            q("lower"),
            q("lower"),
            q("main")
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    let count = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    let (merged_n, lower_n) = (
        count(&format!("select count(*) from ({})", paths("main"))),
        count("select count(*) from lower.ValidPaths"),
    );
    let bad = differ(&paths);
    assert!(
        bad.is_empty() && merged_n == lower_n,
        "{when}: merged database has {merged_n} paths, the lower {lower_n}; differing (path, hash): {bad:?}"
    );
    let bad = differ(&refs);
    assert!(bad.is_empty(), "{when}: references differ: {bad:?}");
    let all = count("select count(*) from main.ValidPaths");
    assert_eq!(
        (
            count("select count(*) from main.ValidPaths v join main.NixfsLayerOrigin o on o.path = v.path"),
            count("select count(*) from main.NixfsLayerOrigin"),
        ),
        (all, all),
        "{when}: one provenance row per valid path"
    );
    assert_eq!(
        count(
            "select count(*) from lower.ValidPaths l join main.NixfsLayerOrigin o on o.path = l.path
             join main.NixfsLayerLower n on n.id = o.layer"
        ),
        lower_n,
        "{when}: every lower path's provenance is the lower"
    );
}

/// Snapshot copies a sync leaves in the upper's scratch directory.
fn scratch(upper: &Path) -> Vec<String> {
    entries(&upper.join("nixfs-layer/tmp"))
}

/// Where a killed run was, from its debug log (the merge logs each phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Landed {
    /// Before the merge began (start-up, finding the mount, the lock).
    BeforeMerge,
    /// Copying the lowers' databases, before the transaction.
    Copying,
    /// Inside the transaction, before its commit.
    InTransaction,
    /// During or right after the commit.
    Committing,
    /// After the merge (mount: mounting; both: the process had finished).
    AfterMerge,
}

fn landed(log: &str) -> Landed {
    let has = |s: &str| log.contains(s);
    if has("sync done") || has("merged database up to date") {
        Landed::AfterMerge
    } else if has("sync: committing") {
        Landed::Committing
    } else if has("sync: comparing")
        || has("sync: deciding")
        || has("sync: applying")
        || has("sync: adopting")
    {
        Landed::InTransaction
    } else if has("sync: copying") {
        Landed::Copying
    } else {
        Landed::BeforeMerge
    }
}

/// Runs the tool with a debug log in `log`, and SIGKILLs it after `delay`
/// unless it ended first; returns whether it ran to the end.
fn run_and_kill(w: &World, args: &[String], delay: Duration, log: &Path) -> bool {
    let mut child: Child = w
        .tool_command()
        .args(args)
        .env("NIXFS_LAYER_LOG", "nixfs_layer=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let finished = matches!(child.try_wait(), Ok(Some(s)) if s.success());
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

/// Seconds of a run of the tool to the end.
fn timed(w: &World, args: &[String]) -> Duration {
    let t = Instant::now();
    w.tool_ok(args);
    t.elapsed()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

ns_test! {
    fn sync_killed_at_random_points_leaves_a_sound_database() {
        let s = stack(20_000);
        s.mount();
        assert_db_matches_lower(&s.upper, &s.lower, "after mount");
        let mut rng = Rng::new(SEED);
        eprintln!("kill delays from seed {SEED:#x}");

        // How long a sync with real work takes here: the kill delays are
        // spread over that.
        s.publish(10, 200, 1);
        let plain = timed(&s.w, &strings(&["sync"]));
        s.publish(10, 200, 2);
        let forced = timed(&s.w, &strings(&["sync", "--force"]));
        eprintln!("one sync takes {plain:.2?}, one sync --force {forced:.2?}");

        let log = s.w.path("sync.log");
        let rounds = 30;
        let mut tally = std::collections::BTreeMap::<Landed, u32>::new();
        let mut committed_before_kill = 0;
        let started = Instant::now();
        for k in 0..rounds {
            s.publish(5, 100, 100 + k);
            let (args, span) = if k % 2 == 0 {
                (strings(&["sync"]), plain)
            } else {
                (strings(&["sync", "--force"]), forced)
            };
            let delay = span.mul_f64(1.1 * rng.unit());
            let finished = run_and_kill(&s.w, &args, delay, &log);
            let log_text = std::fs::read_to_string(&log).unwrap();
            let at = if finished { Landed::AfterMerge } else { landed(&log_text) };
            *tally.entry(at).or_default() += 1;
            let when = format!("after kill {k} ({args:?} at {delay:.2?}, {at:?})");
            assert_db_sound(&s.upper, &when);

            let out = s.w.tool_ok(["sync"]);
            if out.starts_with("sync: added 0, removed 0") {
                committed_before_kill += 1;
            } else {
                assert!(!finished, "{when}: a sync that ran to the end left work: {out}");
            }
            assert!(scratch(&s.upper).is_empty(), "{when}: snapshot copies left: {:?}", scratch(&s.upper));
            assert_db_sound(&s.upper, &format!("{when}, then a sync"));
            assert_eq!(
                valid_count(&s.upper),
                valid_count(&s.lower) + 1,
                "{when}, then a sync: the lower's paths and the pin are valid"
            );
            if k % 10 == 9 {
                assert_db_matches_lower(&s.upper, &s.lower, &format!("{when}, then a sync"));
            }
        }
        eprintln!(
            "{rounds} kills in {:.1?}; where they landed: {tally:?}; {committed_before_kill} had committed",
            started.elapsed()
        );
        assert!(
            tally.get(&Landed::InTransaction).copied().unwrap_or(0) >= 5,
            "kills spread over the merge: {tally:?}"
        );

        let out = s.w.tool_ok(["sync"]);
        assert!(out.starts_with("sync: added 0, removed 0"), "{out}");
        assert_db_matches_lower(&s.upper, &s.lower, "at the end");
        let t = Instant::now();
        verify_contents(&s.w);
        eprintln!("nix-store --verify --check-contents took {:.1?}", t.elapsed());
    }
}

ns_test! {
    fn mount_killed_during_its_merge_leaves_no_mounts() {
        let s = stack(20_000);
        let mounts_before = mount_table();
        // A mount of a fresh upper to the end: the kills fall within the
        // first 60% of its time, which its merge takes up nearly all of.
        let calibration = s.w.path("upper-calibration");
        init(&s.w, &calibration);
        let full = timed(&s.w, &s.mount_args(&calibration));
        s.w.tool_ok(["umount"]);
        eprintln!("one mount of a fresh upper takes {full:.2?}; kill delays from seed {SEED:#x}");
        let mut rng = Rng::new(SEED ^ 0x6d6f756e74);
        let log = s.w.path("mount.log");
        let mut tally = std::collections::BTreeMap::<Landed, u32>::new();
        for k in 0..5 {
            let upper = s.w.path(&format!("upper-{k}"));
            init(&s.w, &upper);
            let delay = full.mul_f64(0.6 * rng.unit());
            let finished = run_and_kill(&s.w, &s.mount_args(&upper), delay, &log);
            assert!(!finished, "mount {k} ended before its kill at {delay:.2?}");
            let at = landed(&std::fs::read_to_string(&log).unwrap());
            *tally.entry(at).or_default() += 1;
            let when = format!("after killing mount {k} at {delay:.2?} ({at:?})");
            assert_eq!(mount_table(), mounts_before, "{when}: no mounts left behind");
            assert_db_sound(&upper, &when);

            s.w.tool_ok(s.mount_args(&upper));
            assert!(scratch(&upper).is_empty(), "{when}: snapshot copies left: {:?}", scratch(&upper));
            assert_db_sound(&upper, &format!("{when}, then a mount"));
            assert_db_matches_lower(&upper, &s.lower, &format!("{when}, then a mount"));
            s.w.tool_ok(["umount"]);
            assert_eq!(mount_table(), mounts_before, "umount after {when}");
        }
        eprintln!("5 mount kills; where they landed: {tally:?}");
        assert!(
            tally.keys().any(|&l| l >= Landed::InTransaction),
            "some kills fell in the merge itself: {tally:?}"
        );
    }
}

/// Waits for a child up to `limit`; kills it and fails if it takes longer.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let status = match child.wait_timeout(limit).unwrap() {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}: deadlock?");
        }
    };
    let mut out = std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    out
}

fn valid(w: &World, paths: &[String]) -> bool {
    w.nix("nix-store")
        .arg("--check-validity")
        .args(paths)
        .status()
        .unwrap()
        .success()
}

ns_test! {
    fn sync_while_nix_builds_into_the_merged_store() {
        let s = stack(5_000);
        s.mount();
        let limit = Duration::from_secs(180);
        let mut built = Vec::new();
        let (mut lower_added, mut lower_removed) = (Vec::new(), Vec::new());
        let mut overlapping = 0;
        let mut busy_warnings = 0;
        for round in 0..3u64 {
            // Output is read after the end: the builds print little.
            let build = s
                .w
                .nix("nix-build")
                .args(["--no-out-link", "--max-jobs", "4", &common::fixture("slow.nix")])
                .args(["--argstr", "salt", &format!("round-{round}")])
                .args(["-A", "a", "-A", "b", "-A", "c", "-A", "d"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let started = Instant::now();
            let mut build = Some(build);
            let mut syncs = 0;
            // Sync, with the lower changing each time, for as long as the
            // builds run (and at least twice).
            while syncs < 2 || build.as_mut().unwrap().try_wait().unwrap().is_none() {
                let (removed, added) = s.publish(3, 50, 1000 + round * 100 + syncs);
                let sync = s
                    .w
                    .tool_command()
                    .arg("sync")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let out = wait_bounded(sync, limit, "sync");
                let err = stderr(&out);
                assert!(out.status.success(), "sync during builds failed: {err}");
                assert!(err.is_empty(), "sync during builds complained: {err}");
                let said = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(said.starts_with(&format!("sync: added {}, removed {}", added.len(), removed.len())), "{said}");
                lower_added.extend(added);
                lower_removed.extend(removed);
                syncs += 1;
                if build.as_mut().unwrap().try_wait().unwrap().is_none() {
                    overlapping += 1;
                }
                assert!(started.elapsed() < limit, "builds did not finish within {limit:?}: deadlock?");
            }
            let out = wait_bounded(build.take().unwrap(), limit, "nix-build");
            let err = stderr(&out);
            assert!(out.status.success(), "nix-build during syncs failed: {err}");
            // Nix retries a write that found the database busy (it warns
            // "SQLite database … is busy", at most every 10 s); what must
            // not happen is a lock error or any other failure.
            let (busy, rest): (Vec<&str>, Vec<&str>) =
                err.lines().partition(|l| l.starts_with("warning: error: SQLite database") && l.ends_with("is busy"));
            for bad in ["locked", "error"] {
                assert!(!rest.join("\n").to_lowercase().contains(bad), "nix-build says {bad}: {err}");
            }
            if !busy.is_empty() {
                busy_warnings += 1;
            }
            let outs: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
            assert_eq!(outs.len(), 4, "{outs:?}");
            eprintln!("round {round}: {syncs} syncs, builds took {:.1?}", started.elapsed());
            built.extend(outs);
        }
        assert!(overlapping >= 3, "syncs ran while builds did: {overlapping}");
        eprintln!("{overlapping} syncs overlapped builds; Nix warned of a busy database in {busy_warnings} of 3 rounds");

        // What each side made is there, from the right layer.
        assert!(valid(&s.w, &built), "the builds' outputs are valid");
        for p in &built {
            let base = base_name(p);
            assert!(s.upper.join("store").join(base).is_dir(), "{p} is in the upper");
            assert!(!s.lower.join("store").join(base).exists(), "{p} is not in the lower");
        }
        let upper_origin: i64 = Connection::open(db_of(&s.upper))
            .unwrap()
            .query_row(
                "select count(*) from NixfsLayerOrigin where layer = 0 and path in (select value from json_each(?1))",
                [serde_json::to_string(&built).unwrap()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(upper_origin, built.len() as i64, "the builds' outputs come from the upper");
        let still_in_lower: Vec<String> =
            lower_added.iter().filter(|p| !lower_removed.contains(p)).cloned().collect();
        assert!(!still_in_lower.is_empty());
        assert!(valid(&s.w, &still_in_lower), "the lower's new paths are valid");
        for p in &lower_removed {
            assert!(!valid(&s.w, std::slice::from_ref(p)), "{p} left the lower and is not valid");
        }
        verify_contents(&s.w);
    }
}

ns_test! {
    fn a_long_merge_shows_progress_on_a_terminal_only() {
        let s = stack(5_000);
        let bin = env!("CARGO_BIN_EXE_nixfs-layer");
        let mount_line = |upper: &Path, quiet: &str| {
            format!(
                "{bin} {quiet} mount --no-flake-fs --lower {} --upper {}",
                s.lower.display(),
                upper.display()
            )
        };
        // The spinner is one of indicatif's default tick characters.
        let spinner = |shown: &str| shown.chars().any(|c| "⠁⠂⠄⡀⢀⠠⠐⠈".contains(c));

        // mount on a terminal: the spinner names the phase.
        let shown = on_terminal(&s.w, &mount_line(&s.upper, ""));
        assert!(shown.contains("merging lower databases: adopting the first lower's database"), "{shown:?}");
        assert!(spinner(&shown), "{shown:?}");
        assert!(shown.contains("mounted 1 lower(s)"), "{shown:?}");

        // sync on a terminal, after the lower changed.
        s.publish(10, 200, 1);
        let shown = on_terminal(&s.w, &format!("{bin} sync"));
        assert!(shown.contains("syncing lower databases: copying lower databases"), "{shown:?}");
        assert!(shown.contains("syncing lower databases: applying changes"), "{shown:?}");
        assert!(spinner(&shown), "{shown:?}");
        assert!(shown.contains("sync: added 200, removed 10"), "{shown:?}");

        // Off a terminal: only what sync always prints, on stdout.
        s.publish(10, 200, 2);
        let out = s.w.tool(["sync"]);
        assert!(out.status.success());
        assert_eq!(stderr(&out), "", "sync's stderr off a terminal");
        let said = String::from_utf8(out.stdout).unwrap();
        assert!(said.starts_with("sync: added 200, removed 10") && said.lines().count() == 1, "{said:?}");

        // --quiet: nothing at all, on a terminal or not.
        s.publish(10, 200, 3);
        let out = s.w.tool(["--quiet", "sync"]);
        assert!(out.status.success());
        assert_eq!((stderr(&out).as_str(), out.stdout.as_slice()), ("", &b""[..]), "sync --quiet");
        s.publish(10, 200, 4);
        assert_eq!(on_terminal(&s.w, &format!("{bin} --quiet sync")), "", "sync --quiet on a terminal");
        s.w.tool_ok(["--quiet", "umount"]);

        // mount of a fresh upper off a terminal: its one line on stdout, nothing else.
        let fresh = |name: &str| {
            let u = s.w.path(name);
            init(&s.w, &u);
            u
        };
        let u = fresh("upper-plain");
        let out = s.w.tool(s.mount_args(&u));
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stderr(&out), "", "mount's stderr off a terminal");
        let said = String::from_utf8(out.stdout).unwrap();
        assert!(said.starts_with("mounted 1 lower(s) and upper ") && said.lines().count() == 1, "mount's stdout off a terminal: {said:?}");
        s.w.tool_ok(["--quiet", "umount"]);
        let u = fresh("upper-quiet");
        let out = s.w.tool(["--quiet".to_owned()].into_iter().chain(s.mount_args(&u)));
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!((stderr(&out).as_str(), out.stdout.as_slice()), ("", &b""[..]), "mount --quiet");
        s.w.tool_ok(["--quiet", "umount"]);
        let u = fresh("upper-quiet-tty");
        assert_eq!(on_terminal(&s.w, &mount_line(&u, "--quiet")), "", "mount --quiet on a terminal");
    }
}
