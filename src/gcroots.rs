//! GC roots of the merged store, as Nix's garbage collector finds them:
//! symlinks under `var/nix/gcroots` (indirect ones followed) and
//! `var/nix/profiles`. A sync uses them to name the roots a shrinking lower
//! would break.

use std::fs;
use std::path::{Path, PathBuf};

use crate::layer::Upper;
use crate::storepath::STORE_DIR;

/// The root that keeps the lower-paths pin (see `pathdb::pin`) alive.
pub const PIN_ROOT: &str = "nixfs-layer-lowers";

/// Maps a path in the merged store's state (`/nix/var/...`) to the upper.
fn in_upper(upper: &Upper, p: &Path) -> PathBuf {
    match p.strip_prefix("/nix/var") {
        Ok(rest) => upper.var().join(rest),
        Err(_) => p.to_owned(),
    }
}

/// The store path a root leads to, following symlinks (through the upper's
/// state for `/nix/var/...`), as Nix's GC does.
fn resolve(upper: &Upper, link: &Path) -> Option<String> {
    let mut cur = link.to_owned();
    for _ in 0..16 {
        let target = fs::read_link(&cur).ok()?;
        let target = if target.is_absolute() {
            target
        } else {
            cur.parent()?.join(target)
        };
        if let Ok(rest) = target.strip_prefix(STORE_DIR) {
            let base = rest.components().next()?;
            return Some(format!(
                "{STORE_DIR}/{}",
                base.as_os_str().to_string_lossy()
            ));
        }
        cur = in_upper(upper, &target);
    }
    None
}

/// GC roots other than this tool's own: every symlink under the upper's
/// `var/nix/gcroots` (indirect ones followed) and `var/nix/profiles`,
/// as (root, store path it keeps alive).
pub fn user_roots(upper: &Upper) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let gcroots = upper.gcroots();
    let ours = gcroots.join(PIN_ROOT);
    for top in [gcroots, upper.var().join("nix/profiles")] {
        let walk = walkdir::WalkDir::new(&top)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| e.path() != ours);
        for e in walk.flatten() {
            if e.path_is_symlink() {
                if let Some(target) = resolve(upper, e.path()) {
                    out.push((e.path().to_owned(), target));
                }
            }
        }
    }
    out
}
