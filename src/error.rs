//! The error table of SPEC §2 in one place: every status, code and message a client can see.

use bytes::Bytes;
use serde::Serialize;

/// Every failure a client can be told about. Status, code and message live only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The route exists but not for this method; `allow` is the `Allow` header's value.
    MethodNotAllowed {
        allow: &'static str,
    },
    MissingAuth,
    InvalidKeyFormat,
    InvalidKey,
    PayloadTooLarge {
        limit: usize,
    },
    InvalidJson,
    MissingLibrary,
    LibraryNotFound(String),
    NoAudioItems(String),
    QuotaExceeded {
        limit: u64,
        reset_at: String,
        retry_after: u64,
    },
    /// Row 5b, and quota that is momentarily out of reach (held by other nodes, or a key
    /// too busy to wait for): retry in a second.
    RateLimited,
    PresignFailed,
    ServiceUnavailable {
        retry_after: u64,
    },
    NotFound,
    /// The request headers exceed the configured total size.
    HeadersTooLarge,
    /// The request could not be parsed as HTTP (bad framing, bad chunk sizes).
    BadRequest,
    /// The upstream could not be reached or failed mid-response.
    BadGateway,
    /// A bug. The detail goes to the log, never to the client.
    Internal,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed { .. } => 405,
            Self::MissingAuth | Self::InvalidKeyFormat | Self::InvalidKey => 401,
            Self::PayloadTooLarge { .. } => 413,
            Self::InvalidJson | Self::MissingLibrary | Self::BadRequest => 400,
            Self::LibraryNotFound(_) | Self::NoAudioItems(_) | Self::NotFound => 404,
            Self::QuotaExceeded { .. } | Self::RateLimited => 429,
            Self::PresignFailed | Self::ServiceUnavailable { .. } => 503,
            Self::HeadersTooLarge => 431,
            Self::BadGateway => 502,
            Self::Internal => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::MissingAuth => "MISSING_AUTH",
            Self::InvalidKeyFormat => "INVALID_KEY_FORMAT",
            Self::InvalidKey => "INVALID_KEY",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::InvalidJson => "INVALID_JSON",
            Self::MissingLibrary => "MISSING_LIBRARY",
            Self::LibraryNotFound(_) => "LIBRARY_NOT_FOUND",
            Self::NoAudioItems(_) => "NO_AUDIO_ITEMS",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::RateLimited => "RATE_LIMITED",
            Self::PresignFailed => "PRESIGN_FAILED",
            Self::ServiceUnavailable { .. } => "SERVICE_UNAVAILABLE",
            Self::NotFound => "NOT_FOUND",
            Self::BadRequest => "BAD_REQUEST",
            Self::HeadersTooLarge => "HEADERS_TOO_LARGE",
            Self::BadGateway => "BAD_GATEWAY",
            Self::Internal => "INTERNAL_ERROR",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::MethodNotAllowed { allow } => format!("Method not allowed; allowed: {allow}"),
            Self::MissingAuth => {
                "Authorization header is missing or malformed; expected 'Bearer <key>'".into()
            }
            Self::InvalidKeyFormat => {
                "API key does not match the expected format (alp_ followed by 32 letters or digits)"
                    .into()
            }
            Self::InvalidKey => "API key is invalid, inactive, or revoked".into(),
            Self::PayloadTooLarge { limit } => {
                format!("Request body is larger than {limit} bytes")
            }
            Self::InvalidJson => "Request body is not a valid JSON object".into(),
            Self::MissingLibrary => {
                "The 'library' field is missing or not a non-empty string".into()
            }
            Self::LibraryNotFound(name) => format!("Library '{name}' not found"),
            Self::NoAudioItems(name) => format!("Library '{name}' has no active audio items"),
            Self::QuotaExceeded {
                limit, reset_at, ..
            } => {
                format!("Monthly quota of {limit} calls reached; it resets at {reset_at}")
            }
            Self::RateLimited => "Too many calls right now; retry in a second".into(),
            Self::PresignFailed => "Temporary URL could not be generated".into(),
            Self::ServiceUnavailable { .. } => {
                "Service temporarily unavailable; retry later".into()
            }
            Self::NotFound => "No such route".into(),
            Self::BadRequest => "Malformed HTTP request".into(),
            Self::HeadersTooLarge => "Request headers are too large".into(),
            Self::BadGateway => "The upstream could not be reached".into(),
            Self::Internal => "An unexpected server error occurred".into(),
        }
    }

    /// `Retry-After` seconds, for the errors that carry one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::QuotaExceeded { retry_after, .. } | Self::ServiceUnavailable { retry_after } => {
                Some(*retry_after)
            }
            Self::RateLimited => Some(1),
            _ => None,
        }
    }

    /// The JSON body: `{"error": …, "code": …}`, plus `limit` and `reset_at` on 429.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Body<'a> {
            error: String,
            code: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            limit: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reset_at: Option<&'a str>,
        }
        let (limit, reset_at) = match self {
            Self::QuotaExceeded {
                limit, reset_at, ..
            } => (Some(*limit), Some(reset_at.as_str())),
            _ => (None, None),
        };
        let body = Body {
            error: self.message(),
            code: self.code(),
            limit,
            reset_at,
        };
        // Serialising a struct of strings and integers cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shapes() {
        let v: serde_json::Value =
            serde_json::from_slice(&ApiError::LibraryNotFound("audio.unknown".into()).body())
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":"Library 'audio.unknown' not found","code":"LIBRARY_NOT_FOUND"})
        );
        let e = ApiError::QuotaExceeded {
            limit: 5,
            reset_at: "2026-12-01T00:00:00Z".into(),
            retry_after: 10,
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["limit"], 5);
        assert_eq!(v["reset_at"], "2026-12-01T00:00:00Z");
        assert_eq!(v["code"], "QUOTA_EXCEEDED");
        assert_eq!(e.retry_after(), Some(10));
        let v: serde_json::Value = serde_json::from_slice(&ApiError::RateLimited.body()).unwrap();
        assert_eq!(v["code"], "RATE_LIMITED");
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        assert_eq!(ApiError::RateLimited.retry_after(), Some(1));
    }

    #[test]
    fn names_injected_library_safely() {
        let e = ApiError::LibraryNotFound("a\"b\\c".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"], "Library 'a\"b\\c' not found");
    }
}
