//! Starting a generation and its worker processes: the binary each worker execs, the
//! `Start` message, and the task that relays a worker's messages and its exit to the master.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proto::proxyd::v1 as api;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::generation::{Crashes, Generation, Phase, Process};
use super::{Event, Master};
use crate::config::Config;
use crate::control::{self, MASTER_INSTANCE_ENV, MasterEnd, pb, to_worker};
use crate::model::StatsSnapshot;
use crate::sys;
use common::seqpacket::SeqPacket;

#[derive(Debug)]
enum ToWorker {
    Send(pb::MasterToWorker),
    Kill,
}

/// A running worker process, as its relay task reports it.
#[derive(Debug)]
pub(super) struct Worker {
    pub id: u64,
    pub pid: u32,
    tx: mpsc::UnboundedSender<ToWorker>,
    pub started: SystemTime,
    pub stats: StatsSnapshot,
    /// The reason from a `Failed` message, reported when the process exits.
    pub failed: Option<String>,
    /// Servers and stick cache as last reported.
    pub servers: Vec<api::ServerState>,
    pub stick: Option<pb::StickStats>,
    pub frontends: Vec<pb::FrontendStats>,
    pub backends: Vec<pb::BackendStats>,
    pub ready_at: Option<Instant>,
    /// The last certificate rotation the worker answered for.
    pub certificates: watch::Sender<u64>,
}

impl Worker {
    /// Sends a control message (lost if the worker is gone: its exit is on its way).
    pub fn send(&self, msg: pb::MasterToWorker) {
        let _ = self.tx.send(ToWorker::Send(msg));
    }

    pub fn kill(&self) {
        let _ = self.tx.send(ToWorker::Kill);
    }
}

/// The binary a generation's workers exec.
#[derive(Debug)]
pub(super) struct Binary {
    /// The path it was opened from, for Status.
    pub path: PathBuf,
    /// That binary, opened at the generation's first spawn and kept open: every worker of the
    /// generation (respawns too) execs this very file, not whatever the path holds by then.
    file: Option<std::fs::File>,
}

impl Binary {
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// The file to exec now.
    ///
    /// The first worker of a generation opens the file at the path (after an upgrade, the
    /// new binary: that is what a reload is for); a respawn runs that same open file. An
    /// operator who replaced the binary but has not reloaded yet (or whose reload failed)
    /// expects the crashed serving generation back as it was, not an untried binary under a
    /// config it was never started with.
    fn program(&mut self) -> std::io::Result<PathBuf> {
        let opened = match &self.file {
            Some(f) => f,
            None => &*self.file.insert(std::fs::File::open(&self.path)?),
        };
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        if by_fd.exists() {
            Ok(by_fd)
        } else {
            // No /proc (an odd container): the path is all there is.
            tracing::warn!(binary = %self.path.display(), "no /proc/self/fd: the worker runs whatever file is at the path now");
            Ok(self.path.clone())
        }
    }
}

/// What every spawn of this master shares.
struct Launch<'a> {
    /// The master's instance id, for the worker's fdkeeper claims.
    instance: &'a str,
    events: &'a mpsc::UnboundedSender<Event>,
}

impl Launch<'_> {
    /// Spawns worker `id` of generation `number`; a spawn failure comes back as the exit of
    /// that worker, which counts as a crash.
    fn spawn(
        &self,
        binary: &mut Binary,
        number: u64,
        id: u64,
        start: Vec<pb::MasterToWorker>,
    ) -> Process {
        let spawned = binary.program().and_then(|program| {
            let exec = Exec {
                program: &program,
                arg0: &binary.path,
                instance: self.instance,
            };
            spawn_process(&exec, id, start, self.events.clone())
        });
        match spawned {
            Ok(worker) => {
                tracing::info!(generation = number, pid = worker.pid, binary = %binary.path.display(), "worker spawned");
                Process::Running(worker)
            }
            Err(e) => {
                tracing::error!(generation = number, error = %e, binary = %binary.path.display(), "cannot spawn a worker");
                let _ = self.events.send(Event::Exited {
                    id,
                    status: format!("spawn failed: {e}"),
                });
                Process::SpawnFailed { id }
            }
        }
    }
}

