//! Helpers for proxyd's integration tests: a scriptable HTTP backend and a raw HTTP client;
//! the real binary in [`master`], certificates and TLS clients in [`tls`].
#![allow(dead_code)]

pub mod master;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Buf;
use proxyd::http::body;
use proxyd::http::head;
use proxyd::net::Io;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const T: Duration = Duration::from_secs(5);

/// The proxyd binary cargo built for these tests.
pub const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

/// `proxyd ARGS --config FILE` (a command of the operator's: check, reload, status...), run to
/// its end.
pub fn cli(args: &[&str], config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(PROXYD)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run proxyd")
}

/// What the backend does with one request.
pub enum Action {
    Respond(Vec<u8>),
    /// Close the connection without answering.
    Close,
    /// Say nothing for this long, then close.
    Hang(Duration),
    /// Answer, then close the connection without having said so.
    RespondClose(Vec<u8>),
    /// Answer after this long.
    RespondAfter(Duration, Vec<u8>),
    /// Answer, then send more bytes nobody asked for, in a write of their own.
    RespondThen(Vec<u8>, Vec<u8>),
    /// Send the answer a byte at a time, one every this long.
    Trickle(Vec<u8>, Duration),
}

/// A request as the backend saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: String,
    pub body: Vec<u8>,
    /// 0-based index of the request on its connection.
    pub nth: usize,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

/// Starts a backend on 127.0.0.1:0 that answers each request with `script`.
pub async fn backend<F>(script: F) -> Backend
where
    F: Fn(&Seen) -> Action + Send + Sync + 'static,
{
    backend_at("127.0.0.1:0".parse().expect("address"), script).await
}

/// Starts a backend on `at` (another loopback address, a port chosen before) that answers each
/// request with `script`.
pub async fn backend_at<F>(at: SocketAddr, script: F) -> Backend
where
    F: Fn(&Seen) -> Action + Send + Sync + 'static,
{
    let listener = TcpListener::bind(at).await.expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            let r = r.clone();
            tokio::spawn(async move {
                let mut io = Io::new(stream);
                let mut nth = 0;
                loop {
                    let req = loop {
                        match head::parse_request(&io.buf) {
                            Ok(Some(h)) => break h,
                            Ok(None) => {}
                            Err(_) => return,
                        }
                        match io.fill(T).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    };
                    let head_text = String::from_utf8_lossy(&io.buf[..req.len]).into_owned();
                    io.buf.advance(req.len);
                    let mut raw = Vec::new();
                    let mut out = Vec::new();
                    if body::forward(&mut io, &mut raw, req.framing, &mut out, T)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let seen = Seen {
                        head: head_text,
                        body: raw,
                        nth,
                    };
                    nth += 1;
                    match script(&seen) {
                        Action::Respond(bytes) => {
                            if io.stream.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Action::Close => return,
                        Action::RespondClose(bytes) => {
                            let _ = io.stream.write_all(&bytes).await;
                            return;
                        }
                        Action::Hang(d) => {
                            tokio::time::sleep(d).await;
                            return;
                        }
                        Action::RespondAfter(d, bytes) => {
                            tokio::time::sleep(d).await;
                            if io.stream.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Action::RespondThen(bytes, stray) => {
                            if io.stream.write_all(&bytes).await.is_err()
                                || io.stream.flush().await.is_err()
                                || io.stream.write_all(&stray).await.is_err()
                            {
                                return;
                            }
                        }
                        Action::Trickle(bytes, every) => {
                            for b in bytes {
                                if io.stream.write_all(&[b]).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(every).await;
                            }
                        }
                    }
                }
            });
        }
    });
    Backend {
        addr,
        connections,
        requests,
    }
}

