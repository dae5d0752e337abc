//! The proxy in-process against what an attacker or a careless server sends: smuggling by
//! look-alike whitespace, replayed requests, stray response bytes, slow heads.

mod util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::{Action, Client, Seen, backend, get, ok, start_with};

/// A backend that parses nothing: it keeps every byte it receives, as a naive server's log
/// would show them, and answers each connection's first bytes with an empty 200.
async fn raw_backend() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                {
                    if n == 0 {
                        return;
                    }
                    seen.lock().expect("lock").extend_from_slice(&buf[..n]);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (addr, kept)
}

/// Sends raw bytes on a new connection and returns everything the proxy answers until it
/// closes (or 3 s pass).
async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn look_alike_whitespace_in_framing_fields_is_400_and_reaches_no_server() {
    let (b, seen) = raw_backend().await;
    let (_proxy, addr) = start_with(&[b], "");
    // A request hidden in the body of one framed by a Transfer-Encoding that a strict server
    // does not read as chunked (a no-break space before `chunked`).
    let mut hidden = b"POST /innocent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\nACE ;/x HTTP/1.1\r\n".to_vec();
    let mut inner = b"Host: x\r\n\r\n".to_vec();
    inner.resize(0xACE, b'A');
    hidden.extend_from_slice(&inner);
    hidden.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut cases = vec![hidden];
    for field in [
        &b"Transfer-Encoding: \xa0chunked"[..],
        b"Transfer-Encoding: chunked\x0b",
        b"Transfer-Encoding: \x0cchunked",
        b"Content-Length: \xc2\xa05",
        b"Content-Length: \xa05",
        b"Content-Length: 5\x0b",
    ] {
        let mut r = b"POST / HTTP/1.1\r\nHost: x\r\n".to_vec();
        r.extend_from_slice(field);
        r.extend_from_slice(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        cases.push(r);
    }
    for case in cases {
        let answer = exchange_raw(addr, &case).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 400 "),
            "{:?} -> {:?}",
            String::from_utf8_lossy(&case[..60]),
            String::from_utf8_lossy(&answer)
        );
    }
    let got = seen.lock().expect("lock").clone();
    assert!(
        got.is_empty(),
        "the backend received {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn framing_fields_are_forwarded_as_parsed() {
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let h = heads.clone();
    let b = backend(move |s: &Seen| {
        h.lock().expect("lock").push(s.head.clone());
        ok(&String::from_utf8_lossy(&s.body))
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "");
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c
        .send(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\ncontent-length:\t3 \r\n\r\nabc",
            false,
        )
        .await
        .expect("reply");
    assert_eq!((r.status, r.text().as_str()), (200, "abc"));
    let r = c
        .send(
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \tChunked \r\n\r\n3;name=\"v\"\r\nabc\r\n0\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    // The server gets the chunks without their extension.
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "3\r\nabc\r\n0\r\n\r\n")
    );
    // Absolute form goes out in origin form.
    let r = c
        .send(b"GET http://x/c?q HTTP/1.1\r\nHost: x\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.status, 200);
    let heads = heads.lock().expect("lock").clone();
    assert!(
        heads[0].contains("\r\nContent-Length: 3\r\n") && !heads[0].contains("3, 3"),
        "{}",
        heads[0]
    );
    assert_eq!(heads[0].matches("ontent-").count(), 1, "{}", heads[0]);
    assert!(
        heads[1].contains("\r\nTransfer-Encoding: chunked\r\n"),
        "{}",
        heads[1]
    );
    assert!(
        heads[2].starts_with("GET /c?q HTTP/1.1\r\n"),
        "{}",
        heads[2]
    );
}

#[tokio::test]
async fn ambiguous_targets_and_bad_responses_are_refused() {
    let b = backend(|s: &Seen| {
        if s.head.starts_with("GET /nbsp-length") {
            Action::Respond(b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xa05\r\n\r\nhello".to_vec())
        } else if s.head.starts_with("GET /vt-chunked") {
            Action::Respond(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\x0b\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    .to_vec(),
            )
        } else {
            ok("x")
        }
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "");
    for (request, status) in [
        (&b"GET http://other/ HTTP/1.1\r\nHost: x\r\n\r\n"[..], 400),
        (b"GET http://a@x/ HTTP/1.1\r\nHost: a@x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x y\r\n\r\n", 400),
        (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;a b\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
            400,
        ),
        (b"GET /nbsp-length HTTP/1.1\r\nHost: x\r\n\r\n", 502),
        (b"GET /vt-chunked HTTP/1.1\r\nHost: x\r\n\r\n", 502),
    ] {
        let answer = exchange_raw(addr, request).await;
        let want = format!("HTTP/1.1 {status} ");
        assert!(
            answer.starts_with(want.as_bytes()),
            "{:?} -> {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&answer)
        );
    }
}

/// Fills the server's pool with `n` idle connections: `n` slow requests at once.
async fn fill_pool(addr: SocketAddr, n: usize) {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.expect("connect");
            c.send(&get("/slow"), false).await.expect("reply").status
        }));
    }
    for c in clients {
        assert_eq!(c.await.expect("join"), 200);
    }
}

