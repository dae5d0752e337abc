//! HTTP/2 from clients (h2c with prior knowledge here; over TLS in tls_handshake.rs): curl and
//! the h2 crate's client against an in-process proxy on loopback, each stream an HTTP/1.1
//! request at the backend; the stream limit, a rapid-reset flood, a CONTINUATION flood and the
//! two-step GOAWAY of a drain.

mod util;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use proxyd::serve::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::{Action, T, backend, ok};

/// A proxy whose one bind takes h2c as well as HTTP/1.1, in front of `servers`.
fn start(servers: &[SocketAddr], defaults: &str) -> (Proxy, SocketAddr) {
    let dir = std::path::Path::new("/nonexistent");
    let text = util::config_text(dir, "127.0.0.1:0", servers, "").replace(
        "bind = [\"127.0.0.1:0\"]",
        "bind = [{ address = \"127.0.0.1:0\", h2c = true }]",
    );
    let text = format!("{text}\n[defaults]\nforwardfor = true\n{defaults}\n");
    let config = proxyd::Config::from_source(common::SourceFile::from_text("h2.toml", text))
        .expect("valid config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = Proxy::new(Arc::new(config));
    proxy
        .start(vec![(proxyd::config::BindRef::default(), listener)])
        .expect("start");
    (proxy, addr)
}

/// An HTTP/2 client connection (prior knowledge), its connection task running beside it.
async fn connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = tokio::time::timeout(T, h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    (client, tokio::spawn(conn))
}

fn request(method: Method, addr: SocketAddr, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(())
        .expect("request")
}

/// Sends a request (with `body` if any) and reads the whole response.
async fn fetch(
    client: &mut h2::client::SendRequest<Bytes>,
    req: Request<()>,
    body: Option<Bytes>,
) -> Result<(StatusCode, http::HeaderMap, Vec<u8>), h2::Error> {
    let mut client = client.clone().ready().await?;
    let (resp, mut send) = client.send_request(req, body.is_none())?;
    if let Some(b) = body {
        send_all(&mut send, b).await?;
    }
    let resp = tokio::time::timeout(T, resp)
        .await
        .map_err(|_| h2::Error::from(h2::Reason::CANCEL))??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok((status, headers, out))
}

/// Sends `body` within the flow-control window, then ends the stream.
async fn send_all(send: &mut h2::SendStream<Bytes>, mut body: Bytes) -> Result<(), h2::Error> {
    while !body.is_empty() {
        send.reserve_capacity(body.len());
        let n = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(n) => n?,
            None => return Err(h2::Reason::CANCEL.into()),
        };
        let part = body.split_to(n.min(body.len()));
        send.send_data(part, false)?;
    }
    send.send_data(Bytes::new(), true)
}

/// A backend that records the heads it gets and answers each with `body`.
async fn recording(body: &'static str) -> (util::Backend, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let b = backend(move |s| {
        h.lock().expect("lock").push(s.head.clone());
        ok(body)
    })
    .await;
    (b, heads)
}

#[tokio::test]
async fn curl_speaks_h2c_and_http11_on_the_same_bind() {
    let (b, heads) = recording("from the backend").await;
    let (_proxy, addr) = start(&[b.addr], "forwarded = true");
    let url = format!("http://{addr}/page?x=1");
    for (flag, version) in [("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")] {
        let out = util::curl(&[
            flag,
            "-w",
            "\n%{http_version}",
            "-H",
            "Forwarded: for=203.0.113.9;proto=https",
            &url,
        ])
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            format!("from the backend\n{version}"),
            "{flag}: {out:?}"
        );
    }
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    // The HTTP/2 request reached the backend as HTTP/1.1 with Host from :authority.
    let h2 = &heads[0];
    assert!(h2.starts_with("GET /page?x=1 HTTP/1.1\r\n"), "{h2}");
    assert!(h2.contains(&format!("host: {addr}\r\n")), "{h2}");
    assert!(h2.contains("X-Forwarded-Proto: http\r\n"), "{h2}");
    assert!(h2.contains("X-Forwarded-For: 127.0.0.1\r\n"), "{h2}");
    // The client's own Forwarded is replaced by what the proxy saw, for both protocols.
    for h in &heads {
        let want = format!("Forwarded: for=127.0.0.1;proto=http;host=\"{addr}\"\r\n");
        assert!(h.contains(&want), "{h}");
        assert!(!h.contains("203.0.113.9"), "{h}");
    }
}

