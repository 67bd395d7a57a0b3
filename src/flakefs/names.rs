//! Names under `/nixfs/flake/{str,b64,urlenc}/`: decoding them to a flake
//! reference and checking that reference before anything runs.
//!
//! Everything here is pure: a name that is refused here never starts a Nix
//! process. The reference is passed to Nix as one argument after `--`, but
//! it is also checked so that nothing in it could read as an option
//! (`-…`, whitespace, control characters), and references that name local
//! files are recognised so the caller's permissions can be checked.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// The longest name FUSE passes to a lookup (the kernel refuses longer ones
/// itself with ENAMETOOLONG).
pub const MAX_NAME: usize = 1024;

/// How a directory under `/nixfs/flake` encodes references in names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The reference as typed (it cannot contain `/`).
    Str,
    /// Base64 of the reference, URL-safe or standard alphabet, padded or not.
    B64,
    /// The reference percent-encoded.
    Urlenc,
}

impl Encoding {
    pub fn dir_name(self) -> &'static str {
        match self {
            Encoding::Str => "str",
            Encoding::B64 => "b64",
            Encoding::Urlenc => "urlenc",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name is {0} bytes; names are at most {MAX_NAME}")]
    TooLong(usize),
    #[error("not valid base64 (URL-safe or standard alphabet): {0}")]
    Base64(String),
    #[error("not valid percent-encoding: an escape is not followed by two hex digits")]
    Percent,
    #[error("the reference is not UTF-8")]
    NotUtf8,
    #[error("'{0}': a flake reference may not start with '-'")]
    LeadingDash(String),
    #[error("'{0}': whitespace or control characters are not allowed in a flake reference")]
    BadChar(String),
    #[error("'{0}': relative paths are refused (the daemon has no working directory of yours); use an absolute path: path:/abs/dir")]
    RelativePath(String),
    #[error("'{reference}': unsupported flake reference type '{scheme}'")]
    UnknownScheme { reference: String, scheme: String },
    #[error("'{reference}': not a flake reference: {why}")]
    Unparseable { reference: String, why: String },
    #[error("'{0}': a path may not hold '.' or '..' segments; give the directory itself")]
    DotSegment(String),
    #[error("'{reference}': not a registry name: {why}")]
    NotRegistryName { reference: String, why: String },
    #[error("'{reference}': bad attribute path: {why}")]
    AttrPath { reference: String, why: String },
    #[error("'{reference}': bad output selection '^{outputs}': give exactly one output name, e.g. ^out or ^dev")]
    Output { reference: String, outputs: String },
}

impl NameError {
    /// The errno a lookup of such a name answers.
    pub fn errno(&self) -> i32 {
        match self {
            NameError::TooLong(_) => libc::ENAMETOOLONG,
            NameError::Empty => libc::ENOENT,
            _ => libc::EINVAL,
        }
    }
}

/// Where a flake reference's source comes from, as far as permissions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry name (`nixpkgs`, `flake:nixpkgs/branch`): the admin's registry decides.
    Indirect,
    /// Fetched from elsewhere (`github:`, `git+https:`, `https:` …).
    Remote,
    /// A local directory or file (`path:`, `git+file:`, `/abs`): read by the
    /// daemon as root, so the caller must be able to read it.
    Local(PathBuf),
}

/// A checked flake reference: `<flake>[#<attrpath>][^<output>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef {
    /// The reference as decoded from the name (the cache key).
    pub text: String,
    /// The flake part (before `#`).
    pub flake: String,
    /// The attribute path as written (after `#`, without `^…`), if any.
    pub attr: Option<String>,
    /// The output picked with `^name`, if any.
    pub output: Option<String>,
    pub source: Source,
    /// Pinned by a revision or a NAR hash: its result never changes.
    pub locked: bool,
}

