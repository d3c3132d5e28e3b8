//! The portal's decisions, without HTTP or storage: cookies, forms, CSRF tokens, the sign-in
//! throttle's key, the rotation graces offered, and how usage is worded. Tested with tables.

use std::net::IpAddr;
use std::time::Duration;

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

use crate::forwarding::Cidr;

/// The session cookie: the token itself; the store keeps only its digest.
pub const SESSION_COOKIE: &str = "audiolib_session";
/// A cookie given before sign-in, whose token the sign-in, sign-up and set-password forms'
/// CSRF tokens are derived from (so a form on another site cannot sign someone in).
pub const PRE_COOKIE: &str = "audiolib_pre";
/// Sessions end after this long without a request.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Invite links work this long.
pub const INVITE_VALID: Duration = Duration::from_secs(7 * 86_400);
/// Failed sign-ins per account and address in [`THROTTLE_WINDOW`] before a wait.
pub const MAX_FAILURES: u32 = 5;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Shortest password accepted (NIST SP 800-63B's minimum for chosen passwords).
pub const MIN_PASSWORD: usize = 8;
/// Longest password hashed: argon2 takes any length, but nobody needs a megabyte.
pub const MAX_PASSWORD: usize = 1024;
/// The largest form body read.
pub const MAX_FORM: usize = 16 * 1024;

/// The graces offered when rotating a key: value in seconds and label.
pub const GRACES: [(u64, &str); 4] = [
    (0, "none (the old key stops at once)"),
    (3600, "1 hour"),
    (86_400, "1 day"),
    (604_800, "7 days"),
];

/// A fresh random token for a session, a pre-session or an invite: 32 letters and digits
/// (about 190 bits) from the thread's CSPRNG.
pub fn new_token() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// SHA-256 in hex: how tokens are kept.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The CSRF token of forms shown under the cookie token `token`: derived, so it needs no
/// storage, and unknowable to another site, which cannot read the cookie.
pub fn csrf_token(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"audiolib-portal-csrf\0");
    h.update(token.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Whether a submitted CSRF field matches the cookie's token (compared as digests, so the time
/// taken says nothing about how much of a guess was right).
pub fn csrf_ok(token: &str, submitted: Option<&str>) -> bool {
    submitted.is_some_and(|s| {
        Sha256::digest(s.as_bytes()) == Sha256::digest(csrf_token(token).as_bytes())
    })
}

/// The key failed sign-ins are counted under: the account's email and the client's address.
pub fn throttle_key(email: &str, addr: &str) -> String {
    digest(&format!("{email}\n{addr}"))
}

/// The client's address for the sign-in throttle: the TCP peer, or behind `trusted_proxies`
/// the first address from the right of `X-Forwarded-For` that is not a trusted proxy (each
/// entry was appended by the hop to its right; those left of the first untrusted one are the
/// client's to invent).
pub fn client_address(peer: Option<IpAddr>, forwarded_for: &[&str], trusted: &[Cidr]) -> String {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let Some(peer) = peer else {
        return "unknown".into();
    };
    if !is_trusted(peer) {
        return peer.to_canonical().to_string();
    }
    let mut client = peer.to_canonical().to_string();
    for entry in forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .rev()
    {
        match entry.parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip) => client = ip.to_canonical().to_string(),
            Ok(ip) => return ip.to_canonical().to_string(),
            Err(_) => return entry.chars().take(64).collect(),
        }
    }
    client
}

/// A cookie's value from a `Cookie` header (`None` if absent or not a plausible token).
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
        .filter(|v| is_token(v))
}

/// Whether `s` has the shape of a token this portal issues.
pub fn is_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The `Set-Cookie` value for `name`; an empty `value` deletes it.
pub fn set_cookie(name: &str, value: &str, secure: bool) -> String {
    let mut c = format!("{name}={value}; HttpOnly; SameSite=Lax; Path=/");
    if value.is_empty() {
        c.push_str("; Max-Age=0");
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// An `application/x-www-form-urlencoded` body (or query) as name-value pairs; malformed
/// escapes are kept as written rather than refused.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(n), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The first value of `name` in a parsed form.
pub fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A grace offered in [`GRACES`], from its form value.
pub fn parse_grace(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.parse().ok()?;
    GRACES
        .iter()
        .any(|(g, _)| *g == secs)
        .then(|| Duration::from_secs(secs))
}

/// What a password must be; `None` when it will do.
pub fn password_problem(password: &str) -> Option<String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD {
        Some(format!("Use at least {MIN_PASSWORD} characters."))
    } else if password.len() > MAX_PASSWORD {
        Some(format!("Use at most {MAX_PASSWORD} bytes."))
    } else {
        None
    }
}

/// `N of M calls this month`, or `N calls this month` when unlimited (SPEC §10).
pub fn usage_line(used: u64, limit: Option<u64>) -> String {
    match limit {
        Some(limit) => format!("{used} of {limit} calls this month"),
        None => format!("{used} calls this month"),
    }
}

/// Where a path goes: the routes of the portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Home,
    SignIn,
    SignUp,
    SignOut,
    Invite(String),
    Keys,
    Rotate(String),
    Revoke(String),
    Usage,
    Operator,
    OperatorAccounts,
    OperatorStatus(String),
    /// A new invite link for an existing account.
    OperatorInvite(String),
    Style,
}

