//! Store paths: `/nix/store/<32 nixbase32 chars>-<name>`.
//!
//! A [`StorePath`] is always well formed, so code that holds one never has to
//! re-check it (the merged database only ever receives such paths).

use std::fmt;

/// The store directory every layer's database speaks of. Lowers keep their
/// files in `<lower>/store`, but their database rows name `/nix/store/...`.
pub const STORE_DIR: &str = "/nix/store";

/// Nix's base-32 alphabet (no e, o, u, t).
pub const NIXBASE32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("'{0}' is not under {STORE_DIR}/")]
    NotInStore(String),
    #[error("'{0}' has no '<hash>-<name>' base name")]
    NoName(String),
    #[error("'{0}' has a hash part that is not 32 nixbase32 characters")]
    BadHash(String),
    #[error("'{0}' has a name that is empty, too long, starts with '.' or holds a character Nix does not allow")]
    BadName(String),
}

/// The base name (`<hash>-<name>`, its entry in a store directory) of a
/// store path held as a string, such as a `/nix/store/…` database row:
/// its last component.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A valid store path, kept as its base name (`<hash>-<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parses an absolute store path such as `/nix/store/abc…-hello-2.12`.
    pub fn parse(path: &str) -> Result<Self, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        Self::from_base_name(base).map_err(|e| match e {
            StorePathError::NoName(_) => StorePathError::NoName(path.to_owned()),
            StorePathError::BadHash(_) => StorePathError::BadHash(path.to_owned()),
            StorePathError::BadName(_) => StorePathError::BadName(path.to_owned()),
            other => other,
        })
    }

    /// Parses the base name of a store path (`<hash>-<name>`), as it appears
    /// as an entry of a store directory.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_LEN + 2 || base.as_bytes()[HASH_LEN] != b'-' {
            return Err(StorePathError::NoName(base.to_owned()));
        }
        let (hash, name) = (&base[..HASH_LEN], &base[HASH_LEN + 1..]);
        if !hash.bytes().all(|b| NIXBASE32_ALPHABET.contains(&b)) {
            return Err(StorePathError::BadHash(base.to_owned()));
        }
        if !valid_name(name) {
            return Err(StorePathError::BadName(base.to_owned()));
        }
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    /// `<hash>-<name>`: the entry's name inside a store directory.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    /// The name after the hash.
    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// The absolute path, `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

/// Nix's base-32 encoding (used for store path hashes): least significant
/// 5-bit group last.
pub fn nixbase32_encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let lo = u32::from(bytes[i]) >> j;
            let hi = bytes.get(i + 1).map_or(0, |&x| u32::from(x) << (8 - j));
            NIXBASE32_ALPHABET[((lo | hi) & 0x1f) as usize] as char
        })
        .collect()
}

/// Folds a hash to `size` bytes by XOR, as Nix does for store path hashes.
pub fn compress_hash(hash: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, b) in hash.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// `makeStorePath`: the store path for a path of kind `ty` (`source`,
/// `text:<refs>`, `output:out`, …) whose content/derivation hashes to the
/// SHA-256 `hash`.
pub fn make_store_path(ty: &str, hash: &[u8; 32], name: &str) -> Result<StorePath, StorePathError> {
    use sha2::{Digest, Sha256};
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let fingerprint = format!("{ty}:sha256:{hex}:{STORE_DIR}:{name}");
    let digest = Sha256::digest(fingerprint.as_bytes());
    StorePath::from_base_name(&format!(
        "{}-{name}",
        nixbase32_encode(&compress_hash(&digest, 20))
    ))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const H: &str = "3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5";

    #[test]
    fn parses_a_store_path() {
        let p = StorePath::parse(&format!("/nix/store/{H}-hello-2.12.1")).unwrap();
        assert_eq!(p.hash_part(), H);
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.base_name(), format!("{H}-hello-2.12.1"));
        assert_eq!(p.to_string(), format!("/nix/store/{H}-hello-2.12.1"));
    }

    #[rstest]
    #[case::other_store("/gnu/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a", "not under")]
    #[case::no_slash("/nix/store3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a", "not under")]
    #[case::no_name("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5", "no '<hash>-<name>'")]
    #[case::empty_name("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-", "no '<hash>-<name>'")]
    #[case::short_hash("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxg-a", "no '<hash>-<name>'")]
    #[case::letter_e("/nix/store/efhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a", "nixbase32")]
    #[case::upper_case("/nix/store/3FHXQK6QP4GZRM0XS8W7DRF3VZNMXGZ5-a", "nixbase32")]
    #[case::dot_name("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-.a", "name")]
    #[case::slash_in_name("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a/b", "name")]
    #[case::space_in_name("/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a b", "name")]
    fn rejects_malformed_paths(#[case] path: &str, #[case] says: &str) {
        let err = StorePath::parse(path).unwrap_err();
        assert!(err.to_string().contains(says), "{path}: {err}");
        assert!(
            err.to_string().contains(path),
            "error names the path: {err}"
        );
    }

    #[test]
    fn name_length_limit_is_nixs() {
        let ok = format!("/nix/store/{H}-{}", "a".repeat(211));
        let long = format!("/nix/store/{H}-{}", "a".repeat(212));
        assert!(StorePath::parse(&ok).is_ok());
        assert!(StorePath::parse(&long).is_err());
    }

    #[test]
    fn nixbase32_matches_nix() {
        // `nix-hash --type sha256 --to-base32` of sha256("") in base16.
        let empty: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                        [2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(
            nixbase32_encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(nixbase32_encode(&[]), "");
        assert_eq!(nixbase32_encode(&[0xff]), "7z");
    }

    #[test]
    fn store_paths_of_added_files_match_nix() {
        // Nix 2.8's `nix-store --add` of a file "hello.txt" holding "hello\n"
        // printed /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt,
        // that is makeStorePath("source", narHash, name).
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("hello.txt");
        std::fs::write(&f, "hello\n").unwrap();
        let h = crate::nar::hash_path(&f).unwrap();
        let p = make_store_path("source", &h.sha256, "hello.txt").unwrap();
        assert_eq!(
            p.to_string(),
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
        );
        let b32 = std::process::Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(b32.stdout).unwrap().trim(),
            nixbase32_encode(&h.sha256)
        );
    }

    #[test]
    fn base_name_of_a_path_string() {
        let p = format!("/nix/store/{H}-hello-2.12.1");
        assert_eq!(base_name(&p), format!("{H}-hello-2.12.1"));
        assert_eq!(base_name(&p), StorePath::parse(&p).unwrap().base_name());
        assert_eq!(base_name("plain"), "plain");
    }

    #[test]
    fn accepts_every_character_nix_allows() {
        assert!(StorePath::parse(&format!("/nix/store/{H}-a+b-c._?=Z9")).is_ok());
    }
}
