//! Parsing request and response heads with httparse, refusing what could smuggle a request,
//! and rewriting them for the other side (hop-by-hop headers, `Connection`).

use super::fields::{self, ContentLength, TransferCodings};

/// Largest request or response head (beyond: 431 for requests, 502 for responses).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;

/// How the end of a message body is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the server closes.
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// Not valid HTTP/1.x, or ambiguous framing.
    Malformed(&'static str),
    /// Valid, but not something this proxy does (a `CONNECT` tunnel).
    Unsupported(&'static str),
}

/// A complete request head.
#[derive(Debug)]
pub struct RequestHead {
    /// `upstream` starts with the request line: method, space, target, space.
    method_len: usize,
    target_end: usize,
    /// Where the first `Cookie` field starts in `upstream`: cookie lookups start there, and a
    /// request without one costs nothing.
    cookie_at: Option<usize>,
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

    /// Replaces every field called `name` in the head sent upstream by one with `value`: what
    /// the proxy says there, the client cannot.
    pub fn set_field(&mut self, name: &str, value: &str) {
        let start = self.target_end
            + self.upstream[self.target_end..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(0, |p| p + 1);
        // The usual head has no such field: it is not copied.
        if self.upstream[start..]
            .split(|b| *b == b'\n')
            .any(|line| is_field(line, name))
        {
            let mut kept = Vec::with_capacity(self.upstream.len());
            kept.extend_from_slice(&self.upstream[..start]);
            let mut cookie_at = None;
            for line in self.upstream[start..].split_inclusive(|b| *b == b'\n') {
                if is_field(line, name) {
                    continue;
                }
                if self.cookie_at.is_some() && cookie_at.is_none() && is_field(line, "cookie") {
                    cookie_at = Some(kept.len());
                }
                kept.extend_from_slice(line);
            }
            self.upstream = kept;
            self.cookie_at = cookie_at;
        }
        self.add_field(name, value);
    }

    /// Adds a field to the head sent upstream.
    pub fn add_field(&mut self, name: &str, value: &str) {
        // `upstream` always ends with the blank line.
        self.upstream
            .truncate(self.upstream.len().saturating_sub(2));
        self.upstream.extend_from_slice(name.as_bytes());
        self.upstream.extend_from_slice(b": ");
        self.upstream.extend_from_slice(value.as_bytes());
        self.upstream.extend_from_slice(b"\r\n\r\n");
    }
}

/// Whether a serialized field line is a field called `name`.
fn is_field(line: &[u8], name: &str) -> bool {
    line.iter()
        .position(|b| *b == b':')
        .is_some_and(|c| line[..c].eq_ignore_ascii_case(name.as_bytes()))
}

/// The values of the fields called `name` in serialized field lines.
fn field_values<'a>(lines: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    lines.split(|b| *b == b'\n').filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// A cookie's value as a sticky key: non-empty printable ASCII without quotes.
fn cookie_value(v: &[u8]) -> Option<&str> {
    let v = v.trim_ascii();
    let v = v
        .strip_prefix(b"\"")
        .and_then(|x| x.strip_suffix(b"\""))
        .unwrap_or(v);
    if v.is_empty() || !v.iter().all(|b| b.is_ascii_graphic() && *b != b'"') {
        return None;
    }
    std::str::from_utf8(v).ok()
}

/// The value of cookie `name` in a request head's `Cookie` fields (HAProxy's `req.cook`:
/// the first occurrence).
pub fn request_cookie<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let fields = head
        .iter()
        .position(|b| *b == b'\n')
        .map_or(&[][..], |p| &head[p + 1..]);
    cookie_in_fields(fields, name)
}

fn cookie_in_fields<'a>(fields: &'a [u8], name: &str) -> Option<&'a str> {
    field_values(fields, "cookie").find_map(|v| {
        v.split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes())
                .then(|| cookie_value(&pair[eq + 1..]))
                .flatten()
        })
    })
}

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
    fields: Vec<u8>,
    /// Where the first `Set-Cookie` field starts in `fields`.
    set_cookie_at: Option<usize>,
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

