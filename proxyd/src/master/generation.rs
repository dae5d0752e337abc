//! A generation: one config and binary, its phase (starting, serving, draining, abandoned)
//! with the data each phase needs, its worker process, and the master's transitions between
//! phases (ready, drain, exit, timers).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::daemon::notify;
use common::time::unix_ms;
use proto::proxyd::v1 as api;
use tokio::time::Instant;

use super::spawn::{Binary, Worker};
use super::{Master, ReloadError};
use crate::config::Config;
use crate::control::{pb, to_worker};

/// Grace after a drain deadline (or a Stop) before a worker is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Crash-loop detection: this many crashes within the window means backing off.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
const CRASHES_BEFORE_BACKOFF: usize = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A worker that served at least this long before dying is not part of a crash loop: it is
/// respawned at once however often that happens (kill -9 under load must not slow recovery).
const STABLE_AFTER: Duration = Duration::from_millis(100);

/// Where a generation is in its life.
#[derive(Debug)]
pub(super) enum Phase {
    /// Waiting for its worker's `Ready` until `ready_deadline` (none while a first
    /// generation's worker that missed it is being restarted).
    Starting { ready_deadline: Option<Instant> },
    /// Accepting: the newest serving generation is the one Status and ShowServers show.
    Serving,
    /// Finishing its connections since `since`; its worker is killed at `kill_at`.
    Draining {
        since: SystemTime,
        kill_at: Option<Instant>,
        /// Sent Stop (over max_draining): no longer counted as draining.
        stopped: bool,
    },
    /// Given up on while starting (not ready in time, or superseded): its worker is killed,
    /// and the generation removed once the worker is gone.
    Abandoned,
}

/// The generation's worker process.
#[derive(Debug)]
pub(super) enum Process {
    Running(Worker),
    /// The spawn of worker `id` failed; its `Exited` event is on its way and counts as a crash.
    SpawnFailed {
        id: u64,
    },
    /// Dead; respawned at `at` (crash-loop backoff).
    Respawn {
        at: Instant,
    },
}

/// Crash and restart bookkeeping of a generation.
#[derive(Debug, Default)]
pub(super) struct Crashes {
    pub restarts: u32,
    /// Crashes within [`CRASH_WINDOW`] of a worker that was not stable yet.
    recent: VecDeque<Instant>,
    /// When the worker was found dead, to log how long the respawn took.
    pub down_since: Option<Instant>,
}

impl Crashes {
    /// Records a death at `now`; returns how long to wait before the respawn.
    fn record(&mut self, now: Instant, stable: bool) -> Duration {
        self.restarts += 1;
        if !stable {
            self.recent.push_back(now);
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.recent.pop_front();
        }
        self.down_since.get_or_insert(now);
        respawn_delay(self.recent.len())
    }
}

#[derive(Debug)]
pub(super) struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub phase: Phase,
    pub process: Process,
    pub binary: Binary,
    pub crashes: Crashes,
    pub inodes: Vec<u64>,
}

impl Generation {
    pub fn worker(&self) -> Option<&Worker> {
        match &self.process {
            Process::Running(w) => Some(w),
            _ => None,
        }
    }

    pub fn worker_mut(&mut self) -> Option<&mut Worker> {
        match &mut self.process {
            Process::Running(w) => Some(w),
            _ => None,
        }
    }

    pub fn has_worker_id(&self, id: u64) -> bool {
        match &self.process {
            Process::Running(w) => w.id == id,
            Process::SpawnFailed { id: failed } => *failed == id,
            Process::Respawn { .. } => false,
        }
    }

    /// Whether it accepts now or is about to: its listeners must stay open.
    pub fn accepts(&self) -> bool {
        matches!(self.phase, Phase::Starting { .. } | Phase::Serving)
    }

    /// The earliest moment something is due for this generation.
    pub fn next_timer(&self) -> Option<Instant> {
        let respawn = match self.process {
            Process::Respawn { at } => Some(at),
            _ => None,
        };
        let phase = match self.phase {
            Phase::Starting { ready_deadline } => ready_deadline,
            Phase::Draining { kill_at, .. } => kill_at.filter(|_| self.worker().is_some()),
            Phase::Serving | Phase::Abandoned => None,
        };
        respawn.into_iter().chain(phase).min()
    }