fn lenient(alphabet: &base64::alphabet::Alphabet) -> GeneralPurpose {
    GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Decodes a directory entry name to the reference text it stands for.
pub fn decode(enc: Encoding, name: &OsStr) -> Result<String, NameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > MAX_NAME {
        return Err(NameError::TooLong(bytes.len()));
    }
    let decoded: Vec<u8> = match enc {
        Encoding::Str => bytes.to_vec(),
        Encoding::B64 => {
            let url = lenient(&base64::alphabet::URL_SAFE).decode(bytes);
            match url {
                Ok(v) => v,
                Err(e) => lenient(&base64::alphabet::STANDARD)
                    .decode(bytes)
                    .map_err(|_| NameError::Base64(e.to_string()))?,
            }
        }
        Encoding::Urlenc => {
            // percent-encoding passes malformed escapes through; refuse them.
            let mut i = 0;
            while let Some(p) = bytes[i..].iter().position(|&b| b == b'%') {
                let at = i + p;
                let ok = bytes.len() > at + 2
                    && bytes[at + 1].is_ascii_hexdigit()
                    && bytes[at + 2].is_ascii_hexdigit();
                if !ok {
                    return Err(NameError::Percent);
                }
                i = at + 3;
            }
            percent_encoding::percent_decode(bytes).collect()
        }
    };
    let text = String::from_utf8(decoded).map_err(|_| NameError::NotUtf8)?;
    if text.is_empty() {
        return Err(NameError::Empty);
    }
    Ok(text)
}

/// Schemes of references whose source is a local file or directory.
const LOCAL_SCHEMES: &[&str] = &[
    "path",
    "git+file",
    "hg+file",
    "file",
    "tarball+file",
    "file+file",
];
/// Schemes fetched from elsewhere.
const REMOTE_SCHEMES: &[&str] = &[
    "github",
    "gitlab",
    "sourcehut",
    "git+https",
    "git+http",
    "git+ssh",
    "git",
    "hg+https",
    "hg+http",
    "hg+ssh",
    "https",
    "http",
    "tarball+https",
    "tarball+http",
    "file+https",
    "file+http",
];

impl FlakeRef {
    /// Parses and checks a reference.
    pub fn parse(text: &str) -> Result<FlakeRef, NameError> {
        let reference = || text.to_owned();
        if text.is_empty() {
            return Err(NameError::Empty);
        }
        if text.starts_with('-') {
            return Err(NameError::LeadingDash(reference()));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(NameError::BadChar(reference()));
        }
        let (flake, fragment) = match text.split_once('#') {
            Some((f, frag)) => (f, Some(frag)),
            None => (text, None),
        };
        if flake.is_empty() {
            return Err(NameError::Unparseable {
                reference: reference(),
                why: "nothing before '#'".into(),
            });
        }
        let (attr, output) = match fragment {
            None => (None, None),
            Some(frag) => {
                let (attr, output) = split_output(frag);
                if let Some(o) = output {
                    if !valid_output_name(o) {
                        return Err(NameError::Output {
                            reference: reference(),
                            outputs: o.to_owned(),
                        });
                    }
                }
                if !attr.is_empty() {
                    check_attr_path(attr).map_err(|why| NameError::AttrPath {
                        reference: reference(),
                        why,
                    })?;
                }
                (
                    (!attr.is_empty()).then(|| attr.to_owned()),
                    output.map(str::to_owned),
                )
            }
        };
        let (source, params) = classify(flake, text)?;
        let locked = is_locked(flake, params);
        Ok(FlakeRef {
            text: text.to_owned(),
            flake: flake.to_owned(),
            attr,
            output,
            source,
            locked,
        })
    }

    /// What is passed to `nix eval`/`nix build` (the `^output` part is
    /// handled by this tool: Nix 2.8 does not parse it).
    pub fn installable(&self) -> String {
        match &self.attr {
            Some(a) => format!("{}#{a}", self.flake),
            None => self.flake.clone(),
        }
    }

