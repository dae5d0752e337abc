//! Fuzz targets for every parser of network bytes in proxyd: request and response heads and
//! the chunked decoder. Each checks that what the proxy forwards reads back the same way.

use common::fuzz;
use proxyd::http::body::{self, BodyError};
use proxyd::http::head::{self, Framing, MAX_HEAD};
use proxyd::net::Io;

const REQUESTS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://x:80/a?b HTTP/1.1\r\nHost: x:80\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: [::1]:8080\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nCookie: a=1; PHPSESSID=abc\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nUpgrade: websocket\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nSet-Cookie: a=b; path=/\r\n\r\n",
    b"HTTP/1.0 304 Not Modified\r\nContent-Length: 10\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 502 Bad Gateway\r\nConnection: close, X-B\r\nX-B: 1\r\nContent-Length: 0, 0\r\n\r\n",
];

const CHUNKED: &[&[u8]] = &[
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;a=b;c=\"d;e\"\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n",
    b"000\r\n\r\n",
    b"1\r\n\r\r\n0\r\n\r\n",
];

#[test]
fn fuzz_request_head() {
    fuzz::run("request head", REQUESTS, |input| {
        let Ok(Some(h)) = head::parse_request(input) else {
            return;
        };
        assert!(h.len <= input.len() && h.len <= MAX_HEAD + 1);
        // The head sent upstream is read back exactly as the proxy read the original:
        // no server that parses it strictly can see another request or another body.
        let again = head::parse_request(&h.upstream)
            .expect("the forwarded head parses")
            .expect("the forwarded head is complete");
        assert_eq!(
            again.len,
            h.upstream.len(),
            "the forwarded head is one head"
        );
        assert_eq!(
            (again.method(), again.target(), again.minor, again.framing),
            (h.method(), h.target(), h.minor, h.framing)
        );
        assert_eq!(again.upstream, h.upstream, "forwarding is idempotent");
        assert!(h.target().starts_with('/') || h.target() == "*");
        // Framing goes out as one field the proxy wrote itself.
        let text = String::from_utf8_lossy(&h.upstream).to_ascii_lowercase();
        let framing_lines: Vec<&str> = text
            .split("\r\n")
            .filter(|l| l.starts_with("content-length:") || l.starts_with("transfer-encoding:"))
            .collect();
        assert!(framing_lines.len() <= 1, "{framing_lines:?}");
        for line in framing_lines {
            let ok = line == "transfer-encoding: chunked"
                || line
                    .strip_prefix("content-length: ")
                    .is_some_and(|n| n.parse::<u64>().is_ok_and(|v| v.to_string() == n));
            assert!(ok, "{line:?}");
        }
    });
}

#[test]
fn fuzz_response_head() {
    fuzz::run("response head", RESPONSES, |input| {
        for request_is_head in [false, true] {
            let Ok(Some(r)) = head::parse_response(input, request_is_head) else {
                continue;
            };
            assert!(r.len <= input.len());
            let out = r.downstream(false, 1);
            let again = head::parse_response(&out, request_is_head)
                .expect("the forwarded head parses")
                .expect("the forwarded head is complete");
            assert_eq!(again.len, out.len());
            assert_eq!(
                (again.status, again.framing),
                (r.status, r.framing),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
            assert_eq!(again.downstream(false, 1), out, "forwarding is idempotent");
        }
    });
}

/// Runs the chunked forwarder over `input`: what it wrote, or why it stopped.
fn reframe(rt: &tokio::runtime::Runtime, input: &[u8]) -> Result<Vec<u8>, BodyError> {
    rt.block_on(async {
        let mut src = Io::new(input);
        let mut dst = Vec::new();
        let mut out = Vec::new();
        body::forward(
            &mut src,
            &mut dst,
            Framing::Chunked,
            &mut out,
            std::time::Duration::from_secs(1),
        )
        .await
        .map(|()| dst)
    })
}

#[test]
fn fuzz_chunked_body() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    fuzz::run("chunked body", CHUNKED, |input| {
        let Ok(out) = reframe(&rt, input) else {
            return;
        };
        // Re-framing only drops extensions and leading zeros: never more than the input.
        assert!(out.len() <= input.len(), "{} > {}", out.len(), input.len());
        // What goes to the server is a chunked body a second pass leaves untouched.
        let again = reframe(&rt, &out).expect("the forwarded body is valid chunked");
        assert_eq!(again, out);
    });
}
