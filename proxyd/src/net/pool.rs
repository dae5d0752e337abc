//! Idle keep-alive connections to one server, reused newest first, kept as many as recent
//! demand needed and let go a fraction at a time when it falls.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Io;

/// What the pool has done since the worker started, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// New connections to the server.
    pub opened: u64,
    /// Requests sent on an idle connection from the pool.
    pub reused: u64,
    /// Idle connections the pool closed itself: beyond demand, past `timeout_pool_idle`, or
    /// over `pool_max_idle`.
    pub purged: u64,
}

#[derive(Debug)]
pub struct Pool {
    /// Oldest first: expired connections are always a prefix.
    idle: Mutex<VecDeque<(Io<TcpStream>, Instant)>>,
    /// The most connections in use at once since the last purge.
    peak: AtomicUsize,
    /// How many connections the pool keeps (in use plus idle) after a purge.
    demand: Mutex<Demand>,
    max_idle: usize,
    idle_timeout: Duration,
    opened: AtomicU64,
    reused: AtomicU64,
    purged: AtomicU64,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            peak: AtomicUsize::new(0),
            demand: Mutex::new(Demand::default()),
            max_idle,
            idle_timeout,
            opened: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            purged: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Io<TcpStream>, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `n` requests are using the server at once (each on its own connection).
    pub fn in_use(&self, n: usize) {
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    /// An idle connection (without a read buffer: its next read takes one) that still looks
    /// open, if any. It may still turn out closed when used (the server may close it at any
    /// moment): callers retry in that case.
    pub fn take(&self) -> Option<Io<TcpStream>> {
        let now = Instant::now();
        loop {
            let (io, since) = self.lock().pop_back()?;
            if now.saturating_duration_since(since) >= self.idle_timeout {
                self.purged.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Always a real `recv(MSG_PEEK)`: the reactor's cached readiness may not have seen
            // a FIN, or stray bytes a server sent after its response, that arrived since its
            // last poll; such bytes would be read as the next client's response.
            if !crate::sys::idle_connection_broken(io.stream.as_fd()) {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Some(io);
            }
        }
    }

    /// Opens a new connection to the server within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let stream = connect(addr, timeout).await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Gives back a connection whose buffer holds no unread byte. Only the hard cap applies
    /// here: what demand no longer needs goes at the next [`Pool::purge`], a part at a time,
    /// so that a burst that returns every connection at once does not close the ones the next
    /// burst needs.
    pub fn put(&self, mut io: Io<TcpStream>) {
        // An idle connection keeps no buffer: the next request on it takes one.
        super::spares::give_buffer(&mut io.buf);
        let now = Instant::now();
        let mut idle = self.lock();
        let before = idle.len();
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
        let dropped = before - idle.len();
        if self.max_idle > 0 {
            idle.push_back((io, now));
        }
        drop(idle);
        self.purged.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// One tick of `pool_purge_delay`: closes idle connections past `timeout_pool_idle`, then
    /// some of those beyond what recent demand needed (the oldest first). `in_use`: requests
    /// using the server now, which starts the next window's peak.
    pub fn purge(&self, now: Instant, in_use: usize) {
        let peak = self.peak.swap(in_use, Ordering::Relaxed).max(in_use);
        let mut idle = self.lock();
        let expired = idle
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
            .count();
        let close = self.demand.lock().unwrap_or_else(|p| p.into_inner()).tick(
            peak,
            in_use,
            idle.len() - expired,
        );
        let closed: Vec<_> = idle.drain(..expired + close).collect();
        // The sockets close outside the lock: requests of this server need it meanwhile.
        drop(idle);
        self.purged
            .fetch_add(closed.len() as u64, Ordering::Relaxed);
        drop(closed);
    }

    /// Closes every idle connection (the server moved to another address).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    pub fn counts(&self) -> PoolCounts {
        PoolCounts {
            opened: self.opened.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            purged: self.purged.load(Ordering::Relaxed),
        }
    }
}

/// How many connections (in use plus idle) recent demand needs: the peak of the last window,
/// or more while an older, higher peak fades. Like HAProxy's estimate of needed connections,
/// it halves the gap to a lower peak on each tick instead of dropping to it at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Demand {
    need: usize,
}

impl Demand {
    /// The idle connections to close at this tick: half of those beyond the need (rounded
    /// up, so that the last one goes too), never more than are idle.
    fn tick(&mut self, peak: usize, in_use: usize, idle: usize) -> usize {
        self.need = peak.max((self.need + peak) / 2);
        let excess = (in_use + idle).saturating_sub(self.need);
        excess.div_ceil(2).min(idle)
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
        assert_eq!(
            pool.counts(),
            PoolCounts {
                opened: 0,
                reused: 2,
                purged: 1
            }
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

    /// Ticks of a simulated clock: (peak of the window, in use at the tick, idle at the tick).
    fn run(ticks: &[(usize, usize, usize)]) -> Vec<usize> {
        let mut d = Demand::default();
        ticks
            .iter()
            .map(|&(peak, in_use, idle)| d.tick(peak, in_use, idle))
            .collect()
    }

    #[test]
    fn demand_keeps_what_the_peak_needed() {
        // 100 requests at once, all returned between bursts: nothing is closed.
        assert_eq!(
            run(&[(100, 0, 100), (100, 40, 60), (100, 100, 0)]),
            [0, 0, 0]
        );
        // A connection opened beyond the peak (the window's peak counts it) stays too.
        assert_eq!(run(&[(100, 0, 100), (101, 0, 101)]), [0, 0]);
    }

    #[test]
    fn demand_that_falls_is_let_go_gradually() {
        // The peak drops from 100 to 10: the need halves its gap to 10 each tick, and of what
        // exceeds it half goes per tick, never all at once.
        let mut d = Demand::default();
        assert_eq!(d.tick(100, 0, 100), 0);
        let mut idle = 100;
        let mut closed = Vec::new();
        for _ in 0..12 {
            let c = d.tick(10, 0, idle);
            assert!(
                c < idle,
                "never every idle connection at once ({c} of {idle})"
            );
            idle -= c;
            closed.push(c);
        }
        assert_eq!(closed[0], 23, "need 55: half of the 45 over it");
        assert_eq!(closed[1], 23, "need 32: half of the 45 over it");
        assert_eq!(idle, 10, "settles at the new peak: {closed:?}");
        assert!(closed.windows(2).all(|w| w[1] <= w[0]), "{closed:?}");
    }

    #[test]
    fn an_unused_server_ends_with_no_idle_connection() {
        let mut d = Demand::default();
        assert_eq!(d.tick(4, 0, 4), 0);
        let mut idle = 4;
        let mut ticks = 0;
        while idle > 0 {
            idle -= d.tick(0, 0, idle);
            ticks += 1;
            assert!(ticks <= 8, "still {idle} idle after {ticks} ticks");
        }
        assert!(ticks >= 2, "not all at once");
    }

    #[tokio::test]
    async fn purge_closes_the_oldest_beyond_demand() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = Pool::new(64, Duration::from_secs(30));
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..8 {
            let (a, b) = pair(&l).await;
            ours.push(a);
            theirs.push(b);
        }
        pool.in_use(8);
        let newest = port(&ours[7]);
        for io in ours {
            pool.put(io);
        }
        let now = Instant::now();
        // The window saw 8 at once: all 8 are kept.
        pool.purge(now, 0);
        assert_eq!(pool.idle_count(), 8);
        // A quiet window: need 4, half of the 4 over it go.
        pool.purge(now, 0);
        assert_eq!(pool.idle_count(), 6);
        assert_eq!(pool.counts().purged, 2);
        let got = pool.take().expect("newest kept");
        assert_eq!(port(&got), newest);
    }
}
