//! Idle keep-alive connections to one server, reused newest first.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// An idle connection that still looks open, if any. It may still turn out closed
    /// when used (the server may close it at any moment): callers retry in that case.
    pub fn take(&self) -> Option<TcpStream> {
        loop {
            let (stream, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.pop()?
            };
            if since.elapsed() >= self.idle_timeout {
                continue;
            }
            // An idle HTTP connection has nothing to read: EOF or stray bytes mean it is unusable.
            if !crate::sys::idle_connection_broken(stream.as_fd()) {
                return Some(stream);
            }
        }
    }

    pub fn put(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Old connections are the likeliest to be closed by the server: drop them first.
        idle.retain(|(_, since)| since.elapsed() < self.idle_timeout);
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push((stream, Instant::now()));
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Opens a new connection to a server within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}
