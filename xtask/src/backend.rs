//! Demo backend, like the seed's PHP app: HTTP/1.1 with keep-alive, answers with its server name
//! and hands out a 26-char `PHPSESSID` cookie to clients that have none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head we accept; a longer one gets 431.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body we read; a longer one gets 413.
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub listen: SocketAddr,
    pub name: String,
    /// Held before each response, to keep requests in flight during reloads and kills.
    pub delay: Duration,
}

/// Serves until the process is killed.
pub async fn run(config: BackendConfig) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    serve(listener, config).await
}

/// Serves on an already bound listener (tests hand it 127.0.0.1:0).
pub async fn serve(listener: TcpListener, config: BackendConfig) -> Result<()> {
    eprintln!(
        "backend {} listening on {} (delay {:?})",
        config.name,
        listener.local_addr()?,
        config.delay
    );
    let config = Arc::new(config);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("backend {}: accept failed: {e}", config.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            // A client that goes away mid-request is normal under kill tests; nothing to report.
            let _ = connection(stream, &config).await;
        });
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: usize,
    chunked: bool,
    has_session: bool,
    head_len: usize,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed request"),
    };
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut content_length = 0;
    let mut chunked = false;
    let mut has_session = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("");
        if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse().map_err(|_| "bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("cookie") {
            has_session |= value.split(';').any(|c| c.trim().starts_with("PHPSESSID="));
        }
    }
    Ok(Some(Head {
        method: req.method.unwrap_or("GET").to_owned(),
        path: req.path.unwrap_or("/").to_owned(),
        keep_alive,
        content_length,
        chunked,
        has_session,
        head_len,
    }))
}

/// Reads more bytes into `buf`; `Ok(false)` on a clean end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

async fn connection(mut stream: TcpStream, config: &BackendConfig) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) if buf.len() > MAX_HEAD => {
                    return respond_error(&mut stream, 431, "request head too large").await;
                }
                Ok(None) => {
                    if !fill(&mut stream, &mut buf).await? {
                        return Ok(());
                    }
                }
                Err(why) => return respond_error(&mut stream, 400, why).await,
            }
        };
        buf.drain(..head.head_len);
        let body_len = if head.chunked {
            match read_chunked(&mut stream, &mut buf).await? {
                Some(n) => n,
                None => return respond_error(&mut stream, 400, "bad chunked body").await,
            }
        } else {
            if head.content_length > MAX_BODY {
                return respond_error(&mut stream, 413, "request body too large").await;
            }
            while buf.len() < head.content_length {
                if !fill(&mut stream, &mut buf).await? {
                    return Ok(());
                }
            }
            buf.drain(..head.content_length);
            head.content_length
        };
        if !config.delay.is_zero() {
            tokio::time::sleep(config.delay).await;
        }
        let response = build_response(&head, body_len, config);
        stream.write_all(&response).await?;
        if !head.keep_alive {
            return stream.shutdown().await;
        }
    }
}

/// Consumes a chunked body from `buf`/`stream`; returns its decoded length, `None` if malformed.
async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut total = 0usize;
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            if buf.len() > MAX_HEAD || !fill(stream, buf).await? {
                return Ok(None);
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size_text = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Ok(None);
        };
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (if any) end with an empty line.
            loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    let empty = p == 0;
                    buf.drain(..p + 2);
                    if empty {
                        return Ok(Some(total));
                    }
                } else if buf.len() > MAX_HEAD || !fill(stream, buf).await? {
                    return Ok(None);
                }
            }
        }
        total += size;
        if total > MAX_BODY {
            return Ok(None);
        }
        while buf.len() < size + 2 {
            if !fill(stream, buf).await? {
                return Ok(None);
            }
        }
        buf.drain(..size + 2);
    }
}

