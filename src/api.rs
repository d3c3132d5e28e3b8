//! `POST /v1/audio` without HTTP (SPEC §2): the checks of the error table in order, over
//! the key cache, the catalog snapshot, the store and the presigner. The Pingora glue in
//! `proxy` feeds it headers and the body and writes out what it returns, so tests and
//! benches drive the same code the server runs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::answers::Answers;
use crate::auth::{KeyDigest, bearer_token, check_format};
use crate::cache::{Caller, KeyCache};
use crate::catalog::CatalogHandle;
use crate::clock::Clock;
use crate::config::FailurePolicy;
use crate::error::ApiError;
use crate::key_calls::KeyCalls;
use crate::last_used::LastUsed;
use crate::ledger::Ledger;
use crate::quota::{LocalAdmission, Period, RateInfo, Reservation, Source};
use crate::rate::{Rate, RateLimiter};
use crate::sign::Presigner;
use crate::store::Store;
use crate::store::lease::Quota;

/// Seconds a client is told to wait when the store is down and the policy is fail-closed.
const STORE_RETRY_AFTER_SECS: u64 = 1;

/// The answer to one `/v1/audio` call, ready to be written.
#[derive(Debug)]
pub struct Outcome {
    /// The 200 body, or the error to answer with.
    pub result: Result<Bytes, ApiError>,
    /// Present for keys with a hard limit once the quota was consulted.
    pub rate: Option<RateInfo>,
}

impl Outcome {
    fn error(e: ApiError) -> Self {
        Self {
            result: Err(e),
            rate: None,
        }
    }
}

pub struct Gateway {
    keys: Arc<KeyCache>,
    quota: Arc<Quota>,
    catalog: Arc<CatalogHandle>,
    presigner: Presigner,
    clock: Arc<dyn Clock>,
    failure_policy: FailurePolicy,
    ledger: Ledger,
    last_used: LastUsed,
    key_calls: KeyCalls,
    /// Per-second rates of the plans that have one, by plan name.
    rates: BTreeMap<String, Rate>,
    limiter: RateLimiter,
    answers: Answers,
    /// The body limit of row 6, enforced by the caller while reading.
    pub max_body_bytes: usize,
}

