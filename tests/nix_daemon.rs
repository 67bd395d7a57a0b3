//! The multi-user nix-daemon on the stack, as most NixOS and CI machines
//! run Nix: a real nix-daemon of the suite's Nix building as the nixbld
//! users (Debian's nix-setup-systemd makes them; scripts/install-deps.sh
//! installs it), an unprivileged user building through it into the upper,
//! collecting through it, `sync` while it serves, and what `mount` and
//! `umount` say about a daemon started in the wrong order. Each test in its
//! own mount and PID namespace.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;

use common::{base_name, sh, stderr, tree_digest, upper_entries, Stack, DAEMON_SOCKET};

/// The uid of `nobody`: an unprivileged user of the machine.
const NOBODY: u32 = 65534;

/// A daemon that builds as the build users, like Debian's and NixOS's.
const MULTI_USER: &str = "build-users-group = nixbld";

fn stack() -> Stack {
    let s = Stack::new(&["app", "tool"]);
    // nobody reaches the fixtures and its HOME under the scratch directory.
    std::fs::set_permissions(s.w.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    s
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// A derivation on top of the lower's liba that records the uid it was
/// built as, for nobody to build.
fn user_expr(salt: &str) -> String {
    format!(
        r#"let s = import {} {{}}; in builtins.derivation {{
  name = "user-build{salt}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  liba = s.liba;
  args = [ "-c" "mkdir -p $out && id -u > $out/built-by && echo $liba > $out/dep" ];
}}"#,
        common::fixture("store.nix")
    )
}

fn nixbld_uids() -> Vec<u32> {
    // The build users of the Nix under test: the chroot's or the host's.
    let group = match common::TestNix::from_env() {
        common::TestNix::Host => std::fs::read_to_string("/etc/group").unwrap(),
        common::TestNix::Chroot(root) => std::fs::read_to_string(root.join("etc/group")).unwrap(),
    };
    let passwd = match common::TestNix::from_env() {
        common::TestNix::Host => std::fs::read_to_string("/etc/passwd").unwrap(),
        common::TestNix::Chroot(root) => std::fs::read_to_string(root.join("etc/passwd")).unwrap(),
    };
    let members: Vec<&str> = group
        .lines()
        .find(|l| l.starts_with("nixbld:"))
        .expect("a nixbld group (scripts/install-deps.sh installs nix-setup-systemd)")
        .rsplit(':')
        .next()
        .unwrap()
        .split(',')
        .collect();
    passwd
        .lines()
        .filter(|l| members.contains(&l.split(':').next().unwrap()))
        .map(|l| l.split(':').nth(2).unwrap().parse().unwrap())
        .collect()
}

ns_test! {
    fn a_user_builds_and_collects_through_the_daemon_and_sync_goes_on_beside_it() {
        let s = stack();
        let lower_digest = tree_digest(&s.lower);
        s.mount();
        let daemon = s.w.start_nix_daemon(MULTI_USER, true);

        // nobody builds on top of a lower path, through the daemon.
        let out = ok(
            s.w.nix_as(NOBODY, "nix-build").args(["--no-out-link", "-E", &user_expr("")]).output().unwrap(),
            "nix-build as nobody through the daemon",
        );
        let built = out.trim().to_owned();
        assert!(upper_entries(&s.upper).contains(&base_name(&built).to_owned()), "{built} lands in the upper");
        assert!(!s.lower.join("store").join(base_name(&built)).exists(), "and not in the lower");
        let by: u32 = std::fs::read_to_string(format!("{built}/built-by")).unwrap().trim().parse().unwrap();
        assert!(nixbld_uids().contains(&by), "built as a build user, not {by}: {:?}", nixbld_uids());
        assert_eq!(std::fs::metadata(&built).unwrap().uid(), 0, "the output is the store's (root's)");
        let liba = s.lower_path("liba");
        assert_eq!(std::fs::read_to_string(format!("{built}/dep")).unwrap().trim(), liba);
        // nobody sees every lower path as valid through the daemon.
        let all = ok(s.w.nix_as(NOBODY, "nix-store").args(["-q", "--requisites", &built]).output().unwrap(), "nix-store -qR as nobody");
        assert!(all.lines().any(|l| l == liba), "{all}");

        // The lower's owner publishes a path; sync picks it up while the
        // daemon serves, and nobody sees it valid through the daemon.
        let before = s.w.with_nix_at(&s.lower, || s.w.nix_ok("nix-build", ["--no-out-link", &common::fixture("store.nix"), "-A", "extra"]));
        let extra = before.trim().to_owned();
        let said = s.w.tool_ok(["sync"]);
        assert!(said.starts_with("sync: added ") && !said.starts_with("sync: added 0") && said.contains("removed 0"), "{said}");
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &extra]).output().unwrap();
        assert!(v.status.success(), "the new lower path is valid through the daemon: {}", stderr(&v));

        // GC through the daemon (root, NIX_REMOTE=daemon): nobody's
        // unrooted build goes, every lower path stays valid and untouched.
        let mut gc = s.w.nix("nix-store");
        gc.env("NIX_REMOTE", "daemon").arg("--gc");
        ok(gc.output().unwrap(), "nix-store --gc through the daemon");
        assert!(!std::path::Path::new(&built).exists(), "nobody's unrooted build is collected");
        for p in s.lower_paths.iter().chain([&extra]) {
            assert!(s.valid(p), "{p} stays valid after the daemon's GC");
        }
        // Every entry the lower had is as it was (the owner's new paths
        // and database aside).
        let lower_now = tree_digest(&s.lower);
        for (k, v) in &lower_digest {
            if k.as_os_str().is_empty() || k == std::path::Path::new("store") || k.starts_with("var") {
                continue;
            }
            assert_eq!(lower_now.get(k), Some(v), "{} is untouched by the daemon's GC", k.display());
        }
        common::verify_contents(&s.w);

        // umount while the daemon serves: refused, naming it; nothing torn down.
        let o = s.w.tool(["umount"]);
        assert_eq!(o.status.code(), Some(75), "umount with the daemon up: {}", stderr(&o));
        let msg = stderr(&o);
        assert!(msg.contains(&format!("pid {}", daemon.pid())) && msg.contains("nix-daemon"), "{msg}");
        assert!(std::os::unix::net::UnixStream::connect(DAEMON_SOCKET).is_ok(), "the daemon still serves the stack");
        drop(daemon);
        s.w.tool_ok(["umount"]);
    }
}

