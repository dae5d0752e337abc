//! The master: supervises worker generations, reloads (start N+1, wait for Ready, drain N),
//! respawns crashed workers, and tells systemd what is going on.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::ConfigError;
use common::daemon::notify;
use proto::proxyd::v1 as api;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{MASTER_INSTANCE_ENV, MasterEnd, claim_owner, pb, to_worker};
use crate::model::{AdminState, StatsSnapshot, UnknownAdminState};
use crate::sys::{self, SeqPacket};

/// Grace after a drain deadline (or a Stop) before a worker is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Crash-loop detection: this many crashes within the window means backing off.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
const CRASHES_BEFORE_BACKOFF: usize = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A worker that served at least this long before dying is not part of a crash loop: it is
/// respawned at once however often that happens (kill -9 under load must not slow recovery).
const STABLE_AFTER: Duration = Duration::from_millis(100);
/// A claim release fdkeeper did not answer (down, restarting) is tried again after this.
const RELEASE_RETRY: Duration = Duration::from_secs(1);
/// Bound on one claim release round trip.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Serving,
    Draining,
}

#[derive(Debug)]
enum ToWorker {
    Send(pb::MasterToWorker),
    Kill,
}

#[derive(Debug)]
enum Event {
    Msg {
        id: u64,
        msg: pb::WorkerToMaster,
    },
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

#[derive(Debug)]
struct Worker {
    id: u64,
    pid: u32,
    tx: mpsc::UnboundedSender<ToWorker>,
    started: SystemTime,
    stats: StatsSnapshot,
    /// The reason from a `Failed` message, reported when the process exits.
    failed: Option<String>,
    /// Servers and stick cache as last reported.
    servers: Vec<api::ServerState>,
    stick: Option<pb::StickStats>,
    frontends: Vec<pb::FrontendStats>,
    backends: Vec<pb::BackendStats>,
    ready_at: Option<Instant>,
}

#[derive(Debug)]
struct Generation {
    number: u64,
    config: Arc<Config>,
    state: State,
    /// The path its binary was opened from, for Status.
    binary: PathBuf,
    /// That binary, opened at the generation's first spawn and kept open: every worker of the
    /// generation (respawns too) execs this very file, not whatever the path holds by then.
    binary_file: Option<std::fs::File>,
    worker: Option<Worker>,
    restarts: u32,
    crashes: VecDeque<Instant>,
    /// When a crashed worker is respawned (crash-loop backoff).
    respawn_at: Option<Instant>,
    /// When the worker was found dead, to log how long the respawn took.
    down_since: Option<Instant>,
    ready_deadline: Option<Instant>,
    kill_at: Option<Instant>,
    draining_since: Option<SystemTime>,
    /// Sent Stop (over max_draining): no longer counted as draining.
    stopped: bool,
    /// Given up on (not ready in time): removed when its worker is gone.
    abandoned: bool,
    inodes: Vec<u64>,
}

struct Pending {
    generation: u64,
    begun: Instant,
    reply: Option<ReloadReply>,
}

/// The master's state; runs as one task that owns everything (no locks).
pub struct Master {
    exe: PathBuf,
    config_path: PathBuf,
    current: Arc<Config>,
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
    health: std::collections::BTreeMap<(String, String), bool>,
    /// Operators' `set server` overrides: (state, weight) by (backend, server).
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
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Master {
    /// `exe` is the binary path resolved at start: every worker is a fresh exec of that path,
    /// so a reload after an upgrade on disk runs the new file.
    pub fn new(config: Config, exe: PathBuf) -> (Master, Handle) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let handle = Handle { tx: cmd_tx.clone() };
        let config_path = config.source.path.clone();
        let admin = load_server_state(&config);
        let master = Master {
            exe,
            config_path,
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
            health: std::collections::BTreeMap::new(),
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
                () = sleep_until_opt(timer), if timer.is_some() => self.on_timer(),
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
            .flat_map(|g| {
                let ready = if g.state == State::Starting && !g.abandoned {
                    g.ready_deadline
                } else {
                    None
                };
                [
                    g.respawn_at,
                    g.kill_at.filter(|_| g.worker.is_some()),
                    ready,
                ]
            })
            .chain([self.release_retry_at])
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
                        let w = g.worker.as_ref();
                        (
                            g.number,
                            w.map(|w| w.servers.clone()).unwrap_or_default(),
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

    /// Records an operator's override and sends it to every running worker.
    fn set_server(
        &mut self,
        req: api::SetServerRequest,
    ) -> Result<api::ServerState, SetServerError> {
        let not_found = || SetServerError::NotFound {
            backend: req.backend.clone(),
            server: req.server.clone(),
        };
        let backend = self.current.backend(&req.backend).ok_or_else(not_found)?;
        let server = backend
            .servers
            .iter()
            .find(|s| s.name == req.server)
            .ok_or_else(not_found)?;
        let key = (req.backend.clone(), req.server.clone());
        let (mut state, mut weight) = self
            .admin
            .get(&key)
            .copied()
            .unwrap_or((AdminState::Ready, server.weight));
        if !req.state.is_empty() {
            state = req
                .state
                .parse()
                .map_err(|e: UnknownAdminState| SetServerError::Invalid(e.to_string()))?;
        }
        if let Some(w) = req.weight {
            if w > 256 {
                return Err(SetServerError::Invalid(
                    "weight must be between 0 and 256".into(),
                ));
            }
            weight = w;
        }
        self.admin.insert(key, (state, weight));
        if let Some(path) = &self.current.global.server_state_file
            && let Err(e) = save_server_state(path, &self.admin)
        {
            // The change is made; only its survival across a restart of the master is lost.
            tracing::warn!(file = %path.display(), error = %e, "cannot write the server state file");
        }
        tracing::info!(backend = %req.backend, server = %req.server, state = state.as_str(), weight, "set server");
        let msg = to_worker(pb::master_to_worker::Kind::ServerAdmin(pb::ServerAdmin {
            backend: req.backend.clone(),
            server: req.server.clone(),
            state: state.to_wire(),
            weight,
        }));
        for g in &self.generations {
            if let Some(w) = &g.worker {
                let _ = w.tx.send(ToWorker::Send(msg.clone()));
            }
        }
        let mut shown = self
            .serving()
            .and_then(|g| g.worker.as_ref())
            .and_then(|w| {
                w.servers
                    .iter()
                    .find(|s| s.backend == req.backend && s.server == req.server)
                    .cloned()
            })
            .unwrap_or_else(|| api::ServerState {
                backend: req.backend.clone(),
                server: req.server.clone(),
                address: server.address.to_string(),
                maxconn: server.maxconn,
                ..Default::default()
            });
        shown.admin_state = state.as_str().into();
        shown.weight = weight;
        Ok(shown)
    }

    fn begin_reload(&mut self, reply: Option<ReloadReply>, asked: Instant) {
        notify::reloading("reloading");
        tracing::info!(config = %self.config_path.display(), "reloading");
        let config = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                self.finish_reload(reply, asked, 0, Err(ReloadError::Config(e)));
                return;
            }
        };
        if config.global.admin_socket != self.current.global.admin_socket {
            tracing::warn!("admin_socket changed: the master keeps the old one until it restarts");
        }
        let config = Arc::new(config);
        let number = self.start_generation(config);
        self.pending = Some(Pending {
            generation: number,
            begun: asked,
            reply,
        });
    }

    fn finish_reload(
        &mut self,
        reply: Option<ReloadReply>,
        asked: Instant,
        generation: u64,
        result: Result<(), ReloadError>,
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

    /// Adds a generation and spawns its worker; returns its number.
    fn start_generation(&mut self, config: Arc<Config>) -> u64 {
        let number = self.next_generation;
        self.next_generation += 1;
        let ready_deadline = Some(Instant::now() + config.global.worker_ready_timeout);
        self.generations.push(Generation {
            number,
            config,
            state: State::Starting,
            binary: self.exe.clone(),
            binary_file: None,
            worker: None,
            restarts: 0,
            crashes: VecDeque::new(),
            respawn_at: None,
            down_since: None,
            ready_deadline,
            kill_at: None,
            draining_since: None,
            stopped: false,
            abandoned: false,
            inodes: Vec::new(),
        });
        self.unreleased.insert(number);
        let idx = self.generations.len() - 1;
        self.spawn_worker(idx);
        number
    }

    /// Spawns the worker of `generations[idx]`; a spawn failure counts as a crash.
    fn spawn_worker(&mut self, idx: usize) {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let g = &mut self.generations[idx];
        g.respawn_at = None;
        // The first worker of a generation opens the file at the path (after an upgrade, the
        // new binary: that is what a reload is for); a respawn runs that same open file. An
        // operator who replaced the binary but has not reloaded yet (or whose reload failed)
        // expects the crashed serving generation back as it was, not an untried binary under
        // a config it was never started with.
        let opened = match &g.binary_file {
            Some(f) => Ok(f),
            None => std::fs::File::open(&self.exe).map(|f| {
                g.binary = self.exe.clone();
                &*g.binary_file.insert(f)
            }),
        };
        let program = opened.map(|f| {
            let by_fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            if by_fd.exists() {
                by_fd
            } else {
                // No /proc (an odd container): the path is all there is.
                tracing::warn!(binary = %g.binary.display(), "no /proc/self/fd: the worker runs whatever file is at the path now");
                g.binary.clone()
            }
        });
        let health: Vec<pb::ServerHealth> = self
            .health
            .iter()
            .map(|((backend, server), up)| pb::ServerHealth {
                backend: backend.clone(),
                server: server.clone(),
                up: *up,
            })
            .collect();
        let admin: Vec<pb::ServerAdmin> = self
            .admin
            .iter()
            .map(|((backend, server), (state, weight))| pb::ServerAdmin {
                backend: backend.clone(),
                server: server.clone(),
                state: state.to_wire(),
                weight: *weight,
            })
            .collect();
        let need_stickd = self.generations[idx].restarts == 0
            && self
                .generations
                .iter()
                .any(|o| o.number != self.generations[idx].number && o.state == State::Serving);
        let g = &mut self.generations[idx];
        let spawned = program.and_then(|program| {
            let exec = Exec {
                program: &program,
                arg0: &g.binary,
                instance: &self.instance,
            };
            spawn_process(&exec, id, g, health, admin, need_stickd, self.ev_tx.clone())
        });
        match spawned {
            Ok(worker) => {
                tracing::info!(generation = g.number, pid = worker.pid, binary = %g.binary.display(), "worker spawned");
                g.worker = Some(worker);
            }
            Err(e) => {
                tracing::error!(generation = g.number, error = %e, binary = %g.binary.display(), "cannot spawn a worker");
                let _ = self.ev_tx.send(Event::Exited {
                    id,
                    status: format!("spawn failed: {e}"),
                });
                // Give the exit handler a worker to find.
                let (tx, _) = mpsc::unbounded_channel();
                g.worker = Some(Worker {
                    id,
                    pid: 0,
                    tx,
                    started: SystemTime::now(),
                    stats: StatsSnapshot::default(),
                    failed: None,
                    servers: Vec::new(),
                    stick: None,
                    frontends: Vec::new(),
                    backends: Vec::new(),
                    ready_at: None,
                });
            }
        }
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.generations
            .iter()
            .position(|g| g.worker.as_ref().is_some_and(|w| w.id == id))
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Msg { id, msg } => {
                let Some(idx) = self.find(id) else { return };
                match msg.kind {
                    Some(pb::worker_to_master::Kind::Ready(r)) => self.on_ready(idx, r),
                    Some(pb::worker_to_master::Kind::Failed(f)) => {
                        tracing::error!(generation = self.generations[idx].number, reason = %f.reason, "worker failed to start");
                        if let Some(w) = self.generations[idx].worker.as_mut() {
                            w.failed = Some(f.reason);
                        }
                    }
                    Some(pb::worker_to_master::Kind::Health(h)) => {
                        tracing::info!(backend = %h.backend, server = %h.server, up = h.up, generation = self.generations[idx].number, "server health");
                        self.health.insert((h.backend, h.server), h.up);
                    }
                    Some(pb::worker_to_master::Kind::Stats(s)) => {
                        if let Some(w) = self.generations[idx].worker.as_mut() {
                            w.servers = s.servers;
                            w.stick = s.stick;
                            w.frontends = s.frontends;
                            w.backends = s.backends;
                            w.stats = StatsSnapshot {
                                active_connections: s.active_connections,
                                requests_total: s.requests_total,
                                requests_in_flight: s.requests_in_flight,
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
            Event::Released { gone, result } => {
                self.releasing = false;
                match result {
                    Ok(r) => {
                        if !r.closed.is_empty() || !r.closing.is_empty() {
                            tracing::info!(
                                generations = ?gone,
                                closed = ?r.closed,
                                closing = ?r.closing,
                                "listeners no serving generation uses released in fdkeeper"
                            );
                        } else {
                            tracing::debug!(generations = ?gone, "fdkeeper claims released");
                        }
                        for n in gone {
                            self.unreleased.remove(&n);
                        }
                        self.released_others = true;
                    }
                    Err(e) => {
                        // Nothing is lost by waiting: the claims stay, and so do the listeners.
                        tracing::warn!(generations = ?gone, error = %e, retry_in_ms = RELEASE_RETRY.as_millis() as u64, "cannot release listeners in fdkeeper");
                        self.release_retry_at = Some(Instant::now() + RELEASE_RETRY);
                    }
                }
            }
        }
    }

    /// The release to send now, with the generations it lets go of; `None` when there is
    /// nothing to release (or it is not the time).
    fn claims_to_release(&self) -> Option<(Vec<u64>, fdkeeper::ClaimRelease)> {
        if self.stopping || !self.notified_ready || self.releasing {
            return None;
        }
        let keep: Vec<u64> = self
            .generations
            .iter()
            .filter(|g| !g.abandoned && matches!(g.state, State::Starting | State::Serving))
            .map(|g| g.number)
            .collect();
        let gone: Vec<u64> = self
            .unreleased
            .iter()
            .copied()
            .filter(|n| !keep.contains(n))
            .collect();
        if gone.is_empty() && self.released_others {
            return None;
        }
        let claims = fdkeeper::ClaimRelease {
            owner: claim_owner(&self.config_path),
            instance: self.instance.clone(),
            below: self.next_generation,
            keep,
        };
        Some((gone, claims))
    }

    /// Tells fdkeeper which of this master's listener claims still matter, whenever a
    /// generation stopped accepting for good (drained, abandoned, failed to start): fdkeeper
    /// then closes the listeners that only such generations used.
    ///
    /// A listener is released when no Starting or Serving generation has it in its config,
    /// not when the last draining generation exits: a draining worker stops accepting at once
    /// and closes its copies, so from then on nobody would ever accept what lands in that
    /// accept queue, and clients would hang until the drain ends. Released at drain start,
    /// new connections are refused at once. What is in the queue at that moment is reset by
    /// the close (the draining generation can no longer accept it); what the draining worker
    /// accepted is its own and is served to the end. A generation that re-adds the address
    /// later binds it again; one that already holds a claim keeps the very socket: claims
    /// are per generation, and a release only names generations below the next number, so
    /// it never drops the claim of a generation started after it was computed.
    ///
    /// Nothing is released while stopping: listeners outlive a proxyd restart in fdkeeper.
    /// The next master, once its first generation serves (and so claims what it uses),
    /// releases every claim of earlier masters.
    fn release_claims(&mut self) {
        if self.release_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.release_retry_at = None;
        let Some((gone, claims)) = self.claims_to_release() else {
            return;
        };
        self.releasing = true;
        let socket = self.current.global.fdkeeper_socket.clone();
        let events = self.ev_tx.clone();
        tokio::spawn(async move {
            let call = async {
                let mut client = fdkeeper::Client::connect(&socket)
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .release_claims(&[], claims)
                    .await
                    .map_err(|e| e.to_string())
            };
            let result = tokio::time::timeout(RELEASE_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err("fdkeeper did not answer in time".to_owned()));
            let _ = events.send(Event::Released { gone, result });
        });
    }

    fn on_ready(&mut self, idx: usize, ready: pb::Ready) {
        let g = &mut self.generations[idx];
        g.inodes = ready.listener_inodes;
        if let Some(w) = g.worker.as_mut() {
            w.ready_at = Some(Instant::now());
        }
        let number = g.number;
        let pid = g.worker.as_ref().map_or(0, |w| w.pid);
        if let Some(t) = g.down_since.take() {
            tracing::info!(
                generation = number,
                pid,
                took_ms = t.elapsed().as_secs_f64() * 1e3,
                "respawned worker serving"
            );
        }
        if g.state != State::Starting || g.abandoned {
            return;
        }
        g.state = State::Serving;
        g.ready_deadline = None;
        tracing::info!(generation = number, pid, "generation serving");
        self.current = g.config.clone();
        // Every other serving generation is replaced by this one.
        let drain_timeout = self.current.global.drain_timeout;
        let replaced: Vec<u64> = self
            .generations
            .iter()
            .filter(|o| o.number != number && o.state == State::Serving)
            .map(|o| o.number)
            .collect();
        for n in replaced {
            if let Some(i) = self.generations.iter().position(|o| o.number == n) {
                self.drain(i, drain_timeout);
            }
        }
        // An older generation still starting (the first one, stuck) is superseded too.
        for o in &mut self.generations {
            if o.number < number && o.state == State::Starting && !o.abandoned {
                o.abandoned = true;
                o.respawn_at = None;
                if let Some(w) = &o.worker {
                    let _ = w.tx.send(ToWorker::Kill);
                }
            }
        }
        self.generations
            .retain(|o| !(o.abandoned && o.worker.is_none()));
        self.enforce_max_draining();
        match self.pending.take() {
            Some(p) if p.generation == number => {
                self.finish_reload(p.reply, p.begun, number, Ok(()));
            }
            other => {
                self.pending = other;
                if !self.notified_ready {
                    self.notified_ready = true;
                    notify::ready(&self.status_line());
                }
            }
        }
        self.notified_ready = true;
    }

    fn drain(&mut self, idx: usize, timeout: Duration) {
        let g = &mut self.generations[idx];
        g.state = State::Draining;
        g.draining_since = Some(SystemTime::now());
        g.respawn_at = None;
        g.ready_deadline = None;
        match &g.worker {
            Some(w) => {
                tracing::info!(generation = g.number, pid = w.pid, "draining");
                let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                let _ = w.tx.send(ToWorker::Send(to_worker(
                    pb::master_to_worker::Kind::Drain(pb::Drain { timeout_ms }),
                )));
                g.kill_at = Some(Instant::now() + timeout + KILL_GRACE);
            }
            None => {
                // Waiting for a respawn: nothing to drain.
                self.generations.remove(idx);
            }
        }
    }

    /// Hard-stops the oldest draining generations beyond `max_draining`.
    fn enforce_max_draining(&mut self) {
        let max = self.current.global.max_draining;
        let mut draining: Vec<usize> = (0..self.generations.len())
            .filter(|&i| {
                let g = &self.generations[i];
                g.state == State::Draining && !g.stopped
            })
            .collect();
        draining.sort_by_key(|&i| self.generations[i].number);
        let excess = draining.len().saturating_sub(max);
        for &i in &draining[..excess] {
            let g = &mut self.generations[i];
            g.stopped = true;
            if let Some(w) = &g.worker {
                tracing::warn!(
                    generation = g.number,
                    pid = w.pid,
                    max_draining = max,
                    "too many draining generations, stopping the oldest"
                );
                let _ =
                    w.tx.send(ToWorker::Send(to_worker(pb::master_to_worker::Kind::Stop(
                        pb::Stop {},
                    ))));
                g.kill_at = Some(Instant::now() + KILL_GRACE);
            }
        }
    }

    fn on_exit(&mut self, idx: usize, status: String) {
        let g = &mut self.generations[idx];
        let worker = g.worker.take();
        let pid = worker.as_ref().map_or(0, |w| w.pid);
        let stable = worker
            .as_ref()
            .and_then(|w| w.ready_at)
            .is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        let failed = worker.and_then(|w| w.failed);
        let number = g.number;
        // A draining generation is never respawned, crashed or not: it was going away, its
        // listeners are accepted on by the generation that replaced it (which also holds the
        // config and, after an upgrade, the binary the operator asked for), and the
        // connections it was finishing died with the process; a respawn could not get them
        // back, only add a worker that accepts nothing. Same for an abandoned generation and
        // for everything while the master stops.
        if self.stopping || g.state == State::Draining || g.abandoned {
            let crashed = !self.stopping && g.state == State::Draining && !status_is_clean(&status);
            if crashed {
                tracing::warn!(generation = number, pid, status = %status, "draining worker died; not respawned (the serving generation has its listeners)");
            } else {
                tracing::info!(generation = number, pid, status = %status, "worker exited");
            }
            self.generations.remove(idx);
            return;
        }
        let pending_here = self
            .pending
            .as_ref()
            .is_some_and(|p| p.generation == number);
        if pending_here {
            let reason = match failed {
                Some(f) => format!("worker of generation {number} failed: {f}"),
                None => {
                    format!("worker of generation {number} exited before it was ready ({status})")
                }
            };
            self.generations.remove(idx);
            if let Some(p) = self.pending.take() {
                self.finish_reload(p.reply, p.begun, number, Err(ReloadError::Worker(reason)));
            }
            return;
        }
        // Not asked to exit: respawn at once, with backoff when it keeps crashing.
        let now = Instant::now();
        g.restarts += 1;
        if !stable {
            g.crashes.push_back(now);
        }
        while g
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            g.crashes.pop_front();
        }
        g.down_since.get_or_insert(now);
        let delay = respawn_delay(g.crashes.len());
        tracing::warn!(generation = number, pid, status = %status, reason = failed.as_deref().unwrap_or(""), restarts = g.restarts, respawn_in_ms = delay.as_millis() as u64, "worker died, respawning");
        if g.state == State::Starting {
            g.ready_deadline = Some(now + delay + g.config.global.worker_ready_timeout);
        }
        if delay.is_zero() {
            self.spawn_worker(idx);
        } else {
            g.respawn_at = Some(now + delay);
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.release_retry_at.is_some_and(|t| t <= now) {
            // Cleared here; `run` calls release_claims right after.
            self.release_retry_at = Some(now);
        }
        let mut i = 0;
        while i < self.generations.len() {
            let g = &mut self.generations[i];
            if g.kill_at.is_some_and(|t| t <= now) {
                g.kill_at = None;
                if let Some(w) = &g.worker {
                    tracing::warn!(
                        generation = g.number,
                        pid = w.pid,
                        "worker did not exit in time, killing it"
                    );
                    let _ = w.tx.send(ToWorker::Kill);
                }
            }
            if g.respawn_at.is_some_and(|t| t <= now) {
                g.respawn_at = None;
                self.spawn_worker(i);
            }
            let g = &mut self.generations[i];
            if g.state == State::Starting
                && !g.abandoned
                && g.ready_deadline.is_some_and(|t| t <= now)
            {
                g.ready_deadline = None;
                let number = g.number;
                let timeout = g.config.global.worker_ready_timeout;
                let pending_here = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.generation == number);
                if pending_here {
                    let g = &mut self.generations[i];
                    g.abandoned = true;
                    match &g.worker {
                        Some(w) => {
                            let _ = w.tx.send(ToWorker::Kill);
                        }
                        None => {
                            g.respawn_at = None;
                            g.kill_at = None;
                        }
                    }
                    let no_worker = g.worker.is_none();
                    if let Some(p) = self.pending.take() {
                        let reason = format!(
                            "worker of generation {number} was not ready within {}",
                            common::Duration(timeout)
                        );
                        self.finish_reload(
                            p.reply,
                            p.begun,
                            number,
                            Err(ReloadError::Worker(reason)),
                        );
                    }
                    if no_worker {
                        self.generations.remove(i);
                        continue;
                    }
                } else if let Some(w) = &self.generations[i].worker {
                    // The first generation: nothing else serves, keep trying.
                    tracing::error!(
                        generation = number,
                        pid = w.pid,
                        "worker not ready in time, restarting it"
                    );
                    let _ = w.tx.send(ToWorker::Kill);
                }
            }
            i += 1;
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
            if self.generations[i].worker.is_none() {
                self.generations.remove(i);
                continue;
            }
            if self.generations[i].state != State::Draining {
                self.drain(i, timeout);
            }
            i += 1;
        }
    }

    fn serving(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .filter(|g| g.state == State::Serving)
            .max_by_key(|g| g.number)
    }

    fn status_line(&self) -> String {
        let draining = self
            .generations
            .iter()
            .filter(|g| g.state == State::Draining)
            .count();
        let mut s = match self.serving() {
            Some(g) => format!(
                "generation {}, pid {}, {draining} draining",
                g.number,
                g.worker.as_ref().map_or(0, |w| w.pid)
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
        let generations = self
            .generations
            .iter()
            .map(|g| api::Generation {
                generation: g.number,
                state: match g.state {
                    State::Starting => api::GenerationState::Starting,
                    State::Serving => api::GenerationState::Serving,
                    State::Draining => api::GenerationState::Draining,
                } as i32,
                worker: g.worker.as_ref().map(|w| api::Worker {
                    pid: w.pid,
                    restarts: g.restarts,
                    started_unix_ms: unix_ms(w.started),
                    active_connections: w.stats.active_connections,
                    requests_total: w.stats.requests_total,
                    requests_in_flight: w.stats.requests_in_flight,
                }),
                binary: g.binary.display().to_string(),
                draining_since_unix_ms: g.draining_since.map_or(0, unix_ms),
                listener_inodes: g.inodes.clone(),
            })
            .collect();
        api::StatusReply {
            master_pid: std::process::id(),
            config_path: self.config_path.display().to_string(),
            generations,
            last_reload: self.last_reload.clone(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
        }
    }
}

/// Whether an exit status (as `ExitStatus` displays it) is a plain exit 0.
fn status_is_clean(status: &str) -> bool {
    status == "exit status: 0"
}

/// How long to wait before respawning after `recent` crashes within [`CRASH_WINDOW`]:
/// at once, until it looks like a crash loop; then 100 ms doubling up to [`MAX_BACKOFF`].
fn respawn_delay(recent: usize) -> Duration {
    if recent < CRASHES_BEFORE_BACKOFF {
        return Duration::ZERO;
    }
    let exp = u32::try_from(recent - CRASHES_BEFORE_BACKOFF)
        .unwrap_or(u32::MAX)
        .min(10);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What a worker process is exec'd as.
struct Exec<'a> {
    /// The file to exec (`/proc/self/fd/N` of its generation's open binary).
    program: &'a Path,
    /// argv[0]: the binary's path, for ps and logs.
    arg0: &'a Path,
    /// The master's instance id, for the worker's fdkeeper claims.
    instance: &'a str,
}

/// Forks and execs a worker with its control socket, and starts the task that relays
/// its messages and its exit to the master.
fn spawn_process(
    exec: &Exec<'_>,
    id: u64,
    g: &Generation,
    health: Vec<pb::ServerHealth>,
    admin: Vec<pb::ServerAdmin>,
    need_stickd: bool,
    events: mpsc::UnboundedSender<Event>,
) -> std::io::Result<Worker> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let mut cmd = tokio::process::Command::new(exec.program);
    cmd.arg0(exec.arg0)
        .env(MASTER_INSTANCE_ENV, exec.instance)
        .arg("worker")
        .arg("--control-fd")
        .arg(sys::CONTROL_FD.to_string())
        .stdin(Stdio::null())
        // Only the master talks to systemd.
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(false);
    sys::prepare_worker(&mut cmd, theirs.as_raw_fd());
    let mut child = cmd.spawn()?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    let channel = MasterEnd::new(SeqPacket::new(ours)?);
    let start = to_worker(pb::master_to_worker::Kind::Start(pb::Start {
        generation: g.number,
        config_path: g.config.source.path.display().to_string(),
        config_toml: g.config.source.text.clone(),
        health,
        admin,
        need_stickd,
    }));
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        if let Err(e) = channel.send(&start).await {
            tracing::error!(pid, error = %e, "cannot send the start message");
            let _ = child.start_kill();
        }
        let mut control_open = true;
        let mut commands_open = true;
        loop {
            tokio::select! {
                msg = channel.recv(), if control_open => match msg {
                    Ok(Some(msg)) => {
                        let _ = events.send(Event::Msg { id, msg });
                    }
                    Ok(None) => control_open = false,
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "bad control message from a worker");
                        control_open = false;
                    }
                },
                cmd = rx.recv(), if commands_open => match cmd {
                    Some(ToWorker::Send(m)) => {
                        if let Err(e) = channel.send(&m).await {
                            tracing::debug!(pid, error = %e, "cannot reach a worker");
                        }
                    }
                    Some(ToWorker::Kill) => {
                        let _ = child.start_kill();
                    }
                    None => commands_open = false,
                },
                status = child.wait() => {
                    let status = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    // What the worker said before dying (e.g. why it failed) comes first: the
                    // dead end's datagrams are still queued, then EOF.
                    while control_open {
                        match tokio::time::timeout(Duration::from_millis(100), channel.recv()).await {
                            Ok(Ok(Some(msg))) => {
                                let _ = events.send(Event::Msg { id, msg });
                            }
                            _ => control_open = false,
                        }
                    }
                    let _ = events.send(Event::Exited { id, status });
                    return;
                }
            }
        }
    });
    Ok(Worker {
        id,
        pid,
        tx,
        started: SystemTime::now(),
        stats: StatsSnapshot::default(),
        failed: None,
        servers: Vec::new(),
        stick: None,
        frontends: Vec::new(),
        backends: Vec::new(),
        ready_at: None,
    })
}

/// Relays SIGUSR2 and SIGHUP (reload; SIGHUP is what systemd's `Type=notify-reload` sends by
/// default) and SIGTERM/SIGINT (graceful stop) to the master.
pub fn forward_signals(handle: Handle, shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: reload");
                    handle.reload_detached();
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reload");
                    handle.reload_detached();
                }
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); shutdown.cancel(); }
            }
        }
    });
    Ok(())
}

