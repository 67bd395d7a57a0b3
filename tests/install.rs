//! `make install` puts every file where distributions look for it, under
//! PREFIX and DESTDIR, the installed binary runs, the unit names it where
//! it was put, and `make uninstall` removes exactly what was installed;
//! `make demo` installs only the packages the demo uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use nixfs_layer::cli::Cli;

fn make(args: &[&str]) {
    let out = Command::new("make")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .arg(concat!("BIN=", env!("CARGO_BIN_EXE_nixfs-layer")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every regular file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
        .collect();
    all.sort();
    all
}

fn installed(prefix: &str) -> Vec<String> {
    let p = prefix.trim_start_matches('/');
    let mut want: Vec<String> = vec![
        format!("{p}/bin/nixfs-layer"),
        format!("{p}/share/bash-completion/completions/nixfs-layer"),
        format!("{p}/share/zsh/site-functions/_nixfs-layer"),
        format!("{p}/share/fish/vendor_completions.d/nixfs-layer.fish"),
        format!("{p}/lib/systemd/system/nixfs-layer.service"),
        format!("{p}/lib/systemd/system/nix-daemon.service.d/nixfs-layer.conf"),
        format!("{p}/lib/systemd/system/nix-daemon.socket.d/nixfs-layer.conf"),
        format!("{p}/share/nixfs-layer/nixos/module.nix"),
        format!("{p}/share/nixfs-layer/nixos/render-config.nix"),
        format!("{p}/share/man/man1/nixfs-layer.1"),
    ];
    fn pages(cmd: &clap::Command, stem: &str, p: &str, want: &mut Vec<String>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{stem}-{}", sub.get_name());
            want.push(format!("{p}/share/man/man1/{name}.1"));
            pages(sub, &name, p, want);
        }
    }
    pages(&Cli::command(), "nixfs-layer", p, &mut want);
    want.sort();
    want
}

#[rstest::rstest]
#[case("/usr")]
#[case("/usr/local")]
#[case("/opt/nixfs")]
fn make_install_honours_prefix_and_destdir_and_uninstall_removes_it(#[case] prefix: &str) {
    let dest = tempfile::tempdir().unwrap();
    let destdir = format!("DESTDIR={}", dest.path().display());
    let prefix_arg = format!("PREFIX={prefix}");
    make(&["install", &destdir, &prefix_arg]);
    assert_eq!(files(dest.path()), installed(prefix));

    let root = PathBuf::from(dest.path()).join(prefix.trim_start_matches('/'));
    let out = Command::new(root.join("bin/nixfs-layer"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("nixfs-layer {}", env!("CARGO_PKG_VERSION"))
    );
    let mode = |p: &str| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(root.join(p)).unwrap().permissions(),
        ) & 0o777
    };
    assert_eq!(mode("bin/nixfs-layer"), 0o755);
    assert_eq!(mode("lib/systemd/system/nixfs-layer.service"), 0o644);
    assert_eq!(mode("share/man/man1/nixfs-layer.1"), 0o644);

    // The unit runs the binary where PREFIX put it (no DESTDIR in it).
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/nixfs-layer.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={prefix}/bin/nixfs-layer mount --foreground"
        )),
        "{unit}"
    );
    assert!(!unit.contains(&dest.path().display().to_string()), "{unit}");
    if prefix != "/usr" {
        assert!(!unit.contains("/usr/bin/nixfs-layer"), "{unit}");
    }

    // The installed page renders.
    let page = Command::new("man")
        .arg("-l")
        .arg(root.join("share/man/man1/nixfs-layer-mount.1"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    assert!(page.status.success());

    make(&["uninstall", &destdir, &prefix_arg]);
    assert_eq!(files(dest.path()), Vec::<String>::new());
}

/// `make demo` installs what the demo uses (Nix, unshare), not the test
/// suite's extras (sshfs, OpenSSH, FUSE, …).
#[test]
fn the_demo_installs_only_what_it_uses() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let list = |args: &[&str]| -> Vec<String> {
        let out = Command::new(repo.join("scripts/install-deps.sh"))
            .args(args)
            .arg("--list")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(list(&["--demo"]), ["nix-bin", "util-linux"]);
    let all = list(&[]);
    for p in [
        "nix-bin",
        "util-linux",
        "fuse3",
        "openssh-server",
        "sshfs",
        "zsh",
        "fish",
    ] {
        assert!(all.contains(&p.to_owned()), "the suite needs {p}: {all:?}");
    }
    let demo = std::fs::read_to_string(repo.join("scripts/demo.sh")).unwrap();
    let calls: Vec<&str> = demo
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("scripts/install-deps.sh"))
        .collect();
    assert_eq!(
        calls,
        ["scripts/install-deps.sh --demo"],
        "demo.sh installs the demo's only"
    );
}