/// The tokens of every `Connection` field (compare them ignoring ASCII case). Borrowed, as
/// this runs for every message.
fn connection_tokens<'a>(
    headers: &'a [httparse::Header<'a>],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &[httparse::Header<'_>], token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a field is hop-by-hop and must not be forwarded; `named` says whether the
/// message's `Connection` fields name any field that is not always hop-by-hop anyway.
fn hop_by_hop(name: &str, headers: &[httparse::Header<'_>], named: bool) -> bool {
    const ALWAYS: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
    ];
    if ALWAYS.iter().any(|a| name.eq_ignore_ascii_case(a)) {
        return true;
    }
    // A `Connection` field may name more hop-by-hop fields, but never the framing ones.
    named
        && !["content-length", "transfer-encoding", "host"]
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f))
        && has_token(headers, name)
}

/// Which fields a head has, from one pass, so that the rarer ones cost nothing when absent.
#[derive(Default)]
struct Present {
    hosts: usize,
    content_length: bool,
    transfer_encoding: bool,
    connection: bool,
    upgrade: bool,
    /// A `Connection` token other than `keep-alive` (which is hop-by-hop by itself): a
    /// field it names must be dropped. Usually false, so fields are not checked against it.
    names_fields: bool,
}

impl Present {
    /// Content-Length and Transfer-Encoding codings, each read only when the field is there
    /// (the common head has neither, and pays no second pass).
    fn framing_fields(
        &self,
        headers: &[httparse::Header<'_>],
    ) -> Result<(Option<u64>, Option<TransferCodings>), HeadError> {
        let mut length = ContentLength::default();
        let mut codings = None::<TransferCodings>;
        if self.content_length || self.transfer_encoding {
            for h in headers {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length.add(h.value)?;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    codings.get_or_insert_with(Default::default).add(h.value)?;
                }
            }
        }
        Ok((length.get(), codings))
    }
}

fn present(headers: &[httparse::Header<'_>]) -> Present {
    let mut p = Present::default();
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            p.hosts += 1;
        } else if n.eq_ignore_ascii_case("content-length") {
            p.content_length = true;
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            p.transfer_encoding = true;
        } else if n.eq_ignore_ascii_case("connection") {
            p.connection = true;
        } else if n.eq_ignore_ascii_case("upgrade") {
            p.upgrade = true;
        }
    }
    p.names_fields =
        p.connection && connection_tokens(headers).any(|t| !t.eq_ignore_ascii_case(b"keep-alive"));
    p
}

fn is_framing_field(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
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

fn push_field(out: &mut Vec<u8>, h: &httparse::Header<'_>) {
    out.extend_from_slice(h.name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value);
    out.extend_from_slice(b"\r\n");
}

fn map_parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        httparse::Error::Version => HeadError::Malformed("unsupported http version"),
        httparse::Error::HeaderName | httparse::Error::HeaderValue => {
            HeadError::Malformed("bad header field")
        }
        _ => HeadError::Malformed("malformed head"),
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
    fn cookies_and_added_fields() {
        let mut h = req("GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; PHPSESSID=abc123 ; b=2\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(request_cookie(&h.upstream, "PHPSESSID"), Some("abc123"));
        assert_eq!(request_cookie(&h.upstream, "b"), Some("2"));
        assert_eq!(request_cookie(&h.upstream, "PHPSESS"), None);
        assert_eq!(request_cookie(&h.upstream, "Host"), None);
        h.add_field("X-Forwarded-For", "10.0.0.1");
        assert!(
            h.upstream
                .ends_with(b"b=2\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: other=1\r\nset-cookie: PHPSESSID=\"q9\"; path=/\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(r.set_cookie("PHPSESSID"), Some("q9"));
        assert_eq!(r.set_cookie("path"), None);
    }

    #[test]
    fn a_set_field_replaces_every_one_the_client_sent() {
        let mut h = req("GET /a HTTP/1.1\r\nX-Forwarded-Proto: https\r\nHost: x:8080\r\nx-forwarded-proto: ftp\r\nCookie: s=1\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.host(), Some("x:8080"));
        h.set_field("X-Forwarded-Proto", "http");
        assert_eq!(
            String::from_utf8_lossy(&h.upstream),
            "GET /a HTTP/1.1\r\nHost: x:8080\r\nCookie: s=1\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
        // The cookie is found where it moved to.
        assert_eq!(h.cookie("s"), Some("1"));
        // Without the field, the head only grows by it.
        let mut h = req("GET /b HTTP/1.0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.host(), None);
        h.set_field("X-Forwarded-Proto", "https");
        assert!(h.upstream.ends_with(b"X-Forwarded-Proto: https\r\n\r\n"));
        assert_eq!(h.target(), "/b");
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
