//! Bench section `http`: wrk through proxyd, HAProxy and nginx (and straight to a backend), with
//! every target's access log on: keep-alive clients spread over 1000 sessions or all on one (hot
//! key), connection-close and new-session clients, 100 and 1000 connections, 1 MB answers, one
//! and two proxy threads, and the memory an idle keep-alive connection costs.
//!
//! The backends are two Debian nginx instances by default (`--backends demo`: xtask's own demo
//! backend). Targets run alternately, round after round (the order rotating each round), so
//! that a busy neighbour on the shared machine hits all of them alike.

mod idle;
mod report;
mod sessions;
pub(super) mod targets;
pub(super) mod wrk;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::resource::{UsageWho, getrusage};

use super::logs::{self, AccessLog};
use super::stats;
use super::{BackendKind, Ctx, Section, backends, tools};
use crate::configs::nginx::BIG_PATH;
use crate::harness::{Env, Proc};
use report::section;
use targets::{start_haproxy, start_nginx, start_proxyd};
use wrk::parse_wrk;

/// The seed's table name, in HAProxy and stickd alike.
const TABLE: &str = "dynamic_group";
/// Table size on both HAProxy and stickd: far above what the new-session runs store (so that
/// neither evicts), where the seed's `5k` would be full within a second.
const TABLE_SIZE: &str = "1m";
/// The seed's health checks (HAProxy's defaults inter 2s, fall 3; `rise 1` from the seed).
const CHECK_INTER: &str = "2s";
/// Client and keep-alive timeouts of every target, instead of the seed's 10 s: the idle
/// connections of the memory run must still be open when their memory is read.
const TIMEOUT_IDLE: &str = "60s";
/// Sessions each target stores before the runs: the spread runs send all of them.
const SESSIONS: usize = 1000;

/// What the clients send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Keep-alive, each request with one of `SESSIONS` cookies the target stored before.
    Spread,
    /// Keep-alive, every request of every client with the same cookie.
    Hot,
    /// The spread cookies, a new connection per request (`Connection: close`).
    Close,
    /// Keep-alive, no cookie: every answer sets a new session that the proxy stores.
    NewSession,
    /// The spread cookies, 1 MiB answers.
    Big,
}

impl Shape {
    fn title(self) -> &'static str {
        match self {
            Self::Spread => "keep-alive, 1000 cookies (spread)",
            Self::Hot => "keep-alive, one cookie (hot key)",
            Self::Close => "connection-close, 1000 cookies",
            Self::NewSession => "keep-alive, new session per request",
            Self::Big => "keep-alive, 1 MB answers, 1000 cookies",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Hot => "hot",
            Self::Close => "close",
            Self::NewSession => "new",
            Self::Big => "big",
        }
    }
}

/// One line of the plan: a shape at a proxy thread count and a client connection count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    shape: Shape,
    threads: u32,
    connections: u32,
}

impl Row {
    const fn new(shape: Shape, threads: u32, connections: u32) -> Self {
        Self {
            shape,
            threads,
            connections,
        }
    }

    fn title(self) -> String {
        let threads = if self.threads == 1 {
            "1 thread".to_owned()
        } else {
            format!("{} threads", self.threads)
        };
        format!(
            "{threads}, {} connections, {}",
            self.connections,
            self.shape.title()
        )
    }

    /// wrk's threads: one per proxy thread, so that one client thread is not the limit of a
    /// proxy with two.
    fn wrk_threads(self) -> u32 {
        self.threads
    }
}

/// Every row, in the order they run within a round (1-thread targets first, then 2-thread).
const ROWS: [Row; 10] = [
    Row::new(Shape::Spread, 1, 100),
    Row::new(Shape::Hot, 1, 100),
    Row::new(Shape::Close, 1, 100),
    Row::new(Shape::NewSession, 1, 100),
    Row::new(Shape::Spread, 1, 1000),
    Row::new(Shape::Big, 1, 100),
    Row::new(Shape::Spread, 2, 100),
    Row::new(Shape::Hot, 2, 100),
    Row::new(Shape::Close, 2, 100),
    Row::new(Shape::Spread, 2, 1000),
];

/// Who is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    Proxyd,
    ProxydNoStick,
    Haproxy,
    Nginx,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (app1)",
            Self::Proxyd => "proxyd",
            Self::ProxydNoStick => "proxyd no-stick",
            Self::Haproxy => "HAProxy",
            Self::Nginx => "nginx",
        }
    }

    /// The label under its bar in the plot, where five must fit side by side.
    fn short(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::ProxydNoStick => "no-stick",
            k => k.label(),
        }
    }

    /// Whether this target runs `row`. Direct is the limit of the machine, and no-stick shows
    /// what the stick rule costs: the first row shows both, and the time goes to the others.
    fn runs(self, row: Row) -> bool {
        match self {
            Self::Direct | Self::ProxydNoStick => row == ROWS[0],
            Self::Proxyd | Self::Haproxy | Self::Nginx => true,
        }
    }
}

