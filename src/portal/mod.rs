//! The developer portal (SPEC §10): the seed's "dashboard", on its own listener. Accounts sign
//! in with email and password and manage their own keys and see their usage; the operator
//! signs in with the admin token and manages accounts. Server-rendered HTML forms, no
//! JavaScript needed.
//!
//! # Layout
//! - [`core`]: the pure decisions (cookies, forms, CSRF, throttle key, graces, wording).
//! - [`password`]: argon2id hashing, off the request threads.
//! - [`pages`]: the templates.
//! - [`invite`]: the invite links `POST /admin/accounts` hands out.
//!
//! # Security choices
//! - Sessions: a random token in an `HttpOnly; SameSite=Lax; Path=/` cookie (`Secure` when
//!   `portal.public_url` is `https://`); the store keeps its SHA-256 only, shared by every node
//!   on Redis; 12 h idle expiry; sign-out deletes it.
//! - CSRF: every form that changes something carries a token derived from the cookie's token
//!   (the session's, or before sign-in a pre-session cookie's); a POST without it is 403 and
//!   changes nothing.
//! - Sign-in: the same answer for a wrong password and an unknown email (and about as slow:
//!   an unknown email is verified against a decoy hash); 5 failures per email and client
//!   address per minute, then a wait.

pub mod core;
pub mod invite;
pub mod pages;
pub mod password;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use maud::Markup;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use sha2::{Digest, Sha256};

use self::core::{
    IDLE, MAX_FAILURES, MAX_FORM, PRE_COOKIE, Route, SESSION_COOKIE, THROTTLE_WINDOW, csrf_ok,
    csrf_token, field,
};
use self::invite::Invites;
use self::pages::{AccountPage, AccountRow, Shown, Viewer};
use crate::accounts::{AccountService, AccountView, ChangeAccount, CreateAccount, normalize_email};
use crate::audit::{ADMIN, Audit};
use crate::clock::Clock;
use crate::config::{Plan, Signup};
use crate::keys::{AdminError, CreateKey, KeyService, KeyView};
use crate::quota::{Day, Period};
use crate::store::portal::{PortalStore, Session};
use crate::store::{AccountStatus, StoreError};

/// The session owner of an operator session (account ids start with `acct_`).
const OPERATOR: &str = "admin";

/// Accounts on a page of the operator's list.
const OPERATOR_PAGE: usize = 100;

/// What the portal is built from.
pub struct PortalDeps {
    pub keys: Arc<KeyService>,
    pub accounts: Arc<AccountService>,
    pub audit: Arc<Audit>,
    pub store: Arc<dyn PortalStore>,
    pub invites: Arc<Invites>,
    pub clock: Arc<dyn Clock>,
    pub signup: Signup,
    /// Mark cookies `Secure`: the portal is reached over HTTPS.
    pub secure: bool,
    pub admin_token: Option<String>,
    pub plans: Vec<(String, Plan)>,
    /// Proxies whose `X-Forwarded-For` names the client (for the sign-in throttle).
    pub trusted_proxies: Vec<crate::forwarding::Cidr>,
}

/// The portal's `ServeHttp` service.
pub struct Portal {
    deps: PortalDeps,
    /// SHA-256 of the admin token, compared as digests (as the admin API does).
    admin_digest: Option<[u8; 32]>,
}

/// A request as the handlers need it: read once, body included.
struct Request {
    method: Method,
    route: Option<Route>,
    query: String,
    cookies: Option<String>,
    form: Vec<(String, String)>,
    client: String,
}

impl Request {
    fn cookie(&self, name: &str) -> Option<&str> {
        core::cookie(self.cookies.as_deref(), name)
    }
    fn field(&self, name: &str) -> Option<&str> {
        field(&self.form, name)
    }
}

/// An answer: status, page and headers (cookies, redirects).
struct Answer {
    status: StatusCode,
    body: String,
    headers: Vec<(header::HeaderName, String)>,
}

impl Answer {
    fn page(status: StatusCode, markup: Markup) -> Self {
        Self {
            status,
            body: markup.into_string(),
            headers: Vec::new(),
        }
    }

    fn redirect(to: &str) -> Self {
        Self {
            status: StatusCode::SEE_OTHER,
            body: String::new(),
            headers: vec![(header::LOCATION, to.to_string())],
        }
    }

