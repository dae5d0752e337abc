//! One load client: its requests on keep-alive or fresh connections, each response read and judged.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{FailKind, LoadConfig, Shared};

pub(super) struct Client {
    pub(super) config: Arc<LoadConfig>,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: CancellationToken,
    pub(super) keep_alive: bool,
    /// Pause up to this long between requests (idle on its keep-alive connection meanwhile).
    pub(super) think: Option<Duration>,
    pub(super) deadline: Instant,
    pub(super) started: Instant,
}

/// Decrements the in-flight gauge however the request ends.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::SeqCst);
        Self(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A successful exchange.
struct Answer {
    /// The server asked to close the connection after this response.
    close: bool,
}

impl Client {
    pub(super) async fn run(self) -> Vec<u32> {
        let mut latencies = Vec::new();
        let mut conn: Option<TcpStream> = None;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xtask-load\r\n{}\r\n",
            self.config.path,
            self.config.target,
            if self.keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        );
        loop {
            if self.stop.is_cancelled() || Instant::now() >= self.deadline {
                break;
            }
            if self.shared.issued.fetch_add(1, Ordering::SeqCst) >= self.config.max_requests {
                break;
            }
            let begun = Instant::now();
            // In flight first, then no longer idle: a watcher never sees this connection in neither.
            let guard = InFlight::new(&self.shared.in_flight);
            if conn.is_some() {
                self.shared.idle_keepalive.fetch_sub(1, Ordering::SeqCst);
            }
            let reused = conn.is_some();
            let result = tokio::time::timeout(
                self.config.request_timeout,
                self.exchange(&mut conn, request.as_bytes(), reused),
            )
            .await
            .unwrap_or_else(|_| Err((FailKind::Timeout, "no complete response in time".into())));
            match result {
                Ok(answer) => {
                    self.shared.ok.fetch_add(1, Ordering::SeqCst);
                    let us = begun.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    latencies.push(us);
                    if answer.close || !self.keep_alive {
                        drop(guard);
                        if self.keep_alive {
                            self.shared.close_reconnects.fetch_add(1, Ordering::SeqCst);
                        }
                        if let Some(c) = conn.take() {
                            wait_server_close(c).await;
                        }
                    } else {
                        // Idle first, then no longer in flight (see above).
                        self.shared.idle_keepalive.fetch_add(1, Ordering::SeqCst);
                        drop(guard);
                    }
                    if let Some(max) = self.think {
                        let pause = max.mul_f64(rand::random::<f64>());
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = self.stop.cancelled() => {}
                        }
                    }
                }
                Err((kind, why)) => {
                    drop(guard);
                    conn = None;
                    self.record_failure(kind, &why, reused);
                    // Do not spin on a dead address; the load must stay a load, not a flood.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        if conn.is_some() {
            self.shared.idle_keepalive.fetch_sub(1, Ordering::SeqCst);
        }
        latencies
    }

    fn record_failure(&self, kind: FailKind, why: &str, reused: bool) {
        self.shared.failures[kind.index()].fetch_add(1, Ordering::SeqCst);
        if let Ok(mut s) = self.shared.samples.lock()
            && s.len() < 20
        {
            s.push(format!(
                "+{:.3}s {} ({} connection): {why}",
                self.started.elapsed().as_secs_f64(),
                kind.name(),
                if reused { "reused" } else { "new" }
            ));
        }
    }

    /// One request/response on `conn` (connecting first if needed).
    async fn exchange(
        &self,
        conn: &mut Option<TcpStream>,
        request: &[u8],
        reused: bool,
    ) -> Result<Answer, (FailKind, String)> {
        if conn.is_none() {
            let s = TcpStream::connect(self.config.target)
                .await
                .map_err(|e| (classify(&e, false), format!("connect: {e}")))?;
            let _ = s.set_nodelay(true);
            self.shared.connections.fetch_add(1, Ordering::SeqCst);
            *conn = Some(s);
        }
        let Some(stream) = conn.as_mut() else {
            return Err((FailKind::Other, "no connection".into()));
        };
        if let Err(e) = stream.write_all(request).await {
            return Err((classify(&e, false), format!("write (reused {reused}): {e}")));
        }
        read_response(stream, &self.config.expect_servers).await
    }
}

/// After a `Connection: close` response, lets the server close first (so TIME_WAIT stays on its
/// side), without waiting long for it.
async fn wait_server_close(mut stream: TcpStream) {
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The kind of failure an I/O error means; `got_bytes`: part of the response had arrived.
pub fn classify(e: &std::io::Error, got_bytes: bool) -> FailKind {
    match e.kind() {
        ErrorKind::ConnectionRefused => FailKind::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            if !got_bytes =>
        {
            FailKind::Reset
        }
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            FailKind::Truncated
        }
        ErrorKind::TimedOut => FailKind::Timeout,
        _ => FailKind::Other,
    }
}

/// One response as read off the wire.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// The server asked to close the connection after this response.
    pub close: bool,
    /// The first `Set-Cookie` header's value.
    pub set_cookie: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The server name in a demo backend's body (its `server: NAME` line).
    pub fn server(&self) -> Option<&str> {
        std::str::from_utf8(&self.body)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("server: "))
    }
}