impl Gateway {
    pub fn new(
        keys: Arc<KeyCache>,
        quota: Arc<Quota>,
        catalog: Arc<CatalogHandle>,
        presigner: Presigner,
        clock: Arc<dyn Clock>,
        failure_policy: FailurePolicy,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            keys,
            quota,
            catalog,
            presigner,
            clock,
            failure_policy,
            ledger: Ledger::new(),
            last_used: LastUsed::default(),
            key_calls: KeyCalls::default(),
            rates: BTreeMap::new(),
            limiter: RateLimiter::default(),
            answers: Answers::default(),
            max_body_bytes,
        }
    }

    pub fn catalog(&self) -> &CatalogHandle {
        &self.catalog
    }

    /// The key store (behind the key cache).
    pub fn store(&self) -> &Arc<dyn Store> {
        self.keys.store()
    }

    pub fn quota(&self) -> &Arc<Quota> {
        &self.quota
    }

    /// The per-second rates of plans, by name (row 5b).
    pub fn with_rates(mut self, rates: BTreeMap<String, Rate>) -> Self {
        self.rates = rates;
        self
    }

    /// Row 5b: a caller whose plan has a rate gets `RATE_LIMITED` above it. Checked before the
    /// body is read and the quota consulted, so refused calls are not counted.
    pub fn check_rate(&self, caller: &Caller) -> Result<(), ApiError> {
        if self.rates.is_empty() {
            return Ok(());
        }
        match self.rates.get(caller.plan()) {
            Some(rate) if !self.limiter.check(caller.subject(), *rate) => {
                Err(ApiError::RateLimited)
            }
            _ => Ok(()),
        }
    }

    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// When keys were last used, for the background sync to write.
    pub fn last_used(&self) -> &LastUsed {
        &self.last_used
    }

    /// Writes the calls counted per key of an account since the last time.
    pub async fn flush_key_calls(&self) {
        self.key_calls.flush(&self.quota, self.quota.today()).await;
    }

    /// Rows 3–5: the `Authorization` header values to an active key.
    pub async fn authenticate<'a, I>(&self, authorization: I) -> Result<Arc<Caller>, ApiError>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let token = bearer_token(authorization)?;
        check_format(token)?;
        let digest = KeyDigest::of(token);
        let now = self.clock.now();
        let record = self
            .keys
            .get_in(digest, crate::clock::unix_secs(now))
            .await
            .map_err(|e| {
                log::warn!("key lookup failed: {e}");
                self.store_down()
            })?
            .ok_or(ApiError::InvalidKey)?;
        if !record.serves(&digest, now) {
            return Err(ApiError::InvalidKey);
        }
        self.last_used.note(&record, now);
        Ok(record)
    }

    fn store_down(&self) -> ApiError {
        // Under either policy a key the store cannot vouch for is not admitted: fail-open
        // covers only keys already in the cache with a known usage.
        ApiError::ServiceUnavailable {
            retry_after: STORE_RETRY_AFTER_SECS,
        }
    }

    /// Rows 7–12 for an authenticated caller and its complete body.
    pub async fn audio(&self, caller: &Arc<Caller>, body: &[u8]) -> Outcome {
        let library = match parse_request(body) {
            Ok(library) => library,
            Err(e) => return Outcome::error(e),
        };
        let catalog = self.catalog.snapshot();
        let Some(lib) = catalog.libraries.get(library.as_ref()) else {
            return Outcome::error(ApiError::LibraryNotFound(library.into_owned()));
        };
        let Some(track) = lib.choose(&mut rand::rng()) else {
            return Outcome::error(ApiError::NoAudioItems(library.into_owned()));
        };

        let now = self.clock.now();
        let period = Period::containing(now);
        let (subject, limit) = (caller.subject(), caller.monthly_limit());
        let rate = |used| limit.map(|l| RateInfo::new(l, used, period, now));
        let exceeded = |used| Outcome {
            result: Err(ApiError::QuotaExceeded {
                limit: limit.unwrap_or(used),
                reset_at: period.reset_rfc3339(),
                retry_after: period.secs_to_reset(now),
            }),
            rate: rate(used),
        };
        // A key found exhausted this month under this limit stays so: no store call needed.
        if let Some(used) = self.ledger.exhausted(subject, period, limit) {
            return exceeded(used);
        }
        let (used, source) = match self.quota.reserve(subject, period, limit).await {
            Ok(answer) => {
                self.ledger.record(subject, period, limit, answer);
                match answer {
                    Reservation::Granted { used } => (used, Source::Lease),
                    Reservation::Denied { used } => return exceeded(used),
                    Reservation::Held => return Outcome::error(ApiError::RateLimited),
                }
            }
            Err(e) => {
                log::warn!("quota reservation for {subject} failed: {e}");
                if self.failure_policy == FailurePolicy::FailClosed {
                    return Outcome::error(self.store_down());
                }
                match self.quota.admit_local(subject, period, limit) {
                    LocalAdmission::Admitted { used, source } => (used, source),
                    LocalAdmission::Exhausted { used } => return exceeded(used),
                    LocalAdmission::Refused => return Outcome::error(self.store_down()),
                }
            }
        };

        let second = crate::clock::unix_secs(now);
        let made: Result<Bytes, crate::sign::PresignError> = self.answers.get_or_make(
            catalog.version,
            track.encoded_key.as_ptr() as usize,
            second,
            || {
                let url = self.presigner.presign(&track.encoded_key, now)?;
                Ok(success_body(&track.title_json, &url, track.duration_sec))
            },
        );
        let body = match made {
            Ok(body) => body,
            Err(e) => {
                log::warn!("presign failed for library {library}: {e}");
                self.quota.refund(subject, period, source);
                return Outcome {
                    result: Err(ApiError::PresignFailed),
                    rate: rate(used.saturating_sub(1)),
                };
            }
        };
        self.key_calls.count(caller);
        Outcome {
            result: Ok(body),
            rate: rate(used),
        }
    }
}

