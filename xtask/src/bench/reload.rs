//! Bench section `reload`: reload storms under load against proxyd, HAProxy master-worker (with
//! and without `option idle-close-on-response`) and nginx; and the targets this section and
//! `kill` start, reload and inspect.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stats::{median, ratio, spread, with_spread};
use super::tools::Tools;
use super::{Ctx, Section, Table};
use crate::cluster::{self, Node, NodeOptions, START_TIMEOUT};
use crate::configs::{self, haproxy, nginx};
use crate::harness::{self, Env, Proc};
use crate::load::{FailKind, Load, LoadConfig, LoadReport};

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

/// The HAProxy config: the same frontend and round-robin backend as proxyd's, one thread, the
/// stats socket with `expose-fd listeners` so that a new worker takes the listeners over.
fn haproxy_config(
    stats: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    idle_close: bool,
    no_exit: bool,
) -> configs::Haproxy {
    configs::Haproxy {
        comment: "",
        global: haproxy::Global {
            maxconn: None,
            stats_socket: Some(haproxy::StatsSocket {
                path: stats.to_owned(),
                expose_fd_listeners: true,
            }),
            no_exit_on_failure: no_exit,
        },
        peers: Vec::new(),
        defaults: haproxy::Defaults {
            options: if idle_close {
                vec!["idle-close-on-response"]
            } else {
                Vec::new()
            },
            retries: None,
            timeouts: vec![
                ("connect", "5s"),
                ("client", "30s"),
                ("server", "30s"),
                ("http-keep-alive", "30s"),
            ],
            maxconn: None,
        },
        frontend: haproxy::Frontend {
            name: "www",
            bind: frontend,
        },
        backend: haproxy::Backend {
            name: "app".into(),
            stick: None,
            options: Vec::new(),
            http_check: None,
            servers: haproxy::servers(servers, ""),
        },
    }
}

