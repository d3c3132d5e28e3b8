//! The developer portal (SPEC §10) over HTTP against the real binary: CSRF, throttling,
//! session isolation and sign-out, invite links, field errors, sessions shared by two nodes
//! on one Redis; and the whole flow in a real Chromium (`portal_browser.mjs`).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Gateway, RedisServer, redis_cli};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A cookie-keeping HTTP client that does not follow redirects, as a browser without
/// JavaScript would submit forms.
struct Browser {
    base: String,
    jar: BTreeMap<String, String>,
    agent: ureq::Agent,
}

struct Page {
    status: u16,
    location: Option<String>,
    body: String,
}

impl Page {
    /// The CSRF token of the (first) form on the page.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser {
            base: base.trim_end_matches('/').to_string(),
            jar: BTreeMap::new(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into(),
        }
    }

    fn on(&self, base: &str) -> Browser {
        Browser {
            base: base.trim_end_matches('/').to_string(),
            jar: self.jar.clone(),
            agent: self.agent.clone(),
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, resp: http::Response<ureq::Body>) -> Page {
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Path=/"));
            let (name, rest) = c.split_once('=').unwrap();
            let value = rest.split(';').next().unwrap();
            if value.is_empty() {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_string(), value.to_string());
            }
        }
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        let body = resp.into_body().read_to_string().unwrap_or_default();
        Page {
            status,
            location,
            body,
        }
    }

    fn get(&mut self, path: &str) -> Page {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Cookie", self.cookie_header())
            .call()
            .unwrap();
        self.keep(resp)
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let body: String = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Cookie", self.cookie_header())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(body)
            .unwrap();
        self.keep(resp)
    }

    /// Sets the password through the invite link (a full URL) and signs in with it.
    fn accept_invite(&mut self, invite_url: &str, email: &str, password: &str) {
        let path = &invite_url[invite_url.find("/invite/").unwrap()..];
        let form = self.get(path);
        assert_eq!(form.status, 200, "{}", form.body);
        assert!(form.body.contains("Set password"), "{}", form.body);
        let set = self.post(path, &[("csrf", &form.csrf()), ("password", password)]);
        assert_eq!(set.status, 303, "{}", set.body);
        assert_eq!(set.location.as_deref(), Some("/signin?password=set"));
        self.sign_in(email, password);
    }

    fn sign_in(&mut self, email: &str, password: &str) {
        let page = self.get("/signin");
        let done = self.post(
            "/signin",
            &[
                ("csrf", &page.csrf()),
                ("email", email),
                ("password", password),
            ],
        );
        assert_eq!(done.status, 303, "{}", done.body);
        assert_eq!(done.location.as_deref(), Some("/keys"));
    }
}

/// Creates an account through the admin API; returns its id and invite link.
fn invite(gw: &Gateway, email: &str) -> (String, String) {
    let reply = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": email, "name": "Test"})),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    let v = reply.json();
    let url = v["invite_url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("http://{}/invite/", gw.portal)),
        "{url}"
    );
    (v["id"].as_str().unwrap().to_string(), url)
}

fn keys_of(gw: &Gateway, account: &str) -> Vec<serde_json::Value> {
    let reply = gw.admin("GET", &format!("/admin/accounts/{account}"), None);
    reply.json()["keys"].as_array().unwrap().clone()
}

fn text_between<'a>(body: &'a str, start: &str, end: &str) -> &'a str {
    let from = body
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in {body}"))
        + start.len();
    &body[from..from + body[from..].find(end).unwrap()]
}

