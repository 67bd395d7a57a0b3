//! What `mount` records in the upper, and finding a stack mounted at a
//! target.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layer::{self, Lower, LowerIdentity, Upper};
use super::Target;
use crate::error::{Error, Result};
use crate::overlay::{self, MountError};

/// What `mount` records in the upper, for `sync`/`umount`/`status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    pub target: PathBuf,
    pub lowers: Vec<PathBuf>,
    /// What each lower directory was when the overlay was mounted (same
    /// order as `lowers`); empty in records of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower_ids: Vec<LowerIdentity>,
    /// The /nixfs/flake tree served with this mount, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flakefs: Option<FlakeFsRecord>,
}

impl MountRecord {
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("mount record serialises");
        std::fs::write(path, json).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// The flake tree's server, for `umount` to stop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlakeFsRecord {
    /// The server's pid; none while it is being started (the record names
    /// the tree before the server runs, so that a mount killed before it
    /// leaves a tree `umount` knows of).
    #[serde(default)]
    pub pid: Option<u32>,
    pub mountpoint: PathBuf,
}

/// A stack found mounted at a target.
#[derive(Debug)]
pub struct Mounted {
    pub target: PathBuf,
    pub upper: Upper,
    pub record: MountRecord,
}

impl Mounted {
    /// Its target's layout.
    pub fn layout(&self) -> Target {
        Target::new(&self.target)
    }
    pub fn store(&self) -> PathBuf {
        self.layout().store()
    }
    pub fn var(&self) -> PathBuf {
        self.layout().var()
    }
    /// The lowers whose directory is another one than the overlay was
    /// mounted with (see [`layer::replaced`]).
    pub fn replaced_lowers(&self) -> Vec<layer::Replaced> {
        layer::replaced(&self.record.lowers, &self.record.lower_ids)
    }
    pub fn lowers(&self) -> Result<Vec<Lower>> {
        Ok(self
            .record
            .lowers
            .iter()
            .map(|l| Lower::open(l))
            .collect::<Result<Vec<_>, _>>()?)
    }
}

/// Finds our overlay at `TARGET/store` and the upper behind it.
pub fn find_mounted(target: &Path) -> Result<Option<Mounted>> {
    let mounts = overlay::mounts()?;
    let Some(m) = overlay::visible_mount_at(&mounts, &Target::new(target).store()) else {
        return Ok(None);
    };
    let Some(upper_store) = m
        .option("upperdir")
        .filter(|_| m.fs_type == "overlay")
        .map(PathBuf::from)
    else {
        return Ok(None);
    };
    let Some(upper_dir) = upper_store
        .parent()
        .filter(|_| upper_store.ends_with("store"))
    else {
        return Ok(None);
    };
    let Ok(upper) = Upper::open(upper_dir) else {
        return Ok(None);
    };
    let rec_path = upper.mount_record();
    let read = std::fs::read(&rec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<MountRecord>(&b).map_err(|e| e.to_string()));
    let record = match read {
        Ok(r) => r,
        Err(why) => {
            // The overlay itself says which lowers it stacks (mount
            // refuses lower paths with ':' or ','); only the flake tree's
            // server is unknown then, and umount/status/sync still work.
            tracing::warn!(record = %rec_path.display(), %why, "mount record unreadable; using the lowers the overlay at {} lists", target.display());
            MountRecord {
                target: target.to_owned(),
                lowers: lowers_of(&m),
                lower_ids: Vec::new(),
                flakefs: None,
            }
        }
    };
    Ok(Some(Mounted {
        target: target.to_owned(),
        upper,
        record,
    }))
}

/// The lower directories of one of our overlays, top first.
fn lowers_of(m: &overlay::MountInfo) -> Vec<PathBuf> {
    m.option("lowerdir")
        .unwrap_or("")
        .split(':')
        .filter_map(|d| Path::new(d).parent().map(Path::to_owned))
        .collect()
}

/// Like [`find_mounted`], but nothing mounted is an error.
pub fn require_mounted(target: &Path) -> Result<Mounted> {
    find_mounted(target)?.ok_or_else(|| MountError::NotMounted(target.to_owned()).into())
}
