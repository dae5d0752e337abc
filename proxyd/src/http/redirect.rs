//! The redirect of plain HTTP to https: the new URL from the request's host and target, and the
//! 301 that carries it.

/// `https://HOST[:PORT]TARGET` for a request to `host` (its `Host` field, checked by the parser:
/// no byte that could break the field) and `target` (origin form). The port is `port` when
/// given, else the host's own unless it is 80, plain HTTP's default, which https would not
/// answer on; 443 is left out. `None` without a host (an HTTP/1.0 request may have none).
pub fn https_location(host: Option<&str>, target: &str, port: Option<u16>) -> Option<String> {
    let host = host?;
    let (name, host_port) = split_port(host);
    if name.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p),
        None => host_port.filter(|p| *p != 80),
    };
    let target = if target.starts_with('/') { target } else { "/" };
    Some(match port {
        Some(p) if p != 443 => format!("https://{name}:{p}{target}"),
        _ => format!("https://{name}{target}"),
    })
}

/// A host field's name and port: `example.com:8080`, `[::1]:8080`, `[::1]`, `example.com`.
fn split_port(host: &str) -> (&str, Option<u16>) {
    let after_name = match host.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(host.len(), |i| i + 2),
        None => host.find(':').unwrap_or(host.len()),
    };
    let (name, rest) = host.split_at(after_name);
    (name, rest.strip_prefix(':').and_then(|p| p.parse().ok()))
}

/// The whole 301 response; `close` says the connection ends after it.
pub fn moved_permanently(location: &str, close: bool, client_minor: u8) -> Vec<u8> {
    let connection = if close {
        "Connection: close\r\n"
    } else if client_minor == 0 {
        "Connection: keep-alive\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.{client_minor} 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\n{connection}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_url_in_https() {
        let at = |host, target, port| https_location(Some(host), target, port);
        assert_eq!(
            at("example.com", "/a?b=c", None).as_deref(),
            Some("https://example.com/a?b=c")
        );
        // Plain HTTP's own port does not carry over; another one does, unless one is configured.
        assert_eq!(
            at("example.com:80", "/", None).as_deref(),
            Some("https://example.com/")
        );
        assert_eq!(
            at("example.com:8080", "/", None).as_deref(),
            Some("https://example.com:8080/")
        );
        assert_eq!(
            at("example.com:8080", "/x", Some(8443)).as_deref(),
            Some("https://example.com:8443/x")
        );
        assert_eq!(
            at("example.com:8080", "/x", Some(443)).as_deref(),
            Some("https://example.com/x")
        );
        assert_eq!(
            at("[::1]:8080", "/", Some(8443)).as_deref(),
            Some("https://[::1]:8443/")
        );
        assert_eq!(at("[::1]", "/", None).as_deref(), Some("https://[::1]/"));
        assert_eq!(at("h", "*", None).as_deref(), Some("https://h/"));
        assert_eq!(https_location(None, "/", None), None);
    }

    #[test]
    fn the_answer_says_whether_the_connection_stays() {
        let r = String::from_utf8(moved_permanently("https://h/", false, 1)).expect("text");
        assert_eq!(
            r,
            "HTTP/1.1 301 Moved Permanently\r\nLocation: https://h/\r\nContent-Length: 0\r\n\r\n"
        );
        let r = String::from_utf8(moved_permanently("https://h/", true, 0)).expect("text");
        assert!(r.starts_with("HTTP/1.0 301") && r.ends_with("Connection: close\r\n\r\n"));
    }
}
