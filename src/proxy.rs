//! The Pingora glue: routes each request, answers `/v1/audio`, `/healthz` and `/readyz` from
//! `request_filter`, and passes everything else through to the upstream unchanged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::api::{Gateway, Outcome};
use crate::config::{CorsOrigins, Limits, Upstream};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::quota::RateInfo;
use crate::shutdown::{InFlight, Lifecycle};

/// Headers a browser script may read from our answers.
const EXPOSE_HEADERS: &str = "RateLimit, RateLimit-Policy, Retry-After";
const JSON: &str = "application/json";

/// Per-request facts for routing and the access log.
pub struct RequestCtx {
    started: Instant,
    /// The metrics label of the route taken.
    route: &'static str,
    _in_flight: InFlight,
    /// The error code answered, or `None` for success and passthrough.
    code: Option<&'static str>,
    key_prefix: Option<String>,
}

pub struct AudioProxy {
    gateway: Arc<Gateway>,
    cors: CorsOrigins,
    upstream: Option<Upstream>,
    limits: Limits,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
}

impl AudioProxy {
    pub fn new(
        gateway: Arc<Gateway>,
        cors: CorsOrigins,
        upstream: Option<Upstream>,
        limits: Limits,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Self {
            gateway,
            cors,
            upstream,
            limits,
            metrics,
            lifecycle,
        }
    }

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

    fn add_cors(&self, req: &RequestHeader, resp: &mut ResponseHeader) -> Result<()> {
        if matches!(self.cors, CorsOrigins::List(_)) {
            resp.insert_header(header::VARY, HeaderValue::from_static("Origin"))?;
        }
        if let Some(origin) = self.allowed_origin(req) {
            resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
            resp.insert_header(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            )?;
        }
        Ok(())
    }

    async fn preflight(&self, session: &mut Session) -> Result<()> {
        let mut resp = ResponseHeader::build(204, Some(8))?;
        self.add_cors(session.req_header(), &mut resp)?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS")?;
        resp.insert_header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type",
        )?;
        resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, "86400")?;
        resp.insert_header(header::CONTENT_LENGTH, "0")?;
        session.write_response_header(Box::new(resp), true).await
    }

    /// Writes a JSON answer with the CORS and rate-limit headers it calls for.
    async fn respond(
        &self,
        session: &mut Session,
        status: u16,
        body: Bytes,
        error: Option<&ApiError>,
        rate: Option<&RateInfo>,
    ) -> Result<()> {
        if self.lifecycle.is_draining() {
            session.set_keepalive(None);
        }
        // Static values: nothing is parsed or copied for them.
        let mut resp = ResponseHeader::build(status, Some(10))?;
        resp.insert_header(header::CONTENT_TYPE, HeaderValue::from_static(JSON))?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))?;
        self.add_cors(session.req_header(), &mut resp)?;
        if let Some(rate) = rate {
            resp.insert_header("RateLimit-Policy", rate.policy_header())?;
            resp.insert_header("RateLimit", rate.state_header())?;
        }
        if let Some(e) = error {
            match e {
                ApiError::MethodNotAllowed => {
                    resp.insert_header(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"))?
                }
                ApiError::MissingAuth | ApiError::InvalidKeyFormat | ApiError::InvalidKey => resp
                    .insert_header(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                )?,
                _ => {}
            }
            if let Some(secs) = e.retry_after() {
                resp.insert_header(header::RETRY_AFTER, secs)?;
            }
        }
        session.write_response_header(Box::new(resp), false).await?;
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
        self.respond(session, e.status(), e.body(), Some(&e), rate)
            .await
    }

    async fn audio(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let method = &session.req_header().method;
        if method == Method::OPTIONS {
            return self.preflight(session).await;
        }
        if method != Method::POST {
            return self
                .respond_error(session, ctx, ApiError::MethodNotAllowed, None)
                .await;
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
        ctx.key_prefix = Some(key.prefix.clone());
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
            Ok(body) => self.respond(session, 200, body, None, rate.as_ref()).await,
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

    async fn health(&self, session: &mut Session, ready: bool) -> Result<()> {
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
        self.respond(session, status, body, None, None).await
    }
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
            route: "passthrough",
            _in_flight: self.lifecycle.enter(),
            code: None,
            key_prefix: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if !self.lifecycle.is_draining() {
            session.set_keepalive(Some(self.limits.keepalive.as_secs()));
        }
        if header_bytes(session.req_header()) > self.limits.max_header_bytes {
            ctx.route = "rejected";
            self.respond_error(session, ctx, ApiError::HeadersTooLarge, None)
                .await?;
            return Ok(true);
        }
        ctx.route = match session.req_header().uri.path() {
            "/v1/audio" => "audio",
            "/healthz" => "healthz",
            "/readyz" => "readyz",
            _ if self.upstream.is_some() => return Ok(false),
            _ => "not_found",
        };
        match ctx.route {
            "audio" => self.audio(session, ctx).await?,
            "healthz" => self.health(session, false).await?,
            "readyz" => self.health(session, true).await?,
            _ => {
                self.respond_error(session, ctx, ApiError::NotFound, None)
                    .await?
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(up) = &self.upstream else {
            return Error::e_explain(ErrorType::InternalError, "no upstream configured");
        };
        let mut peer = HttpPeer::new(up.address.as_str(), up.tls, up.sni.clone());
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        peer.options.total_connection_timeout = Some(Duration::from_secs(5));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(host) = self.upstream.as_ref().and_then(|u| u.host_header.as_ref()) {
            upstream_request.insert_header(header::HOST, host.as_str())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A passthrough answer finishing during shutdown closes its connection.
        if self.lifecycle.is_draining() {
            session.set_keepalive(None);
        }
        Ok(())
    }

    /// Marks the connection as one that has served a request (see [`HeadTimeout`]).
    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(()))
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
        if log::log_enabled!(target: "access", log::Level::Info) {
            let req = session.req_header();
            log::info!(
                target: "access",
                "{} {} {} {} {}us key={}",
                req.method,
                req.uri.path(),
                status,
                ctx.code.unwrap_or("-"),
                elapsed.as_micros(),
                ctx.key_prefix.as_deref().unwrap_or("-"),
            );
        }
    }
}

/// Wraps the proxy to bound how long a new connection may take between bytes of its first
/// request head (`limits.header_timeout_secs`) instead of Pingora's 60 s. Pingora reads a head
/// under the keep-alive timeout, so a new connection gets the head timeout there; once a
/// request is answered, `request_filter` has set the keep-alive timeout proper, which bounds
/// the idle wait for the next request. A reused connection is recognised by the marker
/// [`AudioProxy`] leaves in its connection context.
pub struct HeadTimeout<A> {
    pub app: Arc<A>,
    pub timeout: Duration,
}

#[async_trait]
impl<A> pingora::apps::HttpServerApp for HeadTimeout<A>
where
    A: pingora::apps::HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: pingora::protocols::http::ServerSession,
        shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<pingora::apps::ReusedHttpStream> {
        match session.take_connection_user_context() {
            Some(marker) => session.set_connection_user_context(Some(marker)),
            None if session.get_keepalive().is_some() => {
                session.set_keepalive(Some(self.timeout.as_secs().max(1)));
            }
            None => {}
        }
        self.app.process_new_http(session, shutdown).await
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
