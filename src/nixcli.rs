//! Running `nix`: evaluating a flake attribute to its outputs and building
//! one, with JSON output (Nix 2.8 has no `--print-out-paths`), a timeout,
//! and never anything from a user-supplied name as an option: the
//! installable always comes after `--`.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use wait_timeout::ChildExt;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NixError {
    #[error("could not run {program}: {message}; is Nix installed and on PATH?")]
    Spawn { program: String, message: String },
    #[error("`nix {command}` on '{installable}' took longer than {}s and was stopped; raise [flakefs] {} to allow longer", timeout.as_secs(), timeout_setting(command))]
    Timeout {
        command: &'static str,
        installable: String,
        timeout: Duration,
    },
    #[error("{0}")]
    MissingAttr(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    EvalFailed(String),
    #[error("{0}")]
    BuildFailed(String),
    #[error("`nix {command}` printed output this tool cannot read ({message}): {output}")]
    BadOutput {
        command: &'static str,
        message: String,
        output: String,
    },
}

/// The `[flakefs]` key that sets the timeout of `command`.
fn timeout_setting(command: &str) -> &'static str {
    match command {
        "build" => "build-timeout",
        _ => "eval-timeout",
    }
}

impl NixError {
    /// The errno a lookup answers for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            NixError::MissingAttr(_) | NixError::NotFound(_) => libc::ENOENT,
            NixError::Timeout { .. } => libc::ETIMEDOUT,
            NixError::EvalFailed(_) => libc::EINVAL,
            NixError::Spawn { .. } | NixError::BuildFailed(_) | NixError::BadOutput { .. } => {
                libc::EIO
            }
        }
    }
}

/// What evaluating a flake attribute gives: its output paths.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Evaluated {
    /// The output a plain reference means (`outputName` of the attribute).
    pub default: String,
    pub outputs: BTreeMap<String, PathBuf>,
}

/// Run on the evaluated attribute: fails unless it is a derivation, and
/// returns its outputs. A fixed expression: nothing of the name is in it.
const APPLY: &str = r#"d:
  if (d.type or null) != "derivation"
  then throw "not a derivation (a package): it is a ${builtins.typeOf d}${if builtins.isAttrs d then " with attributes " + builtins.concatStringsSep ", " (builtins.attrNames d) else ""}"
  else {
    default = d.outputName or "out";
    outputs = builtins.listToAttrs (map (o: { name = o; value = d.${o}.outPath; }) (d.outputs or [ "out" ]));
  }"#;

/// Children still running, so a stopping daemon can stop them.
fn running() -> &'static Mutex<HashSet<u32>> {
    static RUNNING: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

/// util-linux's `unshare`, when it can start a process as the init of a
/// PID namespace of its own here (as root): then everything `nix` starts
/// (builders, which Nix 2.8 puts in mount namespaces of their own, where
/// they keep the stack's overlay alive) ends when `nix` ends, SIGKILL
/// included. Checked once.
fn pid_namespace_launcher() -> Option<&'static std::path::Path> {
    static LAUNCHER: OnceLock<Option<PathBuf>> = OnceLock::new();
    LAUNCHER
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            let unshare = ["/usr/bin/unshare", "/bin/unshare"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())?;
            let works = Command::new(&unshare)
                .args(["--pid", "--fork", "--kill-child", "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !works {
                tracing::info!("cannot start nix in a PID namespace of its own here; its builders may outlive it");
            }
            works.then_some(unshare)
        })
        .as_deref()
}

/// Makes the child get SIGKILL when the thread that started it ends, so
/// that a `nix` started for the flake tree never outlives its server (a
/// server killed with SIGKILL included). The thread waits for the child,
/// so it lives as long as the child should.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Asks every running `nix` child to stop (they stop their builders).
pub fn terminate_all() {
    for pid in running().lock().unwrap().iter() {
        stop_group(*pid);
    }
}

/// How long a child has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Sends a child's process group SIGTERM (so that Nix stops its builders)
/// and, when it runs in a PID namespace of its own (whose launcher does not
/// pass SIGTERM on; its end takes every process in it along), SIGKILL to
/// that launcher.
fn stop_group(pid: u32) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
    if pid_namespace_launcher().is_some() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// SIGKILL to a child's whole process group (a Nix that ignores SIGTERM,
/// e.g. blocked opening a FIFO).
fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A caller whose references `nix` evaluates and builds with the caller's
/// own rights: `nix` runs as that uid and group list (util-linux's
/// `setpriv`, with no new privileges), as a client of the nix-daemon at
/// `socket`, so Nix's own multi-user model decides what it may read and
/// add to the store. Its environment is made here: the server's `PATH`,
/// `NIX_CONF_DIR` and `NIX_CONFIG` (the admin's), no user configuration
/// file or registry, and a fresh home of the caller's that is removed
/// after the run, so nothing of one run lasts into another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub socket: PathBuf,
}

/// The niceness of `nix` run as a user.
const USER_NICENESS: libc::c_int = 10;