/// Reads one response: head, then exactly Content-Length body bytes; any status.
pub async fn read_reply(stream: &mut TcpStream) -> Result<Reply, (FailKind, String)> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (status, close, set_cookie, body_start, content_length) = loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| (classify(&e, !buf.is_empty()), format!("read head: {e}")))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                (FailKind::Reset, "closed before any response byte".into())
            } else {
                (
                    FailKind::Truncated,
                    format!("closed after {} head bytes", buf.len()),
                )
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let mut close = resp.version == Some(0);
                let mut len = None;
                let mut set_cookie = None;
                for h in resp.headers.iter() {
                    let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("connection") {
                        let v = v.to_ascii_lowercase();
                        close = v.contains("close") || (close && !v.contains("keep-alive"));
                    } else if h.name.eq_ignore_ascii_case("content-length") {
                        len = v.parse::<usize>().ok();
                    } else if h.name.eq_ignore_ascii_case("set-cookie") && set_cookie.is_none() {
                        set_cookie = Some(v.to_owned());
                    }
                }
                let Some(len) = len else {
                    return Err((
                        FailKind::Other,
                        "response without a valid content-length".into(),
                    ));
                };
                break (resp.code.unwrap_or(0), close, set_cookie, head_len, len);
            }
            Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
                return Err((FailKind::Other, "response head too large".into()));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err((FailKind::Other, format!("malformed response: {e}"))),
        }
    };
    while buf.len() < body_start + content_length {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| (classify(&e, true), format!("read body: {e}")))?;
        if n == 0 {
            return Err((
                FailKind::Truncated,
                format!(
                    "closed after {} of {content_length} body bytes",
                    buf.len() - body_start
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.len() > body_start + content_length {
        return Err((FailKind::Other, "bytes after the response body".into()));
    }
    buf.drain(..body_start);
    Ok(Reply {
        status,
        close,
        set_cookie,
        body: buf,
    })
}

/// Reads one response and checks it: status 200, and a body naming one of `expect_servers`.
async fn read_response(
    stream: &mut TcpStream,
    expect_servers: &[String],
) -> Result<Answer, (FailKind, String)> {
    let reply = read_reply(stream).await?;
    if reply.status != 200 {
        return Err((FailKind::BadStatus, format!("status {}", reply.status)));
    }
    if !expect_servers.is_empty()
        && !expect_servers
            .iter()
            .any(|s| reply.server() == Some(s.as_str()))
    {
        return Err((
            FailKind::Other,
            format!(
                "unexpected body: {:?}",
                String::from_utf8_lossy(&reply.body)
            ),
        ));
    }
    Ok(Answer { close: reply.close })
}
