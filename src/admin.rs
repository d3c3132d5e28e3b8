//! The admin API (SPEC §7, §9) on its own listener: keys and accounts for any store, guarded
//! by a bearer token. `audiolib keys …` and `audiolib accounts …` are thin clients of it.
//! `/metrics` and the OpenAPI documents of both APIs (`docs/openapi/`, compiled in) are served
//! without a token.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::accounts::{AccountService, ChangeAccount, CreateAccount};
use crate::audit::{ADMIN, Audit, MAX_PAGE};
use crate::auth::KeyDigest;
use crate::keys::{AdminError, ChangeKey, CreateKey, ImportKey, KeyService};
use crate::metrics::Metrics;
use crate::portal::invite::Invites;
use crate::quota::Day;
use crate::store::{AccountStatus, KeyStatus, rfc3339};

const MAX_ADMIN_BODY: usize = 64 * 1024;
/// An import of [`crate::keys::MAX_IMPORT`] keys with names and metadata.
const MAX_IMPORT_BODY: usize = 8 * 1024 * 1024;

/// The OpenAPI 3.1 documents of the public and the admin API, served as kept in the repo.
pub const PUBLIC_OPENAPI: &str = include_str!("../docs/openapi/public.json");
pub const ADMIN_OPENAPI: &str = include_str!("../docs/openapi/admin.json");

pub struct AdminApi {
    keys: Arc<KeyService>,
    accounts: Arc<AccountService>,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    /// SHA-256 of the admin token: comparing digests keeps the comparison time independent
    /// of how much of a guessed token is right.
    token_digest: Option<[u8; 32]>,
    /// Hands out the `invite_url` of a new account (SPEC §9); without it there is none.
    invites: Option<Arc<Invites>>,
}

/// An admin answer: status and JSON body.
struct Reply(StatusCode, Value);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    Reply(status, json!({"error": message.into(), "code": code}))
}

impl From<AdminError> for Reply {
    fn from(e: AdminError) -> Self {
        use AdminError as E;
        let (status, code) = match &e {
            E::UnknownPlan(_) => (StatusCode::BAD_REQUEST, "UNKNOWN_PLAN"),
            E::InvalidField { .. } => (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
            E::NotFound(_) => (StatusCode::NOT_FOUND, "KEY_NOT_FOUND"),
            E::AccountNotFound(_) => (StatusCode::NOT_FOUND, "ACCOUNT_NOT_FOUND"),
            E::Revoked(_) => (StatusCode::CONFLICT, "KEY_REVOKED"),
            E::AccountClosed(_) => (StatusCode::CONFLICT, "ACCOUNT_CLOSED"),
            E::EmailTaken(_) => (StatusCode::CONFLICT, "EMAIL_TAKEN"),
            E::DigestTaken => (StatusCode::CONFLICT, "DIGEST_TAKEN"),
            E::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"),
        };
        let mut reply = error(status, code, e.to_string());
        if let E::InvalidField { field, .. } = &e {
            reply.1["field"] = json!(field);
        }
        reply
    }
}

/// The admin routes: a collection, or one member of it by id.
enum Target {
    Keys(Option<String>),
    /// `/admin/keys:import`
    Import,
    /// `/admin/keys/{id}/rotate`
    Rotate(String),
    /// `/admin/keys/{id}/usage`
    KeyUsage(String),
    Accounts(Option<String>),
    /// `/admin/accounts/{id}/usage`
    AccountUsage(String),
    Audit,
}

impl Target {
    /// The methods of the route, for the `Allow` header of a 405.
    fn allow(&self) -> &'static str {
        match self {
            Target::Keys(None) | Target::Accounts(None) => "GET, POST",
            Target::Keys(Some(_)) | Target::Accounts(Some(_)) => "GET, PATCH, DELETE",
            Target::Import | Target::Rotate(_) => "POST",
            Target::KeyUsage(_) | Target::AccountUsage(_) | Target::Audit => "GET",
        }
    }

