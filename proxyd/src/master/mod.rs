//! The master: supervises worker generations, reloads (start N+1, wait for Ready, drain N),
//! respawns crashed workers, and tells systemd what is going on.
//!
//! One task owns all the state (no locks): this file is its event loop (commands from the
//! admin service and signals, events from the workers' relay tasks, timers).
//! [`generation`] holds what a generation is in each phase and how it moves between them,
//! [`spawn`] starts worker processes, [`claims`] releases fdkeeper claims, [`server_state`]
//! keeps operators' `set server` overrides, [`signals`] relays signals, [`certs`] rotates
//! certificates without a new generation, [`tickets`] makes the TLS session-ticket keys every
//! generation shares, [`restart`] names the settings a reload cannot apply.

mod certs;
mod claims;
mod generation;
mod restart;
mod server_state;
mod signals;
mod spawn;
mod tickets;

pub use certs::CertificatesError;
pub use signals::forward_signals;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::ConfigError;
use common::daemon::notify;
use common::time::unix_ms;
use proto::proxyd::v1 as api;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::pb;

use certs::{Certificates, CertificatesReply};
use generation::{Generation, Phase};
use server_state::AdminStates;
use tickets::TicketKeys;

/// Why a reload did not happen.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Worker(String),
    #[error("the master is stopping")]
    Stopping,
}

type ReloadReply = oneshot::Sender<Result<api::ReloadResult, ReloadError>>;

enum Command {
    /// `None`: nobody waits for the answer (SIGUSR2).
    Reload(Option<ReloadReply>, Instant),
    Status(oneshot::Sender<api::StatusReply>),
    /// The serving generation's last reported server states (and its stick cache figures).
    Servers(oneshot::Sender<Report>),
    SetServer(
        api::SetServerRequest,
        oneshot::Sender<Result<api::ServerState, SetServerError>>,
    ),
    ReloadCertificates(CertificatesReply),
}

/// What the serving generation last reported: its number, servers, stick cache, frontends
/// and backends.
pub type Report = (
    u64,
    Vec<api::ServerState>,
    Option<pb::StickStats>,
    Vec<pb::FrontendStats>,
    Vec<pb::BackendStats>,
);

/// Why `set server` was refused.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SetServerError {
    #[error("no server '{server}' in backend '{backend}'")]
    NotFound { backend: String, server: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the master is stopping")]
    Stopping,
}

/// Talks to a running master (the admin service, signal handlers, tests).
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
}

impl Handle {
    /// Reloads and waits for the result.
    pub async fn reload(&self) -> Result<api::ReloadResult, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Reload(Some(tx), Instant::now()))
            .map_err(|_| ReloadError::Stopping)?;
        rx.await.unwrap_or(Err(ReloadError::Stopping))
    }

    /// Starts a reload without waiting (its result lands in the log and in Status).
    pub fn reload_detached(&self) {
        let _ = self.tx.send(Command::Reload(None, Instant::now()));
    }

    pub async fn status(&self) -> Option<api::StatusReply> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Status(tx)).ok()?;
        rx.await.ok()
    }

    /// Serving generation, its servers, its stick cache figures.
    pub async fn servers(&self) -> Option<Report> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Servers(tx)).ok()?;
        rx.await.ok()
    }

    /// Reads every certificate set again and waits until the workers serve the new ones.
    pub async fn reload_certificates(
        &self,
    ) -> Result<api::ReloadCertificatesReply, CertificatesError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::ReloadCertificates(tx))
            .map_err(|_| CertificatesError::Stopping)?;
        rx.await.unwrap_or(Err(CertificatesError::Stopping))
    }

    pub async fn set_server(
        &self,
        req: api::SetServerRequest,
    ) -> Result<api::ServerState, SetServerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::SetServer(req, tx))
            .map_err(|_| SetServerError::Stopping)?;
        rx.await.unwrap_or(Err(SetServerError::Stopping))
    }
}

