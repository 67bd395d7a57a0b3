//! The export format: what `nix-store --export` writes and `nix-store
//! --import` reads, plus a checksum trailer of this tool's own.
//!
//! ```text
//! file   = { u64(1) path } u64(0) [ trailer ]
//! path   = nar u64(0x4558494e) str(storepath) u64(n) n*str(reference)
//!          str(deriver or "") u64(0)
//! trailer= str("nixfs-layer-export-checksums-1") u64(n) n*( str(storepath) str(narhash) )
//!          str(sha256 of every byte outside the NARs, up to the end marker)
//! ```
//! Numbers are u64 little-endian, strings are NAR strings (length, bytes,
//! zero padding to 8). Paths come references first, in the order of Nix's
//! `topoSortPaths` (see [`crate::closure::Graph::export_order`]), so up to
//! the end marker a file is byte for byte what Nix 2.8 exports for the same
//! paths. Nix stops reading at the end marker and ignores the trailer.
//!
//! The trailer makes every byte of the stream covered by a hash: each NAR by
//! its narHash, everything else (markers, paths, references, derivers) by
//! the last digest. A file without a trailer (a plain `nix-store --export`)
//! is checked structurally only. Compressed files (zstd, xz; recognised by
//! their magic bytes) also carry the compressor's own checksums.

use crate::nar::write_str;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};

use sha2::{Digest, Sha256};

use crate::nar::{self, NarHash};
use crate::pathdb::DbError;
use crate::storepath::StorePath;

/// `nix-store --export`'s marker after each NAR ("NIXE").
pub const EXPORT_MAGIC: u64 = 0x4558_494e;
const TRAILER_MAGIC: &[u8] = b"nixfs-layer-export-checksums-1";
/// Longest string other than file contents accepted when reading (names,
/// symlink targets, paths): a bit flip in a length must not allocate gigabytes.
const MAX_STRING: u64 = 64 * 1024;

const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// The program that compresses (`-c`) or decompresses (`-dc`) a stream.
    fn program(self) -> Option<&'static str> {
        match self {
            Compression::Zstd => Some("zstd"),
            Compression::Xz => Some("xz"),
            Compression::None => None,
        }
    }

    /// Recognises a file by its first bytes.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else if head.starts_with(XZ_MAGIC) {
            Compression::Xz
        } else {
            Compression::None
        }
    }
}

/// What is wrong with an export stream.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not an export (it starts with neither a path nor the end marker, and is not zstd or xz); is it a file made by `nix-store --export` or `nixfs-layer export`?")]
    NotAnExport,
    #[error("not an export: it is {0}-compressed, but what it decompresses to starts with neither a path nor the end marker; is it a compressed `nix-store --export` or `nixfs-layer export` file?")]
    NotAnExportInside(&'static str),
    #[error(
        "truncated: it ends at byte {offset} in the middle of {what}; copy or export it again"
    )]
    Truncated { offset: u64, what: &'static str },
    #[error("corrupt at byte {offset}: {what}; copy or export it again")]
    Corrupt { offset: u64, what: String },
    #[error("corrupt: the NAR of {path} hashes to {actual}, the file's checksum says {recorded}; copy or export it again")]
    NarHashMismatch {
        path: String,
        recorded: String,
        actual: String,
    },
    #[error("corrupt: the paths, references or markers do not match the file's checksum; copy or export it again")]
    MetaChecksum,
    #[error("{0}")]
    Io(io::Error),
}

