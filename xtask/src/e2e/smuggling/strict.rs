//! A strict reading of HTTP/1.1 messages (RFC 9110 and 9112): the oracle that says what each
//! variant of the smuggling corpus means, so that no variant carries a hand-written verdict.
//!
//! Where the RFCs let a recipient be lenient without changing a message's meaning (a bare LF
//! ending a head line, obs-fold, CL and TE together, list forms of Content-Length), this reads
//! the message the lenient way; where the meaning is ambiguous it refuses.

/// Why a message is not one well-framed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Well-formed so far, but it ends too early.
    Incomplete,
    Invalid(&'static str),
}

type Result<T> = std::result::Result<T, Error>;

fn invalid<T>(why: &'static str) -> Result<T> {
    Err(Error::Invalid(why))
}

/// One request as a strict recipient reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target exactly as sent.
    pub target: String,
    /// The path of an absolute-form target (what an origin server may receive instead).
    pub origin_form: String,
    /// The host the request is for: the target's authority if it has one, else the Host field.
    pub host: Option<String>,
    /// Decoded body length.
    pub body: usize,
    /// Bytes of the message.
    pub len: usize,
}

/// One response as a strict recipient reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Decoded body.
    pub body: Vec<u8>,
    pub len: usize,
}

struct Field {
    name: String,
    value: Vec<u8>,
}

struct Head {
    start: Vec<u8>,
    fields: Vec<Field>,
    len: usize,
}

impl Head {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |f| f.name == name)
            .map(|f| f.value.as_slice())
    }
}

pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A field-value byte: VCHAR, obs-text, SP or HTAB.
fn is_value_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7e | 0x80..=0xff | b' ' | b'\t')
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The next head line at `at` (CRLF or a bare LF ends it; a CR anywhere else is invalid) and
/// where the line after it starts.
fn head_line(buf: &[u8], at: usize) -> Result<(&[u8], usize)> {
    let rest = &buf[at..];
    let nl = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Error::Incomplete)?;
    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
    if line.contains(&b'\r') {
        return invalid("bare cr in the head");
    }
    Ok((line, at + nl + 1))
}

fn head(buf: &[u8]) -> Result<Head> {
    let (start, mut at) = head_line(buf, 0)?;
    if start.is_empty() {
        return invalid("empty start line");
    }
    let mut fields: Vec<Field> = Vec::new();
    loop {
        let (line, next) = head_line(buf, at)?;
        at = next;
        if line.is_empty() {
            break;
        }
        if let [b' ' | b'\t', ..] = line {
            // obs-fold: the line continues the previous value, joined by a space.
            let Some(prev) = fields.last_mut() else {
                return invalid("folded line before any field");
            };
            let more = trim_ows(line);
            if !more.iter().all(|&b| is_value_byte(b)) {
                return invalid("bad byte in a folded line");
            }
            prev.value = trim_ows(&[&prev.value[..], b" ", more].concat()).to_vec();
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Error::Invalid("field line without a colon"))?;
        if !is_token(&line[..colon]) {
            return invalid("bad field name");
        }
        let value = trim_ows(&line[colon + 1..]);
        if !value.iter().all(|&b| is_value_byte(b)) {
            return invalid("bad byte in a field value");
        }
        fields.push(Field {
            name: String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase(),
            value: value.to_vec(),
        });
    }
    Ok(Head {
        start: start.to_vec(),
        fields,
        len: at,
    })
}

