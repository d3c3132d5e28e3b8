//! Per-connection policy for the public listener, around the proxy: what Pingora leaves to
//! the application about client connections (the TLS handshake's bound, pipelining, the
//! whole-head deadline, the head buffer budget, the connection cap).
//!
//! [`ClientConnections`] takes each accepted connection, does the TLS handshake and runs the
//! HTTP/1.x keep-alive loop itself, so that what is per connection is set up once per
//! connection and a request costs no extra future, timer or wrapper. HTTP/2 connections go to
//! Pingora's own loop.
//!
//! Whether a request's head is still being read is told to the stream by the proxy's first
//! hook ([`head_read`]), which finds it through the session: no state per request beyond the
//! stream's own fields, and nothing to set up per poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Limits;
use crate::error::ApiError;

/// Where the connection's current request head stands ([`HeadBudget::state`]).
const PENDING: u8 = 0;
/// A later request on a kept-alive connection: its head's counters start at its first read.
const NEXT: u8 = 1;
/// Parsed by Pingora: reads (the body, the next request's first bytes) pass through.
const READ: u8 = 2;

/// Called by the proxy as soon as Pingora has parsed a request head (its first hook): ends the
/// head deadline and the head budget for this request. A no-op for a stream not ours (HTTP/2
/// streams, the admin listener).
pub fn head_read(session: &ServerSession) {
    if let Some(budget) = session.stream().and_then(|s| budget(s)) {
        budget.state.store(READ, Ordering::Relaxed);
    }
}

/// The [`HeadBudget`] under a connection's stream, if it has one.
fn budget(stream: &Stream) -> Option<&HeadBudget> {
    // Through the trait object: `Box<dyn IO>` is an `IO` itself, whose `as_any` is the box.
    let io: &dyn pingora::protocols::IO = &**stream;
    io.as_any().downcast_ref::<HeadBudget>()
}

/// Takes every client connection of the public listener:
///
/// - Caps the connections served at once (`limits.max_connections`): a connection over the
///   cap is closed as soon as it is accepted, before anything is read or allocated for it
///   (the TLS handshake included), so a flood of idle connections cannot exhaust memory or
///   file descriptors for the rest.
/// - Does the TLS handshake within `limits.header_timeout_secs` (Pingora's own listener
///   allows 60 s), counted against the cap while it runs.
/// - Reads through a [`HeadBudget`]: a bounded head buffer and a deadline for the whole head.
/// - Turns on HTTP/1.1 pipelining (RFC 9112 §9.3.2): off by default in Pingora, which then
///   answers the first of several pipelined requests and drops the rest.
/// - Reads a new connection's first head under the head timeout rather than Pingora's 60 s
///   keep-alive default; `request_filter` sets the keep-alive timeout proper once a request
///   is being answered.
pub struct ClientConnections<A> {
    pub app: Arc<A>,
    max: usize,
    max_head_bytes: usize,
    head_timeout: Duration,
    keepalive: Duration,
    tls: Option<Acceptor>,
    /// Exact count for the cap; the gauge mirrors it for `/metrics`.
    open: AtomicUsize,
    pub open_gauge: prometheus::IntGauge,
    pub refused: prometheus::IntCounter,
    pub handshakes_failed: prometheus::IntCounter,
    /// The whole answer written when a head exceeds its budget, built once.
    too_large: Bytes,
}