    fn of(path: &str) -> Option<Target> {
        let member = |prefix: &str, action: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(action))
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(str::to_string)
        };
        if path == "/admin/audit" {
            return Some(Target::Audit);
        }
        if path == "/admin/keys:import" {
            return Some(Target::Import);
        }
        if let Some(id) = member("/admin/keys/", "/rotate") {
            return Some(Target::Rotate(id));
        }
        if let Some(id) = member("/admin/keys/", "/usage") {
            return Some(Target::KeyUsage(id));
        }
        if let Some(id) = member("/admin/accounts/", "/usage") {
            return Some(Target::AccountUsage(id));
        }
        let (collection, rest) = if let Some(rest) = path.strip_prefix("/admin/keys") {
            (Target::Keys as fn(Option<String>) -> Target, rest)
        } else {
            (
                Target::Accounts as fn(Option<String>) -> Target,
                path.strip_prefix("/admin/accounts")?,
            )
        };
        match rest {
            "" | "/" => Some(collection(None)),
            _ => match rest.strip_prefix('/') {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    Some(collection(Some(id.to_string())))
                }
                _ => None,
            },
        }
    }
}

impl AdminApi {
    pub fn new(
        keys: Arc<KeyService>,
        accounts: Arc<AccountService>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
        token: Option<&str>,
    ) -> Self {
        Self {
            keys,
            accounts,
            audit,
            metrics,
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            invites: None,
        }
    }

    /// New accounts get an `invite_url` to the portal's set-password page.
    pub fn with_invites(mut self, invites: Arc<Invites>) -> Self {
        self.invites = Some(invites);
        self
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
        Self::read_json_within(session, MAX_ADMIN_BODY).await
    }