impl Master {
    /// Adds a generation and spawns its worker; returns its number.
    pub(super) fn start_generation(&mut self, config: Arc<Config>) -> u64 {
        let number = self.next_generation;
        self.next_generation += 1;
        let ready_deadline = Some(Instant::now() + config.global.worker_ready_timeout);
        let start = self.start_messages(number, &config, true);
        let id = self.next_worker_id();
        // Each generation opens the binary at the path as it is now.
        let mut binary = Binary::new(self.exe.clone());
        let process = self.launch().spawn(&mut binary, number, id, start);
        self.generations.push(Generation {
            number,
            config,
            phase: Phase::Starting { ready_deadline },
            process,
            binary,
            crashes: Crashes::default(),
            inodes: Vec::new(),
        });
        self.unreleased.insert(number);
        number
    }

    /// Respawns the worker of `generations[idx]`.
    pub(super) fn spawn_worker(&mut self, idx: usize) {
        let g = &self.generations[idx];
        let start = self.start_messages(g.number, &g.config, g.crashes.restarts == 0);
        let id = self.next_worker_id();
        let launch = Launch {
            instance: &self.instance,
            events: &self.ev_tx,
        };
        let g = &mut self.generations[idx];
        g.process = launch.spawn(&mut g.binary, g.number, id, start);
    }

    fn launch(&self) -> Launch<'_> {
        Launch {
            instance: &self.instance,
            events: &self.ev_tx,
        }
    }

    fn next_worker_id(&mut self) -> u64 {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        id
    }

    /// What a worker of generation `number` is sent first: the `Start` message (the config, the
    /// servers' last known health, operators' overrides and the session-ticket keys), then the
    /// certificates of every TLS setting as the master serves them.
    fn start_messages(
        &self,
        number: u64,
        config: &Config,
        first_worker: bool,
    ) -> Vec<pb::MasterToWorker> {
        let health = self
            .health
            .iter()
            .map(|((backend, server), up)| pb::ServerHealth {
                backend: backend.clone(),
                server: server.clone(),
                up: *up,
            })
            .collect();
        let admin = self
            .admin
            .iter()
            .map(|((backend, server), (state, weight))| pb::ServerAdmin {
                backend: backend.clone(),
                server: server.clone(),
                state: state.to_wire(),
                weight: *weight,
            })
            .collect();
        // A reload's first worker must not serve from an empty stick cache while another
        // generation serves with a full one; a respawn or the very first generation may.
        let need_stickd = first_worker
            && self
                .generations
                .iter()
                .any(|o| o.number != number && matches!(o.phase, Phase::Serving));
        let certificates = self.certificate_messages(config);
        let start = to_worker(pb::master_to_worker::Kind::Start(pb::Start {
            generation: number,
            config_path: config.source.path.display().to_string(),
            config_toml: config.source.text.clone(),
            health,
            admin,
            need_stickd,
            ticket_keys: Some(self.tickets.to_wire()),
            certificates_follow: certificates.is_some(),
        }));
        std::iter::once(start)
            .chain(certificates.into_iter().flatten())
            .collect()
    }

    /// The certificate sets `config`'s TLS settings are to serve, in parts; none when a
    /// certificate's files are too large for a control message, in which case the worker reads
    /// the files itself.
    fn certificate_messages(&self, config: &Config) -> Option<Vec<pb::MasterToWorker>> {
        // The serving config's sets follow rotations; any other config (a reload's, just
        // loaded from the files, or a draining generation's) serves what it loaded.
        let sets = if std::ptr::eq(config, &*self.current) {
            self.certs.served()
        } else {
            config.tls.iter().map(|t| t.certs.clone()).collect()
        };
        let mut out = Vec::new();
        for (i, certs) in sets.iter().enumerate() {
            let tls = u32::try_from(i).ok()?;
            match control::certificate_parts(tls, &config.tls[i].name, 0, certs) {
                Ok(parts) => out.extend(parts),
                Err(e) => {
                    tracing::warn!(error = %e, "the worker will read its certificates from the files");
                    return None;
                }
            }
        }
        Some(out)
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

/// Forks and execs worker `id` with its control socket, sends it `start`, and starts the task
/// that relays its messages and its exit to the master.
fn spawn_process(
    exec: &Exec<'_>,
    id: u64,
    start: Vec<pb::MasterToWorker>,
    events: mpsc::UnboundedSender<Event>,
) -> std::io::Result<Worker> {
    let (ours, theirs) = control::socket_pair()?;
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
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    tokio::spawn(async move {
        for msg in &start {
            if let Err(e) = channel.send(msg).await {
                tracing::error!(pid, error = %e, "cannot send the start message");
                let _ = child.start_kill();
                break;
            }
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
        certificates: watch::Sender::new(0),
    })
}
