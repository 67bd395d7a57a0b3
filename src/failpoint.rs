//! Named points between the steps of a command where the test suite can
//! have the process killed with SIGKILL, to check what every later command
//! does with the state left behind. `NIXFS_LAYER_KILL_AT=<name>` arms one;
//! without it a point costs one environment lookup.

/// Kills this process with SIGKILL if `NIXFS_LAYER_KILL_AT` names `point`.
pub fn hit(point: &str) {
    if std::env::var_os("NIXFS_LAYER_KILL_AT").is_some_and(|v| v == point) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
