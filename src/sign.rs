//! Presigned S3 GET URLs, AWS Signature Version 4 in the query string (SPEC §6).
//!
//! S3 wants the object key percent-encoded exactly once and the path left un-normalised
//! (`//` and `.` segments are part of a key). [`Presigner::presign`] builds the canonical
//! request from a template prepared at start-up and signs it with `aws-sigv4`'s own
//! `generate_signing_key` (cached for the UTC day) and `calculate_signature`; the output is
//! byte-identical to botocore's `generate_presigned_url`, which the tests check.
//! [`Presigner::presign_with_sign`] goes through the crate's general `sign()` and serves as
//! the reference the fast path is tested and benchmarked against.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_sigv4::http_request::{
    PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

/// SigV4 URI encoding: everything but `A-Z a-z 0-9 - _ . ~` is escaped.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// The same in a path, where `/` separates segments and stays.
const PATH: &AsciiSet = &QUERY_VALUE.remove(b'/');

/// S3 caps presigned URLs at seven days.
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;

/// Percent-encodes an object key for a URL path, once, as botocore does.
pub fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, PATH).to_string()
}

fn encode_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// Where objects live: the parts of the URL that do not change per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` of the endpoint, the port only when it is not the scheme's default.
    pub endpoint_authority: String,
    pub bucket: String,
    pub region: String,
    pub path_style: bool,
}

impl S3Location {
    /// The Host header and URL authority: `bucket.endpoint` in virtual-host style.
    pub fn authority(&self) -> String {
        if self.path_style {
            self.endpoint_authority.clone()
        } else {
            format!("{}.{}", self.bucket, self.endpoint_authority)
        }
    }

    /// What comes between the authority and the encoded key.
    fn path_prefix(&self) -> String {
        if self.path_style {
            format!("/{}/", encode_key(&self.bucket))
        } else {
            "/".to_string()
        }
    }
}

/// Signing credentials (SPEC §7: from the environment or the config).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresignError {
    #[error("no signing credentials configured")]
    NoCredentials,
    #[error("no bucket configured")]
    NoBucket,
    #[error("signer: {0}")]
    Signer(String),
}

/// Everything fixed per configuration, prepared once.
struct Template {
    location: S3Location,
    credentials: Credentials,
    /// `scheme://authority/[bucket/]`
    url_prefix: String,
    /// `/[bucket/]`, the canonical URI before the key.
    path_prefix: String,
    authority: String,
    /// `ACCESS_KEY%2F`, the start of the credential parameter.
    credential_prefix: String,
    /// `%2F<region>%2Fs3%2Faws4_request`
    credential_suffix: String,
    /// `&X-Amz-Security-Token=<encoded>` or empty.
    token_param: String,
    ttl_secs: u64,
}

/// The day's signing key: it depends only on the secret, date, region and service.
struct DayKey {
    date: String,
    key: [u8; 32],
}

/// Produces presigned GET URLs.
pub struct Presigner {
    template: Result<Template, PresignError>,
    day_key: ArcSwapOption<DayKey>,
}

impl Presigner {
    /// A presigner for `location`; without credentials or a bucket every call fails with a
    /// [`PresignError`], which the API answers as 503 PRESIGN_FAILED.
    pub fn new(location: S3Location, credentials: Option<Credentials>, ttl: Duration) -> Self {
        let template = match credentials {
            None => Err(PresignError::NoCredentials),
            Some(_) if location.bucket.is_empty() => Err(PresignError::NoBucket),
            Some(credentials) => {
                let authority = location.authority();
                let path_prefix = location.path_prefix();
                Ok(Template {
                    url_prefix: format!("{}://{}{}", location.scheme, authority, path_prefix),
                    credential_prefix: format!("{}%2F", encode_value(&credentials.access_key_id)),
                    credential_suffix: format!(
                        "%2F{}%2Fs3%2Faws4_request",
                        encode_value(&location.region)
                    ),
                    token_param: credentials
                        .session_token
                        .as_deref()
                        .map(|t| format!("&X-Amz-Security-Token={}", encode_value(t)))
                        .unwrap_or_default(),
                    ttl_secs: ttl.as_secs(),
                    path_prefix,
                    authority,
                    location,
                    credentials,
                })
            }
        };
        Self {
            template,
            day_key: ArcSwapOption::empty(),
        }
    }