/// Variables passed on from the server to a `nix` run as another user.
const PASSED_ON: &[&str] = &["PATH", "NIX_CONF_DIR", "NIX_CONFIG", "LANG", "LC_ALL", "TZ"];

/// The scratch home of one run as a user: root-owned `BASE` (0755) with the
/// caller's `BASE/home` (0700) and an empty, root-owned `BASE/config`.
struct ScratchHome {
    dir: tempfile::TempDir,
}

impl ScratchHome {
    fn new(user: &AsUser) -> std::io::Result<ScratchHome> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("nixfs-layer-eval-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let home = dir.path().join("home");
        std::fs::create_dir(&home)?;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid))?;
        std::fs::create_dir(dir.path().join("config"))?;
        Ok(ScratchHome { dir })
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
}

#[derive(Debug, Clone)]
pub struct Nix {
    program: PathBuf,
}

/// Names the `nix` program to run (default: `nix` from PATH).
pub const NIX_PROGRAM_ENV: &str = "NIXFS_LAYER_NIX";

impl Default for Nix {
    fn default() -> Self {
        Nix {
            program: std::env::var_os(NIX_PROGRAM_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("nix")),
        }
    }
}

impl Nix {
    /// Evaluates `installable` read-only (no .drv is written; IFD is off)
    /// and pure, to its output paths.
    #[tracing::instrument(skip(self), level = "debug")]
    pub fn eval(
        &self,
        installable: &str,
        timeout: Duration,
        as_user: Option<&AsUser>,
    ) -> Result<Evaluated, NixError> {
        let out = self.run(
            "eval",
            &[
                "eval",
                "--read-only",
                "--json",
                "--no-write-lock-file",
                "--option",
                "allow-import-from-derivation",
                "false",
                "--apply",
                APPLY,
                "--",
                installable,
            ],
            installable,
            timeout,
            as_user,
        )?;
        serde_json::from_str(&out).map_err(|e| NixError::BadOutput {
            command: "eval",
            message: e.to_string(),
            output: out,
        })
    }

    /// The locked form of `flake` (the part before `#`) as Nix reports it
    /// (`nix flake metadata`'s `url`).
    #[tracing::instrument(skip(self), level = "debug")]
    pub fn locked_url(&self, flake: &str, timeout: Duration) -> Result<String, NixError> {
        let out = self.run(
            "flake",
            &[
                "flake",
                "metadata",
                "--json",
                "--no-write-lock-file",
                "--",
                flake,
            ],
            flake,
            timeout,
            None,
        )?;
        #[derive(Deserialize)]
        struct Meta {
            url: String,
        }
        serde_json::from_str::<Meta>(&out)
            .map(|m| m.url)
            .map_err(|e| NixError::BadOutput {
                command: "flake",
                message: e.to_string(),
                output: out,
            })
    }

    /// Builds `installable` (one output's attribute) and returns its output path.
    #[tracing::instrument(skip(self), level = "debug")]
    pub fn build(
        &self,
        installable: &str,
        timeout: Duration,
        as_user: Option<&AsUser>,
    ) -> Result<PathBuf, NixError> {
        let out = self.run(
            "build",
            &[
                "build",
                "--json",
                "--no-link",
                "--no-write-lock-file",
                "--option",
                "allow-import-from-derivation",
                "false",
                "--",
                installable,
            ],
            installable,
            timeout,
            as_user,
        )?;
        #[derive(Deserialize)]
        struct Built {
            outputs: BTreeMap<String, PathBuf>,
        }
        let bad = |message: String| NixError::BadOutput {
            command: "build",
            message,
            output: out.clone(),
        };
        let built: Vec<Built> = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
        let mut paths = built.into_iter().flat_map(|b| b.outputs.into_values());
        match (paths.next(), paths.next()) {
            (Some(p), None) => Ok(p),
            _ => Err(bad("expected exactly one output path".into())),
        }
    }

