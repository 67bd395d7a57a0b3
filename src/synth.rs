//! Synthetic lowers for tests and benchmarks: a Nix root of N store paths
//! with a realistic reference graph (about ten references a path, skewed
//! towards a few popular paths as real closures are towards libc), some
//! `.drv` paths with DerivationOutputs, and small real contents whose narHash
//! and narSize are right, so `nix-store --verify --check-contents` passes.
//!
//! Built only with the `testing` feature (the tests and benchmarks turn it
//! on through the crate's dev-dependency on itself): not in the shipped
//! tool.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rusqlite::{params, Connection};

use crate::nar;
use crate::pathdb::NIX_SCHEMA_SQL;
use crate::storepath::{base_name, NIXBASE32_ALPHABET, STORE_DIR};

/// A small deterministic generator (splitmix64): fixtures must be the same
/// for the same seed on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One generated path.
#[derive(Debug, Clone)]
pub struct SynthPath {
    pub path: String,
    pub references: Vec<usize>,
    pub deriver: Option<usize>,
    pub is_drv: bool,
}

/// What was generated.
#[derive(Debug, Clone)]
pub struct SynthLower {
    pub paths: Vec<SynthPath>,
    pub references: usize,
}

fn random_hash(rng: &mut Rng) -> String {
    (0..32)
        .map(|_| NIXBASE32_ALPHABET[rng.below(32) as usize] as char)
        .collect()
}

/// Chooses about `avg` earlier paths, preferring low indices.
fn pick_references(rng: &mut Rng, i: usize, avg: usize) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    let n = (rng.below(2 * avg as u64 + 1) as usize).min(i);
    let mut refs: Vec<usize> = (0..n)
        .map(|_| {
            let u = rng.unit();
            ((u * u * u) * i as f64) as usize
        })
        .collect();
    refs.sort_unstable();
    refs.dedup();
    refs
}

/// A derivation in Nix's ATerm form with one output `out` built by
/// `/bin/sh -c true`, taking `srcs` as input sources. With `out` empty this
/// is the masked form whose hash gives the output path.
pub fn drv_aterm(out: &str, name: &str, srcs: &[&str]) -> String {
    let mut srcs: Vec<&str> = srcs.to_vec();
    srcs.sort_unstable();
    srcs.dedup();
    let srcs: Vec<String> = srcs.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "Derive([(\"out\",\"{out}\",\"\",\"\")],[],[{}],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"true\"],[(\"builder\",\"/bin/sh\"),(\"name\",\"{name}\"),(\"out\",\"{out}\"),(\"system\",\"x86_64-linux\")])",
        srcs.join(",")
    )
}

/// The output path Nix computes for such a derivation (input-addressed).
fn output_path(name: &str, srcs: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let h: [u8; 32] = Sha256::digest(drv_aterm("", name, srcs).as_bytes()).into();
    crate::storepath::make_store_path("output:out", &h, name)
        .expect("synthetic names are valid")
        .to_string()
}

/// Plans `n` paths: every fifth is a `.drv` deriving the next one, whose
/// path Nix would compute from it.
pub fn plan(n: usize, seed: u64, name_prefix: &str) -> SynthLower {
    let mut rng = Rng::new(seed);
    let mut paths: Vec<SynthPath> = Vec::with_capacity(n);
    let mut references = 0;
    for i in 0..n {
        let is_drv = i % 5 == 0 && i + 1 < n;
        let refs = pick_references(&mut rng, i, 10);
        let hash = random_hash(&mut rng);
        let deriver = (i > 0 && paths[i - 1].is_drv).then(|| i - 1);
        let path = match (is_drv, deriver) {
            (true, _) => format!("{STORE_DIR}/{hash}-{name_prefix}{}.drv", i + 1),
            (false, Some(d)) => {
                let srcs: Vec<&str> = paths[d]
                    .references
                    .iter()
                    .map(|&r| paths[r].path.as_str())
                    .collect();
                output_path(&format!("{name_prefix}{i}"), &srcs)
            }
            (false, None) => format!("{STORE_DIR}/{hash}-{name_prefix}{i}"),
        };
        references += refs.len();
        paths.push(SynthPath {
            path,
            references: refs,
            deriver,
            is_drv,
        });
    }
    SynthLower { paths, references }
}

