//! API keys as the client presents them: the `Authorization` header, the key format (SPEC §2
//! rows 3–4), and how keys are minted and digested (SPEC §3). Pure functions, no I/O.

use std::fmt;

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "alp_";
/// Random characters after the prefix.
pub const KEY_RANDOM_LEN: usize = 32;
/// Characters of the key kept for display (`alp_` + 4): enough to recognise, useless to guess.
pub const DISPLAY_PREFIX_LEN: usize = 8;

/// Extracts the token of `Authorization: Bearer <token>` (row 3).
///
/// The scheme is case-insensitive (RFC 7235); surrounding blanks are tolerated. Several
/// `Authorization` headers are ambiguous and rejected like a malformed one.
pub fn bearer_token<'a, I>(mut values: I) -> Result<&'a str, ApiError>
where
    I: Iterator<Item = &'a [u8]>,
{
    let value = values.next().ok_or(ApiError::MissingAuth)?;
    if values.next().is_some() {
        return Err(ApiError::MissingAuth);
    }
    let value = std::str::from_utf8(value).map_err(|_| ApiError::MissingAuth)?;
    let value = value.trim_matches([' ', '\t']);
    let (scheme, token) = value.split_once([' ', '\t']).ok_or(ApiError::MissingAuth)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::MissingAuth);
    }
    let token = token.trim_start_matches([' ', '\t']);
    if token.is_empty() {
        return Err(ApiError::MissingAuth);
    }
    Ok(token)
}

/// Row 4: `alp_` followed by exactly 32 ASCII letters or digits.
pub fn check_format(token: &str) -> Result<(), ApiError> {
    let ok = token.len() == KEY_PREFIX.len() + KEY_RANDOM_LEN
        && token.starts_with(KEY_PREFIX)
        && token.as_bytes()[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidKeyFormat)
    }
}

/// A freshly minted key. It exists only until it has been shown once.
pub struct NewKey {
    pub secret: String,
    pub digest: KeyDigest,
    pub prefix: String,
}

/// Mints a key from the thread-local CSPRNG (ChaCha, seeded and reseeded from the OS).
pub fn mint_key() -> NewKey {
    let mut rng = rand::rng();
    let mut secret = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_LEN);
    secret.push_str(KEY_PREFIX);
    secret.extend((0..KEY_RANDOM_LEN).map(|_| char::from(rng.sample(Alphanumeric))));
    NewKey {
        digest: KeyDigest::of(&secret),
        prefix: secret[..DISPLAY_PREFIX_LEN].to_string(),
        secret,
    }
}

/// A random identifier for records (`key_` + 16 letters or digits): not secret, just unique.
pub fn new_id(kind: &str) -> String {
    let rng = rand::rng();
    let mut id = String::with_capacity(kind.len() + 17);
    id.push_str(kind);
    id.push('_');
    id.extend(
        rng.sample_iter(Alphanumeric)
            .take(16)
            .map(|b| char::from(b).to_ascii_lowercase()),
    );
    id
}

/// SHA-256 of the whole key: the only form in which a key is kept (SPEC §3).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    pub fn parse_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Result<String, ApiError> {
        bearer_token(values.iter().map(|v| v.as_bytes())).map(str::to_string)
    }

    #[test]
    fn authorization_header_table() {
        let key = "alp_0123456789abcdefABCDEF0123456789";
        let ok = |v: &str| assert_eq!(parse(&[v]).as_deref(), Ok(key), "{v:?}");
        ok(&format!("Bearer {key}"));
        ok(&format!("bearer {key}"));
        ok(&format!("BEARER {key}"));
        ok(&format!("  Bearer   {key}  "));
        ok(&format!("Bearer\t{key}"));
        for bad in [
            "",
            " ",
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Token alp_x",
            "Bearerx alp_1",
        ] {
            assert_eq!(parse(&[bad]), Err(ApiError::MissingAuth), "{bad:?}");
        }
        assert_eq!(parse(&[]), Err(ApiError::MissingAuth));
        assert_eq!(parse(&["Bearer a", "Bearer b"]), Err(ApiError::MissingAuth));
        assert_eq!(
            bearer_token([b"Bearer \xff\xfe".as_slice()].into_iter()),
            Err(ApiError::MissingAuth)
        );
        // A token with inner blanks is a token; its format check fails later.
        assert_eq!(parse(&["Bearer a b"]).as_deref(), Ok("a b"));
    }

    #[test]
    fn key_format_table() {
        let good = "alp_0123456789abcdefABCDEF0123456789";
        assert_eq!(check_format(good), Ok(()));
        for bad in [
            "alp_",
            "alp_0123456789abcdefABCDEF012345678",   // 31
            "alp_0123456789abcdefABCDEF01234567890", // 33
            "ALP_0123456789abcdefABCDEF0123456789",
            "alx_0123456789abcdefABCDEF0123456789",
            "alp_0123456789abcdefABCDEF012345678-",
            "alp_0123456789abcdefABCDEF012345678é",
            "alp_0123456789abcdef ABCDEF012345678",
            "0123456789abcdefABCDEF0123456789",
        ] {
            assert_eq!(
                check_format(bad),
                Err(ApiError::InvalidKeyFormat),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn minted_keys_are_well_formed_and_distinct() {
        let a = mint_key();
        let b = mint_key();
        assert_eq!(check_format(&a.secret), Ok(()));
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.digest, KeyDigest::of(&a.secret));
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), DISPLAY_PREFIX_LEN);
    }

    #[test]
    fn digest_round_trips_through_hex() {
        let d = KeyDigest::of("alp_x");
        assert_eq!(KeyDigest::parse_hex(&d.to_string()), Some(d));
        assert_eq!(
            KeyDigest::of("abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyDigest::parse_hex("zz"), None);
    }
}
