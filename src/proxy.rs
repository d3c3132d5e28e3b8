//! The Pingora glue: routes each request, answers `/v1/audio`, `/healthz` and `/readyz` from
//! `request_filter`, and passes everything else through to the upstream, adding only the
//! request id and the forwarding headers. Connection-level policy is in [`crate::connection`].

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::access_log::{AccessLog, Entry};
use crate::api::{Gateway, Outcome};
use crate::config::{CorsOrigins, Limits};
use crate::connection;
use crate::error::ApiError;
use crate::forwarding::{self, Cidr};
use crate::headers;
use crate::metrics::Metrics;
use crate::quota::RateInfo;
use crate::request_id;
use crate::route::{Route, has_control_chars};
use crate::shutdown::{InFlight, Lifecycle};
use crate::upstream::UpstreamPeers;

/// Headers a browser script may read from our answers.
const EXPOSE_HEADERS: &str = "RateLimit, RateLimit-Policy, Retry-After";
const JSON: &str = "application/json";

/// Per-request facts for routing and the access log.
pub struct RequestCtx {
    started: Instant,
    route: Route,
    _in_flight: InFlight,
    /// The error code answered, or `None` for success and passthrough.
    code: Option<&'static str>,
    key_prefix: Option<String>,
    /// Set in `request_filter`, before anything can be answered.
    request_id: Option<HeaderValue>,
    /// Upstream peers tried for this request (each address at most once).
    upstream_tries: usize,
}

/// The public listener's application. Built field by field in `server::run`, the one place
/// that wires it.
pub struct AudioProxy {
    pub gateway: Arc<Gateway>,
    pub cors: CorsOrigins,
    /// `None`: other paths answer 404 NOT_FOUND.
    pub upstream: Option<Arc<UpstreamPeers>>,
    pub trusted_proxies: Vec<Cidr>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    pub lifecycle: &'static Lifecycle,
}

impl AudioProxy {
    /// The `Access-Control-Allow-Origin` value for this request, if its origin is allowed.
    fn allowed_origin(&self, req: &RequestHeader) -> Option<HeaderValue> {
        match &self.cors {
            CorsOrigins::Any => Some(HeaderValue::from_static("*")),
            CorsOrigins::List(list) => {
                let origin = req.headers.get(header::ORIGIN)?;
                let text = origin.to_str().ok()?;
                list.iter().any(|o| o == text).then(|| origin.clone())
            }
        }
    }

