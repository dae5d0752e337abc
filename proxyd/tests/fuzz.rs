//! Fuzz targets for every parser of network bytes in proxyd: request and response heads, the
//! chunked decoder, and HTTP/2 frames as a client sends them to a running proxy. Each checks
//! that what the proxy forwards reads back the same way, or that the proxy stays whole.

mod util;

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
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
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
        // A switch is asked of the server exactly when the proxy took it as one.
        assert_eq!(again.upgrade, h.upgrade);
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

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET / HTTP/2` to `x` (static table entries, `:authority` as a literal) and for
/// a POST with `content-length: 5`.
const GET_X: &[u8] = &[0x82, 0x84, 0x86, 0x41, 1, b'x'];
const POST_X: &[u8] = &[0x83, 0x84, 0x86, 0x41, 1, b'x', 0x5c, 1, b'5'];

/// Frame sequences after the preface: whole exchanges, a head split over CONTINUATION, and
/// the control frames around a stream.
fn h2_seeds() -> Vec<Vec<u8>> {
    let (end_stream, end_headers) = (0x1, 0x4);
    let settings = frame(4, 0, 0, &[]);
    let mut get = settings.clone();
    get.extend(frame(1, end_stream | end_headers, 1, GET_X));
    let mut post = settings.clone();
    post.extend(frame(1, end_headers, 1, POST_X));
    post.extend(frame(0, end_stream, 1, b"hello"));
    let mut split = settings.clone();
    split.extend(frame(1, end_stream, 1, &GET_X[..3]));
    split.extend(frame(9, end_headers, 1, &GET_X[3..]));
    let mut control = settings;
    control.extend(frame(1, end_headers, 3, POST_X));
    control.extend(frame(8, 0, 3, &[0, 0, 0x10, 0]));
    control.extend(frame(6, 0, 0, b"pingpong"));
    control.extend(frame(2, 0, 3, &[0, 0, 0, 1, 16]));
    control.extend(frame(3, 0, 3, &[0, 0, 0, 8]));
    control.extend(frame(1, end_stream | end_headers, 5, GET_X));
    control.extend(frame(7, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]));
    vec![get, post, split, control]
}

#[test]
fn fuzz_h2_frames() {
    // A panic in any proxy task (a connection or a stream) is a finding, though tokio would
    // only log it.
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        default_hook(info);
    }));
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, _proxy) = server_rt.block_on(async {
        let backend_addr = util::backend(|_| util::ok("ok")).await.addr;
        let text = format!(
            "[global]\nadmin_socket = \"/nonexistent/a.sock\"\nfdkeeper_socket = \"/nonexistent/f.sock\"\n\
             [defaults]\ntimeout_http_request = \"1s\"\ntimeout_client = \"1s\"\n\
             [[frontend]]\nname = \"www\"\nbind = [{{ address = \"127.0.0.1:0\", h2c = true }}]\ndefault_backend = \"app\"\n\
             [[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"s\"\naddress = \"{backend_addr}\"\n"
        );
        let config = proxyd::Config::from_source(common::SourceFile::from_text("f.toml", text))
            .expect("config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = proxyd::serve::Proxy::new(std::sync::Arc::new(config));
        proxy
            .start(vec![(proxyd::config::BindRef::default(), listener)])
            .expect("start");
        (addr, proxy)
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seeds = h2_seeds();
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    fuzz::run("h2 frames", &seeds, |input| {
        client_rt.block_on(send_frames(addr, input));
        assert!(
            !PANICKED.load(std::sync::atomic::Ordering::SeqCst),
            "a proxy task panicked"
        );
    });
    // After all of that, a well-behaved client is served.
    let got = client_rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut input = proxyd::http::h2::PREFACE.to_vec();
        input.extend_from_slice(seeds[0]);
        tcp.write_all(&input).await.expect("write");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            read_until_data(&mut tcp, &mut got),
        )
        .await;
        got
    });
    assert!(
        got.windows(2).any(|w| w == b"ok"),
        "no answer after the fuzzing: {got:?}"
    );
}

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends the preface and `input`, then reads what the proxy says for a moment.
async fn send_frames(addr: std::net::SocketAddr, input: &[u8]) {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let mut bytes = proxyd::http::h2::PREFACE.to_vec();
    bytes.extend_from_slice(input);
    if tcp.write_all(&bytes).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let limit = std::time::Duration::from_millis(10);
    while let Ok(Ok(n)) = tokio::time::timeout(limit, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

async fn read_until_data(tcp: &mut tokio::net::TcpStream, got: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(2).any(|w| w == b"ok") {
            return;
        }
    }
}
