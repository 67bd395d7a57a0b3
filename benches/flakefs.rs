//! In one run, against named peers: warm lookup+readlink and stat of
//! /nixfs/flake against a native symlink; the first access of a reference
//! evaluated and found in the lower, and of one published in the lower's
//! index, against one `nix build` per access (what illustris/nixfs runs on
//! every readlink), measured on the same reference and store; the server's
//! memory with 10,000 cached entries, and after a flood of 20,000 distinct
//! names from an unprivileged user.
//!
//!     sudo cargo bench --bench flakefs
//!
//! Needs root, Nix, FUSE and overlayfs, like the integration tests; runs
//! in a private mount and PID namespace with a tmpfs on /nix (nothing is
//! left mounted on the host).

#[path = "common/mod.rs"]
mod common;

use common::{nix_env, sh};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const ENTRIES: usize = 10_000;
const ROUNDS: usize = 200_000;
/// Distinct names an unprivileged user floods the tree with.
const FLOOD: usize = 20_000;
/// References not published whose path the lower has: each first access
/// evaluates.
const EVALUATED: [&str; 5] = [
    "myflake#hello",
    "myflake#default",
    "myflake",
    "myflake#packages.x86_64-linux.hello",
    "myflake#packages.x86_64-linux.default",
];
/// References published into the lower: each first access reads the index.
const PUBLISHED: [&str; 5] = [
    "myflake#extra",
    "myflake#packages.x86_64-linux.extra",
    "myflake#multi",
    "myflake#multi^dev",
    "myflake#packages.x86_64-linux.multi",
];
/// `nix build` runs timed, on the first of [`EVALUATED`].
const NIX_BUILDS: usize = 5;

