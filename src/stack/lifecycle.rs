//! Mount, unmount, remount and switching lowers (filled in below).
