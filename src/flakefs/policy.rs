//! Who may resolve what: allow/deny patterns on references, whose
//! references root evaluates with its own rights (root's and the trusted
//! users'; everyone else's are evaluated as themselves, see the resolver),
//! who may start builds, per-uid evaluation and build limits, and a first
//! check, as the caller, that they can read every file of a local flake
//! (a clear refusal before Nix starts; for untrusted callers Nix itself then
//! reads as them).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use glob::{MatchOptions, Pattern};
use nix::unistd::{AccessFlags, Gid, Group, Uid, User};

use super::names::FlakeRef;
use super::Failure;
use crate::config::FlakeFsConfig;

/// Files checked in a local flake before giving up on it.
const MAX_CHECKED_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("[flakefs] {key}: '{pattern}' is not a valid glob pattern: {message}")]
    Pattern {
        key: &'static str,
        pattern: String,
        message: String,
    },
    #[error("[flakefs] {key}: no user '{name}' on this system; give a user name or a numeric uid")]
    NoUser { key: &'static str, name: String },
    #[error(
        "[flakefs] {key}: no group '{name}' on this system; give a group name or a numeric gid"
    )]
    NoGroup { key: &'static str, name: String },
}

/// The process behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    /// This process.
    pub fn current() -> Caller {
        Caller {
            uid: Uid::current().as_raw(),
            gid: Gid::current().as_raw(),
            groups: nix::unistd::getgroups()
                .unwrap_or_default()
                .into_iter()
                .map(Gid::as_raw)
                .collect(),
        }
    }

    /// The caller of a FUSE request: its supplementary groups come from
    /// `/proc/PID/status`, or from the group database when that is gone.
    pub fn from_request(uid: u32, gid: u32, pid: u32) -> Caller {
        let groups = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Groups:").map(|g| {
                        g.split_whitespace()
                            .filter_map(|n| n.parse().ok())
                            .collect::<Vec<u32>>()
                    })
                })
            })
            .or_else(|| {
                let user = User::from_uid(Uid::from_raw(uid)).ok()??;
                let name = std::ffi::CString::new(user.name).ok()?;
                nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                    .ok()
                    .map(|v| v.into_iter().map(Gid::as_raw).collect())
            })
            .unwrap_or_default();
        Caller { uid, gid, groups }
    }
}

#[derive(Debug)]
pub struct Policy {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
    build_uids: Vec<u32>,
    build_gids: Vec<u32>,
    trusted_uids: Vec<u32>,
    trusted_gids: Vec<u32>,
    builds_per_minute: u32,
    recent_builds: Mutex<HashMap<u32, VecDeque<Instant>>>,
    evals_per_uid: usize,
    evals_per_minute: u32,
    running_evals: Mutex<HashMap<u32, usize>>,
    recent_evals: Mutex<HashMap<u32, VecDeque<Instant>>>,
}

fn uids(list: &[String], key: &'static str) -> Result<Vec<u32>, PolicyError> {
    list.iter()
        .map(|u| match u.parse::<u32>() {
            Ok(n) => Ok(n),
            Err(_) => User::from_name(u)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
                .ok_or_else(|| PolicyError::NoUser {
                    key,
                    name: u.clone(),
                }),
        })
        .collect()
}

fn gids(list: &[String], key: &'static str) -> Result<Vec<u32>, PolicyError> {
    list.iter()
        .map(|g| match g.parse::<u32>() {
            Ok(n) => Ok(n),
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| PolicyError::NoGroup {
                    key,
                    name: g.clone(),
                }),
        })
        .collect()
}

/// Drops the times older than a minute from `q`; true when `limit` (not 0)
/// are left.
fn over_rate(q: &mut VecDeque<Instant>, now: Instant, limit: u32) -> bool {
    while q
        .front()
        .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
    {
        q.pop_front();
    }
    limit != 0 && q.len() >= limit as usize
}

/// One running evaluation counted against its uid; released when dropped.
pub struct EvalPermit<'a> {
    policy: &'a Policy,
    uid: Option<u32>,
}

impl Drop for EvalPermit<'_> {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            let mut running = self.policy.running_evals.lock().unwrap();
            if let Some(n) = running.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    running.remove(&uid);
                }
            }
        }
    }
}

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

