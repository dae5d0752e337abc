//! Bench section `http`: wrk through proxyd, HAProxy and nginx (and straight to a backend) with
//! keep-alive sticky clients, connection-close clients and new-session traffic; requests/s,
//! p50/p99 and the CPU each proxy spends per request.
//!
//! Every target proxies to the same two demo backends, runs one proxy thread and logs no request.
//! Targets run alternately, round after round (the order rotating each round), so that a busy
//! neighbour on the shared machine hits all of them alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::stats::{self, median, ratio, spread, with_spread};
use super::{Ctx, Plot, PlotBar, Section, Table};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::{self, haproxy, nginx, proxyd};
use crate::harness::{self, Env, Proc, ProcSpec};

/// wrk's connections, as issue 6 asks.
const CONNECTIONS: u32 = 50;
/// The seed's table name, in HAProxy and stickd alike.
const TABLE: &str = "dynamic_group";
/// Table size on both HAProxy and stickd: far above what the new-session runs store (so that
/// neither evicts), where the seed's `5k` would be full within a second.
const TABLE_SIZE: &str = "1m";
/// The seed's health checks (HAProxy's defaults inter 2s, fall 3; `rise 1` from the seed).
const CHECK_INTER: &str = "2s";

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Keep-alive connections, each request with a `PHPSESSID` the target stored before.
    Sticky,
    /// The same cookies, a new connection per request (`Connection: close`).
    Close,
    /// Keep-alive, no cookie: every answer sets a new session that the proxy stores.
    NewSession,
}

impl Workload {
    const ALL: [Workload; 3] = [Self::Sticky, Self::Close, Self::NewSession];

