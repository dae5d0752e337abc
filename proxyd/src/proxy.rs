//! A worker's serving state: frontends' accept loops, backends with their pools, counters,
//! and the drain that stops accepting at once and lets connections finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::Balancer;
use crate::config::Config;
use crate::http::pool::Pool;

/// Counters a worker reports to the master.
#[derive(Debug, Default)]
pub struct Stats {
    pub active_connections: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub active_connections: u64,
    pub requests_total: u64,
    pub requests_in_flight: u64,
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
}

#[derive(Debug)]
pub struct BackendRt {
    pub name: String,
    pub balancer: Balancer,
    pub servers: Vec<ServerRt>,
}

/// What every connection task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub backends: Vec<BackendRt>,
    pub stats: Stats,
    /// Fired when the worker drains: no more accepting, `Connection: close` on every response.
    pub drain: CancellationToken,
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
    pub fn new(config: Arc<Config>) -> Self {
        let d = &config.defaults;
        let backends = config
            .backends
            .iter()
            .map(|b| BackendRt {
                name: b.name.clone(),
                balancer: Balancer::new(b.balance),
                servers: b
                    .servers
                    .iter()
                    .map(|s| ServerRt {
                        name: s.name.clone(),
                        address: s.address,
                        pool: Pool::new(d.pool_max_idle, d.timeout_pool_idle),
                    })
                    .collect(),
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                config,
                backends,
                stats: Stats::default(),
                drain: CancellationToken::new(),
            }),
            connections: TaskTracker::new(),
            accepting: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        }
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

    /// Waits until no connection is left, or hard-stops the rest at `deadline`.
    pub async fn finish(&self, deadline: Instant) {
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
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shared.drain.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let hard_stop = hard_stop.clone();
                shared
                    .stats
                    .active_connections
                    .fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("conn", client.addr = %peer);
                connections.spawn(
                    async move {
                        tokio::select! {
                            _ = crate::http::conn::serve(shared.clone(), frontend, stream) => {}
                            _ = hard_stop.cancelled() => {}
                        }
                        shared
                            .stats
                            .active_connections
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::debug!("stopped accepting");
}
