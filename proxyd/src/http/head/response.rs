//! Parsing a response head, checking its status and framing, and the head sent to the client.

use super::lines::{cookie_value, field_values};
use super::{
    Framing, HeadError, MAX_HEAD, MAX_HEADERS, RequestHead, has_token, hop_by_hop,
    is_framing_field, map_parse_error, present, push_field, push_length,
};
use crate::http::fields;

/// A complete response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub minor: u8,
    pub len: usize,
    pub framing: Framing,
    /// The server will keep the connection open (it may go back to the pool).
    pub keep_alive: bool,
    /// Status line and end-to-end fields, without the blank line that ends the head.
    pub(super) fields: Vec<u8>,
    /// Where the first `Set-Cookie` field starts in `fields`.
    pub(super) set_cookie_at: Option<usize>,
}

impl ResponseHead {
    /// An interim response, which another follows (1xx but 101, which switches protocols).
    pub fn is_informational(&self) -> bool {
        (100..200).contains(&self.status) && !self.is_switch()
    }

    /// The server switches protocols: the connection is a tunnel from the end of this head.
    pub fn is_switch(&self) -> bool {
        self.status == 101
    }

    /// The value the response sets for cookie `name` (HAProxy's `res.cook`), if any.
    pub fn set_cookie(&self, name: &str) -> Option<&str> {
        field_values(&self.fields[self.set_cookie_at?..], "set-cookie").find_map(|v| {
            let pair = v.split(|b| *b == b';').next()?.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes())
                .then(|| cookie_value(&pair[eq + 1..]))
                .flatten()
        })
    }

    /// The end-to-end fields as (name, value), in order (the framing field included).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let after_status = self
            .fields
            .iter()
            .position(|b| *b == b'\n')
            .map_or(self.fields.len(), |p| p + 1);
        self.fields[after_status..]
            .split(|b| *b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|b| *b == b':')?;
                Some((&line[..colon], line[colon + 1..].trim_ascii()))
            })
    }

    /// The head to send to the client; `close` adds `Connection: close`.
    pub fn downstream(&self, close: bool, client_minor: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.fields.len() + 32);
        out.extend_from_slice(&self.fields);
        Self::finish(&mut out, self.is_switch(), close, client_minor);
        out
    }

    /// [`Self::downstream`] in the head's own buffer, which was sized for it.
    pub fn into_downstream(self, close: bool, client_minor: u8) -> Vec<u8> {
        let switch = self.is_switch();
        let mut out = self.fields;
        Self::finish(&mut out, switch, close, client_minor);
        out
    }

    fn finish(out: &mut Vec<u8>, switch: bool, close: bool, client_minor: u8) {
        if switch {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        } else if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if client_minor == 0 {
            // HTTP/1.0 closes by default: say that we keep it open.
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses a response head at the start of `buf`; `request_is_head` because a response to HEAD
/// has no body whatever its fields say. A 101 is refused: see [`parse_response_to`].
pub fn parse_response(
    buf: &[u8],
    request_is_head: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    parse(buf, request_is_head, false)
}

/// Parses the response to `req`: a 101 is taken when `req` asked to switch.
pub fn parse_response_to(buf: &[u8], req: &RequestHead) -> Result<Option<ResponseHead>, HeadError> {
    parse(buf, req.is_head(), req.upgrade)
}

fn parse(
    buf: &[u8],
    request_is_head: bool,
    upgrade: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(map_parse_error)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    let switch = status == 101;
    if switch && !upgrade {
        // Upgrade is stripped from every request that did not ask to switch.
        return Err(HeadError::Malformed("unexpected protocol switch"));
    }
    let headers = resp.headers;
    let p = present(headers);
    let (length, codings) = p.framing_fields(headers)?;
    let no_body = request_is_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else {
        match &codings {
            Some(_) if length.is_some() => {
                return Err(HeadError::Malformed(
                    "both content-length and transfer-encoding",
                ));
            }
            Some(c) if c.codings().last() == Some(&fields::Coding::Chunked) => {
                if c.chunked_count() > 1 {
                    return Err(HeadError::Malformed("chunked applied twice"));
                }
                Framing::Chunked
            }
            Some(_) => Framing::UntilClose,
            None => match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            },
        }
    };
    let keep_alive = !switch
        && framing != Framing::UntilClose
        && if minor == 1 {
            !(p.connection && has_token(headers, "close"))
        } else {
            p.connection && has_token(headers, "keep-alive")
        };
    let mut out = Vec::with_capacity(len + 32);
    let fields = &mut out;
    fields.extend_from_slice(if minor == 1 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    // httparse accepts exactly three digits.
    let digit = |d: u16| b'0' + (d % 10) as u8;
    fields.extend_from_slice(&[digit(status / 100), digit(status / 10), digit(status), b' ']);
    fields.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    fields.extend_from_slice(b"\r\n");
    let mut set_cookie_at = None;
    let mut framing_written = false;
    for h in headers.iter() {
        if is_framing_field(h.name) {
            // The framing as parsed, once, where the first framing field stood; a length
            // beside codings (allowed only without a body) is dropped, as RFC 9112 §6.2 asks.
            if !std::mem::replace(&mut framing_written, true) {
                match (codings.as_ref(), length) {
                    (Some(c), _) => {
                        fields.extend_from_slice(b"Transfer-Encoding: ");
                        fields.extend_from_slice(c.names());
                        fields.extend_from_slice(b"\r\n");
                    }
                    (None, Some(n)) => push_length(fields, n),
                    (None, None) => {}
                }
            }
        } else if switch && h.name.eq_ignore_ascii_case("upgrade") {
            push_field(fields, h);
        } else if !hop_by_hop(h.name, headers, p.names_fields) {
            if set_cookie_at.is_none() && h.name.eq_ignore_ascii_case("set-cookie") {
                set_cookie_at = Some(fields.len());
            }
            push_field(fields, h);
        }
    }
    Ok(Some(ResponseHead {
        status,
        minor,
        len,
        framing,
        keep_alive,
        fields: out,
        set_cookie_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_without_set_cookie_closes_when_asked() {
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(r.set_cookie("PHPSESSID"), None);
        assert!(r.keep_alive);
        let closing = r.downstream(true, 1);
        assert_eq!(
            String::from_utf8_lossy(&closing),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(r.into_downstream(true, 1), closing);
    }

    #[test]
    fn response_framing() {
        let r = |s: &str, head: bool| {
            parse_response(s.as_bytes(), head)
                .expect("ok")
                .expect("complete")
        };
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).framing,
            Framing::Length(3)
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert_eq!(
            r("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            Framing::Empty
        );
        assert_eq!(
            r(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            )
            .framing,
            Framing::Empty
        );
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .framing,
            Framing::Chunked
        );
        let close = r("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(close.framing, Framing::UntilClose);
        assert!(!close.keep_alive);
        let c = r(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!c.keep_alive);
        assert_eq!(
            String::from_utf8_lossy(&c.downstream(true, 1)),
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n"
        );
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(parse_response(b"garbage\r\n\r\n", false).is_err());
    }
}
