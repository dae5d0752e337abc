//! Cookie persistence (HAProxy's `cookie NAME insert indirect nocache`): what a response says
//! to a client whose cookie did not name the server that answered.

use super::head::ResponseHead;
use crate::config::Cookie;

/// Sets the cookie naming the server that answered when the request's cookie did not name it
/// (no cookie, a server unknown or down, or a retry that went elsewhere); a client whose
/// cookie was right gets nothing, as with HAProxy.
pub fn on_response(
    cookie: &Cookie,
    named: Option<usize>,
    served: usize,
    server_cookie: &str,
    resp: &mut ResponseHead,
) {
    if !cookie.insert || named == Some(served) || resp.is_informational() {
        return;
    }
    // The proxy's cookie is the one the client keeps: a server's own of that name would
    // fight it (HAProxy removes it too, unless `preserve`).
    resp.remove_set_cookie(&cookie.name);
    resp.add_field("Set-Cookie", &set_cookie(cookie, server_cookie));
    if cookie.nocache {
        // A shared cache must not hand this client's server to everyone else.
        resp.add_field("Cache-Control", "private");
    }
}

/// The `Set-Cookie` value naming a server.
pub fn set_cookie(cookie: &Cookie, server_cookie: &str) -> String {
    let mut v = String::with_capacity(
        cookie.name.len() + 1 + server_cookie.len() + cookie.attributes.len(),
    );
    v.push_str(&cookie.name);
    v.push('=');
    v.push_str(server_cookie);
    v.push_str(&cookie.attributes);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{RequestHead, parse_request, parse_response_to};

    fn cookie(insert: bool, nocache: bool) -> Cookie {
        Cookie {
            name: "SRV".into(),
            insert,
            indirect: true,
            nocache,
            attributes: "; Path=/; HttpOnly".into(),
        }
    }

    fn request(head: &str) -> RequestHead {
        parse_request(head.as_bytes())
            .expect("valid")
            .expect("complete")
    }

    fn response(head: &str) -> ResponseHead {
        let req = request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        parse_response_to(head.as_bytes(), &req)
            .expect("valid")
            .expect("complete")
    }

    fn fields(resp: &ResponseHead, name: &str) -> Vec<String> {
        resp.fields()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nSet-Cookie: SRV=theirs; Path=/x\r\nSet-Cookie: sid=1\r\n\r\n";

    #[test]
    fn inserted_when_the_cookie_named_no_usable_server_or_another() {
        for named in [None, Some(1)] {
            let mut resp = response(OK);
            on_response(&cookie(true, true), named, 0, "s1", &mut resp);
            assert_eq!(
                fields(&resp, "set-cookie"),
                ["sid=1", "SRV=s1; Path=/; HttpOnly"],
                "{named:?}"
            );
            assert_eq!(fields(&resp, "cache-control"), ["private"]);
            assert_eq!(resp.set_cookie("SRV"), Some("s1"));
            assert_eq!(resp.set_cookie("sid"), Some("1"));
        }
    }

    #[test]
    fn nothing_for_a_client_whose_cookie_was_right_nor_in_passive_mode() {
        let mut resp = response(OK);
        on_response(&cookie(true, true), Some(0), 0, "s1", &mut resp);
        assert_eq!(
            fields(&resp, "set-cookie"),
            ["SRV=theirs; Path=/x", "sid=1"]
        );
        assert!(fields(&resp, "cache-control").is_empty());
        let mut resp = response(OK);
        on_response(&cookie(false, true), None, 0, "s1", &mut resp);
        assert_eq!(resp.set_cookie("SRV"), Some("theirs"));
        // Without nocache, no Cache-Control.
        let mut resp = response("HTTP/1.1 204 No Content\r\n\r\n");
        on_response(&cookie(true, false), None, 0, "s1", &mut resp);
        assert_eq!(fields(&resp, "set-cookie"), ["SRV=s1; Path=/; HttpOnly"]);
        assert!(fields(&resp, "cache-control").is_empty());
    }

    #[test]
    fn indirect_takes_only_the_persistence_cookie_out_of_the_request() {
        let mut req = request(
            "GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1; SRV=s1; b=2\r\nX: y\r\nCookie: SRV=s2\r\n\r\n",
        );
        assert_eq!(req.cookie("SRV"), Some("s1"));
        req.remove_cookie("SRV");
        let up = String::from_utf8(req.upstream.clone()).expect("utf-8");
        assert!(up.contains("\r\nCookie: a=1; b=2\r\n"), "{up}");
        assert!(!up.contains("SRV"), "{up}");
        assert!(up.ends_with("X: y\r\n\r\n"), "{up}");
        assert_eq!(req.cookie("SRV"), None);
        assert_eq!(req.cookie("b"), Some("2"));
        // A field holding only it goes; a request without cookies is left as it is.
        let mut req = request("GET / HTTP/1.1\r\nCookie: SRV=s1\r\nHost: a\r\n\r\n");
        req.remove_cookie("SRV");
        assert_eq!(req.upstream, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(req.cookie("SRV"), None);
        let mut req = request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        req.remove_cookie("SRV");
        assert_eq!(req.upstream, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }
}