#[tokio::test]
async fn many_streams_on_one_connection_share_pooled_server_connections() {
    let b = backend(|s| {
        let path = s.head.split(' ').nth(1).unwrap_or("").to_owned();
        Action::RespondAfter(
            Duration::from_millis(20),
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Seen: yes\r\n\r\n{path}",
                path.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let (proxy, addr) = start(&[b.addr], "");
    let (client, _conn) = connect(addr).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            fetch(&mut c, request(Method::GET, addr, &format!("/s{i}")), None).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, headers, body) = t.await.expect("task").expect("stream");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers.get("x-seen").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
        assert_eq!(body, format!("/s{i}").into_bytes());
    }
    // Another round on the same connection reuses the server connections of the first.
    let before = b.connections.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = client.clone();
    for i in 0..10 {
        let (status, _, _) = fetch(&mut c, request(Method::GET, addr, &format!("/r{i}")), None)
            .await
            .expect("stream");
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    assert_eq!(proxy.stats().requests_total, 70);
}

#[tokio::test]
async fn request_bodies_with_and_without_a_length_reach_the_server_whole() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let b = backend(move |s| {
        seen.lock()
            .expect("lock")
            .push((s.head.clone(), s.body.clone()));
        let reply = vec![b'r'; 1 << 20];
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            reply.len()
        )
        .into_bytes();
        out.extend_from_slice(&reply);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
        Action::Respond(out)
    })
    .await;
    let (_proxy, addr) = start(&[b.addr], "");
    let (mut client, _conn) = connect(addr).await;
    let big = Bytes::from(vec![b'q'; 300_000]);
    // With a length: forwarded as it is.
    let mut req = request(Method::POST, addr, "/len");
    req.headers_mut()
        .insert("content-length", big.len().to_string().parse().expect("v"));
    let (status, headers, body) = fetch(&mut client, req, Some(big.clone()))
        .await
        .expect("post with length");
    assert_eq!(status, StatusCode::OK);
    // The server's chunks are HTTP/1.1's: HTTP/2 frames the body itself.
    assert!(headers.get("transfer-encoding").is_none(), "{headers:?}");
    assert_eq!(body.len(), 1 << 20);
    assert!(body.iter().all(|b| *b == b'r'));
    // Without one: chunked to the server.
    let (status, _, body) = fetch(
        &mut client,
        request(Method::POST, addr, "/nolen"),
        Some(big.clone()),
    )
    .await
    .expect("post without length");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 1 << 20);
    let seen = bodies.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].0.contains("Content-Length: 300000\r\n"),
        "{}",
        seen[0].0
    );
    assert_eq!(seen[0].1, big.to_vec());
    assert!(
        seen[1].0.contains("Transfer-Encoding: chunked\r\n"),
        "{}",
        seen[1].0
    );
    let decoded = dechunk(&seen[1].1);
    assert_eq!(decoded, big.to_vec());
}

/// The content of a chunked body as the backend recorded it.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).expect("utf8"), 16)
            .expect("hex");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[tokio::test]
async fn ambiguous_or_unsupported_requests_get_a_status_and_never_reach_the_server() {
    let (b, heads) = recording("x").await;
    let (_proxy, addr) = start(&[b.addr], "");
    let (mut client, _conn) = connect(addr).await;
    // A Host that names another site than :authority.
    let mut req = request(Method::GET, addr, "/");
    req.headers_mut()
        .insert("host", "elsewhere.example".parse().expect("v"));
    let (status, _, _) = fetch(&mut client, req, None).await.expect("stream");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A host the HTTP/1.1 parser refuses, through :authority.
    let req = Request::builder()
        .uri("http://bad_host%00/")
        .body(())
        .map(Some)
        .unwrap_or(None);
    if let Some(req) = req {
        let (status, _, _) = fetch(&mut client, req, None).await.expect("stream");
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    // A request target with a byte a server could read in two ways.
    let req = Request::builder()
        .uri(format!("http://{addr}/a%20b\x7f"))
        .body(());
    if let Ok(req) = req {
        let (status, _, _) = fetch(&mut client, req, None).await.expect("stream");
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    assert!(heads.lock().expect("lock").is_empty());
    // The connection still serves.
    let (status, _, body) = fetch(&mut client, request(Method::GET, addr, "/"), None)
        .await
        .expect("stream");
    assert_eq!((status, body), (StatusCode::OK, b"x".to_vec()));
}

#[tokio::test]
async fn the_proxys_own_errors_reach_an_h2_client_with_their_text() {
    let (_proxy, addr) = start(&[util::closed_port()], "retries = 0");
    let (mut client, _conn) = connect(addr).await;
    let (status, headers, body) = fetch(&mut client, request(Method::GET, addr, "/"), None)
        .await
        .expect("stream");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain"[..])
    );
    assert_eq!(body, b"503 service unavailable\n");
}

#[tokio::test]
async fn the_stream_limit_is_offered_and_enforced() {
    let b = backend(|_| Action::RespondAfter(Duration::from_millis(300), reply("slow"))).await;
    let (_proxy, addr) = start(&[b.addr], "h2_max_concurrent_streams = 4");
    let (client, _conn) = connect(addr).await;
    let mut client = client.ready().await.expect("ready");
    // The settings arrive with the first exchange.
    let _ = fetch(&mut client, request(Method::GET, addr, "/"), None).await;
    // Twelve at once: the client's h2 queues what the limit does not allow; all succeed.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            fetch(&mut c, request(Method::GET, addr, "/"), None).await
        }));
    }
    for t in tasks {
        let (status, _, _) = t.await.expect("task").expect("stream");
        assert_eq!(status, StatusCode::OK);
    }
    // Three rounds of four, not one of twelve.
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "{:?}",
        started.elapsed()
    );
}

