//! The index of published flake references a lower carries: reference
//! text → store path (with the locked form Nix reported, the output, the
//! system and the time), so that every host stacking the lower resolves it
//! at once, offline, with no evaluation.
//!
//! The index is a table of the lower's own database
//! (`NixfsLayerPublished`): `publish` writes it in the same copy of the
//! database as the paths it copies and renames that copy into place
//! ([`crate::promote`]), so a reader sees the old index and store or the
//! new ones, never half. Nix ignores the table.
//!
//! Readers trust the index as they trust the lower (root-owned, read-only),
//! but not blindly: a malformed, oversized or foreign row is skipped with a
//! log line, and an index larger than [`MAX_ENTRIES`] is read only that far.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// The table in a lower's database.
pub const TABLE: &str = "NixfsLayerPublished";
/// Rows read from one index at most.
pub const MAX_ENTRIES: usize = 100_000;
/// The longest reference or path accepted.
const MAX_FIELD: usize = 4096;

const SCHEMA: &str = "create table if not exists NixfsLayerPublished (
    ref text primary key not null,
    path text not null,
    output text not null,
    locked text,
    system text,
    time integer not null
)";

/// One published reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    #[serde(rename = "ref")]
    pub reference: String,
    pub path: String,
    pub output: String,
    /// The locked reference Nix reported when it was published.
    pub locked: Option<String>,
    pub system: Option<String>,
    /// Seconds since the epoch.
    pub time: i64,
}

/// A change to an index.
#[derive(Debug, Clone)]
pub enum Change {
    Set(Entry),
    Remove(String),
}

/// Applies `changes` to the index in `conn` (the copy of a lower's
/// database being published).
pub fn apply(conn: &Connection, changes: &[Change]) -> rusqlite::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    conn.execute_batch(SCHEMA)?;
    for c in changes {
        match c {
            Change::Set(e) => {
                conn.execute(
                    "insert or replace into NixfsLayerPublished (ref, path, output, locked, system, time)
                     values (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![e.reference, e.path, e.output, e.locked, e.system, e.time],
                )?;
            }
            Change::Remove(r) => {
                conn.execute("delete from NixfsLayerPublished where ref = ?1", [r])?;
            }
        }
    }
    Ok(())
}

/// Whether `r`'s entry exists in the index of `conn`.
pub fn has(conn: &Connection, r: &str) -> rusqlite::Result<bool> {
    if !table_exists(conn)? {
        return Ok(false);
    }
    conn.query_row(
        "select 1 from NixfsLayerPublished where ref = ?1",
        [r],
        |_| Ok(()),
    )
    .optional()
    .map(|o| o.is_some())
}

fn table_exists(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "select 1 from sqlite_master where type = 'table' and name = ?1",
        [TABLE],
        |_| Ok(()),
    )
    .optional()
    .map(|o| o.is_some())
}