#[test]
fn forms_need_their_csrf_token_and_accounts_see_only_their_own() {
    let gw = Gateway::start();
    let (a_id, a_invite) = invite(&gw, "a@example.com");
    let (_b_id, b_invite) = invite(&gw, "b@example.com");
    let mut a = Browser::new(&gw.portal_url("/"));
    a.accept_invite(&a_invite, "a@example.com", "password-of-a");
    let mut b = Browser::new(&gw.portal_url("/"));
    b.accept_invite(&b_invite, "b@example.com", "password-of-b");

    // A forged form (no token, or another session's) is refused and changes nothing.
    let b_csrf = b.get("/keys").csrf();
    for form in [
        vec![("name", "forged")],
        vec![("name", "forged"), ("csrf", "")],
        vec![("name", "forged"), ("csrf", b_csrf.as_str())],
    ] {
        let page = a.post("/keys", &form);
        assert_eq!(page.status, 403, "{form:?}: {}", page.body);
    }
    assert!(keys_of(&gw, &a_id).is_empty());
    // So is a form posted with no session at all.
    let mut stranger = Browser::new(&gw.portal_url("/"));
    assert_eq!(stranger.post("/keys", &[("name", "x")]).status, 403);

    // An empty name is a field error; nothing is created.
    let keys = a.get("/keys");
    assert!(keys.body.contains("<h1>API keys</h1>"), "{}", keys.body);
    let csrf = keys.csrf();
    let empty = a.post("/keys", &[("csrf", &csrf), ("name", "  ")]);
    assert_eq!(empty.status, 400);
    assert!(
        empty.body.contains("Enter a name for the key."),
        "{}",
        empty.body
    );
    assert!(keys_of(&gw, &a_id).is_empty());

    // A key is shown once, with the warning.
    let created = a.post("/keys", &[("csrf", &csrf), ("name", "alpha key")]);
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(created.body.contains("it will not be shown again"));
    let secret = text_between(&created.body, "id=\"new-key\">", "<").to_string();
    assert!(secret.starts_with("alp_"), "{secret}");
    assert_eq!(
        gw.post_audio(&secret, r#"{"library":"audio.focus"}"#)
            .status,
        200
    );
    let listed = a.get("/keys");
    assert!(listed.body.contains("alpha key"));
    assert!(!listed.body.contains(&secret), "a key is shown only once");
    let key_id = keys_of(&gw, &a_id)[0]["id"].as_str().unwrap().to_string();

    // B sees nothing of A's, and cannot act on A's key.
    let b_keys = b.get("/keys");
    assert!(!b_keys.body.contains("alpha key") && !b_keys.body.contains(&key_id));
    assert!(!b.get("/usage").body.contains("a@example.com"));
    for path in ["rotate", "revoke"] {
        let page = b.post(
            &format!("/keys/{key_id}/{path}"),
            &[("csrf", &b_csrf), ("grace", "0")],
        );
        assert_eq!(page.status, 404, "{path}");
    }
    assert_eq!(b.get(&format!("/keys/{key_id}/revoke")).status, 404);
    assert_eq!(keys_of(&gw, &a_id)[0]["status"], "active");

    // Revoking asks first, then revokes; it lands in the audit log with A as the actor.
    let confirm = a.get(&format!("/keys/{key_id}/revoke"));
    assert!(confirm.body.contains("Revoke"), "{}", confirm.body);
    let done = a.post(
        &format!("/keys/{key_id}/revoke"),
        &[("csrf", &confirm.csrf())],
    );
    assert_eq!(done.status, 303);
    assert_eq!(keys_of(&gw, &a_id)[0]["status"], "revoked");
    let audit = gw.admin("GET", "/admin/audit", None).json();
    let mine: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == a_id.as_str())
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        mine,
        ["key.revoked", "key.created", "account.password_set"],
        "{audit}"
    );
    assert!(!audit.to_string().contains(&secret));

    // Sign-out without the token is refused; with it, the session is gone for good.
    let old_cookie = a.jar.clone();
    assert_eq!(a.post("/signout", &[]).status, 403);
    let csrf = a.get("/keys").csrf();
    let out = a.post("/signout", &[("csrf", &csrf)]);
    assert_eq!(out.status, 303);
    assert!(!a.jar.contains_key("audiolib_session"));
    a.jar = old_cookie;
    let after = a.get("/keys");
    assert_eq!(after.status, 303);
    assert_eq!(after.location.as_deref(), Some("/signin"));
}