    async fn read_json_within(
        session: &mut ServerSession,
        limit: usize,
    ) -> Result<Map<String, Value>, Reply> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
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
        match serde_json::from_slice(&body) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(error(
                StatusCode::BAD_REQUEST,
                "INVALID_JSON",
                "request body must be a JSON object",
            )),
        }
    }

    async fn route(&self, session: &mut ServerSession) -> Result<Reply, Reply> {
        self.authorize(session)?;
        let method = session.req_header().method.clone();
        match Target::of(session.req_header().uri.path()) {
            Some(Target::Keys(id)) => self.keys_route(session, method, id).await,
            Some(Target::Import) if method == Method::POST => {
                let body = Self::read_json_within(session, MAX_IMPORT_BODY).await?;
                let ids = self.keys.import(parse_import(body)?).await?;
                let count = json!({"count": ids.len()});
                self.audit
                    .record(ADMIN, "key.imported", "keys", count)
                    .await;
                Ok(Reply(
                    StatusCode::CREATED,
                    json!({"imported": ids.len(), "ids": ids}),
                ))
            }
            Some(Target::Import) => Err(method_not_allowed()),
            Some(Target::Audit) if method == Method::GET => {
                let (before, limit) = audit_query(session.req_header().uri.query())?;
                let (entries, next) = self
                    .audit
                    .page(before, limit)
                    .await
                    .map_err(AdminError::from)?;
                Ok(Reply(
                    StatusCode::OK,
                    json!({"entries": entries, "next_cursor": next}),
                ))
            }
            Some(Target::Audit) => Err(method_not_allowed()),
            Some(Target::Rotate(id)) if method == Method::POST => {
                let body = Self::read_json(session).await?;
                let given = Value::Object(body.clone());
                let grace = parse_rotate(body)?;
                let rotated = self.keys.rotate(&id, grace).await?;
                self.audit.record(ADMIN, "key.rotated", &id, given).await;
                let mut value = json!(rotated.view);
                value["key"] = json!(rotated.secret);
                value["previous_expires_at"] = json!(rotated.previous_expires_at.map(rfc3339));
                Ok(Reply(StatusCode::CREATED, value))
            }
            Some(Target::Rotate(_)) => Err(method_not_allowed()),
            Some(Target::KeyUsage(id)) if method == Method::GET => {
                let (from, to) = self.history_range(session)?;
                let (subject, days) = self.keys.history(&id, from, to).await?;
                Ok(Reply(
                    StatusCode::OK,
                    json!({"subject": subject, "days": days_json(&days)}),
                ))
            }
            Some(Target::AccountUsage(id)) if method == Method::GET => {
                let (from, to) = self.history_range(session)?;
                let days = self.accounts.history(&id, from, to).await?;
                Ok(Reply(
                    StatusCode::OK,
                    json!({"subject": id, "days": days_json(&days)}),
                ))
            }
            Some(Target::KeyUsage(_) | Target::AccountUsage(_)) => Err(method_not_allowed()),
            Some(Target::Accounts(id)) => self.accounts_route(session, method, id).await,
            None => Err(error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")),
        }
    }

    /// `?from=YYYY-MM-DD&to=YYYY-MM-DD`: by default the 30 days up to today; at most
    /// [`Day::KEPT`] days, the history the stores keep.
    fn history_range(&self, session: &ServerSession) -> Result<(Day, Day), Reply> {
        let (mut from, mut to) = (None, None);
        for pair in session.req_header().uri.query().unwrap_or("").split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let day = || {
                Day::parse(value).ok_or_else(|| {
                    bad_field(
                        if name == "from" { "from" } else { "to" },
                        "must be a date as YYYY-MM-DD",
                    )
                })
            };
            match name {
                "" => {}
                "from" => from = Some(day()?),
                "to" => to = Some(day()?),
                other => {
                    return Err(invalid(format!(
                        "unknown parameter '{other}'; allowed: from, to"
                    )));
                }
            }
        }
        let to = to.unwrap_or_else(|| self.keys.today());
        let from = from.unwrap_or(Day(to.0.saturating_sub(29)));
        if from > to {
            return Err(bad_field("from", "must not be after to"));
        }
        if to.0 - from.0 >= Day::KEPT {
            return Err(bad_field(
                "from",
                format!("at most {} days are kept", Day::KEPT),
            ));
        }
        Ok((from, to))
    }

    async fn accounts_route(
        &self,
        session: &mut ServerSession,
        method: Method,
        id: Option<String>,
    ) -> Result<Reply, Reply> {
        match (method, id) {
            (Method::POST, None) => {
                let body = Self::read_json(session).await?;
                let given = Value::Object(body.clone());
                let view = self.accounts.create(parse_create_account(body)?).await?;
                self.audit
                    .record(ADMIN, "account.created", &view.id, given)
                    .await;
                let mut value = json!(view);
                if let Some(invites) = &self.invites {
                    // The account exists either way: a store failure here leaves it without a
                    // link (null) rather than failing a creation that happened.
                    value["invite_url"] = match invites.issue(&view.id).await {
                        Ok(url) => json!(url),
                        Err(e) => {
                            log::warn!("no invite for {}: {e}", view.id);
                            Value::Null
                        }
                    };
                }
                Ok(Reply(StatusCode::CREATED, value))
            }
            (Method::GET, None) => {
                let (cursor, limit) = page_query(session.req_header().uri.query())?;
                let (accounts, next) = self.accounts.list(cursor.as_deref(), limit).await?;
                Ok(Reply(
                    StatusCode::OK,
                    json!({ "accounts": accounts, "next_cursor": next }),
                ))
            }
            (Method::GET, Some(id)) => {
                let (view, period, used, keys) = self.accounts.show(&id).await?;
                let mut value = json!(view);
                value["usage"] = json!(used);
                value["period"] = json!(period.to_string());
                value["keys"] = json!(keys);
                Ok(Reply(StatusCode::OK, value))
            }
            (Method::PATCH, Some(id)) => {
                let body = Self::read_json(session).await?;
                let given = Value::Object(body.clone());
                let view = self
                    .accounts
                    .change(&id, parse_change_account(body)?)
                    .await?;
                self.audit
                    .record(ADMIN, "account.updated", &id, given)
                    .await;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            (Method::DELETE, Some(id)) => {
                let view = self.accounts.close(&id).await?;
                let closed = json!({"status": "closed"});
                self.audit
                    .record(ADMIN, "account.closed", &id, closed)
                    .await;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            _ => Err(method_not_allowed()),
        }
    }

    async fn keys_route(
        &self,
        session: &mut ServerSession,
        method: Method,
        id: Option<String>,
    ) -> Result<Reply, Reply> {
        match (method, id) {
            (Method::POST, None) => {
                let body = Self::read_json(session).await?;
                let given = Value::Object(body.clone());
                let req = parse_create(body)?;
                let (view, secret) = self.keys.create(req).await?;
                self.audit
                    .record(ADMIN, "key.created", &view.id, given)
                    .await;
                let mut value = serde_json::to_value(view).unwrap_or_default();
                value["key"] = Value::String(secret);
                Ok(Reply(StatusCode::CREATED, value))
            }
            (Method::GET, None) => {
                let (cursor, limit) = page_query(session.req_header().uri.query())?;
                let (keys, next) = self.keys.list(cursor.as_deref(), limit).await?;
                Ok(Reply(
                    StatusCode::OK,
                    json!({ "keys": keys, "next_cursor": next }),
                ))
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
                let given = Value::Object(body.clone());
                let change = parse_change(body)?;
                let view = self.keys.change(&id, change).await?;
                self.audit.record(ADMIN, "key.updated", &id, given).await;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            (Method::DELETE, Some(id)) => {
                let view = self.keys.revoke(&id).await?;
                let revoked = json!({"status": "revoked"});
                self.audit.record(ADMIN, "key.revoked", &id, revoked).await;
                Ok(Reply(StatusCode::OK, json!(view)))
            }
            _ => Err(method_not_allowed()),
        }
    }
}

/// `?limit=N&cursor=<next_cursor>` of the key and account lists: 100 by default, at most
/// [`MAX_PAGE`].
fn page_query(query: Option<&str>) -> Result<(Option<String>, usize), Reply> {
    let (mut cursor, mut limit) = (None, 100);
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "" => {}
            "limit" => limit = parse_limit_param(value)?,
            "cursor" => cursor = Some(value.to_string()),
            other => {
                return Err(invalid(format!(
                    "unknown parameter '{other}'; allowed: limit, cursor"
                )));
            }
        }
    }
    Ok((cursor, limit))
}