/// A random session id of 26 chars from PHP's default alphabet (`session.sid_bits_per_character=5`).
pub fn new_session_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuv";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn build_response(head: &Head, body_len: usize, config: &BackendConfig) -> Vec<u8> {
    let (status, body) = match (head.method.as_str(), path_only(&head.path)) {
        ("GET" | "HEAD" | "POST", "/" | "/index.php") => (
            "200 OK",
            format!(
                "Hello from {name}\nserver: {name}\nmethod: {}\nrequest body bytes: {body_len}\n",
                head.method,
                name = config.name
            ),
        ),
        (_, "/" | "/index.php") => ("405 Method Not Allowed", "method not allowed\n".to_owned()),
        // The bench's large answers (nginx's backends serve the same path from a file).
        ("GET", crate::configs::nginx::BIG_PATH) => {
            ("200 OK", "x".repeat(crate::configs::nginx::BIG_BYTES))
        }
        _ => ("404 Not Found", format!("not found on {}\n", config.name)),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Server: {}\r\n",
        body.len(),
        config.name
    );
    if !head.has_session {
        out.push_str(&format!(
            "Set-Cookie: PHPSESSID={}; path=/\r\n",
            new_session_id()
        ));
    }
    out.push_str(if head.keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    if head.method != "HEAD" {
        out.push_str(&body);
    }
    out.into_bytes()
}

fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

async fn respond_error(stream: &mut TcpStream, code: u16, why: &str) -> std::io::Result<()> {
    let reason = match code {
        400 => "Bad Request",
        413 => "Payload Too Large",
        _ => "Request Header Fields Too Large",
    };
    let body = format!("{why}\n");
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(name: &str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = BackendConfig {
            listen: addr,
            name: name.to_owned(),
            delay: Duration::ZERO,
        };
        tokio::spawn(serve(listener, config));
        addr
    }

    async fn read_response(stream: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if buf.len() >= end + 4 + len {
                    return text;
                }
            }
            assert!(fill(stream, &mut buf).await.expect("read"), "eof: {text}");
        }
    }

    #[tokio::test]
    async fn keep_alive_cookie_and_bodies() {
        let addr = start("app7").await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let r1 = read_response(&mut s).await;
        assert!(r1.starts_with("HTTP/1.1 200 OK"), "{r1}");
        assert!(r1.contains("server: app7"), "{r1}");
        let sid = r1
            .lines()
            .find_map(|l| l.strip_prefix("Set-Cookie: PHPSESSID="))
            .and_then(|v| v.split(';').next())
            .expect("cookie");
        assert_eq!(sid.len(), 26);
        assert!(r1.contains("; path=/"));
        // Same connection, with the cookie and a body: no new cookie, body counted.
        let req = format!(
            "POST /index.php HTTP/1.1\r\nHost: x\r\nCookie: a=b; PHPSESSID={sid}\r\nContent-Length: 5\r\n\r\nhello"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let r2 = read_response(&mut s).await;
        assert!(!r2.contains("Set-Cookie"), "{r2}");
        assert!(r2.contains("request body bytes: 5"), "{r2}");
        // Chunked body, then Connection: close ends the connection.
        s.write_all(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await
        .expect("write");
        let r3 = read_response(&mut s).await;
        assert!(r3.contains("request body bytes: 7"), "{r3}");
        assert!(r3.contains("Connection: close"), "{r3}");
        let mut rest = Vec::new();
        assert!(
            !fill(&mut s, &mut rest).await.expect("read"),
            "connection closed"
        );
    }

    #[tokio::test]
    async fn unknown_path_and_garbage() {
        let addr = start("app1").await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /nope HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 404"));
        s.write_all(b"GET /1m HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let big = read_response(&mut s).await;
        assert!(
            big.contains("Content-Length: 1048576\r\n"),
            "{}",
            &big[..200]
        );
        assert_eq!(big.split_once("\r\n\r\n").expect("head").1.len(), 1 << 20);
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"\x01\x02 garbage\r\n\r\n")
            .await
            .expect("write");
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn session_ids_look_like_php() {
        let a = new_session_id();
        assert_eq!(a.len(), 26);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'v').contains(&b))
        );
        assert_ne!(a, new_session_id());
    }
}