pub fn ok(body: &str) -> Action {
    Action::Respond(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn closes(&self) -> bool {
        self.head.to_ascii_lowercase().contains("connection: close")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection to the proxy, over TCP or anything else (a TLS stream).
pub struct Client<S = TcpStream> {
    pub io: Io<S>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        Ok(Client {
            io: Io::new(TcpStream::connect(addr).await?),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client on a stream already set up.
    pub fn over(stream: S) -> Client<S> {
        Client {
            io: Io::new(stream),
        }
    }

    /// Sends raw bytes and reads one response (`is_head` for responses without a body).
    pub async fn send(&mut self, raw: &[u8], is_head: bool) -> std::io::Result<Reply> {
        self.io.stream.write_all(raw).await?;
        self.read(is_head).await
    }

    pub async fn read(&mut self, is_head: bool) -> std::io::Result<Reply> {
        let resp = loop {
            match head::parse_response(&self.io.buf, is_head) {
                Ok(Some(r)) if r.is_informational() => {
                    self.io.buf.advance(r.len);
                    continue;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(e) => {
                    return Err(std::io::Error::other(format!("bad response: {e:?}")));
                }
            }
            if self.io.fill(T).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head_text = String::from_utf8_lossy(&self.io.buf[..resp.len]).into_owned();
        self.io.buf.advance(resp.len);
        let mut body_bytes = Vec::new();
        let mut out = Vec::new();
        body::forward(&mut self.io, &mut body_bytes, resp.framing, &mut out, T)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Reply {
            status: resp.status,
            head: head_text,
            body: body_bytes,
        })
    }

    /// True when the proxy closed the connection (EOF) within the test timeout.
    pub async fn closed(&mut self) -> bool {
        matches!(self.io.fill(T).await, Ok(0) | Err(_))
    }
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// `curl -sS ARGS`, bounded; awaited, since the proxy may run on the test's runtime.
pub async fn curl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("run curl")
}

/// A local port nobody listens on (bound and released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Starts a proxy on 127.0.0.1:0 in front of `servers`, with `defaults` as its `[defaults]`.
pub fn start_with(servers: &[SocketAddr], defaults: &str) -> (proxyd::serve::Proxy, SocketAddr) {
    let dir = std::path::Path::new("/nonexistent");
    let text = format!(
        "{}\n[defaults]\n{defaults}\n",
        config_text(dir, "127.0.0.1:0", servers, "")
    );
    let config = proxyd::Config::from_source(common::SourceFile::from_text("test.toml", text))
        .expect("valid config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = proxyd::serve::Proxy::new(Arc::new(config));
    proxy
        .start(vec![(proxyd::config::BindRef::default(), listener)])
        .expect("start");
    (proxy, addr)
}

/// A proxyd config with one frontend and one backend of the given servers.
pub fn config_text(
    dir: &std::path::Path,
    bind: &str,
    servers: &[SocketAddr],
    extra_global: &str,
) -> String {
    let servers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("s{i}"), a.to_string(), ""))
        .collect();
    config_text_with(dir, bind, extra_global, "", &servers)
}

/// A proxyd config: `extra_global` after `[global]`'s keys (more keys or whole sections), one
/// frontend on `bind`, and backend `app` with `backend` keys and `servers` (name, address, more
/// keys).
pub fn config_text_with(
    dir: &std::path::Path,
    bind: &str,
    extra_global: &str,
    backend: &str,
    servers: &[(impl std::fmt::Display, String, &str)],
) -> String {
    // Keys, when there are any, end their line.
    let keys = |k: &str| {
        if k.is_empty() {
            String::new()
        } else {
            format!("{k}\n")
        }
    };
    let mut s = format!(
        "[global]\nadmin_socket = \"{}/proxyd/admin.sock\"\nfdkeeper_socket = \"{}/fdk/lend.sock\"\n{extra_global}\n\n\
         [[frontend]]\nname = \"www\"\nbind = [\"{bind}\"]\ndefault_backend = \"app\"\n\n[[backend]]\nname = \"app\"\n{}",
        dir.display(),
        dir.display(),
        keys(backend)
    );
    for (name, address, extra) in servers {
        s.push_str(&format!(
            "[[backend.server]]\nname = \"{name}\"\naddress = \"{address}\"\n{}",
            keys(extra)
        ));
    }
    s
}

/// An in-process fdkeeper on `dir` (its sockets under `dir/fdk`) lending 127.0.0.0/8 to this
/// user, until the token is cancelled.
pub fn start_fdkeeper(dir: &std::path::Path) -> tokio_util::sync::CancellationToken {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").expect("proc").uid();
    let text = format!(
        "socket = \"{d}/fdk/lend.sock\"\nadmin = \"{d}/fdk/admin.sock\"\nallowed_uids = [{uid}]\nallowed_binds = [\"127.0.0.0/8\"]\n",
        d = dir.display()
    );
    let config = fdkeeper::Config::from_source(&common::SourceFile::from_text("fdk.toml", text))
        .expect("fdkeeper config");
    let sockets = fdkeeper::bind_sockets(&config).expect("fdkeeper sockets");
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = rt.block_on(fdkeeper::run(config, sockets, s));
    });
    stop
}
