//! The top of the serving half: accepts on a worker's listeners, sets each connection up (TLS
//! on a TLS bind) and hands it to its frontend's protocol (`http`, `tcp`), and drains.
//!
//! Usable on its own with any bound listeners (tests). Draining stops accepting at once and
//! answers the next request of each keep-alive connection with `Connection: close`.

mod accept;
mod park;
mod threads;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::tls::LoadedCert;
use crate::config::{BindRef, Config};
use crate::model::{StatsSnapshot, TicketKey};
use crate::net::tls::TlsServer;
use crate::net::tls::tickets::TicketKeys;
use crate::shared::Shared;
use crate::stick::StickCache;

use accept::Acceptor;
pub use threads::Threads;

/// How long tunnels get to say goodbye at a drain's deadline before they are cut.
const CLOSE_FRAMES: Duration = Duration::from_millis(200);

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
    /// The server side of each TLS setting (`Config::tls`'s order), once started.
    tls: OnceLock<Vec<TlsServer>>,
    /// The session-ticket keys of every TLS setting; none until the master gives some.
    tickets: Arc<TicketKeys>,
    /// Each serving thread's idle connections, once started.
    parks: OnceLock<Arc<[park::Parking]>>,
    /// The serving threads with the connections each holds, once started (`parks`' order).
    spread: OnceLock<Arc<threads::Spread>>,
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
            tls: OnceLock::new(),
            tickets: Arc::new(TicketKeys::default()),
            parks: OnceLock::new(),
            spread: OnceLock::new(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            thread_connections: self.spread.get().map_or_else(Vec::new, |s| s.connections()),
            access_log_dropped: self.shared.access_log.dropped(),
            ..self.shared.stats.snapshot()
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.drain.is_cancelled()
    }

    /// The idle keep-alive connections parked now, out of tasks, on every serving thread.
    pub fn parked_connections(&self) -> usize {
        self.parks
            .get()
            .map_or(0, |parks| parks.iter().map(park::Parking::parked).sum())
    }

    /// Starts accepting on the caller's runtime; each listener comes with the bind it is for.
    /// Fails if a listener cannot join the runtime or rustls refuses a TLS setting.
    pub fn start(&self, listeners: Vec<(BindRef, std::net::TcpListener)>) -> std::io::Result<()> {
        self.start_on(listeners, &[tokio::runtime::Handle::current()])
    }

    /// Starts accepting on each of `runtimes` (a worker's serving threads): every runtime gets
    /// its own copy of each listener, polled by its own reactor, and each connection accepted
    /// is served to its end by the runtime with the fewest connections. A later call adds
    /// listeners to the same threads: it must pass the same runtimes.
    pub fn start_on(
        &self,
        listeners: Vec<(BindRef, std::net::TcpListener)>,
        runtimes: &[tokio::runtime::Handle],
    ) -> std::io::Result<()> {
        let config = &self.shared.config;
        let tls = config
            .tls
            .iter()
            .map(|t| {
                TlsServer::new(t, &self.tickets)
                    .map_err(|e| std::io::Error::other(format!("tls settings '{}': {e}", t.name)))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let tls = self.tls.get_or_init(|| tls);
        // maxconn is the frontend's: one count for all of its binds.
        let limits: Vec<Arc<Semaphore>> = config
            .frontends
            .iter()
            .map(|f| Arc::new(Semaphore::new(f.maxconn)))
            .collect();
        let spread = self
            .spread
            .get_or_init(|| Arc::new(threads::Spread::new(runtimes)));
        let parks = self.parks.get_or_init(|| {
            runtimes
                .iter()
                .map(|rt| {
                    let _in = rt.enter();
                    park::Parking::start(self.connections.clone(), self.hard_stop.clone())
                })
                .collect()
        });
        let mut loops = Vec::with_capacity(listeners.len() * runtimes.len());
        for (at, l) in listeners {
            l.set_nonblocking(true)?;
            let mut copies = (1..runtimes.len())
                .map(|_| l.try_clone())
                .collect::<std::io::Result<Vec<_>>>()?;
            copies.push(l);
            for (rt, copy) in runtimes.iter().zip(copies) {
                // Registered with that runtime's reactor, not the caller's.
                let _in = rt.enter();
                loops.push((at, rt, tokio::net::TcpListener::from_std(copy)?));
            }
        }
        for (at, rt, listener) in loops {
            let name = config.frontends[at.frontend].name.clone();
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let bind_tls = config.bind(at).tls;
            let span = tracing::info_span!("frontend", frontend = %name, bind = %addr, tls = bind_tls.is_some());
            let acceptor = Acceptor {
                shared: self.shared.clone(),
                at,
                tls: bind_tls.map(|i| tls[i].clone()),
                connections: self.connections.clone(),
                hard_stop: self.hard_stop.clone(),
                take_queue: self.take_queue.clone(),
                limit: limits[at.frontend].clone(),
                spread: spread.clone(),
                parks: parks.clone(),
            };
            self.accepting
                .spawn_on(acceptor.run(listener).instrument(span), rt);
        }
        Ok(())
    }

    /// Serves `certs` on TLS setting `tls` (an index into `Config::tls`) to the handshakes that
    /// begin from now on; false when there is no such setting or the proxy has not started.
    pub fn replace_certificates(&self, tls: usize, certs: &[Arc<LoadedCert>]) -> bool {
        match self.tls.get().and_then(|servers| servers.get(tls)) {
            Some(server) => {
                server.replace_certificates(certs);
                true
            }
            None => false,
        }
    }

    /// Seals session tickets with `keys[0]` from now on and opens those of any of `keys`; no
    /// keys: no tickets (rustls keeps sessions in this process's memory).
    pub fn set_ticket_keys(&self, keys: &[TicketKey]) {
        self.tickets.replace(keys);
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
            let left = self.stats();
            tracing::info!(
                connections = left.active_connections,
                tunnels = left.tunnels_active,
                "drain deadline reached, closing the rest"
            );
            if left.tunnels_active > 0 {
                // A moment for WebSocket tunnels to send their close frames.
                self.shared.closing.cancel();
                let _ = tokio::time::timeout(CLOSE_FRAMES, self.connections.wait()).await;
            }
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.connections.wait()).await;
        }
    }

    /// Closes every connection now.
    pub async fn stop(&self) {
        self.finish(Instant::now()).await;
    }
}
