//! Request ids (SPEC §7b): the client's `X-Request-Id` is kept when it is 1–128 characters
//! of `[A-Za-z0-9._-]`, so a trace started upstream of us continues; anything else (absent,
//! repeated, too long, other characters that could break a log line or a header) is replaced
//! by a generated one. The id goes on every answer, to the upstream and into the access log.

use std::cell::RefCell;

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A constant name: looked up and set without parsing it on every request.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// Whether a client's id may be kept as it is.
pub fn acceptable(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The request's id: the client's single acceptable `X-Request-Id`, else a new one; and
/// whether it is the client's (then the request already carries it, as it is).
pub fn of(headers: &HeaderMap) -> (HeaderValue, bool) {
    let mut sent = headers.get_all(&HEADER).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if acceptable(id.as_bytes()) => (id.clone(), true),
        _ => (generate(), false),
    }
}

thread_local! {
    /// Ids must be unique, not secret: a small generator seeded from the OS once per thread
    /// costs a third of the thread's cryptographic one (`rand::rng()`) per id.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// 128 random bits as 32 lowercase hex digits: unique without coordination between nodes.
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = RNG.with_borrow_mut(|rng| rng.random());
    let mut text = [0u8; 32];
    for (i, c) in text.iter_mut().enumerate() {
        *c = HEX[((bits >> (i * 4)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_ids_are_kept() {
        let long = "a".repeat(128);
        for id in ["a", "abc-123_X.y", "0", long.as_str()] {
            assert!(acceptable(id.as_bytes()), "{id}");
        }
        let too_long = "a".repeat(129);
        for id in [
            "",
            "has space",
            "ü",
            "a/b",
            "a:b",
            "a\tb",
            "a,b",
            too_long.as_str(),
        ] {
            assert!(!acceptable(id.as_bytes()), "{id}");
        }
    }

    #[test]
    fn a_single_acceptable_id_is_kept_else_one_is_generated() {
        let mut headers = HeaderMap::new();
        let (generated, kept) = of(&headers);
        assert_eq!(generated.len(), 32);
        assert!(acceptable(generated.as_bytes()) && !kept);
        assert_ne!(generated, of(&headers).0);

        headers.insert(HEADER, HeaderValue::from_static("trace-1"));
        assert_eq!(of(&headers), (HeaderValue::from_static("trace-1"), true));
        headers.append(HEADER, HeaderValue::from_static("trace-2"));
        let (id, kept) = of(&headers);
        assert!(id.len() == 32 && !kept, "two ids: neither is trusted");
        headers.insert(HEADER, HeaderValue::from_static("not ok"));
        let (id, kept) = of(&headers);
        assert!(id.len() == 32 && !kept);
    }
}