    fn message(status: StatusCode, title: &str, text: &str, link: Option<(&str, &str)>) -> Self {
        Self::page(status, pages::message(title, text, link))
    }

    fn with(mut self, name: header::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// A signed-in account and what its pages show.
struct SignedIn {
    token: String,
    csrf: String,
    account: AccountView,
    used: u64,
    period: Period,
    keys: Vec<KeyView>,
}

impl SignedIn {
    fn viewer(&self) -> Viewer<'_> {
        Viewer {
            email: &self.account.email,
            csrf: &self.csrf,
            operator: false,
        }
    }
}

/// Who a session cookie belongs to.
enum Who {
    Nobody,
    Account(Box<SignedIn>),
    Operator { token: String, csrf: String },
}

fn forbidden() -> Answer {
    Answer::message(
        StatusCode::FORBIDDEN,
        "Form expired",
        "This form could not be accepted (its security token is missing or out of date). \
         Nothing was changed. Go back, reload the page and try again.",
        Some(("/", "Back to the portal")),
    )
}

fn unavailable() -> Answer {
    Answer::message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again shortly",
        "The portal cannot reach its store right now. Nothing was changed.",
        Some(("/", "Back to the portal")),
    )
}

fn not_found() -> Answer {
    Answer::message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
        Some(("/", "Back to the portal")),
    )
}

impl From<StoreError> for Answer {
    fn from(e: StoreError) -> Self {
        log::warn!("portal: {e}");
        unavailable()
    }
}

impl From<AdminError> for Answer {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Store(e) => e.into(),
            AdminError::NotFound(_) | AdminError::AccountNotFound(_) => not_found(),
            other => Answer::message(
                StatusCode::BAD_REQUEST,
                "Not done",
                &other.to_string(),
                Some(("/", "Back to the portal")),
            ),
        }
    }
}

const WRONG: &str = "Wrong email or password.";

impl Portal {
    pub fn new(deps: PortalDeps) -> Self {
        let admin_digest = deps
            .admin_token
            .as_ref()
            .map(|t| Sha256::digest(t.as_bytes()).into());
        Self { deps, admin_digest }
    }

    /// The portal of a running gateway: its app's services and store, the config's settings,
    /// the wall clock.
    pub fn of_app(
        app: &crate::server::App,
        config: &crate::config::Config,
    ) -> Result<Self, String> {
        let store = app
            .portal_store
            .clone()
            .ok_or("the portal needs the app's store")?;
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let invites = Arc::new(Invites::new(store.clone(), base_url(config), clock.clone()));
        Ok(Self::new(PortalDeps {
            keys: app.keys.clone(),
            accounts: app.accounts.clone(),
            audit: app.audit.clone(),
            store,
            invites,
            clock,
            signup: config.portal.signup,
            secure: base_url(config).starts_with("https://"),
            admin_token: config.admin_token.as_ref().map(|t| t.expose().to_string()),
            plans: config
                .plans
                .iter()
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            trusted_proxies: config.trusted_proxies.clone(),
        }))
    }

    /// The invite links this portal accepts, for the admin API to hand out.
    pub fn invites(&self) -> Arc<Invites> {
        self.deps.invites.clone()
    }

    fn cookie(&self, name: &str, value: &str) -> String {
        core::set_cookie(name, value, self.deps.secure)
    }

    /// The pre-session token of the request, or a new one (and the cookie to set).
    fn pre_token(&self, req: &Request) -> (String, Option<String>) {
        match req.cookie(PRE_COOKIE) {
            Some(t) => (t.to_string(), None),
            None => {
                let t = core::new_token();
                let set = self.cookie(PRE_COOKIE, &t);
                (t, Some(set))
            }
        }
    }

    /// An anonymous form's page, with the pre-session cookie set if it was new.
    fn anonymous(
        &self,
        req: &Request,
        status: StatusCode,
        render: impl FnOnce(&str) -> Markup,
    ) -> Answer {
        let (token, set) = self.pre_token(req);
        let answer = Answer::page(status, render(&csrf_token(&token)));
        match set {
            Some(c) => answer.with(header::SET_COOKIE, c),
            None => answer,
        }
    }

    /// Whether an anonymous form's CSRF token matches the pre-session cookie.
    fn anonymous_csrf_ok(req: &Request) -> bool {
        req.cookie(PRE_COOKIE)
            .is_some_and(|t| csrf_ok(t, req.field("csrf")))
    }

