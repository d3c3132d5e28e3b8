//! The systemd readiness protocol (`sd_notify`), for `Type=notify` units: a process tells
//! systemd it serves (`READY=1`) and that it is the service's main process (`MAINPID`), which
//! is how the process started by `serve --upgrade` takes over from the one it replaces. A
//! datagram to `$NOTIFY_SOCKET`; nothing happens without that variable.
//!
//! Written here rather than taken from a crate: the protocol is one datagram, systemd's own
//! documentation gives a self-contained version for that reason, and `sd-notify` 0.5 sends
//! to paths only, not to the abstract-namespace sockets (`@name`) the protocol also allows;
//! `libsystemd` would bring `nix` for the same few lines.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// Sends `message` to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
pub fn notify(message: &str) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => notify_to(&target, message),
        None => Ok(()),
    }
}

fn notify_to(target: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message.as_bytes(), &addr)?;
    } else {
        socket.send_to(message.as_bytes(), target)?;
    }
    Ok(())
}

/// Tells systemd this process serves, once the listeners are up (after the first catalog
/// load when taking over from a running process).
pub struct NotifyReady;

#[async_trait]
impl BackgroundService for NotifyReady {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let message = format!("READY=1\nMAINPID={}\n", std::process::id());
        if let Err(e) = notify(&message) {
            log::warn!("cannot notify systemd of readiness: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifies_a_socket_by_path_and_in_the_abstract_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let by_path = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\n").unwrap();
        assert_eq!(received(&by_path), "READY=1\n");

        let name = format!("audiolib-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_socket = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(format!("@{name}").as_ref(), "MAINPID=7\n").unwrap();
        assert_eq!(received(&abstract_socket), "MAINPID=7\n");
    }
}
