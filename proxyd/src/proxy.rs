//! A worker's serving state: frontends' accept loops, backends with their pools, counters,
//! and the drain that stops accepting at once and lets connections finish.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::{Balancer, Candidate};
use crate::config::Config;
use crate::http::pool::Pool;
use crate::model::{AdminState, AtomicAdminState, StatsSnapshot};
use crate::stick::StickCache;

/// Counters a worker reports to the master.
#[derive(Debug, Default)]
pub struct Stats {
    pub active_connections: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            active_connections: self.active_connections.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            requests_in_flight: self.requests_in_flight.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
pub struct ServerRt {
    pub name: String,
    pub address: std::net::SocketAddr,
    pub pool: Pool,
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
    /// May take a new session.
    pub fn takes_new(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && self.admin.load() == AdminState::Ready
            && self.weight.load(Ordering::Relaxed) > 0
    }

    /// May take a session stuck to it.
    pub fn takes_stuck(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.admin.load() != AdminState::Maint
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
}

impl Slot<'_> {
    pub fn server(&self) -> &ServerRt {
        &self.backend.servers[self.index]
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server().active.fetch_sub(1, Ordering::Relaxed);
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
                    return Some(Slot {
                        backend: self,
                        index,
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
        client: IpAddr,
        exclude: Option<usize>,
        queue: Duration,
    ) -> Result<Slot<'_>, NoServer> {
        // The usual case first: a server has room, and nothing waits or reads the clock.
        if let Some(i) = self.balancer.pick(&self.candidates(exclude), client)
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
            if let Some(i) = self.balancer.pick(&cands, client)
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
}

/// What every connection task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub backends: Vec<BackendRt>,
    pub stats: Stats,
    /// Fired when the worker drains: no more accepting, `Connection: close` on every response.
    pub drain: CancellationToken,
    /// Set before `drain` fires for a graceful drain: each accept loop then takes what its
    /// queue already holds before it closes its listener (see `accept_loop`).
    take_queue: AtomicBool,
    pub stick: Option<Arc<StickCache>>,
    pub frontends: Vec<FrontendCounters>,
}

impl Shared {
    /// Every server's state and counters, in config order (for the master's ShowServers).
    pub fn server_states(&self) -> Vec<proto::proxyd::v1::ServerState> {
        let mut out = Vec::new();
        for b in &self.backends {
            for s in &b.servers {
                let r = |i: usize| s.responses[i].load(Ordering::Relaxed);
                out.push(proto::proxyd::v1::ServerState {
                    backend: b.name.clone(),
                    server: s.name.clone(),
                    address: s.address.to_string(),
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
                    idle_pooled: s.pool.idle_count() as u32,
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

/// The serving half of a worker, usable on its own with any bound listeners (tests).
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    connections: TaskTracker,
    accepting: TaskTracker,
    hard_stop: CancellationToken,
}

impl Proxy {
    /// A proxy without stick rules' cache (or whose config has none).
    pub fn new(config: Arc<Config>) -> Self {
        Self::with_state(config, None, &HashMap::new())
    }

    /// `health`: last known state by (backend, server); servers not in it start up.
    pub fn with_state(
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
                balancer: Balancer::new(b.balance, b.servers.len()),
                servers: b
                    .servers
                    .iter()
                    .map(|s| ServerRt {
                        name: s.name.clone(),
                        address: s.address,
                        pool: Pool::new(d.pool_max_idle, d.timeout_pool_idle),
                        config: s.clone(),
                        up: AtomicBool::new(
                            !s.check
                                || health
                                    .get(&(b.name.clone(), s.name.clone()))
                                    .copied()
                                    .unwrap_or(true),
                        ),
                        admin: AtomicAdminState::new(AdminState::Ready),
                        weight: AtomicU32::new(s.weight),
                        active: AtomicU32::new(0),
                        requests: AtomicU64::new(0),
                        responses: Default::default(),
                        errors: AtomicU64::new(0),
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
        Self {
            shared: Arc::new(Shared {
                frontends: config
                    .frontends
                    .iter()
                    .map(|_| FrontendCounters::default())
                    .collect(),
                config,
                backends,
                stats: Stats::default(),
                drain: CancellationToken::new(),
                take_queue: AtomicBool::new(false),
                stick,
            }),
            connections: TaskTracker::new(),
            accepting: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    pub fn is_draining(&self) -> bool {
        self.shared.drain.is_cancelled()
    }

    /// Starts accepting; each listener comes with the index of its frontend.
    pub fn start(&self, listeners: Vec<(usize, std::net::TcpListener)>) -> std::io::Result<()> {
        let mut loops = Vec::with_capacity(listeners.len());
        for (frontend, l) in listeners {
            l.set_nonblocking(true)?;
            loops.push((frontend, tokio::net::TcpListener::from_std(l)?));
        }
        for (frontend, listener) in loops {
            let name = self.shared.config.frontends[frontend].name.clone();
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let span = tracing::info_span!("frontend", frontend = %name, bind = %addr);
            self.accepting.spawn(
                accept_loop(
                    self.shared.clone(),
                    frontend,
                    listener,
                    self.connections.clone(),
                    self.hard_stop.clone(),
                )
                .instrument(span),
            );
        }
        Ok(())
    }

    /// Stops accepting at once (the listener copies are closed; the accept queue lives on in
    /// fdkeeper and the next generation) and closes keep-alive connections after their next response.
    pub async fn drain(&self) {
        self.shared.drain.cancel();
        self.accepting.close();
        self.accepting.wait().await;
    }

    /// Waits until no connection is left, or hard-stops the rest at `deadline`. With time left,
    /// the connections already queued on the listeners are accepted and served first.
    pub async fn finish(&self, deadline: Instant) {
        if deadline > Instant::now() {
            self.shared.take_queue.store(true, Ordering::Relaxed);
        }
        self.drain().await;
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_err()
        {
            let left = self.stats().active_connections;
            tracing::info!(
                connections = left,
                "drain deadline reached, closing the rest"
            );
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.connections.wait()).await;
        }
    }

    /// Closes every connection now.
    pub async fn stop(&self) {
        self.finish(Instant::now()).await;
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    frontend: usize,
    listener: tokio::net::TcpListener,
    connections: TaskTracker,
    hard_stop: CancellationToken,
) {
    // Past maxconn, connections wait in the accept queue (shared with the other generation).
    let limit = Arc::new(tokio::sync::Semaphore::new(
        shared.config.frontends[frontend].maxconn,
    ));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shared.drain.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = shared.drain.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => spawn_conn(
                &shared,
                frontend,
                stream,
                peer,
                permit,
                &connections,
                &hard_stop,
            ),
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    if shared.take_queue.load(Ordering::Relaxed) {
        take_queue(
            &shared,
            frontend,
            listener,
            &limit,
            &connections,
            &hard_stop,
        );
    }
    tracing::debug!("stopped accepting");
}

/// Most connections a drain takes from one listener's queue.
const TAKE_QUEUE_MAX: usize = 4096;

/// Accepts, without waiting, what the kernel has already queued on a listener this worker
/// stops using, and serves it (with `Connection: close`, as the worker drains). When the bind
/// stays in the config the next generation would take these too; when the reload dropped it,
/// nobody else will, and closing the listener would reset them: a reload loses no queued
/// connection either way. Only what arrives in the microseconds between this and the close of
/// the last copy of a dropped listener is refused.
fn take_queue(
    shared: &Arc<Shared>,
    frontend: usize,
    listener: tokio::net::TcpListener,
    limit: &Arc<tokio::sync::Semaphore>,
    connections: &TaskTracker,
    hard_stop: &CancellationToken,
) {
    // Out of tokio's hands: its readiness may not have seen the last arrivals yet.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    let mut taken = 0;
    while taken < TAKE_QUEUE_MAX {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            break;
        };
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accept of a queued connection failed");
                break;
            }
        };
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a queued connection");
                continue;
            }
        };
        spawn_conn(
            shared,
            frontend,
            stream,
            peer,
            permit,
            connections,
            hard_stop,
        );
        taken += 1;
    }
    if taken > 0 {
        tracing::info!(
            connections = taken,
            "took the queued connections before closing"
        );
    }
}

fn spawn_conn(
    shared: &Arc<Shared>,
    frontend: usize,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    connections: &TaskTracker,
    hard_stop: &CancellationToken,
) {
    let shared = shared.clone();
    let hard_stop = hard_stop.clone();
    shared
        .stats
        .active_connections
        .fetch_add(1, Ordering::Relaxed);
    let fc = &shared.frontends[frontend];
    fc.connections_active.fetch_add(1, Ordering::Relaxed);
    fc.connections_total.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("conn", client.addr = %peer);
    connections.spawn(
        async move {
            tokio::select! {
                _ = serve(shared.clone(), frontend, stream, peer) => {}
                _ = hard_stop.cancelled() => {}
            }
            shared
                .stats
                .active_connections
                .fetch_sub(1, Ordering::Relaxed);
            shared.frontends[frontend]
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        }
        .instrument(span),
    );
}

async fn serve(
    shared: Arc<Shared>,
    frontend: usize,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) {
    match shared.config.frontends[frontend].mode {
        crate::config::Mode::Http => crate::http::conn::serve(shared, frontend, stream, peer).await,
        crate::config::Mode::Tcp => crate::tcp::serve(shared, frontend, stream, peer).await,
    }
}
