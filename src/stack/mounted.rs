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
    /// The transaction under way on this stack, written before its first
    /// step and cleared after its last: a record that still names one was
    /// left by a process killed midway, and `umount` finishes it. Absent
    /// when the stack is whole (and in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<Transaction>,
}

/// A transaction on a mounted stack, as its record names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transaction {
    /// `mount`: the record is written before the first mount call.
    Mount,
    /// `umount`: written before the flake tree is stopped.
    Unmount,
    /// `sync` mounting `TARGET/store` afresh onto replaced lowers: written
    /// before the old overlay is unmounted.
    Remount,
}

impl Transaction {
    /// The command it is part of.
    pub fn command(self) -> &'static str {
        match self {
            Transaction::Mount => "mount",
            Transaction::Unmount => "umount",
            Transaction::Remount => "sync",
        }
    }

    /// Its name in `status --json` (`transaction.kind`).
    pub fn name(self) -> &'static str {
        match self {
            Transaction::Mount => "mount",
            Transaction::Unmount => "unmount",
            Transaction::Remount => "remount",
        }
    }
}

impl MountRecord {
    /// Writes the record atomically (a temporary file renamed over it,
    /// synced): a process killed while writing leaves the old record or
    /// the new one, never a torn one.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("mount record serialises");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let tmp = path.with_extension("json.new");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&json).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// This record with `transaction` set (or cleared), written to `path`.
    pub fn write_with(&mut self, transaction: Option<Transaction>, path: &Path) -> Result<()> {
        self.transaction = transaction;
        self.write(path)
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
    /// Whether the overlay is on `TARGET/store`. Only [`find_stack`] finds
    /// a stack without it: one whose `sync` was killed while it mounted
    /// `TARGET/store` afresh (the state bind and the record are left).
    pub store_mounted: bool,
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
    let record = match read_record(&upper) {
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
                transaction: None,
            }
        }
    };
    Ok(Some(Mounted {
        target: target.to_owned(),
        upper,
        record,
        store_mounted: true,
    }))
}

/// The upper's mount record, as written.
pub fn read_record(upper: &Upper) -> Result<MountRecord, String> {
    std::fs::read(upper.mount_record())
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<MountRecord>(&b).map_err(|e| e.to_string()))
}

/// Like [`find_mounted`], but also finds a stack whose overlay is gone
/// while its state bind is still on `TARGET/var` (a `sync` killed while it
/// mounted `TARGET/store` afresh): the bind leads to the upper, whose
/// record must name this target.
pub fn find_stack(target: &Path) -> Result<Option<Mounted>> {
    if let Some(m) = find_mounted(target)? {
        return Ok(Some(m));
    }
    let mounts = overlay::mounts()?;
    let Some(bind) = overlay::mount_at(&mounts, &Target::new(target).var()) else {
        return Ok(None);
    };
    let Some(upper) = overlay::bind_source(&mounts, &bind)
        .as_deref()
        .and_then(Path::parent)
        .and_then(|dir| Upper::open(dir).ok())
    else {
        return Ok(None);
    };
    let Ok(record) = read_record(&upper) else {
        return Ok(None);
    };
    if record.target != target {
        return Ok(None);
    }
    Ok(Some(Mounted {
        target: target.to_owned(),
        upper,
        record,
        store_mounted: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_older_versions_still_parse() {
        let old = r#"{"target": "/nix", "lowers": ["/l"], "flakefs": {"pid": 7, "mountpoint": "/nixfs"}}"#;
        let r: MountRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.transaction, None);
        assert!(r.lower_ids.is_empty());
        let mut r = r;
        // A whole stack's record says nothing of transactions.
        assert!(!serde_json::to_string(&r).unwrap().contains("transaction"));
        r.transaction = Some(Transaction::Unmount);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""transaction":"unmount""#), "{text}");
        assert_eq!(serde_json::from_str::<MountRecord>(&text).unwrap(), r);
    }
}
