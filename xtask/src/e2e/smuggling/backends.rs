//! The smuggling scenario's backends, each recording every request it parses and every message
//! it could not: hyper (in-process), Python's http.server (a child process) and a raw-socket
//! backend that answers each tagged request with a given response.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::corpus;
use crate::cluster::START_TIMEOUT;
use crate::harness::{self, Env, Proc};

/// Largest request body a backend reads.
const MAX_BODY: usize = 1 << 20;
/// Raw bytes kept per connection, to find which variant a parse error belongs to.
const MAX_RAW: usize = 4 << 20;
/// A backend connection lives at most this long.
const CONN_TIMEOUT: Duration = Duration::from_secs(20);

/// What a backend made of some bytes on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Request {
        method: String,
        target: String,
        hosts: Vec<String>,
        body: usize,
    },
    /// The backend refused what it read (`raw`: the bytes it choked on, as far as known).
    Rejected { reason: String, raw: String },
    /// The connection closed in the middle of a message.
    Incomplete { reason: String, raw: String },
}

/// Raw bytes shown with a rejection: enough to recognise them, not a pooled connection's worth.
const SHOW_RAW: usize = 160;

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Request {
                method,
                target,
                hosts,
                body,
            } => write!(f, "{method} {target:?} hosts {hosts:?} body {body}"),
            Seen::Rejected { reason, raw } | Seen::Incomplete { reason, raw } => {
                let what = if matches!(self, Seen::Rejected { .. }) {
                    "rejected"
                } else {
                    "incomplete"
                };
                write!(f, "{what} ({}) at {:?}", cut(reason), cut(raw))
            }
        }
    }
}

/// The first [`SHOW_RAW`] characters of `s`, marked when cut.
fn cut(s: &str) -> String {
    let mut shown: String = s.chars().take(SHOW_RAW).collect();
    if shown.len() < s.len() {
        shown.push_str("...");
    }
    shown
}

/// `seen` as one line.
pub fn show(seen: &[Seen]) -> String {
    let all: Vec<String> = seen.iter().map(ToString::to_string).collect();
    format!("[{}]", all.join(", "))
}

#[derive(Clone, Debug)]
pub struct Event {
    pub conn: u64,
    /// Order on its connection.
    pub seq: u64,
    pub seen: Seen,
}

type Log = Arc<Mutex<Vec<Event>>>;

fn push(log: &Log, event: Event) {
    log.lock().unwrap_or_else(|e| e.into_inner()).push(event);
}