impl<A> ClientConnections<A> {
    pub fn new(app: Arc<A>, limits: &Limits) -> Result<Self, prometheus::Error> {
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
            max: limits.max_connections,
            max_head_bytes: limits.max_header_bytes,
            head_timeout: limits.header_timeout,
            keepalive: limits.keepalive,
            tls: None,
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
            handshakes_failed: prometheus::IntCounter::new(
                "audiolib_tls_handshakes_failed_total",
                "TLS handshakes that failed or did not finish within limits.header_timeout_secs",
            )?,
        })
    }

    /// Serves TLS on the listener (which must then be plain TCP): the handshake is done here.
    pub fn with_tls(mut self, acceptor: Acceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// The TLS handshake, bounded by the head timeout; `None` closes the connection.
    async fn handshake(&self, stream: Stream) -> Option<Stream> {
        let Some(acceptor) = &self.tls else {
            return Some(stream);
        };
        // The listener is plain TCP when TLS is ours (see `server`).
        let tcp = stream
            .into_any()
            .downcast::<pingora::protocols::l4::stream::Stream>()
            .ok()?;
        let why =
            match pingora::time::timeout(self.head_timeout, acceptor.tls_handshake(*tcp)).await {
                Ok(Ok(tls)) => return Some(Box::new(tls)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("not done within {:?}", self.head_timeout),
            };
        self.handshakes_failed.inc();
        log::debug!("TLS handshake failed: {why}");
        None
    }
}

/// What an HTTP/2 connection with prior knowledge (h2c) starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<A: HttpServerApp> ClientConnections<A> {
    /// HTTP/2 by ALPN over TLS, or with `h2c` on by its preface (looked at, not consumed,
    /// within the head timeout); `None` for a plain connection that sent nothing in time.
    async fn is_http2(&self, stream: &mut Stream) -> Option<bool> {
        if stream.get_ssl_digest().is_some() {
            return Some(stream.selected_alpn_proto() == Some(ALPN::H2));
        }
        if !self.app.server_options().is_some_and(|o| o.h2c) {
            return Some(false);
        }
        let mut first = [0u8; H2_PREFACE.len()];
        match pingora::time::timeout(self.head_timeout, stream.try_peek(&mut first)).await {
            Ok(Ok(true)) => Some(&first == H2_PREFACE),
            Ok(Ok(false)) => Some(false),
            Ok(Err(_)) | Err(_) => None,
        }
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
impl<A> ServerApp for ClientConnections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.inc();
            return None; // dropping the stream closes it
        }
        self.open_gauge.inc();
        let _open = Open(&self.open, &self.open_gauge);
        let mut stream = self.handshake(stream).await?;
        // The first head's deadline counts from here: the handshake had its own.
        let ready = Instant::now();
        if self.is_http2(&mut stream).await? {
            // Pingora's own loop, which makes each stream a task of its own and bounds a
            // stream's headers itself (SETTINGS_MAX_HEADER_LIST_SIZE, 64 KiB; `request_filter`
            // then answers 431 over `limits.max_header_bytes`).
            return self.app.process_new(stream, shutdown).await;
        }
        let stream = Box::new(HeadBudget {
            inner: stream,
            max: self.max_head_bytes,
            timeout: self.head_timeout,
            state: AtomicU8::new(PENDING),
            buffered: 0,
            since: Some(ready),
            timer: None,
            idle: Idle::new(self.keepalive),
            too_large: self.too_large.clone(),
        });
        self.serve_http1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await
    }
}

impl<A> ClientConnections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Pingora's HTTP/1.x keep-alive loop, with pipelining on and the first head read under
    /// the head timeout.
    async fn serve_http1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        session.set_pipelining_enabled(true);
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(self.head_timeout.as_secs().max(1)));
        }
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut reused = self.app.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = reused.map(|r| r.consume()) {
            if let Some(budget) = budget(&stream) {
                budget.state.store(NEXT, Ordering::Relaxed);
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            reused = self.app.process_new_http(session, shutdown).await;
        }
    }
}

/// The client's stream, read so that a pending request head is bounded in size and time.
///
/// - **Size**: Pingora grows its head buffer up to 1 MiB whatever the limit; here a read while
///   a head is pending asks for no more than the head's remaining budget (`max`), and once the
///   budget is spent with the head still incomplete, the 431 answer is written (best effort:
///   nothing has been parsed, so it carries no request id or CORS headers) and the read fails,
///   which closes the connection.
/// - **Time**: the whole head must arrive within `timeout` of [`HeadBudget::since`] (Pingora's
///   own timeout restarts on every byte, so a client dribbling a byte at a time would hold the
///   connection forever). Past it, the read fails and the connection closes without an
///   answer. A head that arrives in one read, the common case, costs no timer; one is armed
///   only while a read of a started head waits.
///
/// Outside a pending head (bodies, h2 frames) reads pass through.
#[derive(Debug)]
struct HeadBudget {
    inner: Stream,
    max: usize,
    timeout: Duration,
    /// [`PENDING`], [`NEXT`] or [`READ`]: set by [`head_read`] and the keep-alive loop, read
    /// here (through `&mut`, so without an atomic operation).
    state: AtomicU8,
    /// Bytes read from the client since this request began, while its head was pending.
    buffered: usize,
    /// Where the head's deadline counts from: the accept (after the TLS handshake) for a
    /// connection's first request; for a later one, the read after its first bytes, when they
    /// did not hold the whole head (the wait before them is keep-alive idle time, bounded by
    /// `limits.keepalive_secs`). `None` until then.
    since: Option<Instant>,
    /// Wakes a read of a started head at its deadline; reused from head to head.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Idle,
    too_large: Bytes,
}

