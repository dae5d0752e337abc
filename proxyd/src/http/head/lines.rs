//! The field lines of a parsed head: field and cookie lookups, and the edits made to them.

use super::{RequestHead, ResponseHead};

impl RequestHead {
    /// Removes cookie `name` from the `Cookie` fields sent upstream (a field left empty goes
    /// too): the server never sees the proxy's own persistence cookie.
    pub fn remove_cookie(&mut self, name: &str) {
        let Some(at) = self.cookie_at else {
            return;
        };
        let named = |pair: &[u8]| {
            pair.iter()
                .position(|b| *b == b'=')
                .is_some_and(|eq| pair[..eq].trim_ascii() == name.as_bytes())
        };
        let mut kept = Vec::with_capacity(self.upstream.len());
        kept.extend_from_slice(&self.upstream[..at]);
        let mut cookie_at = None;
        for line in self.upstream[at..].split_inclusive(|b| *b == b'\n') {
            if !is_field(line, "cookie") {
                kept.extend_from_slice(line);
                continue;
            }
            let body = line.trim_ascii_end();
            let colon = body.iter().position(|b| *b == b':').unwrap_or(0);
            let pairs: Vec<&[u8]> = body[colon + 1..]
                .split(|b| *b == b';')
                .map(<[u8]>::trim_ascii)
                .filter(|p| !p.is_empty() && !named(p))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            cookie_at.get_or_insert(kept.len());
            kept.extend_from_slice(b"Cookie: ");
            kept.extend_from_slice(&pairs.join(&b"; "[..]));
            kept.extend_from_slice(b"\r\n");
        }
        self.upstream = kept;
        self.cookie_at = cookie_at;
    }

    /// Replaces every field called `name` in the head sent upstream by one with `value`: what
    /// the proxy says there, the client cannot.
    pub fn set_field(&mut self, name: &str, value: &str) {
        self.remove_field(name);
        self.add_field(name, value);
    }

    /// Replaces the target's path, keeping its query (a rule's `set_path`, checked by config
    /// validation: it starts with '/' and has no space, '?' or '#').
    pub fn set_path(&mut self, path: &str) {
        let start = self.method_len + 1;
        let end = self.upstream[start..self.target_end]
            .iter()
            .position(|b| *b == b'?')
            .map_or(self.target_end, |q| start + q);
        let old = end - start;
        self.upstream.splice(start..end, path.bytes());
        // What follows the path moves by the difference in length.
        self.target_end = self.target_end + path.len() - old;
        self.cookie_at = self.cookie_at.map(|at| at + path.len() - old);
    }

    /// Removes every field called `name` from the head sent upstream.
    pub fn remove_field(&mut self, name: &str) {
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
    }

    /// Adds a field to the head sent upstream.
    pub fn add_field(&mut self, name: &str, value: &str) {
        // `upstream` always ends with the blank line.
        self.upstream
            .truncate(self.upstream.len().saturating_sub(2));
        if self.cookie_at.is_none() && name.eq_ignore_ascii_case("cookie") {
            self.cookie_at = Some(self.upstream.len());
        }
        self.upstream.extend_from_slice(name.as_bytes());
        self.upstream.extend_from_slice(b": ");
        self.upstream.extend_from_slice(value.as_bytes());
        self.upstream.extend_from_slice(b"\r\n\r\n");
    }
}

impl ResponseHead {
    /// Adds a field to the head sent to the client.
    pub fn add_field(&mut self, name: &str, value: &str) {
        if self.set_cookie_at.is_none() && name.eq_ignore_ascii_case("set-cookie") {
            self.set_cookie_at = Some(self.fields.len());
        }
        self.fields.extend_from_slice(name.as_bytes());
        self.fields.extend_from_slice(b": ");
        self.fields.extend_from_slice(value.as_bytes());
        self.fields.extend_from_slice(b"\r\n");
    }

    /// Removes the `Set-Cookie` fields that set cookie `name` (the proxy sets its own).
    pub fn remove_set_cookie(&mut self, name: &str) {
        let Some(at) = self.set_cookie_at else {
            return;
        };
        let sets = |line: &[u8]| {
            is_field(line, "set-cookie")
                && line.iter().position(|b| *b == b':').is_some_and(|c| {
                    let pair = line[c + 1..]
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or_default();
                    pair.iter()
                        .position(|b| *b == b'=')
                        .is_some_and(|eq| pair[..eq].trim_ascii() == name.as_bytes())
                })
        };
        let mut kept = Vec::with_capacity(self.fields.len());
        kept.extend_from_slice(&self.fields[..at]);
        let mut set_cookie_at = None;
        for line in self.fields[at..].split_inclusive(|b| *b == b'\n') {
            if sets(line) {
                continue;
            }
            if set_cookie_at.is_none() && is_field(line, "set-cookie") {
                set_cookie_at = Some(kept.len());
            }
            kept.extend_from_slice(line);
        }
        self.fields = kept;
        self.set_cookie_at = set_cookie_at;
    }
}

/// Edits the fields of a serialized head (status line, fields, blank line), as a response
/// header rule asks: `Set` replaces every field of that name, `Add` appends, `Del` removes.
pub fn edit_fields(head: &mut Vec<u8>, edit: &crate::rules::HeaderEdit) {
    use crate::rules::EditOp;
    let first = head
        .iter()
        .position(|b| *b == b'\n')
        .map_or(head.len(), |p| p + 1);
    let name = &*edit.name;
    if edit.op != EditOp::Add
        && head[first..]
            .split(|b| *b == b'\n')
            .any(|line| is_field(line, name))
    {
        let mut kept = Vec::with_capacity(head.len());
        kept.extend_from_slice(&head[..first]);
        for line in head[first..].split_inclusive(|b| *b == b'\n') {
            if !is_field(line, name) {
                kept.extend_from_slice(line);
            }
        }
        *head = kept;
    }
    if edit.op != EditOp::Del {
        // The head ends with the blank line: the field goes before it.
        let at = head.len().saturating_sub(2);
        let line = format!("{}: {}\r\n", edit.name, edit.value);
        head.splice(at..at, line.bytes());
    }
}

/// Whether a serialized field line is a field called `name`.
fn is_field(line: &[u8], name: &str) -> bool {
    line.iter()
        .position(|b| *b == b':')
        .is_some_and(|c| line[..c].eq_ignore_ascii_case(name.as_bytes()))
}

/// The values of the fields called `name` in serialized field lines.
pub(super) fn field_values<'a>(
    lines: &'a [u8],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    lines.split(|b| *b == b'\n').filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// A cookie's value as a sticky key: non-empty printable ASCII without quotes.
pub(super) fn cookie_value(v: &[u8]) -> Option<&str> {
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

pub(super) fn cookie_in_fields<'a>(fields: &'a [u8], name: &str) -> Option<&'a str> {
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

#[cfg(test)]
mod tests {
    use super::super::{HeadError, parse_request, parse_response};
    use super::*;

    fn req(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(s.as_bytes())
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
}