/// `{"code":0,"msg":"ok","data":{…}}`, from the title already encoded as a JSON string (see
/// [`crate::catalog::Track::title_json`]) and a URL, which needs no escaping when it holds no
/// quote, backslash or control character — true of every presigned URL.
pub fn success_body(title_json: &str, url: &str, duration_sec: u32) -> Bytes {
    let plain = url.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    let escaped;
    let url_json = if plain {
        url
    } else {
        escaped = serde_json::to_string(url).unwrap_or_default();
        &escaped[1..escaped.len() - 1]
    };
    let mut body = Vec::with_capacity(64 + title_json.len() + url_json.len());
    body.extend_from_slice(br#"{"code":0,"msg":"ok","data":{"title":"#);
    body.extend_from_slice(title_json.as_bytes());
    body.extend_from_slice(br#","url":""#);
    body.extend_from_slice(url_json.as_bytes());
    body.extend_from_slice(br#"","duration_sec":"#);
    body.extend_from_slice(duration_sec.to_string().as_bytes());
    body.extend_from_slice(b"}}");
    Bytes::from(body)
}

/// Rows 7–8: the body must be one JSON object without repeated keys anywhere, whose
/// `library` is a non-empty string.
pub fn parse_request(body: &[u8]) -> Result<Cow<'_, str>, ApiError> {
    match plain_request(body) {
        Some(name) => Ok(Cow::Borrowed(name)),
        None => parse_any(body).map(Cow::Owned),
    }
}

/// [`parse_request`] for any body, through serde.
fn parse_any(body: &[u8]) -> Result<String, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let library = RequestSeed
        .deserialize(&mut de)
        .map_err(|_| ApiError::InvalidJson)?;
    de.end().map_err(|_| ApiError::InvalidJson)?;
    match library {
        Some(LibraryField::Name(name)) if !name.is_empty() => Ok(name),
        _ => Err(ApiError::MissingLibrary),
    }
}

/// The body every client sends, `{"library":"audio.focus"}` (whitespace allowed where JSON
/// allows it), read without serde: the name borrowed, no allocation. Only a name of printable
/// ASCII without escapes qualifies, whose JSON text is the name itself; any other body, valid
/// or not, is left to the full parser, so both give the same answer for every body.
fn plain_request(body: &[u8]) -> Option<&str> {
    fn skip_ws(b: &[u8]) -> &[u8] {
        let n = b
            .iter()
            .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
        &b[n..]
    }
    let rest = skip_ws(body).strip_prefix(b"{")?;
    let rest = skip_ws(rest).strip_prefix(b"\"library\"")?;
    let rest = skip_ws(rest).strip_prefix(b":")?;
    let rest = skip_ws(rest).strip_prefix(b"\"")?;
    let len = rest.iter().position(|&c| c == b'"')?;
    let (name, rest) = rest.split_at(len);
    let plain = !name.is_empty()
        && name
            .iter()
            .all(|&c| (b' '..=b'~').contains(&c) && c != b'\\');
    let rest = skip_ws(&rest[1..]).strip_prefix(b"}")?;
    if !plain || !skip_ws(rest).is_empty() {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// The `library` member as found.
enum LibraryField {
    Name(String),
    NotAString,
}

/// Reads the top-level object, keeping `library` and checking every other member.
struct RequestSeed;

impl<'de> DeserializeSeed<'de> for RequestSeed {
    type Value = Option<LibraryField>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed {
    type Value = Option<LibraryField>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut library = None;
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom("repeated key"));
            }
            if key == "library" {
                library = Some(map.next_value_seed(LibrarySeed)?);
            } else {
                map.next_value_seed(NoRepeats)?;
            }
            seen.push(key);
        }
        Ok(library)
    }
}

struct LibrarySeed;