#[derive(Debug)]
enum Event {
    Msg {
        id: u64,
        msg: pb::WorkerToMaster,
    },
    /// Worker `id` is gone: it exited, or its spawn failed (then `status` says why).
    Exited {
        id: u64,
        status: String,
    },
    /// fdkeeper answered (or not) a release of the claims of generations `gone`.
    Released {
        gone: Vec<u64>,
        result: Result<fdkeeper::Released, String>,
    },
}

struct Pending {
    generation: u64,
    begun: Instant,
    reply: Option<ReloadReply>,
    /// What the new config changes that only a restart applies.
    restart_only: Vec<api::RestartOnly>,
}

/// The master's state; runs as one task that owns everything (no locks).
pub struct Master {
    exe: PathBuf,
    config_path: PathBuf,
    current: Arc<Config>,
    /// The settings bound at start, which reloads cannot change.
    at_start: restart::AtStart,
    generations: Vec<Generation>,
    next_generation: u64,
    next_worker_id: u64,
    cmd_tx: mpsc::UnboundedSender<Command>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    ev_tx: mpsc::UnboundedSender<Event>,
    ev_rx: mpsc::UnboundedReceiver<Event>,
    pending: Option<Pending>,
    queued: VecDeque<(Option<ReloadReply>, Instant)>,
    last_reload: Option<api::ReloadResult>,
    reloads_ok: u64,
    reloads_failed: u64,
    notified_ready: bool,
    stopping: bool,
    /// Last reported health of each checked server, by (backend, server): the next
    /// generation starts from it.
    health: BTreeMap<(String, String), bool>,
    /// Operators' `set server` overrides.
    admin: AdminStates,
    /// This master's run, as its workers name it in their fdkeeper claims.
    instance: String,
    /// Generations that may hold claims in fdkeeper and were not released yet.
    unreleased: BTreeSet<u64>,
    /// A claim release is on its way to fdkeeper (one at a time).
    releasing: bool,
    /// The claims of earlier masters (other instances) were released.
    released_others: bool,
    /// When to try a failed release again.
    release_retry_at: Option<Instant>,
    /// The serving config's certificates, watched and rotated.
    certs: Certificates,
    /// The TLS session-ticket keys every generation gets.
    tickets: TicketKeys,
}

impl Master {
    /// `exe` is the binary path resolved at start: every worker is a fresh exec of that path,
    /// so a reload after an upgrade on disk runs the new file.
    pub fn new(config: Config, exe: PathBuf) -> (Master, Handle) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let handle = Handle { tx: cmd_tx.clone() };
        let config_path = config.source.path.clone();
        let admin = server_state::load(&config);
        let certs = Certificates::new(&config);
        let master = Master {
            exe,
            config_path,
            at_start: restart::AtStart::new(&config.global),
            current: Arc::new(config),
            generations: Vec::new(),
            next_generation: 1,
            next_worker_id: 1,
            cmd_tx,
            cmd_rx,
            ev_tx,
            ev_rx,
            pending: None,
            queued: VecDeque::new(),
            last_reload: None,
            reloads_ok: 0,
            reloads_failed: 0,
            notified_ready: false,
            stopping: false,
            health: BTreeMap::new(),
            admin,
            instance: format!(
                "{:x}-{:x}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            unreleased: BTreeSet::new(),
            releasing: false,
            released_others: false,
            release_retry_at: None,
            certs,
            tickets: TicketKeys::new(Instant::now()),
        };
        (master, handle)
    }

    pub fn handle(&self) -> Handle {
        Handle {
            tx: self.cmd_tx.clone(),
        }
    }