    fn title(self) -> &'static str {
        match self {
            Self::Sticky => "keep-alive, sticky cookie",
            Self::Close => "connection-close, sticky cookie",
            Self::NewSession => "keep-alive, new session per request",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Self::Sticky => "sticky",
            Self::Close => "close",
            Self::NewSession => "new",
        }
    }
}

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

    /// The workloads this target runs. Direct is the limit of the keep-alive run only (the
    /// backend is the same in every run, and the budget is 5 minutes); no-stick exists to show
    /// what the stick rule costs, which the sticky run shows.
    fn workloads(self) -> &'static [Workload] {
        match self {
            Self::Direct | Self::ProxydNoStick => &[Workload::Sticky],
            Self::Proxyd | Self::Haproxy | Self::Nginx => &Workload::ALL,
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
    /// wrk scripts (in the temp dir) that send the sessions this target stored.
    sticky_script: PathBuf,
    close_script: PathBuf,
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

/// One (workload, target) measurement.
#[derive(Clone, Debug)]
struct Sample {
    wrk: WrkResult,
    /// CPU of the proxy's processes per request, µs.
    cpu_us: Option<f64>,
    /// The same with stickd's CPU added (proxyd only).
    cpu_stickd_us: Option<f64>,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let secs: u64 = ctx.pick(2, 8);
    let rounds = ctx.rounds(3);
    let sessions = ctx.pick(300, 1000);
    let mut env = Env::new("bench-http")?;
    let load_before = loadavg();
    match run_in(&mut env, secs, rounds, sessions, ctx).await {
        Ok(mut s) => {
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

async fn run_in(
    env: &mut Env,
    secs: u64,
    rounds: usize,
    sessions: usize,
    ctx: &Ctx,
) -> Result<Section> {
    // Everything that must live until the end (dropping a `Proc` kills it).
    let mut procs: Vec<Proc> = Vec::new();

    let names = vec!["app1".to_owned(), "app2".to_owned()];
    let backends = cluster::start_backends(env, &names, 2, Duration::ZERO, None).await?;
    let servers: Vec<(String, SocketAddr)> =
        backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
    procs.extend(backends.into_iter().map(|(_, _, p)| p));

    let t = Instant::now();
    let mut targets = vec![
        Target::new(Kind::Direct, servers[0].1, None, None),
        start_proxyd(env, &servers, true, &mut procs).await?,
        start_proxyd(env, &servers, false, &mut procs).await?,
        start_haproxy(ctx, env, &servers, &mut procs).await?,
        start_nginx(ctx, env, &servers, &mut procs).await?,
    ];
    eprintln!("   targets up in {:.1?}", t.elapsed());

    // Each target stores its own sessions first: cookie-less requests, the Set-Cookie values kept.
    let t = Instant::now();
    for target in &mut targets {
        let stored = collect_sessions(target.addr, sessions)
            .await
            .with_context(|| format!("collecting sessions through {}", target.kind.label()))?;
        check_sticky(target.kind, target.addr, &stored)
            .await
            .with_context(|| format!("{} does not route by the session", target.kind.label()))?;
        let cookies: Vec<String> = stored.into_iter().map(|(c, _)| c).collect();
        let tag = target.kind.label().replace([' ', '(', ')'], "");
        target.sticky_script = env.write(
            &format!("wrk/{tag}-sticky.lua"),
            &lua_script(&cookies, false),
        )?;
        target.close_script =
            env.write(&format!("wrk/{tag}-close.lua"), &lua_script(&cookies, true))?;
    }
    eprintln!(
        "   {sessions} sessions stored on each target in {:.1?}",
        t.elapsed()
    );

    let mut samples: Vec<(Workload, Kind, Sample)> = Vec::new();
    for round in 0..rounds {
        for workload in Workload::ALL {
            let mut order: Vec<&Target> = targets
                .iter()
                .filter(|t| t.kind.workloads().contains(&workload))
                .collect();
            // Nobody always goes first (right after another target's burst) or last.
            let n = order.len();
            order.rotate_left(round % n);
            for target in order {
                let t = Instant::now();
                let s = measure(ctx, env, target, workload, secs, round)
                    .await
                    .with_context(|| {
                        format!(
                            "{} through {} (round {})",
                            workload.title(),
                            target.kind.label(),
                            round + 1
                        )
                    })?;
                eprintln!(
                    "   round {} {:<36} {:<16} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}  cpu {}  ({:.1?})",
                    round + 1,
                    workload.title(),
                    target.kind.label(),
                    s.wrk.rps,
                    s.wrk.p50_ms,
                    s.wrk.p99_ms,
                    s.wrk.non_2xx + s.wrk.socket_errors,
                    s.cpu_us
                        .map_or("-".to_owned(), |c| format!("{c:.1} µs/req")),
                    t.elapsed(),
                );
                samples.push((workload, target.kind, s));
            }
        }
    }
    drop(procs);
    Ok(section(&samples, &targets, rounds, secs, sessions))
}

impl Target {
    fn new(kind: Kind, addr: SocketAddr, proxy_pid: Option<u32>, stickd_pid: Option<u32>) -> Self {
        Self {
            kind,
            addr,
            proxy_pid,
            stickd_pid,
            sticky_script: PathBuf::new(),
            close_script: PathBuf::new(),
        }
    }
}

/// One wrk run against `target`, with the CPU its processes used meanwhile.
async fn measure(
    ctx: &Ctx,
    env: &Env,
    target: &Target,
    workload: Workload,
    secs: u64,
    round: usize,
) -> Result<Sample> {
    let pids: Vec<u32> = target
        .proxy_pid
        .into_iter()
        .chain(target.stickd_pid)
        .collect();
    // Start from quiet processes: stickd may still be writing the last run's sessions.
    settle(&pids).await;
    let proxy_before = target.proxy_pid.map(stats::cpu_time);
    let stickd_before = target.stickd_pid.map(stats::cpu_time);
    let url = format!("http://{}/index.php", target.addr);
    let mut args: Vec<String> = vec![
        "-t1".into(),
        format!("-c{CONNECTIONS}"),
        format!("-d{secs}s"),
        "--latency".into(),
    ];
    match workload {
        Workload::Sticky => args.extend(["-s".into(), target.sticky_script.display().to_string()]),
        Workload::Close => args.extend(["-s".into(), target.close_script.display().to_string()]),
        Workload::NewSession => {}
    }
    args.push(url);
    let name = format!(
        "wrk-{}-{}-r{}",
        workload.id(),
        target.kind.label().replace([' ', '(', ')'], ""),
        round + 1
    );
    let mut wrk = env.spawn(&name, &ctx.tools.wrk, &args)?;
    let status = wrk.wait_exit(Duration::from_secs(secs + 30)).await?;
    let text = wrk.log_text();
    ensure!(status.success(), "wrk failed ({status}): {}", text.trim());
    let result = parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))?;
    ensure!(result.requests > 0, "wrk completed no request:\n{text}");
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
    Ok(Sample {
        cpu_us: proxy.map(per_req),
        cpu_stickd_us: proxy.zip(stickd).map(|(p, s)| per_req(p + s)),
        wrk: result,
    })
}

/// The 1-minute load average, from /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Waits (at most 3 s) until `pids` use at most one clock tick (10 ms) over 100 ms.
async fn settle(pids: &[u32]) {
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

/// `n` cookie-less requests (16 at a time) through `addr`: each session the answers set, with
/// the server that set it.
async fn collect_sessions(addr: SocketAddr, n: usize) -> Result<Vec<(String, String)>> {
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(16);
    for w in 0..16 {
        let count = per.min(n.saturating_sub(w * per));
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                let a = exchange(addr, None).await?;
                ensure!(a.status == 200, "a cookie-less request got {}", a.status);
                let cookie = a
                    .set_cookie
                    .context("an answer without Set-Cookie: PHPSESSID")?;
                out.push((cookie, a.server.context("an answer without X-Server")?));
            }
            anyhow::Ok(out)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// Sessions checked per target before the runs.
const STICKY_CHECKS: usize = 20;

/// Before measuring, makes sure the target really routes by the cookie: for the first sessions,
/// two requests each reach the same server, and with a stick table (proxyd, HAProxy) the server
/// that set the session. Without it a "sticky" run could be measuring plain round robin.
async fn check_sticky(kind: Kind, addr: SocketAddr, sessions: &[(String, String)]) -> Result<()> {
    let table = match kind {
        Kind::Proxyd | Kind::Haproxy => true,
        Kind::Nginx => false,
        // No rule to check: one server, or round robin on purpose.
        Kind::Direct | Kind::ProxydNoStick => return Ok(()),
    };
    for (cookie, origin) in sessions.iter().take(STICKY_CHECKS) {
        let a = exchange(addr, Some(cookie)).await?;
        let b = exchange(addr, Some(cookie)).await?;
        ensure!(
            a.status == 200 && b.status == 200,
            "session {cookie}: answers {} and {}",
            a.status,
            b.status
        );
        ensure!(
            a.server == b.server,
            "session {cookie} reached {:?}, then {:?}",
            a.server,
            b.server
        );
        ensure!(
            !table || a.server.as_deref() == Some(origin.as_str()),
            "session {cookie}, set by {origin}, reached {:?}",
            a.server
        );
    }
    Ok(())
}

/// What the bench reads from an answer.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The demo backend's `X-Server`.
    server: Option<String>,
    /// The `PHPSESSID` it set, if any.
    set_cookie: Option<String>,
}

/// One `GET /index.php` on a new connection (`Connection: close`), with the session if any.
async fn exchange(addr: SocketAddr, session: Option<&str>) -> Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cookie = session.map_or(String::new(), |c| format!("Cookie: PHPSESSID={c}\r\n"));
    let request =
        format!("GET /index.php HTTP/1.1\r\nHost: bench\r\n{cookie}Connection: close\r\n\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("no answer from {addr} within 10 s"))??;
    parse_answer(&buf)
}

/// Status, `X-Server` and `PHPSESSID` of an answer (header names in any case: HAProxy writes
/// them lower-case).
fn parse_answer(response: &[u8]) -> Result<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    ensure!(
        matches!(r.parse(response), Ok(httparse::Status::Complete(_))),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(response)
    );
    let value = |name: &str| {
        r.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .collect::<Vec<&str>>()
    };
    Ok(Answer {
        status: r.code.unwrap_or(0),
        server: value("x-server").first().map(|s| (*s).to_owned()),
        set_cookie: value("set-cookie")
            .iter()
            .find_map(|v| v.strip_prefix("PHPSESSID="))
            .and_then(|v| v.split(';').next())
            .map(str::to_owned),
    })
}

/// A wrk script that sends the `cookies` round robin, each request prepared once in `init`.
fn lua_script(cookies: &[String], close: bool) -> String {
    let list: Vec<String> = cookies.iter().map(|c| format!("  \"{c}\",")).collect();
    let close = if close {
        "\n    [\"Connection\"] = \"close\","
    } else {
        ""
    };
    format!(
        r#"-- wrk: every request carries a PHPSESSID the target stored before (written by cargo xtask bench).
local cookies = {{
{}
}}
local requests = {{}}
local i = 0

function init(args)
  for k, c in ipairs(cookies) do
    requests[k] = wrk.format("GET", "/index.php", {{
    ["Cookie"] = "PHPSESSID=" .. c,{close}
    }})
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end
"#,
        list.join("\n")
    )
}

// ---- targets ---------------------------------------------------------------------------------

/// stickd.toml: one table like the seed's, but `TABLE_SIZE` entries.
fn stickd_config(dir: &Path, socket: &Path, peer: SocketAddr) -> configs::Stickd {
    configs::Stickd {
        comment: "stickd for the http bench: a single node (its own peer entry only).",
        peers: vec![("node1".to_owned(), peer)],
        tables: vec![configs::stickd::Table::string(TABLE, 32, TABLE_SIZE, "5m")],
        ..configs::Stickd::new(dir.join("data"), socket.to_owned())
    }
}

/// proxyd.toml: the seed's backend (examples/proxyd-seed.toml), with or without its stick rule.
fn proxyd_config(
    admin: &Path,
    fdkeeper: &Path,
    stickd: Option<&Path>,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Proxyd {
    let mut global = proxyd::Global::new(admin, fdkeeper);
    global.stickd_socket = stickd.map(Path::to_owned);
    global.threads = Some(1);
    proxyd::Seed {
        global,
        frontend,
        table: TABLE,
        timeout_check: "2s",
        check_inter: CHECK_INTER.to_owned(),
        fall: 3,
        servers,
    }
    .proxyd("proxyd for the http bench: the seed's backend, one thread.")
}

/// fdkeeper, stickd (when `stick`) and proxyd; waits until proxyd serves.
async fn start_proxyd(
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    stick: bool,
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let tag = if stick { "proxyd" } else { "proxyd-nostick" };
    let dir = env.path(tag);
    let stickd = if stick {
        let socket = dir.join("stickd.sock");
        let peer = env.free_port(1)?;
        let config = env.write(
            &format!("{tag}/stickd.toml"),
            &stickd_config(&dir.join("stickd"), &socket, peer).render(),
        )?;
        let p = env.spawn(
            &format!("{tag}-stickd"),
            harness::release_bin("stickd"),
            [
                "--config".as_ref(),
                config.as_os_str(),
                "-L".as_ref(),
                "node1".as_ref(),
            ],
        )?;
        harness::wait_unix(&socket, START_TIMEOUT).await?;
        let pid = p.pid();
        procs.push(p);
        Some((socket, pid))
    } else {
        None
    };
    let fdkeeper = cluster::start_fdkeeper(env, tag, &format!("{tag}-fdkeeper")).await?;
    procs.push(fdkeeper.proc);
    let frontend = env.free_port(1)?;
    let admin = dir.join("proxyd-admin.sock");
    let config = env.write(
        &format!("{tag}/proxyd.toml"),
        &proxyd_config(
            &admin,
            &fdkeeper.socket,
            stickd.as_ref().map(|(s, _)| s.as_path()),
            frontend,
            servers,
        )
        .render(),
    )?;
    // No access log: HAProxy and nginx log nothing either here.
    let spec = ProcSpec::new(&format!("{tag}-proxyd"), &harness::release_bin("proxyd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,proxyd::access=off");
    let proxyd = env.spawn_spec(spec)?;
    let pid = proxyd.pid();
    procs.push(proxyd);
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await?;
    harness::wait_tcp(frontend, START_TIMEOUT).await?;
    let kind = if stick {
        Kind::Proxyd
    } else {
        Kind::ProxydNoStick
    };
    Ok(Target::new(
        kind,
        frontend,
        Some(pid),
        stickd.map(|(_, p)| p),
    ))
}

/// The hard limit on open files of this process (and so of what it starts), from /proc.
fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// HAProxy's global maxconn: the seed's 20000 unless the open-files limit is lower (HAProxy needs
/// two fds per connection and refuses to start if it cannot raise its limit to that).
fn haproxy_maxconn() -> u64 {
    nofile_limit()
        .map_or(20_000, |n| n.saturating_sub(100) / 2)
        .min(20_000)
}

/// haproxy.cfg: the seed's config (001), one thread, no peers, no logging, `TABLE_SIZE` entries.
fn haproxy_config(
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    maxconn: u64,
) -> configs::Haproxy {
    let mut defaults = haproxy::Defaults::seed("http-keep-alive", "2s");
    defaults.retries = Some(3);
    defaults.maxconn = Some(maxconn.min(18_000));
    configs::Haproxy {
        comment: "HAProxy for the http bench: the seed's backend, one thread, in the foreground (-db).",
        global: haproxy::Global {
            maxconn: Some(maxconn),
            ..haproxy::Global::default()
        },
        peers: Vec::new(),
        defaults,
        frontend: haproxy::Frontend {
            name: "http-in",
            bind: frontend,
        },
        backend: haproxy::Backend::seed(
            TABLE,
            haproxy::StickTable {
                size: TABLE_SIZE,
                peers: false,
            },
            haproxy::servers(
                servers,
                &format!("check inter {CHECK_INTER} rise 1 maxconn 3000"),
            ),
        ),
    }
}

async fn start_haproxy(
    ctx: &Ctx,
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let cfg = env.write(
        "haproxy/haproxy.cfg",
        &haproxy_config(frontend, servers, haproxy_maxconn()).render(),
    )?;
    check_config(&ctx.tools.haproxy, &["-c", "-q", "-f"], &cfg)?;
    let p = env.spawn(
        "haproxy",
        &ctx.tools.haproxy,
        ["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    Ok(Target::new(Kind::Haproxy, frontend, Some(pid), None))
}

/// nginx.conf: one worker, upstream keepalive 64, the cookie hashed (OSS nginx has no sticky
/// cookie), files under `prefix`, the seed's timeouts and no cap on requests per connection
/// (HAProxy and proxyd have none).
fn nginx_config(
    prefix: &Path,
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
    user: Option<&str>,
) -> configs::Nginx {
    configs::Nginx {
        comment: "nginx for the http bench: one worker in the foreground, upstream keep-alive.",
        prefix: prefix.to_owned(),
        user: user.map(str::to_owned),
        master_process: false,
        error_log: nginx::ErrorLog::File("warn"),
        listen: frontend,
        keepalive_timeout: "10s",
        keepalive_requests: 1_000_000_000,
        timeouts: Some(nginx::Timeouts {
            client_header: "2s",
            proxy_connect: "1s",
            proxy_read: "2s",
        }),
        upstream: nginx::Upstream {
            name: TABLE.to_owned(),
            hash_cookie: Some("PHPSESSID"),
            servers: servers.iter().map(|(_, a)| *a).collect(),
            server_params: "max_fails=3 fail_timeout=2s",
            keepalive: 64,
            keepalive_requests: Some(1_000_000_000),
        },
    }
}

async fn start_nginx(
    ctx: &Ctx,
    env: &mut Env,
    servers: &[(String, SocketAddr)],
    procs: &mut Vec<Proc>,
) -> Result<Target> {
    let frontend = env.free_port(1)?;
    let prefix = env.path("nginx");
    std::fs::create_dir_all(&prefix)?;
    // As root, nginx's worker would switch to `nobody`, who cannot enter the 0700 temp dir.
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
        })
        .flatten()
        .map(|u| u.name);
    let conf = env.write(
        "nginx/nginx.conf",
        &nginx_config(&prefix, frontend, servers, user.as_deref()).render(),
    )?;
    let prefix_arg = format!("{}/", prefix.display());
    check_config(
        &ctx.tools.nginx,
        &["-q", "-e", "stderr", "-p", &prefix_arg, "-t", "-c"],
        &conf,
    )?;
    let p = env.spawn(
        "nginx",
        &ctx.tools.nginx,
        [
            "-e".as_ref(),
            "stderr".as_ref(),
            "-p".as_ref(),
            prefix_arg.as_ref(),
            "-c".as_ref(),
            conf.as_os_str(),
        ],
    )?;
    let pid = p.pid();
    let p = wait_listening(p, frontend).await?;
    procs.push(p);
    Ok(Target::new(Kind::Nginx, frontend, Some(pid), None))
}

/// Waits until `addr` accepts, failing at once (with its log) if `proc` exits first.
async fn wait_listening(mut proc: Proc, addr: SocketAddr) -> Result<Proc> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(proc);
        }
        if !proc.is_running() {
            bail!(
                "{} exited before listening on {addr}: {}",
                proc.name(),
                proc.log_text().trim()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not accept on {addr} after {START_TIMEOUT:?}",
                proc.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `prog args.. config` (a config check) and fails with what it said.
fn check_config(prog: &Path, args: &[&str], config: &Path) -> Result<()> {
    let out = std::process::Command::new(prog)
        .args(args)
        .arg(config)
        .output()
        .with_context(|| format!("cannot run {}", prog.display()))?;
    if !out.status.success() {
        bail!(
            "{} rejects {}: {}{}",
            prog.display(),
            config.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---- wrk's output ----------------------------------------------------------------------------

/// Reads wrk's summary (with `--latency`): totals, requests/s, p50/p99, errors.
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut seen_total = false;
    let mut seen_rps = false;
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, value)) = line.split_once('%') {
                match pct.trim() {
                    "50" => r.p50_ms = parse_latency_ms(value.trim())?,
                    "99" => r.p99_ms = parse_latency_ms(value.trim())?,
                    _ => {}
                }
                continue;
            }
            in_distribution = false;
        }
        if let Some((count, rest)) = line.split_once(" requests in ") {
            r.requests = parse_count(count)?;
            let took = rest.split(',').next().unwrap_or_default();
            r.seconds = parse_latency_ms(took)? / 1000.0;
            seen_total = true;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v
                .trim()
                .parse()
                .with_context(|| format!("bad Requests/sec {v:?}"))?;
            seen_rps = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = parse_count(v)?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 3"
            for part in v.split(',') {
                let n = part
                    .split_whitespace()
                    .nth(1)
                    .context("bad Socket errors line")?;
                r.socket_errors += parse_count(n)?;
            }
        }
    }
    ensure!(
        seen_total && seen_rps,
        "no summary (\"N requests in\", \"Requests/sec:\")"
    );
    Ok(r)
}

/// "812.00us", "1.75ms", "1.02s", "2.00m" -> milliseconds.
fn parse_latency_ms(s: &str) -> Result<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("bad duration unit in {s:?}"),
    };
    Ok(v * scale)
}

/// "45532", "22.89k", "1.20M" -> a count.
fn parse_count(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, scale) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        Some('G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().with_context(|| format!("bad count {s:?}"))?;
    Ok((v * scale).round() as u64)
}

// ---- the report ------------------------------------------------------------------------------

/// Figures of one (workload, target) over the rounds.
struct Figures {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    cpu_stickd: Vec<f64>,
    non_2xx: u64,
    socket_errors: u64,
    requests: u64,
}

fn figures(samples: &[(Workload, Kind, Sample)], w: Workload, k: Kind) -> Option<Figures> {
    let s: Vec<&Sample> = samples
        .iter()
        .filter(|(sw, sk, _)| *sw == w && *sk == k)
        .map(|(_, _, s)| s)
        .collect();
    if s.is_empty() {
        return None;
    }
    Some(Figures {
        rps: s.iter().map(|s| s.wrk.rps).collect(),
        p50: s.iter().map(|s| s.wrk.p50_ms).collect(),
        p99: s.iter().map(|s| s.wrk.p99_ms).collect(),
        cpu: s.iter().filter_map(|s| s.cpu_us).collect(),
        cpu_stickd: s.iter().filter_map(|s| s.cpu_stickd_us).collect(),
        non_2xx: s.iter().map(|s| s.wrk.non_2xx).sum(),
        socket_errors: s.iter().map(|s| s.wrk.socket_errors).sum(),
        requests: s.iter().map(|s| s.wrk.requests).sum(),
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    (v.len() > 1).then(|| spread(v))
}

fn section(
    samples: &[(Workload, Kind, Sample)],
    targets: &[Target],
    rounds: usize,
    secs: u64,
    sessions: usize,
) -> Section {
    let mut s = Section::new("HTTP proxying: direct, proxyd, HAProxy, nginx");
    s.text.push(format!(
        "wrk 4.1 (`-t1 -c{CONNECTIONS} --latency`, {secs} s per run) against each target in turn, \
         {rounds} round(s), the target order rotating each round; figures are the median of the \
         rounds with (min..max). All targets proxy to the same two demo backends on loopback, run \
         one proxy thread (proxyd `threads = 1`, HAProxy `nbthread 1`, nginx `worker_processes 1`) \
         and log no request. Direct is wrk straight to one backend: the limit of the machine."
    ));
    s.text.push(format!(
        "proxyd: fdkeeper + stickd + proxyd with the seed's rule (`stick on req.cook(PHPSESSID)`, \
         `stick store-response res.cook(PHPSESSID)`); proxyd no-stick is the same backend without \
         the rule (and without stickd). HAProxy 2.6: the seed's backend (roundrobin, `stick-table \
         type string len 32 size {TABLE_SIZE} expire 5m`, the same stick rules, `option \
         http-keep-alive`, the seed's timeouts and checks, no peers). The table holds {TABLE_SIZE} \
         entries on both HAProxy and stickd instead of the seed's 5k, so that the new-session runs \
         never evict. nginx 1.22: `upstream` with `keepalive 64`; OSS nginx has no sticky cookie, \
         so it routes by `hash $cookie_PHPSESSID consistent`: sticky, but it stores nothing, and \
         new sessions all hash alike (to one backend)."
    ));
    let maxconn = haproxy_maxconn();
    if maxconn < 20_000 {
        s.text.push(format!(
            "HAProxy's global `maxconn` is {maxconn} instead of the seed's 20000: HAProxy needs two \
             open files per connection and refuses to start above this machine's limit of {} \
             (50 connections are used here).",
            nofile_limit().map_or("?".to_owned(), |n| n.to_string())
        ));
    }
    s.text.push(format!(
        "Workloads: **keep-alive, sticky cookie**: each request carries one of {sessions} \
         `PHPSESSID` cookies that the target itself stored first (cookie-less requests, Set-Cookie \
         kept); **connection-close**: the same with `Connection: close`, a new connection per \
         request; **new session**: keep-alive without a cookie, so every answer sets a session \
         that the proxy stores. Before the runs, {STICKY_CHECKS} sessions per target are checked: \
         two requests each reach the same server, for proxyd and HAProxy the one that set it. CPU µs/req: user+system time of the proxy's own process tree \
         (/proc, proxyd's master and worker) during the run, divided by the requests wrk \
         completed; for proxyd the last column adds stickd's, which holds the table that HAProxy \
         keeps in-process. Errors: wrk's non-2xx answers plus socket errors, all rounds."
    ));

    let haproxy = |w| figures(samples, w, Kind::Haproxy);
    for w in Workload::ALL {
        let mut t = Table::new(&[
            "target",
            "req/s",
            "vs HAProxy",
            "p50 ms",
            "p99 ms",
            "vs HAProxy",
            "errors",
            "CPU µs/req",
            "vs HAProxy",
            "CPU µs/req + stickd (vs HAProxy)",
        ]);
        let h = haproxy(w);
        let mut bars = Vec::new();
        for target in targets {
            let Some(f) = figures(samples, w, target.kind) else {
                continue;
            };
            let vs = |ours: &[f64], theirs: Option<&[f64]>| {
                theirs.map_or("n/a".to_owned(), |t| ratio(median(ours), median(t)))
            };
            let errors = f.non_2xx + f.socket_errors;
            let errors = if errors == 0 {
                "0".to_owned()
            } else {
                format!(
                    "{errors} of {} (non-2xx {}, socket {})",
                    f.requests, f.non_2xx, f.socket_errors
                )
            };
            let cpu = if f.cpu.is_empty() {
                "-".to_owned()
            } else {
                with_spread(&f.cpu, 1)
            };
            let cpu_vs = if f.cpu.is_empty() {
                "-".to_owned()
            } else {
                vs(&f.cpu, h.as_ref().map(|h| h.cpu.as_slice()))
            };
            let cpu_stickd = if f.cpu_stickd.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{} ({})",
                    with_spread(&f.cpu_stickd, 1),
                    vs(&f.cpu_stickd, h.as_ref().map(|h| h.cpu.as_slice()))
                )
            };
            t.row(vec![
                target.kind.label().to_owned(),
                with_spread(&f.rps, 0),
                vs(&f.rps, h.as_ref().map(|h| h.rps.as_slice())),
                with_spread(&f.p50, 2),
                with_spread(&f.p99, 2),
                vs(&f.p99, h.as_ref().map(|h| h.p99.as_slice())),
                errors,
                cpu,
                cpu_vs,
                cpu_stickd,
            ]);
            bars.push(PlotBar {
                target: target.kind.short().to_owned(),
                rps: median(&f.rps),
                p99_ms: median(&f.p99),
                rps_range: range(&f.rps),
                p99_range: range(&f.p99),
            });
        }
        s.tables.push(titled(t, w.title()));
        s.plots.push(Plot {
            workload: w.title().to_owned(),
            bars,
        });
    }
    s.notes.extend(verdicts(samples));
    s
}

/// Puts the workload's name into the first header cell, so that each table says what it is.
fn titled(mut t: Table, title: &str) -> Table {
    if let Some(first) = t.header.first_mut() {
        *first = format!("{title}: target");
    }
    t
}

/// Issue 6's targets (and issue 4's stick-rule cost), met or missed, from this run's medians.
fn verdicts(samples: &[(Workload, Kind, Sample)]) -> Vec<String> {
    let mut notes = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    for w in Workload::ALL {
        let (Some(p), Some(h)) = (
            figures(samples, w, Kind::Proxyd),
            figures(samples, w, Kind::Haproxy),
        ) else {
            continue;
        };
        let rps = median(&p.rps) / median(&h.rps);
        let cpu = median(&p.cpu) / median(&h.cpu);
        let cpu_all = median(&p.cpu_stickd) / median(&h.cpu);
        let p99 = median(&p.p99) / median(&h.p99);
        notes.push(format!(
            "Issue 6 targets, {}: requests/s {rps:.2}× HAProxy (target ≥ 1.2×: {}); CPU µs/req \
             {cpu:.2}× (≤ 0.8×: {}), {cpu_all:.2}× with stickd ({}); p99 {p99:.2}× (no worse, \
             ≤ 1.0×: {}).",
            w.title(),
            mark(rps >= 1.2),
            mark(cpu <= 0.8),
            mark(cpu_all <= 0.8),
            mark(p99 <= 1.0),
        ));
    }
    if let (Some(stick), Some(plain)) = (
        figures(samples, Workload::Sticky, Kind::Proxyd),
        figures(samples, Workload::Sticky, Kind::ProxydNoStick),
    ) {
        let cost = 1.0 - median(&stick.rps) / median(&plain.rps);
        let verdict = if cost < 0.0 {
            "met: the runs with the rule were the faster ones, so the cost is below this run's noise"
        } else if cost <= 0.10 {
            "met"
        } else {
            "**missed**"
        };
        notes.push(format!(
            "Stick rule cost (issue 4: at most 10 % of requests/s), keep-alive sticky run: proxyd \
             with the rule {:.0} req/s, without {:.0} req/s: {:.1} % ({verdict}).",
            median(&stick.rps),
            median(&plain.rps),
            cost * 100.0,
        ));
    }
    if let Some(p) = figures(samples, Workload::NewSession, Kind::Proxyd) {
        let stickd = median(&p.cpu_stickd) - median(&p.cpu);
        notes.push(format!(
            "Where the new-session CPU goes: proxyd's worker and master spend {:.1} µs per request \
             (proxying, the cache insert and the batched send), stickd {stickd:.1} µs per stored \
             session (receiving the batch, its table, change log and disk writes, the watch \
             stream back to proxyd); HAProxy stores in-process and persists nothing.",
            median(&p.cpu),
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1 to a demo backend, keep-alive (real output).
    const KEEPALIVE: &str = "Running 2s test @ http://127.0.0.1:19001/index.php
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.23ms    1.48ms   9.81ms   79.45%
    Req/Sec    22.89k     6.11k   32.35k    50.00%
  Latency Distribution
     50%    1.75ms
     75%    2.68ms
     90%    4.36ms
     99%    7.05ms
  45532 requests in 2.00s, 9.81MB read
Requests/sec:  22730.39
Transfer/sec:      4.90MB
";

    /// wrk 4.1 against a backend killed halfway (real output): socket errors, µs latencies.
    const KILLED: &str = "Running 2s test @ http://127.0.0.1:57611/index.php
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   417.80us    0.91ms  10.48ms   91.13%
    Req/Sec    19.17k     7.78k   32.69k    58.33%
  Latency Distribution
     50%  148.00us
     75%  199.00us
     90%    1.12ms
     99%    4.76ms
  22918 requests in 2.00s, 4.94MB read
  Socket errors: connect 0, read 5, write 28860, timeout 0
Requests/sec:  11436.81
Transfer/sec:      2.46MB";

    /// wrk 4.1 on a path the backend does not serve (real output): every answer a 404.
    const NOT_FOUND: &str = "Running 1s test @ http://127.0.0.1:56071/nope
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    17.66ms   27.05ms 144.96ms   91.11%
    Req/Sec     4.64k     1.57k    6.41k    55.56%
  Latency Distribution
     50%    8.65ms
     75%   12.42ms
     90%   42.54ms
     99%  133.57ms
  4513 requests in 1.02s, 828.56KB read
  Non-2xx or 3xx responses: 4513
Requests/sec:   4414.33
Transfer/sec:    810.44KB";

    #[test]
    fn reads_wrk_output() {
        let r = parse_wrk(KEEPALIVE).expect("parse");
        assert_eq!(r.requests, 45532);
        assert!((r.seconds - 2.0).abs() < 1e-9);
        assert!((r.rps - 22730.39).abs() < 1e-6);
        assert!((r.p50_ms - 1.75).abs() < 1e-9);
        assert!((r.p99_ms - 7.05).abs() < 1e-9);
        assert_eq!((r.non_2xx, r.socket_errors), (0, 0));

        let r = parse_wrk(KILLED).expect("parse");
        assert_eq!(r.requests, 22918);
        assert!((r.p50_ms - 0.148).abs() < 1e-9);
        assert!((r.p99_ms - 4.76).abs() < 1e-9);
        assert_eq!((r.non_2xx, r.socket_errors), (0, 28865));

        let r = parse_wrk(NOT_FOUND).expect("parse");
        assert_eq!((r.requests, r.non_2xx, r.socket_errors), (4513, 4513, 0));
        assert!((r.seconds - 1.02).abs() < 1e-9);
        assert!((r.p99_ms - 133.57).abs() < 1e-9);
    }

    #[test]
    fn units() {
        assert_eq!(parse_count("22.89k").expect("k"), 22890);
        assert_eq!(parse_count("1.20M").expect("M"), 1_200_000);
        assert_eq!(parse_count(" 45532 ").expect("plain"), 45532);
        assert!((parse_latency_ms("2.00m").expect("m") - 120_000.0).abs() < 1e-9);
        assert!((parse_latency_ms("1.02s").expect("s") - 1020.0).abs() < 1e-9);
        assert!(parse_latency_ms("3.0xs").is_err());
        assert!(parse_count("many").is_err());
    }

    #[test]
    fn output_without_summary_is_an_error() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n").is_err());
        let cut = KEEPALIVE.replace("Requests/sec:  22730.39\n", "");
        assert!(parse_wrk(&cut).is_err());
    }

    #[test]
    fn reads_answers_in_any_case() {
        let haproxy = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-server: app2\r\nset-cookie: PHPSESSID=abc123; path=/\r\n\r\nhi\n";
        let a = parse_answer(haproxy).expect("answer");
        assert_eq!(
            a,
            Answer {
                status: 200,
                server: Some("app2".to_owned()),
                set_cookie: Some("abc123".to_owned())
            }
        );
        let other = b"HTTP/1.1 200 OK\r\nSet-Cookie: lang=en\r\nSet-Cookie: PHPSESSID=x9\r\nX-Server: app1\r\n\r\n";
        assert_eq!(
            parse_answer(other).expect("answer").set_cookie.as_deref(),
            Some("x9")
        );
        let a = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").expect("answer");
        assert_eq!((a.status, a.server, a.set_cookie), (503, None, None));
        assert!(parse_answer(b"garbage").is_err());
    }

    #[test]
    fn lua_script_sends_every_cookie() {
        let s = lua_script(&["aaa".to_owned(), "bbb".to_owned()], true);
        assert!(s.contains("\"aaa\",\n  \"bbb\","), "{s}");
        assert!(s.contains("[\"Connection\"] = \"close\""), "{s}");
        assert!(!lua_script(&["aaa".to_owned()], false).contains("Connection"));
    }

    #[test]
    fn configs_carry_the_seed_rules() {
        let servers = vec![
            ("app1".to_owned(), "127.0.0.2:9001".parse().expect("addr")),
            ("app2".to_owned(), "127.0.0.2:9002".parse().expect("addr")),
        ];
        let fe: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let h = haproxy_config(fe, &servers, 20_000).render();
        assert!(h.contains("maxconn 20000") && h.contains("maxconn 18000"));
        assert!(haproxy_maxconn() <= 20_000);
        assert!(h.contains("stick on req.cook(PHPSESSID)"));
        assert!(h.contains("stick store-response res.cook(PHPSESSID)"));
        assert!(h.contains("nbthread 1"));
        assert!(h.contains("server app2 127.0.0.2:9002"));
        let p = proxyd_config(Path::new("/a"), Path::new("/f"), None, fe, &servers).render();
        assert!(!p.contains("[backend.stick]") && !p.contains("stickd_socket"));
        let p = proxyd_config(
            Path::new("/a"),
            Path::new("/f"),
            Some(Path::new("/s")),
            fe,
            &servers,
        )
        .render();
        assert!(p.contains("[backend.stick]") && p.contains("stickd_socket = \"/s\""));
        let n = nginx_config(Path::new("/n"), fe, &servers, None).render();
        assert!(n.contains("hash $cookie_PHPSESSID consistent;"));
        assert!(n.contains("keepalive 64;"));
        assert!(!n.contains("user "));
    }
}
