//! The targets' access logs, on in every run of the http and tls sections: proxyd's to its
//! stderr file, nginx's to a file, HAProxy's (`option httplog`) as syslog datagrams to a UDP sink
//! in this process, which reads and counts them. After each run the lines it wrote are counted
//! and dropped (files truncated), so that the report can show every target really logged every
//! request.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// What marks an access line in proxyd's log file: the two capture fields of HAProxy's httplog
/// format, unused (` - - `), which no other line of proxyd's carries.
pub(super) const HTTPLOG_MARKER: &str = " - - ";

/// Where a target's access log goes.
#[derive(Clone, Debug)]
pub(super) enum AccessLog {
    /// Direct: nothing in between to log.
    None,
    /// A file the target appends to, and what marks an access line in it (every line when
    /// `None`).
    File {
        path: PathBuf,
        marker: Option<&'static str>,
    },
    /// Datagrams to the sink.
    Sink,
}

impl AccessLog {
    /// The access lines written since the last call, forgotten (a file is truncated: its
    /// writers append, so they go on at its new end); `None` for a target without a log.
    pub fn take(&self, sink: &Sink) -> Result<Option<u64>> {
        match self {
            Self::None => Ok(None),
            Self::Sink => Ok(Some(sink.take())),
            Self::File { path, marker } => {
                let Ok(file) = std::fs::File::open(path) else {
                    // Not written yet (nginx opens its access log with the first line).
                    return Ok(Some(0));
                };
                let mut lines = 0;
                for line in std::io::BufReader::new(file).split(b'\n') {
                    let line = line.with_context(|| format!("reading {}", path.display()))?;
                    if marker.is_none_or(|m| contains(&line, m.as_bytes())) {
                        lines += 1;
                    }
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(0))
                    .with_context(|| format!("truncating {}", path.display()))?;
                Ok(Some(lines))
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A syslog sink on 127.0.0.1 (UDP) that counts the datagrams it reads, one line each.
pub(super) struct Sink {
    addr: SocketAddr,
    lines: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> Result<Self> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .context("cannot bind the log sink")?;
        let addr = socket.local_addr()?;
        let lines = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&lines);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while socket.recv(&mut buf).await.is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self { addr, lines, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams read since the last call.
    fn take(&self) -> u64 {
        self.lines.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_file_lines_by_marker_and_truncates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxyd.log");
        std::fs::write(
            &path,
            "127.0.0.1:1 [05/Dec/2026:04:00:00.000] www app/s1 0/0/0/1/1 200 29 - - ---- 1/1/0/0/0 0/0 \"GET /index.php HTTP/1.1\"\n\
             INFO worker up\n\
             127.0.0.1:2 [05/Dec/2026:04:00:00.001] www app/<NOSRV> 0/0/-1/-1/0 503 0 - - SC-- 1/1/0/0/0 0/0 \"GET / HTTP/1.1\"\n",
        )
        .expect("write");
        let sink = Sink::start().await.expect("sink");
        let log = AccessLog::File {
            path: path.clone(),
            marker: Some(HTTPLOG_MARKER),
        };
        assert_eq!(log.take(&sink).expect("take"), Some(2));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(log.take(&sink).expect("take"), Some(0));
        let every = AccessLog::File {
            path: dir.path().join("missing.log"),
            marker: None,
        };
        assert_eq!(every.take(&sink).expect("take"), Some(0));
        assert_eq!(AccessLog::None.take(&sink).expect("take"), None);
    }

    #[tokio::test]
    async fn the_sink_counts_datagrams() {
        let sink = Sink::start().await.expect("sink");
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for _ in 0..3 {
            client
                .send_to(b"<134>haproxy[1]: 127.0.0.1 GET /index.php", sink.addr())
                .await
                .expect("send");
        }
        // Bounded wait for the sink's task to read them.
        for _ in 0..100 {
            if sink.lines.load(Ordering::Relaxed) == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(AccessLog::Sink.take(&sink).expect("take"), Some(3));
        assert_eq!(sink.take(), 0);
    }
}
