//! A frontend's L7 rules through the real proxyd binary (master + worker, fdkeeper in process)
//! where the e2e routing-matrix scenario (HTTP/1.1 only, release binaries) cannot look: the
//! same rules over HTTP/2 (h2c, curl), each part of an h2 request the rules read; the proxy's
//! own 400 to a head it could not parse; the stick rule of the backend a request is routed to.

mod util;

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::master::{self, Env};
use util::{Action, backend, cli};

/// The rules' `Strict-Transport-Security`, as the lower-cased heads read it.
const HSTS: &str = "max-age=63072000; includesubdomains";
/// curl's flag for HTTP/2 without TLS.
const H2C: &str = "--http2-prior-knowledge";

/// The rules under test, which the e2e routing-matrix scenario runs over HTTP/1.1.
const RULES: &str = include_str!("fixtures/routing-rules.toml");

/// A backend that answers with its name, then the request head it got.
async fn echo(name: &'static str) -> SocketAddr {
    backend(move |seen| {
        let body = format!("{name}\n{}", seen.head);
        Action::Respond(
            format!(
                "HTTP/1.1 200 OK\r\nX-Internal: secret\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await
    .addr
}

/// proxyd as a real master + worker on the rules, in front of three echoing backends.
async fn start() -> Env {
    let (web, api, stat) = (echo("web").await, echo("api").await, echo("static").await);
    let down = util::closed_port();
    let env = master::start(
        |dir, front| {
            let d = dir.display();
            format!(
                "[global]\nadmin_socket = \"{d}/proxyd/admin.sock\"\nfdkeeper_socket = \"{d}/fdk/lend.sock\"\n\n\
                 [defaults]\nretries = 1\n\n\
                 [[frontend]]\nname = \"www\"\nbind = [{{ address = \"{front}\", h2c = true }}]\ndefault_backend = \"web\"\n{RULES}\n\
                 [[backend]]\nname = \"web\"\n[[backend.server]]\nname = \"web1\"\naddress = \"{web}\"\n\
                 [[backend]]\nname = \"api\"\n[[backend.server]]\nname = \"api1\"\naddress = \"{api}\"\n\
                 [[backend]]\nname = \"static\"\n[[backend.server]]\nname = \"static1\"\naddress = \"{stat}\"\n\
                 [[backend]]\nname = \"down\"\n[[backend.server]]\nname = \"gone\"\naddress = \"{down}\"\n"
            )
        },
        |_| Stdio::inherit(),
    )
    .await;
    let check = cli(&["check"], &env.config);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    env
}

/// A response as curl printed it (`-i`): status, head (lower-cased) and body.
#[derive(Debug)]
struct Got {
    status: u16,
    head: String,
    body: String,
}

impl Got {
    fn backend(&self) -> &str {
        self.body.lines().next().unwrap_or("")
    }

    fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find(|l| l.starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim())
    }
}

async fn curl(env: &Env, path: &str, args: &[&str]) -> Got {
    let url = format!("http://{}{path}", env.front);
    let out = util::curl(&[&["-i"], args, &[&url]].concat()).await;
    assert!(out.status.success(), "curl {args:?} {path}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    Got {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// HTTP/2 requests that must each land on a named backend: every part of an h2 request the
/// rules read (`:authority` as the host, `:path` with its query, fields, cookies, `:method`, the
/// source), as the e2e routing-matrix scenario's HTTP/1.1 requests do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_land_on_the_backend_their_rules_name() {
    let env = start().await;
    let cases: &[(&str, &[&str], &str)] = &[
        ("/", &[], "web"),
        ("/", &["-H", "Host: api.example.com"], "api"),
        ("/", &["-H", "Host: API.example.COM:8443"], "api"),
        ("/", &["-H", "Host: a.b.cdn.example.com"], "static"),
        ("/static/app.js", &[], "static"),
        ("/img/logo.png?w=2", &[], "static"),
        ("/v2/users", &[], "api"),
        ("/", &["-H", "X-Backend: api"], "api"),
        ("/", &["-H", "Accept: image/webp"], "static"),
        ("/", &["-b", "a=1; canary=static"], "static"),
        ("/item/7", &["-X", "DELETE"], "api"),
        ("/item/7", &["-X", "PUT", "-d", "hi"], "api"),
        ("/", &["--interface", "127.0.0.3"], "api"),
        ("/reports/q3", &["--interface", "127.0.0.4"], "static"),
        ("/?a=1&to=api", &[], "api"),
    ];
    for (path, args, want) in cases {
        let mut all = vec![H2C];
        all.extend_from_slice(args);
        let got = curl(&env, path, &all).await;
        assert_eq!(got.status, 200, "{path} {args:?}: {got:?}");
        assert_eq!(got.backend(), *want, "{path} {args:?}: {got:?}");
        assert_eq!(
            got.field("strict-transport-security"),
            Some(HSTS),
            "{got:?}"
        );
        assert_eq!(got.field("x-internal"), None, "{got:?}");
    }
}

/// The answers rules give themselves, and the rewrites a backend sees, for HTTP/2 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_redirects_deny_return_and_rewrites() {
    let env = start().await;
    let redirects = [
        (
            "/old-shop?item=3",
            301,
            "https://shop.example.com/old-shop?item=3",
        ),
        ("/old-shop?a=b", 308, "https://shop.example.com/old-shop"),
        ("/login?next=/a", 302, "https://www.example.com:8080/login"),
        ("/moved?z=1", 307, "https://elsewhere.example.com/x"),
    ];
    for (path, status, location) in redirects {
        let got = curl(&env, path, &[H2C, "-H", "Host: www.example.com:8080"]).await;
        assert_eq!(got.status, status, "{path}: {got:?}");
        assert_eq!(got.field("location"), Some(location), "{path}: {got:?}");
        assert_eq!(got.field("strict-transport-security"), Some(HSTS));
    }

    let got = curl(&env, "/internal/metrics", &[H2C]).await;
    assert_eq!((got.status, got.body.as_str()), (403, "internal only\n"));
    assert_eq!(got.field("strict-transport-security"), Some(HSTS));
    let got = curl(&env, "/ping", &[H2C]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "pong\n"));
    assert_eq!(got.field("content-type"), Some("text/plain"));

    let got = curl(
        &env,
        "/rw/page?x=1",
        &[H2C, "-H", "X-Route: client", "-H", "X-Drop-Me: secret"],
    )
    .await;
    assert_eq!((got.status, got.backend()), (200, "web"), "{got:?}");
    let seen = got.body.to_ascii_lowercase();
    assert!(seen.contains("get /?x=1 http/1.1\r\n"), "{seen}");
    assert_eq!(seen.matches("x-route:").count(), 1, "{seen}");
    assert!(seen.contains("x-route: rewritten\r\n"), "{seen}");
    assert!(seen.contains("x-via: proxyd\r\n"), "{seen}");
    assert!(!seen.contains("x-drop-me"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_errors_carry_the_response_rules() {
    let env = start().await;
    // A 503 of the proxy's own, over HTTP/2: the backend's only server refuses connections.
    let got = curl(&env, "/", &[H2C, "-H", "Host: down.example.com"]).await;
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.body, "503 service unavailable\n");
    assert_eq!(
        got.field("strict-transport-security"),
        Some(HSTS),
        "{got:?}"
    );
    // A 400 to a request never parsed still gets the unconditional response rules.
    let mut s = tokio::net::TcpStream::connect(env.front)
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        .await
        .expect("write");
    let mut text = Vec::new();
    tokio::time::timeout(util::T, s.read_to_end(&mut text))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&text).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 400 "), "{text}");
    assert!(
        text.contains(&format!("strict-transport-security: {HSTS}\r\n")),
        "{text}"
    );
}

/// A request routed to another backend takes that backend's stick rule and servers: the
/// default backend has none, the routed one sticks on a cookie (in-process proxy, local cache).
#[tokio::test]
async fn a_routed_request_uses_the_stick_rule_of_the_backend_it_was_routed_to() {
    use proxyd::stick::{KeyKind, StickCache};
    use std::sync::Arc;
    let web = echo("web").await;
    let (a, b) = (echo("a").await, echo("b").await);
    let text = format!(
        "[global]\nadmin_socket = \"/nonexistent/a.sock\"\nfdkeeper_socket = \"/nonexistent/f.sock\"\nstickd_socket = \"/nonexistent/s.sock\"\n\
         [[frontend]]\nname = \"fe\"\nbind = [\"127.0.0.1:1\"]\ndefault_backend = \"web\"\n\
         [[frontend.rule]]\nwhen = {{ host = \"sticky.example.com\" }}\nuse_backend = \"sticky\"\n\
         [[backend]]\nname = \"web\"\n[[backend.server]]\nname = \"web1\"\naddress = \"{web}\"\n\
         [[backend]]\nname = \"sticky\"\n[backend.stick]\ntable = \"t\"\non = \"req.cook(SID)\"\n\
         [[backend.server]]\nname = \"a\"\naddress = \"{a}\"\n[[backend.server]]\nname = \"b\"\naddress = \"{b}\"\n"
    );
    let config = proxyd::Config::from_source(common::SourceFile::from_text("st.toml", text))
        .expect("valid config");
    let cache = Arc::new(StickCache::new(vec![("t".into(), KeyKind::Text)]));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = proxyd::serve::Proxy::with_state(
        Arc::new(config),
        Some(cache.clone()),
        &std::collections::HashMap::new(),
    );
    proxy
        .start(vec![(proxyd::config::BindRef::default(), listener)])
        .expect("start");
    let server_of = |host: &'static str, sid: &'static str| async move {
        let mut c = util::Client::connect(addr).await.expect("connect");
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nCookie: SID={sid}\r\n\r\n");
        let r = c.send(raw.as_bytes(), false).await.expect("reply");
        r.text().lines().next().unwrap_or("").to_owned()
    };
    // The default backend has no stick rule: nothing is stored.
    assert_eq!(server_of("www.example.com", "k0").await, "web");
    assert_eq!(cache.len(0), 0);
    for sid in ["k1", "k2", "k3", "k4"] {
        let first = server_of("sticky.example.com", sid).await;
        assert!(first == "a" || first == "b", "{first}");
        for _ in 0..3 {
            assert_eq!(server_of("sticky.example.com", sid).await, first, "{sid}");
        }
    }
    assert_eq!(cache.len(0), 4);
}
