//! HTTP/1.1 load generator for e2e and bench: keep-alive and connection-close clients, bounded in
//! time and count, every response checked, every failure counted by kind.

mod client;

pub use client::{Reply, classify, read_reply};

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use client::Client;

/// What to send, how hard and for how long.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Clients that reuse one connection for request after request.
    pub keepalive_clients: usize,
    /// Clients that open a new connection per request (`Connection: close`).
    pub close_clients: usize,
    /// More keep-alive clients, that pause a random 0..`think_time` between requests, so that
    /// their connections sit idle when a drain begins (the race that fails requests elsewhere).
    pub think_clients: usize,
    pub think_time: Duration,
    /// The run stops by itself after this long...
    pub max_duration: Duration,
    /// ...or after this many requests, whichever comes first.
    pub max_requests: u64,
    /// Connect + send + full response must fit in this.
    pub request_timeout: Duration,
    pub path: String,
    /// A 200 response body must name one of these servers ("server: NAME"); empty accepts any.
    pub expect_servers: Vec<String>,
}

impl LoadConfig {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            keepalive_clients: 50,
            close_clients: 50,
            think_clients: 0,
            think_time: Duration::from_millis(100),
            max_duration: Duration::from_secs(120),
            max_requests: 5_000_000,
            request_timeout: Duration::from_secs(5),
            path: "/".to_owned(),
            expect_servers: Vec::new(),
        }
    }
}

/// Ways a request can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// connect(2) got ECONNREFUSED: nobody was listening.
    Refused,
    /// The connection was reset, or closed before any response byte.
    Reset,
    /// No complete response within the request timeout.
    Timeout,
    /// A complete response whose status was not 200.
    BadStatus,
    /// The connection ended in the middle of the response head or body.
    Truncated,
    /// Anything else: malformed response, wrong server in the body, local errors.
    Other,
}

const KINDS: [FailKind; 6] = [
    FailKind::Refused,
    FailKind::Reset,
    FailKind::Timeout,
    FailKind::BadStatus,
    FailKind::Truncated,
    FailKind::Other,
];

impl FailKind {
    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::BadStatus => "bad status",
            Self::Truncated => "truncated",
            Self::Other => "other",
        }
    }
}

/// Failure counts by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failures([u64; 6]);

