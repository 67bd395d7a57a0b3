//! Merged path DB benchmark: nixfs-layer against `nix-store --dump-db |
//! nix-store --load-db` (the overlayfs + load-db peer) on one synthetic lower,
//! same machine, same run.
//!
//!     cargo bench --bench merge                 # 100,000 paths
//!     BENCH_PATHS=20000 cargo bench --bench merge
//!     BENCH_PATHS=1000000 cargo bench --bench merge   # 1M (a big machine: ~1 GB database)
//!
//! Needs root: it runs itself in a private mount namespace with a tmpfs on
//! /nix. The synthetic lower is cached under target/bench/.

#[path = "common/mod.rs"]
mod common;

use common::{nix_sh, sh};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nixfs_layer::synth;

const SEED: u64 = 20261121;

fn main() {
    common::enter_private_namespace(&["/nix"]);
    let n: usize = std::env::var("BENCH_PATHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let pristine = root.join(format!("lower-{n}-{SEED}"));
    if !pristine.join("var/nix/db/schema").exists() {
        eprintln!(
            "generating a synthetic lower of {n} paths in {} …",
            pristine.display()
        );
        let _ = std::fs::remove_dir_all(&pristine);
        let t = Instant::now();
        synth::generate(&pristine, n, SEED).unwrap();
        eprintln!("  done in {:.1?}", t.elapsed());
    }
    let work = root.join("run");
    let _ = sh(&format!(
        "chmod -R u+w {0} 2>/dev/null; rm -rf {0}",
        work.display()
    ));
    std::fs::create_dir_all(&work).unwrap();
    let lower = work.join("lower");
    sh(&format!("cp -a {} {}", pristine.display(), lower.display()));
    sh("mount -t tmpfs bench /nix");
    let refs = count(&lower, "select count(*) from Refs");
    let drvs = count(&lower, "select count(*) from DerivationOutputs");
    println!("machine: {}", common::machine());
    println!("lower: {n} paths, {refs} references, {drvs} derivation outputs");

    // nixfs-layer: full merge into a fresh upper, as `mount` does it.
    let bin = env!("CARGO_BIN_EXE_nixfs-layer");
    let upper = work.join("upper");
    run(bin, &["init", "--upper", upper.to_str().unwrap()]);
    let t = Instant::now();
    run(
        bin,
        &[
            "mount",
            "--quiet",
            "--no-flake-fs",
            "--lower",
            lower.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
        ],
    );
    let ours = t.elapsed();
    // What `mount` (and a sync that changes something) spends checking the
    // merged database with `PRAGMA quick_check`, and `verify` with the
    // full `integrity_check`: median of 3, the file in the page cache.
    let merged_db = upper.join("var/nix/db/db.sqlite");
    let time_check = |full: bool| {
        let mut v: Vec<Duration> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let found = nixfs_layer::pathdb::health::problems(&merged_db, full).unwrap();
                assert!(found.is_empty(), "the merged database is whole: {found:?}");
                t.elapsed()
            })
            .collect();
        v.sort();
        v[1]
    };
    let quick = time_check(false);
    let integrity = time_check(true);
    let db_mib = std::fs::metadata(&merged_db).map_or(0, |m| m.len()) / (1 << 20);
    assert_eq!(
        count(
            &upper,
            "select count(*) from ValidPaths where path like '%synth-%'"
        ) as usize,
        n
    );

    // The row-by-row merge (what sync does into an upper that already has
    // paths): the same lower below an empty one, into another fresh upper.
    let (empty_lower, upper2) = (work.join("empty-lower"), work.join("upper2"));
    synth::generate(&empty_lower, 0, SEED).unwrap();
    run(bin, &["init", "--upper", upper2.to_str().unwrap()]);
    let target2 = work.join("target2");
    let t = Instant::now();
    run(
        bin,
        &[
            "mount",
            "--quiet",
            "--no-flake-fs",
            "--target",
            target2.to_str().unwrap(),
            "--lower",
            empty_lower.to_str().unwrap(),
            "--lower",
            lower.to_str().unwrap(),
            "--upper",
            upper2.to_str().unwrap(),
        ],
    );
    let general = t.elapsed();
    let peak_kib = children_max_rss_kib();
    run(bin, &["umount", "--target", target2.to_str().unwrap()]);

    // sync with nothing changed.
    let mut idle: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            run(bin, &["sync", "--quiet"]);
            t.elapsed()
        })
        .collect();
    idle.sort();

    // 1% of the lower changes (half removed, half added), then sync; three
    // rounds, the median counts. Before the last round's sync, the floor:
    // stock Nix registering only the added half into a copy of the merged
    // database (`nix-store --load-db`, one transaction).
    let change = n / 100;
    let mut rounds = Vec::new();
    let mut nix_register = Duration::ZERO;
    let (mut removed_n, mut added_n) = (0, 0);
    for round in 0..3 {
        let (removed, added) =
            synth::mutate(&lower, change / 2, change - change / 2, SEED + 1 + round).unwrap();
        if round == 2 {
            nix_register = register_with_nix(&lower, &upper, &added, &work);
        }
        let t = Instant::now();
        let out = run(bin, &["sync"]);
        rounds.push(t.elapsed());
        assert!(
            out.contains(&format!("added {}, removed {}", added.len(), removed.len())),
            "{out}"
        );
        (removed_n, added_n) = (removed.len(), added.len());
    }
    rounds.sort();
    let one_percent = rounds[1];
    run(bin, &["umount"]);

    if std::env::var_os("BENCH_SKIP_PEER").is_some() {
        println!(
            "full merge {:.2} s, row-by-row {:.2} s, quick_check {:.3} s ({:.0}% of the full merge), integrity_check {:.3} s, idle sync {:.1} ms, 1% sync {:.3} s (Nix registering the added half {:.3} s), peak {} MB",
            ours.as_secs_f64(),
            general.as_secs_f64(),
            quick.as_secs_f64(),
            100.0 * quick.as_secs_f64() / ours.as_secs_f64(),
            integrity.as_secs_f64(),
            idle[3].as_secs_f64() * 1e3,
            one_percent.as_secs_f64(),
            nix_register.as_secs_f64(),
            peak_kib / 1024
        );
        return;
    }
    // The peer: dump the lower's DB and load it into a fresh store stacked
    // on the same lower with overlayfs (Nix reads .drv files while loading).
    let peer = work.join("peer");
    for d in ["store", "work", "var/nix/db"] {
        std::fs::create_dir_all(peer.join(d)).unwrap();
    }
    let peer_lower = work.join("peer-lower");
    sh(&format!(
        "cp -a {} {}",
        pristine.display(),
        peer_lower.display()
    ));
    let t = Instant::now();
    nix_sh(&format!(
        "unshare -m --propagation private sh -c 'mount --bind {l} /nix && exec nix-store --dump-db' | \
         unshare -m --propagation private sh -c 'mount -t overlay overlay -o lowerdir={l}/store,upperdir={p}/store,workdir={p}/work /nix/store && mount --bind {p}/var /nix/var && exec nix-store --load-db'",
        l = peer_lower.display(),
        p = peer.display()
    ));
    let peer_time = t.elapsed();
    assert_eq!(count(&peer, "select count(*) from ValidPaths") as usize, n);

    let secs = |d: Duration| d.as_secs_f64();
    let row = |what: &str, value: String, note: &str| println!("{what:<52} {value:>10}   {note}");
    println!();
    row(
        "full merge into a fresh upper (nixfs-layer mount)",
        format!("{:.2} s", secs(ours)),
        "",
    );
    row(
        "row-by-row merge (same lower under an empty one)",
        format!("{:.2} s", secs(general)),
        "",
    );
    row(
        "nix-store --dump-db | nix-store --load-db",
        format!("{:.2} s", secs(peer_time)),
        "",
    );
    row(
        "speed-up, fresh upper / row-by-row",
        format!("{:.1}x", secs(peer_time) / secs(ours)),
        &format!("{:.1}x   (target >= 10x)", secs(peer_time) / secs(general)),
    );
    row(
        &format!("quick_check of the merged database ({db_mib} MiB)"),
        format!("{:.3} s", secs(quick)),
        &format!(
            "{:.0}% of the fresh-upper merge, {:.0}% of the row-by-row one (mount, and a sync that writes, run it)",
            100.0 * secs(quick) / secs(ours),
            100.0 * secs(quick) / secs(general)
        ),
    );
    row(
        "integrity_check of the merged database",
        format!("{:.3} s", secs(integrity)),
        "(verify runs it)",
    );
    row(
        "nixfs-layer peak RSS",
        format!("{:.0} MB", peak_kib as f64 / 1024.0),
        "(target < 200 MB)",
    );
    row(
        "sync, nothing changed (median of 7)",
        format!("{:.1} ms", secs(idle[3]) * 1e3),
        "(target < 50 ms)",
    );
    row(
        &format!("sync after 1% changed (-{removed_n} +{added_n}, median of 3)"),
        format!("{:.3} s", secs(one_percent)),
        &format!(
            "{:.1}% of the fresh-upper merge, {:.1}% of the row-by-row one (target < 10%)",
            100.0 * secs(one_percent) / secs(ours),
            100.0 * secs(one_percent) / secs(general)
        ),
    );
    row(
        &format!("  floor: Nix registering only the {added_n} added"),
        format!("{:.3} s", secs(nix_register)),
        &format!(
            "{:.1}% of the fresh-upper merge",
            100.0 * secs(nix_register) / secs(ours)
        ),
    );
}

