//! What every connection task of a worker shares: backends with their servers, pools and
//! slots, counters, and the drain signal.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balance::{Balancer, Candidate, Request};
use crate::config::{Address, Config};
use crate::log_sink::LogSink;
use crate::model::{AdminState, AtomicAdminState, StatsSnapshot};
use crate::net::Io;
use crate::net::pool::Pool;
use crate::stick::StickCache;

thread_local! {
    static SERVING_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// The index of the serving thread this code runs on: 0 for the worker's main thread (and
/// anything that is not a serving thread), 1.. for the others.
pub fn serving_thread() -> usize {
    SERVING_THREAD.with(Cell::get)
}

/// Marks the calling thread as serving thread `index`, for the rest of its life.
pub fn set_serving_thread(index: usize) {
    SERVING_THREAD.with(|t| t.set(index));
}

/// One serving thread's idle connections to a server, and the requests of that thread using
/// the server now. A connection stays with the thread that opened it: its socket is registered
/// with that thread's runtime, and another thread polling it would be woken through the
/// first one. Aligned so that two threads' pools never share a cache line (nor the pair the
/// CPU fetches together).
#[derive(Debug)]
#[repr(align(128))]
pub struct LocalPool {
    pub pool: Pool,
    /// Requests of this thread holding a slot on the server: the pool's demand.
    active: AtomicUsize,
}

/// Counters a worker reports to the master.
#[derive(Debug, Default)]
pub struct Stats {
    pub active_connections: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
    /// Connections switched to another protocol (WebSocket), open now.
    pub tunnels_active: AtomicU64,
}

impl Stats {
    /// These counters now; what is counted beside them (by serving thread, dropped log lines)
    /// the proxy adds (`serve::Proxy::stats`).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            active_connections: self.active_connections.load(Ordering::Relaxed),
            thread_connections: Vec::new(),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            requests_in_flight: self.requests_in_flight.load(Ordering::Relaxed),
            tunnels_active: self.tunnels_active.load(Ordering::Relaxed),
            access_log_dropped: 0,
        }
    }

    /// Counts a tunnel as open until the guard drops.
    pub fn tunnel(&self) -> TunnelOpen<'_> {
        self.tunnels_active.fetch_add(1, Ordering::Relaxed);
        TunnelOpen(self)
    }
}

/// An open tunnel, counted in [`Stats::tunnels_active`].
pub struct TunnelOpen<'a>(&'a Stats);