/// A running target.
struct Target {
    kind: Kind,
    addr: SocketAddr,
    /// Root of the proxy's own process tree (`None` for direct).
    proxy_pid: Option<u32>,
    /// stickd, whose CPU is shown beside proxyd's.
    stickd_pid: Option<u32>,
    log: AccessLog,
    /// wrk scripts (in the temp dir), one per shape that sends cookies.
    scripts: Vec<(Shape, PathBuf)>,
    /// The first session it stored: the hot key, and the idle connections' cookie.
    cookie: String,
}

/// What one wrk run printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    /// connect + read + write + timeout.
    pub socket_errors: u64,
}

/// One (row, target) measurement.
#[derive(Clone, Debug)]
struct Sample {
    wrk: WrkResult,
    /// CPU of the proxy's processes per request, µs.
    cpu_us: Option<f64>,
    /// The same with stickd's CPU added (proxyd only).
    cpu_stickd_us: Option<f64>,
    /// CPU over the run's wall time (1.0: one core all the time) of the proxy, of wrk and of
    /// the backends.
    proxy_busy: Option<f64>,
    client_busy: f64,
    backends_busy: f64,
    /// Access log lines the run wrote (`None`: the target has no log).
    log_lines: Option<u64>,
}

/// What the run was given, for the report.
struct Plan {
    backends: BackendKind,
    secs: u64,
    rounds: usize,
    /// Idle connections opened against each 1-thread target.
    idle: usize,
    /// The open-file limit every process of the run had.
    nofile: u64,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    // Kept raised until the section ends: the idle connections' client ends are this process's.
    let nofile = tools::Nofile::raise();
    let plan = Plan {
        backends: ctx.opts.backends,
        secs: ctx.pick(2, 5),
        rounds: ctx.rounds(3),
        idle: nofile.idle_connections(ctx.pick(2_000, 10_000)),
        nofile: nofile.limit,
    };
    let mut env = Env::new("bench-http")?;
    let load_before = loadavg();
    let result = run_in(&mut env, ctx, &plan).await;
    drop(nofile);
    match result {
        Ok(mut s) => {
            if plan.backends == BackendKind::Demo {
                s.id = "http-demo".to_owned();
            }
            s.text.push(format!(
                "Machine load (1-minute load average, {} cores) at the start: {load_before}, at the \
                 end: {}; above the core count, other work shared the machine and the figures \
                 are noisier.",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                loadavg()
            ));
            Ok(s)
        }
        Err(e) => Err(e.context(format!("logs:\n{}", env.log_tails(15)))),
    }
}