    fn run(
        &self,
        command: &'static str,
        args: &[&str],
        installable: &str,
        timeout: Duration,
        as_user: Option<&AsUser>,
    ) -> Result<String, NixError> {
        use std::os::unix::process::CommandExt;
        let spawn_error = |message: String| NixError::Spawn {
            program: self.program.display().to_string(),
            message,
        };
        // Only root can switch: a user running the tool runs Nix as themselves.
        let as_user = as_user.filter(|_| nix::unistd::geteuid().is_root());
        let scratch = as_user
            .map(ScratchHome::new)
            .transpose()
            .map_err(|e| spawn_error(format!("cannot make a scratch home: {e}")))?;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(unshare) = pid_namespace_launcher() {
            argv.push(unshare.into());
            argv.extend(["--pid", "--fork", "--kill-child", "--"].map(Into::into));
            if as_user.is_some() {
                // Changing the uid clears the parent-death signal that
                // takes the namespace down with the server, so the
                // namespace's init stays a root shell that waits for it.
                argv.extend(["sh", "-c", "\"$@\"; exit $?", "sh"].map(Into::into));
            }
        }
        if let Some(user) = as_user {
            argv.push("setpriv".into());
            argv.push(format!("--reuid={}", user.uid).into());
            argv.push(format!("--regid={}", user.gid).into());
            if user.groups.is_empty() {
                argv.push("--clear-groups".into());
            } else {
                let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
                argv.push(format!("--groups={}", groups.join(",")).into());
            }
            argv.extend(["--no-new-privs", "--"].map(Into::into));
        }
        argv.push(self.program.clone().into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout stops all of it.
            .process_group(0);
        if let (Some(user), Some(scratch)) = (as_user, &scratch) {
            let home = scratch.home();
            cmd.env_clear()
                .envs(
                    PASSED_ON
                        .iter()
                        .filter_map(|k| Some((k, std::env::var_os(k)?))),
                )
                .env("HOME", &home)
                .env("TMPDIR", &home)
                .env("XDG_CACHE_HOME", home.join(".cache"))
                .env("XDG_CONFIG_HOME", scratch.dir.path().join("config"))
                .env("XDG_CONFIG_DIRS", scratch.dir.path().join("config"))
                .env("NIX_USER_CONF_FILES", "")
                .env("NIX_REMOTE", "daemon")
                .env("NIX_DAEMON_SOCKET_PATH", &user.socket)
                .current_dir("/");
        }
        if as_user.is_some() {
            // Users' evaluations yield the CPU to root's and to the FUSE
            // loop: a flood of them cannot slow everyone else down.
            // SAFETY: setpriority is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setpriority(libc::PRIO_PROCESS, 0, USER_NICENESS);
                    Ok(())
                });
            }
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| spawn_error(e.to_string()))?;
        let pid = child.id();
        running().lock().unwrap().insert(pid);
        let result = wait_output(&mut child, timeout);
        running().lock().unwrap().remove(&pid);
        drop(scratch);
        let (status, stdout, stderr) = match result {
            Some(r) => r,
            None => {
                return Err(NixError::Timeout {
                    command,
                    installable: installable.to_owned(),
                    timeout,
                })
            }
        };
        if status.success() {
            return Ok(stdout);
        }
        let message = error_message(&stderr, status);
        tracing::debug!(command, installable, %message, "nix failed");
        Err(classify_failure(command, message))
    }
}

/// Waits for the child, collecting its output; on timeout stops it
/// ([`stop_signal`], then SIGKILL) and returns None.
fn wait_output(
    child: &mut Child,
    timeout: Duration,
) -> Option<(std::process::ExitStatus, String, String)> {
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = match child.wait_timeout(timeout) {
        Ok(Some(s)) => Some(s),
        _ => {
            stop_group(child.id());
            if !matches!(child.wait_timeout(STOP_GRACE), Ok(Some(_))) {
                kill_group(child.id());
                let _ = child.wait();
            }
            None
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    status.map(|s| (s, stdout, stderr))
}

/// The lines of Nix's stderr that say what went wrong.
fn error_message(stderr: &str, status: std::process::ExitStatus) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("(use '--show-trace'"))
        .filter(|l| !l.starts_with("warning:"))
        .collect();
    if lines.is_empty() {
        return format!("nix exited with {status} and no message");
    }
    // Keep it to one line for the xattr and the log.
    let joined = lines.join(" ");
    joined.chars().take(2000).collect()
}

fn classify_failure(command: &'static str, message: String) -> NixError {
    if message.contains("does not provide attribute") {
        NixError::MissingAttr(message)
    } else if message.contains("No such file or directory")
        || message.contains("cannot find flake")
        || message.contains("does not exist")
    {
        NixError::NotFound(message)
    } else if command == "build" {
        NixError::BuildFailed(message)
    } else {
        NixError::EvalFailed(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_errnos() {
        let e = classify_failure(
            "eval",
            "error: flake 'flake:x' does not provide attribute 'packages.x86_64-linux.nope'".into(),
        );
        assert_eq!(e.errno(), libc::ENOENT);
        let e = classify_failure(
            "build",
            "error: builder for '/nix/store/x.drv' failed with exit code 1".into(),
        );
        assert_eq!(e.errno(), libc::EIO);
        let e = classify_failure("eval", "error: syntax error, unexpected '}'".into());
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn timeouts_name_their_setting() {
        for (command, key) in [("eval", "eval-timeout"), ("build", "build-timeout")] {
            let e = NixError::Timeout {
                command,
                installable: "nixpkgs#hello".into(),
                timeout: Duration::from_secs(5),
            };
            assert!(e.to_string().contains(&format!("[flakefs] {key}")), "{e}");
        }
    }

    #[test]
    fn error_message_drops_noise() {
        use std::os::unix::process::ExitStatusExt;
        let m = error_message(
            "warning: Git tree is dirty\nerror: boom\n(use '--show-trace' to show detailed location information)\n",
            std::process::ExitStatus::from_raw(256),
        );
        assert_eq!(m, "error: boom");
    }
}