impl<'de> DeserializeSeed<'de> for LibrarySeed {
    type Value = LibraryField;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LibrarySeed {
    type Value = LibraryField;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(LibraryField::Name(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(LibraryField::Name(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(LibraryField::NotAString)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(LibraryField::NotAString)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(LibraryField::NotAString)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(LibraryField::NotAString)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(LibraryField::NotAString)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        NoRepeats.visit_seq(seq).map(|_| LibraryField::NotAString)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        NoRepeats.visit_map(map).map(|_| LibraryField::NotAString)
    }
}

/// Walks any JSON value and fails on a repeated key in any object inside it (serde's
/// `IgnoredAny` would skip over them).
struct NoRepeats;

impl<'de> DeserializeSeed<'de> for NoRepeats {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoRepeats {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoRepeats)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom("repeated key"));
            }
            map.next_value_seed(NoRepeats)?;
            seen.push(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_table() {
        let ok = |body: &str, want: &str| {
            assert_eq!(
                parse_request(body.as_bytes()).as_deref(),
                Ok(want),
                "{body}"
            )
        };
        ok(r#"{"library":"audio.focus"}"#, "audio.focus");
        ok(
            r#" {"library" : "audio.focus", "extra": [1, {"a": null}]} "#,
            "audio.focus",
        );
        ok(r#"{"library":"audio.\u0066ocus"}"#, "audio.focus");
        ok(r#"{"library":"audio.unknown"}"#, "audio.unknown");

        for bad in [
            "",
            " ",
            "{",
            "not json",
            r#"{"library":"audio.focus"} trailing"#,
            r#"{"library":"audio.focus"}{}"#,
            r#"["audio.focus"]"#,
            r#""audio.focus""#,
            "null",
            "42",
            r#"{"library":"a","library":"b"}"#,
            r#"{"library":"a","x":{"k":1,"k":2}}"#,
            r#"{"x":[{"k":1,"k":2}],"library":"a"}"#,
            r#"{"library":{"k":1,"k":2}}"#,
            "{\"library\":\"\u{0}\"",
        ] {
            assert_eq!(
                parse_request(bad.as_bytes()),
                Err(ApiError::InvalidJson),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_request(b"{\"library\":\"\xff\"}"),
            Err(ApiError::InvalidJson)
        );

        for missing in [
            "{}",
            r#"{"lib":"audio.focus"}"#,
            r#"{"library":null}"#,
            r#"{"library":""}"#,
            r#"{"library":7}"#,
            r#"{"library":true}"#,
            r#"{"library":["audio.focus"]}"#,
            r#"{"library":{"name":"audio.focus"}}"#,
            r#"{"Library":"audio.focus"}"#,
        ] {
            assert_eq!(
                parse_request(missing.as_bytes()),
                Err(ApiError::MissingLibrary),
                "{missing}"
            );
        }
    }

    #[test]
    fn what_clients_send_takes_the_plain_path() {
        for body in [
            r#"{"library":"audio.focus"}"#,
            r#"{"library": "audio.focus"}"#,
            "{\n  \"library\" : \"audio.focus\"\n}\n",
            r#"{"library":"a b~!"}"#,
        ] {
            let plain = plain_request(body.as_bytes());
            assert!(plain.is_some(), "{body:?}");
            assert_eq!(plain.map(str::to_string), parse_any(body.as_bytes()).ok());
        }
    }

    proptest::proptest! {
        /// Bodies shaped like a client's, each part drawn from near misses (whitespace JSON
        /// does and does not allow, escapes, quotes, control and non-ASCII characters, other
        /// members): wherever the plain path answers, serde answers the same.
        #[test]
        fn the_plain_path_agrees_with_serde(
            parts in proptest::collection::vec(0usize..16, 11),
            name in proptest::collection::vec(0usize..NAME.len(), 0..6),
        ) {
            // Mostly the well-formed option (the first), so that many bodies reach the end.
            let pick = |i: usize, options: &[&'static str]| match parts[i] {
                0..13 => options[0],
                n => options[n % options.len()],
            };
            let ws = ["", " ", "\n\t\r ", "\u{c}", "\u{a0}"];
            let body = [
                pick(0, &ws), pick(1, &["{", "[", "{\"x\":1,"]), pick(2, &ws),
                pick(3, &["\"library\"", "\"Library\"", "\"libr\\u0061ry\""]), pick(4, &ws),
                pick(5, &[":", "=", ": "]), pick(6, &ws), pick(7, &["\"", "'"]),
                &name.iter().map(|&i| NAME[i]).collect::<String>(),
                pick(8, &["\"", "\"\""]), pick(9, &ws), pick(10, &["}", "}}", ",\"x\":1}", "} x"]),
            ]
            .concat();
            if let Some(plain) = plain_request(body.as_bytes()) {
                proptest::prop_assert_eq!(Ok(plain.to_string()), parse_any(body.as_bytes()), "{:?}", body);
            }
        }
    }

    const NAME: &[&str] = &[
        "audio.focus",
        " ",
        "~",
        "\\",
        "\\u0066",
        "\\\"",
        "\u{0}",
        "\u{1f}",
        "\u{7f}",
        "é",
        "\t",
    ];

    #[test]
    fn success_body_shape() {
        let title = serde_json::to_string("T \"q\" é\n").unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&success_body(&title, "https://x/y?z=1&w", 240)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code":0,"msg":"ok","data":{"title":"T \"q\" é\n","url":"https://x/y?z=1&w","duration_sec":240}})
        );
        // A URL that would need escaping still yields valid JSON.
        let odd = success_body(&title, "https://x/\"\\\u{1}", 1);
        let v: serde_json::Value = serde_json::from_slice(&odd).unwrap();
        assert_eq!(v["data"]["url"], "https://x/\"\\\u{1}");
    }
}
