//! The top of the serving half: accepts on a worker's listeners, sets each connection up and
//! hands it to its frontend's protocol (`http`, `tcp`), and drains.
//!
//! Usable on its own with any bound listeners (tests). Draining stops accepting at once and
//! answers the next request of each keep-alive connection with `Connection: close`.

mod accept;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::model::StatsSnapshot;
use crate::shared::Shared;
use crate::stick::StickCache;

use accept::Acceptor;

/// The serving half of a worker: its shared state, its accept loops and its connections.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    connections: TaskTracker,
    accepting: TaskTracker,
    hard_stop: CancellationToken,
    /// Set before `shared.drain` fires for a graceful drain: each accept loop then takes what
    /// its queue already holds before it closes its listener.
    take_queue: Arc<AtomicBool>,
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
        Self {
            shared: Arc::new(Shared::new(config, stick, health)),
            connections: TaskTracker::new(),
            accepting: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            take_queue: Arc::new(AtomicBool::new(false)),
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
            let acceptor = Acceptor::new(
                self.shared.clone(),
                frontend,
                self.connections.clone(),
                self.hard_stop.clone(),
                self.take_queue.clone(),
            );
            self.accepting
                .spawn(acceptor.run(listener).instrument(span));
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
            self.take_queue.store(true, Ordering::Relaxed);
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
