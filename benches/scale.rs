//! Scaling benchmark: every way a stack comes up or changes its lowers, and
//! the everyday commands, on synthetic lowers of 10,000, 100,000 and
//! 1,000,000 paths, in one run, side by side with the peer (overlayfs +
//! `nix-store --dump-db | nix-store --load-db`) where there is one, with
//! each operation's peak RSS and its growth exponent between sizes.
//!
//!     cargo bench --bench scale                       # 10k, 100k, 1M
//!     BENCH_SKIP_1M=1 cargo bench --bench scale       # 10k and 100k only
//!     BENCH_SIZES=10000 cargo bench --bench scale     # any list of sizes
//!     BENCH_SKIP_PEER=1 cargo bench --bench scale     # without the peer
//!
//! Needs root: it runs itself in a private mount and pid namespace with a
//! tmpfs on /nix (the stack's target). The synthetic lowers are made once
//! and cached: up to 100k under target/bench/ (shared with the merge
//! benchmark), 1M under /var/cache/nixfs-layer/scale/ (about 5 GB;
//! `BENCH_SCALE_CACHE` moves it). Each run works on overlayfs copies of
//! them, so the cached lowers are never written.
//!
//! The peer's load is given up after 15 minutes (`BENCH_PEER_TIMEOUT`,
//! seconds) and reported so.

#[path = "common/mod.rs"]
mod common;

use common::{nix_sh, sh};

use std::collections::BTreeMap;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixfs_layer::synth;

const SEED: u64 = 20261121;
/// The seed of the 10k-path lower whose paths become an upper's own and
/// that is added as a second lower.
const SIDE_SEED: u64 = 20261202;
const SIDE: usize = 10_000;

/// One measured run of a command: wall time and the peak RSS of the
/// process (and of any child it waited for).
#[derive(Clone, Copy, Debug)]
struct Run {
    time: Duration,
    rss_kib: i64,
}

/// Figures of one size, by operation name.
type Figures = BTreeMap<&'static str, Run>;

/// The operations, in the order they are printed.
const OPS: &[(&str, &str)] = &[
    ("fresh", "mount, fresh upper"),
    ("existing", "mount, existing upper with 10k own paths"),
    (
        "generation",
        "sync --lower NEW --keep-needed (new generation)",
    ),
    (
        "second",
        "sync --lower NEW --lower SIDE (second lower, 10k)",
    ),
    ("idle", "sync, nothing changed (median of 7)"),
    ("one_percent", "sync, 1% of the lower changed"),
    ("status", "status"),
    ("verify", "verify"),
    ("gc", "gc --dry-run"),
    ("diff", "diff"),
];

/// The peer's figure each operation is held against.
const PEER_OF: &[(&str, &str)] = &[
    ("fresh", "load"),
    ("existing", "load"),
    ("generation", "load"),
    ("second", "load_side"),
    ("one_percent", "load"),
];