/// The elements of a comma-separated list field (all its fields), empty elements dropped.
fn list<'a>(head: &'a Head, name: &'a str) -> Vec<&'a [u8]> {
    head.values(name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .collect()
}

enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Transfer-Encoding and Content-Length, read as RFC 9112 section 6 says; `None` when the body
/// is delimited by the connection closing (a response whose codings do not end in chunked).
fn framing(head: &Head, request: bool) -> Result<Framing> {
    let codings = list(head, "transfer-encoding");
    if head.values("transfer-encoding").next().is_some() {
        if codings.iter().any(|c| !is_token(c)) {
            return invalid("bad transfer coding");
        }
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        let count = codings.iter().filter(|c| chunked(c)).count();
        if codings.last().is_some_and(|c| chunked(c)) && count == 1 {
            // Transfer-Encoding overrides Content-Length (a proxy must drop the latter).
            return Ok(Framing::Chunked);
        }
        if request || count > 0 {
            return invalid("transfer codings that do not end in one chunked");
        }
        return Ok(Framing::UntilClose);
    }
    if head.values("content-length").next().is_none() {
        return Ok(if request {
            Framing::Length(0)
        } else {
            Framing::UntilClose
        });
    }
    let mut found = None;
    for item in list(head, "content-length") {
        if !item.iter().all(u8::is_ascii_digit) {
            return invalid("content-length is not digits");
        }
        let n = std::str::from_utf8(item)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(Error::Invalid("content-length overflows"))?;
        if found.is_some_and(|f| f != n) {
            return invalid("content-length values differ");
        }
        found = Some(n);
    }
    found
        .map(Framing::Length)
        .ok_or(Error::Invalid("empty content-length"))
}

/// A chunked body at the start of `buf`: (decoded body, bytes consumed).
fn chunked(buf: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line = crlf_line(buf, at)?;
        at += line.len() + 2;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return invalid("chunk size missing");
        }
        let mut size: u64 = 0;
        for &d in &line[..digits] {
            let v = u64::from((d as char).to_digit(16).unwrap_or(0));
            size = size
                .checked_mul(16)
                .and_then(|s| s.checked_add(v))
                .ok_or(Error::Invalid("chunk size overflows"))?;
        }
        chunk_ext(&line[digits..])?;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| Error::Invalid("chunk size overflows"))?;
        if buf.len() < at + size + 2 {
            return Err(Error::Incomplete);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size;
        if &buf[at..at + 2] != b"\r\n" {
            return invalid("chunk data not followed by crlf");
        }
        at += 2;
    }
    // Trailer fields (framing fields there are ignored, as RFC 9110 section 6.5.1 allows).
    loop {
        let line = crlf_line(buf, at)?;
        at += line.len() + 2;
        if line.is_empty() {
            return Ok((body, at));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Error::Invalid("trailer without a colon"))?;
        if !is_token(&line[..colon]) || !line[colon + 1..].iter().all(|&b| is_value_byte(b)) {
            return invalid("bad trailer field");
        }
    }
}

/// A CRLF-terminated line in a chunked body (no leniency there: a bare LF or CR is invalid).
fn crlf_line(buf: &[u8], at: usize) -> Result<&[u8]> {
    let rest = &buf[at..];
    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
        return if rest.contains(&b'\n') {
            invalid("bare lf in a chunked body")
        } else {
            Err(Error::Incomplete)
        };
    };
    let line = &rest[..end];
    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return invalid("bare cr or lf in a chunk line");
    }
    Ok(line)
}

/// `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] )`, value a token or a quoted string.
fn chunk_ext(mut s: &[u8]) -> Result<()> {
    let bws = |s: &[u8]| -> usize { s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count() };
    let token = |s: &[u8]| -> usize { s.iter().take_while(|&&b| is_tchar(b)).count() };
    loop {
        s = &s[bws(s)..];
        if s.is_empty() {
            return Ok(());
        }
        if s[0] != b';' {
            return invalid("junk after chunk size");
        }
        s = &s[1..];
        s = &s[bws(s)..];
        let n = token(s);
        if n == 0 {
            return invalid("chunk extension without a name");
        }
        s = &s[n..];
        let after = bws(s);
        if s.get(after) != Some(&b'=') {
            continue;
        }
        s = &s[after + 1..];
        s = &s[bws(s)..];
        if s.first() == Some(&b'"') {
            let mut i = 1;
            loop {
                match s.get(i) {
                    None => return invalid("unterminated quoted chunk extension"),
                    Some(b'"') => break,
                    Some(b'\\') if s.get(i + 1).is_some_and(|&b| is_value_byte(b)) => i += 2,
                    Some(&b) if is_value_byte(b) && b != b'\\' => i += 1,
                    Some(_) => return invalid("bad byte in a quoted chunk extension"),
                }
            }
            s = &s[i + 1..];
        } else {
            let n = token(s);
            if n == 0 {
                return invalid("chunk extension without a value");
            }
            s = &s[n..];
        }
    }
}

/// A host (and port) as uri-host [":" port] may spell it.
fn is_host(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
}