    async fn who(&self, req: &Request) -> Result<Who, Answer> {
        let Some(token) = req.cookie(SESSION_COOKIE) else {
            return Ok(Who::Nobody);
        };
        let digest = core::digest(token);
        let Some(session) = self
            .deps
            .store
            .session(&digest, IDLE, self.deps.clock.now())
            .await?
        else {
            return Ok(Who::Nobody);
        };
        let csrf = csrf_token(token);
        if session.account_id == OPERATOR {
            return Ok(Who::Operator {
                token: token.to_string(),
                csrf,
            });
        }
        match self.deps.accounts.show(&session.account_id).await {
            Ok((account, period, used, keys)) if account.status == AccountStatus::Active => {
                Ok(Who::Account(Box::new(SignedIn {
                    token: token.to_string(),
                    csrf,
                    account,
                    used,
                    period,
                    keys,
                })))
            }
            // Disabled, closed or gone since: the session ends here.
            Ok(_) | Err(AdminError::AccountNotFound(_)) => {
                self.deps.store.delete_session(&digest).await?;
                Ok(Who::Nobody)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a session for `owner` and sends the browser to `to`.
    async fn start_session(&self, owner: &str, to: &str) -> Result<Answer, Answer> {
        let token = core::new_token();
        let session = Session {
            account_id: owner.to_string(),
            created_at: crate::clock::to_second(self.deps.clock.now()),
        };
        self.deps
            .store
            .insert_session(&core::digest(&token), session, IDLE)
            .await?;
        Ok(Answer::redirect(to).with(header::SET_COOKIE, self.cookie(SESSION_COOKIE, &token)))
    }

    async fn handle(&self, req: Request) -> Result<Answer, Answer> {
        let Some(route) = req.route.clone() else {
            return Ok(not_found());
        };
        let post = req.method == Method::POST;
        if !post && req.method != Method::GET && req.method != Method::HEAD {
            return Ok(Answer::message(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed",
                "This page takes GET and POST only.",
                None,
            )
            .with(header::ALLOW, "GET, POST".into()));
        }
        match route {
            Route::Style => Ok(Answer {
                status: StatusCode::OK,
                body: pages::STYLE.to_string(),
                headers: vec![
                    (header::CONTENT_TYPE, "text/css".into()),
                    (header::CACHE_CONTROL, "max-age=3600".into()),
                ],
            }),
            Route::Home => Ok(match self.who(&req).await? {
                Who::Nobody => Answer::redirect("/signin"),
                Who::Account(_) => Answer::redirect("/keys"),
                Who::Operator { .. } => Answer::redirect("/operator"),
            }),
            Route::SignIn if post => self.sign_in(&req).await,
            Route::SignIn => Ok(match self.who(&req).await? {
                Who::Nobody => {
                    let notice = req
                        .query
                        .contains("password=set")
                        .then_some("Your password is set. Sign in with it.");
                    let open = self.deps.signup == Signup::Open;
                    self.anonymous(&req, StatusCode::OK, |csrf| {
                        pages::sign_in(csrf, "", None, notice, open)
                    })
                }
                Who::Account(_) => Answer::redirect("/keys"),
                Who::Operator { .. } => Answer::redirect("/operator"),
            }),
            Route::SignUp if self.deps.signup != Signup::Open => Ok(Answer::message(
                StatusCode::NOT_FOUND,
                "Sign-up is by invitation",
                "Accounts on this portal are created by invitation. Ask your AudioLib contact \
                 for an invite link.",
                Some(("/signin", "Sign in")),
            )),
            Route::SignUp if post => self.sign_up(&req).await,
            Route::SignUp => Ok(self.anonymous(&req, StatusCode::OK, |csrf| {
                pages::sign_up(csrf, "", None, None)
            })),
            Route::Invite(token) => self.invite(&req, &token, post).await,
            Route::SignOut if post => self.sign_out(&req).await,
            Route::SignOut => Ok(Answer::redirect("/")),
            Route::Keys | Route::Rotate(_) | Route::Revoke(_) | Route::Usage => {
                match self.who(&req).await? {
                    Who::Account(me) => self.account_page(&req, route, post, *me).await,
                    Who::Operator { .. } => Ok(Answer::redirect("/operator")),
                    Who::Nobody if post => Ok(forbidden()),
                    Who::Nobody => Ok(Answer::redirect("/signin")),
                }
            }
            Route::Operator
            | Route::OperatorAccounts
            | Route::OperatorStatus(_)
            | Route::OperatorInvite(_) => self.operator(&req, route, post).await,
        }
    }

    async fn sign_in(&self, req: &Request) -> Result<Answer, Answer> {
        if !Self::anonymous_csrf_ok(req) {
            return Ok(forbidden());
        }
        let given = req.field("email").unwrap_or("").trim().to_lowercase();
        let password = req.field("password").unwrap_or("").to_string();
        let throttle = core::throttle_key(&given, &req.client);
        if let Some(wait) = self.attempt(&throttle).await? {
            return Ok(wait);
        }
        let account = match normalize_email(&given) {
            Ok(email) => self.deps.store.account_id_by_email(&email).await?,
            Err(_) => None,
        };
        let hash = match &account {
            Some(id) => self.deps.store.password_hash(id).await?,
            None => None,
        };
        let ok = password::verify_off_thread(password, hash).await;
        let Some(account) = account.filter(|_| ok) else {
            let open = self.deps.signup == Signup::Open;
            return Ok(self.anonymous(req, StatusCode::UNAUTHORIZED, |csrf| {
                pages::sign_in(csrf, &given, Some(WRONG), None, open)
            }));
        };
        // Only failures count: the owner's own attempt is forgiven once it succeeds.
        self.deps.store.clear_failures(&throttle).await?;
        match self.deps.accounts.show(&account).await {
            Ok((view, ..)) if view.status == AccountStatus::Active => {
                self.start_session(&account, "/keys").await
            }
            Ok(_) => Ok(Answer::message(
                StatusCode::FORBIDDEN,
                "Account disabled",
                "This account is disabled. Ask your AudioLib contact to enable it.",
                None,
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn sign_up(&self, req: &Request) -> Result<Answer, Answer> {
        if !Self::anonymous_csrf_ok(req) {
            return Ok(forbidden());
        }
        let given = req.field("email").unwrap_or("").trim().to_string();
        let password = req.field("password").unwrap_or("").to_string();
        let again = |email_error: Option<&str>, pw_error: Option<&str>| {
            self.anonymous(req, StatusCode::BAD_REQUEST, |csrf| {
                pages::sign_up(csrf, &given, email_error, pw_error)
            })
        };
        let Ok(email) = normalize_email(&given) else {
            return Ok(again(Some("Enter an email address (name@domain)."), None));
        };
        // Sign-ups per address and minute are counted like failed sign-ins, so one client
        // cannot make accounts by the thousand.
        if let Some(wait) = self
            .attempt(&core::throttle_key("\0sign-up", &req.client))
            .await?
        {
            return Ok(wait);
        }
        if let Some(problem) = core::password_problem(&password) {
            return Ok(again(None, Some(&problem)));
        }
        let hash = password::hash_off_thread(password)
            .await
            .map_err(|e| StoreError(format!("hashing: {e}")))?;
        let name = email.split('@').next().unwrap_or("").to_string();
        let view = match self
            .deps
            .accounts
            .create(CreateAccount {
                email: email.clone(),
                name,
                plan: None,
            })
            .await
        {
            Ok(view) => view,
            Err(AdminError::EmailTaken(_)) => {
                return Ok(again(
                    Some("An account with this email exists: sign in instead."),
                    None,
                ));
            }
            Err(e) => return Err(e.into()),
        };
        self.deps.store.set_password_hash(&view.id, &hash).await?;
        self.deps
            .audit
            .record(
                &view.id,
                "account.created",
                &view.id,
                json!({"email": email, "plan": view.plan, "via": "portal sign-up"}),
            )
            .await;
        self.start_session(&view.id, "/keys").await
    }

    async fn invite(&self, req: &Request, token: &str, post: bool) -> Result<Answer, Answer> {
        let invalid = || {
            Answer::message(
                StatusCode::NOT_FOUND,
                "This invite link is not valid",
                "Check that you copied the whole link, or ask for a new invite.",
                Some(("/signin", "Sign in")),
            )
        };
        if !core::is_token(token) {
            return Ok(invalid());
        }
        let digest = core::digest(token);
        let Some(invite) = self.deps.store.invite(&digest).await? else {
            return Ok(invalid());
        };
        if invite.used {
            return Ok(Answer::message(
                StatusCode::GONE,
                "This invite link has already been used",
                "An invite link sets a password once. If that was you, sign in; if you have \
                 forgotten the password, ask for a new invite.",
                Some(("/signin", "Sign in")),
            ));
        }
        if self.deps.clock.now() >= invite.expires_at {
            return Ok(Answer::message(
                StatusCode::GONE,
                "This invite link has expired",
                "Invite links work for 7 days. Ask your AudioLib contact for a new one.",
                Some(("/signin", "Sign in")),
            ));
        }
        let (account, ..) = match self.deps.accounts.show(&invite.account_id).await {
            Ok(found) if found.0.status == AccountStatus::Active => found,
            Ok(_) | Err(AdminError::AccountNotFound(_)) => return Ok(invalid()),
            Err(e) => return Err(e.into()),
        };
        if !post {
            return Ok(self.anonymous(req, StatusCode::OK, |csrf| {
                pages::set_password(token, csrf, &account.email, None)
            }));
        }
        if !Self::anonymous_csrf_ok(req) {
            return Ok(forbidden());
        }
        let password = req.field("password").unwrap_or("").to_string();
        if let Some(problem) = core::password_problem(&password) {
            return Ok(self.anonymous(req, StatusCode::BAD_REQUEST, |csrf| {
                pages::set_password(token, csrf, &account.email, Some(&problem))
            }));
        }
        let hash = password::hash_off_thread(password)
            .await
            .map_err(|e| StoreError(format!("hashing: {e}")))?;
        if !self.deps.store.use_invite(&digest).await? {
            return Ok(Answer::message(
                StatusCode::GONE,
                "This invite link has already been used",
                "An invite link sets a password once.",
                Some(("/signin", "Sign in")),
            ));
        }
        self.deps
            .store
            .set_password_hash(&account.id, &hash)
            .await?;
        self.deps
            .audit
            .record(
                &account.id,
                "account.password_set",
                &account.id,
                json!({"via": "invite"}),
            )
            .await;
        Ok(Answer::redirect("/signin?password=set"))
    }

    async fn sign_out(&self, req: &Request) -> Result<Answer, Answer> {
        let token = match self.who(req).await? {
            Who::Nobody => return Ok(Answer::redirect("/signin")),
            Who::Account(me) => me.token,
            Who::Operator { token, .. } => token,
        };
        if !csrf_ok(&token, req.field("csrf")) {
            return Ok(forbidden());
        }
        self.deps
            .store
            .delete_session(&core::digest(&token))
            .await?;
        Ok(Answer::redirect("/signin").with(header::SET_COOKIE, self.cookie(SESSION_COOKIE, "")))
    }

    async fn account_page(
        &self,
        req: &Request,
        route: Route,
        post: bool,
        mut me: SignedIn,
    ) -> Result<Answer, Answer> {
        if post && !csrf_ok(&me.token, req.field("csrf")) {
            return Ok(forbidden());
        }
        let actor = me.account.id.clone();
        match route {
            Route::Keys if post => {
                let name = req.field("name").unwrap_or("").to_string();
                let created = self
                    .deps
                    .keys
                    .create(CreateKey {
                        name: name.clone(),
                        account_id: Some(actor.clone()),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok((view, secret)) => {
                        self.deps
                            .audit
                            .record(&actor, "key.created", &view.id, json!({"name": view.name}))
                            .await;
                        let shown_name = view.name.clone();
                        me.keys.push(view);
                        let shown = Shown {
                            name: &shown_name,
                            secret: &secret,
                            rotated: false,
                        };
                        Ok(no_store(Answer::page(
                            StatusCode::CREATED,
                            pages::keys(&me.viewer(), &me.keys, Some(shown), "", None),
                        )))
                    }
                    Err(AdminError::InvalidField { field: "name", .. }) => {
                        let error = if name.trim().is_empty() {
                            "Enter a name for the key."
                        } else {
                            "Use at most 200 characters."
                        };
                        Ok(Answer::page(
                            StatusCode::BAD_REQUEST,
                            pages::keys(&me.viewer(), &me.keys, None, &name, Some(error)),
                        ))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Route::Keys => Ok(Answer::page(
                StatusCode::OK,
                pages::keys(&me.viewer(), &me.keys, None, "", None),
            )),
            Route::Rotate(id) if post => {
                if own_key(&me, &id).is_none() {
                    return Ok(not_found());
                }
                let Some(grace) = core::parse_grace(req.field("grace")) else {
                    return Ok(Answer::message(
                        StatusCode::BAD_REQUEST,
                        "Choose a grace",
                        "Choose how long the old key keeps working from the list.",
                        Some(("/keys", "Back to API keys")),
                    ));
                };
                let rotated = self.deps.keys.rotate(&id, grace).await?;
                self.deps
                    .audit
                    .record(
                        &actor,
                        "key.rotated",
                        &id,
                        json!({"grace_secs": grace.as_secs()}),
                    )
                    .await;
                let shown_name = rotated.view.name.clone();
                for k in &mut me.keys {
                    if k.id == id {
                        *k = rotated.view.clone();
                    }
                }
                let shown = Shown {
                    name: &shown_name,
                    secret: &rotated.secret,
                    rotated: true,
                };
                Ok(no_store(Answer::page(
                    StatusCode::OK,
                    pages::keys(&me.viewer(), &me.keys, Some(shown), "", None),
                )))
            }
            Route::Rotate(_) => Ok(Answer::redirect("/keys")),
            Route::Revoke(id) => {
                let Some(key) = own_key(&me, &id) else {
                    return Ok(not_found());
                };
                if !post {
                    return Ok(Answer::page(
                        StatusCode::OK,
                        pages::confirm_revoke(&me.viewer(), key),
                    ));
                }
                self.deps.keys.revoke(&id).await?;
                self.deps
                    .audit
                    .record(&actor, "key.revoked", &id, json!({"status": "revoked"}))
                    .await;
                Ok(Answer::redirect("/keys"))
            }
            Route::Usage => {
                let now = self.deps.clock.now();
                let today = Day::containing(now);
                let first = Day((me.period.start_unix() / 86_400) as u32);
                let mut days = self
                    .deps
                    .accounts
                    .history(&me.account.id, first.min(today), today)
                    .await?;
                // Calls this node counted but has not reported yet are today's: the chart
                // adds up to the line above it.
                let charted: u64 = days.iter().map(|(_, c)| c).sum();
                if let Some((_, last)) = days.last_mut() {
                    *last += me.used.saturating_sub(charted);
                }
                let line = core::usage_line(me.used, me.account.monthly_limit);
                let reset = me.period.next().to_string() + "-01";
                Ok(Answer::page(
                    StatusCode::OK,
                    pages::usage(&me.viewer(), &me.account.plan, &line, &days, &reset),
                ))
            }
            _ => Ok(not_found()),
        }
    }

    /// The operator's view, signed in with the admin token.
    async fn operator(&self, req: &Request, route: Route, post: bool) -> Result<Answer, Answer> {
        let (token, csrf) = match self.who(req).await? {
            Who::Operator { token, csrf } => (token, csrf),
            Who::Account(_) if !post => return Ok(Answer::redirect("/keys")),
            _ if route == Route::Operator && post => return self.operator_sign_in(req).await,
            _ if route == Route::Operator => {
                return Ok(self.anonymous(req, StatusCode::OK, |csrf| {
                    pages::operator_sign_in(csrf, None)
                }));
            }
            _ if post => return Ok(forbidden()),
            _ => return Ok(Answer::redirect("/operator")),
        };
        if post && !csrf_ok(&token, req.field("csrf")) {
            return Ok(forbidden());
        }
        let mut invite = None;
        let mut error = None;
        match route {
            Route::OperatorAccounts if post => {
                let email = req.field("email").unwrap_or("").to_string();
                let created = self
                    .deps
                    .accounts
                    .create(CreateAccount {
                        email: email.clone(),
                        name: req.field("name").unwrap_or("").to_string(),
                        plan: req.field("plan").map(str::to_string),
                    })
                    .await;
                match created {
                    Ok(view) => {
                        self.deps
                            .audit
                            .record(
                                ADMIN,
                                "account.created",
                                &view.id,
                                json!({"email": view.email, "name": view.name, "plan": view.plan, "via": "portal"}),
                            )
                            .await;
                        let url = self.deps.invites.issue(&view.id).await?;
                        invite = Some((view.email, url));
                    }
                    Err(AdminError::Store(e)) => return Err(e.into()),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            Route::OperatorStatus(id) if post => {
                let status = match req.field("status") {
                    Some("active") => AccountStatus::Active,
                    Some("disabled") => AccountStatus::Disabled,
                    _ => return Ok(Answer::redirect("/operator")),
                };
                self.deps
                    .accounts
                    .change(
                        &id,
                        ChangeAccount {
                            status: Some(status),
                            ..Default::default()
                        },
                    )
                    .await?;
                self.deps
                    .audit
                    .record(
                        ADMIN,
                        "account.updated",
                        &id,
                        json!({"status": status.as_str(), "via": "portal"}),
                    )
                    .await;
                return Ok(Answer::redirect("/operator"));
            }
            Route::OperatorInvite(id) if post => {
                let (view, ..) = self.deps.accounts.show(&id).await?;
                let url = self.deps.invites.issue(&view.id).await?;
                self.deps
                    .audit
                    .record(ADMIN, "account.invited", &view.id, json!({"via": "portal"}))
                    .await;
                invite = Some((view.email, url));
            }
            Route::Operator => {}
            _ => return Ok(Answer::redirect("/operator")),
        }
        // A page at a time: `?after=` names the last account of the page before. The answer
        // to a form (an invite, an error) shows the first page.
        let query = core::parse_form(req.query.as_bytes());
        let after = field(&query, "after").filter(|_| !post);
        let (accounts, next) = match self.deps.accounts.list(after, OPERATOR_PAGE).await {
            Ok(page) => page,
            Err(AdminError::InvalidField {
                field: "cursor", ..
            }) => {
                return Ok(Answer::message(
                    StatusCode::BAD_REQUEST,
                    "No such page",
                    "The list has no page after that account. Start again from the first page.",
                    Some(("/operator", "First page")),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let accounts = AccountPage {
            rows: accounts
                .iter()
                .map(|a| AccountRow {
                    id: &a.id,
                    email: &a.email,
                    name: &a.name,
                    plan: &a.plan,
                    status: a.status.as_str(),
                })
                .collect(),
            later: after.is_some(),
            next: next.as_deref(),
        };
        let plans: Vec<(String, String)> = self
            .deps
            .plans
            .iter()
            .map(|(name, plan)| {
                let limit = plan
                    .monthly_limit
                    .map_or("unlimited".to_string(), |l| format!("{l} calls"));
                (name.clone(), limit)
            })
            .collect();
        let viewer = Viewer {
            email: "operator",
            csrf: &csrf,
            operator: true,
        };
        let status = if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        let page = pages::operator(
            &viewer,
            &accounts,
            &plans,
            invite.as_ref().map(|(e, u)| (e.as_str(), u.as_str())),
            error.as_deref(),
        );
        Ok(no_store(Answer::page(status, page)))
    }

    async fn operator_sign_in(&self, req: &Request) -> Result<Answer, Answer> {
        if !Self::anonymous_csrf_ok(req) {
            return Ok(forbidden());
        }
        let Some(expected) = &self.admin_digest else {
            return Ok(Answer::message(
                StatusCode::FORBIDDEN,
                "Operator sign-in is off",
                "Set AUDIOLIB_ADMIN_TOKEN to sign in as the operator.",
                None,
            ));
        };
        let throttle = core::throttle_key(OPERATOR, &req.client);
        if let Some(wait) = self.attempt(&throttle).await? {
            return Ok(wait);
        }
        let given = Sha256::digest(req.field("token").unwrap_or("").trim().as_bytes());
        if given.as_slice() != expected {
            return Ok(self.anonymous(req, StatusCode::UNAUTHORIZED, |csrf| {
                pages::operator_sign_in(csrf, Some("Wrong admin token."))
            }));
        }
        self.deps.store.clear_failures(&throttle).await?;
        self.start_session(OPERATOR, "/operator").await
    }
}

impl Portal {
    /// Counts an attempt under `throttle` before it is judged, and answers the wait page when
    /// it is one too many. Counting first, in the store's one atomic step, holds the bound
    /// however many attempts arrive at once (a check before and a count after would let a
    /// parallel burst through); a sign-in that succeeds clears its count again.
    async fn attempt(&self, throttle: &str) -> Result<Option<Answer>, Answer> {
        let now = self.deps.clock.now();
        let store = &self.deps.store;
        if store.add_failure(throttle, THROTTLE_WINDOW, now).await? <= MAX_FAILURES {
            return Ok(None);
        }
        let (_, age) = store.failures(throttle, THROTTLE_WINDOW, now).await?;
        Ok(Some(wait_page(
            THROTTLE_WINDOW.as_secs().saturating_sub(age),
        )))
    }
}

/// The 429 page of the throttles: how long to wait.
fn wait_page(secs: u64) -> Answer {
    let wait = secs.max(1);
    Answer::message(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many attempts",
        &format!("Too many attempts from your address. Wait {wait} seconds, then try again."),
        Some(("/", "Back to the portal")),
    )
    .with(header::RETRY_AFTER, wait.to_string())
}

/// The key of `id` if it is the signed-in account's: another account's key is "not found".
fn own_key<'a>(me: &'a SignedIn, id: &str) -> Option<&'a KeyView> {
    me.keys.iter().find(|k| k.id == id)
}

/// A page showing a secret once: never kept by a cache or the browser's history.
fn no_store(answer: Answer) -> Answer {
    answer.with(header::CACHE_CONTROL, "no-store".into())
}

/// Reads the request: a form body of at most [`MAX_FORM`] bytes.
async fn read_request(
    session: &mut ServerSession,
    trusted: &[crate::forwarding::Cidr],
) -> Result<Request, Answer> {
    let head = session.req_header();
    let method = head.method.clone();
    let route = Route::of(head.uri.path());
    let query = head.uri.query().unwrap_or("").to_string();
    let cookies = session
        .get_header(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let peer: Option<IpAddr> = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let forwarded: Vec<&str> = head
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let client = core::client_address(peer, &forwarded, trusted);
    let mut body = Vec::new();
    if method == Method::POST {
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_FORM {
                        return Err(Answer::message(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "Too large",
                            "This form is larger than the portal takes.",
                            None,
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(Answer::message(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The form could not be read.",
                        None,
                    ));
                }
            }
        }
    }
    Ok(Request {
        method,
        route,
        query,
        cookies,
        form: core::parse_form(&body),
        client,
    })
}

#[async_trait]
impl ServeHttp for Portal {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let answer = match read_request(session, &self.deps.trusted_proxies).await {
            Ok(req) => self.handle(req).await.unwrap_or_else(|a| a),
            Err(a) => a,
        };
        let head = session.req_header().method == Method::HEAD;
        let mut builder = Response::builder()
            .status(answer.status)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header("X-Frame-Options", "DENY")
            .header("X-Content-Type-Options", "nosniff")
            .header("Referrer-Policy", "same-origin")
            .header(
                "Content-Security-Policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
            );
        let mut cache_set = false;
        for (name, value) in &answer.headers {
            if name == header::CONTENT_TYPE
                && let Some(h) = builder.headers_mut()
            {
                h.remove(header::CONTENT_TYPE);
            }
            cache_set |= name == header::CACHE_CONTROL;
            builder = builder.header(name, value);
        }
        if !cache_set {
            builder = builder.header(header::CACHE_CONTROL, "no-cache");
        }
        let body = if head {
            Vec::new()
        } else {
            answer.body.into_bytes()
        };
        builder
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

/// The portal's address as users reach it: `portal.public_url`, else its listener's.
pub fn base_url(config: &crate::config::Config) -> String {
    config
        .portal
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", crate::server::reachable(config.portal.listen)))
}

/// The development account of the embedded store (`serve --dev-account`): created on the
/// first start, given a new random password on each (only its hash is kept), printed with
/// the portal's address.
pub fn dev_account(
    accounts: &AccountService,
    store: Option<Arc<dyn PortalStore>>,
    config: &crate::config::Config,
) -> Result<(), String> {
    const EMAIL: &str = "developer@example.com";
    let Some(store) = store else {
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let password = core::new_token()[..16].to_string();
    runtime.block_on(async {
        let id = match store
            .account_id_by_email(EMAIL)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(id) => id,
            None => {
                accounts
                    .create(CreateAccount {
                        email: EMAIL.into(),
                        name: "Development".into(),
                        plan: None,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .id
            }
        };
        let hash = password::hash(&password)?;
        store
            .set_password_hash(&id, &hash)
            .await
            .map_err(|e| e.to_string())
    })?;
    println!(
        "developer portal: {} (sign in as {EMAIL} with password {password})",
        base_url(config)
    );
    Ok(())
}