    /// The installable of one output's derivation attribute (`attr.dev`).
    pub fn output_installable(&self, output: &str) -> String {
        match &self.attr {
            Some(a) => format!("{}#{a}.{output}", self.flake),
            // The flake's default package: Nix finds it by name only.
            None => format!("{}#default.{output}", self.flake),
        }
    }
}

/// Splits `attr^out` at a `^` outside double quotes.
fn split_output(frag: &str) -> (&str, Option<&str>) {
    let mut quoted = false;
    for (i, c) in frag.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '^' if !quoted => return (&frag[..i], Some(&frag[i + 1..])),
            _ => {}
        }
    }
    (frag, None)
}

fn valid_output_name(o: &str) -> bool {
    !o.is_empty()
        && !o.starts_with('-')
        && o.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-+".contains(c))
}

/// `a.b."c.d".e`: elements separated by dots, quoted ones may hold dots.
fn check_attr_path(attr: &str) -> Result<(), String> {
    let mut elems = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    for c in attr.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '.' if !quoted => {
                elems.push((std::mem::take(&mut cur), was_quoted));
                was_quoted = false;
            }
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated '\"'".into());
    }
    elems.push((cur, was_quoted));
    for (e, q) in &elems {
        if e.is_empty() && !q {
            return Err("empty attribute name".into());
        }
        if !q && e.starts_with('-') {
            return Err(format!("attribute '{e}' starts with '-'"));
        }
        if e.contains(['\\', '$', '{', '}']) {
            return Err(format!("attribute '{e}' holds '\\', '$' or braces"));
        }
    }
    Ok(())
}

/// Sorts a flake part into its source kind; returns the query string too.
fn classify<'a>(flake: &'a str, text: &str) -> Result<(Source, &'a str), NameError> {
    let (body, params) = match flake.split_once('?') {
        Some((b, p)) => (b, p),
        None => (flake, ""),
    };
    if body.starts_with('/') {
        return Ok((Source::Local(local_path_checked(body, text)?), params));
    }
    if body == "." || body == ".." || body.starts_with("./") || body.starts_with("../") {
        return Err(NameError::RelativePath(text.to_owned()));
    }
    let scheme = body.split_once(':').map(|(s, _)| s).filter(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let Some(scheme) = scheme else {
        // A registry name: `nixpkgs`, `nixpkgs/branch`, `nixpkgs/branch/rev`.
        check_indirect(body, params, text)?;
        return Ok((Source::Indirect, params));
    };
    let rest = &body[scheme.len() + 1..];
    if scheme == "flake" {
        check_indirect(rest, params, text)?;
        return Ok((Source::Indirect, params));
    }
    if LOCAL_SCHEMES.contains(&scheme) {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(NameError::RelativePath(text.to_owned()));
        }
        return Ok((Source::Local(local_path_checked(path, text)?), params));
    }
    if REMOTE_SCHEMES.contains(&scheme) {
        if rest.is_empty() {
            return Err(NameError::Unparseable {
                reference: text.to_owned(),
                why: format!("nothing after '{scheme}:'"),
            });
        }
        return Ok((Source::Remote, params));
    }
    Err(NameError::UnknownScheme {
        reference: text.to_owned(),
        scheme: scheme.to_owned(),
    })
}

