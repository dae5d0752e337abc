//! WebSocket (and any `Upgrade`) through the proxy: the handshake reaches the server with its
//! `Upgrade` field, a 101 turns the connection into a tunnel both ways, counted while open,
//! closed when idle past `timeout_tunnel`, and kept by a draining proxy until its deadline.

mod util;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxyd::serve::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::T;

const HANDSHAKE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// What the WebSocket server got: each handshake head, and every byte after the heads.
#[derive(Clone, Default)]
struct Seen {
    heads: Arc<Mutex<Vec<String>>>,
    tunnel: Arc<Mutex<Vec<u8>>>,
}

/// A WebSocket server that answers the handshake with 101, greets first, then echoes every
/// byte; it records what it got.
async fn echo_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let (addr, seen) = recording_server().await;
    (addr, seen.heads)
}

async fn recording_server() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let all = Seen::default();
    let recorded = all.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = recorded.heads.clone();
            let tunnel = recorded.tunnel.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let upgrade = text.to_ascii_lowercase().contains("upgrade: websocket");
                seen.lock().expect("lock").push(text);
                if !upgrade {
                    let _ = s
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                // The 101 and the server's first frame in one write: the proxy must pass on
                // bytes that came with the head.
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello")
                    .await;
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            tunnel.lock().expect("lock").extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, all)
}

fn start(server: SocketAddr, defaults: &str) -> (Proxy, SocketAddr) {
    util::start_with(&[server], defaults)
}

/// Sends the handshake and reads the 101 head; returns the stream and what followed the head.
async fn open(addr: SocketAddr) -> (TcpStream, String, Vec<u8>) {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(HANDSHAKE).await.expect("handshake");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .expect("101 in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the 101: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    (c, head, got[end..].to_vec())
}

/// Reads until `want` bytes came (or the test timeout).
async fn read_exactly(c: &mut TcpStream, mut have: Vec<u8>, want: usize) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    while have.len() < want {
        let n = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed after {have:?}");
        have.extend_from_slice(&buf[..n]);
    }
    have
}

#[tokio::test]
async fn a_websocket_handshake_opens_a_tunnel_both_ways() {
    let (server, heads) = echo_server().await;
    let (proxy, addr) = start(server, "");
    let (mut c, head, early) = open(addr).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
    assert!(head.contains("Connection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    // The server's greeting came with its 101.
    let greeting = read_exactly(&mut c, early, 7).await;
    assert_eq!(greeting, b"\x81\x05hello");
    // A masked client frame, echoed back byte for byte.
    let frame = b"\x81\x84\x01\x02\x03\x04\x75\x67\x70\x70";
    c.write_all(frame).await.expect("frame");
    let echoed = read_exactly(&mut c, Vec::new(), frame.len()).await;
    assert_eq!(echoed, frame);
    assert_eq!(proxy.stats().tunnels_active, 1);
    // The server saw the handshake with what a WebSocket server needs.
    let seen = heads.lock().expect("lock")[0].clone();
    assert!(seen.contains("Upgrade: websocket\r\n"), "{seen}");
    assert!(seen.contains("Connection: upgrade\r\n"), "{seen}");
    assert!(
        seen.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        "{seen}"
    );
    // The client leaves: the tunnel closes and is no longer counted.
    drop(c);
    let deadline = Instant::now() + T;
    while proxy.stats().tunnels_active > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.stats().tunnels_active, 0);
}

#[tokio::test]
async fn upgrade_without_connection_upgrade_is_not_passed_on() {
    let (server, heads) = echo_server().await;
    let (_proxy, addr) = start(server, "");
    let mut c = util::Client::connect(addr).await.expect("connect");
    // `Upgrade` alone is not a request to switch (RFC 9110 §7.8): it is dropped.
    let r = c
        .send(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n\r\n",
            false,
        )
        .await
        .expect("reply");
    assert_eq!(r.status, 426);
    // Nor with a body.
    let r = c
        .send(b"POST /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi", false)
        .await
        .expect("reply");
    assert_eq!(r.status, 426);
    // Nor to h2c, which would let the client speak HTTP/2 to the server past the proxy.
    let r = c
        .send(b"GET / HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", false)
        .await
        .expect("reply");
    assert_eq!(r.status, 426);
    let seen = heads.lock().expect("lock").clone();
    assert_eq!(seen.len(), 3);
    for h in seen {
        assert!(!h.to_ascii_lowercase().contains("upgrade"), "{h}");
    }
}

#[tokio::test]
async fn an_idle_tunnel_closes_after_timeout_tunnel() {
    let (server, _) = echo_server().await;
    let (proxy, addr) = start(server, "timeout_tunnel = \"300ms\"");
    let (mut c, _, early) = open(addr).await;
    let _ = read_exactly(&mut c, early, 7).await;
    // Traffic keeps it open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.write_all(b"\x81\x80\x00\x00\x00\x00")
            .await
            .expect("ping");
        let _ = read_exactly(&mut c, Vec::new(), 6).await;
    }
    // Then silence: closed soon after 300 ms.
    let began = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, c.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let quiet = began.elapsed();
    assert!(
        quiet >= Duration::from_millis(250) && quiet < Duration::from_secs(2),
        "{quiet:?}"
    );
    assert_eq!(proxy.stats().tunnels_active, 0);
}

