//! Malformed clients and broken servers: each answered with its status in bounded time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{self, START_TIMEOUT};
use crate::configs::{self, proxyd};
use crate::e2e::{Outcome, figure};
use crate::harness::{self, Env};

/// A server that answers every connection with `reply` (or nothing at all) and keeps it open.
async fn fake_server(reply: Option<&'static [u8]>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if let Some(r) = reply {
                    let _ = s.write_all(r).await;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    Ok(addr)
}

/// Sends raw bytes (then waits without closing) and returns the status line's code, or 0 if
/// the connection closed without one; with the time it took.
async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Result<(u16, Duration)> {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .with_context(|| format!("no answer within {limit:?}"))?;
    let text = String::from_utf8_lossy(&buf);
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, started.elapsed()))
}

pub(super) async fn bad_input(mut env: Env) -> Result<Outcome> {
    let names = vec!["app1".to_owned()];
    let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
    let garbage = fake_server(Some(b"this is not http\r\n\r\n")).await?;
    let silent = fake_server(None).await?;
    let dead = env.free_port(1)?;
    let fdkeeper = cluster::start_fdkeeper(&env, "n1", "fdkeeper-n1").await?;
    let fe: Vec<SocketAddr> = (0..4).map(|_| env.free_port(1)).collect::<Result<_>>()?;
    let admin = env.path("n1/proxyd-admin.sock");
    let mut config = configs::Proxyd {
        comment: "proxyd for lb-bad-input: one frontend per kind of server.",
        global: proxyd::Global::new(&admin, &fdkeeper.socket),
        defaults: proxyd::Defaults {
            timeout_http_request: Some("1s"),
            timeout_connect: Some("1s"),
            timeout_server: Some("1s"),
            timeout_queue: Some("1s"),
            retries: Some(1),
            ..proxyd::Defaults::default()
        },
        frontends: Vec::new(),
        backends: Vec::new(),
    };
    for (i, (name, server, check)) in [
        ("ok", backends[0].1, false),
        ("garbage", garbage, false),
        ("silent", silent, false),
        ("dead", dead, true),
    ]
    .into_iter()
    .enumerate()
    {
        config.frontends.push(proxyd::Frontend {
            name: name.into(),
            bind: vec![fe[i]],
            mode: None,
            default_backend: name.into(),
        });
        config.backends.push(proxyd::Backend {
            name: name.into(),
            balance: None,
            check: Some(proxyd::Check {
                http_get: None,
                inter: "100ms".into(),
                fall: 1,
            }),
            stick: None,
            servers: vec![proxyd::Server {
                check: Some(check),
                ..proxyd::Server::plain("s", server)
            }],
        });
    }
    let config = env.write("n1/proxyd.toml", &config.render())?;
    let mut proxyd = env.spawn(
        "proxyd-n1",
        harness::release_bin("proxyd"),
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await?;
    // The dead server is found down by its first check.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let limit = Duration::from_secs(5);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let cases: Vec<(&str, SocketAddr, Vec<u8>, u16)> = vec![
        ("malformed", fe[0], b"GET / HTTP/9.9 what\r\n\r\n".to_vec(), 400),
        ("no host", fe[0], b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("cl + te", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("two lengths", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), 400),
        ("obs-fold", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n".to_vec(), 400),
        ("bad chunk", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("slowloris", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), 408),
        ("huge head", fe[0], huge.into_bytes(), 431),
        ("garbage server", fe[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 502),
        ("silent server", fe[2], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 504),
        ("no server", fe[3], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 503),
        ("good", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 200),
    ];
    for (what, addr, bytes, want) in cases {
        let (got, took) = raw(addr, &bytes, limit)
            .await
            .with_context(|| format!("case {what}"))?;
        figure(what, format!("{got} in {} ms", took.as_millis()));
        ensure!(got == want, "{what}: status {got}, expected {want}");
    }
    ensure!(proxyd.is_running(), "proxyd exited");
    let st = cluster::proxyd_status(&admin).await?;
    let g = cluster::serving(&st).context("no serving generation")?;
    ensure!(
        g.restarts == 0,
        "the worker was restarted {} times",
        g.restarts
    );
    Ok(Outcome::Pass)
}
