//! Idle keep-alive connections and what they cost a target: `n` connections opened, one request
//! answered on each, then left open and silent while the target's memory is read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Kind, Target, settle};
use crate::bench::stats;

/// Connections being opened at once.
pub(super) const PARALLEL: usize = 32;
/// Longest wait for one connect and answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time for all of them.
const ALL_TIMEOUT: Duration = Duration::from_secs(180);

/// Memory of one target before and after its idle connections opened.
#[derive(Clone, Debug)]
pub(super) struct Idle {
    pub kind: Kind,
    pub opened: usize,
    pub before: u64,
    pub after: u64,
    /// How long the opening took.
    pub seconds: f64,
}

impl Idle {
    pub fn kib_per_conn(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / 1024.0 / self.opened.max(1) as f64
    }
}

/// Reads the target's memory, opens `n` connections (each answered once, keep-alive, with a
/// session the target stored before, so that no connection stores a new one), waits for the
/// target to settle, reads its memory again, and closes them.
pub(super) async fn measure(target: &Target, n: usize) -> Result<Idle> {
    let pid = target.proxy_pid.context("no process to measure")?;
    settle(&[pid]).await;
    let before = stats::rss_tree(pid);
    let t = Instant::now();
    let request = format!(
        "GET /index.php HTTP/1.1\r\nHost: bench\r\nCookie: PHPSESSID={}\r\n\r\n",
        target.cookie
    );
    let held = open(target.addr, n, Arc::new(request.into_bytes())).await?;
    let seconds = t.elapsed().as_secs_f64();
    // Whatever a target allocates once a connection is idle is taken in within this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle(&[pid]).await;
    let after = stats::rss_tree(pid);
    let opened = held.len();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    settle(&[pid]).await;
    Ok(Idle {
        kind: target.kind,
        opened,
        before,
        after,
        seconds,
    })
}

/// `n` connections to `addr`, `PARALLEL` being opened at a time, each after one answered
/// `request`.
async fn open(addr: SocketAddr, n: usize, request: Arc<Vec<u8>>) -> Result<Vec<TcpStream>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + ALL_TIMEOUT;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL.min(n) {
        let next = Arc::clone(&next);
        let request = Arc::clone(&request);
        tasks.spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if Instant::now() >= deadline {
                    bail!("{} connections open after {ALL_TIMEOUT:?}", held.len());
                }
                let s = tokio::time::timeout(STEP_TIMEOUT, one(addr, &request))
                    .await
                    .with_context(|| format!("no answer from {addr} within {STEP_TIMEOUT:?}"))??;
                held.push(s);
            }
            anyhow::Ok(held)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// Connects, sends one keep-alive request and reads its whole answer.
async fn one(addr: SocketAddr, request: &[u8]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 4096];
        let got = s.read(&mut chunk).await?;
        ensure!(got > 0, "closed before the whole answer");
        buf.extend_from_slice(&chunk[..got]);
        if let Some(total) = answer_len(&buf)? {
            ensure!(
                buf.len() == total,
                "{} bytes after the answer",
                buf.len() - total
            );
            return Ok(s);
        }
    }
}

/// The length of the 200 answer at the start of `buf` (head and `Content-Length` body) once it
/// is all there; `None` while it is not.
fn answer_len(buf: &[u8]) -> Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    ensure!(r.code == Some(200), "answer {:?}", r.code);
    let len: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .context("an answer without Content-Length")?;
    Ok((buf.len() >= head + len).then_some(head + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_len_waits_for_the_body() {
        let a = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(answer_len(a).expect("ok"), Some(a.len()));
        assert_eq!(answer_len(&a[..a.len() - 1]).expect("ok"), None);
        assert_eq!(answer_len(&a[..10]).expect("ok"), None);
        assert!(
            answer_len(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").is_err()
        );
        assert!(answer_len(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
