//! systemd's readiness protocol (`sd_notify`): a datagram such as
//! `READY=1` to the socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! name starting with `@`). Does nothing when not started by systemd.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1", "STOPPING=1") if `$NOTIFY_SOCKET` is set.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &target)
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, socket = ?target, "could not notify systemd");
    }
}