    pub fn status(&self) -> api::Generation {
        api::Generation {
            generation: self.number,
            state: match self.phase {
                // An abandoned generation never got to serve.
                Phase::Starting { .. } | Phase::Abandoned => api::GenerationState::Starting,
                Phase::Serving => api::GenerationState::Serving,
                Phase::Draining { .. } => api::GenerationState::Draining,
            } as i32,
            worker: self.worker().map(|w| api::Worker {
                pid: w.pid,
                restarts: self.crashes.restarts,
                started_unix_ms: unix_ms(w.started),
                active_connections: w.stats.active_connections,
                thread_connections: w.stats.thread_connections.clone(),
                requests_total: w.stats.requests_total,
                requests_in_flight: w.stats.requests_in_flight,
                tunnels_active: w.stats.tunnels_active,
                access_log_dropped: w.stats.access_log_dropped,
            }),
            binary: self.binary.path.display().to_string(),
            draining_since_unix_ms: match self.phase {
                Phase::Draining { since, .. } => unix_ms(since),
                _ => 0,
            },
            listener_inodes: self.inodes.clone(),
        }
    }
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

/// Whether an exit status (as `ExitStatus` displays it) is a plain exit 0.
fn status_is_clean(status: &str) -> bool {
    status == "exit status: 0"
}

impl Master {
    pub(super) fn on_ready(&mut self, idx: usize, ready: pb::Ready) {
        let g = &mut self.generations[idx];
        g.inodes = ready.listener_inodes;
        let pid = g.worker_mut().map(|w| {
            w.ready_at = Some(Instant::now());
            w.pid
        });
        let number = g.number;
        if let Some(t) = g.crashes.down_since.take() {
            tracing::info!(
                generation = number,
                pid,
                took_ms = t.elapsed().as_secs_f64() * 1e3,
                "respawned worker serving"
            );
        }
        if !matches!(g.phase, Phase::Starting { .. }) {
            return;
        }
        g.phase = Phase::Serving;
        tracing::info!(generation = number, pid, "generation serving");
        if !Arc::ptr_eq(&self.current, &g.config) {
            self.current = g.config.clone();
            self.certs.follow(&self.current);
        }
        // Every other serving generation is replaced by this one.
        let drain_timeout = self.current.global.drain_timeout;
        let replaced: Vec<u64> = self
            .generations
            .iter()
            .filter(|o| o.number != number && matches!(o.phase, Phase::Serving))
            .map(|o| o.number)
            .collect();
        for n in replaced {
            if let Some(i) = self.generations.iter().position(|o| o.number == n) {
                self.drain(i, drain_timeout);
            }
        }
        // An older generation still starting (the first one, stuck) is superseded too.
        for o in &mut self.generations {
            if o.number < number && matches!(o.phase, Phase::Starting { .. }) {
                o.phase = Phase::Abandoned;
                if let Some(w) = o.worker() {
                    w.kill();
                }
            }
        }
        self.generations
            .retain(|o| !(matches!(o.phase, Phase::Abandoned) && o.worker().is_none()));
        self.enforce_max_draining();
        match self.pending.take() {
            Some(p) if p.generation == number => {
                self.finish_reload(p.reply, p.begun, number, Ok(()), p.restart_only);
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

    pub(super) fn drain(&mut self, idx: usize, timeout: Duration) {
        let g = &mut self.generations[idx];
        let Some(w) = g.worker() else {
            // Waiting for a respawn: nothing to drain.
            self.generations.remove(idx);
            return;
        };
        tracing::info!(generation = g.number, pid = w.pid, "draining");
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        w.send(to_worker(pb::master_to_worker::Kind::Drain(pb::Drain {
            timeout_ms,
        })));
        g.phase = Phase::Draining {
            since: SystemTime::now(),
            kill_at: Some(Instant::now() + timeout + KILL_GRACE),
            stopped: false,
        };
    }

    /// Hard-stops the oldest draining generations beyond `max_draining`.
    fn enforce_max_draining(&mut self) {
        let max = self.current.global.max_draining;
        let mut draining: Vec<usize> = (0..self.generations.len())
            .filter(|&i| {
                matches!(
                    self.generations[i].phase,
                    Phase::Draining { stopped: false, .. }
                )
            })
            .collect();
        draining.sort_by_key(|&i| self.generations[i].number);
        let excess = draining.len().saturating_sub(max);
        for &i in &draining[..excess] {
            let g = &mut self.generations[i];
            let Phase::Draining {
                kill_at, stopped, ..
            } = &mut g.phase
            else {
                continue;
            };
            *stopped = true;
            if let Process::Running(w) = &g.process {
                tracing::warn!(
                    generation = g.number,
                    pid = w.pid,
                    max_draining = max,
                    "too many draining generations, stopping the oldest"
                );
                w.send(to_worker(pb::master_to_worker::Kind::Stop(pb::Stop {})));
                *kill_at = Some(Instant::now() + KILL_GRACE);
            }
        }
    }

    pub(super) fn on_exit(&mut self, idx: usize, status: String) {
        let g = &mut self.generations[idx];
        let (pid, stable, failed) = match &mut g.process {
            Process::Running(w) => (
                Some(w.pid),
                w.ready_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER),
                w.failed.take(),
            ),
            Process::SpawnFailed { .. } | Process::Respawn { .. } => (None, false, None),
        };
        let number = g.number;
        // A draining generation is never respawned, crashed or not: it was going away, its
        // listeners are accepted on by the generation that replaced it (which also holds the
        // config and, after an upgrade, the binary the operator asked for), and the
        // connections it was finishing died with the process; a respawn could not get them
        // back, only add a worker that accepts nothing. Same for an abandoned generation and
        // for everything while the master stops.
        let draining = matches!(g.phase, Phase::Draining { .. });
        if self.stopping || draining || matches!(g.phase, Phase::Abandoned) {
            let crashed = !self.stopping && draining && !status_is_clean(&status);
            if crashed {
                tracing::warn!(generation = number, pid, status = %status, "draining worker died; not respawned (the serving generation has its listeners)");
            } else {
                tracing::info!(generation = number, pid, status = %status, "worker exited");
            }
            self.generations.remove(idx);
            return;
        }
        if self.is_pending(number) {
            let reason = match failed {
                Some(f) => format!("worker of generation {number} failed: {f}"),
                None => {
                    format!("worker of generation {number} exited before it was ready ({status})")
                }
            };
            self.generations.remove(idx);
            if let Some(p) = self.pending.take() {
                self.finish_reload(
                    p.reply,
                    p.begun,
                    number,
                    Err(ReloadError::Worker(reason)),
                    Vec::new(),
                );
            }
            return;
        }
        // Not asked to exit: respawn at once, with backoff when it keeps crashing.
        let g = &mut self.generations[idx];
        let now = Instant::now();
        let delay = g.crashes.record(now, stable);
        tracing::warn!(generation = number, pid, status = %status, reason = failed.as_deref().unwrap_or(""), restarts = g.crashes.restarts, respawn_in_ms = delay.as_millis() as u64, "worker died, respawning");
        if let Phase::Starting { ready_deadline } = &mut g.phase {
            *ready_deadline = Some(now + delay + g.config.global.worker_ready_timeout);
        }
        if delay.is_zero() {
            self.spawn_worker(idx);
        } else {
            g.process = Process::Respawn { at: now + delay };
        }
    }

    pub(super) fn on_timer(&mut self) {
        let now = Instant::now();
        if self.release_retry_at.is_some_and(|t| t <= now) {
            // Cleared here; `run` calls release_claims right after.
            self.release_retry_at = Some(now);
        }
        let mut i = 0;
        while i < self.generations.len() {
            let g = &mut self.generations[i];
            if let Phase::Draining { kill_at, .. } = &mut g.phase
                && kill_at.is_some_and(|t| t <= now)
            {
                *kill_at = None;
                if let Process::Running(w) = &g.process {
                    tracing::warn!(
                        generation = g.number,
                        pid = w.pid,
                        "worker did not exit in time, killing it"
                    );
                    w.kill();
                }
            }
            if let Process::Respawn { at } = g.process
                && at <= now
            {
                self.spawn_worker(i);
            }
            let g = &mut self.generations[i];
            let Phase::Starting { ready_deadline } = &mut g.phase else {
                i += 1;
                continue;
            };
            if !ready_deadline.is_some_and(|t| t <= now) {
                i += 1;
                continue;
            }
            *ready_deadline = None;
            let number = g.number;
            let timeout = g.config.global.worker_ready_timeout;
            if self.is_pending(number) {
                let g = &mut self.generations[i];
                g.phase = Phase::Abandoned;
                let running = g.worker().inspect(|w| w.kill()).is_some();
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
                        Vec::new(),
                    );
                }
                if !running {
                    self.generations.remove(i);
                    continue;
                }
            } else if let Some(w) = self.generations[i].worker() {
                // The first generation: nothing else serves, keep trying.
                tracing::error!(
                    generation = number,
                    pid = w.pid,
                    "worker not ready in time, restarting it"
                );
                w.kill();
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
