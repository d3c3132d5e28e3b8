//! The admin API (SPEC §7, §9) on its own listener: keys and accounts for any store, guarded
//! by a bearer token. `audiolib keys …` and `audiolib accounts …` are thin clients of it.

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
use crate::keys::{AdminError, ChangeKey, CreateKey, KeyService};
use crate::metrics::Metrics;
use crate::quota::Day;
use crate::store::{AccountStatus, KeyStatus, rfc3339};

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub struct AdminApi {
    keys: Arc<KeyService>,
    accounts: Arc<AccountService>,
    audit: Arc<Audit>,
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
                Ok(Reply(StatusCode::CREATED, json!(view)))
            }
            (Method::GET, None) => {
                let accounts = self.accounts.list().await?;
                Ok(Reply(StatusCode::OK, json!({ "accounts": accounts })))
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

/// `?limit=N&before=<cursor>` of `GET /admin/audit`: 100 entries by default.
fn audit_query(query: Option<&str>) -> Result<(Option<u64>, usize), Reply> {
    let (mut before, mut limit) = (None, 100);
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "" => {}
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| bad_field("limit", format!("must be 1 to {MAX_PAGE}")))?
            }
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

/// `monthly_limit`: absent → `None`, `null` → unlimited, a non-negative integer → that.
fn parse_limit(body: &Map<String, Value>) -> Result<Option<Option<u64>>, Reply> {
    match body.get("monthly_limit") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v
            .as_u64()
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
        // Scrapers carry no token: /metrics is open to whoever reaches the admin listener.
        if session.req_header().uri.path() == "/metrics" {
            let body = self.metrics.render().into_bytes();
            return Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .header(header::CONTENT_LENGTH, body.len())
                .body(body)
                .unwrap_or_default();
        }
        let Reply(status, body) = self.route(session).await.unwrap_or_else(|e| e);
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-store");
        if status == StatusCode::UNAUTHORIZED {
            builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
        }
        let body = serde_json::to_vec(&body).unwrap_or_default();
        builder
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
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