/// Operators' overrides by (backend, server): (admin state, weight).
type AdminStates = std::collections::BTreeMap<(String, String), (AdminState, u32)>;

/// The server state file: one `backend server state weight` line per override.
fn render_server_state(admin: &AdminStates) -> String {
    let mut out = String::from("# proxyd server state (SetServer): backend server state weight\n");
    for ((backend, server), (state, weight)) in admin {
        out.push_str(&format!("{backend} {server} {state} {weight}\n"));
    }
    out
}

/// Parses a server state file; returns the overrides and the lines that made no sense.
fn parse_server_state(text: &str) -> (AdminStates, Vec<String>) {
    let mut admin = AdminStates::new();
    let mut bad = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let state = f.get(2).and_then(|s| s.parse::<AdminState>().ok());
        match (f.len(), state, f.get(3).and_then(|w| w.parse::<u32>().ok())) {
            (4, Some(state), Some(weight)) if weight <= 256 => {
                admin.insert((f[0].to_owned(), f[1].to_owned()), (state, weight));
            }
            _ => bad.push(line.to_owned()),
        }
    }
    (admin, bad)
}

/// The overrides kept in the config's `server_state_file` for servers the config still has;
/// nothing when there is no file yet. A bad file is reported, never fatal: the servers then
/// start as configured.
fn load_server_state(config: &Config) -> AdminStates {
    let Some(path) = &config.global.server_state_file else {
        return AdminStates::new();
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return AdminStates::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the server state file");
            return AdminStates::new();
        }
    };
    let (mut admin, bad) = parse_server_state(&text);
    for line in bad {
        tracing::warn!(file = %path.display(), line = %line, "server state line ignored");
    }
    admin.retain(|(backend, server), _| {
        let known = config
            .backend(backend)
            .is_some_and(|b| b.servers.iter().any(|s| s.name == *server));
        if !known {
            tracing::info!(backend = %backend, server = %server, "server state for a server the config no longer has, dropped");
        }
        known
    });
    if !admin.is_empty() {
        tracing::info!(file = %path.display(), servers = admin.len(), "server states restored");
    }
    admin
}