impl Drop for TunnelOpen<'_> {
    fn drop(&mut self) {
        self.0.tunnels_active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct ServerRt {
    pub name: String,
    /// Where to connect now: the configured address, or the last one a DNS name resolved to;
    /// none until the name first resolves.
    address: RwLock<Option<SocketAddr>>,
    /// `address` is known: read by every pick, without the lock.
    addressed: AtomicBool,
    /// One per serving thread (see [`LocalPool`]).
    pools: Box<[LocalPool]>,
    pub config: crate::config::Server,
    /// Health (always true for unchecked servers).
    pub up: AtomicBool,
    pub admin: AtomicAdminState,
    pub weight: AtomicU32,
    /// Requests (HTTP) or connections (TCP) being served now.
    pub active: AtomicU32,
    pub requests: AtomicU64,
    /// Responses by class: 1xx to 5xx.
    pub responses: [AtomicU64; 5],
    /// Failed connection attempts and requests without a valid answer.
    pub errors: AtomicU64,
}

impl ServerRt {
    /// A server as configured: a DNS name has no address until it is resolved. `pools`: one
    /// per serving thread, at least one.
    pub fn new(config: &crate::config::Server, pools: Vec<Pool>, up: bool) -> Self {
        let address = match &config.address {
            Address::Ip(a) => Some(*a),
            Address::Name { .. } => None,
        };
        ServerRt {
            name: config.name.clone(),
            address: RwLock::new(address),
            addressed: AtomicBool::new(address.is_some()),
            pools: pools
                .into_iter()
                .map(|pool| LocalPool {
                    pool,
                    active: AtomicUsize::new(0),
                })
                .collect(),
            config: config.clone(),
            up: AtomicBool::new(up),
            admin: AtomicAdminState::new(AdminState::Ready),
            weight: AtomicU32::new(config.weight),
            active: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            responses: Default::default(),
            errors: AtomicU64::new(0),
        }
    }

    /// The calling serving thread's pool.
    pub fn pool(&self) -> &Pool {
        &self.local().pool
    }

    fn local(&self) -> &LocalPool {
        let i = serving_thread();
        // A thread beyond the count (none is started so) shares the last pool.
        &self.pools[i.min(self.pools.len() - 1)]
    }

    /// Every serving thread's pool.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter().map(|p| &p.pool)
    }

    /// Where to connect now; none for a name not resolved yet.
    pub fn address(&self) -> Option<SocketAddr> {
        *self.address.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the server to `new` (its name resolved elsewhere) and returns the old address.
    /// Connections open now finish where they are; the idle ones to the old address are
    /// closed, and those in use are not pooled again (see [`ServerRt::release`]).
    pub fn set_address(&self, new: SocketAddr) -> Option<SocketAddr> {
        let old = {
            let mut a = self.address.write().unwrap_or_else(|p| p.into_inner());
            a.replace(new)
        };
        self.addressed.store(true, Ordering::Relaxed);
        if old != Some(new) {
            self.pools().for_each(Pool::clear);
        }
        old
    }

    /// Opens a new connection to the server's address now, within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
        match self.address() {
            Some(a) => self.pool().connect(a, timeout).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not resolved yet", self.config.address),
            )),
        }
    }

    /// Gives a server connection back to the pool, unless the server has moved since it was
    /// opened (only a DNS name moves, so only those pay for the peer address).
    pub fn release(&self, io: Io<tokio::net::TcpStream>) {
        if matches!(self.config.address, Address::Name { .. })
            && io.stream.peer_addr().ok() != self.address()
        {
            return;
        }
        self.pool().put(io);
    }

    /// May take a new session.
    pub fn takes_new(&self) -> bool {
        self.addressed.load(Ordering::Relaxed)
            && self.up.load(Ordering::Relaxed)
            && self.admin.load() == AdminState::Ready
            && self.weight.load(Ordering::Relaxed) > 0
    }

    /// May take a session stuck to it.
    pub fn takes_stuck(&self) -> bool {
        self.addressed.load(Ordering::Relaxed)
            && self.up.load(Ordering::Relaxed)
            && self.admin.load() != AdminState::Maint
    }

    pub fn is_full(&self) -> bool {
        self.config.maxconn > 0 && self.active.load(Ordering::Relaxed) >= self.config.maxconn
    }
}

#[derive(Debug)]
pub struct BackendRt {
    pub name: String,
    pub balancer: Balancer,
    pub servers: Vec<ServerRt>,
    /// Fired when a slot frees or a server's state changes: queued requests look again.
    pub freed: tokio::sync::Notify,
    /// The stick table of the backend's rule, as an index into the worker's stick cache.
    pub stick_table: Option<usize>,
    /// Requests waiting for a slot now.
    pub queued: AtomicU64,
    pub no_server: AtomicU64,
    pub redispatched: AtomicU64,
    pub retries: AtomicU64,
}

/// Counters of one frontend.
#[derive(Debug, Default)]
pub struct FrontendCounters {
    pub connections_active: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_denied: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
}

/// Counts a request as queued while it lives.
struct Queued<'a>(&'a AtomicU64);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn queued(c: &AtomicU64) -> Queued<'_> {
    c.fetch_add(1, Ordering::Relaxed);
    Queued(c)
}

/// A request's hold on a server slot; frees it (and wakes the queue) when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    pub backend: &'a BackendRt,
    pub index: usize,
    /// The serving thread's share of the server's demand, counted while the slot lives.
    local: &'a LocalPool,
}

impl Slot<'_> {
    pub fn server(&self) -> &ServerRt {
        &self.backend.servers[self.index]
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server().active.fetch_sub(1, Ordering::Relaxed);
        self.local.active.fetch_sub(1, Ordering::Relaxed);
        if self.server().config.maxconn > 0 {
            self.backend.freed.notify_one();
        }
    }
}

/// Why no server could be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoServer {
    /// Nothing usable (all down, in maintenance, or weight 0).
    Unavailable,
    /// Every usable server stayed full for `timeout queue`.
    QueueTimeout,
}

