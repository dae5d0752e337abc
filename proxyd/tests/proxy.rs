//! The HTTP/1.1 proxy in-process against scripted backends on 127.0.0.1.

mod util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use proxyd::serve::Proxy;
use tokio::io::AsyncWriteExt;
use util::{Action, Client, backend, closed_port, get, ok, start_with};

/// Starts a proxy on 127.0.0.1:0 in front of `servers`.
fn start(servers: &[std::net::SocketAddr]) -> (Proxy, std::net::SocketAddr) {
    start_with(servers, "")
}

#[tokio::test]
async fn keep_alive_on_both_sides_reuses_one_server_connection() {
    let b = backend(|s| ok(&format!("hello {}", s.nth))).await;
    let (proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    for i in 0..5 {
        let r = c.send(&get("/"), false).await.expect("reply");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("hello {i}"));
        assert!(!r.closes());
    }
    // A second client, after the first finished, reuses the pooled connection too.
    let mut c2 = Client::connect(addr).await.expect("connect");
    assert_eq!(
        c2.send(&get("/"), false).await.expect("reply").text(),
        "hello 5"
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.stats().requests_total, 6);
}

#[tokio::test]
async fn round_robin_over_servers() {
    let a = backend(|_| ok("a")).await;
    let b = backend(|_| ok("b")).await;
    let (_proxy, addr) = start(&[a.addr, b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(c.send(&get("/"), false).await.expect("reply").text());
    }
    assert_eq!(got, ["a", "b", "a", "b"]);
}

#[tokio::test]
async fn chunked_bodies_both_ways_and_content_length_bodies() {
    let b = backend(|s| {
        let body = String::from_utf8_lossy(&s.body).into_owned();
        Action::Respond(
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ngot\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c
        .send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 200);
    // Chunk framing travels (re-written without extensions): the server saw the client's chunks
    // and the client sees the server's.
    let sent = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    assert_eq!(r.text(), format!("3\r\ngot\r\n1a\r\n{sent}\r\n0\r\n\r\n"));
    // A large Content-Length body is streamed, not buffered.
    let big = vec![b'x'; 300_000];
    let mut req = format!(
        "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let r = c.send(&req, false).await.expect("reply");
    assert!(
        r.text().contains("493e0\r\n"),
        "300000 bytes in hex: {}",
        &r.text()[..20]
    );
}

#[tokio::test]
async fn failed_connects_are_503_and_garbage_is_502() {
    // As HAProxy: no connection could be made (retries included) is 503, not 502.
    let (_proxy, addr) = start(&[closed_port()]);
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c.send(&get("/"), false).await.expect("reply");
    assert_eq!(r.status, 503);
    assert!(r.closes());

    let g = backend(|_| Action::Respond(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec())).await;
    let (_proxy, addr) = start(&[g.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 502);
}

#[tokio::test]
async fn malformed_and_smuggling_requests_are_400_and_never_reach_the_server() {
    let b = backend(|_| ok("x")).await;
    let (_proxy, addr) = start(&[b.addr]);
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    ] {
        let mut c = Client::connect(addr).await.expect("connect");
        let r = c.send(bad, false).await.expect("reply");
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
        assert!(c.closed().await);
    }
    // Only the bad-chunking request had a valid head, and it was cut before the server answered.
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn huge_head_is_431() {
    let b = backend(|_| ok("x")).await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    req.extend(
        std::iter::repeat_n(
            b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
                .iter()
                .copied(),
            2000,
        )
        .flatten(),
    );
    req.extend_from_slice(b"\r\n");
    assert_eq!(c.send(&req, false).await.expect("reply").status, 431);
}

#[tokio::test]
async fn reused_connection_closed_by_the_server_is_retried_on_a_new_one() {
    // The server drops every connection when its second request arrives, unanswered:
    // exactly the idle-timeout race a pooled connection can lose.
    let b = backend(|s| {
        if s.nth == 0 {
            ok("fresh")
        } else {
            Action::Close
        }
    })
    .await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    for _ in 0..3 {
        let r = c.send(&get("/"), false).await.expect("reply");
        assert_eq!((r.status, r.text().as_str()), (200, "fresh"));
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn head_204_304_have_no_body_and_http10_closes() {
    let b = backend(|s| {
        if s.head.starts_with("HEAD") {
            Action::Respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec())
        } else if s.head.starts_with("GET /204") {
            Action::Respond(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
        } else if s.head.starts_with("GET /304") {
            Action::Respond(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n".to_vec())
        } else {
            ok("plain")
        }
    })
    .await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c
        .send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", true)
        .await
        .expect("reply");
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = c.send(&get("/204"), false).await.expect("reply");
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c.send(&get("/304"), false).await.expect("reply");
    assert_eq!((r.status, r.body.len()), (304, 0));
    let r = c.send(&get("/"), false).await.expect("reply");
    assert_eq!(r.text(), "plain");

    let mut old = Client::connect(addr).await.expect("connect");
    let r = old
        .send(b"GET / HTTP/1.0\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.text(), "plain");
    assert!(r.closes());
    assert!(old.closed().await);
    // Client asking to close: honoured.
    let mut cc = Client::connect(addr).await.expect("connect");
    let r = cc
        .send(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert!(r.closes());
    assert!(cc.closed().await);
}

#[tokio::test]
async fn drain_stops_accepting_and_closes_idle_keepalive_only_after_its_next_request() {
    let b = backend(|_| ok("x")).await;
    let (proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    assert!(!c.send(&get("/"), false).await.expect("reply").closes());

    proxy.drain().await;
    // Not accepting any more: the listener copy is closed.
    assert!(Client::connect(addr).await.is_err());
    // The idle connection stays open: the client may be sending on it right now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .send(&get("/"), false)
        .await
        .expect("idle connection still served");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "draining answers with Connection: close");
    assert!(c.closed().await);
    proxy
        .finish(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(proxy.stats().active_connections, 0);
}

/// Connections that completed their handshake before the drain but were not accepted yet are
/// served, not reset when the listener closes (a reload that drops a bind).
#[tokio::test]
async fn a_graceful_drain_serves_the_connections_already_queued() {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let b = backend(|_| ok("queued")).await;
    // On this single-threaded runtime the accept loop has not run yet: these five wait in the
    // kernel's accept queue, as connections do between two accepts under load.
    let (proxy, addr) = start(&[b.addr]);
    let mut queued = Vec::new();
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(addr).expect("handshake done by the kernel");
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("request");
        s.set_nonblocking(true).expect("nonblocking");
        queued.push(tokio::net::TcpStream::from_std(s).expect("tokio stream"));
    }
    let replies = async {
        let mut out = Vec::new();
        for mut s in queued {
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            out.push((
                r.map(|r| r.is_ok()),
                String::from_utf8_lossy(&buf).into_owned(),
            ));
        }
        out
    };
    let ((), replies) = tokio::join!(
        proxy.finish(tokio::time::Instant::now() + Duration::from_secs(5)),
        replies
    );
    for (read, text) in replies {
        assert_eq!(read, Ok(true), "read to the end: {text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("queued"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    assert!(
        Client::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn drain_deadline_closes_what_is_left() {
    let b = backend(|_| ok("x")).await;
    let (proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    c.send(&get("/"), false).await.expect("reply");
    let t0 = std::time::Instant::now();
    proxy
        .finish(tokio::time::Instant::now() + Duration::from_millis(300))
        .await;
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(c.closed().await);
}

#[tokio::test]
async fn expect_continue_is_answered_by_the_proxy() {
    let b = backend(|s| ok(&format!("{} bytes", s.body.len()))).await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    c.io.stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("write");
    // The interim answer arrives before the body is sent.
    let mut seen = Vec::new();
    while !seen.ends_with(b"\r\n\r\n") {
        assert!(c.io.fill(util::T).await.expect("read") > 0);
        seen = c.io.buf.to_vec();
    }
    assert!(seen.starts_with(b"HTTP/1.1 100 Continue"));
    c.io.buf.clear();
    let r = c.send(b"abc", false).await.expect("reply");
    assert_eq!(r.text(), "3 bytes");
}

#[tokio::test]
async fn slow_request_head_is_408_and_silent_server_is_504() {
    let b = backend(|s| {
        if s.head.starts_with("GET /slow") {
            // Never answer in time: the proxy must give up at timeout_server.
            Action::Hang(Duration::from_secs(3))
        } else {
            ok("x")
        }
    })
    .await;
    let (_proxy, addr) = start_with(
        &[b.addr],
        "timeout_http_request = \"300ms\"\ntimeout_server = \"300ms\"",
    );
    let mut c = Client::connect(addr).await.expect("connect");
    c.io.stream
        .write_all(b"GET / HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let t0 = std::time::Instant::now();
    let r = c.read(false).await.expect("reply");
    assert_eq!(r.status, 408);
    assert!(t0.elapsed() < Duration::from_secs(2));

    let mut c = Client::connect(addr).await.expect("connect");
    let r = c.send(&get("/slow"), false).await.expect("reply");
    assert_eq!(r.status, 504);
}

#[tokio::test]
async fn pooled_connections_closed_by_the_server_are_not_reused() {
    let b = backend(|_| {
        Action::RespondClose(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    })
    .await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    for _ in 0..5 {
        let r = c.send(&get("/"), false).await.expect("reply");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        // Let the server's FIN arrive before the next request takes from the pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 5);
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        5,
        "each request answered once"
    );
}

#[tokio::test]
async fn server_connection_close_is_honoured_without_closing_the_client() {
    let b = backend(|_| {
        Action::RespondClose(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        )
    })
    .await;
    let (_proxy, addr) = start(&[b.addr]);
    let mut c = Client::connect(addr).await.expect("connect");
    for _ in 0..3 {
        let r = c.send(&get("/"), false).await.expect("reply");
        assert_eq!(r.text(), "ok");
        assert!(!r.closes(), "the server's close is hop-by-hop");
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 3);
}
