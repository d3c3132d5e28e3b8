//! Per-connection policy for the public listener, around the proxy: what Pingora leaves to
//! the application about client connections (pipelining, the whole-head deadline, the head
//! buffer budget, the connection cap).
//!
//! Per-request state that these need from the proxy's hooks (has the head been read yet, how
//! much has been buffered for it) is a task-local: Pingora runs a connection's requests inside
//! our `process_new_http` future and offers no other way to hand state to the hooks.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// The request head being read on this connection.
struct PendingHead {
    /// Set by [`head_read`] once Pingora has parsed the head.
    read: Cell<bool>,
    /// Bytes read from the client since this request began, while the head was pending.
    buffered: Cell<usize>,
}

tokio::task_local! {
    static HEAD: PendingHead;
}

/// Called by the proxy as soon as Pingora has parsed a request head (its `new_ctx`): ends the
/// head deadline and the head budget for this request. A no-op outside [`ClientConnections`].
pub fn head_read() {
    let _ = HEAD.try_with(|h| h.read.set(true));
}

/// Resolves when `deadline` has passed with the head still unread; never once it is read, so
/// a request being served is not cut short.
async fn head_deadline(deadline: Duration) {
    pingora::time::sleep(deadline).await;
    if HEAD.with(|h| h.read.get()) {
        std::future::pending::<()>().await;
    }
}

/// Wraps the proxy to set, per client connection, what Pingora leaves to the application:
///
/// - HTTP/1.1 pipelining (RFC 9112 §9.3.2): off by default in Pingora, which then answers the
///   first of several pipelined requests and drops the rest. Turned on for the first request
///   of a connection; Pingora carries it to every later one.
/// - A deadline for the whole request head (`limits.header_timeout_secs`, total, not per
///   read: Pingora's own timeout restarts on every byte, so a client dribbling a byte at a
///   time would hold the connection forever). On a reused connection the deadline adds the
///   keep-alive idle time before the next request. Past it, the connection is closed without
///   an answer. Pingora reads a head under the keep-alive timeout, so a new connection also
///   gets the head timeout there, between reads; once a request is answered,
///   `request_filter` sets the keep-alive timeout proper. A reused connection is recognised
///   by the marker [`crate::proxy::AudioProxy`] leaves in its connection context.
pub struct ClientConnections<A> {
    pub app: Arc<A>,
    pub head_timeout: Duration,
    /// `limits.keepalive_secs`.
    pub idle_timeout: Duration,
}

#[async_trait]
impl<A> pingora::apps::HttpServerApp for ClientConnections<A>
where
    A: pingora::apps::HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: pingora::protocols::http::ServerSession,
        shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<pingora::apps::ReusedHttpStream> {
        let deadline = match session.take_connection_user_context() {
            Some(marker) => {
                session.set_connection_user_context(Some(marker));
                // The wait for the next request is idle time, then its head has its own bound.
                self.idle_timeout + self.head_timeout
            }
            None => {
                session.set_pipelining_enabled(true);
                if session.get_keepalive().is_some() {
                    session.set_keepalive(Some(self.head_timeout.as_secs().max(1)));
                }
                self.head_timeout
            }
        };
        let head = PendingHead {
            read: Cell::new(false),
            buffered: Cell::new(0),
        };
        HEAD.scope(head, async {
            tokio::select! {
                biased;
                reusable = self.app.process_new_http(session, shutdown) => reusable,
                () = head_deadline(deadline) => {
                    log::debug!("request head not complete within {deadline:?}: closing");
                    None
                }
            }
        })
        .await
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&pingora::apps::HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await
    }
}

/// Caps the client connections served at once (`limits.max_connections`): a connection over
/// the cap is closed as soon as it is accepted, before anything is read or allocated for it,
/// so a flood of idle connections cannot exhaust memory or file descriptors for the rest.
/// Every connection it accepts reads through a [`HeadBudget`].
pub struct ConnectionCap<A> {
    pub app: Arc<A>,
    pub max: usize,
    /// `limits.max_header_bytes`: what may be buffered for a pending head.
    pub max_head_bytes: usize,
    /// Exact count for the cap; the gauge mirrors it for `/metrics`.
    open: AtomicUsize,
    pub open_gauge: prometheus::IntGauge,
    pub refused: prometheus::IntCounter,
    /// The whole answer written when a head exceeds its budget, built once.
    too_large: Bytes,
}

impl<A> ConnectionCap<A> {
    pub fn new(app: Arc<A>, max: usize, max_head_bytes: usize) -> Result<Self, prometheus::Error> {
        let e = ApiError::HeadersTooLarge;
        let body = e.body();
        let mut too_large = format!(
            "HTTP/1.1 {} Request Header Fields Too Large\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            e.status(),
            body.len()
        )
        .into_bytes();
        too_large.extend_from_slice(&body);
        Ok(Self {
            app,
            max,
            max_head_bytes,
            too_large: Bytes::from(too_large),
            open: Default::default(),
            open_gauge: prometheus::IntGauge::new(
                "audiolib_connections_open",
                "Client connections open on the public listener",
            )?,
            refused: prometheus::IntCounter::new(
                "audiolib_connections_refused_total",
                "Client connections closed at once because limits.max_connections were open",
            )?,
        })
    }
}

/// Counts a connection until dropped.
struct Open<'a>(&'a AtomicUsize, &'a prometheus::IntGauge);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

#[async_trait]
impl<A> pingora::apps::ServerApp for ConnectionCap<A>
where
    A: pingora::apps::ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.inc();
            return None; // dropping the stream closes it
        }
        self.open_gauge.inc();
        let _open = Open(&self.open, &self.open_gauge);
        let stream = Box::new(HeadBudget {
            inner: stream,
            max: self.max_head_bytes,
            too_large: self.too_large.clone(),
        });
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// The client's stream, read so that no more than `max` bytes are buffered for a pending
/// request head. Pingora grows its head buffer up to 1 MiB whatever the limit; here a read
/// while a head is pending asks for no more than the head's remaining budget, and once the
/// budget is spent with the head still incomplete, the 431 answer is written (best effort:
/// nothing has been parsed, so it carries no request id or CORS headers) and the read fails,
/// which closes the connection. Outside a pending head (bodies, h2 frames) reads pass through.
#[derive(Debug)]
struct HeadBudget {
    inner: Stream,
    max: usize,
    too_large: Bytes,
}

/// A read that must be shorter than the caller's buffer goes through a stack buffer of this
/// size: rare (only near the limit), and safe where limiting the caller's buffer is not.
const HEAD_CHUNK: usize = 8 * 1024;

impl AsyncRead for HeadBudget {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let buffered = HEAD
            .try_with(|h| (!h.read.get()).then(|| h.buffered.get()))
            .ok()
            .flatten();
        let Some(buffered) = buffered else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let room = this.max.saturating_sub(buffered);
        if room == 0 {
            let _ = Pin::new(&mut this.inner).poll_write(cx, &this.too_large);
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head larger than limits.max_header_bytes",
            )));
        }
        let n = if room >= buf.remaining() {
            // The common case (Pingora reads a head into 4 KiB at first): nothing to limit.
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_CHUNK];
            let mut limited = ReadBuf::uninit(&mut chunk[..room.min(HEAD_CHUNK)]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            buf.put_slice(limited.filled());
            limited.filled().len()
        };
        let _ = HEAD.try_with(|h| h.buffered.set(buffered + n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HeadBudget {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// The rest of Pingora's stream traits: plain delegation.

#[async_trait]
impl Shutdown for HeadBudget {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadBudget {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadBudget {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadBudget {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadBudget {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadBudget {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadBudget {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