ns_test! {
    fn a_daemon_started_before_the_mount_is_named_and_a_restart_serves_the_stack() {
        let s = stack();
        // The machine's own (empty) store, and a daemon on it: the order
        // of a host whose nix-daemon starts before nixfs-layer.
        sh("mkdir -p /nix/store /nix/var/nix/db /nix/var/nix/daemon-socket");
        let mut early = s.w.start_nix_daemon(MULTI_USER, true);
        let o = s.w.tool(["mount", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let msg = stderr(&o);
        assert!(
            msg.contains(&format!("nix-daemon (pid {})", early.pid())) && msg.contains(DAEMON_SOCKET) && msg.contains("restart"),
            "mount names the daemon it covered: {msg}"
        );
        assert_eq!(msg.lines().count(), 1, "{msg}");
        // Its clients cannot reach it: they find the stack's state there.
        let liba = s.lower_path("liba");
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &liba]).output().unwrap();
        assert!(!v.status.success(), "a client reaches the covered daemon");
        // The covered daemon holds nothing of the stack: umount goes while
        // it runs on (serving the store beneath).
        let out = s.w.tool(["umount"]);
        assert!(out.status.success(), "umount beside a covered daemon: {}", stderr(&out));
        assert!(early.alive(), "the covered daemon runs on");
        s.w.tool_ok(["mount", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        // Restarted after the mount, a daemon serves the stack.
        drop(early);
        let daemon = s.w.start_nix_daemon(MULTI_USER, true);
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &liba]).output().unwrap();
        assert!(v.status.success(), "after the restart: {}", stderr(&v));
        // A mount with the daemon already on the stack warns of nothing:
        // stop both, mount again with no daemon, start it after.
        drop(daemon);
        s.w.tool_ok(["umount"]);
        let o = s.w.tool(["mount", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        assert!(o.status.success() && stderr(&o).is_empty(), "a mount before the daemon: {}", stderr(&o));
        let _daemon = s.w.start_nix_daemon(MULTI_USER, true);
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &liba]).output().unwrap();
        assert!(v.status.success(), "{}", stderr(&v));
    }
}

ns_test! {
    fn a_switch_to_new_lowers_while_the_daemon_serves_is_refused_whole() {
        let s = stack();
        s.mount();
        let daemon = s.w.start_nix_daemon(MULTI_USER, true);
        let gen2 = s.w.path("lower-2");
        sh(&format!("cp -a {} {}", s.lower.display(), gen2.display()));
        let mounts = common::mount_table();
        let o = s.w.tool(["sync", "--lower", gen2.to_str().unwrap(), "--keep-needed"]);
        assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
        let msg = stderr(&o);
        assert!(msg.contains(&format!("pid {} (nix-daemon", daemon.pid())) && msg.contains("nothing was unmounted"), "{msg}");
        assert_eq!(common::mount_table(), mounts, "the stack on the old lower, as it was");
        let liba = s.lower_path("liba");
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &liba]).output().unwrap();
        assert!(v.status.success(), "the daemon serves on: {}", stderr(&v));
        // Stopped, switched, started again: it serves the new stack.
        drop(daemon);
        s.w.tool_ok(["sync", "--lower", gen2.to_str().unwrap(), "--keep-needed"]);
        assert!(common::mountinfo().contains(&format!("lowerdir={}/store", gen2.display())));
        let _daemon = s.w.start_nix_daemon(MULTI_USER, true);
        let v = s.w.nix_as(NOBODY, "nix-store").args(["-q", "--hash", &liba]).output().unwrap();
        assert!(v.status.success(), "{}", stderr(&v));
    }
}

ns_test! {
    fn a_listener_of_another_namespace_neither_warns_nor_holds_the_stack() {
        let s = stack();
        // Another mount namespace with a /nix of its own, listening at the
        // same path (a container's nix-daemon, another stack's).
        let mut other = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs other /nix && mkdir -p /nix/var/nix/daemon-socket && exec python3 -c '{}'",
                "import socket,time; s=socket.socket(socket.AF_UNIX); s.bind(\"/nix/var/nix/daemon-socket/socket\"); s.listen(); print(\"up\", flush=True); time.sleep(600)"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(other.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "up");
        let o = s.w.tool(["mount", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap()]);
        assert!(o.status.success() && stderr(&o).is_empty(), "no warning for another namespace's socket: {}", stderr(&o));
        let o = s.w.tool(["umount"]);
        assert!(o.status.success(), "another namespace's listener holds nothing of the stack: {}", stderr(&o));
        let _ = other.kill();
        let _ = other.wait();
    }
}
