//! The FUSE side of `/nixfs/flake`: a fixed directory skeleton and, under
//! `str`/`b64`/`urlenc`, one symlink per name looked up.
//!
//! Lookups answered from the cache are answered on the FUSE loop; anything
//! else (evaluation, database, permission checks, builds) runs on a thread
//! of its own that replies when done, so the loop never waits on Nix.
//! A failed reference is an entry too, so that it can carry its message in
//! the `user.nixfs.error` attribute (Linux allows `user.*` attributes on
//! regular files and directories only, not on symlinks): an empty
//! directory on which every lookup inside, open and access fails with the
//! errno, so `/nixfs/flake/str/<bad>/bin/x` fails as it should.
//! Results get a new inode whenever their target changes, so what the
//! kernel caches (entries, symlink bodies) can never be stale. An entry
//! lives as long as the kernel holds it: once forgotten it is dropped, and
//! looking its name up again makes a new one, so the daemon's memory follows
//! what the kernel caches, not every name ever asked for.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyXattr, Request,
};

use super::names::{decode, Encoding, FlakeRef, Source};
use super::policy::Caller;
use super::resolver::{Outcome, Resolver};
use super::Failure;

/// Extended attribute with the failure message of an entry.
pub const XATTR_ERROR: &str = "user.nixfs.error";
/// Extended attribute with the reference a failed entry stands for.
pub const XATTR_REF: &str = "user.nixfs.ref";

const ROOT: u64 = 1;
const FLAKE: u64 = 2;
const DIRS: [(u64, Encoding); 3] = [
    (3, Encoding::Str),
    (4, Encoding::B64),
    (5, Encoding::Urlenc),
];
const FIRST_DYNAMIC: u64 = 16;
/// How long the kernel keeps the fixed directories and locked results.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Link(PathBuf),
    Error { errno: i32, message: String },
}

#[derive(Debug)]
struct Node {
    /// Its directory and name, the key of `Nodes::by_name`.
    key: (Encoding, OsString),
    reference: String,
    content: Content,
    /// Lookups the kernel holds (decremented by forget); at 0 the node goes.
    lookups: u64,
}

#[derive(Debug, Default)]
struct Nodes {
    next: u64,
    by_ino: HashMap<u64, Node>,
    by_name: HashMap<(Encoding, OsString), u64>,
}

impl Nodes {
    /// The inode for `name` showing `content`: the same one as before if
    /// the content is unchanged, else a new one.
    fn entry(&mut self, enc: Encoding, name: &OsStr, reference: &str, content: Content) -> u64 {
        let key = (enc, name.to_owned());
        if let Some(&ino) = self.by_name.get(&key) {
            if let Some(n) = self.by_ino.get_mut(&ino) {
                if n.content == content {
                    n.lookups += 1;
                    return ino;
                }
            }
        }
        if self.next < FIRST_DYNAMIC {
            self.next = FIRST_DYNAMIC;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                key: key.clone(),
                reference: reference.to_owned(),
                content,
                lookups: 1,
            },
        );
        // An older node of this name stays in `by_ino` while the kernel holds it.
        self.by_name.insert(key, ino);
        ino
    }

    /// The kernel dropped `n` lookups of `ino`; at none left the node goes,
    /// and with it its name unless that shows a newer node by now.
    fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        let node = self.by_ino.remove(&ino).expect("present");
        if self.by_name.get(&node.key) == Some(&ino) {
            self.by_name.remove(&node.key);
        }
    }
}

/// A handle on the tree's names, usable from outside the FUSE loop.
#[derive(Clone)]
pub struct Names(Arc<Mutex<Nodes>>);

impl Names {
    /// (directory inode, name) of every entry.
    pub fn all(&self) -> Vec<(u64, OsString)> {
        let nodes = self.0.lock().unwrap();
        nodes
            .by_name
            .keys()
            .map(|(enc, name)| {
                let dir = DIRS.iter().find(|(_, e)| e == enc).map_or(0, |(d, _)| *d);
                (dir, name.clone())
            })
            .collect()
    }
}

/// What every inode's attributes share: the server's uid and gid as owner,
/// its start as every time.
#[derive(Debug, Clone, Copy)]
struct Attrs {
    uid: u32,
    gid: u32,
    time: SystemTime,
}