/// Times stock `nix-store --load-db` registering `added` (the lower's rows
/// for them, with references, in `--dump-db` format) into a copy of the
/// merged database, in a child mount namespace where the copy is the
/// store's database; the merged store (mounted on /nix) has their contents.
/// `--load-db` does only the database work (`--register-validity` would also
/// rewrite file metadata).
fn register_with_nix(lower: &Path, upper: &Path, added: &[String], work: &Path) -> Duration {
    let c = rusqlite::Connection::open_with_flags(
        lower.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut input = String::new();
    for p in added {
        let (id, hash, size, deriver): (i64, String, i64, Option<String>) = c
            .query_row(
                "select id, hash, narSize, deriver from ValidPaths where path = ?1",
                [p],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        let refs: Vec<String> = c
            .prepare("select v.path from Refs r join ValidPaths v on v.id = r.reference where r.referrer = ?1")
            .unwrap()
            .query_map([id], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        input.push_str(&format!(
            "{p}\n{hash}\n{size}\n{}\n{}\n",
            deriver.unwrap_or_default(),
            refs.len()
        ));
        for r in refs {
            input.push_str(&r);
            input.push('\n');
        }
    }
    let copy = work.join("floor-db");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    let db_dir = upper.join("var/nix/db");
    // A consistent copy: the merged database is idle between syncs.
    sh(&format!(
        "cp {0}/db.sqlite {0}/schema {1}/ && if [ -e {0}/db.sqlite-wal ]; then cp {0}/db.sqlite-wal {1}/; fi",
        db_dir.display(),
        copy.display()
    ));
    let input_file = work.join("floor-input");
    std::fs::write(&input_file, input).unwrap();
    let t = Instant::now();
    nix_sh(&format!(
        "unshare -m --propagation private sh -c 'mount --bind {} /nix/var/nix/db && exec nix-store --load-db < {}'",
        copy.display(),
        input_file.display()
    ));
    let took = t.elapsed();
    let registered = count_in(&copy.join("db.sqlite"), added);
    assert_eq!(registered, added.len(), "Nix registered every added path");
    took
}

fn count_in(db: &Path, paths: &[String]) -> usize {
    let c = rusqlite::Connection::open(db).unwrap();
    paths
        .iter()
        .filter(|p| {
            c.query_row(
                "select count(*) from ValidPaths where path = ?1",
                [p],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                > 0
        })
        .count()
}

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("NIXFS_LAYER_LOG").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(root: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(
        root.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Largest resident set of any child waited for so far, in KiB.
fn children_max_rss_kib() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .unwrap()
        .max_rss()
}
