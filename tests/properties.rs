//! Property tests of two pure functions against references: the `/v1/audio` body parser
//! against serde_json's own verdict, and the presigner's fast path against aws-sigv4's
//! general `sign()` on random credentials, locations, lifetimes, times and object keys.

use std::time::{Duration, UNIX_EPOCH};

use audiolib::api::parse_request;
use audiolib::error::ApiError;
use audiolib::sign::{Credentials, Presigner, S3Location, encode_key};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any JSON value, a few levels deep, with keys that sometimes are `library`.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![Just("library".to_string()), "[a-z\u{e9}]{0,6}"],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// What the spec says a body parsed as `value` (no repeated keys) must give.
fn verdict(value: &Value) -> Result<String, ApiError> {
    match value {
        Value::Object(map) => match map.get("library") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(ApiError::MissingLibrary),
        },
        _ => Err(ApiError::InvalidJson),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Every JSON text without repeated keys, compact or pretty, gets the verdict its value
    /// implies.
    #[test]
    fn body_parser_agrees_with_serde_json_on_json(value in json_value(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            serde_json::to_string(&value).unwrap()
        };
        prop_assert_eq!(parse_request(text.as_bytes()).map(String::from), verdict(&value), "{}", text);
    }

    /// Any bytes: what serde_json refuses is INVALID_JSON; what it accepts gets the verdict
    /// of its value, or INVALID_JSON when a key repeats (serde_json keeps the last).
    #[test]
    fn body_parser_agrees_with_serde_json_on_bytes(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "[{}\\[\\]\":,a-z0-9 \\\\ln\u{fc}]{0,40}".prop_map(String::into_bytes),
        ]
    ) {
        let ours = parse_request(&bytes).map(String::from);
        match serde_json::from_slice::<Value>(&bytes) {
            Err(_) => prop_assert_eq!(ours, Err(ApiError::InvalidJson)),
            Ok(value) => {
                let reserialised = serde_json::to_vec(&value).unwrap();
                let repeats = reserialised.len() < bytes.iter().filter(|b| !b.is_ascii_whitespace()).count()
                    && ours == Err(ApiError::InvalidJson);
                prop_assert!(repeats || ours == verdict(&value), "{:?}: {:?}", String::from_utf8_lossy(&bytes), ours);
            }
        }
    }

    /// A repeated key at any depth is refused, whatever else the body holds.
    #[test]
    fn body_parser_refuses_a_repeated_key(value in json_value(), key in "[a-z]{1,6}", depth in 0usize..3) {
        let mut text = format!("{{\"{key}\":1,\"{key}\":2}}");
        for _ in 0..depth {
            text = format!("{{\"library\":\"a\",\"x\":[{text}]}}");
        }
        let text = format!("[{text},{}]", serde_json::to_string(&value).unwrap());
        // Wrapped in an array so the top level is not an object either way, then as the
        // object itself.
        prop_assert_eq!(parse_request(text.as_bytes()), Err(ApiError::InvalidJson));
        let inner = &text[1..text.len() - serde_json::to_string(&value).unwrap().len() - 2];
        prop_assert_eq!(parse_request(inner.as_bytes()), Err(ApiError::InvalidJson), "{}", inner);
    }
}

fn location() -> impl Strategy<Value = S3Location> {
    (
        prop_oneof![Just("http"), Just("https")],
        "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9-]{1,10}){0,3}",
        prop::option::of(1u16..),
        "[a-z0-9][a-z0-9.-]{1,40}[a-z0-9]",
        "[a-z]{2}-[a-z]{3,9}-[1-9]",
        any::<bool>(),
    )
        .prop_map(
            |(scheme, host, port, bucket, region, path_style)| S3Location {
                scheme: scheme.into(),
                endpoint_authority: match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                },
                bucket,
                region,
                path_style,
            },
        )
}

fn credentials() -> impl Strategy<Value = Credentials> {
    (
        "[A-Z0-9]{16,24}",
        "[ -~]{1,64}",
        prop::option::of("[A-Za-z0-9+/=]{16,200}"),
    )
        .prop_map(
            |(access_key_id, secret_access_key, session_token)| Credentials {
                access_key_id,
                secret_access_key,
                session_token,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// The fast path's URL is byte for byte the one `sign()` makes, for random keys and
    /// settings (botocore's own comparison is in tests/signing.rs).
    #[test]
    fn presigner_matches_sign(
        location in location(),
        credentials in credentials(),
        ttl in 1u64..=604_800,
        secs in 0u64..4_102_444_800,
        key in prop_oneof!["\\PC{1,40}", "[a-z/ +&=~%?#.]{1,30}"],
    ) {
        let presigner = Presigner::new(location, Some(credentials), Duration::from_secs(ttl));
        let now = UNIX_EPOCH + Duration::from_secs(secs);
        let encoded = encode_key(&key);
        let fast = presigner.presign(&encoded, now);
        prop_assert!(fast.is_ok(), "{:?}", fast);
        prop_assert_eq!(fast, presigner.presign_with_sign(&encoded, now));
    }
}
