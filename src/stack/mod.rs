//! The stack model: the layers of one stack, where each keeps what, where
//! a valid path comes from, and what is mounted where.
//!
//! ```text
//! Target          TARGET/store (overlay), TARGET/var (bind of UPPER/var), the db Nix opens
//! Upper           UPPER/store, work, var, nixfs-layer/{lock, mount.json, tmp, staging, switch.json}
//! Lower           <dir>/store + <dir>/var/nix/db/db.sqlite, opened and checked (layer.rs)
//! LowerLayer      a lower as the merged database records it: its id and directory
//! Layers          the upper and the recorded lowers, for verify, gc and optimise
//! Origin          where a valid path comes from: Upper, Lower(id) or the Pin
//! MountRecord     what `mount` wrote, Mounted: a stack found mounted at a target
//! lifecycle       mount, unmount, remount and switching lowers, as library functions
//! run             a stack in a mount (and user) namespace of its own, for one command
//! ```
//!
//! Everything that reads the layers' directories or the provenance of a
//! path goes through these types. The SQL encoding of [`Origin`] (0 the
//! upper, a lower's id, -1 the pin) is its on-disk format and is converted
//! at the database boundary only ([`Origin::from_sql`], `FromSql`/`ToSql`).

pub mod layer;
pub mod lifecycle;
mod lock;
mod mounted;
pub mod run;
mod target;

use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::Connection;

pub use layer::{Lower, LowerIdentity, Stack, Upper};
pub use lock::{lock_target, lock_upper, try_lock_upper, upper_locked, TargetLock, UpperLock};
pub use mounted::{
    find_mounted, find_stack, read_record, require_mounted, FlakeFsRecord, MountRecord, Mounted,
    Transaction,
};
pub use target::Target;

use crate::pathdb::{sql_err, DbError};

/// A lower's id in the merged database (`NixfsLayerLower.id`, > 0).
pub type LowerId = i64;

/// Where a valid path of the merged store comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Registered through the merged store (a build, an add, a kept copy).
    Upper,
    /// Provided by the lower with this id.
    Lower(LowerId),
    /// The pin `…-nixfs-layer-lowers` (`pathdb::pin`): in the upper, but
    /// neither built nor exported.
    Pin,
}

impl Origin {
    /// The `NixfsLayerOrigin.layer` value of the upper.
    pub const UPPER_SQL: i64 = 0;
    /// The `NixfsLayerOrigin.layer` value of the pin.
    pub const PIN_SQL: i64 = -1;

    /// From a `NixfsLayerOrigin.layer` value (a path without a row is the
    /// upper's: `coalesce(o.layer, 0)`).
    pub fn from_sql(v: i64) -> Origin {
        match v {
            Self::UPPER_SQL => Origin::Upper,
            v if v < 0 => Origin::Pin,
            id => Origin::Lower(id),
        }
    }

    /// Its `NixfsLayerOrigin.layer` value.
    pub fn to_sql(self) -> i64 {
        match self {
            Origin::Upper => Self::UPPER_SQL,
            Origin::Lower(id) => id,
            Origin::Pin => Self::PIN_SQL,
        }
    }

    pub fn is_upper(self) -> bool {
        self == Origin::Upper
    }

    /// The lower's id, for a lower path.
    pub fn lower(self) -> Option<LowerId> {
        match self {
            Origin::Lower(id) => Some(id),
            _ => None,
        }
    }
}

impl FromSql for Origin {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Null => Ok(Origin::Upper),
            v => i64::column_result(v).map(Origin::from_sql),
        }
    }
}

impl ToSql for Origin {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(Origin::to_sql(*self)))
    }
}

/// A lower of the current stack as the merged database records it. Its
/// directory need not exist any more (then its paths are missing).
#[derive(Debug, Clone)]
pub struct LowerLayer {
    /// NixfsLayerLower.id: the [`Origin::Lower`] of the paths it provides.
    pub id: LowerId,
    pub dir: PathBuf,
}

impl LowerLayer {
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    /// Whether this lower's store has an entry `name`, of any kind: a
    /// symlink counts even when what it points to does not exist (its
    /// entry is what overlayfs shows and what a whiteout would hide).
    pub fn has(&self, name: &str) -> bool {
        fs::symlink_metadata(self.store().join(name)).is_ok()
    }
}

/// The stack the upper's merged database records: what verify, gc and
/// optimise work on.
#[derive(Debug, Clone)]
pub struct Layers {
    pub upper: Upper,
    /// In stack order, first on top.
    pub lowers: Vec<LowerLayer>,
    /// `TARGET/store` when the stack is mounted.
    pub mounted_store: Option<PathBuf>,
}

impl Layers {
    /// The stack the upper's merged database records (its lowers need not
    /// exist any more: then their paths are reported missing).
    pub fn read(
        conn: &Connection,
        upper: &Upper,
        mounted_store: Option<&Path>,
    ) -> Result<Layers, DbError> {
        let db = upper.db();
        let lowers = conn
            .prepare(
                "select id, dir from NixfsLayerLower where priority is not null order by priority",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(LowerLayer {
                        id: r.get(0)?,
                        dir: PathBuf::from(r.get::<_, String>(1)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_err(&db))?;
        Ok(Layers {
            upper: upper.clone(),
            lowers,
            mounted_store: mounted_store.map(Path::to_owned),
        })
    }

    /// Those of a mounted stack, as its merged database records them.
    pub fn of_mounted(mounted: &Mounted) -> Result<Layers, DbError> {
        let conn = crate::pathdb::open_read_only(&mounted.upper.db())?;
        Layers::read(&conn, &mounted.upper, Some(&mounted.store()))
    }

    pub fn lower(&self, id: LowerId) -> Option<&LowerLayer> {
        self.lowers.iter().find(|l| l.id == id)
    }

    /// Name of the layer a path of this origin is in.
    pub fn label(&self, origin: Origin) -> String {
        match origin {
            Origin::Upper | Origin::Pin => "upper".into(),
            Origin::Lower(id) => self.lower(id).map_or_else(
                || format!("lower #{id} (no longer in the stack)"),
                |l| l.dir.display().to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_keeps_its_sql_encoding() {
        for (v, o) in [
            (0, Origin::Upper),
            (1, Origin::Lower(1)),
            (7, Origin::Lower(7)),
            (-1, Origin::Pin),
        ] {
            assert_eq!(Origin::from_sql(v), o);
            assert_eq!(o.to_sql(), v);
        }
        let c = Connection::open_in_memory().unwrap();
        let o: Origin = c.query_row("select null", [], |r| r.get(0)).unwrap();
        assert_eq!(o, Origin::Upper);
        let o: Origin = c
            .query_row("select ?1", [Origin::Lower(3)], |r| r.get(0))
            .unwrap();
        assert_eq!(o, Origin::Lower(3));
    }
}