impl Route {
    pub fn of(path: &str) -> Option<Route> {
        let member = |prefix: &str, suffix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(suffix))
                .filter(|id| !id.is_empty() && id.len() <= 64 && !id.contains('/'))
                .map(str::to_string)
        };
        Some(match path {
            "/" => Route::Home,
            "/signin" => Route::SignIn,
            "/signup" => Route::SignUp,
            "/signout" => Route::SignOut,
            "/keys" => Route::Keys,
            "/usage" => Route::Usage,
            "/operator" => Route::Operator,
            "/operator/accounts" => Route::OperatorAccounts,
            "/style.css" => Route::Style,
            _ => {
                if let Some(token) = member("/invite/", "") {
                    Route::Invite(token)
                } else if let Some(id) = member("/keys/", "/rotate") {
                    Route::Rotate(id)
                } else if let Some(id) = member("/keys/", "/revoke") {
                    Route::Revoke(id)
                } else if let Some(id) = member("/operator/accounts/", "/status") {
                    Route::OperatorStatus(id)
                } else if let Some(id) = member("/operator/accounts/", "/invite") {
                    Route::OperatorInvite(id)
                } else {
                    return None;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name_and_shape() {
        let t = "a".repeat(32);
        let header = format!("x=1; {SESSION_COOKIE}={t}; {PRE_COOKIE}=short");
        for (name, want) in [
            (SESSION_COOKIE, Some(t.as_str())),
            (PRE_COOKIE, None),
            ("missing", None),
        ] {
            assert_eq!(cookie(Some(&header), name), want, "{name}");
        }
        assert_eq!(cookie(None, SESSION_COOKIE), None);
    }

    #[test]
    fn set_cookie_has_the_attributes() {
        for (value, secure, want) in [
            ("abc", false, "s=abc; HttpOnly; SameSite=Lax; Path=/"),
            ("abc", true, "s=abc; HttpOnly; SameSite=Lax; Path=/; Secure"),
            ("", false, "s=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0"),
        ] {
            assert_eq!(set_cookie("s", value, secure), want);
        }
    }

    #[test]
    fn csrf_tokens_belong_to_their_cookie() {
        let (a, b) = (new_token(), new_token());
        assert!(csrf_ok(&a, Some(&csrf_token(&a))));
        for submitted in [None, Some(""), Some(csrf_token(&b).as_str())] {
            assert!(!csrf_ok(&a, submitted), "{submitted:?}");
        }
    }

    #[test]
    fn forms_decode() {
        let form = parse_form(b"email=a%40b.co&password=p+w%zz&&empty=&flag");
        assert_eq!(field(&form, "email"), Some("a@b.co"));
        assert_eq!(field(&form, "password"), Some("p w%zz"));
        assert_eq!(field(&form, "empty"), Some(""));
        assert_eq!(field(&form, "flag"), Some(""));
        assert_eq!(field(&form, "nope"), None);
        assert!(parse_form(&[0xff, b'=', 0xfe]).len() == 1);
    }

    #[test]
    fn only_offered_graces_are_taken() {
        for (value, want) in [
            (Some("0"), Some(0)),
            (Some("3600"), Some(3600)),
            (Some("604800"), Some(604_800)),
            (Some("5"), None),
            (Some("-1"), None),
            (Some("x"), None),
            (None, None),
        ] {
            assert_eq!(
                parse_grace(value),
                want.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    #[test]
    fn usage_is_worded_as_the_spec_says() {
        assert_eq!(usage_line(3, Some(1000)), "3 of 1000 calls this month");
        assert_eq!(usage_line(0, None), "0 calls this month");
    }

    #[test]
    fn passwords_have_a_floor() {
        assert!(password_problem("short").is_some());
        assert!(password_problem("long enough").is_none());
        assert!(password_problem(&"x".repeat(2000)).is_some());
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        for (peer, xff, want) in [
            (ip("203.0.113.9"), vec!["1.1.1.1"], "203.0.113.9"),
            (ip("10.0.0.2"), vec![], "10.0.0.2"),
            (ip("10.0.0.2"), vec!["198.51.100.7"], "198.51.100.7"),
            (
                ip("10.0.0.2"),
                vec!["6.6.6.6, 198.51.100.7, 10.0.0.3"],
                "198.51.100.7",
            ),
            (
                ip("10.0.0.2"),
                vec!["6.6.6.6", "198.51.100.7"],
                "198.51.100.7",
            ),
            (ip("10.0.0.2"), vec!["10.0.0.4, 10.0.0.3"], "10.0.0.4"),
            (ip("10.0.0.2"), vec!["not-an-ip"], "not-an-ip"),
            (ip("::ffff:203.0.113.9"), vec![], "203.0.113.9"),
            (None, vec!["1.1.1.1"], "unknown"),
        ] {
            assert_eq!(
                client_address(peer, &xff, &trusted),
                want,
                "{peer:?} {xff:?}"
            );
        }
    }

    #[test]
    fn routes() {
        for (path, want) in [
            ("/", Some(Route::Home)),
            ("/keys", Some(Route::Keys)),
            ("/keys/key_1/rotate", Some(Route::Rotate("key_1".into()))),
            ("/keys/key_1/revoke", Some(Route::Revoke("key_1".into()))),
            ("/keys//revoke", None),
            ("/keys/a/b/revoke", None),
            ("/invite/abc", Some(Route::Invite("abc".into()))),
            ("/invite/", None),
            (
                "/operator/accounts/acct_1/status",
                Some(Route::OperatorStatus("acct_1".into())),
            ),
            ("/nope", None),
        ] {
            assert_eq!(Route::of(path), want, "{path}");
        }
    }
}