/// `a` as a multiple of `b`: `1.62x`, or `1/3100` when far below.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("1/{:.0}", 1.0 / r)
    }
}
fn samples_ms(d: &[std::time::Duration]) -> String {
    d.iter()
        .map(|d| format!("{:.2}", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}
fn mean_ms(d: &[std::time::Duration]) -> f64 {
    d.iter().map(|d| d.as_secs_f64()).sum::<f64>() * 1e3 / d.len() as f64
}
fn str_name(r: &str) -> PathBuf {
    Path::new("/nixfs/flake/str").join(r)
}

fn main() {
    common::enter_private_namespace(&["/nix", "/nixfs"]);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let dir = tmp.path();
    sh("mount -t tmpfs bench /nix");
    std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
    sh("mount -t tmpfs bench /run/nixfs-layer-test");

    let flake = dir.join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flake/flake.nix"),
        flake.join("flake.nix"),
    )
    .unwrap();
    let registry = dir.join("registry.json");
    std::fs::write(
        &registry,
        format!(
            r#"{{"version":2,"flakes":[{{"from":{{"type":"indirect","id":"myflake"}},"to":{{"type":"path","path":"{}"}}}}]}}"#,
            flake.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("home")).unwrap();
    let registry_line = format!("flake-registry = {}\n", registry.display());
    let run = |prog: &str, args: &[&str]| {
        let out = nix_env(&mut Command::new(prog), &registry_line)
            .env("HOME", dir.join("home"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let tool = env!("CARGO_BIN_EXE_nixfs-layer");

    let lower = dir.join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    sh(&format!("mount --bind {} /nix", lower.display()));
    run(
        "nix",
        &[
            "build",
            "--no-link",
            &format!("path:{}#hello", flake.display()),
        ],
    );
    sh("umount /nix");
    // The lower's owner publishes references into it from a stack of its
    // own (evaluated and built there, copied into the lower with the index).
    let owner = dir.join("owner");
    run(tool, &["init", "--upper", owner.to_str().unwrap()]);
    run(
        tool,
        &[
            "mount",
            "--lower",
            lower.to_str().unwrap(),
            "--upper",
            owner.to_str().unwrap(),
            "--no-flake-fs",
        ],
    );
    let mut publish = vec!["publish"];
    publish.extend(PUBLISHED);
    publish.extend(["--into", lower.to_str().unwrap()]);
    run(tool, &publish);
    run(tool, &["umount"]);
    let upper = dir.join("upper");
    run(tool, &["init", "--upper", upper.to_str().unwrap()]);
    let hello = run(
        "nix",
        &[
            "eval",
            "--read-only",
            "--raw",
            &format!("path:{}#hello.outPath", flake.display()),
        ],
    );

    // 10,000 pinned references the server finds in its cache when it starts.
    let cache = upper.join("var/nixfs-layer/flake-cache.jsonl");
    std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
    let refs: Vec<String> = (0..ENTRIES)
        .map(|i| format!("github:bench/pkgs/{i:040x}#pkg"))
        .collect();
    let lines: String = refs
        .iter()
        .map(|r| format!("{{\"ref\":\"{r}\",\"path\":\"{hello}\"}}\n"))
        .collect();
    std::fs::write(&cache, lines).unwrap();

    run(
        tool,
        &[
            "mount",
            "--lower",
            lower.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
        ],
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(upper.join("nixfs-layer/mount.json")).unwrap())
            .unwrap();
    let pid = record["flakefs"]["pid"].as_u64().unwrap();
    let rss = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
            .unwrap()
    };

    // First accesses: names neither the kernel nor the server has seen.
    let first = |r: &str| {
        let t = Instant::now();
        let got = std::fs::read_link(str_name(r)).unwrap_or_else(|e| panic!("{r}: {e}"));
        let took = t.elapsed();
        assert!(got.starts_with("/nix/store/"), "{r}: {got:?}");
        (took, got)
    };
    let evaluated: Vec<_> = EVALUATED
        .iter()
        .map(|r| {
            let (took, got) = first(r);
            assert_eq!(got, Path::new(&hello), "{r}");
            took
        })
        .collect();
    let published: Vec<_> = PUBLISHED.iter().map(|r| first(r).0).collect();
    let how = |r: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&run(tool, &["resolve", "--json", r])).unwrap();
        v["how"].as_str().unwrap().to_owned()
    };
    assert_eq!(how(EVALUATED[0]), "lower-hit");
    assert_eq!(how(PUBLISHED[0]), "published");
    // One `nix build` per access, on the same reference and store (Nix 2.8
    // has no --print-out-paths: then --json, which prints the same path).
    let version = run("nix", &["--version"]);
    let print = if run("nix", &["build", "--help"]).contains("--print-out-paths") {
        "--print-out-paths"
    } else {
        "--json"
    };
    let nix_builds: Vec<_> = (0..NIX_BUILDS)
        .map(|_| {
            let t = Instant::now();
            let out = run("nix", &["build", "--no-link", print, EVALUATED[0]]);
            let took = t.elapsed();
            assert!(out.contains(&hello), "{out}");
            took
        })
        .collect();

    let entry = PathBuf::from("/nixfs/flake/str/myflake#hello");
    assert_eq!(std::fs::read_link(&entry).unwrap(), Path::new(&hello));
    let native = PathBuf::from("/run/nixfs-layer-test/native");
    std::os::unix::fs::symlink(&hello, &native).unwrap();
    std::fs::set_permissions(&native, std::fs::Permissions::from_mode(0o777)).ok();

    let time = |f: &dyn Fn()| {
        for _ in 0..1000 {
            f();
        }
        let t = Instant::now();
        for _ in 0..ROUNDS {
            f();
        }
        t.elapsed().as_nanos() as f64 / ROUNDS as f64
    };
    let fuse_readlink = time(&|| {
        std::fs::read_link(&entry).unwrap();
    });
    let native_readlink = time(&|| {
        std::fs::read_link(&native).unwrap();
    });
    let fuse_stat = time(&|| {
        std::fs::metadata(entry.join("bin/hello")).unwrap();
    });
    let native_stat = time(&|| {
        std::fs::metadata(native.join("bin/hello")).unwrap();
    });

    let rss_loaded = rss();
    let t = Instant::now();
    for r in &refs {
        // `/` cannot be in a str name: go through urlenc.
        let p = Path::new("/nixfs/flake/urlenc").join(
            percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
        let got = std::fs::read_link(&p).unwrap_or_else(|e| {
            let why = Command::new("getfattr")
                .args(["--absolute-names", "-n", "user.nixfs.error"])
                .arg(&p)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!("{r}: {e}: {why}")
        });
        assert_eq!(got, Path::new(&hello));
    }
    let first_access = t.elapsed();
    let rss_all = rss();

    let build_ms = mean_ms(&nix_builds);
    let per_build = |ms: f64| format!("{} of one `nix build`", ratio(ms, build_ms));
    println!(
        "nixfs-layer flake tree benchmark, one run ({})",
        version.trim()
    );
    println!(
        "warm ({ROUNDS} rounds each), against a native symlink on tmpfs to the same store path:"
    );
    println!(
        "  readlink  /nixfs/flake/str/myflake#hello             {fuse_readlink:8.0} ns/op   {} native ({native_readlink:.0} ns/op); {}",
        ratio(fuse_readlink, native_readlink),
        per_build(fuse_readlink / 1e6)
    );
    println!(
        "  stat      /nixfs/flake/str/myflake#hello/bin/hello   {fuse_stat:8.0} ns/op   {} native ({native_stat:.0} ns/op)",
        ratio(fuse_stat, native_stat)
    );
    println!(
        "first access (readlink of a name neither the kernel nor the server has seen), against one `nix build` per access:"
    );
    let ev = mean_ms(&evaluated);
    println!(
        "  evaluated, lower hit      {ev:8.2} ms   {}   ({} refs: {} ms)",
        per_build(ev),
        EVALUATED.len(),
        samples_ms(&evaluated)
    );
    let pb = mean_ms(&published);
    println!(
        "  published ref (index)     {pb:8.2} ms   {}; {} of evaluating   ({} refs: {} ms)",
        per_build(pb),
        ratio(pb, ev),
        PUBLISHED.len(),
        samples_ms(&published)
    );
    println!(
        "  `nix build --no-link {print} {}` {build_ms:.2} ms  (illustris/nixfs runs one per access, warm or not; {NIX_BUILDS} runs: {} ms)",
        EVALUATED[0],
        samples_ms(&nix_builds)
    );
    println!("server RSS: {rss_loaded} with {ENTRIES} locked results loaded from its cache file,");
    println!("            {rss_all} after looking up all {ENTRIES} (first lookups took {:.1} ms in all, {:.0} us each)",
        first_access.as_secs_f64() * 1e3, first_access.as_secs_f64() * 1e6 / ENTRIES as f64);

    // A flood of distinct names from an unprivileged user (nobody, refused:
    // no nix-daemon here to evaluate as them; each refusal kept for them).
    let t = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                // SAFETY: raw syscalls change this thread's credentials only.
                unsafe {
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
                    libc::syscall(libc::SYS_setfsgid, 65534);
                    libc::syscall(libc::SYS_setfsuid, 65534);
                }
                for i in (k..FLOOD).step_by(4) {
                    let _ = std::fs::symlink_metadata(format!("/nixfs/flake/str/nosuch{i}#x"));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let flood = t.elapsed();
    let rss_flood = rss();
    let t = Instant::now();
    assert_eq!(
        std::fs::read_link("/nixfs/flake/b64/bXlmbGFrZSNoZWxsbw").unwrap(),
        Path::new(&hello)
    );
    let root_after = t.elapsed();
    println!("            {rss_flood} after {FLOOD} distinct names from nobody ({:.1} s; a root lookup of a new name then took {:.2} ms)",
        flood.as_secs_f64(), root_after.as_secs_f64() * 1e3);
    run(tool, &["umount"]);
}