    pub fn is_configured(&self) -> bool {
        self.template.is_ok()
    }

    fn signing_key(&self, t: &Template, date: &str, now: SystemTime) -> Arc<DayKey> {
        if let Some(k) = self.day_key.load_full().filter(|k| k.date == date) {
            return k;
        }
        let raw = generate_signing_key(
            &t.credentials.secret_access_key,
            now,
            &t.location.region,
            "s3",
        );
        let mut key = [0u8; 32];
        key.copy_from_slice(raw.as_ref());
        let fresh = Arc::new(DayKey {
            date: date.to_string(),
            key,
        });
        self.day_key.store(Some(fresh.clone()));
        fresh
    }

    /// A presigned GET URL for an already-encoded object key (see [`encode_key`]), valid
    /// from `now` for the configured lifetime.
    pub fn presign(&self, encoded_key: &str, now: SystemTime) -> Result<String, PresignError> {
        let t = self.template.as_ref().map_err(Clone::clone)?;
        let stamp_bytes = amz_date(now);
        // Only ASCII digits and 'T'/'Z' ever go in.
        let stamp = std::str::from_utf8(&stamp_bytes).unwrap_or("19700101T000000Z");
        let date = &stamp[..8];
        let day_key = self.signing_key(t, date, now);

        // The query before the signature, in botocore's order; its canonical form sorts the
        // token before SignedHeaders.
        let mut head = String::with_capacity(256 + t.token_param.len());
        head.push_str("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=");
        head.push_str(&t.credential_prefix);
        head.push_str(date);
        head.push_str(&t.credential_suffix);
        head.push_str("&X-Amz-Date=");
        head.push_str(stamp);
        head.push_str("&X-Amz-Expires=");
        let _ = write!(head, "{}", t.ttl_secs);

        let mut canonical = String::with_capacity(
            64 + t.path_prefix.len() + encoded_key.len() + head.len() + t.authority.len(),
        );
        canonical.push_str("GET\n");
        canonical.push_str(&t.path_prefix);
        canonical.push_str(encoded_key);
        canonical.push('\n');
        canonical.push_str(&head);
        canonical.push_str(&t.token_param);
        canonical.push_str("&X-Amz-SignedHeaders=host\nhost:");
        canonical.push_str(&t.authority);
        canonical.push_str("\n\nhost\nUNSIGNED-PAYLOAD");

        let mut to_sign = String::with_capacity(160);
        to_sign.push_str("AWS4-HMAC-SHA256\n");
        to_sign.push_str(stamp);
        to_sign.push('\n');
        to_sign.push_str(date);
        to_sign.push('/');
        to_sign.push_str(&t.location.region);
        to_sign.push_str("/s3/aws4_request\n");
        push_hex(&mut to_sign, &Sha256::digest(canonical.as_bytes()));
        let signature = calculate_signature(day_key.key, to_sign.as_bytes());

        let mut url = String::with_capacity(
            t.url_prefix.len() + encoded_key.len() + head.len() + t.token_param.len() + 120,
        );
        url.push_str(&t.url_prefix);
        url.push_str(encoded_key);
        url.push('?');
        url.push_str(&head);
        url.push_str("&X-Amz-SignedHeaders=host");
        url.push_str(&t.token_param);
        url.push_str("&X-Amz-Signature=");
        url.push_str(&signature);
        Ok(url)
    }