async fn run_in(env: &mut Env, ctx: &Ctx, plan: &Plan) -> Result<Section> {
    // Everything that must live until the end (dropping a `Proc` kills it).
    let mut procs: Vec<Proc> = Vec::new();
    let backends = backends::start(env, ctx, plan.backends, plan.nofile, &mut procs).await?;
    let servers: Vec<(String, SocketAddr)> =
        backends.iter().map(|b| (b.name.clone(), b.addr)).collect();
    let backend_pids: Vec<u32> = backends.iter().map(|b| b.pid).collect();
    let sink = logs::Sink::start().await?;
    let maxconn = (plan.idle as u64 + 5_000).min(plan.nofile.saturating_sub(100) / 2);

    let mut samples: Vec<(Row, Kind, Sample)> = Vec::new();
    let mut idle = Vec::new();
    for threads in [1, 2] {
        let rows: Vec<Row> = ROWS
            .iter()
            .copied()
            .filter(|r| r.threads == threads)
            .collect();
        // Each thread count has its own targets, stopped before the next ones start.
        let mut set_procs: Vec<Proc> = Vec::new();
        let t = Instant::now();
        let setup = targets::Setup {
            servers: &servers,
            threads,
            maxconn,
            sink: sink.addr(),
        };
        let mut set = Vec::new();
        if threads == 1 {
            set.push(Target::direct(servers[0].1));
        }
        set.push(start_proxyd(env, &setup, true, &mut set_procs).await?);
        if threads == 1 {
            set.push(start_proxyd(env, &setup, false, &mut set_procs).await?);
        }
        set.push(start_haproxy(ctx, env, &setup, &mut set_procs).await?);
        set.push(start_nginx(ctx, env, &setup, &mut set_procs).await?);
        eprintln!("   {threads}-thread targets up in {:.1?}", t.elapsed());

        // Each target stores its own sessions first: cookie-less requests, the Set-Cookie
        // values kept, and checks that it routes by them.
        let t = Instant::now();
        for target in &mut set {
            let stored = sessions::collect(target.addr, SESSIONS)
                .await
                .with_context(|| format!("collecting sessions through {}", target.kind.label()))?;
            sessions::check_sticky(target.kind, target.addr, &stored)
                .await
                .with_context(|| {
                    format!("{} does not route by the session", target.kind.label())
                })?;
            let cookies: Vec<String> = stored.into_iter().map(|(c, _)| c).collect();
            target.cookie.clone_from(&cookies[0]);
            let tag = format!(
                "{}-t{threads}",
                target.kind.label().replace([' ', '(', ')'], "")
            );
            for shape in [Shape::Spread, Shape::Hot, Shape::Close, Shape::Big] {
                let (cookies, close, path) = match shape {
                    Shape::Hot => (&cookies[..1], false, "/index.php"),
                    Shape::Close => (&cookies[..], true, "/index.php"),
                    Shape::Big => (&cookies[..], false, BIG_PATH),
                    _ => (&cookies[..], false, "/index.php"),
                };
                let script = env.write(
                    &format!("wrk/{tag}-{}.lua", shape.id()),
                    &sessions::lua_script(cookies, close, path),
                )?;
                target.scripts.push((shape, script));
            }
        }
        eprintln!(
            "   {SESSIONS} sessions stored on each target in {:.1?}",
            t.elapsed()
        );

        if threads == 1 {
            let measured =
                |t: &&Target| matches!(t.kind, Kind::Proxyd | Kind::Haproxy | Kind::Nginx);
            for target in set.iter().filter(measured) {
                let i = idle::measure(target, plan.idle)
                    .await
                    .with_context(|| format!("idle connections to {}", target.kind.label()))?;
                eprintln!(
                    "   idle {:<16} {} connections in {:.1} s: {:.0} -> {:.0} MiB, {:.1} KiB each",
                    target.kind.label(),
                    i.opened,
                    i.seconds,
                    i.before as f64 / 1048576.0,
                    i.after as f64 / 1048576.0,
                    i.kib_per_conn()
                );
                target.log.take(&sink)?;
                idle.push(i);
            }
        }

        // A run starts once every process of this set and the backends are quiet, not only its
        // own target's: the target before it may still be closing its connections or writing
        // its log, and the rotation puts the same target after the same one in most rounds.
        let quiet: Vec<u32> = set
            .iter()
            .flat_map(|t| t.proxy_pid.into_iter().chain(t.stickd_pid))
            .chain(backend_pids.iter().copied())
            .collect();
        for round in 0..plan.rounds {
            for &row in &rows {
                let mut order: Vec<&Target> = set.iter().filter(|t| t.kind.runs(row)).collect();
                // Nobody always goes first (right after another target's burst) or last.
                let n = order.len();
                order.rotate_left(round % n);
                for target in order {
                    let t = Instant::now();
                    let s = measure(
                        ctx,
                        env,
                        target,
                        row,
                        plan.secs,
                        round,
                        &backend_pids,
                        &quiet,
                        &sink,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "{} through {} (round {})",
                            row.title(),
                            target.kind.label(),
                            round + 1
                        )
                    })?;
                    eprintln!(
                        "   round {} {:<58} {:<16} {:>8.0} req/s  p99 {:>6.2} ms  errors {}  cpu {}  client {:>3.0} %  log {}  ({:.1?})",
                        round + 1,
                        row.title(),
                        target.kind.label(),
                        s.wrk.rps,
                        s.wrk.p99_ms,
                        s.wrk.non_2xx + s.wrk.socket_errors,
                        s.cpu_us
                            .map_or("-".to_owned(), |c| format!("{c:.1} µs/req")),
                        s.client_busy * 100.0,
                        s.log_lines.map_or("-".to_owned(), |n| n.to_string()),
                        t.elapsed(),
                    );
                    samples.push((row, target.kind, s));
                }
            }
        }
        drop(set_procs);
    }
    drop(procs);
    Ok(section(&samples, &idle, plan))
}

impl Target {
    fn new(
        kind: Kind,
        addr: SocketAddr,
        proxy_pid: u32,
        stickd_pid: Option<u32>,
        log: AccessLog,
    ) -> Self {
        Self {
            proxy_pid: Some(proxy_pid),
            stickd_pid,
            log,
            kind,
            ..Self::direct(addr)
        }
    }

    fn direct(addr: SocketAddr) -> Self {
        Self {
            kind: Kind::Direct,
            addr,
            proxy_pid: None,
            stickd_pid: None,
            log: AccessLog::None,
            scripts: Vec::new(),
            cookie: String::new(),
        }
    }