/// `haproxy -c`: fails naming the option when this HAProxy does not accept the config. Once
/// per variant and run: a check costs a whole HAProxy start-up (about 0.3 s here).
fn check_haproxy(haproxy: &Path, kind: Kind, cfg: &Path) -> Result<()> {
    static CHECKED: std::sync::Mutex<Vec<Kind>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.contains(&kind) {
        return Ok(());
    }
    let out = std::process::Command::new(haproxy)
        .args(["-c", "-q", "-f"])
        .arg(cfg)
        .output()
        .context("cannot run haproxy -c")?;
    if !out.status.success() {
        bail!(
            "haproxy -c rejects the {} config: {}",
            kind.label(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    checked.push(kind);
    Ok(())
}

/// The nginx config: one worker, the master in the foreground, upstream keep-alive, every file
/// inside `dir`.
fn nginx_config(
    dir: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Nginx {
    configs::Nginx {
        comment: "",
        prefix: dir.to_owned(),
        user: None,
        master_process: true,
        error_log: nginx::ErrorLog::Stderr("notice"),
        listen: frontend,
        keepalive_timeout: "30s",
        keepalive_requests: 1_000_000,
        timeouts: None,
        upstream: nginx::Upstream {
            name: "app".into(),
            hash_cookie: None,
            servers: servers.iter().map(|(_, a)| *a).collect(),
            server_params: "",
            keepalive: 64,
            keepalive_requests: None,
        },
    }
}

/// What HAProxy's master says about its processes.
#[derive(Debug, Default, PartialEq, Eq)]
struct ShowProc {
    reloads: u64,
    failed: u64,
    /// The worker of the latest reload (its own reload count is 0).
    current_worker: Option<u32>,
    workers: usize,
}

/// `show proc` on HAProxy's master CLI.
async fn show_proc(master_cli: &Path) -> Result<ShowProc> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(master_cli).await?;
        // The master CLI keeps a connection open after a command unless told to quit.
        s.write_all(b"show proc;quit\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .context("HAProxy's master CLI did not answer within 2s")?
        .with_context(|| format!("show proc on {}", master_cli.display()))?;
    parse_show_proc(&text).with_context(|| format!("unexpected show proc output: {text:?}"))
}

/// `show proc`, retried for up to 2 s: the master re-executes itself on a reload, and once more
/// (into wait mode) when the new worker is up, and its CLI is briefly gone each time.
async fn show_proc_retry(master_cli: &Path) -> Result<ShowProc> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match show_proc(master_cli).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Parses `show proc` (HAProxy 2.6): the master line "PID master RELOADS [failed: N] ...", then
/// "PID worker RELOADS ..." lines.
fn parse_show_proc(text: &str) -> Option<ShowProc> {
    let mut out = ShowProc::default();
    let mut saw_master = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "master", reloads, "[failed:", failed, ..] => {
                out.reloads = reloads.parse().ok()?;
                out.failed = failed.trim_end_matches(']').parse().ok()?;
                saw_master = true;
            }
            [pid, "worker", reloads, ..] => {
                out.workers += 1;
                if *reloads == "0" {
                    out.current_worker = pid.parse().ok();
                }
            }
            _ => {}
        }
    }
    saw_master.then_some(out)
}

/// A process's title (nginx renames its workers: "nginx: worker process is shutting down").
fn proc_title(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

// ---- the storm --------------------------------------------------------------------------------

/// Time between two reload signals (5/s).
const RELOAD_SLOT: Duration = Duration::from_millis(200);
/// A reload that is not visible within this is counted as not verified.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

const TARGETS: [Kind; 4] = [
    Kind::Proxyd,
    Kind::Haproxy {
        idle_close: false,
        no_exit: false,
    },
    Kind::Haproxy {
        idle_close: true,
        no_exit: false,
    },
    Kind::Nginx,
];

/// What one storm against one target measured.
struct Storm {
    kind: Kind,
    reloads: usize,
    verified: usize,
    /// Signal to reload seen, per verified reload.
    reload_ms: Vec<f64>,
    rate: f64,
    storm_rps: f64,
    report: LoadReport,
    /// Processes of the target (master + workers) at the end, and the most seen during the storm.
    end_procs: usize,
    max_procs: usize,
    /// First reason a reload was not verified.
    unverified: Option<String>,
    /// proxyd only: successful and failed reloads its master counted during the storm.
    master_counts: Option<(u64, u64)>,
}

async fn storm(ctx: &Ctx, kind: Kind, backends: &Backends, reloads: usize) -> Result<Storm> {
    let mut target = Target::start(kind, backends, &ctx.tools).await?;
    let load = Load::start(load_config(target.frontend, backends.names()));
    load.wait_ok(300, Duration::from_secs(20))
        .await
        .with_context(|| format!("the load never got going on {}", kind.label()))?;
    // Every client connected and going before the first reload.
    tokio::time::sleep(ctx.pick(Duration::from_millis(200), Duration::from_secs(1))).await;
    let counts_before = target.proxyd_reload_counts().await?;
    let ok_before = load.snapshot().ok;
    let started = Instant::now();
    let mut verified = 0;
    let mut reload_ms = Vec::new();
    let mut max_procs = 0;
    let mut unverified = None;
    for i in 0..reloads {
        tokio::time::sleep_until((started + RELOAD_SLOT * i as u32).into()).await;
        let t0 = Instant::now();
        let mark = target.reload().await?;
        match target.wait_reloaded(&mark, RELOAD_TIMEOUT).await {
            Ok(()) => {
                verified += 1;
                reload_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Err(e) => {
                unverified.get_or_insert_with(|| format!("reload {}: {e:#}", i + 1));
            }
        }
        max_procs = max_procs.max(1 + target.workers().len());
    }
    let storm_time = started.elapsed();
    let storm_rps = (load.snapshot().ok - ok_before) as f64 / storm_time.as_secs_f64();
    // The last generations drain under load too before anything is counted.
    tokio::time::sleep(ctx.pick(Duration::from_millis(300), Duration::from_secs(1))).await;
    let end_procs = usize::from(target.master_alive()) + target.workers().len();
    let master_counts = match (counts_before, target.proxyd_reload_counts().await?) {
        (Some((ok0, failed0)), Some((ok1, failed1))) => Some((ok1 - ok0, failed1 - failed0)),
        _ => None,
    };
    let report = load.finish().await;
    Ok(Storm {
        kind,
        reloads,
        verified,
        reload_ms,
        rate: reloads as f64 / storm_time.as_secs_f64(),
        storm_rps,
        report,
        end_procs,
        max_procs: max_procs.max(end_procs),
        unverified,
        master_counts,
    })
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

fn section(runs: &[Storm], reloads: usize, rounds: usize) -> Section {
    let mut s = Section::new("Reload storms under load");
    let cfg = load_config(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new());
    s.text.push(format!(
        "{reloads} reloads, one every {} ms, under load from our client ({} keep-alive, {} \
         connection-close and {} keep-alive clients that pause 0-{} ms between requests, so \
         that some connections sit idle when a drain begins), proxying to two demo backends that \
         hold every response 1 ms. proxyd: SIGUSR2 to the master (fdkeeper lends the \
         listeners, drain_timeout 10s, max_draining 4). HAProxy: `-W` master-worker, \
         `nbthread 1`, `expose-fd listeners` on the stats socket, SIGUSR2 to the master, with \
         its defaults and with `option idle-close-on-response`. nginx: one worker, SIGHUP \
         to the master. Every reload is checked before the next: proxyd's Status shows a new \
         serving generation, HAProxy's `show proc` a new worker and one more reload, nginx a \
         new worker pid. Targets alternate, {rounds} round(s); medians with (min..max) over \
         rounds.",
        RELOAD_SLOT.as_millis(),
        cfg.keepalive_clients,
        cfg.close_clients,
        cfg.think_clients,
        cfg.think_time.as_millis(),
    ));
    let per = |kind: Kind| runs.iter().filter(move |r| r.kind == kind);
    let haproxy_failed: Vec<f64> = per(TARGETS[1])
        .map(|r| r.report.failures.total() as f64)
        .collect();
    let haproxy_rps: Vec<f64> = per(TARGETS[1]).map(|r| r.storm_rps).collect();
    let mut t = Table::new(&[
        "target",
        "reloads verified",
        "reloads/s",
        "reload time ms (p50)",
        "requests",
        "failed requests",
        "failed per reload",
        "req/s during the storm",
        "req/s vs HAProxy",
        "processes at the end (max during)",
    ]);
    for kind in TARGETS {
        let rs: Vec<&Storm> = per(kind).collect();
        if rs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Storm) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<f64>>();
        let failed = col(&|r| r.report.failures.total() as f64);
        let rps = col(&|r| r.storm_rps);
        let reload_ms: Vec<f64> = rs.iter().flat_map(|r| r.reload_ms.clone()).collect();
        t.row(vec![
            kind.label().to_owned(),
            format!(
                "{} of {}",
                rs.iter().map(|r| r.verified).sum::<usize>(),
                rs.iter().map(|r| r.reloads).sum::<usize>()
            ),
            with_spread(&col(&|r| r.rate), 1),
            format!("{:.0}", median(&reload_ms)),
            with_spread(&col(&|r| r.report.requests() as f64), 0),
            with_spread(&failed, 0),
            with_spread(
                &col(&|r| r.report.failures.total() as f64 / r.reloads as f64),
                2,
            ),
            with_spread(&rps, 0),
            ratio(median(&rps), median(&haproxy_rps)),
            format!(
                "{} (max {})",
                compact(&col(&|r| r.end_procs as f64)),
                rs.iter().map(|r| r.max_procs).max().unwrap_or(0)
            ),
        ]);
    }
    s.tables.push(t);

    // Failures by kind, summed over the rounds.
    let kinds = [
        FailKind::Refused,
        FailKind::Reset,
        FailKind::Timeout,
        FailKind::BadStatus,
        FailKind::Truncated,
        FailKind::Other,
    ];
    let mut header = vec!["target (sum over rounds)"];
    header.extend(kinds.iter().map(|k| k.name()));
    header.push("server-closed keep-alive reconnects");
    let mut t = Table::new(&header);
    for kind in TARGETS {
        if per(kind).next().is_none() {
            continue;
        }
        let mut row = vec![kind.label().to_owned()];
        row.extend(kinds.iter().map(|k| {
            per(kind)
                .map(|r| r.report.failures.get(*k))
                .sum::<u64>()
                .to_string()
        }));
        row.push(
            per(kind)
                .map(|r| r.report.close_reconnects)
                .sum::<u64>()
                .to_string(),
        );
        t.row(row);
    }
    s.tables.push(t);

    // The target, met or missed, and why failures happened.
    let failed_of = |kind: Kind| -> u64 { per(kind).map(|r| r.report.failures.total()).sum() };
    let proxyd = failed_of(Kind::Proxyd);
    let haproxy = failed_of(TARGETS[1]);
    let nginx = failed_of(Kind::Nginx);
    let verdict = if proxyd == 0 && haproxy > 0 && nginx > 0 {
        "met"
    } else if proxyd == 0 {
        "met for proxyd (0 failed), but this run did not show the others failing"
    } else {
        "missed"
    };
    s.notes.push(format!(
        "Issue 6 target (0 failed requests for proxyd where HAProxy's default and nginx fail \
         some): **{verdict}**: over {} reloads each, proxyd failed {proxyd} requests, HAProxy \
         (default) {haproxy} (median per storm {:.0}), HAProxy with idle-close-on-response {}, \
         nginx {nginx}.",
        reloads * rounds,
        median(&haproxy_failed),
        failed_of(TARGETS[2]),
    ));
    let (ok, failed) = per(Kind::Proxyd)
        .filter_map(|r| r.master_counts)
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    s.notes.push(format!(
        "proxyd's master counted {ok} successful and {failed} failed reloads during its storms \
         (Status reloads_ok / reloads_failed)."
    ));
    for kind in TARGETS {
        let samples: Vec<&String> = per(kind).flat_map(|r| r.report.samples.iter()).collect();
        if let Some(first) = samples.first() {
            // The drain race: the old worker closes an idle keep-alive connection while the
            // client's next request is on its way. Said only when every sample shows it.
            let race = samples
                .iter()
                .all(|s| s.contains("reset (reused connection)"));
            s.notes.push(format!(
                "{}: first failure seen by the client: `{first}`{}{}",
                kind.label(),
                if race {
                    format!(
                        "; all {} failures sampled are resets of reused keep-alive connections \
                         before any response byte: the old worker closed an idle connection \
                         while the client's next request was on its way",
                        samples.len()
                    )
                } else {
                    String::new()
                },
                match kind {
                    Kind::Proxyd => format!(
                        " ({} failures in all; the client's samples: {})",
                        failed_of(kind),
                        samples
                            .iter()
                            .take(5)
                            .map(|s| format!("`{s}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => String::new(),
                }
            ));
        }
        for r in per(kind) {
            if let Some(why) = &r.unverified {
                s.notes.push(format!(
                    "{}: {} of {} reloads not verified; first: {why}",
                    kind.label(),
                    r.reloads - r.verified,
                    r.reloads
                ));
            }
        }
    }
    let slow: Vec<String> = TARGETS
        .iter()
        .filter_map(|&kind| {
            let rates: Vec<f64> = per(kind).map(|r| r.rate).collect();
            let ms: Vec<f64> = per(kind).flat_map(|r| r.reload_ms.clone()).collect();
            (!rates.is_empty() && median(&rates) < 4.5).then(|| {
                format!(
                    "{} ({:.1} reloads/s, a reload takes {:.0} ms)",
                    kind.label(),
                    median(&rates),
                    median(&ms)
                )
            })
        })
        .collect();
    if !slow.is_empty() {
        s.notes.push(format!(
            "Slower than one reload per {} ms: {}. The next signal waits until the previous \
             reload is seen to be done (a signal during a reload would be merged or lost), so \
             these storms last longer; failed requests per reload is the figure to compare.",
            RELOAD_SLOT.as_millis(),
            slow.join(", ")
        ));
    }
    s.notes.push(
        "Reload time: from the signal until the new worker is seen (polled every 2-5 ms). \
         Processes: the master and its workers when the storm is over (after a settle of up to \
         1 s under load); old workers that still hold connections count."
            .to_owned(),
    );
    s
}

/// The median alone when every value is the same, else "median (min..max)".
fn compact(values: &[f64]) -> String {
    let (lo, hi) = spread(values);
    if lo == hi {
        format!("{lo:.0}")
    } else {
        with_spread(values, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_of_haproxy_2_6() {
        // Columns as HAProxy 2.6.12 prints them, padding shortened.
        let text = "#<PID>   <type>   <reloads>   <uptime>   <version>      \n\
                    14803   master   3 [failed: 1]   0d00h00m05s   2.6.12-1+deb12u3\n\
                    # workers\n\
                    14998   worker   0   0d00h00m01s   2.6.12-1+deb12u3\n\
                    14950   worker   1   0d00h00m02s   2.6.12-1+deb12u3\n\
                    # programs\n\n";
        assert_eq!(
            parse_show_proc(text),
            Some(ShowProc {
                reloads: 3,
                failed: 1,
                current_worker: Some(14998),
                workers: 2,
            })
        );
        // A worker alone (no master line) is not a master's answer.
        assert_eq!(parse_show_proc("# workers\n1 worker 0 0d 2.6\n"), None);
    }

    #[test]
    fn configs_name_every_server_and_option() {
        let servers = vec![
            ("app1".to_owned(), SocketAddr::from(([127, 0, 0, 2], 8001))),
            ("app2".to_owned(), SocketAddr::from(([127, 0, 0, 2], 8002))),
        ];
        let fe = SocketAddr::from(([127, 0, 0, 1], 8000));
        let h = haproxy_config(Path::new("/x/stats.sock"), fe, &servers, true, true).render();
        assert!(h.contains("expose-fd listeners"), "{h}");
        assert!(h.contains("master-worker no-exit-on-failure"), "{h}");
        assert!(h.contains("option idle-close-on-response"), "{h}");
        assert!(h.contains("server app2 127.0.0.2:8002"), "{h}");
        let h = haproxy_config(Path::new("/x/stats.sock"), fe, &servers, false, false).render();
        assert!(
            !h.contains("idle-close") && !h.contains("master-worker"),
            "{h}"
        );
        let n = nginx_config(Path::new("/x"), fe, &servers).render();
        assert!(n.contains("listen 127.0.0.1:8000;"), "{n}");
        assert!(n.contains("server 127.0.0.2:8001;"), "{n}");
        assert!(
            n.contains("worker_processes 1;") && n.contains("daemon off;"),
            "{n}"
        );
    }
}