fn main() {
    common::enter_private_namespace(&["/nix"]);
    let sizes: Vec<usize> = match std::env::var("BENCH_SIZES") {
        Ok(s) => s.split(',').map(|n| n.trim().parse().unwrap()).collect(),
        Err(_) if std::env::var_os("BENCH_SKIP_1M").is_some() => vec![10_000, 100_000],
        Err(_) => vec![10_000, 100_000, 1_000_000],
    };
    let skip_peer = std::env::var_os("BENCH_SKIP_PEER").is_some();
    let peer_timeout = std::env::var("BENCH_PEER_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900u64);
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let work = bench.join("scale-run");
    let _ = sh(&format!(
        "chattr -R -i {0} 2>/dev/null; chmod -R u+w {0} 2>/dev/null; rm -rf {0}",
        work.display()
    ));
    std::fs::create_dir_all(&work).unwrap();
    sh("mount -t tmpfs bench /nix");
    let bin = env!("CARGO_BIN_EXE_nixfs-layer");

    println!("machine: {}", common::machine());
    println!("load average at the start: {}", load_average());
    let side = cached_lower(SIDE, SIDE_SEED);
    let own_upper = make_own_upper(bin, &side, &work);

    let mut all: BTreeMap<usize, Figures> = BTreeMap::new();
    let mut peers: BTreeMap<usize, BTreeMap<&'static str, Option<Duration>>> = BTreeMap::new();
    for &n in &sizes {
        let pristine = cached_lower(n, SEED);
        let refs = count(&pristine, "select count(*) from Refs");
        let db_mib =
            std::fs::metadata(pristine.join("var/nix/db/db.sqlite")).map_or(0, |m| m.len()) >> 20;
        println!();
        println!("== {n} paths: {refs} references, lower database {db_mib} MiB");
        let dir = work.join(n.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let figures = run_size(bin, n, &pristine, &side, &own_upper, &dir);
        all.insert(n, figures);
        clean(&dir);
    }
    report(&sizes, &all, &peers);
    if skip_peer {
        return;
    }
    // The peer last: its load at 1M is the longest step of the run.
    println!();
    for &n in &sizes {
        let dir = work.join(format!("peer-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        peers.insert(
            n,
            run_peer(n, &cached_lower(n, SEED), &side, &dir, peer_timeout),
        );
        clean(&dir);
    }
    report(&sizes, &all, &peers);
}

/// Unmounts what is mounted under `dir` and removes it.
fn clean(dir: &Path) {
    sh(&format!(
        "for m in $(awk '{{print $2}}' /proc/self/mounts | grep '^{0}/' | sort -r); do umount $m; done; rm -rf {0}",
        dir.display()
    ));
}

/// A synthetic lower of `n` paths, made once and cached.
fn cached_lower(n: usize, seed: u64) -> PathBuf {
    let dir = if n >= 1_000_000 {
        std::env::var_os("BENCH_SCALE_CACHE")
            .map_or_else(
                || PathBuf::from("/var/cache/nixfs-layer/scale"),
                PathBuf::from,
            )
            .join(format!("lower-{n}-{seed}"))
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench/lower-{n}-{seed}"))
    };
    if !dir.join("var/nix/db/schema").exists() {
        eprintln!(
            "generating a synthetic lower of {n} paths in {} …",
            dir.display()
        );
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let t = Instant::now();
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&dir);
        synth::generate(&tmp, n, seed).unwrap();
        std::fs::rename(&tmp, &dir).unwrap();
        eprintln!("  done in {:.1?}", t.elapsed());
    }
    dir
}

/// A writable view of `pristine` at `dir`: an overlay whose upper layer is
/// next to it, so a run may change it (or Nix may write into it) while
/// the cached lower stays as it was.
fn overlay_copy(pristine: &Path, dir: &Path) {
    let (up, wk) = (dir.with_extension("up"), dir.with_extension("wk"));
    for d in [dir, &up, &wk] {
        std::fs::create_dir_all(d).unwrap();
    }
    sh(&format!(
        "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
        pristine.display(),
        up.display(),
        wk.display(),
        dir.display()
    ));
}

/// An upper with SIDE own paths (registered by Nix through the merged
/// store, over an empty lower), left unmounted: each size mounts a copy
/// of it over its lower.
fn make_own_upper(bin: &str, side: &Path, work: &Path) -> PathBuf {
    let (empty, upper) = (work.join("empty-lower"), work.join("own-upper"));
    synth::generate(&empty, 0, SEED).unwrap();
    run(
        bin,
        &["init", "--quiet", "--upper", upper.to_str().unwrap()],
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    run(
        bin,
        &[
            "mount",
            "--quiet",
            "--no-flake-fs",
            "--lower",
            &s(&empty),
            "--upper",
            &s(&upper),
        ],
    );
    sh(&format!("cp -a {}/store/. /nix/store/", side.display()));
    let dump = work.join("own.dump");
    std::fs::write(&dump, dump_db(side)).unwrap();
    nix_sh(&format!("nix-store --load-db < {}", dump.display()));
    run(bin, &["umount"]);
    let own = count(
        &upper,
        "select count(*) from NixfsLayerOrigin where layer = 0",
    );
    assert_eq!(own as usize, SIDE, "the upper has its own paths");
    upper
}

fn run_size(
    bin: &str,
    n: usize,
    pristine: &Path,
    side: &Path,
    own_upper: &Path,
    dir: &Path,
) -> Figures {
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let mut f = Figures::new();
    let note = |f: &mut Figures, op: &'static str, r: Run| {
        let label = OPS.iter().find(|(k, _)| *k == op).unwrap().1;
        println!(
            "{n:>8} {label:<52} {:>10}   {:>4} MB",
            fmt_time(r.time),
            r.rss_kib / 1024
        );
        f.insert(op, r);
    };
    let lower = dir.join("lower");
    overlay_copy(pristine, &lower);

    // A fresh upper.
    let upper = dir.join("upper");
    run(bin, &["init", "--quiet", "--upper", &s(&upper)]);
    let r = measure(
        bin,
        &[
            "mount",
            "--quiet",
            "--no-flake-fs",
            "--lower",
            &s(&lower),
            "--upper",
            &s(&upper),
        ],
    );
    note(&mut f, "fresh", r);
    assert_eq!(
        count(
            &upper,
            "select count(*) from ValidPaths where path like '%synth-%'"
        ) as usize,
        n
    );

    // Idle sync, median of 7.
    let mut idle: Vec<Run> = (0..7).map(|_| measure(bin, &["sync", "--quiet"])).collect();
    idle.sort_by_key(|r| r.time);
    note(&mut f, "idle", idle[3]);

    for (op, args) in [
        ("status", &["status"][..]),
        ("verify", &["verify", "--quiet"][..]),
        ("gc", &["gc", "--dry-run", "--quiet"][..]),
        ("diff", &["diff"][..]),
    ] {
        let r = measure(bin, args);
        note(&mut f, op, r);
    }

    // 1% of the lower changes (half removed, half added), then sync: the
    // median of three rounds (one at 1M).
    let rounds = if n >= 1_000_000 { 1 } else { 3 };
    let change = n / 100;
    let mut synced: Vec<Run> = (0..rounds)
        .map(|round| {
            let (removed, added) =
                synth::mutate(&lower, change / 2, change - change / 2, SEED + 1 + round).unwrap();
            let (r, out) = measure_out(bin, &["sync"]);
            assert!(
                out.contains(&format!("added {}, removed {}", added.len(), removed.len())),
                "{out}"
            );
            r
        })
        .collect();
    synced.sort_by_key(|r| r.time);
    note(&mut f, "one_percent", synced[synced.len() / 2]);

    // A new generation of the lower (another directory: the same lower
    // with 1% changed).
    let gen2 = dir.join("gen2");
    overlay_copy(pristine, &gen2);
    synth::mutate(&gen2, change / 2, change - change / 2, SEED + 100).unwrap();
    let r = measure(
        bin,
        &["sync", "--quiet", "--lower", &s(&gen2), "--keep-needed"],
    );
    note(&mut f, "generation", r);

    // A second lower below it.
    let (r, out) = measure_out(
        bin,
        &[
            "sync",
            "--lower",
            &s(&gen2),
            "--lower",
            &s(side),
            "--keep-needed",
        ],
    );
    note(&mut f, "second", r);
    // Every path of the second lower is valid.
    let c = rusqlite::Connection::open_with_flags(
        side.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.execute(
        "attach ?1 as m",
        [upper.join("var/nix/db/db.sqlite").to_str().unwrap()],
    )
    .unwrap();
    let invalid: i64 = c
        .query_row(
            "select count(*) from ValidPaths s where not exists (select 1 from m.ValidPaths v where v.path = s.path)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(invalid, 0, "{out}");
    drop(c);
    run(bin, &["umount"]);

    // An upper that has paths of its own.
    let upper2 = dir.join("own-upper");
    sh(&format!(
        "cp -a {} {}",
        own_upper.display(),
        upper2.display()
    ));
    let r = measure(
        bin,
        &[
            "mount",
            "--quiet",
            "--no-flake-fs",
            "--lower",
            &s(&lower),
            "--upper",
            &s(&upper2),
        ],
    );
    note(&mut f, "existing", r);
    assert_eq!(
        count(
            &upper2,
            "select count(*) from NixfsLayerOrigin where layer = 0"
        ) as usize,
        SIDE
    );
    run(bin, &["umount"]);
    f
}

/// The peer on the same lower: a fresh store stacked on it with overlayfs
/// (Nix reads .drv files while loading), loaded with `nix-store --dump-db
/// | nix-store --load-db`; then the side lower's database loaded into it
/// too (the peer's way to add a second lower). None: not finished within
/// `timeout` seconds.
fn run_peer(
    n: usize,
    pristine: &Path,
    side: &Path,
    dir: &Path,
    timeout: u64,
) -> BTreeMap<&'static str, Option<Duration>> {
    let mut out = BTreeMap::new();
    let lower = dir.join("peer-lower");
    overlay_copy(pristine, &lower);
    let peer = dir.join("peer");
    for d in ["store", "work", "var/nix/db"] {
        std::fs::create_dir_all(peer.join(d)).unwrap();
    }
    let side_dump = dir.join("side.dump");
    std::fs::write(&side_dump, dump_db(side)).unwrap();
    let stack = format!(
        "mount -t overlay overlay -o lowerdir={l}/store:{s}/store,upperdir={p}/store,workdir={p}/work /nix/store && mount --bind {p}/var /nix/var",
        l = lower.display(),
        s = side.display(),
        p = peer.display()
    );
    let t = Instant::now();
    let done = nix_sh_timeout(
        &format!(
            "unshare -m --propagation private sh -c 'mount --bind {l} /nix && exec nix-store --dump-db' | \
             unshare -m --propagation private sh -c '{stack} && exec nix-store --load-db'",
            l = lower.display()
        ),
        timeout,
    );
    let load = t.elapsed();
    let label = "peer: nix-store --dump-db | nix-store --load-db";
    if !done {
        println!("{n:>8} {label:<52} not done after {timeout} s: given up");
        out.insert("load", None);
        return out;
    }
    assert_eq!(count(&peer, "select count(*) from ValidPaths") as usize, n);
    println!("{n:>8} {label:<52} {:>10}", fmt_time(load));
    out.insert("load", Some(load));
    let t = Instant::now();
    let done = nix_sh_timeout(
        &format!(
            "unshare -m --propagation private sh -c '{stack} && exec nix-store --load-db < {}'",
            side_dump.display()
        ),
        timeout,
    );
    let took = t.elapsed();
    let label = "peer: --load-db of the 10k side lower";
    if done {
        // (A few paths the two lowers share.)
        assert!(count(&peer, "select count(*) from ValidPaths") as usize > n + SIDE - 100);
        println!("{n:>8} {label:<52} {:>10}", fmt_time(took));
        out.insert("load_side", Some(took));
    } else {
        println!("{n:>8} {label:<52} not done after {timeout} s: given up");
        out.insert("load_side", None);
    }
    out
}

fn report(
    sizes: &[usize],
    all: &BTreeMap<usize, Figures>,
    peers: &BTreeMap<usize, BTreeMap<&'static str, Option<Duration>>>,
) {
    let k = |n: usize| {
        if n >= 1_000_000 && n % 1_000_000 == 0 {
            format!("{}M", n / 1_000_000)
        } else if n >= 1000 && n % 1000 == 0 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        }
    };
    println!();
    println!("time per operation (peak RSS), and the growth exponent log(t2/t1)/log(n2/n1):");
    let mut head = format!("{:<52}", "");
    for &n in sizes {
        head.push_str(&format!(" {:>16}", k(n)));
    }
    for w in sizes.windows(2) {
        head.push_str(&format!(" {:>10}", format!("{}→{}", k(w[0]), k(w[1]))));
    }
    println!("{head}");
    for (op, label) in OPS {
        let mut line = format!("{label:<52}");
        for n in sizes {
            let cell = all[n].get(op).map_or("-".to_owned(), |r| {
                format!("{} ({}M)", fmt_time(r.time), r.rss_kib / 1024)
            });
            line.push_str(&format!(" {cell:>16}"));
        }
        for w in sizes.windows(2) {
            let e = match (all[&w[0]].get(op), all[&w[1]].get(op)) {
                (Some(a), Some(b)) => format!(
                    "{:.2}",
                    (b.time.as_secs_f64() / a.time.as_secs_f64()).ln()
                        / (w[1] as f64 / w[0] as f64).ln()
                ),
                _ => "-".to_owned(),
            };
            line.push_str(&format!(" {e:>10}"));
        }
        println!("{line}");
    }
    if peers.is_empty() {
        return;
    }
    println!();
    println!("against the peer (overlayfs + nix-store --dump-db | nix-store --load-db), speed-up:");
    let peer_label = |p: &str| match p {
        "load" => "load-db of the lower",
        _ => "load-db of the side lower",
    };
    for (n, p) in peers {
        for (key, label) in [("load", "load"), ("load_side", "load_side")] {
            match p.get(key) {
                Some(Some(d)) => println!(
                    "{:>8} peer {:<47} {:>10}",
                    k(*n),
                    peer_label(label),
                    fmt_time(*d)
                ),
                Some(None) => println!(
                    "{:>8} peer {:<47} not done within the time limit",
                    k(*n),
                    peer_label(label)
                ),
                None => {}
            }
        }
        for (op, pk) in PEER_OF {
            let (Some(ours), Some(Some(theirs))) = (all[n].get(op), p.get(pk)) else {
                continue;
            };
            let label = OPS.iter().find(|(k, _)| k == op).unwrap().1;
            println!(
                "{:>8}   {label:<52} {:>7.1}x",
                k(*n),
                theirs.as_secs_f64() / ours.time.as_secs_f64()
            );
        }
    }
}

fn fmt_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Runs `bin args`, which must succeed; its wall time and peak RSS.
fn measure(bin: &str, args: &[&str]) -> Run {
    measure_out(bin, args).0
}

fn measure_out(bin: &str, args: &[&str]) -> (Run, String) {
    // Through GNU time: a child spawned by this process starts with this
    // process's resident set as its high-water mark.
    let rss_file = std::env::temp_dir().join(format!("scale-rss-{}", std::process::id()));
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let time = t.elapsed();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss_kib = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    (
        Run { time, rss_kib },
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn run(bin: &str, args: &[&str]) -> String {
    measure_out(bin, args).1
}

/// [`nix_sh`] under `timeout`: whether it finished in time.
fn nix_sh_timeout(script: &str, secs: u64) -> bool {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string()).arg("sh").arg("-c").arg(script);
    let out = common::nix_env(&mut c, "").output().unwrap();
    if out.status.code() == Some(124) {
        return false;
    }
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = nix_sh;
    true
}

/// A lower's database in the format `nix-store --dump-db` writes and
/// `--load-db` reads.
fn dump_db(root: &Path) -> String {
    let c = rusqlite::Connection::open_with_flags(
        root.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut refs: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    c.prepare("select r.referrer, v.path from Refs r join ValidPaths v on v.id = r.reference")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .for_each(|r| {
            let (a, b) = r.unwrap();
            refs.entry(a).or_default().push(b);
        });
    let mut out = String::new();
    let mut q = c
        .prepare("select id, path, hash, narSize, deriver from ValidPaths order by id")
        .unwrap();
    let mut rows = q.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let id: i64 = r.get(0).unwrap();
        let (path, hash, size, deriver): (String, String, i64, Option<String>) = (
            r.get(1).unwrap(),
            r.get(2).unwrap(),
            r.get(3).unwrap(),
            r.get(4).unwrap(),
        );
        let rs = refs.remove(&id).unwrap_or_default();
        out.push_str(&format!(
            "{path}\n{hash}\n{size}\n{}\n{}\n",
            deriver.unwrap_or_default(),
            rs.len()
        ));
        for x in rs {
            out.push_str(&x);
            out.push('\n');
        }
    }
    out
}

fn count(root: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(
        root.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