#[test]
fn invite_links_work_once_and_say_why_not() {
    let gw = Gateway::start();
    let (_, url) = invite(&gw, "once@example.com");
    let path = url[url.find("/invite/").unwrap()..].to_string();
    let mut browser = Browser::new(&gw.portal_url("/"));
    // Too short a password is a field error and uses nothing up.
    let form = browser.get(&path);
    let short = browser.post(&path, &[("csrf", &form.csrf()), ("password", "short")]);
    assert_eq!(short.status, 400);
    assert!(
        short.body.contains("at least 8 characters"),
        "{}",
        short.body
    );
    // A forged form changes nothing either.
    assert_eq!(
        browser.post(&path, &[("password", "long enough")]).status,
        403
    );
    browser.accept_invite(&url, "once@example.com", "long enough");

    let mut other = Browser::new(&gw.portal_url("/"));
    let reused = other.get(&path);
    assert_eq!(reused.status, 410);
    assert!(reused.body.contains("already been used"), "{}", reused.body);
    for bad in [
        "/invite/nonsense",
        "/invite/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let page = other.get(bad);
        assert_eq!(page.status, 404);
        assert!(page.body.contains("not valid"), "{}", page.body);
    }
}

#[test]
fn a_wrong_password_reads_the_same_for_unknown_emails_and_five_failures_mean_a_wait() {
    let gw = Gateway::start();
    let (_, url) = invite(&gw, "known@example.com");
    Browser::new(&gw.portal_url("/")).accept_invite(&url, "known@example.com", "the right one");

    let mut browser = Browser::new(&gw.portal_url("/"));
    let csrf = browser.get("/signin").csrf();
    let attempt = |b: &mut Browser, email: &str, password: &str| {
        b.post(
            "/signin",
            &[("csrf", &csrf), ("email", email), ("password", password)],
        )
    };
    let unknown = attempt(&mut browser, "nobody@example.com", "whatever");
    let wrong = attempt(&mut browser, "known@example.com", "wrong one");
    assert_eq!((unknown.status, wrong.status), (401, 401));
    let message = |p: &Page| text_between(&p.body, "role=\"alert\">", "<").to_string();
    assert_eq!(message(&unknown), "Wrong email or password.");
    assert_eq!(message(&unknown), message(&wrong));
    assert_eq!(
        unknown.body.replace("nobody@example.com", "E"),
        wrong.body.replace("known@example.com", "E"),
        "the two pages differ only in the email typed"
    );

    for _ in 0..4 {
        assert_eq!(
            attempt(&mut browser, "known@example.com", "wrong").status,
            401
        );
    }
    // The sixth within the minute waits, even with the right password.
    let sixth = attempt(&mut browser, "known@example.com", "the right one");
    assert_eq!(sixth.status, 429, "{}", sixth.body);
    assert!(sixth.body.contains("Wait "), "{}", sixth.body);
    // Another account from the same address is not held up.
    assert_eq!(attempt(&mut browser, "nobody@example.com", "x").status, 401);

    // A burst at once: every attempt is counted before it is judged, so five are judged and
    // the rest wait, however many arrive together.
    let (_, url) = invite(&gw, "burst@example.com");
    Browser::new(&gw.portal_url("/")).accept_invite(&url, "burst@example.com", "burst right");
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let tries: Vec<_> = (0..20)
            .map(|_| {
                let base = gw.portal_url("/");
                scope.spawn(move || {
                    let mut b = Browser::new(&base);
                    let csrf = b.get("/signin").csrf();
                    b.post(
                        "/signin",
                        &[
                            ("csrf", &csrf),
                            ("email", "burst@example.com"),
                            ("password", "wrong"),
                        ],
                    )
                    .status
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let judged = statuses.iter().filter(|s| **s == 401).count();
    let waited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((judged, waited), (5, 15), "{statuses:?}");
}

#[test]
fn open_sign_up_starts_on_the_default_plan_and_invite_mode_has_none() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_PORTAL_SIGNUP", "open")
        .start();
    let mut browser = Browser::new(&gw.portal_url("/"));
    let form = browser.get("/signup");
    assert!(form.body.contains("Create account"));
    let csrf = form.csrf();
    let bad = browser.post(
        "/signup",
        &[
            ("csrf", &csrf),
            ("email", "nope"),
            ("password", "long enough"),
        ],
    );
    assert_eq!(bad.status, 400);
    let done = browser.post(
        "/signup",
        &[
            ("csrf", &csrf),
            ("email", "New@Example.com"),
            ("password", "long enough"),
        ],
    );
    assert_eq!(done.status, 303, "{}", done.body);
    let usage = browser.get("/usage");
    assert!(
        usage.body.contains("0 of 1000 calls this month"),
        "{}",
        usage.body
    );
    assert!(
        usage
            .body
            .contains("curl -X POST https://api.audiolib.ai/v1/audio")
    );
    let again = Browser::new(&gw.portal_url("/")).post("/signup", &[]);
    assert_eq!(again.status, 403);
    // Five sign-ups a minute from one address, then a wait.
    for n in 2..=6 {
        let email = format!("more{n}@example.com");
        let page = browser.post(
            "/signup",
            &[
                ("csrf", &csrf),
                ("email", &email),
                ("password", "long enough"),
            ],
        );
        assert_eq!(page.status, if n <= 5 { 303 } else { 429 }, "{n}");
    }

    let invite_only = Gateway::start();
    let page = Browser::new(&invite_only.portal_url("/")).get("/signup");
    assert_eq!(page.status, 404);
    assert!(page.body.contains("by invitation"));
}

#[test]
fn the_operator_signs_in_with_the_admin_token_and_invites_and_disables() {
    let gw = Gateway::start();
    let mut op = Browser::new(&gw.portal_url("/"));
    let form = op.get("/operator");
    let wrong = op.post("/operator", &[("csrf", &form.csrf()), ("token", "wrong")]);
    assert_eq!(wrong.status, 401);
    let ok = op.post(
        "/operator",
        &[("csrf", &form.csrf()), ("token", common::ADMIN_TOKEN)],
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    let page = op.get("/operator");
    assert!(page.body.contains("Plans") && page.body.contains("unlimited"));
    let invited = op.post(
        "/operator/accounts",
        &[
            ("csrf", &page.csrf()),
            ("email", "op@example.com"),
            ("name", "Op"),
            ("plan", "pro"),
        ],
    );
    assert_eq!(invited.status, 200, "{}", invited.body);
    let url = text_between(&invited.body, "id=\"invite-link\">", "<").to_string();
    let mut user = Browser::new(&gw.portal_url("/"));
    user.accept_invite(&url, "op@example.com", "password-op");
    let accounts = gw.admin("GET", "/admin/accounts", None).json();
    let account = &accounts["accounts"][0];
    assert_eq!(account["email"], "op@example.com");
    assert_eq!(account["plan"], "pro");
    let id = account["id"].as_str().unwrap().to_string();

    let disable = op.post(
        &format!("/operator/accounts/{id}/status"),
        &[("csrf", &page.csrf()), ("status", "disabled")],
    );
    assert_eq!(disable.status, 303);
    assert_eq!(
        gw.admin("GET", &format!("/admin/accounts/{id}"), None)
            .json()["status"],
        "disabled"
    );
    // A disabled account's session ends.
    assert_eq!(user.get("/keys").status, 303);

    // A new invite link for an existing account (a forgotten password) works once.
    let again = op.post(
        &format!("/operator/accounts/{id}/invite"),
        &[("csrf", &page.csrf())],
    );
    assert_eq!(again.status, 200, "{}", again.body);
    let url = text_between(&again.body, "id=\"invite-link\">", "<").to_string();
    let enable = op.post(
        &format!("/operator/accounts/{id}/status"),
        &[("csrf", &page.csrf()), ("status", "active")],
    );
    assert_eq!(enable.status, 303);
    Browser::new(&gw.portal_url("/")).accept_invite(&url, "op@example.com", "a new password");
}

#[test]
fn the_operators_account_list_comes_a_page_at_a_time() {
    let gw = Gateway::start();
    for i in 0..105 {
        invite(&gw, &format!("page{i:03}@example.com"));
    }
    let mut op = Browser::new(&gw.portal_url("/"));
    let form = op.get("/operator");
    let signed_in = op.post(
        "/operator",
        &[("csrf", &form.csrf()), ("token", common::ADMIN_TOKEN)],
    );
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let emails = |page: &Page| -> Vec<String> {
        page.body
            .split("<td>")
            .filter_map(|cell| cell.split_once("@example.com</td>"))
            .map(|(user, _)| user.to_string())
            .collect()
    };

    let first = op.get("/operator");
    assert_eq!(first.status, 200);
    assert_eq!(emails(&first).len(), 100);
    assert!(!first.body.contains("First page"));
    let after = text_between(&first.body, "href=\"/operator?after=", "\"").to_string();
    let second = op.get(&format!("/operator?after={after}"));
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(emails(&second).len(), 5);
    assert!(second.body.contains("href=\"/operator\">First page"));
    assert!(!second.body.contains("?after="));
    // Every account once, over the two pages.
    let mut all = [emails(&first), emails(&second)].concat();
    all.sort();
    let expected: Vec<String> = (0..105).map(|i| format!("page{i:03}")).collect();
    assert_eq!(all, expected);

    // A cursor that names no account says so.
    let stray = op.get("/operator?after=acct_nobody");
    assert_eq!(stray.status, 400, "{}", stray.body);
    assert!(
        stray.body.contains("No such page") && stray.body.contains("href=\"/operator\""),
        "{}",
        stray.body
    );
}

#[test]
fn a_session_made_on_one_node_is_valid_on_another_and_ends_on_both() {
    let redis = RedisServer::start();
    let (one, two) = Gateway::two_on(&redis);
    let (_, url) = invite(&one, "multi@example.com");

    // An expired invite says so (its expiry moved into the past in the store).
    let (_, stale) = invite(&one, "stale@example.com");
    let token = &stale[stale.find("/invite/").unwrap() + "/invite/".len()..];
    let digest: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    redis_cli(
        redis.port,
        &[
            "HSET",
            &format!("audiolib:portal:invite:{digest}"),
            "expires",
            "1",
        ],
    )
    .unwrap();
    let expired = Browser::new(&two.portal_url("/")).get(&stale[stale.find("/invite/").unwrap()..]);
    assert_eq!(expired.status, 410);
    assert!(expired.body.contains("expired"), "{}", expired.body);

    let mut on_one = Browser::new(&one.portal_url("/"));
    on_one.accept_invite(&url, "multi@example.com", "shared session");
    let mut on_two = on_one.on(&two.portal_url("/"));
    let keys = on_two.get("/keys");
    assert_eq!(keys.status, 200, "{}", keys.body);
    assert!(keys.body.contains("multi@example.com"));
    // A key made on node 2 works on node 1.
    let created = on_two.post("/keys", &[("csrf", &keys.csrf()), ("name", "shared")]);
    let secret = text_between(&created.body, "id=\"new-key\">", "<").to_string();
    assert_eq!(
        one.post_audio(&secret, r#"{"library":"audio.focus"}"#)
            .status,
        200
    );

    // Throttling counts across nodes too.
    let mut guesser = Browser::new(&one.portal_url("/"));
    for i in 0..5 {
        let mut b = if i % 2 == 0 {
            guesser.on(&one.portal_url("/"))
        } else {
            guesser.on(&two.portal_url("/"))
        };
        let csrf = b.get("/signin").csrf();
        let page = b.post(
            "/signin",
            &[
                ("csrf", &csrf),
                ("email", "multi@example.com"),
                ("password", "no"),
            ],
        );
        assert_eq!(page.status, 401);
        guesser.jar = b.jar;
    }
    let csrf = guesser.get("/signin").csrf();
    let waited = guesser.on(&two.portal_url("/")).post(
        "/signin",
        &[
            ("csrf", &csrf),
            ("email", "multi@example.com"),
            ("password", "shared session"),
        ],
    );
    assert_eq!(waited.status, 429);

    // Signing out on node 2 ends the session on node 1.
    let out = on_two.post("/signout", &[("csrf", &keys.csrf())]);
    assert_eq!(out.status, 303);
    assert_eq!(on_one.get("/keys").status, 303);
}

/// The whole flow in Chromium, through the pages as a user sees them (accessible names of
/// SPEC §10), against two nodes on one Redis.
#[test]
fn browser_invite_to_sign_out_in_chromium() {
    let redis = RedisServer::start();
    let (one, two) = Gateway::two_on(&redis);
    let (_, url) = invite(&one, "browser@example.com");
    let (modules, chromium) = common::browser_tools();
    let shots = common::repo_path("target/portal-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let started = Instant::now();
    let (ok, out, err) = common::run(
        Command::new("timeout")
            .arg("120")
            .arg("node")
            .arg(common::repo_path("tests/portal_browser.mjs"))
            .env("AUDIOLIB_NODE_MODULES", modules)
            .env("CHROMIUM", &chromium)
            .env("INVITE_URL", &url)
            .env("EMAIL", "browser@example.com")
            .env("API_ONE", one.url("/v1/audio"))
            .env("API_TWO", two.url("/v1/audio"))
            .env("SHOTS", &shots),
    );
    assert!(
        ok,
        "browser flow failed after {:?}\n{out}\n{err}",
        started.elapsed()
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(seen["ok"], true, "{seen}");
    for shot in ["keys.png", "usage.png"] {
        assert!(shots.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
}

/// A newcomer's first run: `serve --dev-account` (as `scripts/run` starts it) prints the
/// portal's address and an account to sign in with, which gets a working key.
#[test]
fn the_printed_development_account_signs_in_and_gets_a_working_key() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin, portal) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .args(["serve", "--dev-account"])
        .current_dir(dir.path())
        .env_clear()
        .env("AUDIOLIB_LISTEN", format!("127.0.0.1:{port}"))
        .env("AUDIOLIB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("AUDIOLIB_PORTAL_LISTEN", format!("127.0.0.1:{portal}"))
        .env("AUDIOLIB_CATALOG_DIR", common::repo_path("catalog"))
        .env("AUDIOLIB_S3_BUCKET", "media")
        .env("AUDIOLIB_S3_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("AUDIOLIB_THREADS", "2")
        .env("AUDIOLIB_UPGRADE_SOCK", dir.path().join("u.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("developer portal") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no portal line");
    }
    let base = format!("http://127.0.0.1:{portal}");
    assert!(
        line.starts_with(&format!("developer portal: {base} ")),
        "{line}"
    );
    let email = text_between(&line, "sign in as ", " ").to_string();
    let password = text_between(&line, "with password ", ")").to_string();
    common::wait_until("the portal", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", portal)).is_ok()
    });
    let mut browser = Browser::new(&base);
    browser.sign_in(&email, &password);
    let csrf = browser.get("/keys").csrf();
    let created = browser.post("/keys", &[("csrf", &csrf), ("name", "first")]);
    let secret = text_between(&created.body, "id=\"new-key\">", "<").to_string();
    common::wait_until("the catalog", Duration::from_secs(20), || {
        common::agent()
            .post(format!("http://127.0.0.1:{port}/v1/audio"))
            .header("Authorization", format!("Bearer {secret}"))
            .header("Content-Type", "application/json")
            .send(r#"{"library":"audio.focus"}"#)
            .is_ok_and(|r| r.status() == 200)
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Behind TLS (`portal.public_url` is `https://…`): invite links use the public address and
/// cookies are `Secure`.
#[test]
fn an_https_public_url_makes_invite_links_and_secure_cookies() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_PORTAL_URL", "https://portal.example.com/")
        .start();
    let reply = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "tls@example.com", "name": "T"})),
    );
    let url = reply.json()["invite_url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("https://portal.example.com/invite/"),
        "{url}"
    );
    let resp = common::agent()
        .get(gw.portal_url("/signin"))
        .call()
        .unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let mut browser = Browser::new(&gw.portal_url("/"));
    browser.accept_invite(&url, "tls@example.com", "over https");
}
