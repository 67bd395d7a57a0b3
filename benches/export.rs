//! `export` against `nix-store --export` on the same path: peak RSS and
//! throughput. Run as root: `cargo bench --bench export`
//! (`NIXFS_LAYER_BENCH_MIB=1024` sets the closure size, default 1024).
//!
//! In a private mount namespace with a tmpfs on /nix: a one-path lower, an
//! upper mounted on it, a directory of random files added through the
//! merged store (so it is an upper-only path), then each exporter run three
//! times writing to /dev/null under `/usr/bin/time`; the best run counts.
//! Figures are in docs/export-bench.md.

#[path = "common/mod.rs"]
mod common;

use common::{nix_env, sh};

use std::path::Path;
use std::process::Command;

/// (peak RSS in KiB, wall seconds) of `script` under /usr/bin/time.
fn measure(script: &str) -> (u64, f64) {
    let out = nix_env(
        Command::new("/usr/bin/time")
            .args(["-f", "%M %e", "sh", "-c"])
            .arg(script),
        "",
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "`{script}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    let mut it = last.split_whitespace();
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().parse().unwrap(),
    )
}

fn best(script: &str) -> (u64, f64) {
    let runs: Vec<(u64, f64)> = (0..3).map(|_| measure(script)).collect();
    let rss = runs.iter().map(|r| r.0).max().unwrap();
    let secs = runs.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    (rss, secs)
}

fn main() {
    common::enter_private_namespace(&["/nix"]);
    let mib: u64 = std::env::var("NIXFS_LAYER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let dir = tmp.path();
    let tool = env!("CARGO_BIN_EXE_nixfs-layer");
    sh("mount -t tmpfs bench /nix");

    let lower = dir.join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    sh(&format!("mount --bind {} /nix", lower.display()));
    std::fs::write(dir.join("seed"), "seed\n").unwrap();
    sh(&format!("nix-store --add {}", dir.join("seed").display()));
    sh("umount /nix");
    let upper = dir.join("upper");
    sh(&format!("{tool} init --upper {}", upper.display()));
    sh(&format!(
        "{tool} mount --lower {} --upper {} --no-flake-fs",
        lower.display(),
        upper.display()
    ));

    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let files = mib.div_ceil(64);
    for i in 0..files {
        sh(&format!(
            "head -c {} /dev/urandom > {}/blob-{i}",
            (mib.min(64) << 20),
            data.display()
        ));
    }
    let path = sh(&format!("nix-store --add {}", data.display()))
        .trim()
        .to_owned();
    let nar: u64 = sh(&format!("nix-store -q --size {path}"))
        .trim()
        .parse()
        .unwrap();
    println!(
        "nixfs-layer export benchmark: one upper path, {} MiB of NAR ({} files), to /dev/null, best of 3",
        nar >> 20,
        files
    );
    let rows = [
        (
            "nix-store --export",
            format!("nix-store --export {path} > /dev/null"),
        ),
        (
            "nixfs-layer export",
            format!("{tool} export {path} -o - > /dev/null"),
        ),
        (
            "nixfs-layer export --compress zstd",
            format!("{tool} export {path} --compress zstd -o - > /dev/null"),
        ),
    ];
    let mut nix_secs = 0.0;
    for (name, script) in &rows {
        let (rss, secs) = best(script);
        if nix_secs == 0.0 {
            nix_secs = secs;
        }
        println!(
            "{name:<36} peak RSS {:>7.1} MiB  {:>6.2} s  {:>7.1} MiB/s  {:.2}x nix's time",
            rss as f64 / 1024.0,
            secs,
            (nar as f64 / (1 << 20) as f64) / secs.max(0.001),
            secs / nix_secs.max(0.001)
        );
    }
    sh(&format!("{tool} umount"));
}