/// Writes a store path's contents: a text file for `.drv`s, otherwise a
/// directory with an executable and a data file naming its references.
fn write_contents(store: &Path, i: usize, all: &[SynthPath]) -> std::io::Result<()> {
    let p = &all[i];
    let base = base_name(&p.path);
    let dir = store.join(base);
    let refs: String = p
        .references
        .iter()
        .map(|&r| all[r].path.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    if p.is_drv {
        // A well-formed derivation (Nix parses .drv files when registering
        // them): its output is the next path, its references input sources.
        let out = &all[i + 1].path;
        let srcs: Vec<&str> = p.references.iter().map(|&r| all[r].path.as_str()).collect();
        fs::write(&dir, drv_aterm(out, &out[STORE_DIR.len() + 34..], &srcs))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o444))?;
    } else {
        fs::create_dir_all(dir.join("bin"))?;
        fs::write(dir.join("bin/run"), format!("#!/bin/sh\necho {base}\n"))?;
        fs::set_permissions(dir.join("bin/run"), fs::Permissions::from_mode(0o555))?;
        fs::write(dir.join("refs"), format!("{refs}\n"))?;
        fs::set_permissions(dir.join("refs"), fs::Permissions::from_mode(0o444))?;
    }
    Ok(())
}

/// Creates a lower at `root` (`store/`, `var/nix/db/`) with `n` paths.
pub fn generate(root: &Path, n: usize, seed: u64) -> anyhow::Result<SynthLower> {
    let lower = plan(n, seed, "synth-");
    let store = root.join("store");
    let db_dir = root.join("var/nix/db");
    fs::create_dir_all(&store)?;
    fs::create_dir_all(&db_dir)?;
    fs::write(db_dir.join("schema"), "10")?;
    let mut conn = Connection::open(db_dir.join("db.sqlite"))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.execute_batch(NIX_SCHEMA_SQL)?;
    add_paths(&mut conn, &store, &lower.paths, &lower.paths)?;
    Ok(lower)
}

