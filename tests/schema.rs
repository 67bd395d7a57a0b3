//! The database `init` creates has exactly the tables, indexes and triggers
//! the installed Nix creates for a fresh store, plus this tool's own.

mod common;

use common::World;

fn schema(db: &std::path::Path) -> Vec<(String, String, Option<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("select type, name, sql from sqlite_master order by type, name")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn inode(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

/// ValidPaths rows: id, path, hash, registrationTime, narSize.
fn valid_paths(db: &std::path::Path) -> Vec<(i64, String, String, i64, Option<i64>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("select id, path, hash, registrationTime, narSize from ValidPaths order by id")
        .unwrap();
    s.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

ns_test! {
    fn init_creates_the_schema_nix_creates() {
        let w = World::new();
        w.nix_ok("nix", ["path-info", "--all"]);
        let mut nix_made = schema(std::path::Path::new("/nix/var/nix/db/db.sqlite"));
        // Nix ≥ 2.20 adds a SchemaMigrations table (and creates it in any
        // schema-10 database it opens, ours included); `init` makes what
        // every schema-10 Nix expects, without it.
        nix_made.retain(|(_, n, _)| !n.contains("SchemaMigrations"));
        assert!(nix_made.iter().any(|(_, n, _)| n == "ValidPaths"));
        assert_eq!(std::fs::read_to_string("/nix/var/nix/db/schema").unwrap().trim(), "10");

        let upper = w.path("upper");
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        let ours = schema(&upper.join("var/nix/db/db.sqlite"));
        let (own, nix_part): (Vec<_>, Vec<_>) =
            ours.into_iter().partition(|(_, n, _)| n.contains("NixfsLayer"));
        let strip = |v: Vec<(String, String, Option<String>)>| -> Vec<_> {
            // Comments differ between Nix versions; statements must not.
            v.into_iter().map(|(t, n, sql)| (t, n, sql.map(|s| s.lines().flat_map(|l| l.split("--").next().unwrap_or("").split_whitespace()).collect::<Vec<_>>().join(" ")))).collect()
        };
        assert_eq!(strip(nix_part), strip(nix_made), "Nix's part matches statement for statement");
        assert!(own.len() >= 5, "provenance tables and triggers: {own:?}");
        assert_eq!(std::fs::read_to_string(upper.join("var/nix/db/schema")).unwrap(), "10");
        // init again: idempotent, database kept (the same file, schema and
        // rows: the pin's among them).
        let db = upper.join("var/nix/db/db.sqlite");
        let before = (inode(&db), schema(&db), valid_paths(&db));
        assert!(
            before.2.iter().any(|(_, p, ..)| p.ends_with(common::PIN_SUFFIX)),
            "init registers the pin: {:?}",
            before.2
        );
        w.tool_ok(["init", "--upper", upper.to_str().unwrap()]);
        assert_eq!((inode(&db), schema(&db), valid_paths(&db)), before, "second init changed the database");
    }
}
