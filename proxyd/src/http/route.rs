//! Where a frontend's L7 rules meet both protocols: the request as the rules see it, their
//! request rewrites applied before the exchange, the proxy's own answers (redirect, deny,
//! return), and the response header rules on whatever the client gets, errors included.

use std::borrow::Cow;
use std::net::IpAddr;

use super::exchange::Status;
use super::head::{self, RequestHead};
use crate::net::ClientInfo;
use crate::rules::{self, Decision, EditOp, HeaderEdit, RequestEdit, Route, Rules};

/// A request head with what the connection knows: what the rules evaluate.
pub struct View<'a> {
    pub head: &'a RequestHead,
    pub src: IpAddr,
    pub tls: bool,
}

impl rules::Request for View<'_> {
    fn method(&self) -> &str {
        self.head.method()
    }
    fn target(&self) -> &str {
        self.head.target()
    }
    fn host(&self) -> Option<&str> {
        self.head.host()
    }
    fn any_field(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.head.any_field(name, test)
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        self.head.cookie(name)
    }
    fn src(&self) -> IpAddr {
        self.src
    }
    fn tls(&self) -> bool {
        self.tls
    }
}

/// Evaluates the frontend's rules and applies their request rewrites to `head`.
pub fn route<'r>(rules: &'r Rules, info: ClientInfo, head: &mut RequestHead) -> Route<'r> {
    let route = rules.route(&View {
        head,
        src: info.peer.ip(),
        tls: info.tls,
    });
    for edit in &route.request {
        match edit {
            RequestEdit::Header(h) => match h.op {
                EditOp::Set => head.set_field(&h.name, &h.value),
                EditOp::Add => head.add_field(&h.name, &h.value),
                EditOp::Del => head.remove_field(&h.name),
            },
            RequestEdit::SetPath(p) => head.set_path(p),
        }
    }
    route
}

/// The response edits of rules without a condition, for answers to requests never parsed.
pub fn always(rules: &Rules) -> Vec<&HeaderEdit> {
    rules.always_response().iter().collect()
}

/// An answer the proxy gives by a rule.
#[derive(Debug)]
pub struct Local<'r> {
    pub status: u16,
    pub location: Option<String>,
    pub content_type: Option<&'r str>,
    pub body: &'r str,
    /// A `deny` (counted as denied), not a `redirect` or `return`.
    pub denied: bool,
}

/// The proxy's own answer when the rules decided one; `Err` when the request cannot have it
/// (a scheme redirect of a request without host).
pub fn local<'r>(
    decision: Decision<'r>,
    head: &RequestHead,
    info: ClientInfo,
) -> Option<Result<Local<'r>, Status>> {
    match decision {
        Decision::Default | Decision::Backend(_) => None,
        Decision::Redirect(r) => {
            let view = View {
                head,
                src: info.peer.ip(),
                tls: info.tls,
            };
            Some(match r.location(&view) {
                Some(location) => Ok(Local {
                    status: r.status,
                    location: Some(location),
                    content_type: None,
                    body: "",
                    denied: false,
                }),
                None => Err(Status::BadRequest),
            })
        }
        Decision::Reply(r) => Some(Ok(Local {
            status: r.status,
            location: None,
            content_type: Some(&r.content_type),
            body: &r.body,
            denied: r.denied,
        })),
    }
}

/// The HTTP/1 bytes of a local answer; `close` says the connection ends after it.
pub fn h1_local(
    a: &Local<'_>,
    close: bool,
    minor: u8,
    is_head: bool,
    edits: &[&HeaderEdit],
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(a.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!("HTTP/1.{minor} {} {reason}\r\n", a.status);
    if let Some(l) = &a.location {
        out.push_str(&format!("Location: {l}\r\n"));
    }
    if let Some(t) = a.content_type {
        out.push_str(&format!("Content-Type: {t}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
    if close {
        out.push_str("Connection: close\r\n");
    } else if minor == 0 {
        out.push_str("Connection: keep-alive\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    edit_head(&mut bytes, edits);
    if !is_head {
        bytes.extend_from_slice(a.body.as_bytes());
    }
    bytes
}

/// The proxy's own error over HTTP/1.1 with the response edits (as is without any).
pub fn h1_error(status: Status, edits: &[&HeaderEdit]) -> Cow<'static, [u8]> {
    let whole = status.response();
    if edits.is_empty() {
        return Cow::Borrowed(whole);
    }
    let end = whole
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(whole.len(), |p| p + 4);
    let mut out = whole[..end].to_vec();
    edit_head(&mut out, edits);
    out.extend_from_slice(&whole[end..]);
    Cow::Owned(out)
}

/// Applies response edits, in order, to a serialized HTTP/1 head.
pub fn edit_head(head: &mut Vec<u8>, edits: &[&HeaderEdit]) {
    for e in edits {
        head::edit_fields(head, e);
    }
}

/// Applies response edits, in order, to HTTP/2 fields (names are lower-cased there).
pub fn edit_map(map: &mut http::HeaderMap, edits: &[&HeaderEdit]) {
    for e in edits {
        // Validation checked the name (a token) and the value (no control byte).
        let Ok(name) = http::HeaderName::from_bytes(e.name.as_bytes()) else {
            continue;
        };
        match e.op {
            EditOp::Del => {
                map.remove(&name);
            }
            EditOp::Set | EditOp::Add => {
                let Ok(value) = http::HeaderValue::from_str(&e.value) else {
                    continue;
                };
                if e.op == EditOp::Set {
                    map.insert(name, value);
                } else {
                    map.append(name, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(op: EditOp, name: &str, value: &str) -> HeaderEdit {
        HeaderEdit {
            op,
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn response_edits_on_an_http1_head() {
        let mut h = b"HTTP/1.1 200 OK\r\nServer: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n".to_vec();
        let (set, add, del) = (
            edit(EditOp::Set, "X-A", "3"),
            edit(EditOp::Add, "Strict-Transport-Security", "max-age=60"),
            edit(EditOp::Del, "server", ""),
        );
        edit_head(&mut h, &[&set, &add, &del]);
        assert_eq!(
            String::from_utf8_lossy(&h),
            "HTTP/1.1 200 OK\r\nX-A: 3\r\nStrict-Transport-Security: max-age=60\r\n\r\n"
        );
        let e = h1_error(Status::ServiceUnavailable, &[&add]);
        let text = String::from_utf8_lossy(&e);
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "Strict-Transport-Security: max-age=60\r\n\r\n503 service unavailable\n"
            ),
            "{text}"
        );
        assert!(matches!(
            h1_error(Status::BadGateway, &[]),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn local_answers_over_http1() {
        let a = Local {
            status: 403,
            location: None,
            content_type: Some("text/plain"),
            body: "no\n",
            denied: true,
        };
        let b = String::from_utf8(h1_local(&a, true, 1, false, &[])).expect("text");
        assert_eq!(
            b,
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n"
        );
        let r = Local {
            status: 308,
            location: Some("https://h/x".into()),
            content_type: None,
            body: "",
            denied: false,
        };
        let b = String::from_utf8(h1_local(&r, false, 0, true, &[])).expect("text");
        assert_eq!(
            b,
            "HTTP/1.0 308 Permanent Redirect\r\nLocation: https://h/x\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        );
    }
}
