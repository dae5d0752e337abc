//! The access log line of one request, whatever protocol carried it, and the counters it feeds.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::exchange::Status;
use super::head::RequestHead;
use crate::shared::Shared;

/// What the access log line says about one request.
pub struct Log {
    pub started: Instant,
    /// The protocol the client spoke (`HTTP/1.1`, `HTTP/2`).
    pub protocol: &'static str,
    pub backend: Option<usize>,
    pub server: Option<(usize, usize)>,
    /// 0: no response (client gone).
    pub status: u16,
    pub retries: u32,
    pub redispatched: bool,
    pub stick: &'static str,
    /// The status was the proxy's own (the server failed), not the server's.
    pub proxy_error: bool,
    /// Answered by the proxy by design (a redirect), without a backend.
    pub intercepted: bool,
}

impl Log {
    pub fn start(protocol: &'static str) -> Log {
        Log {
            started: Instant::now(),
            protocol,
            backend: None,
            server: None,
            status: 0,
            retries: 0,
            redispatched: false,
            stick: "-",
            proxy_error: false,
            intercepted: false,
        }
    }

    pub fn refused(status: Status) -> Log {
        Log {
            status: status as u16,
            ..Log::start("-")
        }
    }
}

/// One line per request, like HAProxy's httplog: client, frontend, backend/server, time,
/// status, retries, the stick decision, the request line.
pub fn access_log(
    shared: &Shared,
    frontend: usize,
    peer: SocketAddr,
    log: &Log,
    req: Option<&RequestHead>,
) {
    if let Some((b, s)) = log.server {
        let server = &shared.backends[b].servers[s];
        server.requests.fetch_add(1, Ordering::Relaxed);
        if (100..600).contains(&log.status) {
            server.responses[usize::from(log.status / 100) - 1].fetch_add(1, Ordering::Relaxed);
        }
        if log.proxy_error {
            server.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let fc = &shared.frontends[frontend];
    fc.requests_total.fetch_add(1, Ordering::Relaxed);
    if log.backend.is_none() && !log.intercepted {
        fc.requests_denied.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(b) = log.backend {
        let be = &shared.backends[b];
        if log.server.is_none() && log.status == 503 {
            be.no_server.fetch_add(1, Ordering::Relaxed);
        }
        if log.redispatched {
            be.redispatched.fetch_add(1, Ordering::Relaxed);
        }
        be.retries
            .fetch_add(u64::from(log.retries), Ordering::Relaxed);
    }
    let backend = log
        .backend
        .map_or("-", |b| shared.backends[b].name.as_str());
    let server = log
        .server
        .map_or("-", |(b, s)| shared.backends[b].servers[s].name.as_str());
    tracing::info!(
        target: "proxyd::access",
        client = %peer,
        frontend = %shared.config.frontends[frontend].name,
        backend = %backend,
        server = %server,
        status = log.status,
        time_ms = log.started.elapsed().as_millis() as u64,
        retries = log.retries,
        redispatched = log.redispatched,
        stick = %log.stick,
        request = %RequestLine(req),
        protocol = log.protocol,
    );
}

/// The request line of the access log, formatted only when the log is on.
struct RequestLine<'a>(Option<&'a RequestHead>);

impl std::fmt::Display for RequestLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{} {}", r.method(), r.target()),
            None => f.write_str("<BADREQ>"),
        }
    }
}

/// Decrements the in-flight count however the exchange ends (even when cancelled).
pub struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .requests_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as received and in flight until the guard drops.
pub fn in_flight(shared: &Shared) -> InFlight<'_> {
    let stats = &shared.stats;
    stats.requests_total.fetch_add(1, Ordering::Relaxed);
    stats.requests_in_flight.fetch_add(1, Ordering::Relaxed);
    InFlight(shared)
}