impl Attrs {
    /// The attributes of a fixed directory (`content` None) or an entry.
    fn of(&self, ino: u64, content: Option<&Content>) -> FileAttr {
        let (kind, size, perm, nlink) = match content {
            None => (FileType::Directory, 0, 0o555, 2),
            Some(Content::Link(p)) => (FileType::Symlink, p.as_os_str().len() as u64, 0o777, 1),
            Some(Content::Error { .. }) => (FileType::Directory, 0, 0o000, 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

pub struct FlakeFs {
    resolver: Arc<Resolver>,
    nodes: Arc<Mutex<Nodes>>,
    attrs: Attrs,
}

impl FlakeFs {
    pub fn new(resolver: Arc<Resolver>) -> FlakeFs {
        FlakeFs {
            resolver,
            nodes: Arc::default(),
            attrs: Attrs {
                uid: nix::unistd::Uid::current().as_raw(),
                gid: nix::unistd::Gid::current().as_raw(),
                time: SystemTime::now(),
            },
        }
    }

    /// Every name the kernel holds an entry of, with its directory's inode:
    /// what to invalidate when answers may have changed (a lower's
    /// published index after `sync`).
    pub fn names_handle(&self) -> Names {
        Names(Arc::clone(&self.nodes))
    }

    /// The errno of a failed entry.
    fn error_of(&self, ino: u64) -> Option<i32> {
        match self.nodes.lock().unwrap().by_ino.get(&ino)?.content {
            Content::Error { errno, .. } => Some(errno),
            Content::Link(_) => None,
        }
    }

    fn dir_children(ino: u64) -> Option<Vec<(u64, &'static str)>> {
        match ino {
            ROOT => Some(vec![(FLAKE, "flake")]),
            FLAKE => Some(DIRS.iter().map(|(i, e)| (*i, e.dir_name())).collect()),
            i if DIRS.iter().any(|(d, _)| *d == i) => Some(vec![]),
            _ => None,
        }
    }

    fn parent_of(ino: u64) -> u64 {
        match ino {
            ROOT | FLAKE => ROOT,
            _ => FLAKE,
        }
    }
}

/// What a resolver thread needs to answer a lookup.
#[derive(Clone)]
struct Replier {
    nodes: Arc<Mutex<Nodes>>,
    attrs: Attrs,
}

impl Replier {
    /// Answers a lookup with the node for an outcome.
    fn reply(
        &self,
        enc: Encoding,
        name: &OsStr,
        reference: &str,
        outcome: Outcome,
        uncacheable: bool,
        reply: ReplyEntry,
    ) {
        let (content, ttl) = match outcome {
            Ok(r) => (Content::Link(r.path), r.valid_for.unwrap_or(FOREVER)),
            Err(Failure {
                errno,
                message,
                valid_for,
                ..
            }) => (Content::Error { errno, message }, valid_for),
        };
        let ttl = if uncacheable { Duration::ZERO } else { ttl };
        let ino = self
            .nodes
            .lock()
            .unwrap()
            .entry(enc, name, reference, content.clone());
        let attr = self.attrs.of(ino, Some(&content));
        reply.entry_with_ttls(&ttl, &ttl, &attr, Generation(0));
    }
}

impl Filesystem for FlakeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Symlink bodies cached in the page cache; lookups in one directory
        // run in parallel (else the kernel serialises them per directory and
        // one slow reference would hold up every other).
        for flag in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::warn!(?flag, "the kernel does not offer this FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        if let Some(children) = Self::dir_children(parent).filter(|_| parent <= FLAKE) {
            return match children.iter().find(|(_, n)| OsStr::new(n) == name) {
                Some((ino, _)) => reply.entry(&FOREVER, &self.attrs.of(*ino, None), Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let Some(&(_, enc)) = DIRS.iter().find(|(d, _)| *d == parent) else {
            return reply.error(Errno::from_i32(
                self.error_of(parent).unwrap_or(libc::ENOENT),
            ));
        };
        let replier = Replier {
            nodes: Arc::clone(&self.nodes),
            attrs: self.attrs,
        };

        let parsed = decode(enc, name).and_then(|t| FlakeRef::parse(&t));
        let r = match parsed {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = enc.dir_name(), name = %name.to_string_lossy(), error = %e, "refused name");
                let f = Failure::new(e.errno(), e.to_string())
                    .valid_for(self.resolver.settings().failure_ttl);
                let shown = name.to_string_lossy().into_owned();
                return replier.reply(enc, name, &shown, Err(f), false, reply);
            }
        };
        // Local references are checked against each caller: never cached by the kernel.
        let per_caller = matches!(r.source, Source::Local(_));
        if let Some(outcome) = self.resolver.peek(&r, req.uid()) {
            let uncacheable = per_caller || !shared(&outcome);
            return replier.reply(enc, name, &r.text, outcome, uncacheable, reply);
        }
        let (uid, gid, pid) = (req.uid(), req.gid(), req.pid());
        let resolver = Arc::clone(&self.resolver);
        let name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name("flakefs-resolve".into())
            .spawn(move || {
                // Reads /proc, may ask NSS (LDAP, SSSD) for groups: not on the loop.
                let caller = Caller::from_request(uid, gid, pid);
                let outcome = resolver.resolve(&r, &caller);
                let uncacheable = per_caller || !shared(&outcome);
                replier.reply(enc, &name, &r.text, outcome, uncacheable, reply);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start a resolver thread");
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 >= FIRST_DYNAMIC {
            self.nodes.lock().unwrap().forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        if Self::dir_children(ino).is_some() {
            return reply.attr(&FOREVER, &self.attrs.of(ino, None));
        }
        let nodes = self.nodes.lock().unwrap();
        match nodes.by_ino.get(&ino) {
            Some(n) => reply.attr(&FOREVER, &self.attrs.of(ino, Some(&n.content))),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let nodes = self.nodes.lock().unwrap();
        match nodes.by_ino.get(&ino.0).map(|n| &n.content) {
            Some(Content::Link(p)) => reply.data(p.as_os_str().as_bytes()),
            Some(Content::Error { .. }) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn access(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        match self.error_of(ino.0) {
            Some(errno) => reply.error(Errno::from_i32(errno)),
            None => reply.ok(),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: fuser::ReplyOpen) {
        if Self::dir_children(ino.0).is_some() {
            reply.opened(FileHandle(0), fuser::FopenFlags::empty());
        } else {
            reply.error(Errno::from_i32(
                self.error_of(ino.0).unwrap_or(libc::ENOTDIR),
            ));
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(children) = Self::dir_children(ino.0) else {
            return reply.error(Errno::from_i32(
                self.error_of(ino.0).unwrap_or(libc::ENOTDIR),
            ));
        };
        // Listing never resolves anything: the reference directories are empty.
        let mut all = vec![
            (ino.0, FileType::Directory, "."),
            (Self::parent_of(ino.0), FileType::Directory, ".."),
        ];
        all.extend(
            children
                .into_iter()
                .map(|(i, n)| (i, FileType::Directory, n)),
        );
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value: Option<Vec<u8>> = {
            let nodes = self.nodes.lock().unwrap();
            nodes.by_ino.get(&ino.0).and_then(|n| {
                if name == XATTR_REF {
                    Some(n.reference.as_bytes().to_vec())
                } else if name == XATTR_ERROR {
                    match &n.content {
                        Content::Error { message, .. } => Some(message.as_bytes().to_vec()),
                        Content::Link(_) => None,
                    }
                } else {
                    None
                }
            })
        };
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) => reply_sized(reply, size, &v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut list = Vec::new();
        if let Some(n) = self.nodes.lock().unwrap().by_ino.get(&ino.0) {
            if matches!(n.content, Content::Error { .. }) {
                for name in [XATTR_ERROR, XATTR_REF] {
                    list.extend_from_slice(name.as_bytes());
                    list.push(0);
                }
            }
        }
        reply_sized(reply, size, &list);
    }
}

/// Whether an answer is the same for every caller, so the kernel (whose
/// entry cache all callers share) may keep it.
fn shared(outcome: &Outcome) -> bool {
    match outcome {
        Ok(r) => r.shared,
        Err(f) => f.cacheable,
    }
}

fn reply_sized(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_change_with_content_and_live_until_forgotten() {
        let mut n = Nodes::default();
        let name = OsStr::new("x#y");
        let a = n.entry(
            Encoding::Str,
            name,
            "x#y",
            Content::Link("/nix/store/a".into()),
        );
        let a2 = n.entry(
            Encoding::Str,
            name,
            "x#y",
            Content::Link("/nix/store/a".into()),
        );
        assert_eq!(a, a2, "same target, same inode");
        let b = n.entry(
            Encoding::Str,
            name,
            "x#y",
            Content::Link("/nix/store/b".into()),
        );
        assert_ne!(a, b, "a new target gets a new inode");
        assert!(
            n.by_ino.contains_key(&a),
            "the old inode lives while the kernel holds it"
        );
        n.forget(a, 2);
        assert!(!n.by_ino.contains_key(&a));
        assert_eq!(
            n.by_name.get(&(Encoding::Str, name.to_owned())),
            Some(&b),
            "forgetting an old node leaves the name to the new one"
        );
        let other = n.entry(
            Encoding::B64,
            name,
            "x#y",
            Content::Link("/nix/store/b".into()),
        );
        assert_ne!(other, b, "names are per directory");
        n.forget(b, 1);
        assert!(!n.by_ino.contains_key(&b), "a forgotten current entry goes");
        let b2 = n.entry(
            Encoding::Str,
            name,
            "x#y",
            Content::Link("/nix/store/b".into()),
        );
        assert_ne!(b2, b, "looked up again: a new inode");
        n.forget(b2, 1);
        n.forget(other, 1);
        assert!(n.by_ino.is_empty() && n.by_name.is_empty());
    }

    #[test]
    fn forgotten_names_leave_nothing_behind() {
        let mut n = Nodes::default();
        for i in 0..10_000 {
            let name = OsString::from(format!("no-such-ref-{i}"));
            let failed = Content::Error {
                errno: libc::EINVAL,
                message: "refused".into(),
            };
            let ino = n.entry(Encoding::Str, &name, "", failed.clone());
            assert_eq!(n.entry(Encoding::Str, &name, "", failed), ino);
            n.forget(ino, 2);
        }
        assert!(n.by_ino.is_empty(), "{} inodes left", n.by_ino.len());
        assert!(n.by_name.is_empty(), "{} names left", n.by_name.len());
    }
}
