//! The systemd readiness protocol (`sd_notify`), for `Type=notify` units: a process tells
//! systemd it serves (`READY=1`) and that it is the service's main process (`MAINPID`), which
//! is how the process started by `serve --upgrade` takes over from the one it replaces. A
//! datagram to `$NOTIFY_SOCKET`; nothing happens without that variable.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// Sends `message` to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
pub fn notify(message: &str) -> std::io::Result<()> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
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