/// Writes contents and registers `new` (indices refer into `all`).
fn add_paths(
    conn: &mut Connection,
    store: &Path,
    new: &[SynthPath],
    all: &[SynthPath],
) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             values (?1, ?2, 1700000000, ?3, ?4, null, ?5, null)",
        )?;
        let first = all.len() - new.len();
        for (k, p) in new.iter().enumerate() {
            write_contents(store, first + k, all)?;
            let h = nar::hash_path(&store.join(base_name(&p.path)))?;
            let deriver = p.deriver.map(|d| all[d].path.as_str());
            insert.execute(params![
                p.path,
                h.to_db_string(),
                deriver,
                h.size as i64,
                "synthetic.example.org-1:c2lnbmF0dXJl"
            ])?;
        }
        let mut refs = tx.prepare(
            "insert or ignore into Refs (referrer, reference)
             select a.id, b.id from ValidPaths a, ValidPaths b where a.path = ?1 and b.path = ?2",
        )?;
        let mut outputs = tx.prepare(
            "insert or ignore into DerivationOutputs (drv, id, path)
             select id, 'out', ?2 from ValidPaths where path = ?1",
        )?;
        for p in new {
            for &r in &p.references {
                refs.execute(params![p.path, all[r].path])?;
            }
            if let Some(d) = p.deriver {
                outputs.execute(params![all[d].path, p.path])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Changes an existing synthetic lower the way a publisher does: removes
/// `remove` paths nothing else in the lower refers to (with their contents),
/// and adds `add` new paths that refer to surviving ones. Returns the
/// removed and the added store paths.
pub fn mutate(
    root: &Path,
    remove: usize,
    add: usize,
    seed: u64,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let store = root.join("store");
    let mut conn = Connection::open(root.join("var/nix/db/db.sqlite"))?;
    let removed: Vec<String> = {
        let mut s = conn.prepare(
            "select path from ValidPaths v
             where not exists (select 1 from Refs r where r.reference = v.id and r.referrer != v.id)
               and not exists (select 1 from DerivationOutputs o where o.drv = v.id)
               and not exists (select 1 from ValidPaths w where w.deriver = v.path)
             order by path limit ?1",
        )?;
        let rows = s.query_map([remove as i64], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let tx = conn.transaction()?;
    for p in &removed {
        tx.execute("delete from ValidPaths where path = ?1", [p])?;
        crate::storecopy::remove_tree(&store.join(base_name(p)))?;
    }
    tx.commit()?;
    // New paths refer to surviving paths (by index into the survivors).
    let survivors: Vec<String> = {
        let mut s = conn.prepare("select path from ValidPaths order by id")?;
        let rows = s.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut all: Vec<SynthPath> = survivors
        .iter()
        .map(|p| SynthPath {
            path: p.clone(),
            references: Vec::new(),
            deriver: None,
            is_drv: p.ends_with(".drv"),
        })
        .collect();
    let mut rng = Rng::new(seed);
    let fresh = plan(add, seed ^ 0x5eed, &format!("added-{seed}-"));
    let base = all.len();
    for mut p in fresh.paths {
        p.references = pick_references(&mut rng, base, 10);
        p.deriver = None;
        p.is_drv = false;
        if p.path.ends_with(".drv") {
            p.path.push_str("-out");
        }
        all.push(p);
    }
    add_paths(&mut conn, &store, &all[base..], &all)?;
    Ok((
        removed,
        all[base..].iter().map(|p| p.path.clone()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_deterministic_and_realistic() {
        let a = plan(2000, 7, "synth-");
        let b = plan(2000, 7, "synth-");
        assert_eq!(
            a.paths.iter().map(|p| &p.path).collect::<Vec<_>>(),
            b.paths.iter().map(|p| &p.path).collect::<Vec<_>>()
        );
        let avg = a.references as f64 / a.paths.len() as f64;
        assert!(
            (7.0..13.0).contains(&avg),
            "about ten references a path, got {avg}"
        );
        assert!(a.paths.iter().filter(|p| p.is_drv).count() >= 300);
        for p in &a.paths {
            crate::storepath::StorePath::parse(&p.path).unwrap();
        }
    }

    #[test]
    fn generated_lower_has_right_hashes_and_graph() {
        let t = tempfile::tempdir().unwrap();
        let lower = generate(t.path(), 300, 1).unwrap();
        let c = Connection::open(t.path().join("var/nix/db/db.sqlite")).unwrap();
        let (n, refs, outs): (i64, i64, i64) = c
            .query_row(
                "select (select count(*) from ValidPaths), (select count(*) from Refs), (select count(*) from DerivationOutputs)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(n, 300);
        assert_eq!(refs as usize, lower.references);
        assert!(outs >= 50);
        let (path, hash): (String, String) = c
            .query_row("select path, hash from ValidPaths where id = 42", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let on_disk = nar::hash_path(&t.path().join("store").join(&path[11..])).unwrap();
        assert_eq!(on_disk.to_db_string(), hash);

        let (removed, added) = mutate(t.path(), 5, 7, 2).unwrap();
        assert_eq!((removed.len(), added.len()), (5, 7));
        let n: i64 = c
            .query_row("select count(*) from ValidPaths", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 302);
        assert!(!t.path().join("store").join(&removed[0][11..]).exists());
        let fk: i64 = c
            .query_row("select count(*) from pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(fk, 0);
    }
}
