//! The load balancer proper in-process: health checks, forwardfor, maxconn and its queue,
//! cookie stickiness from the local cache, and TCP mode with `stick on src`.

mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::SourceFile;
use proxyd::Config;
use proxyd::serve::Proxy;
use proxyd::stick::{KeyKind, StickCache};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use util::{Action, Client, backend, get, ok};

/// A proxy on 127.0.0.1:0 for `text` (a whole proxyd.toml whose only frontend binds anything),
/// with health checks running and an optional stick cache.
fn start(text: &str, stick: Option<Arc<StickCache>>) -> (Proxy, SocketAddr, CancellationToken) {
    let config = Config::from_source(SourceFile::from_text("lb.toml", text)).expect("valid config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = Proxy::with_state(Arc::new(config), stick, &HashMap::new());
    let stop = CancellationToken::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    proxyd::health::spawn_all(proxy.shared(), tx, stop.clone());
    proxy
        .start(vec![(proxyd::config::BindRef::default(), listener)])
        .expect("start");
    (proxy, addr, stop)
}

fn config(
    mode: &str,
    defaults: &str,
    backend: &str,
    servers: &[(&str, SocketAddr, &str)],
) -> String {
    let mut s = format!(
        r#"[global]
admin_socket = "/nonexistent/a.sock"
fdkeeper_socket = "/nonexistent/f.sock"
stickd_socket = "/nonexistent/s.sock"

[defaults]
{defaults}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:1"]
mode = "{mode}"
default_backend = "be"

[[backend]]
name = "be"
{backend}
"#
    );
    for (name, addr, extra) in servers {
        s.push_str(&format!(
            "\n[[backend.server]]\nname = \"{name}\"\naddress = \"{addr}\"\n{extra}\n"
        ));
    }
    s
}

async fn body_of(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut c = Client::connect(addr).await.expect("connect");
    let r = c.send(raw, false).await.expect("reply");
    (r.status, r.text())
}

#[tokio::test]
async fn a_failing_check_takes_a_server_out_and_a_passing_one_brings_it_back() {
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let a = backend(|_| ok("a")).await;
    let b = backend(move |s| {
        if s.head.starts_with("GET /health") && !h.load(Ordering::SeqCst) {
            Action::Respond(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec())
        } else {
            ok("b")
        }
    })
    .await;
    let text = config(
        "http",
        "",
        "[backend.check]\ntype = \"http\"\npath = \"/health\"\ninter = \"30ms\"\nrise = 2\nfall = 2",
        &[("a", a.addr, "check = true"), ("b", b.addr, "check = true")],
    );
    let (_p, addr, _stop) = start(&text, None);
    let spread = |n| async move {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(body_of(addr, &get("/")).await.1);
        }
        got
    };
    assert!(spread(4).await.contains(&"b".to_owned()));
    healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(spread(6).await, vec!["a"; 6]);
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(spread(4).await.contains(&"b".to_owned()));
}

#[tokio::test]
async fn forwardfor_adds_the_client_address_unless_excepted() {
    let echo = backend(|s| {
        let xff = s
            .head
            .lines()
            .find_map(|l| l.strip_prefix("X-Forwarded-For: "))
            .unwrap_or("none")
            .to_owned();
        ok(&xff)
    })
    .await;
    let on = config("http", "forwardfor = true", "", &[("s", echo.addr, "")]);
    let (p, addr, _s) = start(&on, None);
    assert_eq!(body_of(addr, &get("/")).await.1, "127.0.0.1");
    // The access log's counters: per server and per frontend.
    let s = &p.shared().server_states()[0];
    assert_eq!((s.requests_total, s.responses_2xx, s.errors), (1, 1, 0));
    let (fe, _) = p.shared().frontend_backend_stats();
    assert_eq!((fe[0].requests_total, fe[0].connections_total), (1, 1));
    let except = config(
        "http",
        "forwardfor = true\nforwardfor_except = \"127.0.0.0/8\"",
        "",
        &[("s", echo.addr, "")],
    );
    let (_p2, addr2, _s2) = start(&except, None);
    assert_eq!(body_of(addr2, &get("/")).await.1, "none");
}

#[tokio::test]
async fn a_full_server_queues_then_answers_503_after_timeout_queue() {
    // The hanging request holds the only slot for the whole test.
    let hang = backend(|_| Action::Hang(Duration::from_secs(3))).await;
    let text = config(
        "http",
        "timeout_queue = \"200ms\"\ntimeout_server = \"5s\"",
        "",
        &[("s", hang.addr, "maxconn = 1")],
    );
    let (p, addr, _s) = start(&text, None);
    let mut first = Client::connect(addr).await.expect("connect");
    first.io.stream.write_all(&get("/")).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let (status, _) = body_of(addr, &get("/")).await;
    assert_eq!(status, 503);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    let (_, be) = p.shared().frontend_backend_stats();
    assert_eq!((be[0].no_server_total, be[0].queued), (1, 0));
}