/// A 200 with `body`, as bytes to send after a delay.
fn reply(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_client_that_resets_its_streams_in_a_flood_loses_the_connection() {
    // Every request would hold a server for a long time: the flood must not pile them up.
    let b = backend(|_| Action::Hang(Duration::from_secs(30))).await;
    let (proxy, addr) = start(&[b.addr], "");
    let (client, conn) = connect(addr).await;
    let mut client = client.ready().await.expect("ready");
    // In rounds: ten streams reach the backend, then the client resets them (h2 itself
    // refuses resets of streams the proxy has not taken yet; these it has).
    let mut sent = 0;
    'flood: for _ in 0..50 {
        let mut round = Vec::new();
        for _ in 0..10 {
            client = match client.ready().await {
                Ok(c) => c,
                Err(_) => break 'flood,
            };
            match client.send_request(request(Method::GET, addr, "/flood"), true) {
                Ok((resp, send)) => round.push((resp, send)),
                Err(_) => break 'flood,
            }
            sent += 1;
        }
        let deadline = Instant::now() + T;
        while b.requests.load(std::sync::atomic::Ordering::SeqCst) < sent
            && !conn.is_finished()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for (_, mut send) in round {
            send.send_reset(h2::Reason::CANCEL);
        }
    }
    let ended = tokio::time::timeout(T, conn)
        .await
        .expect("the proxy ends the connection")
        .expect("conn task");
    let err = ended.expect_err("ended by the proxy");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    // Cut off soon after the allowance, not at the end of the flood.
    assert!((100..=150).contains(&sent), "{sent} streams sent");
    // Nothing of the flood is left in flight at the proxy.
    let deadline = Instant::now() + T;
    while proxy.stats().requests_in_flight > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.stats().requests_in_flight, 0);
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_with_a_goaway() {
    let (b, heads) = recording("x").await;
    let (_proxy, addr) = start(&[b.addr], "");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(proxyd::http::h2::PREFACE)
        .await
        .expect("preface");
    tcp.write_all(&frame(4, 0, 0, &[])).await.expect("settings");
    // HEADERS without END_HEADERS (a literal field, never indexed), then CONTINUATIONs
    // that never end: each carries another field, which a server must not keep buffering.
    let field = |i: u32| {
        let name = format!("x-flood-{i}");
        let mut f = vec![0x10, name.len() as u8];
        f.extend_from_slice(name.as_bytes());
        f.push(100);
        f.extend_from_slice(&[b'v'; 100]);
        f
    };
    let mut headers = vec![0x82, 0x84, 0x86]; // :method GET, :path /, :scheme http
    headers.extend_from_slice(&field(0));
    tcp.write_all(&frame(1, 0x1, 1, &headers))
        .await
        .expect("headers");
    let started = Instant::now();
    let mut sent = 0usize;
    let mut goaway = false;
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    for i in 1..20_000u32 {
        if tcp.write_all(&frame(9, 0, 1, &field(i))).await.is_err() {
            break;
        }
        sent += 1;
        if i % 100 == 0 {
            // Look for a GOAWAY (type 7) in what the proxy sent.
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if has_goaway(&got) {
                    goaway = true;
                    break;
                }
            }
        }
        if started.elapsed() > T {
            break;
        }
    }
    if !goaway {
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read_to_end(&mut got)).await;
        goaway = has_goaway(&got);
    }
    assert!(goaway, "no goaway after {sent} continuation frames");
    // Far less than the 2 MB the client tried to make the proxy hold.
    assert!(sent < 2000, "{sent} continuation frames taken");
    assert!(heads.lock().expect("lock").is_empty());
}

