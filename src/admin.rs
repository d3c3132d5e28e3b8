//! The admin API (SPEC §7) on its own listener: key management for any store, guarded by a
//! bearer token. `audiolib keys …` is a thin client of it. `/metrics` and the OpenAPI
//! documents of both APIs (`docs/openapi/`, compiled in) are served without a token.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::keys::{ChangeKey, CreateKey, KeyError, KeyService};
use crate::metrics::Metrics;
use crate::store::KeyStatus;

const MAX_ADMIN_BODY: usize = 64 * 1024;

/// The OpenAPI 3.1 documents of the public and the admin API, served as kept in the repo.
pub const PUBLIC_OPENAPI: &str = include_str!("../docs/openapi/public.json");
pub const ADMIN_OPENAPI: &str = include_str!("../docs/openapi/admin.json");

pub struct AdminApi {
    keys: Arc<KeyService>,
    metrics: Arc<Metrics>,
    /// SHA-256 of the admin token: comparing digests keeps the comparison time independent
    /// of how much of a guessed token is right.
    token_digest: Option<[u8; 32]>,
}

/// An admin answer: status and JSON body.
struct Reply(StatusCode, Value);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    Reply(status, json!({"error": message.into(), "code": code}))
}

impl From<KeyError> for Reply {
    fn from(e: KeyError) -> Self {
        let status = match &e {
            KeyError::UnknownPlan(_) | KeyError::Invalid(_) => StatusCode::BAD_REQUEST,
            KeyError::NotFound(_) => StatusCode::NOT_FOUND,
            KeyError::Revoked(_) => StatusCode::CONFLICT,
            KeyError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let code = match &e {
            KeyError::UnknownPlan(_) => "UNKNOWN_PLAN",
            KeyError::Invalid(_) => "INVALID_REQUEST",
            KeyError::NotFound(_) => "KEY_NOT_FOUND",
            KeyError::Revoked(_) => "KEY_REVOKED",
            KeyError::Store(_) => "SERVICE_UNAVAILABLE",
        };
        error(status, code, e.to_string())
    }
}

impl AdminApi {
    pub fn new(keys: Arc<KeyService>, metrics: Arc<Metrics>, token: Option<&str>) -> Self {
        Self {
            keys,
            metrics,
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    fn authorize(&self, session: &ServerSession) -> Result<(), Reply> {
        let Some(expected) = &self.token_digest else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "ADMIN_DISABLED",
                "the admin API is disabled: set AUDIOLIB_ADMIN_TOKEN",
            ));
        };
        let presented = session
            .get_header(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| Sha256::digest(token.trim().as_bytes()));
        match presented {
            Some(d) if d.as_slice() == expected => Ok(()),
            _ => Err(error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "a valid admin bearer token is required",
            )),
        }
    }

    async fn read_json(session: &mut ServerSession) -> Result<Map<String, Value>, Reply> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ADMIN_BODY {
                        return Err(error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "PAYLOAD_TOO_LARGE",
                            "admin request body is too large",
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(error(StatusCode::BAD_REQUEST, "BAD_REQUEST", e.to_string()));
                }
            }
        }
        json_object(&body)
    }

    async fn route(&self, session: &mut ServerSession) -> Result<Reply, Reply> {
        self.authorize(session)?;
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let id = match path.strip_prefix("/admin/keys") {
            Some("") | Some("/") => None,
            Some(rest) => match rest.strip_prefix('/') {
                Some(id) if !id.is_empty() && !id.contains('/') => Some(id.to_string()),
                _ => return Err(error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")),
            },
            None => return Err(error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")),
        };
        match (method, id) {
            (Method::POST, None) => {
                let body = Self::read_json(session).await?;
                let req = parse_create(body)?;
                let (view, secret) = self.keys.create(req).await?;
                let mut value = serde_json::to_value(view).unwrap_or_default();
                value["key"] = Value::String(secret);
                Ok(Reply(StatusCode::CREATED, value))
            }
            (Method::GET, None) => {
                let keys = self.keys.list().await?;
                Ok(Reply(StatusCode::OK, json!({ "keys": keys })))
            }
            (Method::GET, Some(id)) => {
                let (view, period, used) = self.keys.show(&id).await?;
                let mut value = serde_json::to_value(view).unwrap_or_default();
                value["usage"] = json!(used);
                value["period"] = json!(period.to_string());
                Ok(Reply(StatusCode::OK, value))
            }
            (Method::PATCH, Some(id)) => {
                let body = Self::read_json(session).await?;
                let change = parse_change(body)?;
                let view = self.keys.change(&id, change).await?;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            (Method::DELETE, Some(id)) => {
                let view = self.keys.revoke(&id).await?;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            _ => Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "method not allowed on this route",
            )),
        }
    }
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            "request body must be a JSON object",
        )),
    }
}

/// What an admin body parser refused: the answer's status and code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
}

impl From<Reply> for Refusal {
    fn from(Reply(status, body): Reply) -> Self {
        Self {
            status: status.as_u16(),
            code: body["code"].as_str().unwrap_or_default().to_string(),
        }
    }
}

/// A `POST /admin/keys` body as received, parsed as the handler does (the fuzz targets'
/// entry point).
pub fn parse_create_body(body: &[u8]) -> Result<CreateKey, Refusal> {
    Ok(parse_create(json_object(body)?)?)
}

/// A `PATCH /admin/keys/{id}` body as received, parsed as the handler does.
pub fn parse_change_body(body: &[u8]) -> Result<ChangeKey, Refusal> {
    Ok(parse_change(json_object(body)?)?)
}

