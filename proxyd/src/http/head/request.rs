//! Parsing a request head, checking its target, `Host` and framing, and the head sent upstream.

use super::lines::{cookie_in_fields, field_values};
use super::{
    Framing, HeadError, MAX_HEAD, MAX_HEADERS, has_token, hop_by_hop, is_framing_field,
    map_parse_error, present, push_field, push_length,
};
use crate::http::fields;

/// A complete request head.
#[derive(Debug)]
pub struct RequestHead {
    /// `upstream` starts with the request line: method, space, target, space.
    pub(super) method_len: usize,
    pub(super) target_end: usize,
    /// Where the first `Cookie` field starts in `upstream`: cookie lookups start there, and a
    /// request without one costs nothing.
    pub(super) cookie_at: Option<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Bytes of the head in the buffer it was parsed from.
    pub len: usize,
    pub framing: Framing,
    /// The client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue`, which the proxy answers itself.
    pub expect_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade` with `Upgrade`, a WebSocket
    /// handshake): the `Upgrade` field goes to the server, and a 101 turns the connection into
    /// a tunnel.
    pub upgrade: bool,
    /// The head to send to the server: hop-by-hop fields removed.
    pub upstream: Vec<u8>,
}

impl RequestHead {
    pub fn method(&self) -> &str {
        // Copied from httparse's `&str`: always valid UTF-8.
        std::str::from_utf8(&self.upstream[..self.method_len]).unwrap_or("")
    }

    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.upstream[self.method_len + 1..self.target_end]).unwrap_or("")
    }

    pub fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }

    /// The request asks to switch to WebSocket.
    pub fn upgrades_to_websocket(&self) -> bool {
        self.upgrade
            && field_values(&self.upstream[self.target_end..], "upgrade").any(|v| {
                v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
            })
    }

    /// The value of cookie `name` (HAProxy's `req.cook`: the first occurrence).
    pub fn cookie(&self, name: &str) -> Option<&str> {
        cookie_in_fields(&self.upstream[self.cookie_at?..], name)
    }

    /// The value of the `Host` field (checked by the parser), if the request has one.
    pub fn host(&self) -> Option<&str> {
        let fields = &self.upstream[self.target_end..];
        let value = field_values(fields, "host").next()?;
        std::str::from_utf8(value).ok()
    }

    /// The first value of field `name`, if the request has one (HAProxy's `req.hdr`).
    pub fn field<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        let value = field_values(&self.upstream[self.target_end..], name).next()?;
        std::str::from_utf8(value).ok()
    }

    /// Whether any field called `name` has a value that passes `test` (a rule's condition).
    pub fn any_field(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        field_values(&self.upstream[self.target_end..], name).any(test)
    }
}

/// Checks the request target's form against the method (RFC 9112 §3.2); returns its parts
/// when it is in absolute form, which is then forwarded in origin form.
fn check_target<'a>(
    method: &str,
    target: &'a [u8],
) -> Result<Option<fields::AbsoluteTarget<'a>>, HeadError> {
    if method == "CONNECT" {
        return Err(HeadError::Unsupported("connect"));
    }
    // httparse lets bytes above 0x7f and `#` through; a fragment is never sent and raw
    // non-ASCII is read differently by different servers.
    if target.iter().any(|b| !b.is_ascii_graphic() || *b == b'#') {
        return Err(HeadError::Malformed("bad byte in request target"));
    }
    match target {
        [b'/', ..] => Ok(None),
        b"*" if method == "OPTIONS" => Ok(None),
        _ => match fields::absolute_target(target) {
            Some(t) if fields::valid_host(t.authority) && !t.authority.is_empty() => Ok(Some(t)),
            _ => Err(HeadError::Malformed("bad request target")),
        },
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` if more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(map_parse_error)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let target = target.as_bytes();
    let absolute = check_target(method, target)?;
    let headers = req.headers;
    let p = present(headers);
    if p.hosts > 1 || (minor == 1 && p.hosts == 0) {
        return Err(HeadError::Malformed(
            "a request needs exactly one host field",
        ));
    }
    if p.hosts == 1 {
        let host = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map_or(&[][..], |h| fields::trim_ows(h.value));
        if !fields::valid_host(host) {
            return Err(HeadError::Malformed("bad host field"));
        }
        // RFC 9112 §3.2.2 lets the target's authority win; a server behind us may instead
        // believe the field, so a request that names two hosts is refused, as HAProxy does.
        if absolute
            .as_ref()
            .is_some_and(|t| !t.authority.eq_ignore_ascii_case(host))
        {
            return Err(HeadError::Malformed("request target and host field differ"));
        }
    }
    let (length, codings) = p.framing_fields(headers)?;
    let framing = match codings {
        Some(_) if minor == 0 => {
            return Err(HeadError::Malformed(
                "transfer-encoding in an http/1.0 request",
            ));
        }
        Some(_) if length.is_some() => {
            return Err(HeadError::Malformed(
                "both content-length and transfer-encoding",
            ));
        }
        Some(codings) if codings.is_only_chunked() => Framing::Chunked,
        Some(_) => return Err(HeadError::Malformed("unsupported transfer-encoding")),
        None => match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        },
    };
    let keep_alive = if minor == 1 {
        !(p.connection && has_token(headers, "close"))
    } else {
        p.connection && has_token(headers, "keep-alive")
    };
    // RFC 9110 §7.8: only HTTP/1.1 switches, and only a request without a body is passed on as
    // a switch (what a server would read after the body is not the tunnel's to define). An
    // upgrade to h2c would let the client speak HTTP/2 to the server past every rule here
    // (and RFC 9113 dropped it): it is never passed on.
    let upgrade = minor == 1
        && p.upgrade
        && framing == Framing::Empty
        && has_token(headers, "upgrade")
        && method != "CONNECT"
        && !headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade")
                && h.value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        });
    let mut expect_continue = false;
    let mut cookie_at = None;
    let mut upstream = Vec::with_capacity(len + 32);
    upstream.extend_from_slice(method.as_bytes());
    upstream.push(b' ');
    match &absolute {
        Some(t) => t.write_origin_form(&mut upstream),
        None => upstream.extend_from_slice(target),
    }
    let target_end = upstream.len();
    upstream.extend_from_slice(if minor == 1 {
        b" HTTP/1.1\r\n"
    } else {
        b" HTTP/1.0\r\n"
    });
    let mut framing_written = false;
    for h in headers.iter() {
        if h.name.eq_ignore_ascii_case("expect") {
            if h.value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
                continue;
            }
            push_field(&mut upstream, h);
        } else if is_framing_field(h.name) {
            // The framing as parsed, once, where the first framing field stood.
            if !std::mem::replace(&mut framing_written, true) {
                match framing {
                    Framing::Chunked => {
                        upstream.extend_from_slice(b"Transfer-Encoding: chunked\r\n")
                    }
                    _ => push_length(&mut upstream, length.unwrap_or(0)),
                }
            }
        } else if upgrade && h.name.eq_ignore_ascii_case("upgrade") {
            push_field(&mut upstream, h);
        } else if !hop_by_hop(h.name, headers, p.names_fields) {
            if cookie_at.is_none() && h.name.eq_ignore_ascii_case("cookie") {
                cookie_at = Some(upstream.len());
            }
            push_field(&mut upstream, h);
        }
    }
    if upgrade {
        upstream.extend_from_slice(b"Connection: upgrade\r\n");
    }
    if minor == 0 {
        // Ask an HTTP/1.0 exchange to keep the server connection for the pool.
        upstream.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    upstream.extend_from_slice(b"\r\n");
    Ok(Some(RequestHead {
        method_len: method.len(),
        target_end,
        cookie_at,
        minor,
        len,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        upstream,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn simple_get_keeps_alive_and_drops_hop_by_hop_fields() {
        let h = req("GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(
            String::from_utf8_lossy(&h.upstream),
            "GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
        );
    }

    #[test]
    fn cookie_lookups_start_at_the_first_cookie_field() {
        let h = req("GET /p?q=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!((h.method(), h.target()), ("GET", "/p?q=1"));
        assert_eq!(h.cookie("PHPSESSID"), None);
        let h = req("GET / HTTP/1.1\r\nCookie: a=1\r\nHost: x\r\ncookie: PHPSESSID=s2\r\nCookie: PHPSESSID=s3\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.cookie("a"), Some("1"));
        assert_eq!(h.cookie("PHPSESSID"), Some("s2"));
    }

    #[test]
    fn partial_then_complete() {
        assert!(req("GET / HTTP/1.1\r\nHost: x\r\n").expect("ok").is_none());
        let h = req("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.len, 47);
    }

    #[test]
    fn smuggling_vectors_are_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        ] {
            assert!(
                matches!(req(bad), Err(HeadError::Malformed(_))),
                "{bad:?} accepted"
            );
        }
        // Identical duplicates are harmless and allowed.
        let h = req("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn huge_heads_are_too_large() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        while s.len() <= MAX_HEAD {
            s.push_str("X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(req(&s).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn http10_closes_unless_asked() {
        let h = req("GET / HTTP/1.0\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(!h.keep_alive);
        let h = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(h.keep_alive);
    }
}
