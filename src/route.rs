//! Which route a request takes (SPEC §7b "One route, however spelled").
//!
//! Our routes are matched on the path as an origin would read it: unreserved characters
//! percent-decoded, repeated slashes collapsed and dot segments removed. Otherwise
//! `/v1/%61udio` or `//v1/audio` would go to the upstream carrying the client's key, and an
//! upstream that normalises paths would serve it as `/v1/audio`. Paths that are not ours pass
//! through exactly as sent.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/audio`, answered by the gateway.
    Audio,
    Healthz,
    Readyz,
    /// Anything else, with an upstream configured.
    Passthrough,
    /// Anything else, without one.
    NotFound,
    /// Refused before routing (an oversized head, a bad request target).
    Rejected,
}

impl Route {
    /// Every route, in the order of [`Route::index`].
    pub const ALL: [Route; 6] = [
        Route::Audio,
        Route::Healthz,
        Route::Readyz,
        Route::Passthrough,
        Route::NotFound,
        Route::Rejected,
    ];

    /// This route's position in [`Route::ALL`], for tables indexed by route.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Routes a request path (without the query).
    pub fn of(path: &str, has_upstream: bool) -> Route {
        match normalize(path).as_ref() {
            "/v1/audio" | "/v1/audio/" => Route::Audio,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            _ if has_upstream => Route::Passthrough,
            _ => Route::NotFound,
        }
    }

    /// The `route` label of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::Audio => "audio",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Passthrough => "passthrough",
            Route::NotFound => "not_found",
            Route::Rejected => "rejected",
        }
    }
}

/// RFC 3986 §2.3: characters whose percent-encoding means the same as the character itself.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The path with unreserved characters decoded, repeated slashes collapsed and dot segments
/// removed (RFC 3986 §5.2.4). Borrowed, with no work beyond one scan, when there is nothing
/// to do, the common case. Reserved characters stay encoded: `%2F` is not a separator.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let plain = bytes
        .windows(2)
        .all(|w| w[0] != b'%' && !(w[0] == b'/' && matches!(w[1], b'/' | b'.')))
        && bytes.last() != Some(&b'%');
    if bytes.first() != Some(&b'/') || plain {
        return Cow::Borrowed(path);
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
            && is_unreserved(hi * 16 + lo)
        {
            decoded.push(hi * 16 + lo);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was replaced by ASCII, so this is still the caller's valid UTF-8.
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Whether a request target holds a control character (below 0x20, or 0x7f), raw or
/// percent-encoded. Both are refused: Pingora percent-encodes raw control bytes before any
/// filter sees the target, so the two cannot be told apart here, and a decoded NUL, CR or LF
/// in a path or query is how truncation and header injection reach an origin.
pub fn has_control_chars(target: &[u8]) -> bool {
    let control = |b: u8| b < 0x20 || b == 0x7f;
    target.iter().enumerate().any(|(i, &b)| {
        control(b)
            || b == b'%'
                && matches!(
                    (target.get(i + 1).copied().and_then(hex), target.get(i + 2).copied().and_then(hex)),
                    (Some(hi), Some(lo)) if control(hi * 16 + lo)
                )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_raw_or_encoded() {
        for target in [
            &b"/a\0b"[..],
            b"/a\rb",
            b"/a\nb",
            b"/a\tb",
            b"/a\x1fb",
            b"/a\x7fb",
            b"/a?q=\x01",
            b"/a%00b",
            b"/a%0d%0Ab",
            b"/a%1F",
            b"/a%7f",
            b"/a?q=x%0a",
        ] {
            assert!(has_control_chars(target), "{}", target.escape_ascii());
        }
        for target in [
            &b"/a%20b"[..],
            b"/a%2Fb",
            b"/%",
            b"/%0",
            b"/%0g",
            b"/a%80",
            b"/\xc3\xbcber",
            b"/a?q=%7E",
        ] {
            assert!(!has_control_chars(target), "{}", target.escape_ascii());
        }
    }

    #[test]
    fn normalisation() {
        for (path, expected) in [
            ("/v1/audio", "/v1/audio"),
            ("/", "/"),
            ("//", "/"),
            ("/v1/audio/", "/v1/audio/"),
            ("//v1/audio", "/v1/audio"),
            ("/v1//audio", "/v1/audio"),
            ("/v1/%61udio", "/v1/audio"),
            ("/v1/%41UDIO", "/v1/AUDIO"),
            ("/%76%31/%61%75%64%69%6f", "/v1/audio"),
            ("/v1/./audio", "/v1/audio"),
            ("/v1/%2e/audio", "/v1/audio"),
            ("/x/../v1/audio", "/v1/audio"),
            ("/../../v1/audio", "/v1/audio"),
            ("/v1/audio/.", "/v1/audio/"),
            ("/v1/audio/..", "/v1/"),
            ("/v1/audio/x/..", "/v1/audio/"),
            ("/v1%2Faudio", "/v1%2Faudio"),
            ("/a%20b/%zz/%4", "/a%20b/%zz/%4"),
            ("/.well-known/x", "/.well-known/x"),
            ("/über/./x", "/über/x"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(path), expected, "{path}");
        }
        assert!(matches!(normalize("/some/plain/path"), Cow::Borrowed(_)));
    }

    proptest::proptest! {
        /// The one-scan check sends to the slow path exactly the paths that hold `%`, `//` or
        /// `/.` (the slow path always answers `Owned`).
        #[test]
        fn only_paths_with_something_to_do_are_rewritten(path in "[/.%a2e]{0,12}") {
            let rewritten = path.starts_with('/')
                && (path.contains('%') || path.contains("//") || path.contains("/."));
            proptest::prop_assert_eq!(matches!(normalize(&path), Cow::Owned(_)), rewritten);
        }
    }

    #[test]
    fn routes_however_spelled() {
        for path in [
            "/v1/audio",
            "/v1/audio/",
            "//v1/audio",
            "/v1/%61udio",
            "/v1/./audio",
            "/x/../v1/audio",
            "/v1/audio/.",
        ] {
            assert_eq!(Route::of(path, true), Route::Audio, "{path}");
        }
        for path in [
            "/v1/audios",
            "/v1/audio/x",
            "/V1/audio",
            "/v1%2Faudio",
            "/v1/audio/..",
        ] {
            assert_eq!(Route::of(path, true), Route::Passthrough, "{path}");
            assert_eq!(Route::of(path, false), Route::NotFound, "{path}");
        }
        assert_eq!(Route::of("//healthz", false), Route::Healthz);
        assert_eq!(Route::of("/readyz", true), Route::Readyz);
    }

    #[test]
    fn labels() {
        let all = [
            Route::Audio,
            Route::Healthz,
            Route::Readyz,
            Route::Passthrough,
            Route::NotFound,
            Route::Rejected,
        ];
        let labels: Vec<_> = all.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "audio",
                "healthz",
                "readyz",
                "passthrough",
                "not_found",
                "rejected"
            ]
        );
    }
}
