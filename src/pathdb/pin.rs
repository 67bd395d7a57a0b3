//! The pin: one store path in the upper that keeps every lower path alive
//! for Nix's own garbage collector.
//!
//! Stock `nix-collect-garbage` / `nix-store --gc` on the merged store would
//! otherwise delete lower paths nothing refers to, and through overlayfs a
//! deletion of a lower path is a whiteout in the upper. So the merged
//! database holds a small, valid store path, `…-nixfs-layer-lowers`, kept by
//! one GC root (`var/nix/gcroots/nixfs-layer-lowers`), that references every
//! lower-provided path no other lower-provided path refers to (the tops of
//! the lowers' closures); everything below a top is reachable from it. Nix
//! then sees every lower path as alive: the collector passes over them and
//! `nix-store --delete` refuses them ("still alive" / "in use").
//!
//! The one visible trace: `nix-store -q --referrers` of a top lists the pin.
//! The pin's provenance is [`PIN_LAYER`], so status figures leave it out.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{sql_err, DbError};
use crate::gcroots::PIN_ROOT;
use crate::layer::Upper;
use crate::nar;
use crate::stack::Origin;
use crate::storepath::{make_store_path, StorePath};

/// Provenance of the pin: neither upper (0) nor a lower (> 0).
pub const PIN_LAYER: Origin = Origin::Pin;

const NAME: &str = "nixfs-layer-lowers";
const CONTENT: &str = "This store path keeps the paths of nixfs-layer's lower layers alive for \
Nix's garbage collector: it refers to them and a GC root keeps it. nixfs-layer maintains it.\n";

/// The pin's store path (the same for every upper: it depends only on its
/// content, like `nix-store --add` of the file would make it).
pub fn path() -> StorePath {
    let h = nar::hash_file_contents(CONTENT.as_bytes());
    make_store_path("source", &h.sha256, NAME).expect("valid name")
}

/// Makes sure the pin's file, its database row and its GC root exist.
/// `store` is where to write the file: the upper's store directory when
/// nothing is mounted, the merged `TARGET/store` when it is. Errors name
/// the file or database that failed.
pub fn ensure(tx: &Connection, upper: &Upper, store: &Path) -> Result<i64, DbError> {
    // Through the merged store too, what is written lands in the upper.
    let io = |path: &Path| {
        let (path, upper) = (path.to_owned(), upper.dir().to_owned());
        move |source| {
            if crate::layer::no_space(&source) {
                return DbError::Full(crate::layer::Full {
                    upper: Some(upper),
                    file: path,
                });
            }
            DbError::Io { path, source }
        }
    };
    let db = upper.db();
    let sql = sql_err(&db);
    let pin = path();
    let file = store.join(pin.base_name());
    if fs::symlink_metadata(&file).is_err() {
        let tmp = store.join(format!(".{}.tmp", pin.base_name()));
        fs::write(&tmp, CONTENT).map_err(io(&tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).map_err(io(&tmp))?;
        fs::rename(&tmp, &file).map_err(io(&file))?;
    }
    let root = upper.gcroots().join(PIN_ROOT);
    if fs::read_link(&root).ok().as_deref() != Some(Path::new(&pin.to_absolute())) {
        let _ = fs::remove_file(&root);
        symlink(pin.to_absolute(), &root).map_err(io(&root))?;
    }
    let abs = pin.to_absolute();
    let existing: Option<i64> = tx
        .query_row(
            "select id from main.ValidPaths where path = ?1",
            [&abs],
            |r| r.get(0),
        )
        .optional()
        .map_err(&sql)?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let h = nar::hash_path(&file).map_err(io(&file))?;
    tx.execute(
        "insert into main.NixfsLayerOrigin (path, layer) values (?1, ?2)
         on conflict (path) do update set layer = excluded.layer",
        params![abs, PIN_LAYER],
    )
    .map_err(&sql)?;
    tx.query_row(
        "insert into main.ValidPaths (path, hash, registrationTime, narSize, ultimate)
         values (?1, ?2, strftime('%s', 'now'), ?3, 1) returning id",
        params![abs, h.to_db_string(), h.size as i64],
        |r| r.get(0),
    )
    .map_err(&sql)
}

/// Pins the lower-provided paths among `temp.<candidates>` (a table with
/// a `path` column) that no lower-provided path refers to.
pub fn pin_tops(tx: &Connection, pin_id: i64, candidates: &str) -> rusqlite::Result<usize> {
    pin_tops_of(
        tx,
        pin_id,
        &format!("select v.id from temp.{candidates} c join main.ValidPaths v on v.path = c.path"),
    )
}

/// Pins the lower-provided paths among the ids `ids` (a query of one
/// column) selects that no lower-provided path refers to.
pub fn pin_tops_of(tx: &Connection, pin_id: i64, ids: &str) -> rusqlite::Result<usize> {
    tx.execute(
        &format!(
            "insert or ignore into main.Refs (referrer, reference)
             select ?1, v.id from ({ids}) c
             cross join main.ValidPaths v on v.id = c.id
             cross join main.NixfsLayerOrigin o on o.path = v.path
             where o.layer > 0 and not exists (
               select 1 from main.Refs r indexed by IndexReference
               cross join main.ValidPaths u on u.id = r.referrer
               cross join main.NixfsLayerOrigin uo on uo.path = u.path
               where r.reference = v.id and r.referrer != v.id and uo.layer > 0)"
        ),
        [pin_id],
    )
}
