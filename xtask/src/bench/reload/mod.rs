//! Bench section `reload`: reload storms under load against proxyd, HAProxy master-worker (with
//! and without `option idle-close-on-response`) and nginx; and the targets this section and
//! `kill` start, reload and inspect.

mod masters;
mod report;
mod storm;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::tools::Tools;
use super::{Ctx, Section};
use crate::cluster::{self, Node, NodeOptions, START_TIMEOUT};
use crate::harness::{self, Env, Proc};
use crate::load::LoadConfig;
use masters::{
    check_haproxy, haproxy_config, nginx_config, proc_title, show_proc, show_proc_retry,
};
use report::section;
use storm::{Storm, TARGETS, storm};

/// What is being reloaded or killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// fdkeeper + proxyd (master and worker), reload by SIGUSR2 to the master.
    Proxyd,
    /// HAProxy `-W` (master-worker), `expose-fd listeners`, `nbthread 1`, reload by SIGUSR2.
    Haproxy {
        /// `option idle-close-on-response`: an old worker answers the next request on an idle
        /// keep-alive connection with `Connection: close` instead of closing it.
        idle_close: bool,
        /// `master-worker no-exit-on-failure`: the master should outlive a crashed worker.
        no_exit: bool,
    },
    /// nginx, `master_process on`, one worker, reload by SIGHUP.
    Nginx,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Proxyd => "proxyd",
            Kind::Haproxy {
                idle_close: false,
                no_exit: false,
            } => "HAProxy",
            Kind::Haproxy {
                idle_close: true,
                no_exit: false,
            } => "HAProxy idle-close-on-response",
            Kind::Haproxy {
                idle_close: false,
                no_exit: true,
            } => "HAProxy no-exit-on-failure",
            Kind::Haproxy {
                idle_close: true,
                no_exit: true,
            } => "HAProxy idle-close, no-exit",
            Kind::Nginx => "nginx",
        }
    }
}

/// Demo backends that every target of a section proxies to (started once per section).
pub(super) struct Backends {
    /// Keeps their temp dir and processes alive.
    _env: Env,
    _procs: Vec<Proc>,
    pub servers: Vec<(String, SocketAddr)>,
}