/// A stream that keeps a copy of what it reads.
struct Tee {
    inner: TcpStream,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tee {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let mut raw = this.raw.lock().unwrap_or_else(|e| e.into_inner());
            if raw.len() < MAX_RAW {
                raw.extend_from_slice(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl AsyncWrite for Tee {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A task that is aborted when its owner goes.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// hyper 1.x's HTTP/1 server in this process.
pub struct HyperBackend {
    pub addr: SocketAddr,
    log: Log,
    _task: Task,
}

impl HyperBackend {
    pub async fn start(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let log: Log = Arc::default();
        let task = tokio::spawn(hyper_accept(listener, Arc::clone(&log)));
        Ok(Self {
            addr,
            log,
            _task: Task(task),
        })
    }

    pub fn mark(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn events_since(&self, mark: usize) -> Vec<Event> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.get(mark..).unwrap_or_default().to_vec()
    }
}

async fn hyper_accept(listener: TcpListener, log: Log) {
    let conns = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let conn = conns.fetch_add(1, Ordering::Relaxed) + 1;
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, hyper_conn(stream, conn, log)).await;
        });
    }
}

async fn hyper_conn(stream: TcpStream, conn: u64, log: Log) {
    let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
    let seq = Arc::new(AtomicU64::new(0));
    // The tag of the last request hyper parsed here: raw bytes after it are what failed.
    let last_tag: Arc<Mutex<Option<String>>> = Arc::default();
    let io = TokioIo::new(Tee {
        inner: stream,
        raw: Arc::clone(&raw),
    });
    let service = {
        let (log, seq, last_tag) = (Arc::clone(&log), Arc::clone(&seq), Arc::clone(&last_tag));
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (log, seq, last_tag) = (Arc::clone(&log), Arc::clone(&seq), Arc::clone(&last_tag));
            async move {
                let target = req.uri().to_string();
                if let Some(id) = corpus::find_tag(&target, 'v') {
                    *last_tag.lock().unwrap_or_else(|e| e.into_inner()) = Some(corpus::tag(id));
                }
                let method = req.method().to_string();
                let hosts = req
                    .headers()
                    .get_all(hyper::header::HOST)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                let body = Limited::new(req.into_body(), MAX_BODY).collect().await;
                let seen = match body {
                    Ok(b) => Seen::Request {
                        method,
                        target,
                        hosts,
                        body: b.to_bytes().len(),
                    },
                    Err(e) => Seen::Incomplete {
                        reason: format!("body: {e}"),
                        raw: target,
                    },
                };
                let ok = matches!(seen, Seen::Request { .. });
                push(
                    &log,
                    Event {
                        conn,
                        seq: seq.fetch_add(1, Ordering::Relaxed) + 1,
                        seen,
                    },
                );
                let mut resp =
                    hyper::Response::new(Full::new(Bytes::from_static(b"server: hyper\n")));
                if !ok {
                    *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .serve_connection(io, service)
        .await;
    let Err(e) = result else { return };
    let text = String::from_utf8_lossy(&raw.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let tail = match last_tag
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        Some(t) => text
            .rfind(t)
            .map_or(text.as_str(), |at| &text[at + t.len()..]),
        None => text.as_str(),
    }
    .to_owned();
    let reason = e.to_string();
    let seen = if e.is_incomplete_message() || e.is_timeout() {
        Seen::Incomplete { reason, raw: tail }
    } else {
        Seen::Rejected { reason, raw: tail }
    };
    push(
        &log,
        Event {
            conn,
            seq: seq.fetch_add(1, Ordering::Relaxed) + 1,
            seen,
        },
    );
}

/// Python's http.server with a naive body reader (naive_backend.py), as a child process.
pub struct PythonBackend {
    pub addr: SocketAddr,
    record: PathBuf,
    _proc: Proc,
}

impl PythonBackend {
    pub async fn start(env: &Env, addr: SocketAddr) -> Result<Self> {
        let script = env.write("naive_backend.py", include_str!("naive_backend.py"))?;
        let record = env.path("python-backend.jsonl");
        std::fs::write(&record, "")?;
        let proc = env.spawn(
            "backend-python",
            "python3",
            [
                script.as_os_str(),
                addr.ip().to_string().as_ref(),
                addr.port().to_string().as_ref(),
                record.as_os_str(),
            ],
        )?;
        harness::wait_tcp(addr, START_TIMEOUT)
            .await
            .context("the Python backend did not start (is python3 on PATH?)")?;
        Ok(Self {
            addr,
            record,
            _proc: proc,
        })
    }

    pub fn mark(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.record)?.len())
    }

    pub fn events_since(&self, mark: u64) -> Result<Vec<Event>> {
        let all = std::fs::read(&self.record)?;
        let text = String::from_utf8_lossy(all.get(mark as usize..).unwrap_or_default());
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| python_event(l).with_context(|| format!("bad record line {l:?}")))
            .collect()
    }
}

fn python_event(line: &str) -> Result<Event> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let seen = match v["kind"].as_str() {
        Some("request") => Seen::Request {
            method: s("method"),
            target: s("target"),
            hosts: v["hosts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            body: v["body"].as_u64().context("no body length")? as usize,
        },
        Some("rejected") => Seen::Rejected {
            reason: s("reason"),
            raw: s("line"),
        },
        Some("incomplete") => Seen::Incomplete {
            reason: s("reason"),
            raw: s("line"),
        },
        other => anyhow::bail!("unknown kind {other:?}"),
    };
    Ok(Event {
        conn: v["conn"].as_u64().context("no conn")?,
        seq: v["seq"].as_u64().context("no seq")?,
        seen,
    })
}

/// Answers a request for `/rNNNN` with response NNNN's bytes, then closes; anything else (the
/// harness's readiness probe) gets a plain 200.
pub struct RawBackend {
    pub addr: SocketAddr,
    _task: Task,
}

impl RawBackend {
    pub async fn start(addr: SocketAddr, responses: Vec<Vec<u8>>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let responses = Arc::new(responses);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let responses = Arc::clone(&responses);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONN_TIMEOUT, raw_conn(stream, &responses)).await;
                });
            }
        });
        Ok(Self {
            addr,
            _task: Task(task),
        })
    }
}

async fn raw_conn(mut stream: TcpStream, responses: &[Vec<u8>]) -> io::Result<()> {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 || stream.read_buf(&mut head).await? == 0 {
            return Ok(());
        }
    }
    let line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default())
        .into_owned();
    let probe = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nserver: raw\n";
    let answer = corpus::find_tag(&line, 'r')
        .and_then(|id| responses.get(id))
        .map_or(&probe[..], Vec::as_slice);
    stream.write_all(answer).await?;
    stream.shutdown().await
}
