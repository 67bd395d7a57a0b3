//! Shared by the benchmarks: running in a private namespace, shell steps,
//! the environment Nix runs in.
#![allow(dead_code)]

use std::process::Command;

const IN_NS: &str = "NIXFS_LAYER_BENCH_IN_NS";

/// Makes the rest of `main` run in a mount and pid namespace of its own
/// (as root), so nothing the benchmark mounts reaches the host: the first
/// call re-runs this binary under `unshare` and exits with its status; in
/// the re-run it returns. `mount_points` are created on the host first.
/// Also returns at once for `--list` (cargo asking for a test list).
pub fn enter_private_namespace(mount_points: &[&str]) {
    if std::env::args().any(|a| a == "--list") {
        std::process::exit(0);
    }
    if std::env::var_os(IN_NS).is_some() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark mounts: run it as root"
    );
    for p in mount_points {
        std::fs::create_dir_all(p).unwrap();
    }
    let status = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env(IN_NS, "1")
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}

/// Sets the environment the benchmarks run Nix with on `c`: the local
/// store at /nix, no daemon, no build users, no substituters, no sandbox,
/// no NIX_PATH; `extra_config` (whole lines) is added to NIX_CONFIG.
pub fn nix_env<'a>(c: &'a mut Command, extra_config: &str) -> &'a mut Command {
    c.env("NIX_REMOTE", "local")
        .env(
            "NIX_CONFIG",
            format!(
                "build-users-group =\nsubstituters =\nsandbox = false\n\
                 experimental-features = nix-command flakes\n{extra_config}"
            ),
        )
        .env_remove("NIX_PATH")
}

/// Runs a shell script; panics with its stderr on failure; returns stdout.
pub fn sh(script: &str) -> String {
    run_sh(&mut Command::new("sh"), script)
}

/// [`sh`] with the Nix environment of [`nix_env`].
pub fn nix_sh(script: &str) -> String {
    run_sh(nix_env(&mut Command::new("sh"), ""), script)
}

fn run_sh(c: &mut Command, script: &str) -> String {
    let out = c.arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One line describing the machine: cores, CPU, memory, kernel, Nix.
pub fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_gib = read("/proc/meminfo")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k / 1024 / 1024);
    let nix = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{cores} cores ({cpu}), {mem_gib} GiB RAM, kernel {}, {nix}",
        read("/proc/sys/kernel/osrelease").trim()
    )
}