fn parse_limit_param(value: &str) -> Result<usize, Reply> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| bad_field("limit", format!("must be 1 to {MAX_PAGE}")))
}

/// `?limit=N&before=<cursor>` of `GET /admin/audit`: 100 entries by default.
fn audit_query(query: Option<&str>) -> Result<(Option<u64>, usize), Reply> {
    let (mut before, mut limit) = (None, 100);
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "" => {}
            "limit" => limit = parse_limit_param(value)?,
            "before" => {
                before = Some(
                    value
                        .parse()
                        .map_err(|_| bad_field("before", "must be a next_cursor of this list"))?,
                )
            }
            other => {
                return Err(invalid(format!(
                    "unknown parameter '{other}'; allowed: limit, before"
                )));
            }
        }
    }
    Ok((before, limit))
}

fn days_json(days: &[(Day, u64)]) -> Value {
    days.iter()
        .map(|(day, calls)| json!({"date": day.to_string(), "calls": calls}))
        .collect()
}

fn method_not_allowed() -> Reply {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method not allowed on this route",
    )
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

fn bad_field(field: &'static str, message: impl Into<String>) -> Reply {
    AdminError::field(field, message).into()
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
            .ok_or_else(|| bad_field("monthly_limit", "must be a non-negative integer or null")),
    }
}

/// `expires_at`: absent → `None`, `null` → no expiry, else an RFC 3339 instant.
fn parse_expiry(body: &Map<String, Value>) -> Result<Option<Option<SystemTime>>, Reply> {
    match body.get("expires_at") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(text)) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| Some(Some(SystemTime::from(t))))
            .map_err(|_| {
                bad_field(
                    "expires_at",
                    "must be an RFC 3339 time such as 2027-01-31T00:00:00Z",
                )
            }),
        Some(_) => Err(bad_field("expires_at", "must be an RFC 3339 time or null")),
    }
}

fn parse_create(body: Map<String, Value>) -> Result<CreateKey, Reply> {
    only_fields(
        &body,
        &[
            "name",
            "plan",
            "monthly_limit",
            "account_id",
            "expires_at",
            "meta",
        ],
    )?;
    Ok(CreateKey {
        name: required(&body, "name")?,
        account_id: parse_field_string(&body, "account_id")?,
        plan: parse_field_string(&body, "plan")?,
        monthly_limit: parse_limit(&body)?,
        expires_at: parse_expiry(&body)?.flatten(),
        meta: body.get("meta").cloned(),
    })
}