/// Errors of `export` and `import`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{file}: {source}")]
    Format { file: PathBuf, source: FormatError },
    #[error("{file}: `{program}` failed ({status}): {message}; the file is truncated or corrupt, copy or export it again")]
    Decompress {
        file: PathBuf,
        program: &'static str,
        status: ExitStatus,
        message: String,
    },
    #[error("could not run {program}: {source}; install it (Debian: apt-get install {program})")]
    Spawn {
        program: &'static str,
        source: io::Error,
    },
    #[error("`{program}` failed ({status}) writing {file}: {message}")]
    Compress {
        file: PathBuf,
        program: &'static str,
        status: ExitStatus,
        message: String,
    },
    #[error("{path} is not a valid path of the merged store; name a store path (or a link to one) that `nix-store --check-validity` accepts")]
    NotValid { path: String },
    #[error("{path}: its content hashes to {actual}, but the database records {recorded}; run `nixfs-layer verify --check-contents`")]
    HashChanged {
        path: String,
        recorded: String,
        actual: String,
    },
    #[error("{file}: {path} refers to {reference}, which neither the file nor this store has; import into a stack with the same lowers, or export with --full")]
    MissingReference {
        file: PathBuf,
        path: String,
        reference: String,
    },
    #[error("{file}: {path} is already valid here with narHash {here}, but the file holds a NAR hashing to {file_hash}; the two stores disagree about it, nothing was imported")]
    Conflict {
        file: PathBuf,
        path: String,
        here: String,
        file_hash: String,
    },
    #[error("{target}: import runs the installed Nix, whose store is /nix/store, so the stack must be mounted at /nix")]
    TargetNotNix { target: PathBuf },
    #[error("`{command}` failed ({status}): {message}")]
    Nix {
        command: String,
        status: ExitStatus,
        message: String,
    },
    #[error("`nix-store --import` succeeded, but {path} is not a valid path of the stack mounted at /nix; the Nix in use may be writing to a different store (check for a nix-daemon in another mount namespace, NIX_REMOTE, and the `store` setting of nix.conf)")]
    NotRegistered { path: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ExportError {
    pub fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            ExportError::Format {
                source: FormatError::Io(_),
                ..
            }
            | ExportError::Io { .. }
            | ExportError::Compress { .. } => Kind::IoErr,
            ExportError::Format { .. }
            | ExportError::Decompress { .. }
            | ExportError::HashChanged { .. }
            | ExportError::MissingReference { .. }
            | ExportError::Conflict { .. } => Kind::DataErr,
            ExportError::NotValid { .. } => Kind::NoInput,
            ExportError::TargetNotNix { .. } => Kind::Usage,
            ExportError::Spawn { .. } => Kind::Unavailable,
            ExportError::Nix { .. } | ExportError::NotRegistered { .. } => Kind::Software,
            ExportError::Db(e) => e.kind(),
        }
    }
}

/// The metadata of one exported path.
#[derive(Debug, Clone)]
pub struct PathMeta<'a> {
    pub path: &'a str,
    /// Sorted.
    pub references: Vec<&'a str>,
    pub deriver: Option<&'a str>,
    /// The narHash the database records (`sha256:<hex>`), checked while
    /// the NAR is written.
    pub nar_hash: &'a str,
}

/// Hashes and counts what passes through to `out`, and remembers whether
/// `out` failed (so a failed NAR dump can be told from a failed write).
struct Tee<'a, W: Write> {
    out: &'a mut W,
    hasher: Sha256,
    size: u64,
    out_failed: bool,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .out
            .write(buf)
            .inspect_err(|_| self.out_failed = true)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        crate::progress::advance(crate::progress::Unit::Bytes, n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush().inspect_err(|_| self.out_failed = true)
    }
}

/// Writes an export stream to `out`, one path at a time; the caller gives
/// them in dependency order.
pub struct Writer<W: Write> {
    out: W,
    /// What `out` writes to, for errors.
    name: PathBuf,
    /// Everything outside the NARs.
    meta: Sha256,
    sums: Vec<(String, String)>,
    pub nar_bytes: u64,
}

impl<W: Write> Writer<W> {
    /// `name` is what `out` writes to (the output file), named when
    /// writing fails.
    pub fn new(out: W, name: &Path) -> Self {
        Writer {
            out,
            name: name.to_owned(),
            meta: Sha256::new(),
            sums: Vec::new(),
            nar_bytes: 0,
        }
    }

    fn meta_u64(&mut self, n: u64) -> io::Result<()> {
        self.meta.update(n.to_le_bytes());
        self.out.write_all(&n.to_le_bytes())
    }

    fn meta_str(&mut self, s: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(s.len() + 16);
        write_str(&mut buf, s)?;
        self.meta.update(&buf);
        self.out.write_all(&buf)
    }

