//! Idle keep-alive connections to one server, reused newest first.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Io;

#[derive(Debug)]
pub struct Pool {
    /// Oldest first: expired connections are always a prefix.
    idle: Mutex<VecDeque<(Io<TcpStream>, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// An idle connection (with its read buffer, empty) that still looks open, if any. It may
    /// still turn out closed when used (the server may close it at any moment): callers retry
    /// in that case.
    pub fn take(&self) -> Option<Io<TcpStream>> {
        let now = Instant::now();
        loop {
            let (io, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.pop_back()?
            };
            if now.saturating_duration_since(since) >= self.idle_timeout {
                continue;
            }
            // Always a real `recv(MSG_PEEK)`: the reactor's cached readiness may not have seen
            // a FIN, or stray bytes a server sent after its response, that arrived since its
            // last poll; such bytes would be read as the next client's response.
            if !crate::sys::idle_connection_broken(io.stream.as_fd()) {
                return Some(io);
            }
        }
    }

    /// Gives back a connection whose buffer holds no unread byte.
    pub fn put(&self, io: Io<TcpStream>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Old connections are the likeliest to be closed by the server: drop them first.
        while idle
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        if self.max_idle > 0 {
            idle.push_back((io, now));
        }
    }

    /// Closes every idle connection (the server moved to another address).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair: our side wrapped for the pool, and the server's side.
    async fn pair(l: &TcpListener) -> (Io<TcpStream>, TcpStream) {
        let ours = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (theirs, _) = l.accept().await.expect("accept");
        (Io::new(ours), theirs)
    }

    fn port(io: &Io<TcpStream>) -> u16 {
        io.stream.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn newest_first_bounded_and_closed_ones_skipped() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = Pool::new(2, Duration::from_secs(30));
        let (a, _sa) = pair(&l).await;
        let (b, mut sb) = pair(&l).await;
        let (c, _sc) = pair(&l).await;
        let (pa, pb, pc) = (port(&a), port(&b), port(&c));
        pool.put(a);
        pool.put(b);
        pool.put(c);
        // Bounded: the oldest (a) was dropped.
        assert_eq!(pool.idle_count(), 2);
        let got = pool.take().expect("an idle connection");
        assert_eq!(port(&got), pc);
        pool.put(got);
        // The server closes b: once the reactor has seen it, b is never handed out.
        sb.shutdown().await.expect("shutdown");
        drop(sb);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = pool.take().expect("c again");
        assert_eq!(port(&got), pc);
        assert!(
            pool.take().is_none(),
            "b ({pb}) was closed, a ({pa}) dropped"
        );
    }

    #[tokio::test]
    async fn a_connection_with_unasked_bytes_is_never_handed_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = Pool::new(8, Duration::from_secs(30));
        let (a, mut sa) = pair(&l).await;
        pool.put(a);
        // A server that answers twice: the second answer is in our receive queue as soon as
        // the write returns, before the reactor has polled the socket.
        sa.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            .await
            .expect("write");
        assert!(
            pool.take().is_none(),
            "the stray response would reach the next client"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn expired_connections_are_dropped() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = Pool::new(8, Duration::from_millis(30));
        let (a, _sa) = pair(&l).await;
        pool.put(a);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (b, _sb) = pair(&l).await;
        pool.put(b);
        assert_eq!(
            pool.idle_count(),
            1,
            "the expired one goes when another comes"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(pool.take().is_none());
    }
}
