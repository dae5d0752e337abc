//! A worker process: takes its config from the master, borrows its listeners from fdkeeper,
//! serves, reports, and drains when told (or when the master is gone).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use common::SourceFile;
use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use common::seqpacket::SeqPacket;
use common::signals::{Signal, Signals};
use fdkeeper::client::{Claim, Client, ClientError, LentListener, ListenSpec};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{BindRef, CertificateSource, Config};
use crate::control::{
    CertificateParts, CertificateSet, MASTER_INSTANCE_ENV, WorkerEnd, claim_owner, pb,
    ticket_keys_from_wire, to_master,
};
use crate::model::{AdminState, StatsSnapshot, TicketKey};
use crate::serve::{Proxy, Threads};
use crate::stick::StickCache;
use crate::sys;

/// How often counters go to the master.
const STATS_EVERY: Duration = Duration::from_millis(250);
/// How long an exiting worker waits for its access log lines to be written.
const LOG_PATIENCE: Duration = Duration::from_secs(1);
/// How long a busy address (fdkeeper just restarted, deposits pending) is retried.
const ACQUIRE_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("control channel: {0}")]
    Control(#[from] crate::control::ControlError),
    #[error("master sent no start message")]
    NoStart,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Entry point of `proxyd worker --control-fd N`; returns the exit code.
pub fn main(control_fd: RawFd) -> i32 {
    let fd = match sys::take_control_fd(control_fd) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, fd = control_fd, "no control socket; workers are started by the proxyd master");
            return EXIT_FAILURE;
        }
    };
    // The runtime's size comes from the config, which comes over the control socket:
    // read the Start message on a small runtime first.
    let (start, fd) = match read_start(fd) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the start message");
            return EXIT_FAILURE;
        }
    };
    let certificates = if start.certificates_follow {
        CertificateSource::Master
    } else {
        CertificateSource::Files
    };
    let config = Config::from_source_with(
        SourceFile::from_text(&start.config_path, start.config_toml),
        certificates,
    );
    // One current_thread runtime per serving thread: this one, and those `run` starts.
    let rt = match common::daemon::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the runtime");
            return EXIT_FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let control = match SeqPacket::new(fd) {
            Ok(s) => WorkerEnd::new(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot register the control socket");
                return EXIT_FAILURE;
            }
        };
        match config {
            Ok(mut config) => {
                if start.certificates_follow
                    && let Err(e) = receive_certificates(&control, &mut config).await
                {
                    tracing::error!(error = %e, "certificates refused");
                    let _ = control
                        .send(&failed(format!("certificates refused: {e}")))
                        .await;
                    return EXIT_CONFIG;
                }
                let span = tracing::info_span!(
                    "worker",
                    generation = start.generation,
                    pid = std::process::id()
                );
                let health = start
                    .health
                    .iter()
                    .map(|h| ((h.backend.clone(), h.server.clone()), h.up))
                    .collect();
                let tickets = start
                    .ticket_keys
                    .as_ref()
                    .map(ticket_keys_from_wire)
                    .unwrap_or_default();
                run(
                    Arc::new(config),
                    start.generation,
                    health,
                    start.admin,
                    start.need_stickd,
                    &tickets,
                    control,
                )
                .instrument(span)
                .await
            }
            Err(e) => {
                // The master validated this very text; reaching here means a version skew.
                tracing::error!(error = %e, "config refused");
                let _ = control.send(&failed(format!("config refused: {e}"))).await;
                EXIT_CONFIG
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

fn read_start(fd: OwnedFd) -> Result<(pb::Start, OwnedFd), WorkerError> {
    let rt = common::daemon::runtime(1)?;
    rt.block_on(async move {
        let control = WorkerEnd::new(SeqPacket::new(fd)?);
        let msg = control.recv().await?;
        let fd = control.into_inner().into_inner();
        match msg.and_then(|m| m.kind) {
            Some(pb::master_to_worker::Kind::Start(s)) => Ok((s, fd)),
            _ => Err(WorkerError::NoStart),
        }
    })
}

/// Takes the certificate set of every TLS setting from the master, checked again from its
/// bytes as a rotation is; the master sends them right after `Start`.
async fn receive_certificates(control: &WorkerEnd, config: &mut Config) -> Result<(), String> {
    let mut parts = CertificateParts::default();
    let mut have = vec![false; config.tls.len()];
    let now = common::time::now_ms().div_euclid(1000);
    while have.contains(&false) {
        let part = match control.recv().await.map_err(|e| e.to_string())? {
            Some(pb::MasterToWorker {
                kind: Some(pb::master_to_worker::Kind::Certificates(part)),
            }) => part,
            Some(_) => return Err("another message before the certificates".to_owned()),
            None => return Err("the master closed the control socket".to_owned()),
        };
        let Some(set) = parts.add(part) else {
            continue;
        };
        let i = usize::try_from(set.tls).unwrap_or(usize::MAX);
        let Some(tls) = config.tls.get_mut(i).filter(|t| t.name == set.name) else {
            return Err(format!("no tls setting '{}' in this config", set.name));
        };
        tls.certs = crate::config::tls::from_files(set.files, &crate::config::tls::provider(), now)
            .map_err(|e| format!("tls '{}': {e}", set.name))?;
        have[i] = true;
    }
    Ok(())
}

fn failed(reason: String) -> pb::WorkerToMaster {
    to_master(pb::worker_to_master::Kind::Failed(pb::Failed { reason }))
}

/// The listen specs of every bind, in config order, with the bind they are for.
pub fn listen_specs(config: &Config) -> Vec<(BindRef, ListenSpec)> {
    config
        .binds()
        .map(|(at, bind)| {
            (
                at,
                ListenSpec {
                    address: bind.address.to_string(),
                    backlog: config.frontends[at.frontend].backlog,
                    ..ListenSpec::default()
                },
            )
        })
        .collect()
}

/// This generation's claim on its listeners: fdkeeper keeps them open until the master
/// releases it (once no generation that still accepts uses them). `None` when the master did
/// not say who it is (a worker started by hand): the listeners are then pinned, as before
/// claims existed.
pub fn claim(config: &Config, generation: u64) -> Option<Claim> {
    let instance = std::env::var(MASTER_INSTANCE_ENV).ok()?;
    Some(Claim {
        owner: claim_owner(&config.source.path),
        instance,
        generation,
    })
}

/// Borrows every listener under `claim`, retrying while fdkeeper is away or an address is busy
/// (right after an fdkeeper restart, until the other borrowers have deposited).
pub async fn acquire(
    config: &Config,
    borrower: &str,
    claim: Option<&Claim>,
) -> Result<(Client, Vec<LentListener>), ClientError> {
    let specs: Vec<ListenSpec> = listen_specs(config).into_iter().map(|(_, s)| s).collect();
    let give_up = Instant::now() + ACQUIRE_PATIENCE;
    let mut backoff = Duration::from_millis(5);
    loop {
        let attempt = async {
            let mut client = Client::connect(&config.global.fdkeeper_socket).await?;
            let lent = client.acquire_claimed(borrower, &specs, claim).await?;
            Ok::<_, ClientError>((client, lent))
        }
        .await;
        match attempt {
            Ok(x) => return Ok(x),
            Err(e) if e.is_retriable() && Instant::now() + backoff < give_up => {
                tracing::debug!(error = %e, "acquiring listeners, will retry");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run(
    config: Arc<Config>,
    generation: u64,
    health: HashMap<(String, String), bool>,
    admin: Vec<pb::ServerAdmin>,
    need_stickd: bool,
    tickets: &[TicketKey],
    control: WorkerEnd,
) -> i32 {
    let pid = std::process::id();
    let borrower = format!("proxyd worker gen {generation} pid {pid}");
    let claim = claim(&config, generation);
    let (client, lent) = match acquire(&config, &borrower, claim.as_ref()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot borrow the listeners");
            let _ = control
                .send(&failed(format!("cannot borrow the listeners: {e}")))
                .await;
            return EXIT_FAILURE;
        }
    };
    let binds: Vec<BindRef> = listen_specs(&config)
        .into_iter()
        .map(|(at, _)| at)
        .collect();
    let mut held = Vec::with_capacity(lent.len());
    let mut inodes = Vec::with_capacity(lent.len());
    let mut listeners = Vec::with_capacity(lent.len());
    for (l, at) in lent.into_iter().zip(binds) {
        // The guard keeps its own copies to deposit with a restarted fdkeeper.
        match l.listener.as_fd().try_clone_to_owned() {
            Ok(fd) => held.push((l.spec.clone(), fd)),
            Err(e) => {
                let _ = control.send(&failed(format!("dup: {e}"))).await;
                return EXIT_FAILURE;
            }
        }
        inodes.push(l.inode);
        listeners.push((at, l.listener));
    }

    // The stick cache is filled before this generation says it is ready, so that it routes
    // its first request like the generation it replaces.
    let stick_stop = CancellationToken::new();
    let stick = StickCache::for_config(&config);
    if let (Some(cache), Some(socket)) = (&stick, &config.global.stickd_socket) {
        let wait = config.global.worker_ready_timeout / 2;
        match cache.start(socket.clone(), stick_stop.clone(), wait).await {
            Ok(true) => {}
            Ok(false) if need_stickd => {
                let why = format!(
                    "stickd ({}) did not answer within {} ms: the running generation keeps serving with its stick cache",
                    socket.display(),
                    wait.as_millis()
                );
                tracing::error!(reason = %why, "refusing to start");
                stick_stop.cancel();
                let _ = control.send(&failed(why)).await;
                return EXIT_FAILURE;
            }
            Ok(false) => {
                // Nothing else serves: better an empty cache than no service.
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "stickd did not answer: serving from an empty stick cache until it does"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "refusing to start");
                stick_stop.cancel();
                let _ = control.send(&failed(e.to_string())).await;
                return EXIT_CONFIG;
            }
        }
    }
    let proxy = Arc::new(Proxy::with_state(config.clone(), stick.clone(), &health));
    proxy.set_ticket_keys(tickets);
    for a in &admin {
        proxy.shared().apply_admin(
            &a.backend,
            &a.server,
            AdminState::from_wire(a.state),
            a.weight,
        );
    }
    // Server names are resolved before the first request may need them.
    let resolvers = crate::resolve::watch::Resolvers::for_config(&config);
    crate::resolve::watch::first_round(proxy.shared(), &resolvers).await;
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let checks_stop = CancellationToken::new();
    crate::health::spawn_all(proxy.shared(), health_tx, checks_stop.clone());
    crate::resolve::watch::spawn_all(proxy.shared(), &resolvers, checks_stop.clone());
    // Dropped when this function returns, once the connections are done (or cut): that stops
    // the other serving threads.
    let threads = match Threads::start(config.global.threads) {
        Ok(t) => t,
        Err(e) => {
            let _ = control
                .send(&failed(format!("cannot start the serving threads: {e}")))
                .await;
            return EXIT_FAILURE;
        }
    };
    if let Err(e) = proxy.start_on(listeners, threads.handles()) {
        let _ = control.send(&failed(format!("cannot serve: {e}"))).await;
        return EXIT_FAILURE;
    }
    let guard_stop = CancellationToken::new();
    // Stopped at drain: that closes this worker's copies and its fdkeeper connection, which
    // is what fdkeeper waits for before closing a listener whose claims the master released.
    tokio::spawn(fdkeeper::client::guard_listeners(
        config.global.fdkeeper_socket.clone(),
        client,
        held,
        claim,
        guard_stop.clone(),
    ));
    let ready = to_master(pb::worker_to_master::Kind::Ready(pb::Ready {
        generation,
        listener_inodes: inodes,
    }));
    if let Err(e) = control.send(&ready).await {
        tracing::warn!(error = %e, "cannot tell the master we are ready; draining");
    }
    tracing::info!("serving");

    // Ctrl-C and a closing terminal reach the whole process group: the master decides what
    // the workers do, so those signals are caught and ignored here.
    let mut signals = match Signals::new(&[Signal::Terminate, Signal::Interrupt, Signal::Hangup]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
    };
    let mut tick = tokio::time::interval(STATS_EVERY);
    let mut purge = tokio::time::interval(config.defaults.pool_purge_delay);
    let mut control_open = true;
    let mut finishing: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let begin_drain = |timeout: Duration, why: &str| {
        tracing::info!(
            timeout_ms = timeout.as_millis() as u64,
            reason = why,
            "draining"
        );
        guard_stop.cancel();
        // The next generation checks the servers now.
        checks_stop.cancel();
        let proxy = proxy.clone();
        let deadline = Instant::now() + timeout;
        Box::pin(async move { proxy.finish(deadline).await })
            as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    };
    let mut last_sent = pb::Stats::default();
    let mut certificate_parts = CertificateParts::default();
    loop {
        tokio::select! {
            () = async { if let Some(f) = finishing.as_mut() { f.await } }, if finishing.is_some() => {
                tracing::info!("drained, exiting");
                let _ = control.send(&stats_msg(&proxy)).await;
                flush_stick(stick.as_deref(), &stick_stop).await;
                proxy.shared().access_log.close(LOG_PATIENCE);
                return EXIT_OK;
            }
            Some(h) = health_rx.recv() => {
                let msg = to_master(pb::worker_to_master::Kind::Health(pb::ServerHealth {
                    backend: h.backend,
                    server: h.server,
                    up: h.up,
                }));
                if control_open {
                    let _ = control.send(&msg).await;
                }
            }
            msg = control.recv(), if control_open => match msg.map(|m| m.and_then(|m| m.kind)) {
                Ok(Some(pb::master_to_worker::Kind::Drain(d))) => {
                    if finishing.is_none() {
                        finishing = Some(begin_drain(Duration::from_millis(d.timeout_ms), "master"));
                    }
                }
                Ok(Some(pb::master_to_worker::Kind::Stop(_))) => {
                    tracing::info!("stopped by the master");
                    proxy.stop().await;
                    flush_stick(stick.as_deref(), &stick_stop).await;
                    proxy.shared().access_log.close(LOG_PATIENCE);
                    return EXIT_OK;
                }
                Ok(Some(pb::master_to_worker::Kind::ServerAdmin(a))) => {
                    proxy.shared().apply_admin(&a.backend, &a.server, AdminState::from_wire(a.state), a.weight);
                }
                Ok(Some(pb::master_to_worker::Kind::Certificates(part))) => {
                    if let Some(set) = certificate_parts.add(part) {
                        let _ = control.send(&rotate_certificates(&proxy, &config, set)).await;
                    }
                }
                Ok(Some(pb::master_to_worker::Kind::TicketKeys(keys))) => {
                    proxy.set_ticket_keys(&ticket_keys_from_wire(&keys));
                }
                Ok(Some(pb::master_to_worker::Kind::Start(_))) => {
                    tracing::warn!("ignoring a second start message");
                }
                Ok(None) | Err(_) => {
                    control_open = false;
                    if finishing.is_none() {
                        finishing = Some(begin_drain(config.global.drain_timeout, "master gone"));
                    }
                }
            },
            s = signals.recv() => {
                if s == Signal::Terminate && finishing.is_none() {
                    finishing = Some(begin_drain(config.global.drain_timeout, "SIGTERM"));
                }
            }
            _ = purge.tick() => proxy.shared().purge_pools(),
            _ = tick.tick() => {
                let msg = stats_msg(&proxy);
                if let Some(pb::worker_to_master::Kind::Stats(now)) = &msg.kind
                    && control_open
                    && *now != last_sent
                {
                    last_sent = now.clone();
                    let _ = control.send(&msg).await;
                }
            }
        }
    }
}

/// Serves a rotated certificate set to new handshakes, once checked again from the bytes the
/// master sent (the files may have changed since it read them); says how it went.
fn rotate_certificates(proxy: &Proxy, config: &Config, set: CertificateSet) -> pb::WorkerToMaster {
    let index = usize::try_from(set.tls).unwrap_or(usize::MAX);
    let result = match config.tls.get(index) {
        Some(t) if t.name == set.name => {
            let now = common::time::now_ms().div_euclid(1000);
            crate::config::tls::from_files(set.files, &crate::config::tls::provider(), now)
                .map_err(|e| e.to_string())
        }
        _ => Err(format!("no tls setting '{}' in this generation", set.name)),
    };
    let result = result.and_then(|certs| {
        if proxy.replace_certificates(index, &certs) {
            Ok(certs.len())
        } else {
            Err("tls is not serving yet".to_owned())
        }
    });
    match &result {
        Ok(n) => {
            tracing::info!(tls = %set.name, rotation = set.rotation, certificates = n, "certificates rotated");
        }
        Err(e) => {
            tracing::error!(tls = %set.name, rotation = set.rotation, error = %e, "rotated certificates refused, the previous ones keep serving");
        }
    }
    to_master(pb::worker_to_master::Kind::CertificatesApplied(
        pb::CertificatesApplied {
            tls: set.tls,
            rotation: set.rotation,
            error: result.err().unwrap_or_default(),
        },
    ))
}

/// Gives buffered stick writes a bounded moment to reach stickd before the process exits.
async fn flush_stick(stick: Option<&StickCache>, stop: &CancellationToken) {
    let Some(cache) = stick else { return };
    let deadline = Instant::now() + Duration::from_secs(1);
    while cache.pending_len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}

fn stats_msg(proxy: &Proxy) -> pb::WorkerToMaster {
    let s: StatsSnapshot = proxy.stats();
    let (frontends, backends) = proxy.shared().frontend_backend_stats();
    let stick = proxy.shared().stick.as_ref().map(|c| {
        let st = &c.stats;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        // One lock per shard, no walk: this runs every 250 ms beside the request path.
        let counts: Vec<_> = (0..c.tables.len()).map(|t| c.counts(t)).collect();
        pb::StickStats {
            hits: counts.iter().map(|n| n.hits).sum(),
            misses: counts.iter().map(|n| n.misses).sum(),
            entries: counts.iter().map(|n| n.entries).sum(),
            pending: c.pending_len() as u64,
            dropped: ld(&st.dropped),
            link_up: st.link_up.load(std::sync::atomic::Ordering::Relaxed),
            stores_sent: ld(&st.stores_sent),
            touches_sent: ld(&st.touches_sent),
        }
    });
    to_master(pb::worker_to_master::Kind::Stats(pb::Stats {
        active_connections: s.active_connections,
        thread_connections: s.thread_connections,
        requests_total: s.requests_total,
        requests_in_flight: s.requests_in_flight,
        tunnels_active: s.tunnels_active,
        access_log_dropped: s.access_log_dropped,
        servers: proxy.shared().server_states(),
        stick,
        frontends,
        backends,
    }))
}