impl BackendRt {
    /// Takes a slot on server `index` if it has room.
    fn try_take(&self, index: usize) -> Option<Slot<'_>> {
        let s = &self.servers[index];
        let max = s.config.maxconn;
        let mut cur = s.active.load(Ordering::Relaxed);
        loop {
            if max > 0 && cur >= max {
                return None;
            }
            match s
                .active
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    // Each request in flight holds a server connection: the pool of this
                    // thread keeps as many as the thread's busiest moment needed.
                    let local = s.local();
                    let mine = local.active.fetch_add(1, Ordering::Relaxed) + 1;
                    local.pool.in_use(mine);
                    return Some(Slot {
                        backend: self,
                        index,
                        local,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    fn candidates(&self, exclude: Option<usize>) -> Vec<Candidate> {
        self.servers
            .iter()
            .enumerate()
            .filter(|(i, s)| Some(*i) != exclude && s.takes_new() && !s.is_full())
            .map(|(index, s)| Candidate {
                index,
                weight: s.weight.load(Ordering::Relaxed),
                active: s.active.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// A slot on the balancer's choice (never `exclude` unless it is the only one left),
    /// waiting up to `queue` while every usable server is full.
    pub async fn acquire(
        &self,
        req: Request<'_>,
        exclude: Option<usize>,
        queue: Duration,
    ) -> Result<Slot<'_>, NoServer> {
        // The usual case first: a server has room, and nothing waits or reads the clock.
        if let Some(i) = self.balancer.pick(&self.candidates(exclude), req)
            && let Some(slot) = self.try_take(i)
        {
            return Ok(slot);
        }
        let deadline = Instant::now() + queue;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut cands = self.candidates(exclude);
            if cands.is_empty() && exclude.is_some() {
                cands = self.candidates(None);
            }
            if let Some(i) = self.balancer.pick(&cands, req)
                && let Some(slot) = self.try_take(i)
            {
                return Ok(slot);
            }
            if !self.servers.iter().any(ServerRt::takes_new) {
                return Err(NoServer::Unavailable);
            }
            if cands.is_empty() {
                let _q = queued(&self.queued);
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(NoServer::QueueTimeout);
                }
            }
        }
    }

    /// A slot on server `index` (a stuck session), queueing while it is full.
    pub async fn acquire_on(&self, index: usize, queue: Duration) -> Result<Slot<'_>, NoServer> {
        // The usual case first: the server has room, and nothing waits or reads the clock.
        if self.servers[index].takes_stuck()
            && let Some(slot) = self.try_take(index)
        {
            return Ok(slot);
        }
        let deadline = Instant::now() + queue;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.servers[index].takes_stuck() {
                return Err(NoServer::Unavailable);
            }
            if let Some(slot) = self.try_take(index) {
                return Ok(slot);
            }
            let _q = queued(&self.queued);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(NoServer::QueueTimeout);
            }
        }
    }

    pub fn server_index(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// The server a persistence cookie's value names, if any.
    pub fn cookie_index(&self, value: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.config.cookie == value)
    }
}

/// What every connection task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub backends: Vec<BackendRt>,
    pub stats: Stats,
    /// Fired when the worker drains: no more accepting, `Connection: close` on every response.
    pub drain: CancellationToken,
    /// Fired just before a drain's deadline closes what is left: a WebSocket tunnel says
    /// goodbye with a close frame to each side.
    pub closing: CancellationToken,
    pub stick: Option<Arc<StickCache>>,
    pub frontends: Vec<FrontendCounters>,
    /// Where each request's line goes, off the event loop.
    pub access_log: LogSink,
}

impl Shared {
    /// `health`: last known state by (backend, server); servers not in it start up.
    pub fn new(
        config: Arc<Config>,
        stick: Option<Arc<StickCache>>,
        health: &HashMap<(String, String), bool>,
    ) -> Self {
        let d = &config.defaults;
        let backends = config
            .backends
            .iter()
            .map(|b| BackendRt {
                name: b.name.clone(),
                balancer: Balancer::new(&b.balance, b.servers.len()),
                servers: b
                    .servers
                    .iter()
                    .map(|s| {
                        let up = !s.check
                            || health
                                .get(&(b.name.clone(), s.name.clone()))
                                .copied()
                                .unwrap_or(true);
                        let pools = (0..config.global.threads.max(1))
                            .map(|_| Pool::new(d.pool_max_idle, d.timeout_pool_idle))
                            .collect();
                        ServerRt::new(s, pools, up)
                    })
                    .collect(),
                freed: tokio::sync::Notify::new(),
                stick_table: b
                    .stick
                    .as_ref()
                    .and_then(|st| stick.as_ref().and_then(|c| c.table_index(&st.table))),
                queued: AtomicU64::new(0),
                no_server: AtomicU64::new(0),
                redispatched: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            })
            .collect();
        Shared {
            access_log: LogSink::new(&config.global.access_log),
            frontends: config
                .frontends
                .iter()
                .map(|_| FrontendCounters::default())
                .collect(),
            config,
            backends,
            stats: Stats::default(),
            drain: CancellationToken::new(),
            closing: CancellationToken::new(),
            stick,
        }
    }

