//! stickd: stick tables in sled, replicated to every peer over gRPC, inspectable with grpcurl.
//!
//! `run` takes sockets that are already bound (tests hand it `127.0.0.1:0`), opens the store,
//! serves `stick.v1.Stick` on the unix socket and `stick.v1.Peer` on TCP, pushes the local log to
//! every peer and keeps the store tidy (flush, expiry sweep, log trim) until `shutdown` fires.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod datadir;
mod disk;
mod entries;
pub mod hlc;
pub mod limits;
mod logbound;
pub mod ops;
pub mod peer;
#[cfg(test)]
mod peer_fuzz;
mod record;
pub mod service;
pub mod store;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::stick::v1 as pb;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

pub use config::Config;
pub use store::Store;

/// How often queued writes are handed to sled (then flushed every `flush_interval`).
const PERSIST_EVERY: Duration = Duration::from_millis(20);
/// How often expired entries are swept (cheap: the expiry index is ordered).
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Log trimming runs this often; between runs the log may exceed its bound a little.
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Sockets bound by the caller before `run`.
#[derive(Debug)]
pub struct Listeners {
    /// The local gRPC socket (proxyd, operators).
    pub local: std::os::unix::net::UnixListener,
    /// The peer gRPC address.
    pub peer: std::net::TcpListener,
}

impl Listeners {
    /// Binds the sockets a config names: the unix socket (0660, a stale one replaced) and the
    /// peer address.
    pub fn bind(config: &Config) -> std::io::Result<Listeners> {
        let local = common::daemon::bind_unix(&config.socket, 0o660)?;
        let peer = std::net::TcpListener::bind(config.listen)?;
        peer.set_nonblocking(true)?;
        Ok(Listeners { local, peer })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory is damaged or cannot be opened (its own exit code, see cli.rs).
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection_error::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Re-exported so that `Error` can name the reflection builder's error without a direct dependency.
mod tonic_reflection_error {
    pub type Error = tonic_reflection::server::Error;
}

/// Runs stickd until `shutdown` is cancelled, then flushes the store and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let config = Arc::new(config);
    let store = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || datadir::open(&config))
            .await
            .map_err(|e| std::io::Error::other(format!("store open task: {e}")))??
    };
    let store = Arc::new(store);
    let peers = Arc::new(peer::Peers::new(&config, &store)?);
    info!(
        local = %config.local,
        data_dir = %config.data_dir.display(),
        entries = store.tables_info().iter().map(|t| t.used).sum::<u64>(),
        head = store.head(),
        epoch = store.epoch(),
        "store open"
    );
    let tracker = TaskTracker::new();

    // Local service on the unix socket.
    let local = service::LocalService {
        store: store.clone(),
        peers: peers.clone(),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        next_watcher: std::sync::atomic::AtomicU64::new(1),
    };
    let router = tonic::transport::Server::builder()
        .add_service(
            common::grpc::health::<pb::stick_server::StickServer<service::LocalService>>().await,
        )
        .add_service(
            pb::stick_server::StickServer::new(local)
                .max_decoding_message_size(limits::MAX_REQUEST)
                .max_encoding_message_size(limits::MAX_REPLY),
        );
    let router = common::grpc::with_reflection(router, &[pb::stick_server::SERVICE_NAME])?;
    let local_task = {
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move { common::grpc::serve_unix(router, listeners.local, shutdown).await }
                .instrument(info_span!("local")),
        )
    };

    // Peer service on TCP.
    let peer_svc = peer::PeerService {
        config: config.clone(),
        store: store.clone(),
        peers: peers.clone(),
        shutdown: shutdown.clone(),
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.heartbeat))
        .http2_keepalive_timeout(Some(config.heartbeat * 3))
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls::server(tls)?)?;
    }
    let peer_router = builder
        .add_service(common::grpc::health::<pb::peer_server::PeerServer<peer::PeerService>>().await)
        .add_service(
            pb::peer_server::PeerServer::new(peer_svc)
                .max_decoding_message_size(limits::MAX_REQUEST)
                .max_encoding_message_size(limits::MAX_REPLY),
        );
    let peer_router = common::grpc::with_reflection(peer_router, &[pb::peer_server::SERVICE_NAME])?;
    let peer_listener = tokio::net::TcpListener::from_std(listeners.peer)?;
    let peer_addr = peer_listener.local_addr()?;
    let peer_task = {
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                peer_router
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(peer_listener),
                        shutdown.cancelled_owned(),
                    )
                    .await
            }
            .instrument(info_span!("peers", listen = %peer_addr)),
        )
    };

    // One pusher per peer.
    for state in peers.map.values() {
        tracker.spawn(
            peer::push_loop(
                config.clone(),
                store.clone(),
                state.clone(),
                shutdown.clone(),
            )
            .instrument(
                info_span!("push", peer = %state.peer.name, peer.addr = %state.peer.address),
            ),
        );
    }

    // Housekeeping: sweep, flush, trim.
    tracker.spawn(
        housekeeping(config.clone(), store.clone(), shutdown.clone())
            .instrument(info_span!("housekeeping")),
    );
    tracker.close();

    common::daemon::notify::ready(&format!("serving as {} on {peer_addr}", config.local));
    info!(local = %config.local, socket = %config.socket.display(), peer.listen = %peer_addr, peers = config.peers.len(), "stickd ready");

    shutdown.cancelled().await;
    common::daemon::notify::stopping("flushing");
    // Bounded drain: streams end on the token, but a stuck peer must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("tasks still running after 5s; exiting anyway");
    }
    for (what, task) in [("local", local_task), ("peer", peer_task)] {
        if task.is_finished() {
            match task.await {
                Ok(Err(e)) => error!(server = what, error = %e, "grpc server failed"),
                Err(e) => error!(server = what, error = %e, "grpc server task panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
    store.close().await?;
    info!("store flushed; bye");
    Ok(())
}

async fn housekeeping(config: Arc<Config>, store: Arc<Store>, shutdown: CancellationToken) {
    let mut persist = tokio::time::interval(PERSIST_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut flush = tokio::time::interval(config.flush_interval);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    for t in [&mut persist, &mut sweep, &mut flush, &mut trim] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = persist.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.persist()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "writing to sled failed"),
                    Err(e) => error!(error = %e, "sled writer task failed"),
                }
            }
            _ = sweep.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.sweep()).await {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(expired = n, "swept"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "expiry sweep failed"),
                    Err(e) => error!(error = %e, "expiry sweep task failed"),
                }
            }
            _ = flush.tick() => {
                // Hand the queue to sled off the async workers first; flush() then has little left.
                let s = store.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.persist()).await {
                    error!(error = %e, "writing to sled failed");
                }
                if let Err(e) = store.flush().await {
                    error!(error = %e, "flush failed");
                }
            }
            _ = trim.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.trim_log()).await {
                    Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, first = store.first_seq(), "log trimmed"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "log trim failed"),
                    Err(e) => error!(error = %e, "log trim task failed"),
                }
            }
        }
    }
}