    /// The same URL through `aws_sigv4::http_request::sign()` with S3's settings. Slower
    /// (it re-derives the signing key and parses the URL every time); kept as the reference.
    pub fn presign_with_sign(
        &self,
        encoded_key: &str,
        now: SystemTime,
    ) -> Result<String, PresignError> {
        let t = self.template.as_ref().map_err(Clone::clone)?;
        let c = &t.credentials;
        let identity = aws_credential_types::Credentials::new(
            &c.access_key_id,
            &c.secret_access_key,
            c.session_token.clone(),
            None,
            "audiolib",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(Duration::from_secs(t.ttl_secs));
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&t.location.region)
            .name("s3")
            .time(now)
            .settings(settings)
            .build()
            .map_err(|e| PresignError::Signer(e.to_string()))?
            .into();
        let base = format!("{}{}", t.url_prefix, encoded_key);
        let request = SignableRequest::new(
            "GET",
            base.as_str(),
            std::iter::once(("host", t.authority.as_str())),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| PresignError::Signer(e.to_string()))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| PresignError::Signer(e.to_string()))?
            .into_parts();
        // botocore's parameter order, so the two URLs can be compared byte for byte.
        const ORDER: [&str; 7] = [
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Security-Token",
            "X-Amz-Signature",
        ];
        let mut url = base;
        let mut sep = '?';
        for name in ORDER {
            if let Some((_, value)) = instructions.params().iter().find(|(n, _)| *n == name) {
                let _ = write!(url, "{sep}{name}={}", encode_value(value));
                sep = '&';
            }
        }
        Ok(url)
    }
}

/// `YYYYMMDDTHHMMSSZ` in UTC. Formatted once per second per thread: a URL is signed on
/// every request and the stamp changes only once a second.
fn amz_date(t: SystemTime) -> [u8; 16] {
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; 16])> = const { std::cell::Cell::new((u64::MAX, [0; 16])) };
    }
    let secs = crate::clock::unix_secs(t);
    LAST.with(|last| {
        let (cached_secs, stamp) = last.get();
        if cached_secs == secs {
            return stamp;
        }
        let mut stamp = [0u8; 16];
        let text = DateTime::<Utc>::from(t)
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        stamp.copy_from_slice(&text.as_bytes()[..16]);
        last.set((secs, stamp));
        stamp
    })
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn presigner(path_style: bool, token: Option<&str>) -> Presigner {
        Presigner::new(
            S3Location {
                scheme: "http".into(),
                endpoint_authority: "127.0.0.1:9000".into(),
                bucket: "media".into(),
                region: "eu-west-1".into(),
                path_style,
            },
            Some(Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
                session_token: token.map(str::to_string),
            }),
            Duration::from_secs(900),
        )
    }

    #[test]
    fn encodes_keys_like_botocore() {
        assert_eq!(
            encode_key("a b/+&=~//é.mp3"),
            "a%20b/%2B%26%3D~//%C3%A9.mp3"
        );
        assert_eq!(encode_key("plain/file-1_2.mp3"), "plain/file-1_2.mp3");
        assert_eq!(encode_key("100%.mp3"), "100%25.mp3");
    }

    #[test]
    fn fast_path_matches_the_crates_sign() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        for style in [true, false] {
            for token in [None, Some("tok/en+=")] {
                let p = presigner(style, token);
                for key in ["plain.mp3", "a b/+&=~//é.mp3", "./x/../y"] {
                    let k = encode_key(key);
                    assert_eq!(p.presign(&k, now), p.presign_with_sign(&k, now), "{key}");
                }
            }
        }
    }

    #[test]
    fn signing_key_is_rederived_when_the_day_changes() {
        let p = presigner(true, None);
        let day1 = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let day2 = day1 + Duration::from_secs(86_400);
        let _ = p.presign("a", day1).unwrap();
        assert_eq!(p.presign("a", day2), p.presign_with_sign("a", day2));
    }

    #[test]
    fn unconfigured_presigner_fails_cleanly() {
        let loc = S3Location {
            scheme: "https".into(),
            endpoint_authority: "s3.us-east-1.amazonaws.com".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            path_style: false,
        };
        let p = Presigner::new(loc.clone(), None, Duration::from_secs(60));
        assert_eq!(
            p.presign("a", SystemTime::now()),
            Err(PresignError::NoCredentials)
        );
        let creds = Credentials {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        };
        let no_bucket = S3Location {
            bucket: String::new(),
            ..loc
        };
        let p = Presigner::new(no_bucket, Some(creds), Duration::from_secs(60));
        assert_eq!(
            p.presign("a", SystemTime::now()),
            Err(PresignError::NoBucket)
        );
    }
}