fn slow_or(s: &Seen, other: Action) -> Action {
    if s.head.starts_with("GET /slow") {
        Action::RespondAfter(
            Duration::from_millis(200),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
    } else {
        other
    }
}

#[tokio::test]
async fn a_post_that_got_no_answer_is_never_sent_again() {
    let posts = Arc::new(AtomicUsize::new(0));
    let p = posts.clone();
    let b = backend(move |s: &Seen| {
        if s.head.starts_with("POST") {
            p.fetch_add(1, Ordering::SeqCst);
        }
        slow_or(s, Action::Close)
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "retries = 3");
    fill_pool(addr, 6).await;
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c
        .send(
            b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 502);
    assert_eq!(posts.load(Ordering::SeqCst), 1, "the POST was replayed");
}

#[tokio::test]
async fn an_idempotent_request_goes_again_at_most_retries_times() {
    let gets = Arc::new(AtomicUsize::new(0));
    let g = gets.clone();
    let b = backend(move |s: &Seen| {
        if s.head.starts_with("GET /x") {
            g.fetch_add(1, Ordering::SeqCst);
        }
        slow_or(s, Action::Close)
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "retries = 1");
    fill_pool(addr, 6).await;
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c.send(&get("/x"), false).await.expect("reply");
    assert_eq!(r.status, 502);
    assert_eq!(gets.load(Ordering::SeqCst), 2, "one send and one retry");
}

#[tokio::test]
async fn bytes_a_server_sends_after_its_response_reach_no_other_client() {
    let b = backend(|_: &Seen| {
        Action::RespondThen(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale".to_vec(),
        )
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "");
    let mut stale = 0;
    for _ in 0..24 {
        let mut c = Client::connect(addr).await.expect("connect");
        let r = c.send(&get("/"), false).await.expect("reply");
        assert_eq!(r.status, 200);
        if r.text() != "ok" {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "clients got another request's bytes");
}

#[tokio::test]
async fn a_response_head_sent_a_byte_at_a_time_times_out() {
    let b = backend(|_: &Seen| {
        Action::Trickle(
            b"HTTP/1.1 200 OK\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            Duration::from_millis(50),
        )
    })
    .await;
    let (_proxy, addr) = start_with(&[b.addr], "timeout_server = \"300ms\"");
    let mut c = Client::connect(addr).await.expect("connect");
    let t0 = Instant::now();
    let r = c.send(&get("/"), false).await.expect("reply");
    assert_eq!(r.status, 504);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_streamed_upload_still_goes_to_another_server_when_no_connection_could_be_made() {
    let b = backend(|s: &Seen| ok(&s.body.len().to_string())).await;
    let (_proxy, addr) = start_with(
        &[util::closed_port(), b.addr],
        "retries = 1\nredispatch = true",
    );
    let body = vec![b'u'; 200_000];
    let mut req = format!(
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c.send(&req, false).await.expect("reply");
    assert_eq!((r.status, r.text().as_str()), (200, "200000"));
}