    /// Every server's state and counters, in config order (for the master's ShowServers).
    pub fn server_states(&self) -> Vec<proto::proxyd::v1::ServerState> {
        let mut out = Vec::new();
        for b in &self.backends {
            for s in &b.servers {
                let r = |i: usize| s.responses[i].load(Ordering::Relaxed);
                let pool = s.pools().map(Pool::counts).fold(
                    crate::net::pool::PoolCounts::default(),
                    |a, c| crate::net::pool::PoolCounts {
                        opened: a.opened + c.opened,
                        reused: a.reused + c.reused,
                        purged: a.purged + c.purged,
                    },
                );
                out.push(proto::proxyd::v1::ServerState {
                    backend: b.name.clone(),
                    server: s.name.clone(),
                    address: s
                        .address()
                        .map_or_else(|| s.config.address.to_string(), |a| a.to_string()),
                    health: match (s.config.check, s.up.load(Ordering::Relaxed)) {
                        (false, _) => "no-check",
                        (true, true) => "up",
                        (true, false) => "down",
                    }
                    .into(),
                    admin_state: s.admin.load().as_str().into(),
                    weight: s.weight.load(Ordering::Relaxed),
                    active: s.active.load(Ordering::Relaxed),
                    maxconn: s.config.maxconn,
                    requests_total: s.requests.load(Ordering::Relaxed),
                    responses_1xx: r(0),
                    responses_2xx: r(1),
                    responses_3xx: r(2),
                    responses_4xx: r(3),
                    responses_5xx: r(4),
                    errors: s.errors.load(Ordering::Relaxed),
                    idle_pooled: s.pools().map(Pool::idle_count).sum::<usize>() as u32,
                    pool_opened_total: pool.opened,
                    pool_reused_total: pool.reused,
                    pool_purged_total: pool.purged,
                });
            }
        }
        out
    }

    /// Frontend and backend counters (for the master's metrics).
    pub fn frontend_backend_stats(
        &self,
    ) -> (
        Vec<proto::proxyd::control::v1::FrontendStats>,
        Vec<proto::proxyd::control::v1::BackendStats>,
    ) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let fe = self
            .config
            .frontends
            .iter()
            .zip(&self.frontends)
            .map(|(f, c)| proto::proxyd::control::v1::FrontendStats {
                name: f.name.clone(),
                connections_active: ld(&c.connections_active),
                connections_total: ld(&c.connections_total),
                requests_total: ld(&c.requests_total),
                requests_denied: ld(&c.requests_denied),
                tls_handshake_failures: ld(&c.tls_handshake_failures),
            })
            .collect();
        let be = self
            .backends
            .iter()
            .map(|b| proto::proxyd::control::v1::BackendStats {
                name: b.name.clone(),
                queued: ld(&b.queued),
                no_server_total: ld(&b.no_server),
                redispatched_total: ld(&b.redispatched),
                retries_total: ld(&b.retries),
            })
            .collect();
        (fe, be)
    }

    /// One tick of `pool_purge_delay` for every server's pool.
    pub fn purge_pools(&self) {
        let now = std::time::Instant::now();
        for s in self.backends.iter().flat_map(|b| &b.servers) {
            for p in &s.pools {
                p.pool.purge(now, p.active.load(Ordering::Relaxed));
            }
        }
    }

    /// An operator's `set server`; unknown names are ignored (another generation's config).
    pub fn apply_admin(&self, backend: &str, server: &str, state: AdminState, weight: u32) {
        let Some(b) = self.backends.iter().find(|b| b.name == backend) else {
            return;
        };
        let Some(s) = b.servers.iter().find(|s| s.name == server) else {
            return;
        };
        s.admin.store(state);
        s.weight.store(weight.min(256), Ordering::Relaxed);
        b.freed.notify_waiters();
    }
}