fn invalid(message: impl Into<String>) -> Reply {
    error(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
}

fn only_fields(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), Reply> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(invalid(format!(
            "unknown field '{k}'; allowed: {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `monthly_limit`: absent → `None`, `null` → unlimited, a non-negative integer → that. An
/// integer may be written with a zero fraction (`100.0`), as JSON Schema's `integer` allows,
/// up to 2^53 where floating point is still exact.
fn parse_limit(body: &Map<String, Value>) -> Result<Option<Option<u64>>, Reply> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match body.get("monthly_limit") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && (0.0..=EXACT).contains(f))
                    .map(|f| f as u64)
            })
            .map(|n| Some(Some(n)))
            .ok_or_else(|| invalid("monthly_limit must be a non-negative integer or null")),
    }
}

fn parse_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, Reply> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    }
}

fn parse_create(body: Map<String, Value>) -> Result<CreateKey, Reply> {
    only_fields(&body, &["name", "plan", "monthly_limit"])?;
    Ok(CreateKey {
        name: parse_string(&body, "name")?.ok_or_else(|| invalid("name is required"))?,
        plan: parse_string(&body, "plan")?,
        monthly_limit: parse_limit(&body)?,
    })
}

fn parse_change(body: Map<String, Value>) -> Result<ChangeKey, Reply> {
    only_fields(&body, &["plan", "monthly_limit", "status"])?;
    let status = match parse_string(&body, "status")?.as_deref() {
        None => None,
        Some("active") => Some(KeyStatus::Active),
        Some("inactive") => Some(KeyStatus::Inactive),
        Some("revoked") => Some(KeyStatus::Revoked),
        Some(other) => {
            return Err(invalid(format!(
                "status '{other}' is not one of active, inactive, revoked"
            )));
        }
    };
    Ok(ChangeKey {
        plan: parse_string(&body, "plan")?,
        monthly_limit: parse_limit(&body)?,
        status,
    })
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Scrapers and API tools carry no token: /metrics and the API documents are open to
        // whoever reaches the admin listener.
        let path = session.req_header().uri.path();
        let read_only = matches!(session.req_header().method, Method::GET | Method::HEAD);
        let open = match path {
            "/metrics" | "/openapi.json" | "/openapi/admin.json" if !read_only => {
                return reply(
                    error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "METHOD_NOT_ALLOWED",
                        "method not allowed on this route",
                    ),
                    "GET, HEAD",
                );
            }
            "/metrics" => Some((
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            )),
            "/openapi.json" => Some(("application/json", PUBLIC_OPENAPI.as_bytes().to_vec())),
            "/openapi/admin.json" => Some(("application/json", ADMIN_OPENAPI.as_bytes().to_vec())),
            _ => None,
        };
        if let Some((content_type, body)) = open {
            return Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CONTENT_LENGTH, body.len())
                .body(body)
                .unwrap_or_default();
        }
        let allow = if path.starts_with("/admin/keys/") {
            "GET, PATCH, DELETE"
        } else {
            "GET, POST"
        };
        let answer = self.route(session).await.unwrap_or_else(|e| e);
        reply(answer, allow)
    }
}

/// The HTTP answer for a reply; `allow` is the route's methods, for the `Allow` header of a 405.
fn reply(Reply(status, body): Reply, allow: &str) -> Response<Vec<u8>> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store");
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        builder = builder.header(header::ALLOW, allow);
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    builder
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: &str) -> Refusal {
        Refusal {
            status: 400,
            code: code.into(),
        }
    }

    #[test]
    fn monthly_limit_is_an_integer_with_or_without_a_zero_fraction() {
        let limit = |body: &str| parse_create_body(body.as_bytes()).map(|c| c.monthly_limit);
        assert_eq!(limit(r#"{"name":"a"}"#), Ok(None));
        assert_eq!(
            limit(r#"{"name":"a","monthly_limit":null}"#),
            Ok(Some(None))
        );
        assert_eq!(
            limit(r#"{"name":"a","monthly_limit":100}"#),
            Ok(Some(Some(100)))
        );
        // Found by schemathesis: JSON Schema's `integer` includes 60222.0.
        assert_eq!(
            limit(r#"{"name":"a","monthly_limit":60222.0}"#),
            Ok(Some(Some(60222)))
        );
        assert_eq!(
            limit(r#"{"name":"a","monthly_limit":1e3}"#),
            Ok(Some(Some(1000)))
        );
        for bad in ["1.5", "-1", "-1.0", "1e300", "\"5\"", "true"] {
            let body = format!(r#"{{"name":"a","monthly_limit":{bad}}}"#);
            assert_eq!(limit(&body), Err(refusal("INVALID_REQUEST")), "{bad}");
        }
    }

    #[test]
    fn bodies_are_objects_with_known_fields() {
        assert_eq!(
            parse_create_body(b"[1]").map(|_| ()),
            Err(refusal("INVALID_JSON"))
        );
        assert_eq!(
            parse_create_body(br#"{"name":"a","bogus":1}"#).map(|_| ()),
            Err(refusal("INVALID_REQUEST"))
        );
        assert_eq!(
            parse_change_body(br#"{"status":"gone"}"#).map(|_| ()),
            Err(refusal("INVALID_REQUEST"))
        );
        let change = parse_change_body(br#"{"status":"inactive","plan":"pro"}"#).unwrap();
        assert_eq!(change.status, Some(KeyStatus::Inactive));
        assert_eq!(change.plan.as_deref(), Some("pro"));
    }
}