    /// Runs until `shutdown` fires and every worker has drained (bounded by drain_timeout).
    /// Must run on a current-thread runtime on the main thread: workers get their
    /// parent-death signal from the thread that spawned them.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let first = self.current.clone();
        self.start_generation(first);
        loop {
            let timer = self.next_timer();
            tokio::select! {
                () = shutdown.cancelled(), if !self.stopping => self.begin_stop(),
                Some(cmd) = self.cmd_rx.recv() => self.on_command(cmd),
                Some(ev) = self.ev_rx.recv() => self.on_event(ev),
                () = sleep_until_opt(timer), if timer.is_some() => {
                    self.on_timer();
                    let now = Instant::now();
                    self.poll_certificates(now);
                    self.rotate_ticket_keys(now);
                }
            }
            if self.stopping && self.generations.is_empty() {
                break;
            }
            self.release_claims();
            if !self.stopping
                && self.pending.is_none()
                && let Some((reply, asked)) = self.queued.pop_front()
            {
                self.begin_reload(reply, asked);
            }
        }
        tracing::info!("every worker is gone, master exits");
    }

    fn next_timer(&self) -> Option<Instant> {
        self.generations
            .iter()
            .map(Generation::next_timer)
            .chain([
                self.release_retry_at,
                self.certs.next_timer(),
                Some(self.tickets.next_timer()),
            ])
            .flatten()
            .min()
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Servers(tx) => {
                let reply = match self.serving() {
                    Some(g) => {
                        let w = g.worker();
                        let mut servers = w.map(|w| w.servers.clone()).unwrap_or_default();
                        // What an operator set shows at once, not at the worker's next report.
                        for s in &mut servers {
                            if let Some((state, weight)) =
                                self.admin.get(&(s.backend.clone(), s.server.clone()))
                            {
                                s.admin_state = state.as_str().to_owned();
                                s.weight = *weight;
                            }
                        }
                        (
                            g.number,
                            servers,
                            w.and_then(|w| w.stick),
                            w.map(|w| w.frontends.clone()).unwrap_or_default(),
                            w.map(|w| w.backends.clone()).unwrap_or_default(),
                        )
                    }
                    None => (0, Vec::new(), None, Vec::new(), Vec::new()),
                };
                let _ = tx.send(reply);
            }
            Command::SetServer(req, tx) => {
                let _ = tx.send(self.set_server(req));
            }
            Command::ReloadCertificates(tx) => self.reload_certificates(tx),
            Command::Reload(reply, asked) => {
                if self.stopping {
                    if let Some(r) = reply {
                        let _ = r.send(Err(ReloadError::Stopping));
                    }
                } else if self.pending.is_some() {
                    // Serialized: one reload at a time, in the order asked.
                    self.queued.push_back((reply, asked));
                } else {
                    self.begin_reload(reply, asked);
                }
            }
        }
    }

    fn begin_reload(&mut self, reply: Option<ReloadReply>, asked: Instant) {
        notify::reloading("reloading");
        tracing::info!(config = %self.config_path.display(), "reloading");
        let config = match crate::resolve::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                self.finish_reload(reply, asked, 0, Err(ReloadError::Config(e)), Vec::new());
                return;
            }
        };
        let restart_only = self.at_start.changed(&config.global);
        for r in &restart_only {
            tracing::warn!(
                setting = %r.setting,
                running = %r.running,
                configured = %r.configured,
                "changed, but only a restart of the master applies it: it keeps the running value"
            );
        }
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let config = Arc::new(config);
        let number = self.start_generation(config);
        self.pending = Some(Pending {
            generation: number,
            begun: asked,
            reply,
            restart_only,
        });
    }

    fn finish_reload(
        &mut self,
        reply: Option<ReloadReply>,
        asked: Instant,
        generation: u64,
        result: Result<(), ReloadError>,
        restart_only: Vec<api::RestartOnly>,
    ) {
        let took = asked.elapsed();
        let record = api::ReloadResult {
            ok: result.is_ok(),
            message: match &result {
                Ok(()) => format!("generation {generation} serving"),
                Err(e) => e.to_string(),
            },
            at_unix_ms: unix_ms(SystemTime::now()),
            duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            generation,
            // A failed reload applied nothing, so nothing waits for a restart either.
            restart_only: if result.is_ok() {
                restart_only
            } else {
                Vec::new()
            },
        };
        match &result {
            Ok(()) => {
                self.reloads_ok += 1;
                tracing::info!(
                    generation,
                    took_ms = took.as_secs_f64() * 1e3,
                    "reload done"
                );
            }
            Err(e) => {
                self.reloads_failed += 1;
                tracing::error!(error = %e, "reload failed, the running generation keeps serving");
            }
        }
        self.last_reload = Some(record.clone());
        notify::ready(&self.status_line());
        if let Some(r) = reply {
            let _ = r.send(result.map(|()| record));
        }
    }

    /// Whether generation `number` is the one the reload in progress waits for.
    fn is_pending(&self, number: u64) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.generation == number)
    }

    /// The generation whose worker is (or was to be) worker `id`.
    fn find(&self, id: u64) -> Option<usize> {
        self.generations.iter().position(|g| g.has_worker_id(id))
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Msg { id, msg } => {
                let Some(idx) = self.find(id) else { return };
                let g = &mut self.generations[idx];
                match msg.kind {
                    Some(pb::worker_to_master::Kind::Ready(r)) => self.on_ready(idx, r),
                    Some(pb::worker_to_master::Kind::Failed(f)) => {
                        tracing::error!(generation = g.number, reason = %f.reason, "worker failed to start");
                        if let Some(w) = g.worker_mut() {
                            w.failed = Some(f.reason);
                        }
                    }
                    Some(pb::worker_to_master::Kind::Health(h)) => {
                        tracing::info!(backend = %h.backend, server = %h.server, up = h.up, generation = g.number, "server health");
                        self.health.insert((h.backend, h.server), h.up);
                    }
                    Some(pb::worker_to_master::Kind::CertificatesApplied(a)) => {
                        self.on_certificates_applied(idx, a);
                    }
                    Some(pb::worker_to_master::Kind::Stats(s)) => {
                        if let Some(w) = g.worker_mut() {
                            w.servers = s.servers;
                            w.stick = s.stick;
                            w.frontends = s.frontends;
                            w.backends = s.backends;
                            w.stats = crate::model::StatsSnapshot {
                                active_connections: s.active_connections,
                                thread_connections: s.thread_connections,
                                requests_total: s.requests_total,
                                requests_in_flight: s.requests_in_flight,
                                tunnels_active: s.tunnels_active,
                                access_log_dropped: s.access_log_dropped,
                            };
                        }
                    }
                    None => {}
                }
            }
            Event::Exited { id, status } => {
                let Some(idx) = self.find(id) else { return };
                self.on_exit(idx, status);
            }
            Event::Released { gone, result } => self.on_released(gone, result),
        }
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        notify::stopping("stopping: draining workers");
        tracing::info!("stopping: draining every worker");
        if let Some(r) = self.pending.take().and_then(|p| p.reply) {
            let _ = r.send(Err(ReloadError::Stopping));
        }
        for (reply, _) in self.queued.drain(..) {
            if let Some(r) = reply {
                let _ = r.send(Err(ReloadError::Stopping));
            }
        }
        let timeout = self.current.global.drain_timeout;
        let mut i = 0;
        while i < self.generations.len() {
            if self.generations[i].worker().is_none() {
                self.generations.remove(i);
                continue;
            }
            if !matches!(self.generations[i].phase, Phase::Draining { .. }) {
                self.drain(i, timeout);
            }
            i += 1;
        }
    }

    fn serving(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .filter(|g| matches!(g.phase, Phase::Serving))
            .max_by_key(|g| g.number)
    }

    fn status_line(&self) -> String {
        let draining = self
            .generations
            .iter()
            .filter(|g| matches!(g.phase, Phase::Draining { .. }))
            .count();
        let mut s = match self.serving() {
            Some(g) => format!(
                "generation {}, pid {}, {draining} draining",
                g.number,
                g.worker().map_or(0, |w| w.pid)
            ),
            None => "no generation serving".to_owned(),
        };
        s.push_str(&format!(
            ", reloads {} ok {} failed",
            self.reloads_ok, self.reloads_failed
        ));
        if let Some(r) = self.last_reload.as_ref().filter(|r| !r.ok) {
            s.push_str(&format!("; last reload failed: {}", r.message));
        }
        s
    }

    fn status(&self) -> api::StatusReply {
        api::StatusReply {
            master_pid: std::process::id(),
            config_path: self.config_path.display().to_string(),
            generations: self.generations.iter().map(Generation::status).collect(),
            last_reload: self.last_reload.clone(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            tls: self.certs.status(),
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