    fn script(&self, shape: Shape) -> Option<&PathBuf> {
        self.scripts
            .iter()
            .find(|(s, _)| *s == shape)
            .map(|(_, p)| p)
    }
}

/// User + system CPU of this process's reaped children so far (wrk, once waited for).
fn children_cpu() -> Duration {
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(Duration::ZERO, |u| {
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec().max(0) as u64)
                + Duration::from_micros(t.tv_usec().max(0) as u64)
        };
        tv(u.user_time()) + tv(u.system_time())
    })
}

/// One wrk run of `row` against `target`, with the CPU its processes, wrk and the backends used
/// meanwhile and the access log lines it wrote.
#[allow(clippy::too_many_arguments)]
async fn measure(
    ctx: &Ctx,
    env: &Env,
    target: &Target,
    row: Row,
    secs: u64,
    round: usize,
    backend_pids: &[u32],
    quiet: &[u32],
    sink: &logs::Sink,
) -> Result<Sample> {
    let pids: Vec<u32> = target
        .proxy_pid
        .into_iter()
        .chain(target.stickd_pid)
        .collect();
    // Start from quiet processes: stickd may still be writing the last run's sessions, the
    // target before this one closing its connections.
    settle(quiet).await;
    target.log.take(sink)?;
    let cpu_sum = |pids: &[u32]| pids.iter().map(|&p| stats::cpu_time(p)).sum::<Duration>();
    let proxy_before = target.proxy_pid.map(stats::cpu_time);
    let stickd_before = target.stickd_pid.map(stats::cpu_time);
    let backends_before = cpu_sum(backend_pids);
    let client_before = children_cpu();
    let path = if row.shape == Shape::Big {
        BIG_PATH
    } else {
        "/index.php"
    };
    let url = format!("http://{}{path}", target.addr);
    let mut args: Vec<String> = vec![
        format!("-t{}", row.wrk_threads()),
        format!("-c{}", row.connections),
        format!("-d{secs}s"),
        "--latency".into(),
    ];
    if row.shape != Shape::NewSession {
        let script = target
            .script(row.shape)
            .with_context(|| format!("no wrk script for {}", row.shape.title()))?;
        args.extend(["-s".into(), script.display().to_string()]);
    }
    args.push(url);
    let name = format!(
        "wrk-{}-t{}-c{}-{}-r{}",
        row.shape.id(),
        row.threads,
        row.connections,
        target.kind.label().replace([' ', '(', ')'], ""),
        round + 1
    );
    let mut wrk = env.spawn(&name, &ctx.tools.wrk, &args)?;
    let status = wrk.wait_exit(Duration::from_secs(secs + 30)).await?;
    let text = wrk.log_text();
    ensure!(status.success(), "wrk failed ({status}): {}", text.trim());
    let result = parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))?;
    ensure!(result.requests > 0, "wrk completed no request:\n{text}");
    let client = children_cpu().saturating_sub(client_before);
    let proxy_run = target
        .proxy_pid
        .zip(proxy_before)
        .map(|(pid, before)| stats::cpu_time(pid).saturating_sub(before));
    let backends = cpu_sum(backend_pids).saturating_sub(backends_before);
    // Work the run caused but finished after it (batched stores to stickd, sled flushes).
    settle(&pids).await;
    let per_req = |d: Duration| d.as_secs_f64() * 1e6 / result.requests as f64;
    let proxy = target
        .proxy_pid
        .zip(proxy_before)
        .map(|(pid, before)| stats::cpu_time(pid).saturating_sub(before));
    let stickd = target
        .stickd_pid
        .zip(stickd_before)
        .map(|(pid, before)| stats::cpu_time(pid).saturating_sub(before));
    let seconds = result.seconds.max(1e-3);
    Ok(Sample {
        cpu_us: proxy.map(per_req),
        cpu_stickd_us: proxy.zip(stickd).map(|(p, s)| per_req(p + s)),
        proxy_busy: proxy_run.map(|d| d.as_secs_f64() / seconds),
        client_busy: client.as_secs_f64() / seconds,
        backends_busy: backends.as_secs_f64() / seconds,
        log_lines: target.log.take(sink)?,
        wrk: result,
    })
}

/// The 1-minute load average, from /proc/loadavg.
pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Waits (at most 3 s) until `pids` use at most one clock tick (10 ms) over 100 ms.
pub(super) async fn settle(pids: &[u32]) {
    const WINDOW: Duration = Duration::from_millis(100);
    if pids.is_empty() {
        return;
    }
    let total = || pids.iter().map(|&p| stats::cpu_time(p)).sum::<Duration>();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = total();
    loop {
        tokio::time::sleep(WINDOW).await;
        let now = total();
        if now.saturating_sub(last) <= WINDOW / 10 || Instant::now() >= deadline {
            return;
        }
        last = now;
    }
}
