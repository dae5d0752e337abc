//! The L7 rules scenario: one proxyd node (fdkeeper + proxyd, release binaries) whose frontend
//! routes HTTP/1.1 to three backends by host, path, header, cookie, method, source and query,
//! redirects, denies, returns, rewrites headers, and edits every answer's fields (HSTS added,
//! a backend's internal field removed), the proxy's own 503 included. The same rules over
//! HTTP/2, the proxy's own 400, and stick rules of a routed backend are proxyd's tests/rules.rs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use super::{Outcome, Scenario, figure};
use crate::cluster::{self, START_TIMEOUT};
use crate::harness::{self, Env};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "routing-matrix",
        "three backends behind [[frontend.rule]]s: 24 requests each land on their named backend (host, path, header, cookie, method, source, query); redirects (301, 302, 307, 308) with their Location; a deny; a return; rewrites seen at the backend; response field rules on every answer, the proxy's own 503 included",
        90,
        |env| Box::pin(routing_matrix(env)),
    )]
}

const HSTS: &str = "max-age=63072000; includeSubDomains";

/// The frontend's rules, shared with proxyd's tests/rules.rs, which runs them over HTTP/2.
const RULES: &str = include_str!("../../../proxyd/tests/fixtures/routing-rules.toml");

/// A backend that answers every request with `server: NAME` and the request head it got, and a
/// field of its own that a response rule removes.
async fn echo(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // The proxy pools its connections: each request is read to its end and answered
            // with a length, then the next one.
            loop {
                let end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end);
                // The proxy sends bodies with a length (the scenario's are small).
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < length {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..length);
                let body = format!("server: {name}\n{head}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Internal: secret\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A response as a raw client reads it.
#[derive(Debug)]
struct Got {
    status: u16,
    /// Lower-cased.
    head: String,
    body: String,
}

impl Got {
    fn server(&self) -> &str {
        self.body
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("server: "))
            .unwrap_or("-")
    }

    /// The answer carries the frontend's HSTS rule (the head is lower-cased).
    fn has_hsts(&self) -> bool {
        self.field("strict-transport-security") == Some(HSTS.to_ascii_lowercase().as_str())
    }

    fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}:");
        self.head
            .lines()
            .find(|l| l.starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim())
    }
}