/// Writes the file whole, through a temporary file and a rename: a crash leaves the old or
/// the new file, never half of one.
fn save_server_state(path: &std::path::Path, admin: &AdminStates) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, render_server_state(admin))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_state_file(file: &std::path::Path) -> Config {
        let text = format!(
            r#"
[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"
server_state_file = "{}"

[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"

[[backend]]
name = "app"
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"
[[backend.server]]
name = "app2"
address = "127.0.0.1:9002"
"#,
            file.display()
        );
        Config::from_source(common::SourceFile::from_text("p.toml", text)).expect("valid")
    }

    #[tokio::test]
    async fn set_server_survives_a_restart_of_the_master() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server-state");
        let exe = PathBuf::from("/nonexistent");
        let (mut m, _h) = Master::new(config_with_state_file(&file), exe.clone());
        assert!(m.admin.is_empty(), "no file yet: nothing to restore");
        let set = |state: &str, weight: Option<u32>| api::SetServerRequest {
            backend: "app".into(),
            server: "app1".into(),
            state: state.into(),
            weight,
        };
        m.set_server(set("drain", None)).expect("set");
        m.set_server(set("", Some(7))).expect("set");
        assert!(m.set_server(set("bogus", None)).is_err());
        drop(m);
        // A new master (a restart) with the same config starts from the saved states.
        let (m, _h) = Master::new(config_with_state_file(&file), exe.clone());
        assert_eq!(
            m.admin.get(&("app".to_owned(), "app1".to_owned())),
            Some(&(AdminState::Drain, 7))
        );
        assert_eq!(m.admin.len(), 1);
        // Lines for servers the config no longer has, and garbage, are dropped.
        std::fs::write(
            &file,
            "app app2 maint 3\ngone app9 maint 1\napp app1 sleepy 1\napp app1 ready\n",
        )
        .expect("write");
        let (m, _h) = Master::new(config_with_state_file(&file), exe);
        assert_eq!(
            m.admin.into_iter().collect::<Vec<_>>(),
            vec![(
                ("app".to_owned(), "app2".to_owned()),
                (AdminState::Maint, 3)
            )]
        );
    }

    fn generation(config: &Arc<Config>, number: u64, state: State, abandoned: bool) -> Generation {
        Generation {
            number,
            config: config.clone(),
            state,
            binary: PathBuf::from("/nonexistent"),
            binary_file: None,
            worker: None,
            restarts: 0,
            crashes: VecDeque::new(),
            respawn_at: None,
            down_since: None,
            ready_deadline: None,
            kill_at: None,
            draining_since: None,
            stopped: false,
            abandoned,
            inodes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn claims_of_generations_that_no_longer_accept_are_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with_state_file(&dir.path().join("state"));
        let shared = Arc::new(config_with_state_file(&dir.path().join("state")));
        let (mut m, _h) = Master::new(config, PathBuf::from("/nonexistent"));
        m.generations = vec![
            generation(&shared, 1, State::Draining, false),
            generation(&shared, 2, State::Serving, false),
            generation(&shared, 3, State::Starting, true),
            generation(&shared, 4, State::Starting, false),
        ];
        m.unreleased = (1..=4).collect();
        m.next_generation = 5;
        assert!(
            m.claims_to_release().is_none(),
            "nothing before a generation of this master served: its claims may not exist yet"
        );
        m.notified_ready = true;
        let (gone, claims) = m.claims_to_release().expect("a release");
        assert_eq!(gone, [1, 3], "draining and abandoned generations let go");
        assert_eq!(claims.keep, [2, 4], "serving and starting ones keep theirs");
        assert_eq!(claims.below, 5, "later generations are never named");
        assert_eq!(claims.instance, m.instance);
        assert_eq!(claims.owner, format!("proxyd {}", m.config_path.display()));
        // Once done, only a change sends another; the first one also released earlier masters.
        m.unreleased.retain(|n| !gone.contains(n));
        m.released_others = true;
        assert!(m.claims_to_release().is_none());
        m.generations[1].state = State::Draining;
        assert_eq!(m.claims_to_release().map(|(g, _)| g), Some(vec![2]));
        m.releasing = true;
        assert!(m.claims_to_release().is_none(), "one release at a time");
        m.releasing = false;
        m.stopping = true;
        assert!(
            m.claims_to_release().is_none(),
            "a stopping master keeps every listener for the next one"
        );
    }

    #[test]
    fn respawn_is_immediate_until_a_crash_loop_then_backs_off_to_5s() {
        assert_eq!(respawn_delay(1), Duration::ZERO);
        assert_eq!(respawn_delay(2), Duration::ZERO);
        assert_eq!(respawn_delay(3), Duration::from_millis(100));
        assert_eq!(respawn_delay(4), Duration::from_millis(200));
        assert_eq!(respawn_delay(7), Duration::from_millis(1600));
        assert_eq!(respawn_delay(9), MAX_BACKOFF);
        assert_eq!(respawn_delay(1000), MAX_BACKOFF);
    }
}