#[tokio::test]
async fn a_session_cookie_sticks_to_its_server_from_the_local_cache() {
    let mk = |name: &'static str| {
        move |s: &util::Seen| {
            if s.head.contains("SID=") {
                ok(name)
            } else {
                let body = name;
                Action::Respond(
                    format!(
                        "HTTP/1.1 200 OK\r\nSet-Cookie: SID={name}-{}; path=/\r\nContent-Length: {}\r\n\r\n{body}",
                        s.nth,
                        body.len()
                    )
                    .into_bytes(),
                )
            }
        }
    };
    let a = backend(mk("a")).await;
    let b = backend(mk("b")).await;
    let text = config(
        "http",
        "",
        "[backend.stick]\ntable = \"t\"\non = \"req.cook(SID)\"\nstore_response = \"res.cook(SID)\"",
        &[("a", a.addr, ""), ("b", b.addr, "")],
    );
    let cache = Arc::new(StickCache::new(vec![("t".into(), KeyKind::Text)]));
    let (_p, addr, _s) = start(&text, Some(cache.clone()));
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(addr).await.expect("connect");
        let r = c.send(&get("/"), false).await.expect("reply");
        let cookie = r
            .head
            .lines()
            .find_map(|l| l.strip_prefix("Set-Cookie: SID="))
            .and_then(|v| v.split(';').next())
            .expect("a new session")
            .to_owned();
        sessions.push((cookie, r.text()));
    }
    assert_eq!(cache.len(0), 4);
    for (cookie, server) in &sessions {
        for _ in 0..3 {
            let req = format!("GET / HTTP/1.1\r\nHost: t\r\nCookie: x=1; SID={cookie}\r\n\r\n");
            assert_eq!(&body_of(addr, req.as_bytes()).await.1, server);
        }
    }
    // Unknown cookie: stored on the request (HAProxy's `stick on`), then sticks.
    let req = b"GET / HTTP/1.1\r\nHost: t\r\nCookie: SID=fresh\r\n\r\n";
    let first = body_of(addr, req).await.1;
    for _ in 0..3 {
        assert_eq!(body_of(addr, req).await.1, first);
    }
    assert_eq!(cache.len(0), 5);
}

async fn named_echo(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let mut out = name.as_bytes().to_vec();
                    out.push(b':');
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn tcp_round_trip(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn tcp_mode_forwards_both_ways_and_sticks_on_the_source_address() {
    let a = named_echo("a").await;
    let b = named_echo("b").await;
    let plain = config("tcp", "", "", &[("a", a, ""), ("b", b, "")]);
    let (_p, addr, _s) = start(&plain, None);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(tcp_round_trip(addr).await);
    }
    assert_eq!(seen, ["a:ping", "b:ping", "a:ping", "b:ping"]);

    let sticky = config(
        "tcp",
        "",
        "[backend.stick]\ntable = \"ips\"\non = \"src\"",
        &[("a", a, ""), ("b", b, "")],
    );
    let cache = Arc::new(StickCache::new(vec![("ips".into(), KeyKind::Address)]));
    let (_p2, addr2, _s2) = start(&sticky, Some(cache.clone()));
    let first = tcp_round_trip(addr2).await;
    for _ in 0..4 {
        assert_eq!(tcp_round_trip(addr2).await, first);
    }
    assert_eq!(cache.len(0), 1);
}

#[tokio::test]
async fn an_idle_tcp_session_is_closed_after_the_client_and_server_timeouts() {
    let a = named_echo("a").await;
    let text = config(
        "tcp",
        "timeout_client = \"300ms\"\ntimeout_server = \"200ms\"",
        "",
        &[("a", a, "")],
    );
    let (_p, addr, _s) = start(&text, None);
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"x").await.expect("write");
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"a:x");
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn http_mode_sticks_on_the_source_address_too() {
    let a = backend(|_| ok("a")).await;
    let b = backend(|_| ok("b")).await;
    let text = config(
        "http",
        "",
        "[backend.stick]\ntable = \"ips\"\non = \"src\"",
        &[("a", a.addr, ""), ("b", b.addr, "")],
    );
    let cache = Arc::new(StickCache::new(vec![("ips".into(), KeyKind::Address)]));
    let (_p, addr, _s) = start(&text, Some(cache.clone()));
    let first = body_of(addr, &get("/")).await.1;
    for _ in 0..5 {
        assert_eq!(body_of(addr, &get("/")).await.1, first);
    }
    assert_eq!(cache.len(0), 1);
    assert!(cache.lookup(0, "127.0.0.1").is_some());
}