/// The wait for the next request on a kept-alive HTTP/1.x connection, bounded by
/// `limits.keepalive_secs`. Pingora's own keep-alive timeout arms a timer for every such wait,
/// that is for nearly every request; here one timer serves a busy connection: armed at its
/// first wait, it is left alone while requests come and go, and when it fires during a later
/// wait it is moved to that wait's deadline (so at most once per `keepalive_secs`). Deadlines
/// only grow, so the timer never fires late, only early.
#[derive(Debug)]
struct Idle {
    limit: Duration,
    /// When the current wait began; `None` while a request is under way.
    since: Option<Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Idle {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            since: None,
            timer: None,
        }
    }

    /// Whether the connection has now waited `limit` for its next request; if not, makes
    /// sure this task is woken by then.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::from_std(since + self.limit);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= deadline {
                return true;
            }
            // Armed for an earlier wait: this one has longer to go.
            timer.as_mut().reset(deadline);
        }
    }

    /// A request has begun: the wait is over.
    fn busy(&mut self) {
        self.since = None;
    }
}

/// A read that must be shorter than the caller's buffer goes through a stack buffer of this
/// size: rare (only near the limit), and safe where limiting the caller's buffer is not.
const HEAD_CHUNK: usize = 8 * 1024;

fn head_too_slow() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "request head not complete within limits.header_timeout_secs",
    )
}

impl HeadBudget {
    /// Whether `deadline` has passed; if not, makes sure this task is woken when it does.
    fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let at = tokio::time::Instant::from_std(deadline);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for HeadBudget {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match *this.state.get_mut() {
            READ => return Pin::new(&mut this.inner).poll_read(cx, buf),
            NEXT => {
                (this.buffered, this.since) = (0, None);
                *this.state.get_mut() = PENDING;
            }
            _ => {}
        }
        let buffered = this.buffered;
        let since = match this.since {
            // A later request's head whose first read did not complete it: its deadline
            // counts from now, microseconds after its first bytes. A head that arrives in one
            // read, the common case, never reads the clock.
            None if buffered > 0 => Some(*this.since.insert(Instant::now())),
            since => since,
        };
        let deadline = since.map(|t| t + this.timeout);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(head_too_slow()));
        }
        let room = this.max.saturating_sub(buffered);
        if room == 0 {
            let _ = Pin::new(&mut this.inner).poll_write(cx, &this.too_large);
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head larger than limits.max_header_bytes",
            )));
        }
        let polled = if room >= buf.remaining() {
            // The common case (Pingora reads a head into 4 KiB at first): nothing to limit.
            let before = buf.filled().len();
            Pin::new(&mut this.inner)
                .poll_read(cx, buf)
                .map_ok(|()| buf.filled().len() - before)
        } else {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_CHUNK];
            let mut limited = ReadBuf::uninit(&mut chunk[..room.min(HEAD_CHUNK)]);
            Pin::new(&mut this.inner)
                .poll_read(cx, &mut limited)
                .map_ok(|()| {
                    buf.put_slice(limited.filled());
                    limited.filled().len()
                })
        };
        let n = match polled {
            Poll::Pending => {
                if deadline.is_some_and(|d| this.expired(d, cx)) {
                    return Poll::Ready(Err(head_too_slow()));
                }
                // Idle past the keep-alive limit: an end of stream, on which Pingora closes
                // the connection quietly, as on its own keep-alive timeout.
                if since.is_none() && this.idle.expired(cx) {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
            Poll::Ready(result) => result?,
        };
        this.idle.busy();
        this.buffered = buffered + n;
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
