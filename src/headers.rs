//! Adding headers to what passes through, at the cost of a map insert.
//!
//! Pingora's own `insert_header` parses the name again, keeps a second map for the sender's
//! letter case, and grows both maps: a parsed head's maps are sized to the headers it came
//! with, and the copy of a request Pingora hands to `upstream_request_filter` has no room at
//! all. Each header added so cost some 2 k instructions; on a response it could also leave the
//! map full, so that Pingora's own `Date` and `Connection` inserts, made after ours, grew both
//! maps again. Passthrough adds four such headers (the request id both ways and the two
//! forwarding headers), which were most of its cost above plain Pingora.
//!
//! Here a head is taken apart, its one map given room once and edited by constant names, and
//! it is put back without the case map. Names then go out as Pingora writes them for every
//! HTTP/2 peer: standard ones in their usual case (`Content-Type`), others in lower case.
//! HTTP/1.1 header names are case-insensitive (RFC 9110 §5.1), and an origin already sees
//! every HTTP/2 client's request so. Everything else a head carries is kept: method, target
//! (also one the URI does not reproduce: absolute-form, or not UTF-8), version, status,
//! reason phrase, extensions, header order and repeated headers.

use http::HeaderMap;
use pingora::Result;
use pingora::http::{RequestHeader, ResponseHeader};

/// Edits the headers of a request about to go upstream, with room for `extra` more.
pub fn edit_request(
    req: &mut RequestHeader,
    extra: usize,
    edit: impl FnOnce(&mut HeaderMap),
) -> Result<()> {
    let uri_target = req.uri.path_and_query().map(|pq| pq.as_str().as_bytes());
    let raw = (uri_target != Some(req.raw_path())).then(|| req.raw_path().to_vec());
    let end_stream = req.send_end_stream();
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts: http::request::Parts = std::mem::replace(req, empty).into();
    parts.headers.reserve(extra);
    edit(&mut parts.headers);
    *req = RequestHeader::from(parts);
    if let Some(raw) = raw {
        req.set_raw_path(&raw)?;
    }
    if let Some(end_stream) = end_stream {
        req.set_send_end_stream(end_stream);
    }
    Ok(())
}

/// Edits the headers of a response about to go to the client, with room for `extra` more
/// and for the two Pingora sets after us (`Date` and `Connection`).
pub fn edit_response(
    resp: &mut ResponseHeader,
    extra: usize,
    edit: impl FnOnce(&mut HeaderMap),
) -> Result<()> {
    let reason = resp.get_reason_phrase();
    let reason = (reason != resp.status.canonical_reason()).then(|| reason.map(str::to_owned));
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, empty).into();
    parts.headers.reserve(extra + 2);
    edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    if let Some(reason) = reason {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn added(headers: &mut HeaderMap) {
        headers.insert("x-added", HeaderValue::from_static("yes"));
    }

    /// A head's header lines as Pingora writes them on HTTP/1.1.
    fn wire(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut buf = Vec::new();
        write(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    const LINES: &str =
        "Content-Type: text/plain\r\nx-custom: a\r\nx-custom: b\r\nx-added: yes\r\n";

    #[test]
    fn an_edited_request_keeps_its_target_method_version_and_headers() {
        for target in [
            &b"/static/a%20b?x=1&y=%2F"[..],
            b"http://origin.example/abs?q=1",
            b"/caf\xc3\xa9/\xff",
            b"*",
        ] {
            let mut req = RequestHeader::build("PUT", target, None).unwrap();
            req.append_header("Content-Type", "text/plain").unwrap();
            req.append_header("X-Custom", "a").unwrap();
            req.append_header("x-custom", "b").unwrap();
            req.extensions_mut().insert(7u8);
            let (raw, utf8) = (req.raw_path().to_vec(), req.raw_path_is_utf8());
            edit_request(&mut req, 1, added).unwrap();
            let shown = String::from_utf8_lossy(target);
            assert_eq!(req.raw_path(), raw, "{shown}");
            assert_eq!(req.raw_path_is_utf8(), utf8, "{shown}");
            assert_eq!(req.method, "PUT");
            assert_eq!(req.version, http::Version::HTTP_11);
            assert_eq!(req.extensions.get::<u8>(), Some(&7));
            assert_eq!(wire(|b| req.header_to_h1_wire(b)), LINES, "{shown}");
        }
    }

    #[test]
    fn an_edited_http2_request_keeps_whether_it_ends_with_its_headers() {
        for end_stream in [true, false] {
            let mut req = RequestHeader::build_no_case("POST", b"/upload", None).unwrap();
            req.set_version(http::Version::HTTP_2);
            req.set_send_end_stream(end_stream);
            edit_request(&mut req, 0, |_| {}).unwrap();
            assert_eq!(req.send_end_stream(), Some(end_stream));
        }
    }

    #[test]
    fn an_edited_response_keeps_its_status_reason_and_headers() {
        for (status, reason) in [(200, None), (404, Some("Nowhere")), (299, Some("Odd"))] {
            let mut resp = ResponseHeader::build(status, None).unwrap();
            resp.set_reason_phrase(reason).unwrap();
            resp.append_header("Content-Type", "text/plain").unwrap();
            resp.append_header("X-Custom", "a").unwrap();
            resp.append_header("x-custom", "b").unwrap();
            let before = resp.get_reason_phrase().map(str::to_owned);
            edit_response(&mut resp, 1, added).unwrap();
            assert_eq!(resp.status, status);
            assert_eq!(resp.get_reason_phrase(), before.as_deref());
            assert_eq!(wire(|b| resp.header_to_h1_wire(b)), LINES);
        }
    }

    #[test]
    fn an_edited_response_has_room_for_the_headers_pingora_sets_after_it() {
        let mut resp = ResponseHeader::build(200, Some(5)).unwrap();
        for name in [
            "Server",
            "Date",
            "Content-Type",
            "Content-Length",
            "Connection",
        ] {
            resp.append_header(name, "x").unwrap();
        }
        edit_response(&mut resp, 1, added).unwrap();
        let room = resp.headers.capacity() - resp.headers.len();
        assert!(room >= 2, "room for Date and Connection: {room}");
    }
}
