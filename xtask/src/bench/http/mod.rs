//! Bench section `http`: wrk through proxyd, HAProxy and nginx (and straight to a backend) with
//! keep-alive sticky clients, connection-close clients and new-session traffic; requests/s,
//! p50/p99 and the CPU each proxy spends per request.
//!
//! Every target proxies to the same two demo backends, runs one proxy thread and logs no request.
//! Targets run alternately, round after round (the order rotating each round), so that a busy
//! neighbour on the shared machine hits all of them alike.

mod report;
pub(super) mod targets;
pub(super) mod wrk;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::stats;
use super::{Ctx, Section};
use crate::cluster;
use crate::harness::{Env, Proc};
use report::section;
use targets::{start_haproxy, start_nginx, start_proxyd};
use wrk::parse_wrk;

/// wrk's connections.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