    /// Writes one path: its NAR, serialised from `content` (the path as
    /// seen in the merged store), then its metadata. The NAR goes straight
    /// to the output; nothing of it is held.
    pub fn path(&mut self, content: &Path, meta: &PathMeta<'_>) -> Result<(), ExportError> {
        let name = self.name.clone();
        let written = |source| ExportError::Io {
            path: name.clone(),
            source,
        };
        self.meta_u64(1).map_err(written)?;
        let mut tee = Tee {
            out: &mut self.out,
            hasher: Sha256::new(),
            size: 0,
            out_failed: false,
        };
        if let Err(source) = nar::dump(content, &mut tee) {
            return Err(if tee.out_failed {
                written(source)
            } else {
                ExportError::Io {
                    path: content.to_owned(),
                    source,
                }
            });
        }
        let actual = NarHash {
            sha256: tee.hasher.finalize().into(),
            size: tee.size,
        };
        if !actual.matches_db(meta.nar_hash) {
            return Err(ExportError::HashChanged {
                path: meta.path.to_owned(),
                recorded: meta.nar_hash.to_owned(),
                actual: actual.to_db_string(),
            });
        }
        self.nar_bytes += tee.size;
        self.meta_u64(EXPORT_MAGIC).map_err(written)?;
        self.meta_str(meta.path.as_bytes()).map_err(written)?;
        self.meta_u64(meta.references.len() as u64)
            .map_err(written)?;
        for r in &meta.references {
            self.meta_str(r.as_bytes()).map_err(written)?;
        }
        self.meta_str(meta.deriver.unwrap_or("").as_bytes())
            .map_err(written)?;
        self.meta_u64(0).map_err(written)?;
        self.sums
            .push((meta.path.to_owned(), actual.to_db_string()));
        Ok(())
    }

    /// Writes the end marker and, with `trailer`, the checksums; returns
    /// the output.
    pub fn finish(mut self, trailer: bool) -> io::Result<W> {
        self.meta_u64(0)?;
        if trailer {
            write_str(&mut self.out, TRAILER_MAGIC)?;
            self.out
                .write_all(&(self.sums.len() as u64).to_le_bytes())?;
            for (p, h) in &self.sums {
                write_str(&mut self.out, p.as_bytes())?;
                write_str(&mut self.out, h.as_bytes())?;
            }
            let digest = self.meta.finalize();
            write_str(&mut self.out, &digest)?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One path read from an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: StorePath,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub nar: NarHash,
}

/// What a whole stream held.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    pub entries: Vec<Entry>,
    /// Whether it had this tool's checksum trailer (and it matched).
    pub checksummed: bool,
}

/// Reads an export stream, checking its structure and every NAR's syntax
/// as Nix's parser does, hashing each NAR. With `tee`, every byte up to and
/// including the end marker is copied there as it is read (to feed
/// `nix-store --import`), the trailer is not. Memory use does not depend on
/// the size of the NARs.
pub fn read<R: Read>(input: R, tee: Option<&mut dyn Write>) -> Result<Contents, FormatError> {
    let mut r = Reader {
        inner: BufReader::with_capacity(256 * 1024, input),
        offset: 0,
        meta: Sha256::new(),
        nar: None,
        tee,
    };
    let mut entries = Vec::new();
    let first = r.try_u64()?;
    let mut marker = match first {
        Some(n) => n,
        None => return Err(FormatError::NotAnExport),
    };
    if entries.is_empty() && marker > 1 {
        return Err(FormatError::NotAnExport);
    }
    while marker == 1 {
        entries.push(r.entry()?);
        marker = r.u64("the marker before a path or the end")?;
        if marker > 1 {
            return Err(r.corrupt(format!(
                "expected 1 (a path follows) or 0 (the end), found {marker}"
            )));
        }
    }
    r.tee = None;
    let checksummed = r.trailer(&entries)?;
    Ok(Contents {
        entries,
        checksummed,
    })
}

struct Reader<'t, R: Read> {
    inner: BufReader<R>,
    offset: u64,
    /// Hash of the bytes outside NARs.
    meta: Sha256,
    /// Hash of the NAR being read, when inside one.
    nar: Option<(Sha256, u64)>,
    tee: Option<&'t mut dyn Write>,
}

