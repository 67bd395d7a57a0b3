//! `nixfs-layer run`: a stack in a mount namespace of its own, for an
//! unprivileged user (a user namespace, Nix single-user) and for root (a
//! private mount namespace), with nothing left on the host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{base_name, fixture, mount_table, sh, stderr, tree_digest, Stack, TestUser};

/// Runs `script` with `sh -c` inside `nixfs-layer run` of the stack's
/// lower and `upper`, as `user`, with more `run` flags before `--`.
fn run_as(s: &Stack, user: &TestUser, upper: &Path, flags: &[&str], script: &str) -> Output {
    let mut c = user.tool(&s.w);
    c.args(["run", "--lower", s.lower.to_str().unwrap(), "--upper"])
        .arg(upper)
        .args(flags)
        .args(["--", "sh", "-c", script, "sh"]);
    c.output().unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The value after `key=` on a line of the script's output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

/// The tool's path, for scripts run inside `run`.
const TOOL: &str = env!("CARGO_BIN_EXE_nixfs-layer");

/// `sh -c` prefix running `user`'s command in a root without /nix: a
/// tmpfs holding binds of every other top-level entry, pivoted into in a
/// mount namespace of its own (the host of a user who never had Nix).
fn without_nix(root: &Path) -> String {
    format!(
        r#"set -e
r={root}
mkdir -p "$r" && mount -t tmpfs no-nix "$r"
for e in /*; do
  n=${{e#/}}
  [ "$n" = nix ] && continue
  if [ -L "$e" ]; then ln -s "$(readlink "$e")" "$r/$n"
  elif [ -d "$e" ]; then mkdir "$r/$n" && mount --rbind "$e" "$r/$n"
  fi
done
cd "$r" && pivot_root . . && umount -l .
cd /
test ! -e /nix
exec "$@"
"#,
        root = root.display()
    )
}

ns_test! {
    fn an_unprivileged_user_builds_on_a_read_only_lower() {
        let s = Stack::new(&["app", "tool"]);
        let user = TestUser::new(&s.w);
        let lower_before = tree_digest(&s.lower);
        let mounts_before = mount_table();

        // `init` as the user, on a directory it owns.
        let upper = user.home.join("upper");
        let out = user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap();
        ok(&out, "init as the user");
        let meta = std::fs::metadata(upper.join("var/nix/db/db.sqlite")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user.uid);

        // A build on lower paths, Nix's own check, Nix's own collector,
        // and the tool's commands on the stack, all inside one run.
        let lower_paths: Vec<&str> = s.lower_paths.iter().map(String::as_str).collect();
        let script = format!(
            r#"set -e
echo uid=$(id -u)
out=$(nix-build -o "$HOME/result" {fixture} -A onTop)
echo out=$out
nix-store --verify --check-contents 2> "$HOME/verify.log"
nix-collect-garbage > /dev/null 2>&1
nix-store --check-validity {lower} "$out"
echo after-gc=valid
{tool} status > "$HOME/status.txt"
{tool} verify > "$HOME/tool-verify.txt"
{tool} sync
{tool} gc --dry-run
{tool} diff --json > "$HOME/diff.json"
{tool} export "$out" -o "$HOME/out.export"
"#,
            fixture = fixture("store.nix"),
            lower = lower_paths.join(" "),
            tool = TOOL,
        );
        let out = run_as(&s, &user, &upper, &["--no-flake-fs"], &script);
        let text = ok(&out, "the first run");
        let err = stderr(&out);
        assert_eq!(field(&text, "uid"), "0", "the user is root inside");
        assert!(err.contains("in a user namespace"), "{err}");
        let built = field(&text, "out").to_owned();
        assert!(built.ends_with("-on-top"), "{text}");
        assert_eq!(field(&text, "after-gc"), "valid", "{text}");

        // The output landed in the user's upper, not in the lower.
        let in_upper = upper.join("store").join(base_name(&built));
        let meta = std::fs::symlink_metadata(&in_upper).expect("the build is in the upper");
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user.uid);
        assert!(!s.lower.join("store").join(base_name(&built)).exists());
        // Nix's check was clean.
        let verify = std::fs::read_to_string(user.home.join("verify.log")).unwrap();
        for bad in ["error", "corrupt", "disappeared", "modified", "warning"] {
            assert!(!verify.to_lowercase().contains(bad), "nix-store --verify: {verify}");
        }
        // The tool's own commands worked inside.
        let status = std::fs::read_to_string(user.home.join("status.txt")).unwrap();
        assert!(status.starts_with("/nix: mounted"), "{status}");
        assert!(status.contains("a user namespace cannot seal"), "{status}");
        let tv = std::fs::read_to_string(user.home.join("tool-verify.txt")).unwrap();
        assert!(tv.trim_end().ends_with("clean"), "{tv}");
        let diff = std::fs::read_to_string(user.home.join("diff.json")).unwrap();
        assert!(diff.contains(base_name(&built)), "{diff}");
        assert!(std::fs::metadata(user.home.join("out.export")).unwrap().len() > 0);
        // Nothing stays: no record of a mount in the upper.
        assert!(!upper.join("nixfs-layer/mount.json").exists());

        // A second run, on a host without /nix: the rooted build is there.
        let root = s.w.path("no-nix-root");
        let script = format!(
            "set -e\nnix-store --check-validity \"$(readlink \"$HOME/result\")\" {}\necho again=valid\necho status=$({TOOL} status | head -n 1)\n",
            lower_paths.join(" ")
        );
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(without_nix(&root))
            .arg("sh")
            .arg("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(TOOL)
            .args(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper"])
            .arg(&upper)
            .args(["--", "sh", "-c", &script]);
        s.w.nix_env(&mut c);
        user.env(&mut c);
        let out = c.output().unwrap();
        let text = ok(&out, "the second run, without /nix on the host");
        assert_eq!(field(&text, "again"), "valid", "{text}");
        assert_eq!(field(&text, "status"), "/nix: mounted", "{text}");

        assert_eq!(tree_digest(&s.lower), lower_before, "the lower is unchanged");
        assert_eq!(mount_table(), mounts_before, "nothing is mounted outside");
    }
}

ns_test! {
    fn the_flake_tree_resolves_a_reference_inside_an_unprivileged_run() {
        let s = Stack::new(&["tool"]);
        let user = TestUser::new(&s.w);
        std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
        sh("mount -t tmpfs nixfs-layer-test /run/nixfs-layer-test && touch /run/nixfs-layer-test/builds");
        let flake = s.w.path("flake");
        std::fs::create_dir(&flake).unwrap();
        std::fs::copy(fixture("flake/flake.nix"), flake.join("flake.nix")).unwrap();
        let reference = format!("path:{}#hello", flake.display());
        let hello = s.w.with_nix_at(&s.lower, || {
            s.w.nix_ok("nix", ["build", "--no-link", &reference]);
            let v = s.w.nix_ok("nix", ["eval", "--read-only", "--json", &format!("{reference}.outPath")]);
            serde_json::from_str::<String>(&v).unwrap()
        });
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let name = base64url(&reference);
        let script = format!("readlink /nixfs/flake/b64/{name}\n");

        // /dev/fuse is 0600 here: the run says so in one line and goes on.
        let out = run_as(&s, &user, &upper, &[], "echo went-on");
        let text = ok(&out, "a run without /dev/fuse");
        assert_eq!(text.trim(), "went-on");
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("flake tree is not mounted")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains("/dev/fuse"), "{err}");

        // 0666, as stock distributions have it: a node of the same device
        // bound over /dev/fuse in this test's namespace only.
        let node = s.w.path("fuse");
        sh(&format!(
            "mknod {0} c 10 229 && chmod 0666 {0} && mount --bind {0} /dev/fuse",
            node.display()
        ));
        let out = run_as(&s, &user, &upper, &[], &script);
        let text = ok(&out, "the run with the flake tree");
        assert_eq!(text.trim(), hello, "{}", stderr(&out));
        assert!(stderr(&out).contains("flake tree at /nixfs"), "{}", stderr(&out));
        sh("umount /dev/fuse");
    }
}

fn base64url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

ns_test! {
    fn disabled_user_namespaces_give_one_line_naming_the_setting() {
        let s = Stack::new(&["tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        // A user namespace (mapping the host's ids) whose limit on user
        // namespaces is 0, entered as the unprivileged user.
        let script = format!(
            r#"unshare --user sleep 600 & p=$!
while [ "$(readlink /proc/$p/ns/user)" = "$(readlink /proc/self/ns/user)" ]; do sleep 0.05; done
echo '0 0 65536' > /proc/$p/uid_map && echo '0 0 65536' > /proc/$p/gid_map
nsenter --user --target $p sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "$@"' sh "$@"
rc=$?
kill $p
exit $rc
"#,
            uid = user.uid,
            gid = user.gid
        );
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(TOOL)
            .args(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper"])
            .arg(&upper)
            .args(["--", "true"]);
        s.w.nix_env(&mut c);
        user.env(&mut c);
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("user.max_user_namespaces = 0"), "{err}");
        assert!(err.contains("sysctl -w user.max_user_namespaces="), "{err}");
        assert!(!upper.join("nixfs-layer/mount.json").exists());
    }
}

ns_test! {
    fn a_lower_database_the_user_cannot_read_is_named() {
        let s = Stack::new(&["tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let db = s.lower.join("var/nix/db/db.sqlite");
        sh(&format!("chmod 0600 {}", db.display()));
        let out = run_as(&s, &user, &upper, &["--no-flake-fs"], "true");
        assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("cannot read its database {}", db.display())), "{err}");
        assert!(err.contains("chmod a+r"), "{err}");
    }
}

ns_test! {
    fn roots_run_leaves_nothing_on_the_host() {
        let s = Stack::new(&["app", "tool"]);
        let mounts_before = mount_table();
        let lower_before = tree_digest(&s.lower);
        // Target locks are named after the mount namespace (whose number
        // a later namespace may reuse): compare before and after.
        let locks = || -> std::collections::BTreeSet<PathBuf> {
            std::fs::read_dir("/run/nixfs-layer")
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let locks_before = locks();
        let script = format!(
            "set -e\necho ns=$(readlink /proc/self/ns/mnt | tr -dc 0-9)\nout=$(nix-build --no-out-link {} -A onTop)\necho out=$out\nlsattr -d {}/work/work | cut -c1-22\nexit 3\n",
            fixture("store.nix"),
            s.upper.display()
        );
        let out = s.w.tool(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "sh", "-c", &script]);
        assert_eq!(out.status.code(), Some(3), "the command's status: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let built = field(&text, "out");
        assert!(s.upper.join("store").join(base_name(built)).exists(), "{text}");
        assert!(text.contains("----i-"), "sealed while it ran: {text}");
        assert_eq!(mount_table(), mounts_before, "no mount outside");
        let ns = format!("mnt-{}-", field(&text, "ns"));
        let new_locks: Vec<_> = locks()
            .difference(&locks_before)
            .filter(|p| p.to_string_lossy().contains(&ns))
            .cloned()
            .collect();
        assert!(new_locks.is_empty(), "no target lock under /run/nixfs-layer: {new_locks:?}");
        assert!(!s.upper.join("nixfs-layer/mount.json").exists());
        assert!(!sh(&format!("lsattr -d {}/work/work", s.upper.display())).contains("-i-"), "unsealed after");
        assert_eq!(tree_digest(&s.lower), lower_before);

        // A signal that ends the command: 128 + its number.
        let out = s.w.tool(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "sh", "-c", "kill -TERM $$"]);
        assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
        // A command that does not exist: 127, as shells have it.
        let out = s.w.tool(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "/nonexistent/cmd"]);
        assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
        assert_eq!(mount_table(), mounts_before);
    }
}

ns_test! {
    fn what_a_user_namespace_cannot_seal_is_refused_or_repaired() {
        let s = Stack::new(&["app", "tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let lower_before = tree_digest(&s.lower);
        let app = s.lower_path("app");
        let drv = s
            .lower_paths
            .iter()
            .find(|p| p.ends_with("-app.drv"))
            .expect("the lower has app's derivation")
            .clone();
        // Inside a store path everything belongs to the lower's owner,
        // whom the namespace does not map: the kernel refuses.
        let script = format!(
            r#"rm -rf {app} 2>/dev/null; echo rm-dir=$?
chmod u+w {app}/bin 2>/dev/null; echo chmod=$?
ln {app}/bin/app /nix/store/.links/x 2>/dev/null; echo link=$?
rm -f {drv}; echo rm-file=$?
{tool} verify > "$HOME/verify.txt"; echo verify=$?
{tool} verify --repair > /dev/null; echo repair=$?
"#,
            tool = TOOL
        );
        let out = run_as(&s, &user, &upper, &["--no-flake-fs"], &script);
        let text = ok(&out, "the run");
        assert_ne!(field(&text, "rm-dir"), "0", "{text}");
        assert_ne!(field(&text, "chmod"), "0", "{text}");
        assert_ne!(field(&text, "link"), "0", "{text}");
        // A single-file store path at the top, in the user's own store
        // directory, can be hidden (a whiteout in the user's upper only):
        // verify names it and --repair takes the whiteout away.
        assert_eq!(field(&text, "rm-file"), "0", "{text}");
        assert_eq!(field(&text, "verify"), "1", "{text}");
        let verify = std::fs::read_to_string(user.home.join("verify.txt")).unwrap();
        let hidden = verify.lines().find(|l| l.starts_with("hidden by whiteouts")).unwrap();
        assert!(hidden.contains(&drv), "{verify}");
        assert_eq!(field(&text, "repair"), "0", "{text}");
        let out = run_as(
            &s,
            &user,
            &upper,
            &["--no-flake-fs"],
            &format!("test -e {drv} && echo back=yes\n{TOOL} verify > /dev/null; echo verify=$?\n"),
        );
        let text = ok(&out, "the next run");
        assert_eq!(field(&text, "back"), "yes", "{text}");
        assert_eq!(field(&text, "verify"), "0", "{text}");
        assert_eq!(tree_digest(&s.lower), lower_before, "the lower itself is untouched");
    }
}

ns_test! {
    fn one_upper_serves_one_run_at_a_time() {
        let s = Stack::new(&["tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let mut first = user.tool(&s.w);
        first
            .args(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper"])
            .arg(&upper)
            .args(["--", "sh", "-c", "touch \"$HOME/up\"; sleep 3"]);
        let mut first = first.spawn().unwrap();
        assert!(common::hosts::wait_for(20, || user.home.join("up").exists()));
        let out = run_as(&s, &user, &upper, &["--no-flake-fs"], "true");
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("in another mount namespace"), "{err}");
        assert!(first.wait().unwrap().success());
        ok(&run_as(&s, &user, &upper, &["--no-flake-fs"], "true"), "the next run");
    }
}

ns_test! {
    fn modern_nix_builds_inside_an_unprivileged_run_too() {
        // Debian trixie's Nix 2.26, from the suite's chroot: it picks up
        // the single-user setting from NIX_CONFIG as 2.8 does.
        let chroot = common::modern_chroot();
        let s = Stack::new(&["app", "tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // The directory the scratch space is bound on, inside the chroot.
        sh(&format!("mkdir -p {}{}", chroot.display(), scratch.display()));
        let expr = user.home.join("store.nix");
        std::fs::copy(fixture("store.nix"), &expr).unwrap();
        let script = format!(
            r#"set -e
c={chroot}
for d in /nix /proc /dev {scratch}; do mount --rbind "$d" "$c$d"; done
chroot "$c" nix-build --version | sed 's/^/version=/'
out=$(chroot "$c" env HOME="$HOME" nix-build -o "$HOME/result" {expr} -A onTop)
echo out=$out
chroot "$c" nix-store --verify --check-contents 2> "$HOME/verify.log"
"#,
            chroot = chroot.display(),
            scratch = scratch.display(),
            expr = expr.display(),
        );
        let out = run_as(&s, &user, &upper, &["--no-flake-fs"], &script);
        let text = ok(&out, "the run with Nix 2.26");
        assert!(field(&text, "version").contains("2.26"), "{text}");
        let built = field(&text, "out").to_owned();
        assert!(upper.join("store").join(base_name(&built)).exists(), "{text}");
        let verify = std::fs::read_to_string(user.home.join("verify.log")).unwrap();
        for bad in ["error", "corrupt", "disappeared", "modified", "warning"] {
            assert!(!verify.to_lowercase().contains(bad), "nix-store --verify (2.26): {verify}");
        }
        // The host's Nix 2.8 finds it valid in the next run.
        let out = run_as(
            &s,
            &user,
            &upper,
            &["--no-flake-fs"],
            &format!("nix-store --check-validity {built} && echo valid=yes\n"),
        );
        assert_eq!(field(&ok(&out, "the run with Nix 2.8"), "valid"), "yes");
    }
}

ns_test! {
    fn the_machines_own_nix_is_a_lower_for_its_users() {
        // A machine whose /nix holds a store (here a tmpfs the test's Nix
        // built into); a user without root stacks an upper of its own
        // over it, at /nix.
        let w = common::World::new();
        let machine_paths = w.build(&["app", "tool"]);
        let user = TestUser::new(&w);
        let nix = Path::new("/nix");
        let before = tree_digest(nix);
        let mounts_before = mount_table();
        let upper = user.home.join("upper");
        ok(&user.tool(&w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let script = format!(
            "set -e\nout=$(nix-build --no-out-link {} -A onTop)\necho out=$out\nnix-store --check-validity {}\necho lower=valid\n",
            fixture("store.nix"),
            machine_paths.join(" ")
        );
        let mut c = user.tool(&w);
        c.args(["run", "--no-flake-fs", "--lower", "/nix", "--upper"])
            .arg(&upper)
            .args(["--", "sh", "-c", &script]);
        let out = c.output().unwrap();
        let text = ok(&out, "run --lower /nix");
        assert_eq!(field(&text, "lower"), "valid", "{text}");
        let built = field(&text, "out");
        assert!(upper.join("store").join(base_name(built)).exists(), "{text}");
        assert!(!nix.join("store").join(base_name(built)).exists());
        assert_eq!(tree_digest(nix), before, "the machine's /nix is unchanged");
        assert_eq!(mount_table(), mounts_before);
    }
}

ns_test! {
    fn bash_on_a_terminal_is_the_shell() {
        let s = Stack::new(&["tool"]);
        let user = TestUser::new(&s.w);
        let upper = user.home.join("upper");
        ok(&user.tool(&s.w).args(["init", "--upper"]).arg(&upper).output().unwrap(), "init");
        let tool = s.lower_path("tool");
        // An interactive bash on a pseudo-terminal (script(1)), typed at.
        let typed = user.home.join("typed");
        std::fs::write(&typed, format!("echo in-$((6*7)); {tool}/bin/tool; exit 5\n")).unwrap();
        let line = format!(
            "{TOOL} -q run --no-flake-fs --lower {} --upper {} -- bash --norc -i",
            s.lower.display(),
            upper.display()
        );
        let mut c = user.command("script");
        c.args(["-qec", &line, "/dev/null"])
            .stdin(std::fs::File::open(&typed).unwrap());
        s.w.nix_env(&mut c);
        user.env(&mut c);
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        assert_eq!(out.status.code(), Some(5), "the shell's exit status: {text}");
        // (bash may put terminal escapes in front of its output)
        assert!(text.lines().any(|l| l.ends_with("in-42")), "{text}");
        assert!(text.lines().any(|l| l.ends_with("hello from tool")), "a lower path runs: {text}");
    }
}

ns_test! {
    fn a_run_over_a_target_the_host_has_a_stack_on_gets_its_own() {
        let s = Stack::new(&["tool"]);
        s.mount();
        let other = s.w.path("other-upper");
        s.w.tool_ok(["init", "--upper", other.to_str().unwrap()]);
        let script = format!("{TOOL} status --json");
        let out = s.w.tool([
            "run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper",
            other.to_str().unwrap(), "--", "sh", "-c", &script,
        ]);
        let text = ok(&out, "run over the host's stack");
        let inside: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(inside["upper"]["dir"], other.display().to_string(), "{text}");
        let outside: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["status", "--json"])).unwrap();
        assert_eq!(outside["upper"]["dir"], s.upper.display().to_string());
        s.umount();
    }
}

ns_test! {
    fn a_killed_run_takes_its_flake_tree_server_along_and_the_upper_serves_again() {
        let s = Stack::new(&["app", "tool"]);
        let args = |script: &str| -> Vec<String> {
            ["run", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "sh", "-c", script]
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        let mut run = s
            .w
            .tool_command()
            .args(args("ls /nixfs/flake >/dev/null && echo up && sleep 2"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(run.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "up", "the command runs with the tree mounted");
        run.kill().unwrap();
        run.wait().unwrap();
        // Once the command is done, nothing of the run is left: its tree's
        // server went with it (no `nixfs-layer flakefs` process).
        let servers = || {
            sh("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done")
                .lines()
                .filter(|l| l.contains("nixfs-layer flakefs"))
                .count()
        };
        let t = std::time::Instant::now();
        while servers() > 0 {
            assert!(t.elapsed() < std::time::Duration::from_secs(15), "the tree's server outlived the killed run");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The upper is free: the next run of it works.
        let t = std::time::Instant::now();
        loop {
            let out = s.w.tool(args("echo again"));
            if out.status.success() {
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "again");
                break;
            }
            assert!(
                out.status.code() == Some(75) && t.elapsed() < std::time::Duration::from_secs(10),
                "the next run after a killed one: {}",
                stderr(&out)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

ns_test! {
    fn a_process_the_command_leaves_behind_keeps_the_stack_without_holding_up_run() {
        let s = Stack::new(&["tool"]);
        let args = |script: &str| -> Vec<String> {
            ["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "sh", "-c", script]
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        let t = std::time::Instant::now();
        let out = s.w.tool(args("(cd /nix/store && exec sleep 4) >/dev/null 2>&1 & echo started"));
        let took = t.elapsed();
        assert!(out.status.success(), "run's status is the command's: {}", stderr(&out));
        assert!(took < std::time::Duration::from_secs(4), "run returned after {took:?}");
        let err = stderr(&out);
        let said: Vec<&str> = err.lines().filter(|l| l.contains("still use")).collect();
        assert_eq!(said.len(), 1, "{err}");
        assert!(said[0].contains("sleep") && said[0].contains("until they end"), "{err}");
        // Once it ended, the upper serves the next run.
        std::thread::sleep(std::time::Duration::from_secs(4).saturating_sub(took) + std::time::Duration::from_millis(500));
        let t = std::time::Instant::now();
        loop {
            let out = s.w.tool(args("echo again"));
            if out.status.success() {
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "after the leftover ended: {}", stderr(&out));
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

ns_test! {
    fn an_interrupt_sent_to_run_reaches_its_command() {
        let s = Stack::new(&["tool"]);
        // A CI runner cancelling a job: SIGINT to run's pid, not to a terminal's group.
        let mut run = s
            .w
            .tool_command()
            .args(["run", "--no-flake-fs", "--lower", s.lower.to_str().unwrap(), "--upper", s.upper.to_str().unwrap(), "--", "sh", "-c"])
            .arg("trap 'echo got-int; exit 7' INT; echo up; for i in $(seq 300); do sleep 0.1; done; echo no-int")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(run.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "up");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
        let status = run.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert_eq!(rest.trim(), "got-int", "the command got the interrupt");
        assert_eq!(status.code(), Some(7), "run's status is the command's");
    }
}