impl Policy {
    pub fn from_config(c: &FlakeFsConfig) -> Result<Policy, PolicyError> {
        let patterns = |key: &'static str, list: &[String]| {
            list.iter()
                .map(|p| {
                    Pattern::new(p).map_err(|e| PolicyError::Pattern {
                        key,
                        pattern: p.clone(),
                        message: e.msg.to_owned(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Policy {
            allow: patterns("allow", &c.allow)?,
            deny: patterns("deny", &c.deny)?,
            build_uids: uids(&c.build_users, "build-users")?,
            build_gids: gids(&c.build_groups, "build-groups")?,
            trusted_uids: uids(&c.trusted_users, "trusted-users")?,
            trusted_gids: gids(&c.trusted_groups, "trusted-groups")?,
            builds_per_minute: c.builds_per_minute.unwrap_or(30),
            recent_builds: Mutex::default(),
            evals_per_uid: c.evals_per_uid.unwrap_or(2).max(1),
            evals_per_minute: c.evals_per_minute.unwrap_or(30),
            running_evals: Mutex::default(),
            recent_evals: Mutex::default(),
        })
    }

    /// Whether the configuration lets this reference be resolved at all.
    pub fn check_ref(&self, r: &FlakeRef) -> Result<(), Failure> {
        if let Some(p) = self.deny.iter().find(|p| p.matches_with(&r.text, MATCH)) {
            return Err(Failure::new(
                libc::EACCES,
                format!(
                    "'{}' is refused by the deny pattern '{p}' ([flakefs] deny)",
                    r.text
                ),
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| p.matches_with(&r.text, MATCH)) {
            return Err(Failure::new(
                libc::EACCES,
                format!(
                    "'{}' matches no allow pattern ([flakefs] allow = {:?})",
                    r.text,
                    self.allow.iter().map(Pattern::as_str).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// Whether `caller` may start builds (root always may).
    pub fn may_build(&self, caller: &Caller) -> bool {
        caller.uid == 0
            || self.build_uids.contains(&caller.uid)
            || self.build_gids.contains(&caller.gid)
            || caller.groups.iter().any(|g| self.build_gids.contains(g))
    }

    /// Whether root evaluates `caller`'s references with its own rights:
    /// root itself and the trusted users and groups. Everyone else's are
    /// evaluated as themselves (through the nix-daemon) or not at all.
    pub fn evaluates_as_root(&self, caller: &Caller) -> bool {
        caller.uid == 0
            || self.trusted_uids.contains(&caller.uid)
            || self.trusted_gids.contains(&caller.gid)
            || caller.groups.iter().any(|g| self.trusted_gids.contains(g))
    }

    /// Counts an evaluation against `uid` (root is never limited): at most
    /// `evals-per-uid` at once and `evals-per-minute`; refuses beyond.
    pub fn take_eval(&self, uid: u32) -> Result<EvalPermit<'_>, Failure> {
        if uid == 0 {
            return Ok(EvalPermit {
                policy: self,
                uid: None,
            });
        }
        let mut running = self.running_evals.lock().unwrap();
        let n = running.get(&uid).copied().unwrap_or(0);
        if n >= self.evals_per_uid {
            return Err(Failure::new(
                libc::EAGAIN,
                format!(
                    "uid {uid} has {n} evaluations running ([flakefs] evals-per-uid = {}); try again when they are done",
                    self.evals_per_uid
                ),
            ));
        }
        let now = Instant::now();
        let mut all = self.recent_evals.lock().unwrap();
        all.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.duration_since(*t) <= Duration::from_secs(60))
        });
        let q = all.entry(uid).or_default();
        if over_rate(q, now, self.evals_per_minute) {
            return Err(Failure::new(
                libc::EAGAIN,
                format!(
                    "uid {uid} started {} evaluations in the last minute ([flakefs] evals-per-minute = {}); try again later",
                    q.len(),
                    self.evals_per_minute
                ),
            ));
        }
        q.push_back(now);
        running.insert(uid, n + 1);
        Ok(EvalPermit {
            policy: self,
            uid: Some(uid),
        })
    }

    /// Counts a build against `uid`'s rate; refuses when over it.
    pub fn take_build(&self, uid: u32) -> Result<(), Failure> {
        if self.builds_per_minute == 0 || uid == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut all = self.recent_builds.lock().unwrap();
        let q = all.entry(uid).or_default();
        if over_rate(q, now, self.builds_per_minute) {
            return Err(Failure::new(
                libc::EAGAIN,
                format!(
                    "uid {uid} started {} builds in the last minute ([flakefs] builds-per-minute = {}); try again later",
                    q.len(),
                    self.builds_per_minute
                ),
            ));
        }
        q.push_back(now);
        Ok(())
    }
}

/// Checks that `caller` could read `path` (a local flake: every file and
/// directory under it) with their own permissions, ACLs included.
///
/// The check runs on a thread of its own whose file-system credentials are
/// switched to the caller's (`setfsuid`/`setfsgid`/`setgroups` as raw
/// syscalls, which change the calling thread only, unlike the libc
/// wrappers); the thread ends with them, so no other thread is affected.
pub fn may_read(caller: &Caller, path: &Path) -> Result<(), Failure> {
    if caller.uid == 0 {
        return Ok(());
    }
    let caller = caller.clone();
    let path = path.to_owned();
    let shown = path.display().to_string();
    let uid = caller.uid;
    std::thread::spawn(move || {
        // SAFETY: plain syscalls on this thread's credentials; the pointer
        // and length describe a live Vec.
        let ok = unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                caller.groups.len(),
                caller.groups.as_ptr(),
            ) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error().to_string());
        }
        unsafe {
            libc::syscall(libc::SYS_setfsgid, caller.gid);
            libc::syscall(libc::SYS_setfsuid, caller.uid);
        }
        check_tree(&path)
    })
    .join()
    .unwrap_or_else(|_| Err("permission check failed".into()))
    .map_err(|why| {
        Failure::new(
            libc::EACCES,
            format!("uid {uid} may not read {shown} ({why}); local flakes are evaluated only for users who can read them"),
        )
    })
}

fn check_tree(root: &Path) -> Result<(), String> {
    let access = |p: &Path, mode: AccessFlags| {
        nix::unistd::faccessat(
            nix::fcntl::AT_FDCWD,
            p,
            mode,
            nix::fcntl::AtFlags::AT_EACCESS,
        )
        .map_err(|e| format!("{}: {e}", p.display()))
    };
    let meta = std::fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !meta.is_dir() {
        return access(root, AccessFlags::R_OK);
    }
    for (n, entry) in walkdir::WalkDir::new(root).into_iter().enumerate() {
        if n >= MAX_CHECKED_ENTRIES {
            return Err(format!("more than {MAX_CHECKED_ENTRIES} entries to check"));
        }
        let entry = entry.map_err(|e| e.to_string())?;
        let ft = entry.file_type();
        if ft.is_dir() {
            access(entry.path(), AccessFlags::R_OK | AccessFlags::X_OK)?;
        } else if ft.is_file() {
            access(entry.path(), AccessFlags::R_OK)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_per_uid_at_once_and_per_minute() {
        let p = policy("evals-per-uid = 2\nevals-per-minute = 3\ntrusted-groups = [\"4321\"]");
        let a = p.take_eval(1000).unwrap();
        let b = p.take_eval(1000).unwrap();
        let e = p.take_eval(1000).err().unwrap();
        assert_eq!(e.errno, libc::EAGAIN);
        assert!(e.message.contains("evals-per-uid"), "{}", e.message);
        assert!(p.take_eval(1001).is_ok(), "per uid");
        drop(a);
        let _c = p.take_eval(1000).unwrap();
        drop(b);
        let e = p.take_eval(1000).err().unwrap();
        assert!(e.message.contains("evals-per-minute"), "{}", e.message);
        for _ in 0..10 {
            drop(p.take_eval(0).unwrap());
        }
        let trusted = Caller {
            uid: 1000,
            gid: 100,
            groups: vec![4321],
        };
        assert!(p.evaluates_as_root(&trusted));
    }

    fn policy(toml: &str) -> Policy {
        let c: FlakeFsConfig = toml::from_str(toml).unwrap();
        Policy::from_config(&c).unwrap()
    }

    #[test]
    fn allow_and_deny_patterns() {
        let p = policy("allow = [\"myflake#*\", \"github:org/*\"]\ndeny = [\"*#evil*\"]");
        let ok = |s: &str| p.check_ref(&FlakeRef::parse(s).unwrap()).is_ok();
        assert!(ok("myflake#hello"));
        assert!(ok("github:org/repo/main#x"));
        assert!(!ok("other#hello"));
        assert!(!ok("myflake#evil"));
        let e = p
            .check_ref(&FlakeRef::parse("other#x").unwrap())
            .unwrap_err();
        assert_eq!(e.errno, libc::EACCES);
        assert!(
            e.message.contains("other#x") && e.message.contains("allow"),
            "{e:?}"
        );
    }

    #[test]
    fn builders_and_rate() {
        let p =
            policy("build-users = [\"1234\"]\nbuild-groups = [\"4321\"]\nbuilds-per-minute = 2");
        let c = |uid, gid, groups: &[u32]| Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(p.may_build(&c(0, 0, &[])));
        assert!(p.may_build(&c(1234, 100, &[])));
        assert!(p.may_build(&c(99, 4321, &[])));
        assert!(p.may_build(&c(99, 100, &[5, 4321])));
        assert!(!p.may_build(&c(99, 100, &[5])));
        assert!(p.take_build(1234).is_ok() && p.take_build(1234).is_ok());
        assert_eq!(p.take_build(1234).unwrap_err().errno, libc::EAGAIN);
        assert!(p.take_build(1235).is_ok(), "per uid");
        assert!(!p.evaluates_as_root(&c(1234, 100, &[])));
        assert!(p.evaluates_as_root(&c(0, 0, &[])));
        let e = Policy::from_config(&toml::from_str("build-users = [\"no-such-user-x\"]").unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("no-such-user-x"), "{e}");
    }

    #[test]
    fn reads_as_the_caller() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = t.path().join("flake");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("flake.nix"), "{}").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            dir.join("flake.nix"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let nobody = Caller {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let root = Caller {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        may_read(&nobody, &dir).unwrap();
        std::fs::write(dir.join("secret"), "x").unwrap();
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = may_read(&nobody, &dir).unwrap_err();
        assert_eq!(e.errno, libc::EACCES);
        assert!(may_read(&root, &dir).is_ok());
        // This thread's own credentials are untouched.
        assert!(std::fs::read(dir.join("secret")).is_ok());
    }
}