/// One request on a fresh connection from `src`, read until the proxy closes.
async fn request(front: SocketAddr, src: IpAddr, raw: &str) -> Result<Got> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("cannot bind {src}"))?;
    let fut = async {
        let mut s = sock.connect(front).await?;
        s.write_all(raw.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("no answer within 10s")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no complete head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok(Got {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

fn get(path: &str, host: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
}

async fn routing_matrix(mut env: Env) -> Result<Outcome> {
    let mut servers = Vec::new();
    for name in ["web", "api", "static"] {
        let addr = env.free_port(2)?;
        let l = TcpListener::bind(addr).await?;
        tokio::spawn(echo(l, name));
        servers.push((name, addr));
    }
    // A server nobody listens on: the proxy answers 503 itself.
    let gone = env.free_port(2)?;
    let fdk = cluster::start_fdkeeper(&env, "n1", "fdkeeper").await?;
    let front = env.free_port(1)?;
    let admin = env.path("n1/proxyd-admin.sock");
    let mut text = format!(
        "[global]\nadmin_socket = \"{}\"\nfdkeeper_socket = \"{}\"\n\n[defaults]\nretries = 1\n\n\
         [[frontend]]\nname = \"www\"\nbind = [\"{front}\"]\ndefault_backend = \"web\"\n{RULES}\n",
        admin.display(),
        fdk.socket.display()
    );
    for (name, addr) in servers.iter().chain([("down", gone)].iter()) {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\n[[backend.server]]\nname = \"{name}1\"\naddress = \"{addr}\"\n\n"
        ));
    }
    let config = env.write("n1/proxyd.toml", &text)?;
    let _proxyd = env.spawn(
        "proxyd",
        harness::release_bin("proxyd"),
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_for("the frontend to answer 200", START_TIMEOUT, || async move {
        Ok(cluster::probe(front, Duration::from_secs(5)).await.ok())
    })
    .await?;

    let lo = |n: u8| IpAddr::from([127, 0, 0, n]);
    let matrix: Vec<(&str, IpAddr, String, &str)> = vec![
        ("no rule", lo(1), get("/", "www.example.com", ""), "web"),
        ("exact host", lo(1), get("/", "api.example.com", ""), "api"),
        ("host case and port", lo(1), get("/", "API.example.COM:8443", ""), "api"),
        ("wildcard host", lo(1), get("/", "eu.api.example.com", ""), "api"),
        ("wildcard is one label", lo(1), get("/", "a.eu.api.example.com", ""), "web"),
        ("suffix host", lo(1), get("/", "a.b.cdn.example.com", ""), "static"),
        ("path prefix", lo(1), get("/static/app.js", "www.example.com", ""), "static"),
        ("second prefix", lo(1), get("/img/logo.png?w=2", "www.example.com", ""), "static"),
        ("near miss prefix", lo(1), get("/images", "www.example.com", ""), "web"),
        ("path regex", lo(1), get("/v2/users", "www.example.com", ""), "api"),
        ("header equals", lo(1), get("/", "www.example.com", "X-Backend: api\r\n"), "api"),
        ("other header value", lo(1), get("/", "www.example.com", "X-Backend: web\r\n"), "web"),
        ("header regex", lo(1), get("/", "www.example.com", "Accept: image/webp\r\n"), "static"),
        ("cookie", lo(1), get("/", "www.example.com", "Cookie: a=1; canary=static\r\n"), "static"),
        ("other cookie value", lo(1), get("/", "www.example.com", "Cookie: canary=web\r\n"), "web"),
        (
            "method",
            lo(1),
            "DELETE /item/7 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n".into(),
            "api",
        ),
        (
            "method with body",
            lo(1),
            "PUT /item/7 HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi".into(),
            "api",
        ),
        (
            "other method",
            lo(1),
            "POST /item/7 HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi".into(),
            "web",
        ),
        ("source address", lo(3), get("/", "www.example.com", ""), "api"),
        ("source and path", lo(4), get("/reports/q3", "www.example.com", ""), "static"),
        ("source, other path", lo(4), get("/", "www.example.com", ""), "web"),
        ("query", lo(1), get("/?a=1&to=api", "www.example.com", ""), "api"),
        ("near miss query", lo(1), get("/?to=apix", "www.example.com", ""), "web"),
        ("first rule wins", lo(1), get("/static/x", "api.example.com", ""), "api"),
    ];
    ensure!(
        matrix.len() == 24,
        "the matrix has {} requests",
        matrix.len()
    );
    for (what, src, raw, want) in &matrix {
        let got = request(front, *src, raw)
            .await
            .with_context(|| what.to_string())?;
        ensure!(
            got.status == 200 && got.server() == *want,
            "{what}: wanted {want}, got {} from {}",
            got.status,
            got.server()
        );
        ensure!(got.has_hsts(), "{what}: no HSTS in {:?}", got.head);
        ensure!(
            got.field("x-internal").is_none(),
            "{what}: the backend's X-Internal reached the client"
        );
    }
    figure(
        "routed",
        format!("{} requests, each on its named backend", matrix.len()),
    );

    let redirects = [
        (
            get("/old-shop?item=3", "www.example.com", ""),
            301,
            "https://shop.example.com/old-shop?item=3",
        ),
        (
            get("/old-shop?a=b", "www.example.com", ""),
            308,
            "https://shop.example.com/old-shop",
        ),
        (
            get("/login?next=/a", "www.example.com:8080", ""),
            302,
            "https://www.example.com:8080/login",
        ),
        (
            get("/moved?z=1", "www.example.com", ""),
            307,
            "https://elsewhere.example.com/x",
        ),
    ];
    for (raw, status, location) in &redirects {
        let got = request(front, lo(1), raw).await?;
        ensure!(
            got.status == *status && got.field("location") == Some(location),
            "redirect: wanted {status} to {location}, got {} {:?}",
            got.status,
            got.field("location")
        );
        ensure!(got.has_hsts(), "redirect without HSTS");
    }
    figure(
        "redirects",
        "301 with prefix and query, 308 with prefix without query, 302 to https without query, 307 to a fixed location",
    );

    let got = request(
        front,
        lo(1),
        &get("/internal/metrics", "www.example.com", ""),
    )
    .await?;
    ensure!(
        got.status == 403 && got.body == "internal only\n" && got.server() == "-",
        "deny: got {} {:?}",
        got.status,
        got.body
    );
    ensure!(got.has_hsts(), "deny without HSTS");

    let got = request(front, lo(1), &get("/ping", "www.example.com", "")).await?;
    ensure!(
        got.status == 200
            && got.body == "pong\n"
            && got.field("content-type") == Some("text/plain")
            && got.server() == "-",
        "return: got {} {:?} {:?}",
        got.status,
        got.field("content-type"),
        got.body
    );
    ensure!(got.has_hsts(), "return without HSTS");

    let got = request(
        front,
        lo(1),
        &get(
            "/rw/page?x=1",
            "www.example.com",
            "X-Route: client\r\nX-Drop-Me: secret\r\n",
        ),
    )
    .await?;
    let seen = got.body.to_ascii_lowercase();
    ensure!(
        got.server() == "web"
            && seen.contains("get /?x=1 http/1.1\r\n")
            && seen.matches("x-route:").count() == 1
            && seen.contains("x-route: rewritten\r\n")
            && seen.contains("x-via: proxyd\r\n")
            && !seen.contains("x-drop-me"),
        "rewrites not seen at the backend: {seen}"
    );
    figure(
        "rewrites at the backend",
        "path /rw/page -> /, X-Route set once, X-Via added, X-Drop-Me removed",
    );

    let got = request(front, lo(1), &get("/", "down.example.com", "")).await?;
    ensure!(
        got.status == 503 && got.body == "503 service unavailable\n",
        "down backend: got {} {:?}",
        got.status,
        got.body
    );
    ensure!(
        got.has_hsts(),
        "the proxy's own 503 has no HSTS: {:?}",
        got.head
    );
    figure(
        "HSTS",
        "on every answer: routed, redirected, denied, returned and the proxy's own 503",
    );
    drop(fdk);
    Ok(Outcome::Pass)
}