#[tokio::test]
async fn a_draining_proxy_keeps_its_tunnels_until_the_deadline_then_says_going_away() {
    let (server, seen) = recording_server().await;
    let (proxy, addr) = start(server, "");
    let proxy = Arc::new(proxy);
    let (mut c, _, early) = open(addr).await;
    let _ = read_exactly(&mut c, early, 7).await;
    let p = proxy.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    let finish = tokio::spawn(async move { p.finish(deadline).await });
    // Still carried while draining.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write_all(b"\x81\x80\x00\x00\x00\x00")
        .await
        .expect("frame");
    let echoed = read_exactly(&mut c, Vec::new(), 6).await;
    assert_eq!(echoed, b"\x81\x80\x00\x00\x00\x00");
    assert!(!finish.is_finished());
    // At the deadline: a close frame (1001, going away) each way, then the end.
    tokio::time::timeout(T, finish)
        .await
        .expect("drain ends")
        .expect("finish");
    let mut rest = Vec::new();
    tokio::time::timeout(T, c.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
    assert_eq!(rest, [0x88, 0x02, 0x03, 0xe9]);
    let to_server = seen.tunnel.lock().expect("lock").clone();
    let close = &to_server[to_server.len() - 8..];
    assert_eq!(
        &close[..2],
        &[0x88, 0x82],
        "a masked close frame: {to_server:?}"
    );
    let key = &close[2..6];
    assert_eq!([close[6] ^ key[0], close[7] ^ key[1]], [0x03, 0xe9]);
}

#[tokio::test]
async fn a_tunnel_cut_mid_frame_gets_no_close_frame_in_the_middle() {
    let (server, _) = recording_server().await;
    let (proxy, addr) = start(server, "");
    let (mut c, _, early) = open(addr).await;
    let _ = read_exactly(&mut c, early, 7).await;
    // Half a frame (a masked header announcing 10 bytes, 3 of them sent): the server echoes
    // it, so both directions stand inside a frame.
    c.write_all(&[0x81, 0x8a, 0, 0, 0, 0, b'a', b'b', b'c'])
        .await
        .expect("half a frame");
    let echoed = read_exactly(&mut c, Vec::new(), 9).await;
    assert_eq!(echoed.len(), 9);
    proxy
        .finish(tokio::time::Instant::now() + Duration::from_millis(100))
        .await;
    let mut rest = Vec::new();
    tokio::time::timeout(T, c.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
    assert!(rest.is_empty(), "{rest:?}");
}