/// Whether the frames in `bytes` (after the server's preface) include a GOAWAY.
fn has_goaway(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes[3] == 7 {
            return true;
        }
        if bytes.len() < 9 + len {
            return false;
        }
        bytes = &bytes[9 + len..];
    }
    false
}

#[tokio::test]
async fn a_drain_sends_goaway_and_finishes_the_streams_it_has() {
    let b = backend(|_| Action::RespondAfter(Duration::from_millis(400), reply("done"))).await;
    let (proxy, addr) = start(&[b.addr], "");
    let proxy = Arc::new(proxy);
    let (client, conn) = connect(addr).await;
    // Many at once on the one connection: each must finish, however the connection polls them.
    const STREAMS: usize = 40;
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            fetch(&mut c, request(Method::GET, addr, "/slow"), None).await
        }));
    }
    // Let them reach the backend, then drain with time to spare.
    let deadline = Instant::now() + T;
    while b.requests.load(std::sync::atomic::Ordering::SeqCst) < STREAMS
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let p = proxy.clone();
    let finish = tokio::spawn(async move { p.finish(tokio::time::Instant::now() + T).await });
    for t in tasks {
        let (status, _, body) = t
            .await
            .expect("task")
            .expect("a stream in flight completes");
        assert_eq!((status, body), (StatusCode::OK, b"done".to_vec()));
    }
    // The connection ends cleanly (GOAWAY with NO_ERROR), and the drain with it.
    let ended = tokio::time::timeout(T, conn)
        .await
        .expect("connection ends");
    ended.expect("conn task").expect("a graceful goaway");
    tokio::time::timeout(T, finish)
        .await
        .expect("drain finishes")
        .expect("finish");
    // A request after the GOAWAY is not taken.
    let mut c = client.clone();
    assert!(
        fetch(&mut c, request(Method::GET, addr, "/late"), None)
            .await
            .is_err()
    );
    assert_eq!(
        b.requests.load(std::sync::atomic::Ordering::SeqCst),
        STREAMS
    );
}

#[tokio::test]
async fn an_idle_connection_goes_away_but_not_while_a_stream_outlasts_the_idle_timeout() {
    let b = backend(|_| Action::RespondAfter(Duration::from_millis(600), reply("late"))).await;
    let (_proxy, addr) = start(&[b.addr], "timeout_http_keep_alive = \"200ms\"");
    let (client, conn) = connect(addr).await;
    let mut c = client.clone();
    // Longer than the idle timeout, but the connection is not idle meanwhile.
    let (status, _, body) = fetch(&mut c, request(Method::GET, addr, "/"), None)
        .await
        .expect("a stream that outlasts the idle timeout completes");
    assert_eq!((status, body), (StatusCode::OK, b"late".to_vec()));
    // Idle from then on: the proxy ends the connection with a graceful GOAWAY.
    let ended = tokio::time::timeout(T, conn)
        .await
        .expect("the idle connection ends");
    ended.expect("conn task").expect("a graceful goaway");
}

#[tokio::test]
async fn the_cookie_fields_of_a_stream_reach_the_server_as_one() {
    let (b, heads) = recording("x").await;
    let (_proxy, addr) = start(&[b.addr], "");
    let (client, _conn) = connect(addr).await;
    let mut c = client.clone();
    // HTTP/2 clients send each cookie as a field of its own (RFC 9113 §8.2.3).
    let mut req = request(Method::GET, addr, "/");
    for crumb in ["a=1", "b=2", "c=3"] {
        req.headers_mut()
            .append("cookie", http::HeaderValue::from_static(crumb));
    }
    let (status, _, _) = fetch(&mut c, req, None).await.expect("stream");
    assert_eq!(status, StatusCode::OK);
    let heads = heads.lock().expect("lock");
    let head = heads[0].to_ascii_lowercase();
    assert_eq!(head.matches("cookie:").count(), 1, "{head}");
    assert!(head.contains("cookie: a=1; b=2; c=3\r\n"), "{head}");
}
