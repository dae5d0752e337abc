//! The http bench's sessions: each target stores its own (cookie-less requests, the Set-Cookie
//! values kept), is checked to route by them, and wrk scripts send them back.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::Kind;

/// `n` cookie-less requests (16 at a time) through `addr`: each session the answers set, with
/// the server that set it.
pub(super) async fn collect(addr: SocketAddr, n: usize) -> Result<Vec<(String, String)>> {
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(16);
    for w in 0..16 {
        let count = per.min(n.saturating_sub(w * per));
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                let a = exchange(addr, None).await?;
                ensure!(a.status == 200, "a cookie-less request got {}", a.status);
                let cookie = a
                    .set_cookie
                    .context("an answer without Set-Cookie: PHPSESSID")?;
                out.push((cookie, a.server.context("an answer without X-Server")?));
            }
            anyhow::Ok(out)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// Sessions checked per target before the runs.
pub(super) const STICKY_CHECKS: usize = 20;

/// Before measuring, makes sure the target really routes by the cookie: for the first sessions,
/// two requests each reach the same server, and with a stick table (proxyd, HAProxy) the server
/// that set the session. Without it a "sticky" run could be measuring plain round robin.
pub(super) async fn check_sticky(
    kind: Kind,
    addr: SocketAddr,
    sessions: &[(String, String)],
) -> Result<()> {
    let table = match kind {
        Kind::Proxyd | Kind::Haproxy => true,
        Kind::Nginx => false,
        // No rule to check: one server, or round robin on purpose.
        Kind::Direct | Kind::ProxydNoStick => return Ok(()),
    };
    for (cookie, origin) in sessions.iter().take(STICKY_CHECKS) {
        let a = exchange(addr, Some(cookie)).await?;
        let b = exchange(addr, Some(cookie)).await?;
        ensure!(
            a.status == 200 && b.status == 200,
            "session {cookie}: answers {} and {}",
            a.status,
            b.status
        );
        ensure!(
            a.server == b.server,
            "session {cookie} reached {:?}, then {:?}",
            a.server,
            b.server
        );
        ensure!(
            !table || a.server.as_deref() == Some(origin.as_str()),
            "session {cookie}, set by {origin}, reached {:?}",
            a.server
        );
    }
    Ok(())
}

/// What the bench reads from an answer.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The demo backend's `X-Server`.
    server: Option<String>,
    /// The `PHPSESSID` it set, if any.
    set_cookie: Option<String>,
}

/// One `GET /index.php` on a new connection (`Connection: close`), with the session if any.
async fn exchange(addr: SocketAddr, session: Option<&str>) -> Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cookie = session.map_or(String::new(), |c| format!("Cookie: PHPSESSID={c}\r\n"));
    let request =
        format!("GET /index.php HTTP/1.1\r\nHost: bench\r\n{cookie}Connection: close\r\n\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("no answer from {addr} within 10 s"))??;
    parse_answer(&buf)
}

/// Status, `X-Server` and `PHPSESSID` of an answer (header names in any case: HAProxy writes
/// them lower-case).
fn parse_answer(response: &[u8]) -> Result<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    ensure!(
        matches!(r.parse(response), Ok(httparse::Status::Complete(_))),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(response)
    );
    let value = |name: &str| {
        r.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .collect::<Vec<&str>>()
    };
    Ok(Answer {
        status: r.code.unwrap_or(0),
        server: value("x-server").first().map(|s| (*s).to_owned()),
        set_cookie: value("set-cookie")
            .iter()
            .find_map(|v| v.strip_prefix("PHPSESSID="))
            .and_then(|v| v.split(';').next())
            .map(str::to_owned),
    })
}

/// A wrk script that sends the `cookies` round robin to `path`, each request prepared once in
/// `init`.
pub(super) fn lua_script(cookies: &[String], close: bool, path: &str) -> String {
    let list: Vec<String> = cookies.iter().map(|c| format!("  \"{c}\",")).collect();
    let close = if close {
        "\n    [\"Connection\"] = \"close\","
    } else {
        ""
    };
    format!(
        r#"-- wrk: every request carries a PHPSESSID the target stored before (written by cargo xtask bench).
local cookies = {{
{}
}}
local requests = {{}}
local i = 0

function init(args)
  for k, c in ipairs(cookies) do
    requests[k] = wrk.format("GET", "{path}", {{
    ["Cookie"] = "PHPSESSID=" .. c,{close}
    }})
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end
"#,
        list.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_answers_in_any_case() {
        let haproxy = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-server: app2\r\nset-cookie: PHPSESSID=abc123; path=/\r\n\r\nhi\n";
        let a = parse_answer(haproxy).expect("answer");
        assert_eq!(
            a,
            Answer {
                status: 200,
                server: Some("app2".to_owned()),
                set_cookie: Some("abc123".to_owned())
            }
        );
        let other = b"HTTP/1.1 200 OK\r\nSet-Cookie: lang=en\r\nSet-Cookie: PHPSESSID=x9\r\nX-Server: app1\r\n\r\n";
        assert_eq!(
            parse_answer(other).expect("answer").set_cookie.as_deref(),
            Some("x9")
        );
        let a = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").expect("answer");
        assert_eq!((a.status, a.server, a.set_cookie), (503, None, None));
        assert!(parse_answer(b"garbage").is_err());
    }

    #[test]
    fn lua_script_sends_every_cookie() {
        let s = lua_script(&["aaa".to_owned(), "bbb".to_owned()], true, "/index.php");
        assert!(s.contains("\"aaa\",\n  \"bbb\","), "{s}");
        assert!(s.contains("[\"Connection\"] = \"close\""), "{s}");
        assert!(s.contains("wrk.format(\"GET\", \"/index.php\""), "{s}");
        let s = lua_script(&["aaa".to_owned()], false, "/1m");
        assert!(!s.contains("Connection") && s.contains("\"/1m\""), "{s}");
    }
}
