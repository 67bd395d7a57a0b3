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
    fn accepts_every_character_nix_allows() {
        assert!(StorePath::parse(&format!("/nix/store/{H}-a+b-c._?=Z9")).is_ok());
    }
}