/// `{"keys":[{"digest":"<64 hex>","prefix":"alp_…","name":…, and create's other fields}]}`.
fn parse_import(body: Map<String, Value>) -> Result<Vec<ImportKey>, Reply> {
    only_fields(&body, &["keys"])?;
    let Some(Value::Array(items)) = body.get("keys") else {
        return Err(bad_field("keys", "must be an array of keys"));
    };
    let mut keys = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(mut item) = item.clone() else {
            return Err(bad_field("keys", "each key must be an object"));
        };
        let digest = match item.remove("digest") {
            Some(Value::String(hex)) => KeyDigest::parse_hex(&hex.to_ascii_lowercase()),
            _ => None,
        }
        .ok_or_else(|| bad_field("digest", "must be the key's SHA-256 as 64 hex digits"))?;
        let prefix = match item.remove("prefix") {
            Some(Value::String(p))
                if p.starts_with(crate::auth::KEY_PREFIX)
                    && p.len() <= 12
                    && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                p
            }
            _ => {
                return Err(bad_field(
                    "prefix",
                    "must be the key's first characters (alp_…)",
                ));
            }
        };
        keys.push(ImportKey {
            digest,
            prefix,
            fields: parse_create(item)?,
        });
    }
    Ok(keys)
}

fn parse_change(body: Map<String, Value>) -> Result<ChangeKey, Reply> {
    only_fields(
        &body,
        &["plan", "monthly_limit", "status", "expires_at", "meta"],
    )?;
    let status = match parse_field_string(&body, "status")?.as_deref() {
        None => None,
        // `inactive` is what `disabled` was called before.
        Some("active") => Some(KeyStatus::Active),
        Some("disabled" | "inactive") => Some(KeyStatus::Disabled),
        Some("revoked") => Some(KeyStatus::Revoked),
        Some("expired") => Some(KeyStatus::Expired),
        Some(other) => {
            return Err(bad_field(
                "status",
                format!("'{other}' is not one of active, disabled, revoked"),
            ));
        }
    };
    Ok(ChangeKey {
        plan: parse_field_string(&body, "plan")?,
        monthly_limit: parse_limit(&body)?,
        status,
        expires_at: parse_expiry(&body)?,
        meta: body.get("meta").cloned(),
    })
}

fn parse_rotate(body: Map<String, Value>) -> Result<Duration, Reply> {
    only_fields(&body, &["grace_secs"])?;
    match body.get("grace_secs") {
        None => Ok(Duration::ZERO),
        Some(v) => v
            .as_u64()
            .map(Duration::from_secs)
            .ok_or_else(|| bad_field("grace_secs", "must be a non-negative integer")),
    }
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
        let allow = Target::of(path).map_or("GET, POST", |t| t.allow());
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

/// A string field whose errors name it (`INVALID_FIELD`).
fn parse_field_string(
    body: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, Reply> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AdminError::field(field, "must be a string").into()),
    }
}

fn required(body: &Map<String, Value>, field: &'static str) -> Result<String, Reply> {
    parse_field_string(body, field)?.ok_or_else(|| AdminError::field(field, "is required").into())
}

fn parse_create_account(body: Map<String, Value>) -> Result<CreateAccount, Reply> {
    only_fields(&body, &["email", "name", "plan"])?;
    Ok(CreateAccount {
        email: required(&body, "email")?,
        name: required(&body, "name")?,
        plan: parse_field_string(&body, "plan")?,
    })
}

fn parse_change_account(body: Map<String, Value>) -> Result<ChangeAccount, Reply> {
    only_fields(&body, &["name", "plan", "status"])?;
    let status = match parse_field_string(&body, "status")?.as_deref() {
        None => None,
        Some("active") => Some(AccountStatus::Active),
        Some("disabled") => Some(AccountStatus::Disabled),
        Some(other) => {
            return Err(AdminError::field(
                "status",
                format!("'{other}' is not one of active, disabled (close an account with DELETE)"),
            )
            .into());
        }
    };
    Ok(ChangeAccount {
        name: parse_field_string(&body, "name")?,
        plan: parse_field_string(&body, "plan")?,
        status,
    })
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
            assert_eq!(limit(&body), Err(refusal("INVALID_FIELD")), "{bad}");
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
            Err(refusal("INVALID_FIELD"))
        );
        let change = parse_change_body(br#"{"status":"inactive","plan":"pro"}"#).unwrap();
        assert_eq!(change.status, Some(KeyStatus::Disabled));
        assert_eq!(change.plan.as_deref(), Some("pro"));
    }
}