impl Failures {
    pub fn get(&self, kind: FailKind) -> u64 {
        self.0[kind.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Counts since `earlier` (both taken from the same run).
    pub fn since(&self, earlier: &Failures) -> Failures {
        let mut out = Failures::default();
        for (i, v) in out.0.iter_mut().enumerate() {
            *v = self.0[i].saturating_sub(earlier.0[i]);
        }
        out
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = KINDS
            .iter()
            .map(|k| format!("{} {}", k.name(), self.get(*k)))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// Live counters shared by the clients and whoever watches the run.
#[derive(Default)]
struct Shared {
    issued: AtomicU64,
    ok: AtomicU64,
    failures: [AtomicU64; 6],
    in_flight: AtomicU64,
    /// Keep-alive connections open between two requests of their client.
    idle_keepalive: AtomicU64,
    connections: AtomicU64,
    close_reconnects: AtomicU64,
    samples: std::sync::Mutex<Vec<String>>,
}

/// Counters at one instant of a running load.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub ok: u64,
    pub failures: Failures,
}

/// Everything a finished run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failures: Failures,
    pub elapsed: Duration,
    /// Connections opened (keep-alive and per-request).
    pub connections: u64,
    /// Keep-alive connections the server ended with `Connection: close` (not failures).
    pub close_reconnects: u64,
    /// Sorted latencies of successful requests, microseconds.
    latencies_us: Vec<u32>,
    /// The first few failures, with their time into the run, for the log.
    pub samples: Vec<String>,
}

impl LoadReport {
    pub fn requests(&self) -> u64 {
        self.ok + self.failures.total()
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile `p` in [0, 100] over successful requests.
    pub fn latency(&self, p: f64) -> Duration {
        Duration::from_micros(u64::from(percentile(&self.latencies_us, p)))
    }

    /// One line with every figure, for the scenario's printout.
    pub fn summary(&self) -> String {
        format!(
            "{} requests ({} ok) in {:.1}s = {:.0} req/s; latency p50 {:.2?} p99 {:.2?} max {:.2?}; \
             failures: {}; {} connections, {} server-closed keep-alive reconnects",
            self.requests(),
            self.ok,
            self.elapsed.as_secs_f64(),
            self.rps(),
            self.latency(50.0),
            self.latency(99.0),
            self.latency(100.0),
            self.failures,
            self.connections,
            self.close_reconnects
        )
    }
}

/// Value at percentile `p` of sorted `v` (nearest rank), 0 when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A running load. Stop it with [`Load::finish`]; dropping it stops the clients too.
pub struct Load {
    shared: Arc<Shared>,
    stop: CancellationToken,
    clients: Vec<JoinHandle<Vec<u32>>>,
    started: Instant,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Load {
    /// Starts every client at once on the current tokio runtime.
    pub fn start(config: LoadConfig) -> Self {
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let config = Arc::new(config);
        let started = Instant::now();
        let deadline = started + config.max_duration;
        let mut clients = Vec::new();
        let total = config.keepalive_clients + config.close_clients + config.think_clients;
        for i in 0..total {
            let thinker = i >= config.keepalive_clients + config.close_clients;
            let client = Client {
                config: Arc::clone(&config),
                shared: Arc::clone(&shared),
                stop: stop.clone(),
                keep_alive: i < config.keepalive_clients || thinker,
                think: thinker.then_some(config.think_time),
                deadline,
                started,
            };
            clients.push(tokio::spawn(client.run()));
        }
        Self {
            shared,
            stop,
            clients,
            started,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = &self.shared;
        let mut failures = Failures::default();
        for (i, f) in s.failures.iter().enumerate() {
            failures.0[i] = f.load(Ordering::SeqCst);
        }
        Snapshot {
            ok: s.ok.load(Ordering::SeqCst),
            failures,
        }
    }

    /// Requests that a server dying right now could fail: those in flight, plus one per
    /// keep-alive connection that sits between two requests (its next request would meet the
    /// dead connection).
    pub fn at_risk(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
            + self.shared.idle_keepalive.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have succeeded (or `timeout` passes): proof that traffic flows.
    pub async fn wait_ok(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.shared.ok.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + timeout;
        while self.shared.ok.load(Ordering::SeqCst) < target {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "load: fewer than {n} successful requests within {timeout:?} ({})",
                    self.snapshot().failures
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the clients (each finishes its current request) and gathers the figures.
    pub async fn finish(mut self) -> LoadReport {
        self.stop.cancel();
        let mut latencies = Vec::new();
        for c in std::mem::take(&mut self.clients) {
            if let Ok(mut l) = c.await {
                latencies.append(&mut l);
            }
        }
        let elapsed = self.started.elapsed();
        latencies.sort_unstable();
        let snap = self.snapshot();
        let samples = self
            .shared
            .samples
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        LoadReport {
            ok: snap.ok,
            failures: snap.failures,
            elapsed,
            connections: self.shared.connections.load(Ordering::SeqCst),
            close_reconnects: self.shared.close_reconnects.load(Ordering::SeqCst),
            latencies_us: latencies,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::backend::{BackendConfig, serve};

    async fn backend(name: &str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = BackendConfig {
            listen: addr,
            name: name.to_owned(),
            delay: Duration::ZERO,
        };
        tokio::spawn(serve(listener, config));
        addr
    }

    fn small(target: SocketAddr) -> LoadConfig {
        LoadConfig {
            keepalive_clients: 3,
            close_clients: 3,
            max_duration: Duration::from_secs(10),
            max_requests: 600,
            request_timeout: Duration::from_secs(2),
            ..LoadConfig::new(target)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_successes_up_to_the_request_bound() {
        let addr = backend("app1").await;
        let mut cfg = small(addr);
        cfg.expect_servers = vec!["app1".into()];
        let report = Load::start(cfg).finish_after_bound().await;
        assert_eq!(report.ok, 600, "{}", report.summary());
        assert_eq!(report.failures.total(), 0, "{:?}", report.samples);
        assert!(report.latency(99.0) > Duration::ZERO);
    }

    #[tokio::test]
    async fn wrong_server_and_refused_are_failures() {
        let addr = backend("app2").await;
        let mut cfg = small(addr);
        cfg.max_requests = 20;
        cfg.expect_servers = vec!["app1".into()];
        let report = Load::start(cfg).finish_after_bound().await;
        assert_eq!(report.ok, 0);
        assert_eq!(
            report.failures.get(FailKind::Other),
            20,
            "{:?}",
            report.samples
        );

        // A port nobody listens on.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = free.local_addr().expect("addr");
        drop(free);
        let mut cfg = small(dead);
        cfg.max_requests = 10;
        let report = Load::start(cfg).finish_after_bound().await;
        assert_eq!(report.failures.get(FailKind::Refused), 10);
    }

    /// A server on 127.0.0.1 that hands each connection it accepts, numbered from 1, to `serve`.
    async fn fake_server<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(u32, tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Ok((s, _)) = listener.accept().await {
                n += 1;
                tokio::spawn(serve(n, s));
            }
        });
        addr
    }

    /// A fake server that answers the first request on each connection and then closes without
    /// answering the second: the keep-alive client's second request is a `reset` failure, while
    /// a `Connection: close` answer only makes it reconnect.
    #[tokio::test]
    async fn closed_reused_connection_is_reset_but_connection_close_is_not() {
        let addr = fake_server(|n, mut s| async move {
            let say_close = n.is_multiple_of(2);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "server: x\n";
            let conn = if say_close { "close" } else { "keep-alive" };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            if !say_close {
                // Read the next request, then close without a byte.
                let _ = s.read(&mut buf).await;
            }
        })
        .await;
        let cfg = LoadConfig {
            keepalive_clients: 1,
            close_clients: 0,
            max_requests: 40,
            ..small(addr)
        };
        let report = Load::start(cfg).finish_after_bound().await;
        assert_eq!(report.requests(), 40);
        assert_eq!(
            report.failures.get(FailKind::Reset),
            report.failures.total()
        );
        assert!(
            report.failures.get(FailKind::Reset) >= 10,
            "{}",
            report.summary()
        );
        assert!(report.close_reconnects >= 10, "{}", report.summary());
    }

    #[tokio::test]
    async fn truncated_body_and_timeout() {
        let addr = fake_server(|n, mut s| async move {
            let hang = n.is_multiple_of(2);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            if hang {
                tokio::time::sleep(Duration::from_secs(5)).await;
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
                .await;
        })
        .await;
        let cfg = LoadConfig {
            keepalive_clients: 0,
            close_clients: 1,
            max_requests: 4,
            request_timeout: Duration::from_millis(300),
            ..small(addr)
        };
        let report = Load::start(cfg).finish_after_bound().await;
        assert_eq!(
            report.failures.get(FailKind::Truncated),
            2,
            "{:?}",
            report.samples
        );
        assert_eq!(
            report.failures.get(FailKind::Timeout),
            2,
            "{:?}",
            report.samples
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile::<u32>(&[], 50.0), 0);
    }

    impl Load {
        /// Test helper: waits for the request bound to be used up, then finishes.
        async fn finish_after_bound(self) -> LoadReport {
            for _ in 0..1000 {
                if self.clients.iter().all(|c| c.is_finished()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.finish().await
        }
    }
}