    fn add_cors(&self, req: &RequestHeader, head: &mut Head) {
        if matches!(self.cors, CorsOrigins::List(_)) {
            head.set(header::VARY, HeaderValue::from_static("Origin"));
        }
        if let Some(origin) = self.allowed_origin(req) {
            head.set(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            head.set(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }

    async fn preflight(&self, session: &mut Session, ctx: &RequestCtx) -> Result<()> {
        let mut head = Head::new(StatusCode::NO_CONTENT, ctx);
        self.add_cors(session.req_header(), &mut head);
        head.set(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, OPTIONS"),
        );
        head.set(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
        head.set(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        head.set(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        session.write_response_header(head.finish(), true).await
    }

    /// Writes a JSON answer with the CORS and rate-limit headers it calls for.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        body: Bytes,
        error: Option<&ApiError>,
        rate: Option<&RateInfo>,
    ) -> Result<()> {
        if self.lifecycle.is_draining() {
            session.set_keepalive(None);
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut head = Head::new(status, ctx);
        head.set(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        head.set(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        head.set(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        self.add_cors(session.req_header(), &mut head);
        if let Some(rate) = rate {
            // Digits and ASCII punctuation: always valid header values.
            if let Ok(policy) = HeaderValue::from_bytes(rate.policy_header().as_ref()) {
                head.set(RATELIMIT_POLICY, policy);
            }
            if let Ok(state) = HeaderValue::from_bytes(rate.state_header().as_ref()) {
                head.set(RATELIMIT, never_indexed(state));
            }
        }
        if let Some(e) = error {
            match e {
                ApiError::MethodNotAllowed { allow } => {
                    head.set(header::ALLOW, HeaderValue::from_static(allow))
                }
                ApiError::MissingAuth | ApiError::InvalidKeyFormat | ApiError::InvalidKey => {
                    head.set(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
                }
                _ => {}
            }
            if let Some(secs) = e.retry_after() {
                head.set(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        session.write_response_header(head.finish(), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// Answers with an error, recording its code for the access log and metrics.
    async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: ApiError,
        rate: Option<&RateInfo>,
    ) -> Result<()> {
        ctx.code = Some(e.code());
        self.respond(session, ctx, e.status(), e.body(), Some(&e), rate)
            .await
    }

    async fn audio(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let method = &session.req_header().method;
        if method == Method::OPTIONS {
            return self.preflight(session, ctx).await;
        }
        if method != Method::POST {
            return self.respond_error(session, ctx, AUDIO_METHODS, None).await;
        }
        let authorization = session
            .req_header()
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes());
        let key = match self.gateway.authenticate(authorization).await {
            Ok(key) => key,
            Err(e) => return self.respond_error(session, ctx, e, None).await,
        };
        if self.access_log.enabled() {
            ctx.key_prefix = Some(key.key.prefix.clone());
        }
        if let Err(e) = self.gateway.check_rate(&key) {
            return self.respond_error(session, ctx, e, None).await;
        }
        let body = match self.read_body(session).await? {
            Some(body) => body,
            None => {
                let limit = self.gateway.max_body_bytes;
                return self
                    .respond_error(session, ctx, ApiError::PayloadTooLarge { limit }, None)
                    .await;
            }
        };
        // While the first catalog load runs, 503 with Retry-After rather than a false 404.
        if let Err(e) = self.gateway.catalog().check_loaded() {
            return self.respond_error(session, ctx, e, None).await;
        }
        let Outcome { result, rate } = self.gateway.audio(&key, &body).await;
        match result {
            Ok(body) => {
                self.respond(session, ctx, 200, body, None, rate.as_ref())
                    .await
            }
            Err(e) => self.respond_error(session, ctx, e, rate.as_ref()).await,
        }
    }

    /// Reads the whole body, or `None` as soon as it is known to exceed the limit: never more
    /// than the limit plus one chunk is held. A client that takes longer than the body
    /// timeout is cut off without an answer.
    async fn read_body(&self, session: &mut Session) -> Result<Option<Bytes>> {
        let limit = self.gateway.max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Ok(None);
        }
        let read = async {
            let mut body =
                BytesMut::with_capacity(declared.unwrap_or(64).min(limit as u64) as usize);
            while let Some(chunk) = session.read_request_body().await? {
                if body.len() + chunk.len() > limit {
                    return Ok(None);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(body.freeze()))
        };
        // Pingora's fast timeout: no timer is registered when the body is already buffered,
        // the common case.
        match pingora::time::timeout(self.limits.body_timeout, read).await {
            Ok(result) => result,
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "request body timeout")
                .map_err(|e| e.into_down()),
        }
    }

    /// Reads what is left of a body and drops it as it comes, within the body timeout, up to
    /// [`DISCARD_MAX`] times the body limit: a bigger upload is not worth taking in, and
    /// its stream gets the reset.
    async fn discard_body(&self, session: &mut Session) {
        let max = self.gateway.max_body_bytes.saturating_mul(DISCARD_MAX);
        let discard = async {
            let mut seen = 0;
            while let Ok(Some(chunk)) = session.read_request_body().await {
                seen += chunk.len();
                if seen > max {
                    break;
                }
            }
        };
        let _ = pingora::time::timeout(self.limits.body_timeout, discard).await;
    }

    /// Adds what a passthrough request carries upstream: the request id (unless `sent`, the
    /// client's own already there) and the forwarding headers. Set on the client's request, of
    /// which Pingora sends a copy (on each attempt), so the copy has room for them, and for
    /// the upstream's `Host` (`upstream_request_filter`), and no case map to copy (see
    /// `headers`).
    fn forward(&self, session: &mut Session, ctx: &RequestCtx, sent: bool) -> Result<()> {
        let id = ctx.request_id.as_ref().filter(|_| !sent);
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        headers::edit_request(session.req_header_mut(), 4, |headers| {
            if let Some(id) = id {
                headers.insert(request_id::HEADER, id.clone());
            }
            forwarding::apply(headers, peer, &self.trusted_proxies, https);
        })
    }

    async fn health(&self, session: &mut Session, ctx: &mut RequestCtx, ready: bool) -> Result<()> {
        let method = &session.req_header().method;
        if method != Method::GET && method != Method::HEAD {
            let e = ApiError::MethodNotAllowed { allow: "GET, HEAD" };
            return self.respond_error(session, ctx, e, None).await;
        }
        let (status, body) = if !ready {
            (200, Bytes::from_static(b"{\"status\":\"ok\"}"))
        } else {
            let catalog = self.gateway.catalog().snapshot();
            let store = self.gateway.store().ping().await;
            let ok = store.is_ok() && catalog.version > 0;
            let body = serde_json::json!({
                "status": if ok { "ready" } else { "not_ready" },
                "catalog_version": catalog.version,
                "store": if store.is_ok() { "ok" } else { "unreachable" },
            });
            (
                if ok { 200 } else { 503 },
                Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            )
        };
        self.respond(session, ctx, status, body, None, None).await
    }
}

/// How many times `max_body_bytes` of an unread body are read and dropped before an HTTP/2
/// stream answered early ends (see [`AudioProxy::discard_body`]).
const DISCARD_MAX: usize = 4;

const AUDIO_METHODS: ApiError = ApiError::MethodNotAllowed {
    allow: "POST, OPTIONS",
};

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The head of one of our own answers, built on `http`'s header map directly. Pingora's
/// `insert_header` parses every name again and keeps a second map for its letter case, which
/// costs more than the rest of the answer's glue together; without it, standard names go out
/// title-cased (`Content-Type`) and ours in lower case (`ratelimit`, `x-request-id`), as over
/// HTTP/2. Header names are case-insensitive (RFC 9110 §5.1).
struct Head(http::response::Parts);

impl Head {
    /// A head with the request's id, which every answer carries.
    fn new(status: StatusCode, ctx: &RequestCtx) -> Self {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.headers.reserve(12);
        let mut head = Self(parts);
        if let Some(id) = &ctx.request_id {
            head.set(request_id::HEADER, never_indexed(id.clone()));
        }
        head
    }

    fn set(&mut self, name: HeaderName, value: HeaderValue) {
        self.0.headers.insert(name, value);
    }

    fn finish(self) -> Box<ResponseHeader> {
        Box::new(ResponseHeader::from(self.0))
    }
}

/// A value that is different in every answer (a request id, the remaining quota): over
/// HTTP/2 it is sent literally rather than added to the connection's HPACK table, where it
/// would only push out entries that do repeat (RFC 7541 §6.2.3). No effect on HTTP/1.1.
fn never_indexed(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// Passthrough answers get our request id, not the upstream's.
fn add_request_id(ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    let Some(id) = &ctx.request_id else {
        return Ok(());
    };
    headers::edit_response(resp, 1, |headers| {
        headers.insert(request_id::HEADER, id.clone());
    })
}

/// The size of the request head as sent: request line and `name: value\r\n` per header.
fn header_bytes(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    line + req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
}

#[async_trait]
impl ProxyHttp for AudioProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: Route::Passthrough,
            _in_flight: self.lifecycle.enter(),
            code: None,
            key_prefix: None,
            request_id: None,
            upstream_tries: 0,
        }
    }

    /// Pingora's first hook, right after it has parsed a request head: ends this request's
    /// head deadline and head budget (see `connection`).
    async fn early_request_filter(&self, session: &mut Session, _: &mut RequestCtx) -> Result<()> {
        connection::head_read(&session.downstream_session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let (id, sent) = request_id::of(&session.req_header().headers);
        ctx.request_id = Some(id);
        // Whether this connection may be reused is Pingora's decision (the request's
        // `Connection` header and version; never after a request with both Content-Length
        // and Transfer-Encoding, RFC 9112 §6.1); how long it may then wait for its next
        // request is bounded by `connection`, without a timer per request.
        if header_bytes(session.req_header()) > self.limits.max_header_bytes {
            ctx.route = Route::Rejected;
            self.respond_error(session, ctx, ApiError::HeadersTooLarge, None)
                .await?;
            return Ok(true);
        }
        if has_control_chars(session.req_header().raw_path()) {
            ctx.route = Route::Rejected;
            self.respond_error(session, ctx, ApiError::BadRequest, None)
                .await?;
            return Ok(true);
        }
        ctx.route = Route::of(session.req_header().uri.path(), self.upstream.is_some());
        match ctx.route {
            Route::Passthrough => {
                self.forward(session, ctx, sent)?;
                return Ok(false);
            }
            Route::Audio => self.audio(session, ctx).await?,
            Route::Healthz => self.health(session, ctx, false).await?,
            Route::Readyz => self.health(session, ctx, true).await?,
            Route::NotFound | Route::Rejected => {
                self.respond_error(session, ctx, ApiError::NotFound, None)
                    .await?
            }
        }
        // Answered before its body was read (a refused key, a body over the limit): over
        // HTTP/1.1 the connection closes; an HTTP/2 stream would be reset instead (RST_STREAM
        // NO_ERROR, RFC 9113 §8.1), which some clients (curl 7.88) take for a failed request
        // even after the whole answer. So the rest is read and dropped first.
        if session.is_http2() && !session.is_body_done() {
            self.discard_body(session).await;
        }
        Ok(true)
    }

    /// Reads the resolver's snapshot: no lookup and no allocation beyond the peer itself.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(up) = &self.upstream else {
            return Error::e_explain(ErrorType::InternalError, "no upstream configured");
        };
        ctx.upstream_tries += 1;
        match up.next_peer() {
            Some(peer) => Ok(Box::new(peer)),
            // An upstream error, so `fail_to_proxy` answers 502 BAD_GATEWAY.
            None => Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "the upstream host name has not resolved",
            )
            .into_up()),
        }
    }

    /// A connection that could not be made is tried on the next address, each at most once;
    /// nothing has been sent yet, so any method may be retried.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let addresses = self.upstream.as_ref().map_or(0, |u| u.len());
        e.set_retry(ctx.upstream_tries < addresses);
        e
    }

    /// The upstream's own `Host`, when set: here, since Pingora makes an HTTP/2 request's
    /// `Host` from its authority after `request_filter`.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(host) = self
            .upstream
            .as_ref()
            .and_then(|u| u.upstream().host_header.as_ref())
        {
            upstream_request.insert_header(header::HOST, host.clone())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        add_request_id(ctx, upstream_response)?;
        // A passthrough answer finishing during shutdown closes its connection.
        if self.lifecycle.is_draining() {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let error = match (e.esource(), e.etype()) {
            // The client is gone or too slow: no answer is owed.
            (
                ErrorSource::Downstream,
                ErrorType::ReadTimedout
                | ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed,
            ) => None,
            (ErrorSource::Downstream, _) => Some(ApiError::BadRequest),
            (ErrorSource::Upstream, _) => Some(ApiError::BadGateway),
            _ => {
                log::error!("internal error: {e}");
                Some(ApiError::Internal)
            }
        };
        let error_code = match error {
            Some(api) if session.response_written().is_none() => {
                let status = api.status();
                if let Err(write) = self.respond_error(session, ctx, api, None).await {
                    log::debug!("could not send error response: {write}");
                }
                status
            }
            _ => 0,
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        self.metrics.observe_request(
            ctx.route,
            status,
            ctx.code.unwrap_or("ok"),
            elapsed.as_secs_f64(),
        );
        if self.access_log.enabled() {
            // Formatted into this thread's buffer; the log's own thread writes it out.
            let req = session.req_header();
            self.access_log.record(&Entry {
                at: SystemTime::now(),
                method: &req.method,
                path: req.uri.path(),
                status,
                code: ctx.code,
                micros: elapsed.as_micros() as u64,
                request_id: ctx.request_id.as_ref(),
                key_prefix: ctx.key_prefix.as_deref(),
            });
        }
    }
}