impl Backends {
    /// Two demo backends on 127.0.0.2 that hold each response 1 ms, so that requests are in
    /// flight when a reload or a kill hits.
    pub(super) async fn start(name: &str) -> Result<Self> {
        let mut env = Env::new(name)?;
        let names = vec!["app1".to_owned(), "app2".to_owned()];
        let started =
            cluster::start_backends(&mut env, &names, 2, Duration::from_millis(1), None).await?;
        let servers = started.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let procs = started.into_iter().map(|(_, _, p)| p).collect();
        Ok(Self {
            _env: env,
            _procs: procs,
            servers,
        })
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.servers.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// The load both sections run: keep-alive clients, connection-close clients, and keep-alive
/// clients that pause so that their connections sit idle when a drain or a kill comes.
pub(super) fn load_config(frontend: SocketAddr, expect_servers: Vec<String>) -> LoadConfig {
    LoadConfig {
        keepalive_clients: 50,
        close_clients: 25,
        think_clients: 25,
        think_time: Duration::from_millis(100),
        max_duration: Duration::from_secs(60),
        max_requests: 50_000_000,
        request_timeout: Duration::from_secs(5),
        path: "/".to_owned(),
        expect_servers,
        ..LoadConfig::new(frontend)
    }
}

/// One running target, in its own temp dir; dropping it kills every process of it.
pub(super) struct Target {
    pub kind: Kind,
    pub frontend: SocketAddr,
    imp: Imp,
    /// The temp dir (configs, sockets, logs), removed with the target.
    env: Env,
}

enum Imp {
    Proxyd(Box<Node>),
    Haproxy { proc: Proc, master_cli: PathBuf },
    Nginx { proc: Proc },
}

/// The state before a reload, to tell when the reload has taken effect.
pub(super) struct Mark {
    /// Child processes of the master before the signal.
    children: HashSet<u32>,
    /// proxyd: serving generation; HAProxy: the master's reload count; nginx: unused.
    counter: u64,
}

impl Target {
    /// Starts the target in a fresh temp dir and waits until its frontend answers 200.
    pub(super) async fn start(kind: Kind, backends: &Backends, tools: &Tools) -> Result<Self> {
        let mut env = Env::new(&format!("bench-{}", kind.label().replace(' ', "-")))?;
        let servers = &backends.servers;
        let (frontend, imp) = match kind {
            Kind::Proxyd => {
                let node = Node::start(
                    &mut env,
                    NodeOptions {
                        host: 1,
                        servers: Some(servers.clone()),
                        ..NodeOptions::default()
                    },
                )
                .await?;
                (node.frontend, Imp::Proxyd(Box::new(node)))
            }
            Kind::Haproxy {
                idle_close,
                no_exit,
            } => {
                let frontend = env.free_port(1)?;
                let master_cli = env.path("haproxy-master.sock");
                let stats = env.path("haproxy-stats.sock");
                let cfg = env.write(
                    "haproxy.cfg",
                    &haproxy_config(&stats, frontend, servers, idle_close, no_exit).render(),
                )?;
                check_haproxy(&tools.haproxy, kind, &cfg)?;
                let haproxy = &tools.haproxy;
                let mut args: Vec<std::ffi::OsString> = vec!["-W".into(), "-db".into()];
                args.push("-S".into());
                args.push(master_cli.clone().into());
                args.push("-f".into());
                args.push(cfg.into());
                let proc = env.spawn("haproxy", haproxy, args)?;
                (frontend, Imp::Haproxy { proc, master_cli })
            }
            Kind::Nginx => {
                let frontend = env.free_port(1)?;
                let dir = env.dir().to_owned();
                let cfg = env.write(
                    "nginx.conf",
                    &nginx_config(&dir, frontend, servers).render(),
                )?;
                let nginx = &tools.nginx;
                let proc = env.spawn(
                    "nginx",
                    nginx,
                    [
                        "-p".as_ref(),
                        dir.as_os_str(),
                        "-c".as_ref(),
                        cfg.as_os_str(),
                        "-e".as_ref(),
                        "stderr".as_ref(),
                    ],
                )?;
                (frontend, Imp::Nginx { proc })
            }
        };
        let mut target = Self {
            kind,
            frontend,
            imp,
            env,
        };
        target
            .wait_serving(START_TIMEOUT)
            .await
            .with_context(|| format!("{} did not start", kind.label()))?;
        Ok(target)
    }

    async fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let frontend = self.frontend;
        let deadline = Instant::now() + timeout;
        loop {
            match cluster::probe(frontend, Duration::from_secs(2)).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(self.log_hint()));
                }
                Err(_) => {}
            }
            if !self.master_alive() {
                bail!("the master exited: {}", self.log_hint());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The end of every log of the target, for an error (its temp dir goes with it).
    fn log_hint(&self) -> String {
        format!("its logs end with:\n{}", self.env.log_tails(15))
    }

    fn master(&self) -> &Proc {
        match &self.imp {
            Imp::Proxyd(node) => &node.proxyd,
            Imp::Haproxy { proc, .. } | Imp::Nginx { proc } => proc,
        }
    }

    fn master_mut(&mut self) -> &mut Proc {
        match &mut self.imp {
            Imp::Proxyd(node) => &mut node.proxyd,
            Imp::Haproxy { proc, .. } | Imp::Nginx { proc } => proc,
        }
    }

    /// Everything the master process wrote to its log so far.
    pub(super) fn master_log(&self) -> String {
        self.master().log_text()
    }

    /// Whether the master process still runs (reaps it if it has exited).
    pub(super) fn master_alive(&mut self) -> bool {
        self.master_mut().is_running()
    }

    /// The master's living child processes: its workers, serving and old.
    pub(super) fn workers(&self) -> Vec<u32> {
        let pid = self.master().pid();
        if pid == 0 {
            return Vec::new();
        }
        harness::descendants(pid)
            .into_iter()
            .filter(|&p| harness::pid_alive(p))
            .collect()
    }

    /// The worker that serves new connections now, if any.
    pub(super) async fn current_worker(&self) -> Result<Option<u32>> {
        match &self.imp {
            Imp::Proxyd(node) => Ok(cluster::serving(&node.status().await?).map(|s| s.pid)),
            Imp::Haproxy { master_cli, .. } => {
                Ok(show_proc_retry(master_cli).await?.current_worker)
            }
            Imp::Nginx { .. } => Ok(self
                .workers()
                .into_iter()
                .find(|&p| proc_title(p) == "nginx: worker process")),
        }
    }

    /// Sends the target's reload signal; the returned mark tells [`Target::wait_reloaded`]
    /// what the old state was.
    pub(super) async fn reload(&self) -> Result<Mark> {
        let counter = match &self.imp {
            Imp::Proxyd(node) => {
                cluster::serving(&node.status().await?)
                    .context("proxyd has no serving generation")?
                    .generation
            }
            Imp::Haproxy { master_cli, .. } => show_proc_retry(master_cli).await?.reloads,
            Imp::Nginx { .. } => 0,
        };
        let mark = Mark {
            children: self.workers().into_iter().collect(),
            counter,
        };
        let sig = match self.kind {
            Kind::Proxyd | Kind::Haproxy { .. } => Signal::SIGUSR2,
            Kind::Nginx => Signal::SIGHUP,
        };
        self.master().signal(sig)?;
        Ok(mark)
    }

    /// Waits until the reload after `mark` has really happened: proxyd's Status shows a newer
    /// serving generation; HAProxy's `show proc` counts one more reload and a new current
    /// worker; nginx has a worker process that was not there before the signal.
    pub(super) async fn wait_reloaded(&self, mark: &Mark, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        match &self.imp {
            Imp::Proxyd(node) => {
                cluster::wait_new_generation(&node.proxyd_admin, mark.counter, timeout).await?;
                Ok(())
            }
            Imp::Haproxy { master_cli, .. } => loop {
                // The master re-executes itself on SIGUSR2: its CLI is briefly unavailable.
                if let Ok(p) = show_proc(master_cli).await
                    && p.reloads > mark.counter
                    && p.current_worker
                        .is_some_and(|w| !mark.children.contains(&w))
                {
                    if p.failed > 0 {
                        bail!("HAProxy's master counts {} failed reloads", p.failed);
                    }
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!("no new HAProxy worker within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
            Imp::Nginx { .. } => loop {
                let fresh = self.workers().into_iter().any(|p| {
                    !mark.children.contains(&p) && proc_title(p) == "nginx: worker process"
                });
                if fresh {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!("no new nginx worker within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
        }
    }

    /// proxyd only: the master's counts of successful and failed reloads.
    async fn proxyd_reload_counts(&self) -> Result<Option<(u64, u64)>> {
        match &self.imp {
            Imp::Proxyd(node) => {
                let st = node.status().await?;
                Ok(Some((st.reloads_ok, st.reloads_failed)))
            }
            _ => Ok(None),
        }
    }
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let reloads = ctx.pick(10, 50);
    let rounds = ctx.rounds(2);
    let backends = Backends::start("bench-reload-backends").await?;
    let mut runs: Vec<Storm> = Vec::new();
    for round in 0..rounds {
        // Alternate, and start each round with another target, so that no target always
        // follows the same neighbour.
        for k in 0..TARGETS.len() {
            let kind = TARGETS[(k + round) % TARGETS.len()];
            eprintln!(
                "   round {}: {} reloads of {}",
                round + 1,
                reloads,
                kind.label()
            );
            let t = Instant::now();
            let s = storm(ctx, kind, &backends, reloads)
                .await
                .with_context(|| format!("reload storm on {}", kind.label()))?;
            eprintln!(
                "     {} failed ({}), {:.0} req/s, {:.1} reloads/s, {} verified; {:.1?} in all",
                s.report.failures.total(),
                s.report.failures,
                s.storm_rps,
                s.rate,
                s.verified,
                t.elapsed()
            );
            runs.push(s);
        }
    }
    Ok(section(&runs, reloads, rounds))
}