impl<R: Read> Reader<'_, R> {
    fn corrupt(&self, what: String) -> FormatError {
        FormatError::Corrupt {
            offset: self.offset,
            what,
        }
    }

    /// Reads exactly `buf.len()` bytes; Ok(false) at a clean end of input
    /// before the first byte.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, FormatError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(FormatError::Truncated {
                        offset: self.offset + got as u64,
                        what,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FormatError::Io(e)),
            }
        }
        self.offset += buf.len() as u64;
        match &mut self.nar {
            Some((h, size)) => {
                h.update(&*buf);
                *size += buf.len() as u64;
                crate::progress::advance(crate::progress::Unit::Bytes, buf.len() as u64);
            }
            None => self.meta.update(&*buf),
        }
        if let Some(t) = &mut self.tee {
            t.write_all(buf).map_err(FormatError::Io)?;
        }
        Ok(true)
    }

    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), FormatError> {
        if !self.fill(buf, what)? && !buf.is_empty() {
            return Err(FormatError::Truncated {
                offset: self.offset,
                what,
            });
        }
        Ok(())
    }

    fn try_u64(&mut self) -> Result<Option<u64>, FormatError> {
        let mut b = [0u8; 8];
        Ok(self
            .fill(&mut b, "a number")?
            .then(|| u64::from_le_bytes(b)))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64, what: &'static str) -> Result<(), FormatError> {
        let rem = (len % 8) as usize;
        if rem != 0 {
            let mut pad = [0u8; 8];
            self.exact(&mut pad[..8 - rem], what)?;
            if pad.iter().any(|&b| b != 0) {
                return Err(self.corrupt(format!("non-zero padding after {what}")));
            }
        }
        Ok(())
    }

    fn string(&mut self, what: &'static str) -> Result<Vec<u8>, FormatError> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(self.corrupt(format!("{what} claims {len} bytes")));
        }
        let mut s = vec![0u8; len as usize];
        self.exact(&mut s, what)?;
        self.padding(len, what)?;
        Ok(s)
    }

    fn expect(&mut self, token: &'static str) -> Result<(), FormatError> {
        let s = self.string(token)?;
        if s != token.as_bytes() {
            return Err(self.corrupt(format!(
                "expected \"{token}\" in a NAR, found \"{}\"",
                String::from_utf8_lossy(&s)
            )));
        }
        Ok(())
    }

    fn store_path(&mut self, what: &'static str) -> Result<StorePath, FormatError> {
        let s = self.string(what)?;
        let s = String::from_utf8(s).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))?;
        StorePath::parse(&s).map_err(|e| self.corrupt(format!("{what}: {e}")))
    }

    fn entry(&mut self) -> Result<Entry, FormatError> {
        self.nar = Some((Sha256::new(), 0));
        self.expect("nix-archive-1")?;
        self.node(0)?;
        let (h, size) = self.nar.take().expect("inside a NAR");
        let nar = NarHash {
            sha256: h.finalize().into(),
            size,
        };
        let magic = self.u64("the export marker")?;
        if magic != EXPORT_MAGIC {
            return Err(self.corrupt(format!(
                "expected the export marker {EXPORT_MAGIC:#x} after a NAR, found {magic:#x}"
            )));
        }
        let path = self.store_path("a store path")?;
        let n = self.u64("the number of references")?;
        if n > MAX_STRING {
            return Err(self.corrupt(format!("{path} claims {n} references")));
        }
        let mut references = Vec::with_capacity(n as usize);
        for _ in 0..n {
            references.push(self.store_path("a reference")?);
        }
        let deriver = self.string("the deriver")?;
        let deriver = if deriver.is_empty() {
            None
        } else {
            let d = String::from_utf8(deriver)
                .map_err(|_| self.corrupt("the deriver is not UTF-8".into()))?;
            Some(StorePath::parse(&d).map_err(|e| self.corrupt(format!("deriver: {e}")))?)
        };
        match self.u64("the signature flag")? {
            0 => {}
            1 => {
                // Nix's legacy signature: read and ignored, as Nix does.
                self.string("a legacy signature")?;
            }
            other => return Err(self.corrupt(format!("expected 0 after {path}, found {other}"))),
        }
        Ok(Entry {
            path,
            references,
            deriver,
            nar,
        })
    }

    fn node(&mut self, depth: u32) -> Result<(), FormatError> {
        if depth > 256 {
            return Err(self.corrupt("NAR nested deeper than 256 directories".into()));
        }
        self.expect("(")?;
        self.expect("type")?;
        let ty = self.string("a node type")?;
        match ty.as_slice() {
            b"regular" => {
                let mut tag = self.string("a file's attributes")?;
                if tag == b"executable" {
                    self.expect("")?;
                    tag = self.string("a file's contents")?;
                }
                if tag != b"contents" {
                    return Err(self.corrupt(format!(
                        "expected \"contents\" in a NAR, found \"{}\"",
                        String::from_utf8_lossy(&tag)
                    )));
                }
                let len = self.u64("a file's length")?;
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    self.exact(&mut buf[..n], "a file's contents")?;
                    left -= n as u64;
                }
                self.padding(len, "a file's contents")?;
            }
            b"symlink" => {
                self.expect("target")?;
                let t = self.string("a symlink target")?;
                if t.is_empty() || t.contains(&0) {
                    return Err(self.corrupt("an empty symlink target or one holding NUL".into()));
                }
            }
            b"directory" => {
                let mut prev: Option<Vec<u8>> = None;
                loop {
                    let tag = self.string("a directory entry")?;
                    if tag == b")" {
                        return Ok(());
                    }
                    if tag != b"entry" {
                        return Err(self.corrupt(format!(
                            "expected \"entry\" or \")\" in a NAR directory, found \"{}\"",
                            String::from_utf8_lossy(&tag)
                        )));
                    }
                    self.expect("(")?;
                    self.expect("name")?;
                    let name = self.string("an entry name")?;
                    if name.is_empty()
                        || name == b"."
                        || name == b".."
                        || name.contains(&b'/')
                        || name.contains(&0)
                    {
                        return Err(self.corrupt(format!(
                            "invalid entry name \"{}\"",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    if prev.as_ref().is_some_and(|p| *p >= name) {
                        return Err(self.corrupt(format!(
                            "directory entries out of order at \"{}\"",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    self.expect("node")?;
                    self.node(depth + 1)?;
                    self.expect(")")?;
                    prev = Some(name);
                }
            }
            other => {
                return Err(self.corrupt(format!(
                    "unknown NAR node type \"{}\"",
                    String::from_utf8_lossy(other)
                )))
            }
        }
        self.expect(")")
    }

    /// After the end marker: nothing (a plain Nix export), or the trailer,
    /// whose checksums must match.
    fn trailer(&mut self, entries: &[Entry]) -> Result<bool, FormatError> {
        let meta = std::mem::take(&mut self.meta).finalize();
        let mut len = [0u8; 8];
        if !self.fill(&mut len, "the checksum trailer")? {
            return Ok(false);
        }
        let n = u64::from_le_bytes(len);
        if n != TRAILER_MAGIC.len() as u64 {
            return Err(self.corrupt("unexpected data after the end marker".into()));
        }
        let mut magic = vec![0u8; n as usize];
        self.exact(&mut magic, "the checksum trailer")?;
        self.padding(n, "the checksum trailer")?;
        if magic != TRAILER_MAGIC {
            return Err(self.corrupt("unexpected data after the end marker".into()));
        }
        let count = self.u64("the checksum trailer")?;
        if count != entries.len() as u64 {
            return Err(self.corrupt(format!(
                "the trailer lists {count} checksums for {} paths",
                entries.len()
            )));
        }
        for e in entries {
            let p = self.string("a checksum's path")?;
            let h = self.string("a checksum")?;
            if p != e.path.to_absolute().as_bytes() {
                return Err(FormatError::MetaChecksum);
            }
            let actual = e.nar.to_db_string();
            if h != actual.as_bytes() {
                return Err(FormatError::NarHashMismatch {
                    path: e.path.to_absolute(),
                    recorded: String::from_utf8_lossy(&h).into_owned(),
                    actual,
                });
            }
        }
        let digest = self.string("the metadata checksum")?;
        if digest != meta.as_slice() {
            return Err(FormatError::MetaChecksum);
        }
        let mut extra = [0u8; 1];
        if self.fill(&mut extra, "")? {
            return Err(self.corrupt("unexpected data after the checksum trailer".into()));
        }
        Ok(true)
    }
}

/// Where an export is written: a file (written under a temporary name and
/// renamed when complete) or stdout, through a compressor when asked.
pub struct Output {
    file: PathBuf,
    tmp: Option<tempfile::TempPath>,
    child: Option<(Child, &'static str)>,
    sink: io::BufWriter<Box<dyn Write>>,
}

impl Output {
    /// `file` "-" is stdout.
    pub fn create(file: &Path, compression: Compression) -> Result<Output, ExportError> {
        let io = |source| ExportError::Io {
            path: file.to_owned(),
            source,
        };
        let (file_out, tmp): (Option<File>, Option<tempfile::TempPath>) = if file == Path::new("-")
        {
            (None, None)
        } else {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            // 0666 less the umask, as files other tools write (tempfile's
            // default, 0600, would keep the export from other users).
            let t = tempfile::Builder::new()
                .prefix(".nixfs-layer-export-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .tempfile_in(dir)
                .map_err(io)?;
            let (f, path) = t.into_parts();
            (Some(f), Some(path))
        };
        let (sink, child): (Box<dyn Write>, _) = match (compression.program(), file_out) {
            (None, Some(f)) => (Box::new(f), None),
            (None, None) => (Box::new(io::stdout()), None),
            (Some(program), f) => {
                let mut c = Command::new(program);
                c.args(["-q", "-c"]);
                if compression == Compression::Xz {
                    c.arg("-T0");
                }
                let mut child = c
                    .stdin(Stdio::piped())
                    .stdout(f.map_or_else(Stdio::inherit, Stdio::from))
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|source| ExportError::Spawn { program, source })?;
                let stdin: ChildStdin = child.stdin.take().expect("piped stdin");
                (Box::new(stdin) as Box<dyn Write>, Some((child, program)))
            }
        };
        Ok(Output {
            file: file.to_owned(),
            tmp,
            child,
            sink: io::BufWriter::with_capacity(256 * 1024, sink),
        })
    }

    /// Flushes, waits for the compressor, and puts the file in place.
    pub fn finish(self) -> Result<(), ExportError> {
        let io = |source| ExportError::Io {
            path: self.file.clone(),
            source,
        };
        let inner = self.sink.into_inner().map_err(|e| io(e.into_error()))?;
        drop(inner);
        if let Some((child, program)) = self.child {
            let out = child.wait_with_output().map_err(io)?;
            if !out.status.success() {
                return Err(ExportError::Compress {
                    file: self.file.clone(),
                    program,
                    status: out.status,
                    message: last_line(&out.stderr),
                });
            }
        }
        if let Some(tmp) = self.tmp {
            tmp.persist(&self.file).map_err(|e| io(e.error))?;
        }
        Ok(())
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// The last non-empty line of a program's stderr.
pub fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .to_owned()
}

/// An export file opened for reading: decompressed through `zstd`/`xz`
/// when its magic bytes say so.
pub struct Input {
    file: PathBuf,
    child: Option<(Child, &'static str)>,
    reader: Box<dyn Read>,
}

impl Input {
    pub fn open(file: &Path) -> Result<Input, ExportError> {
        let io = |source| ExportError::Io {
            path: file.to_owned(),
            source,
        };
        let mut f = File::open(file).map_err(io)?;
        let mut head = [0u8; 8];
        let n = read_up_to(&mut f, &mut head).map_err(io)?;
        let compression = Compression::detect(&head[..n]);
        drop(f);
        match compression.program() {
            None => Ok(Input {
                file: file.to_owned(),
                child: None,
                reader: Box::new(File::open(file).map_err(io)?),
            }),
            Some(program) => {
                let mut child = Command::new(program)
                    .args(["-d", "-c", "-q", "--"])
                    .arg(file)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|source| ExportError::Spawn { program, source })?;
                let out: ChildStdout = child.stdout.take().expect("piped stdout");
                Ok(Input {
                    file: file.to_owned(),
                    child: Some((child, program)),
                    reader: Box::new(out),
                })
            }
        }
    }

    /// Reads the whole stream (see [`read`]). A failing decompressor is
    /// reported in preference to what its short output looked like.
    pub fn read(mut self, tee: Option<&mut dyn Write>) -> Result<Contents, ExportError> {
        let compressed = self.child.as_ref().map(|(_, program)| *program);
        let mut watched = EofWatch {
            inner: &mut self.reader,
            eof: false,
        };
        let parsed = read(&mut watched, tee);
        let at_eof = watched.eof;
        drop(self.reader);
        if let Some((mut child, program)) = self.child {
            // A parser that stopped early leaves the decompressor writing
            // into a closed pipe: stop it, its failure would be ours. One
            // that read to the end saw the decompressor close its output:
            // let it exit, its status tells a truncated or corrupt file.
            if parsed.is_err() && !at_eof {
                let _ = child.kill();
            }
            let out = child.wait_with_output().map_err(|source| ExportError::Io {
                path: self.file.clone(),
                source,
            })?;
            if !out.status.success() && (parsed.is_ok() || !killed(&out.status)) {
                return Err(ExportError::Decompress {
                    file: self.file,
                    program,
                    status: out.status,
                    message: last_line(&out.stderr),
                });
            }
        }
        parsed.map_err(|source| ExportError::Format {
            file: self.file,
            source: match (source, compressed) {
                (FormatError::NotAnExport, Some(program)) => {
                    FormatError::NotAnExportInside(program)
                }
                (source, _) => source,
            },
        })
    }
}

/// Notes whether a read returned end of file.
struct EofWatch<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

fn killed(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGKILL)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn sample() -> (tempfile::TempDir, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("p");
        fs::create_dir_all(p.join("bin")).unwrap();
        fs::write(p.join("bin/x"), "hello").unwrap();
        std::os::unix::fs::symlink("bin/x", p.join("l")).unwrap();
        let h = nar::hash_path(&p).unwrap().to_db_string();
        let mut w = Writer::new(Vec::new(), Path::new("memory"));
        let path = "/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-p";
        let dep = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-dep";
        w.path(
            &p,
            &PathMeta {
                path,
                references: vec![dep, path],
                deriver: None,
                nar_hash: &h,
            },
        )
        .unwrap();
        let bytes = w.finish(true).unwrap();
        (t, bytes)
    }

    /// Accepts `room` bytes, then fails as a full disk does.
    struct Full {
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn errors_name_the_side_that_failed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("p");
        fs::write(&p, "x".repeat(10_000)).unwrap();
        let h = nar::hash_path(&p).unwrap().to_db_string();
        let meta = PathMeta {
            path: "/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-p",
            references: vec![],
            deriver: None,
            nar_hash: &h,
        };
        let out = Path::new("/srv/out.nixexport");
        // Writing fails: inside the NAR, and in the metadata after it.
        for room in [100, 10_200] {
            let mut w = Writer::new(Full { room }, out);
            match w.path(&p, &meta) {
                Err(ExportError::Io { path, .. }) => assert_eq!(path, out, "room {room}"),
                r => panic!("room {room}: {r:?}"),
            }
        }
        // Reading fails.
        let gone = t.path().join("gone");
        let mut w = Writer::new(Vec::new(), out);
        match w.path(&gone, &meta) {
            Err(ExportError::Io { path, .. }) => assert_eq!(path, gone),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn reads_back_what_it_writes() {
        let (_t, bytes) = sample();
        let c = read(&bytes[..], None).unwrap();
        assert!(c.checksummed);
        assert_eq!(c.entries.len(), 1);
        assert_eq!(c.entries[0].references.len(), 2);
        assert_eq!(c.entries[0].deriver, None);
    }

    #[test]
    fn tee_gets_the_nix_part_only() {
        let (_t, bytes) = sample();
        let mut nix_part = Vec::new();
        let c = read(&bytes[..], Some(&mut nix_part)).unwrap();
        let plain = read(&nix_part[..], None).unwrap();
        assert!(!plain.checksummed);
        assert_eq!(plain.entries, c.entries);
        assert!(bytes.starts_with(&nix_part) && nix_part.ends_with(&[0u8; 8]));
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_caught() {
        let (_t, bytes) = sample();
        // The end marker's end: there the rest reads as a plain Nix export
        // without a trailer (reported as not checksummed).
        let mut tee = Vec::new();
        read(&bytes[..], Some(&mut tee)).unwrap();
        let nix_end = tee.len();
        for cut in 0..bytes.len() {
            match read(&bytes[..cut], None) {
                Ok(c) => assert!(cut == nix_end && !c.checksummed, "cut at {cut}"),
                Err(_) => assert_ne!(cut, nix_end),
            }
        }
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(read(&b[..], None).is_err(), "flip of bit {bit} at {i}");
            }
        }
    }

    #[test]
    fn a_flipped_content_byte_names_the_path() {
        let (_t, mut bytes) = sample();
        let at = bytes.windows(5).position(|w| w == b"hello").unwrap();
        bytes[at] ^= 1;
        let e = read(&bytes[..], None).unwrap_err();
        assert!(matches!(e, FormatError::NarHashMismatch { .. }), "{e}");
        assert!(e.to_string().contains("-p hashes to"), "{e}");
    }

    #[test]
    fn refuses_what_is_no_export() {
        assert!(matches!(
            read(&b"\x07\0\0\0\0\0\0\0"[..], None),
            Err(FormatError::NotAnExport)
        ));
        assert!(matches!(
            read(&b""[..], None),
            Err(FormatError::NotAnExport)
        ));
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(XZ_MAGIC), Compression::Xz);
        assert_eq!(Compression::detect(&[1, 0]), Compression::None);
    }

    /// A compressed export cut short anywhere is called truncated or
    /// corrupt, naming the file and the decompressor, never "not an export"
    /// (which a decompressor that failed before writing anything used to
    /// look like, when it was killed before its failure was seen).
    #[test]
    fn a_truncated_compressed_export_is_called_truncated() {
        let (_t, bytes) = sample();
        let dir = tempfile::tempdir().unwrap();
        for program in ["zstd", "xz"] {
            let whole = dir.path().join(format!("whole.{program}"));
            let mut c = Command::new(program)
                .args(["-c", "-q"])
                .stdin(Stdio::piped())
                .stdout(File::create(&whole).unwrap())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(&bytes).unwrap();
            assert!(c.wait().unwrap().success());
            let z = fs::read(&whole).unwrap();
            for cut in [8, z.len() / 2, z.len() - 9, z.len() - 1] {
                for round in 0..20 {
                    let file = dir.path().join(format!("cut-{cut}-{round}.{program}"));
                    fs::write(&file, &z[..cut]).unwrap();
                    let err = Input::open(&file).unwrap().read(None).unwrap_err();
                    let msg = err.to_string();
                    assert!(
                        matches!(err, ExportError::Decompress { .. }),
                        "{program} cut at {cut}/{}: {msg}",
                        z.len()
                    );
                    assert!(msg.starts_with(&format!("{}: ", file.display())), "{msg}");
                    assert!(
                        msg.contains(program) && msg.contains("truncated or corrupt"),
                        "{msg}"
                    );
                }
            }
        }
    }

    /// This process's umask, as the kernel reports it.
    fn umask() -> u32 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }

    /// An export file gets 0666 less the umask (0644 under the usual 022),
    /// compressed or not, as other tools' output files do.
    #[test]
    fn export_files_are_created_as_the_umask_says() {
        use std::os::unix::fs::PermissionsExt;
        let want = 0o666 & !umask();
        let dir = tempfile::tempdir().unwrap();
        for c in [Compression::None, Compression::Zstd] {
            let file = dir.path().join(format!("out-{c:?}"));
            let mut out = Output::create(&file, c).unwrap();
            out.write_all(b"x").unwrap();
            out.finish().unwrap();
            let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{c:?}: {mode:o}, umask {:o}", umask());
        }
    }

    /// A compressed file whose content is no export says it decompressed
    /// (not "is not zstd or xz") and which compressor it was.
    #[test]
    fn a_compressed_file_that_is_no_export_says_it_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        for program in ["zstd", "xz"] {
            let file = dir.path().join(format!("notes.{program}"));
            let mut c = Command::new(program)
                .args(["-c", "-q"])
                .stdin(Stdio::piped())
                .stdout(File::create(&file).unwrap())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(b"some notes, no export\n")
                .unwrap();
            assert!(c.wait().unwrap().success());
            let err = Input::open(&file).unwrap().read(None).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!(
                    "{}: not an export: it is {program}-compressed",
                    file.display()
                )),
                "{msg}"
            );
            assert!(!msg.contains("is not zstd or xz"), "{msg}");
        }
    }
}