/// A registry name as Nix itself parses one (`nixpkgs`, `nixpkgs/branch`,
/// `nixpkgs/<rev>`, `nixpkgs/branch/<rev>`): an id `[a-zA-Z][a-zA-Z0-9_-]*`,
/// then ref segments that each start with a letter, digit or `@` (so no `.`
/// or `..` segment), then maybe a revision. Anything else without a scheme
/// Nix 2.8 would read as a path relative to the server's working directory,
/// and a query (`nixpkgs?dir=x`) turns a name into a path too: refused.
fn check_indirect(body: &str, params: &str, text: &str) -> Result<(), NameError> {
    let refuse = |why: &str| {
        Err(NameError::NotRegistryName {
            reference: text.to_owned(),
            why: why.to_owned(),
        })
    };
    if !params.is_empty() || text.split('#').next().unwrap_or_default().contains('?') {
        return refuse("a registry name takes no '?' parameters");
    }
    let mut segments = body.split('/');
    let id = segments.next().unwrap_or_default();
    let id_ok = id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if !id_ok {
        return Err(NameError::Unparseable {
            reference: text.to_owned(),
            why: "neither a registry name (e.g. nixpkgs) nor type:location (e.g. github:owner/repo, path:/dir)".into(),
        });
    }
    for seg in segments {
        let ok = seg.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '@')
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.@+-".contains(c))
            && !seg.contains("..")
            && !seg.ends_with(".lock")
            && !seg.ends_with('.');
        if !ok {
            return refuse(&format!(
                "'{seg}' is not a branch, tag or revision (a path? give it as path:/abs/dir)"
            ));
        }
    }
    Ok(())
}

/// A local path with no `.` or `..` segment (decoded): the path Nix opens
/// is then the path the caller's rights are checked on, symlinks aside.
fn local_path_checked(p: &str, text: &str) -> Result<PathBuf, NameError> {
    let path = local_path(p);
    let dotted = path
        .to_str()
        .unwrap_or_default()
        .split('/')
        .any(|seg| seg == "." || seg == "..");
    if dotted {
        return Err(NameError::DotSegment(text.to_owned()));
    }
    Ok(path)
}

fn local_path(p: &str) -> PathBuf {
    let decoded = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
    PathBuf::from(decoded.into_owned())
}

/// A reference whose result cannot change: a revision or a NAR hash in its
/// parameters, or a commit hash as the third part of `github:o/r/<rev>`.
fn is_locked(flake: &str, params: &str) -> bool {
    let pinned = params.split('&').any(|kv| match kv.split_once('=') {
        Some(("rev", v)) => is_rev(v),
        Some(("narHash", v)) => !v.is_empty(),
        _ => false,
    });
    if pinned {
        return true;
    }
    let body = flake.split('?').next().unwrap_or_default();
    match body.split_once(':') {
        Some(("github" | "gitlab" | "sourcehut", rest)) => {
            rest.split('/').nth(2).is_some_and(is_rev)
        }
        _ => false,
    }
}