/// The first request in `buf`.
pub fn request(buf: &[u8]) -> Result<Request> {
    let head = head(buf)?;
    let parts: Vec<&[u8]> = head.start.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return invalid("request line is not method SP target SP version");
    };
    if !is_token(method) {
        return invalid("bad method");
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return invalid("bad request target");
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        _ => return invalid("unsupported http version"),
    };
    let hosts: Vec<&[u8]> = head.values("host").collect();
    if hosts.len() > 1 || (minor == 1 && hosts.is_empty()) {
        return invalid("a request needs exactly one host");
    }
    // The grammar lets reg-name be empty: an empty Host is odd but not ambiguous.
    if hosts.iter().any(|h| !h.is_empty() && !is_host(h)) {
        return invalid("bad host");
    }
    let target = String::from_utf8_lossy(target).into_owned();
    let (origin_form, host) = if target.starts_with('/') {
        (
            target.clone(),
            hosts
                .first()
                .map(|h| String::from_utf8_lossy(h).into_owned()),
        )
    } else {
        let lower = target.to_ascii_lowercase();
        let Some(rest) = ["http://", "https://"]
            .iter()
            .find_map(|s| lower.starts_with(s).then(|| &target[s.len()..]))
        else {
            return invalid("unsupported request target form");
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.contains('@') || !is_host(authority.as_bytes()) {
            return invalid("bad authority in the target");
        }
        let path = match &rest[end..] {
            "" => "/".to_owned(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        (path, Some(authority.to_owned()))
    };
    if minor == 0 && head.values("transfer-encoding").next().is_some() {
        return invalid("transfer-encoding in an http/1.0 request");
    }
    let rest = &buf[head.len..];
    let (body, used) = match framing(&head, true)? {
        Framing::Chunked => {
            let (body, used) = chunked(rest)?;
            (body.len(), used)
        }
        Framing::Length(n) => {
            let n = usize::try_from(n).map_err(|_| Error::Invalid("content-length overflows"))?;
            if rest.len() < n {
                return Err(Error::Incomplete);
            }
            (n, n)
        }
        Framing::UntilClose => return invalid("request body until close"),
    };
    Ok(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        target,
        origin_form,
        host,
        body,
        len: head.len + used,
    })
}

/// Every request a strict reader finds in `buf`, one after the other, until the bytes end or
/// stop being a request (bytes that follow a request without being one must reach no server).
pub fn requests(buf: &[u8]) -> Result<Vec<Request>> {
    let mut out = vec![request(buf)?];
    let mut at = out[0].len;
    while at < buf.len() {
        let Ok(next) = request(&buf[at..]) else { break };
        at += next.len;
        out.push(next);
    }
    Ok(out)
}

/// The first response in `buf`, which holds everything the server sent before closing.
pub fn response(buf: &[u8]) -> Result<Response> {
    let head = head(buf)?;
    let start = &head.start;
    let ok_version = start.starts_with(b"HTTP/1.1 ") || start.starts_with(b"HTTP/1.0 ");
    let code = start.get(9..12).unwrap_or_default();
    if !ok_version || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return invalid("bad status line");
    }
    if !(start.len() == 12 || start[12] == b' ')
        || !start[12.min(start.len())..]
            .iter()
            .all(|&b| is_value_byte(b))
    {
        return invalid("bad reason phrase");
    }
    let status = code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    let rest = &buf[head.len..];
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let (body, used) = if no_body {
        (Vec::new(), 0)
    } else {
        match framing(&head, false)? {
            Framing::Chunked => chunked(rest)?,
            Framing::Length(n) => {
                let n =
                    usize::try_from(n).map_err(|_| Error::Invalid("content-length overflows"))?;
                if rest.len() < n {
                    return Err(Error::Incomplete);
                }
                (rest[..n].to_vec(), n)
            }
            Framing::UntilClose => (rest.to_vec(), rest.len()),
        }
    };
    Ok(Response {
        status,
        body,
        len: head.len + used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &[u8]) -> Result<Request> {
        request(s)
    }

    #[test]
    fn plain_and_chunked_requests() {
        let m = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc";
        let r = req(m).expect("ok");
        assert_eq!((r.body, r.len, r.host.as_deref()), (3, m.len(), Some("x")));
        let r = req(b"POST /a HTTP/1.1\nHost: x\nTransfer-Encoding: Chunked\n\n5;a=\"b c\"\r\nhello\r\n0\r\nX: 1\r\n\r\n")
            .expect("ok");
        assert_eq!(r.body, 5);
        let r = req(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .expect("ok");
        assert_eq!(r.body, 0);
        let r =
            req(b"GET http://Other:8/p?q HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n").expect("ok");
        assert_eq!(
            (r.origin_form.as_str(), r.host.as_deref()),
            ("/p?q", Some("Other:8"))
        );
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        for bad in [
            &b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: \xa05\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3,4\r\n\r\nabcd",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 ;/x y\r\nhello\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nhello\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000000000000005\r\nhello\r\n0\r\n\r\n",
            b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET /a HTTP/1.1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\rY: 1\r\n\r\n",
        ] {
            assert!(
                matches!(req(bad), Err(Error::Invalid(_))),
                "{:?} read as {:?}",
                String::from_utf8_lossy(bad),
                req(bad)
            );
        }
        assert_eq!(
            req(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nab"),
            Err(Error::Incomplete)
        );
    }

    #[test]
    fn responses() {
        let r = response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").expect("ok");
        assert_eq!(
            (r.status, r.body.as_slice(), r.len),
            (200, &b"hello"[..], 43)
        );
        let r = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nX")
            .expect("ok");
        assert_eq!(r.body, b"0\r\n\r\nX");
        assert!(
            response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\n0\r\n\r\n")
                .is_err()
        );
        let r = response(
            b"HTTP/1.1 404 \r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"ab"[..]));
        assert!(response(b"HTTP/1.1 200 OK\r\nContent-Length: \xa05\r\n\r\nhello").is_err());
        assert!(
            response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"
            )
            .is_err()
        );
    }
}