/// Every well-formed entry of the index in the database `db` (none when it
/// has no index), read without locking (the file is replaced whole by
/// `publish`, never written in place), skipping bad rows with a warning.
pub fn read(db: &Path) -> rusqlite::Result<Vec<Entry>> {
    let uri = format!(
        "file:{}?immutable=1",
        percent_encoding::utf8_percent_encode(
            &db.to_string_lossy(),
            percent_encoding::NON_ALPHANUMERIC
        )
        .to_string()
        .replace("%2F", "/")
    );
    let conn = Connection::open_with_flags(
        uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    read_conn(&conn, db)
}

fn read_conn(conn: &Connection, db: &Path) -> rusqlite::Result<Vec<Entry>> {
    if !table_exists(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "select ref, path, output, locked, system, time from NixfsLayerPublished limit ?1",
    )?;
    let rows = stmt.query_map([MAX_ENTRIES as i64 + 1], |r| {
        Ok((
            r.get::<_, rusqlite::types::Value>(0)?,
            r.get::<_, rusqlite::types::Value>(1)?,
            r.get::<_, rusqlite::types::Value>(2)?,
            r.get::<_, rusqlite::types::Value>(3)?,
            r.get::<_, rusqlite::types::Value>(4)?,
            r.get::<_, rusqlite::types::Value>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for (n, row) in rows.enumerate() {
        if n >= MAX_ENTRIES {
            tracing::warn!(db = %db.display(), "published index has more than {MAX_ENTRIES} entries; the rest are ignored");
            break;
        }
        match check(row?) {
            Ok(e) => out.push(e),
            Err(why) => {
                tracing::warn!(db = %db.display(), %why, "skipping a malformed published entry")
            }
        }
    }
    Ok(out)
}

type Row = (
    rusqlite::types::Value,
    rusqlite::types::Value,
    rusqlite::types::Value,
    rusqlite::types::Value,
    rusqlite::types::Value,
    rusqlite::types::Value,
);

fn check(row: Row) -> Result<Entry, String> {
    use rusqlite::types::Value;
    let text = |v: Value, what: &str| match v {
        Value::Text(s) if !s.is_empty() && s.len() <= MAX_FIELD => Ok(s),
        Value::Text(s) => Err(format!("{what} is {} bytes", s.len())),
        other => Err(format!("{what} is not text: {other:?}")),
    };
    let opt = |v: Value, what: &str| match v {
        Value::Null => Ok(None),
        v => text(v, what).map(Some),
    };
    let reference = text(row.0, "ref")?;
    let path = text(row.1, "path")?;
    let output = text(row.2, "output")?;
    let locked = opt(row.3, "locked")?;
    let system = opt(row.4, "system")?;
    let time = match row.5 {
        Value::Integer(t) => t,
        other => return Err(format!("time is not an integer: {other:?}")),
    };
    let base = path
        .strip_prefix("/nix/store/")
        .ok_or_else(|| format!("{reference}: {path} is not in /nix/store"))?;
    if base.is_empty() || base.contains('/') || base.starts_with('.') {
        return Err(format!("{reference}: {path} is not a store path"));
    }
    if crate::flakefs::names::FlakeRef::parse(&reference).is_err() {
        return Err(format!("'{reference}' is not a reference the tree takes"));
    }
    Ok(Entry {
        reference,
        path,
        output,
        locked,
        system,
        time,
    })
}

/// The digest of a reference that starts the names of its GC roots.
fn ref_digest(reference: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(reference.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of the GC root in [`Lower::published_roots`] of `reference`
/// published as `path`: a digest of the reference (any reference fits a
/// file name), the path's hash part, then the reference made readable. A
/// republished reference gets a new root beside the old one; the old one
/// goes once the index names the new path ([`drop_roots`]).
///
/// [`Lower::published_roots`]: crate::stack::layer::Lower::published_roots
pub fn root_name(reference: &str, path: &str) -> String {
    let hash = crate::storepath::base_name(path)
        .split('-')
        .next()
        .unwrap_or_default();
    let readable: String = reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{}-{hash}-{readable}", ref_digest(reference))
}

/// Roots the paths `changes` publish in `dir`, before the index names
/// them (a published path is never without its root). Each link is made
/// under a temporary name and renamed into place.
pub fn add_roots(dir: &Path, changes: &[Change]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for c in changes {
        if let Change::Set(e) = c {
            let name = root_name(&e.reference, &e.path);
            let tmp = dir.join(format!(".{name}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&e.path, &tmp)?;
            std::fs::rename(&tmp, dir.join(name))?;
        }
    }
    Ok(())
}

/// After the index took `changes`: drops the roots it no longer names (a
/// removed reference's; a republished one's old paths'). A run cut short
/// before leaves an extra root, never a published path without one.
pub fn drop_roots(dir: &Path, changes: &[Change]) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    for c in changes {
        let (reference, keep) = match c {
            Change::Set(e) => (&e.reference, Some(root_name(&e.reference, &e.path))),
            Change::Remove(r) => (r, None),
        };
        let prefix = format!("{}-", ref_digest(reference));
        for n in names.iter().filter(|n| n.starts_with(&prefix)) {
            if keep.as_deref() != Some(n.as_str()) {
                match std::fs::remove_file(dir.join(n)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(reference: &str, path: &str) -> Change {
        Change::Set(Entry {
            reference: reference.into(),
            path: path.into(),
            output: "out".into(),
            locked: None,
            system: None,
            time: 0,
        })
    }

    #[test]
    fn a_published_path_keeps_its_root_until_the_index_moves_on() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("roots");
        let (p1, p2) = (
            "/nix/store/3fhxqk6qp4gzrm0xs8w7drf3vznmxgz5-a",
            "/nix/store/7bhxkqg8q1xk1n4h3v5ii0i4rlfm1ph7-a",
        );
        let targets = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| {
                    std::fs::read_link(e.unwrap().path())
                        .unwrap()
                        .display()
                        .to_string()
                })
                .collect();
            v.sort();
            v
        };
        add_roots(&dir, &[set("x#a", p1), set("x#ab", p1)]).unwrap();
        drop_roots(&dir, &[set("x#a", p1), set("x#ab", p1)]).unwrap();
        assert_eq!(targets(), [p1, p1]);
        // Republished: both roots until the index names p2 (a run that
        // stops in between keeps p1 rooted), then p2's alone.
        add_roots(&dir, &[set("x#a", p2)]).unwrap();
        assert_eq!(targets(), [p1, p1, p2]);
        drop_roots(&dir, &[set("x#a", p2)]).unwrap();
        assert_eq!(targets(), [p1, p2], "x#ab's root is not x#a's");
        drop_roots(&dir, &[Change::Remove("x#a".into())]).unwrap();
        assert_eq!(targets(), [p1]);
    }

    #[test]
    fn writes_reads_replaces_and_skips_bad_rows() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("db.sqlite");
        let conn = Connection::open(&db).unwrap();
        let e = |r: &str, p: &str| Entry {
            reference: r.into(),
            path: p.into(),
            output: "out".into(),
            locked: Some(format!("{r}?rev=x")),
            system: Some("x86_64-linux".into()),
            time: 1,
        };
        apply(
            &conn,
            &[
                Change::Set(e("app#tool", "/nix/store/aaa-tool")),
                Change::Set(e("other#x", "/nix/store/bbb-x")),
            ],
        )
        .unwrap();
        apply(
            &conn,
            &[
                Change::Set(e("app#tool", "/nix/store/ccc-tool")),
                Change::Remove("other#x".into()),
            ],
        )
        .unwrap();
        for bad in [
            "insert into NixfsLayerPublished values ('evil#x', '/etc/passwd', 'out', null, null, 1)",
            "insert into NixfsLayerPublished values ('--option#x', '/nix/store/d-x', 'out', null, null, 1)",
            "insert into NixfsLayerPublished values ('a#x', '/nix/store/../x', 'out', null, null, 1)",
            "insert into NixfsLayerPublished values ('b#x', x'00ff', 'out', null, null, 1)",
            "insert into NixfsLayerPublished values ('c#x', '/nix/store/e-x', 'out', null, null, 'soon')",
        ] {
            conn.execute(bad, []).unwrap();
        }
        drop(conn);
        let got = read(&db).unwrap();
        assert_eq!(got, vec![e("app#tool", "/nix/store/ccc-tool")]);
        let empty = t.path().join("empty.sqlite");
        Connection::open(&empty)
            .unwrap()
            .execute_batch("create table ValidPaths (id integer)")
            .unwrap();
        assert!(read(&empty).unwrap().is_empty(), "no index, no entries");
    }
}