fn is_rev(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn parse(s: &str) -> Result<FlakeRef, NameError> {
        FlakeRef::parse(s)
    }

    #[test]
    fn decodes_every_encoding() {
        let r = "path:/srv/f~#x";
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r);
        let std_pad = base64::engine::general_purpose::STANDARD.encode(r);
        assert!(std_pad.contains('+') && std_pad.ends_with('=') && url.contains('-'));
        assert_eq!(decode(Encoding::B64, OsStr::new(&url)).unwrap(), r);
        assert_eq!(decode(Encoding::B64, OsStr::new(&std_pad)).unwrap(), r);
        let pct: String =
            percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        assert_eq!(decode(Encoding::Urlenc, OsStr::new(&pct)).unwrap(), r);
        assert_eq!(
            decode(Encoding::Str, OsStr::new("nixpkgs#hello")).unwrap(),
            "nixpkgs#hello"
        );
    }

    #[rstest]
    #[case(Encoding::Str, "", libc::ENOENT)]
    #[case(Encoding::B64, "!!!!", libc::EINVAL)]
    #[case(Encoding::B64, "a", libc::EINVAL)]
    #[case(Encoding::Urlenc, "abc%2", libc::EINVAL)]
    #[case(Encoding::Urlenc, "abc%zz", libc::EINVAL)]
    #[case(Encoding::Urlenc, "%ff%fe", libc::EINVAL)]
    fn refuses_bad_names(#[case] enc: Encoding, #[case] name: &str, #[case] errno: i32) {
        assert_eq!(decode(enc, OsStr::new(name)).unwrap_err().errno(), errno);
    }

    #[test]
    fn refuses_overlong_names() {
        let long = "a".repeat(MAX_NAME + 1);
        let e = decode(Encoding::Str, OsStr::new(&long)).unwrap_err();
        assert_eq!(e.errno(), libc::ENAMETOOLONG);
    }

    #[test]
    fn parses_refs() {
        let r = parse("nixpkgs#hello").unwrap();
        assert_eq!(r.source, Source::Indirect);
        assert_eq!(r.installable(), "nixpkgs#hello");
        assert!(!r.locked);

        let r = parse("myflake#packages.x86_64-linux.foo^dev").unwrap();
        assert_eq!(r.attr.as_deref(), Some("packages.x86_64-linux.foo"));
        assert_eq!(r.output.as_deref(), Some("dev"));
        assert_eq!(
            r.output_installable("dev"),
            "myflake#packages.x86_64-linux.foo.dev"
        );

        let r = parse(r#"path:/srv/f?narHash=sha256-abc#"a.b"^out"#).unwrap();
        assert_eq!(r.source, Source::Local("/srv/f".into()));
        assert_eq!(r.attr.as_deref(), Some(r#""a.b""#));
        assert!(r.locked);

        let r =
            parse("git+file:///srv/repo%20x?rev=0123456789abcdef0123456789abcdef01234567").unwrap();
        assert_eq!(r.source, Source::Local("/srv/repo x".into()));
        assert!(r.locked);
        assert!(
            parse("github:o/r/0123456789abcdef0123456789abcdef01234567#x")
                .unwrap()
                .locked
        );
        assert!(!parse("github:o/r/main#x").unwrap().locked);
        assert_eq!(
            parse("/abs/flake#x").unwrap().source,
            Source::Local("/abs/flake".into())
        );
        assert_eq!(parse("flake:nixpkgs").unwrap().source, Source::Indirect);
        for ok in [
            "nixpkgs/nixos-23.05#hello",
            "nixpkgs/release/23.05#hello",
            "nixpkgs/0123456789abcdef0123456789abcdef01234567#hello",
            "flake:my_flake-2/@v1#x",
        ] {
            assert_eq!(parse(ok).unwrap().source, Source::Indirect, "{ok}");
        }
    }

    #[rstest]
    #[case("-E")]
    #[case("--option")]
    #[case("nixpkgs#hello --impure")]
    #[case("nixpkgs#hello\t--expr")]
    #[case(".#hello")]
    #[case("./x#hello")]
    #[case("../x")]
    #[case("path:rel/dir#x")]
    #[case("git+file:rel#x")]
    #[case("nixpkgs#a..b")]
    #[case("nixpkgs#--impure")]
    #[case("nixpkgs#\"unterminated")]
    #[case("nixpkgs#hello^out,dev")]
    #[case("nixpkgs#hello^*")]
    #[case("nixpkgs#hello^")]
    #[case("#hello")]
    #[case("weird!:x")]
    #[case("ftp:host/x")]
    #[case("nixpkgs#${builtins.x}")]
    #[case("tmp/../tmp/secret#x")]
    #[case("tmp/./x#x")]
    #[case("nixpkgs/..")]
    #[case("nixpkgs/.hidden")]
    #[case("nixpkgs//x")]
    #[case("nixpkgs?dir=x#hello")]
    #[case("flake:nixpkgs?dir=x#hello")]
    #[case("flake:tmp/../x#hello")]
    #[case("nixpkgs/x.lock")]
    #[case("/srv/link/..#x")]
    #[case("path:/srv/./f#x")]
    #[case("git+file:///srv/a/%2E%2E/b#x")]
    fn refuses_bad_refs(#[case] r: &str) {
        let e = parse(r).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{r}: {e}");
        assert!(e.to_string().contains(r), "the message names the ref: {e}");
    }
}
