//! Bench section `peers`: new sessions replicated across three nodes, stickd's mesh against three
//! HAProxy processes in a `peers` section: sessions/s, time until the tables are equal, resync of a
//! restarted node.
//!
//! Both systems get the same two demo backends, the seed's sticky rule (`stick on
//! req.cook(PHPSESSID)`, `stick store-response res.cook(PHPSESSID)`) and the same client: our
//! load generator with 16 keep-alive connections per node sending cookie-less requests, so that
//! every answer carries a new `PHPSESSID` and stores a new session. Tables are read the way an
//! operator reads them: stickd's `Show`/`ListTables` over gRPC, HAProxy's `show table` on its
//! stats socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stats::{median, ratio, with_spread};
use super::{Ctx, Section, Table};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::{self, haproxy};
use crate::e2e::lb::Lb;
use crate::harness::{self, Env, Proc};
use crate::load::{Load, LoadConfig, LoadReport};

/// The seed's backend, and so the table's name in both systems.
const TABLE: &str = "dynamic_group";
/// Big enough that no load here fills it (an eviction would make the tables differ for ever).
const SIZE: &str = "1m";
/// HAProxy's spelling of the same size.
const HAPROXY_SIZE: &str = "1m";
/// Keep-alive connections per node, as `wrk -t1 -c16` would open.
const CLIENTS_PER_NODE: usize = 16;
/// Per-node request bound of every load: with three nodes well under `SIZE`.
const MAX_PER_NODE: u64 = 250_000;
/// How often the tables are polled.
const POLL: Duration = Duration::from_millis(20);
/// How often the table sizes are sampled during a load.
const SAMPLE: Duration = Duration::from_millis(100);
/// Health checks like the e2e proxyd config's (inter 300ms, fall 2, rise 1).
const CHECK: &str = "check inter 300ms fall 2 rise 1 maxconn 3000";

/// The two systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Stickd,
    Haproxy,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::Stickd => "stickd + proxyd",
            Self::Haproxy => "HAProxy peers",
        }
    }
}

/// Sizes of one run, from `--quick` or not.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Length of the new-session load.
    load: Duration,
    /// Bound on the wait for equal tables after the load.
    converge_bound: Duration,
    /// Sessions the tables hold (at least) when node 3 is killed.
    fill: u64,
    /// Sessions written on nodes 1-2 while node 3 is down.
    extra: u64,
    /// Bound on the wait for the restarted node to catch up.
    resync_bound: Duration,
}

/// How a wait for equal tables ended.
#[derive(Clone, Debug)]
enum Equal {
    /// All three tables held the same keys and servers (and every session) this long after the
    /// start of the wait.
    After(Duration),
    /// Still different when the bound passed: how many sessions were not identical on all three.
    Not { bound: Duration, differ: u64 },
}

impl Equal {
    fn ms(&self) -> Option<f64> {
        match self {
            Self::After(d) => Some(d.as_secs_f64() * 1000.0),
            Self::Not { .. } => None,
        }
    }
}

/// How a wait for equal tables went.
struct Waited {
    equal: Equal,
    /// Entry counts of the first header read, if every node answered it.
    first: Option<[u64; 3]>,
    /// Time from the start of the wait until every node answered a header read (a restarted
    /// process serves its CLI or gRPC).
    answered: Option<Duration>,
}

/// Everything one run of one system measured.
#[derive(Clone, Debug)]
struct Run {
    /// Sessions stored by the new-session load (successful cookie-less requests).
    sessions: u64,
    /// Requests of the new-session load that failed.
    failed: u64,
    /// Sessions per second over the three nodes.
    rate: f64,
    /// Session copies missing from the three tables, sampled every `SAMPLE` during the load:
    /// median and maximum.
    behind_median: f64,
    behind_max: u64,
    /// Session copies missing from the three tables at the moment the load stopped: for each
    /// node, sessions created minus the entries its table held.
    missing_at_stop: u64,
    converge: Equal,
    /// Entries in the tables when node 3 was killed.
    base: u64,
    /// Sessions written on nodes 1-2 while node 3 was down.
    extra: u64,
    resync: Equal,
    /// Time from the restart until node 3 answered a table read.
    resync_answered: Option<Duration>,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let plan = if ctx.opts.quick {
        Plan {
            load: Duration::from_secs(3),
            converge_bound: Duration::from_secs(5),
            fill: 5_000,
            extra: 1_000,
            resync_bound: Duration::from_secs(5),
        }
    } else {
        Plan {
            load: Duration::from_secs(10),
            converge_bound: Duration::from_secs(20),
            fill: 20_000,
            extra: 5_000,
            resync_bound: Duration::from_secs(30),
        }
    };
    let rounds = ctx.rounds(2);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first, so that a noisy neighbour does not always hit the same one.
        let order = if round % 2 == 0 {
            [System::Stickd, System::Haproxy]
        } else {
            [System::Haproxy, System::Stickd]
        };
        for system in order {
            let t = Instant::now();
            let run = run_once(ctx, system, plan)
                .await
                .with_context(|| format!("{} (round {})", system.label(), round + 1))?;
            eprintln!(
                "   {} round {}: {:.0} sessions/s ({} sessions, {} failed), {} missing at stop, \
                 behind during the load {:.0} (max {}), equal after {:?}; resync of {}+{}: {:?} \
                 (answering after {:?}) ({:.1?})",
                system.label(),
                round + 1,
                run.rate,
                run.sessions,
                run.failed,
                run.missing_at_stop,
                run.behind_median,
                run.behind_max,
                run.converge,
                run.base,
                run.extra,
                run.resync,
                run.resync_answered,
                t.elapsed()
            );
            match system {
                System::Stickd => ours.push(run),
                System::Haproxy => theirs.push(run),
            }
        }
    }
    let version = ctx
        .tools
        .versions
        .iter()
        .find(|(k, _)| k == "HAProxy")
        .and_then(|(_, v)| v.split_whitespace().nth(2))
        .unwrap_or("(unknown version)")
        .to_owned();
    Ok(section(plan, rounds, &version, &ours, &theirs))
}

/// One system from start to teardown: resync of a node killed with SIGKILL, then a new-session
/// load and the wait for equal tables.
///
/// The resync comes first, on tables filled with exactly `plan.fill` sessions: after the
/// new-session load the faster proxy's tables would hold more, and it would pay for that.
async fn run_once(ctx: &Ctx, system: System, plan: Plan) -> Result<Run> {
    let mut nodes = match system {
        System::Stickd => Nodes::ours().await?,
        System::Haproxy => Nodes::haproxy(&ctx.tools.haproxy).await?,
    };
    let all: Vec<SocketAddr> = nodes.frontends.clone();

    let base = load_count(&all, plan.fill).await?.ok;
    let mut total = base;
    if let Equal::Not { bound, differ } = nodes
        .wait_equal(total, plan.converge_bound, Instant::now())
        .await
        .equal
    {
        bail!("the tables still differ by {differ} sessions {bound:?} after filling them");
    }
    nodes.kill9(2)?;
    let extra = load_count(&all[..2], plan.extra).await?.ok;
    total += extra;
    let restarted = Instant::now();
    nodes.restart(2)?;
    let resync = nodes.wait_equal(total, plan.resync_bound, restarted).await;

    // New sessions at all three nodes at once for `plan.load`. A node 3 that never caught up
    // shows here too, as copies missing and tables that are not equal.
    let (load, behind) = load_for(&nodes, total, plan.load).await;
    total += load.ok;
    let stop = Instant::now();
    let Waited {
        equal: converge,
        first,
        ..
    } = nodes.wait_equal(total, plan.converge_bound, stop).await;
    let first = first.context("a node did not answer its table header right after the load")?;
    Ok(Run {
        sessions: load.ok,
        failed: load.failed,
        rate: load.ok as f64 / load.elapsed.as_secs_f64().max(1e-9),
        behind_median: median(&behind.iter().map(|&b| b as f64).collect::<Vec<_>>()),
        behind_max: behind.iter().copied().max().unwrap_or(0),
        missing_at_stop: missing(&first, total),
        converge,
        base,
        extra,
        resync: resync.equal,
        resync_answered: resync.answered,
    })
}

fn load_config(target: SocketAddr, duration: Duration, max: u64) -> LoadConfig {
    LoadConfig {
        keepalive_clients: CLIENTS_PER_NODE,
        close_clients: 0,
        max_duration: duration,
        max_requests: max,
        path: "/index.php".to_owned(),
        ..LoadConfig::new(target)
    }
}

/// Cookie-less requests at every node at once for `duration`; the reports summed, and every
/// `SAMPLE` the session copies the tables still missed (see [`missing`]), `before` being the
/// sessions the tables held at the start.
async fn load_for(nodes: &Nodes, before: u64, duration: Duration) -> (Loaded, Vec<u64>) {
    let started = Instant::now();
    let loads: Vec<Load> = nodes
        .frontends
        .iter()
        .map(|t| Load::start(load_config(*t, duration, MAX_PER_NODE)))
        .collect();
    let mut behind = Vec::new();
    loop {
        tokio::time::sleep(SAMPLE).await;
        if started.elapsed() + SAMPLE / 2 >= duration {
            break;
        }
        // Sessions answered first, then the tables: a session answered during the reads is
        // not counted, so this errs low by the few sessions of one read.
        let created: u64 = before + loads.iter().map(|l| l.snapshot().ok).sum::<u64>();
        let (a, b, c) = tokio::join!(nodes.used(0), nodes.used(1), nodes.used(2));
        if let (Ok(a), Ok(b), Ok(c)) = (a, b, c) {
            behind.push(missing(&[a, b, c], created));
        }
    }
    tokio::time::sleep(duration.saturating_sub(started.elapsed())).await;
    let mut reports = Vec::new();
    for l in loads {
        reports.push(l.finish().await);
    }
    (sum(&reports), behind)
}

/// `count` cookie-less requests spread over the targets (bounded at 60 s); the reports summed.
async fn load_count(targets: &[SocketAddr], count: u64) -> Result<Loaded> {
    let n = targets.len() as u64;
    let bound = Duration::from_secs(60);
    let loads: Vec<(Load, u64)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // The first targets take the remainder.
            let share = count / n + u64::from((i as u64) < count % n);
            (Load::start(load_config(*t, bound, share)), share)
        })
        .collect();
    let deadline = Instant::now() + bound;
    for (l, share) in &loads {
        loop {
            let s = l.snapshot();
            if s.ok + s.failures.total() >= *share {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{share} requests did not complete within {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut reports = Vec::new();
    for (l, _) in loads {
        reports.push(l.finish().await);
    }
    Ok(sum(&reports))
}

/// What loads that ran side by side did, added up.
#[derive(Clone, Copy, Debug, Default)]
struct Loaded {
    ok: u64,
    failed: u64,
    /// The longest of the loads.
    elapsed: Duration,
}

fn sum(reports: &[LoadReport]) -> Loaded {
    reports.iter().fold(Loaded::default(), |t, r| Loaded {
        ok: t.ok + r.ok,
        failed: t.failed + r.failures.total(),
        elapsed: t.elapsed.max(r.elapsed),
    })
}

/// Session copies missing from tables holding `used` entries when `created` sessions exist:
/// every session has its own key, written once, so this counts the copies still owed.
fn missing(used: &[u64; 3], created: u64) -> u64 {
    used.iter().map(|u| created.saturating_sub(*u)).sum()
}

/// Sessions that are not identical (same key, same server) on all three tables.
fn differing(tables: &[BTreeMap<String, String>; 3], expected: u64) -> u64 {
    let [t0, t1, t2] = tables;
    let identical = t0
        .iter()
        .filter(|(k, v)| t1.get(*k) == Some(v) && t2.get(*k) == Some(v))
        .count() as u64;
    let union: BTreeSet<&String> = t0.keys().chain(t1.keys()).chain(t2.keys()).collect();
    expected.max(union.len() as u64) - identical
}

/// Three running nodes of one system.
struct Nodes {
    frontends: Vec<SocketAddr>,
    kind: Kind,
    /// stickd clients kept between polls: a new gRPC connection per read would cost more than
    /// the read and blur the times (HAProxy's CLI is one cheap unix connection per command).
    clients: std::sync::Mutex<[Option<StickClient<tonic::transport::Channel>>; 3]>,
}

enum Kind {
    Ours(Lb),
    Haproxy(Haproxy),
}

/// Three HAProxy processes peered in `mypeers`, in front of their own two demo backends.
struct Haproxy {
    /// Held: the temp dir with configs, stats sockets and logs.
    _env: Env,
    /// Held: the demo backends; dropping a `Proc` kills it.
    _backends: Vec<Proc>,
    /// HAProxy on node `i`.
    procs: Vec<Proc>,
    stats: Vec<PathBuf>,
    /// Server names by HAProxy's `server_id` (1-based, in config order).
    servers: Vec<String>,
}

impl Nodes {
    /// Our three nodes (fdkeeper + stickd + proxyd each, the seed's sticky config).
    async fn ours() -> Result<Nodes> {
        let env = Env::new("bench-peers-stickd")?;
        let lb = Lb::start_sized(env, 3, None, "5m", SIZE).await?;
        Ok(Nodes {
            frontends: lb.nodes.iter().map(|n| n.frontend).collect(),
            kind: Kind::Ours(lb),
            clients: Default::default(),
        })
    }

    /// Three HAProxy processes (`nbthread 1`, foreground) on 127.0.0.1-3, peered.
    async fn haproxy(bin: &Path) -> Result<Nodes> {
        let mut env = Env::new("bench-peers-haproxy")?;
        let names = vec!["app1".to_owned(), "app2".to_owned()];
        let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
        let servers: Vec<(String, SocketAddr)> =
            backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let peers = (1..=3)
            .map(|h| env.free_port(h))
            .collect::<Result<Vec<_>>>()?;
        let frontends = (1..=3)
            .map(|h| env.free_port(h))
            .collect::<Result<Vec<_>>>()?;
        let mut procs = Vec::new();
        let mut stats = Vec::new();
        for h in 1..=3u8 {
            let socket = env.path(&format!("h{h}/stats.sock"));
            let config = env.write(
                &format!("h{h}/haproxy.cfg"),
                &haproxy_config(&socket, &peers, frontends[usize::from(h) - 1], &servers).render(),
            )?;
            procs.push(env.spawn(
                &format!("haproxy-n{h}"),
                bin,
                [
                    "-db".as_ref(),
                    "-L".as_ref(),
                    format!("haproxy{h}").as_ref(),
                    "-f".as_ref(),
                    config.as_os_str(),
                ],
            )?);
            stats.push(socket);
        }
        for (f, s) in frontends.iter().zip(&stats) {
            harness::wait_tcp(*f, START_TIMEOUT).await?;
            harness::wait_unix(s, START_TIMEOUT).await?;
        }
        // Replication starts once each process has a session with both others; a store made
        // before that would only reach them by a later resync.
        for s in &stats {
            harness::wait_for("haproxy peers to connect", START_TIMEOUT, || async {
                let out = haproxy_cmd(s, "show peers").await?;
                let up = out
                    .lines()
                    .filter(|l| l.contains("(remote,") && l.contains("last_status=ESTA"))
                    .count();
                Ok((up == 2).then_some(()))
            })
            .await?;
        }
        Ok(Nodes {
            frontends,
            clients: Default::default(),
            kind: Kind::Haproxy(Haproxy {
                _env: env,
                _backends: backends.into_iter().map(|(_, _, p)| p).collect(),
                procs,
                stats,
                servers: names,
            }),
        })
    }

    /// A connected client for stickd on node `i` (ours only).
    async fn client(&self, lb: &Lb, i: usize) -> Result<StickClient<tonic::transport::Channel>> {
        let cached = self.lock_clients()[i].clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = stick_client(&lb.nodes[i].stickd_socket).await?;
        self.lock_clients()[i] = Some(c.clone());
        Ok(c)
    }

    fn lock_clients(
        &self,
    ) -> std::sync::MutexGuard<'_, [Option<StickClient<tonic::transport::Channel>>; 3]> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries in node `i`'s table, from the table header (cheap: no entry is listed).
    async fn used(&self, i: usize) -> Result<u64> {
        let r = self.read_used(i).await;
        if r.is_err() {
            // A killed stickd: connect afresh next time.
            self.lock_clients()[i] = None;
        }
        r
    }

    async fn read_used(&self, i: usize) -> Result<u64> {
        match &self.kind {
            Kind::Ours(lb) => {
                let mut c = self.client(lb, i).await?;
                let tables = c.list_tables(pb::ListTablesRequest {}).await?.into_inner();
                tables
                    .tables
                    .iter()
                    .find(|t| t.name == TABLE)
                    .map(|t| t.used)
                    .with_context(|| format!("stickd on node{} has no table {TABLE}", i + 1))
            }
            Kind::Haproxy(h) => parse_used(&haproxy_cmd(&h.stats[i], "show table").await?),
        }
    }

    /// key -> server name of node `i`'s table.
    async fn table(&self, i: usize) -> Result<BTreeMap<String, String>> {
        match &self.kind {
            Kind::Ours(lb) => {
                let r = stickd_table(self.client(lb, i).await?).await;
                if r.is_err() {
                    self.lock_clients()[i] = None;
                }
                r
            }
            Kind::Haproxy(h) => parse_table(
                &haproxy_cmd(&h.stats[i], &format!("show table {TABLE}")).await?,
                &h.servers,
            ),
        }
    }

    async fn tables(&self) -> Result<[BTreeMap<String, String>; 3]> {
        let (a, b, c) = tokio::join!(self.table(0), self.table(1), self.table(2));
        Ok([a?, b?, c?])
    }

    /// kill -9 of what holds node `i`'s table: stickd for ours (proxyd keeps serving from its
    /// cache), the HAProxy process for theirs.
    fn kill9(&mut self, i: usize) -> Result<()> {
        match &mut self.kind {
            Kind::Ours(lb) => lb.nodes[i].stickd.kill9(),
            Kind::Haproxy(h) => h.procs[i].kill9(),
        }
    }

    /// Starts node `i`'s table holder again with the same command line.
    fn restart(&mut self, i: usize) -> Result<()> {
        self.lock_clients()[i] = None;
        match &mut self.kind {
            Kind::Ours(lb) => lb.nodes[i].stickd.restart(),
            Kind::Haproxy(h) => h.procs[i].restart(),
        }
    }

    /// Polls until the three tables hold the same keys and servers, at least `expected` of
    /// them, or until `bound` after `since`. The time is taken when the cheap header counts
    /// agreed, if the full reads that follow show the contents equal with the same counts (then
    /// they were equal already at the header read: tables only grow here); else after the reads.
    async fn wait_equal(&self, expected: u64, bound: Duration, since: Instant) -> Waited {
        let deadline = since + bound;
        let mut first = None;
        let mut answered = None;
        let mut round = 0;
        loop {
            let (a, b, c) = tokio::join!(self.used(0), self.used(1), self.used(2));
            if let (Ok(a), Ok(b), Ok(c)) = (&a, &b, &c) {
                if round == 0 {
                    first = Some([*a, *b, *c]);
                }
                answered.get_or_insert_with(|| since.elapsed());
            }
            round += 1;
            // A node that does not answer yet (a restarted one) is "not equal yet".
            if let (Ok(a), Ok(b), Ok(c)) = (a, b, c)
                && a == b
                && b == c
                && a >= expected
            {
                let agreed = Instant::now();
                if let Ok(t) = self.tables().await
                    && t[0] == t[1]
                    && t[1] == t[2]
                {
                    let at = if t[0].len() as u64 == a {
                        agreed
                    } else {
                        Instant::now()
                    };
                    return Waited {
                        equal: Equal::After(at.duration_since(since)),
                        first,
                        answered,
                    };
                }
            }
            if Instant::now() >= deadline {
                let differ = match self.tables().await {
                    Ok(t) => differing(&t, expected),
                    Err(_) => expected,
                };
                return Waited {
                    equal: Equal::Not { bound, differ },
                    first,
                    answered,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One node's HAProxy config: the seed's (global, peers, defaults, frontend, backend) with
/// loopback addresses, `nbthread 1`, a stats socket in the temp dir and no daemon, chroot or log.
fn haproxy_config(
    stats: &Path,
    peers: &[SocketAddr],
    frontend: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Haproxy {
    let mut backend = haproxy::Backend::seed(
        TABLE,
        haproxy::StickTable {
            size: HAPROXY_SIZE,
            peers: true,
        },
        haproxy::servers(servers, CHECK),
    );
    backend.options = vec!["http-server-close", "redispatch"];
    configs::Haproxy {
        comment: "HAProxy for bench peers: the seed's stick-table replication between three peers.",
        global: haproxy::Global {
            // The seed's 20000 needs 40k file descriptors, over this machine's hard limit
            // (HAProxy refuses to start); 8000 is far above the 16 connections per node used here.
            maxconn: Some(8000),
            stats_socket: Some(haproxy::StatsSocket {
                path: stats.to_owned(),
                expose_fd_listeners: false,
            }),
            no_exit_on_failure: false,
        },
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("haproxy{}", i + 1), *a))
            .collect(),
        defaults: haproxy::Defaults::seed("http-server-close", "1s"),
        frontend: haproxy::Frontend {
            name: "http-in",
            bind: frontend,
        },
        backend,
    }
}

/// One command on a HAProxy stats socket (non-interactive: HAProxy answers and closes).
async fn haproxy_cmd(socket: &Path, cmd: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("`{cmd}` on {} took over 10 s", socket.display()))?
        .with_context(|| format!("`{cmd}` on {}", socket.display()))
}

/// `used` of our table from `show table`'s header lines
/// (`# table: dynamic_group, type: string, size:1048576, used:15`).
fn parse_used(out: &str) -> Result<u64> {
    out.lines()
        .filter(|l| l.starts_with("# table: ") && l.contains(&format!(" {TABLE},")))
        .find_map(|l| l.split("used:").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no header for table {TABLE} in `show table`: {out:?}"))
}

/// key -> server name from `show table NAME` entry lines
/// (`0x55…: key=ludl48… use=0 exp=299241 server_id=2 server_key=app2`).
fn parse_table(out: &str, servers: &[String]) -> Result<BTreeMap<String, String>> {
    let mut table = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with("0x")) {
        // One pass over the words: tens of thousands of lines are read per poll.
        let (mut key, mut name, mut id) = (None, None, None);
        for w in line.split_ascii_whitespace() {
            if let Some(v) = w.strip_prefix("key=") {
                key = Some(v);
            } else if let Some(v) = w.strip_prefix("server_key=") {
                name = Some(v);
            } else if let Some(v) = w.strip_prefix("server_id=") {
                id = Some(v);
            }
        }
        let key = key.with_context(|| format!("no key in {line:?}"))?;
        // server_key (HAProxy 2.5+) names the server; older ones only give its id.
        let server = match name {
            Some(name) => name.to_owned(),
            None => {
                let id: usize = id
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no server in {line:?}"))?;
                servers
                    .get(id.wrapping_sub(1))
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}"))
            }
        };
        table.insert(key.to_owned(), server);
    }
    Ok(table)
}

async fn stick_client(socket: &Path) -> Result<StickClient<tonic::transport::Channel>> {
    Ok(StickClient::new(common::grpc::connect_unix(socket).await?))
}

/// key -> server of stickd's table through `Show`, page after page.
async fn stickd_table(
    mut c: StickClient<tonic::transport::Channel>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let r = c
            .show(pb::ShowRequest {
                table: TABLE.into(),
                // About 1.5 MB a page: under tonic's 4 MB default message limit.
                page_size: 20_000,
                page_token: token,
                ..Default::default()
            })
            .await
            .context("stick.v1.Stick/Show")?
            .into_inner();
        out.extend(r.entries.into_iter().map(|e| (e.key, e.server)));
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        token = r.next_page_token;
    }
}

/// "median (min..max)" of the runs that ended equal, and how many did not within the bound.
fn fmt_equal(runs: &[&Equal]) -> String {
    let ms: Vec<f64> = runs.iter().filter_map(|e| e.ms()).collect();
    let not: Vec<(Duration, u64)> = runs
        .iter()
        .filter_map(|e| match e {
            Equal::Not { bound, differ } => Some((*bound, *differ)),
            Equal::After(_) => None,
        })
        .collect();
    let mut s = if ms.is_empty() {
        String::new()
    } else {
        with_spread(&ms, 0)
    };
    if let Some((bound, _)) = not.first() {
        let differ: Vec<String> = not.iter().map(|(_, d)| d.to_string()).collect();
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(&format!(
            "not equal after {:.0} s in {} of {} rounds ({} sessions differ)",
            bound.as_secs_f64(),
            not.len(),
            runs.len(),
            differ.join(", ")
        ));
    }
    s
}

/// Median in ms of the runs that ended equal; infinite when any did not (it missed the bound).
fn median_ms(runs: &[&Equal]) -> f64 {
    let ms: Vec<f64> = runs.iter().filter_map(|e| e.ms()).collect();
    if ms.len() < runs.len() {
        f64::INFINITY
    } else {
        median(&ms)
    }
}

/// Whether `ours` is at least as fast as `theirs` (times in ms, lower is better), as a phrase,
/// and whether it counts as met. A gap within `resolution` is a tie: the method cannot see it.
fn verdict(what: &str, ours: f64, theirs: f64, resolution: f64) -> (String, bool) {
    let show = |v: f64| {
        if v.is_finite() {
            format!("{v:.0} ms")
        } else {
            "not within the bound".to_owned()
        }
    };
    let (word, met) = if ours <= theirs {
        ("met", true)
    } else if ours.is_finite() && ours - theirs <= resolution {
        ("met within the resolution", true)
    } else {
        ("missed", false)
    };
    (
        format!(
            "{what}: **{word}** (median {} for stickd against {} for HAProxy)",
            show(ours),
            show(theirs)
        ),
        met,
    )
}

/// Copies missing during the load expressed as time: how many ms of new sessions a table was
/// behind the answers on average (median copies missing over the three tables / 3 / sessions
/// per second).
fn lag_ms(r: &Run) -> f64 {
    if r.rate > 0.0 {
        r.behind_median / 3.0 / r.rate * 1000.0
    } else {
        f64::NAN
    }
}

fn section(plan: Plan, rounds: usize, version: &str, ours: &[Run], theirs: &[Run]) -> Section {
    let mut s = Section::new("Replication across three nodes: stickd against HAProxy peers");
    s.text.push(format!(
        "Three nodes on 127.0.0.1-3 in front of the same two demo backends. Ours: fdkeeper + \
         stickd + proxyd per node with the seed's sticky rule, stickd peered in a full mesh over \
         gRPC. Theirs: three HAProxy {version} processes (`nbthread 1`, foreground, `-L \
         haproxyN`) in one `peers mypeers` section, with the seed's `stick-table type string \
         len 32 size {HAPROXY_SIZE} expire 5m peers mypeers`, `stick on req.cook(PHPSESSID)` and \
         `stick store-response res.cook(PHPSESSID)`. Both tables are sized {SIZE} so that \
         nothing is evicted (the seed's 5k would be full in a second); HAProxy's global \
         `maxconn` is 8000 instead of the seed's 20000, which needs more file descriptors than \
         this machine allows; its health checks are proxyd's (`inter 300ms fall 2`, `timeout \
         check 1s`), and the seed's `log`, `chroot`, `user` and `daemon` lines are left out. The client is ours: {CLIENTS_PER_NODE} keep-alive connections \
         per node sending cookie-less requests, so that every answer sets a new `PHPSESSID` and \
         stores one new session on the node that served it. Tables are read as an operator \
         would: stickd's `ListTables` (entry count) and paged `Show` over gRPC, HAProxy's `show \
         table` on each process's stats socket. {rounds} round(s), one fresh cluster per system \
         and round, the two systems alternating; medians with (min..max) over the rounds."
    ));
    s.text.push(format!(
        "**Resync of a restarted node**: the tables are filled with {} sessions (the same for \
         both systems), node 3's table holder is killed with SIGKILL (stickd for ours, while its \
         proxyd keeps serving from its cache; the HAProxy process for theirs), {} more sessions \
         are written on nodes 1-2, and node 3 is started again with the same command line. The \
         time runs from that start until its table holds the same keys and servers as the \
         others' (bounded at {:.0} s). stickd restarts from its sled data and is sent only what \
         it missed; a restarted HAProxy starts empty and learns the whole table from its peers.",
        plan.fill,
        plan.extra,
        plan.resync_bound.as_secs_f64()
    ));
    s.text.push(format!(
        "**New sessions**: then the load runs at all three nodes at once for {:.0} s. \"Copies \
         missing\" is the sum over the nodes of the sessions answered so far minus the entries \
         that node's table holds (each session has its own key, stored once): the copies \
         replication still owes, sampled every {} ms during the load and once as it stops. After \
         the load the tables are polled every {} ms (the entry count of each node, then a full \
         read of the three tables once the counts agree) until they hold the same keys and \
         servers, every session included, bounded at {:.0} s.",
        plan.load.as_secs_f64(),
        SAMPLE.as_millis(),
        POLL.as_millis(),
        plan.converge_bound.as_secs_f64()
    ));

    let col = |runs: &[Run], f: &dyn Fn(&Run) -> f64, digits: usize| {
        let v: Vec<f64> = runs.iter().map(f).filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return ("n/a".to_owned(), f64::NAN);
        }
        (with_spread(&v, digits), median(&v))
    };
    let header = ["", "stickd + proxyd", "HAProxy peers", "stickd / HAProxy"];
    let num_row = |t: &mut Table, name: &str, f: &dyn Fn(&Run) -> f64| {
        let (o, om) = col(ours, f, 0);
        let (h, hm) = col(theirs, f, 0);
        t.row(vec![name.to_owned(), o, h, ratio(om, hm)]);
    };
    let eq_row = |t: &mut Table, name: &str, f: &dyn Fn(&Run) -> &Equal| {
        let o: Vec<&Equal> = ours.iter().map(f).collect();
        let h: Vec<&Equal> = theirs.iter().map(f).collect();
        t.row(vec![
            name.to_owned(),
            fmt_equal(&o),
            fmt_equal(&h),
            ratio(median_ms(&o), median_ms(&h)),
        ]);
    };
    let answered = |r: &Run| {
        r.resync_answered
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };

    let mut t = Table::new(&header);
    num_row(
        &mut t,
        "sessions in the tables when node 3 is killed",
        &|r| r.base as f64,
    );
    num_row(
        &mut t,
        "sessions written on nodes 1-2 while node 3 is down",
        &|r| r.extra as f64,
    );
    num_row(
        &mut t,
        "ms from the restart until node 3 answers a table read",
        &answered,
    );
    eq_row(
        &mut t,
        "ms from the restart until node 3's table equals the others' (lower is better)",
        &|r| &r.resync,
    );
    s.tables.push(t);

    let mut t = Table::new(&header);
    num_row(
        &mut t,
        "new sessions stored per second, 3 nodes (higher is better)",
        &|r| r.rate,
    );
    num_row(&mut t, "sessions created", &|r| r.sessions as f64);
    num_row(&mut t, "failed requests", &|r| r.failed as f64);
    num_row(
        &mut t,
        "copies missing during the load, median of the samples (lower is better)",
        &|r| r.behind_median,
    );
    num_row(
        &mut t,
        "lag during the load: ms of new sessions a table was behind on average, median copies missing / 3 / sessions per second (lower is better)",
        &lag_ms,
    );
    num_row(
        &mut t,
        "copies missing during the load, largest sample (lower is better)",
        &|r| r.behind_max as f64,
    );
    num_row(
        &mut t,
        "copies missing as the load stops (lower is better)",
        &|r| r.missing_at_stop as f64,
    );
    eq_row(
        &mut t,
        "ms from the end of the load until the 3 tables are equal (lower is better)",
        &|r| &r.converge,
    );
    s.tables.push(t);

    let conv = |runs: &[Run]| median_ms(&runs.iter().map(|r| &r.converge).collect::<Vec<_>>());
    let resync = |runs: &[Run]| median_ms(&runs.iter().map(|r| &r.resync).collect::<Vec<_>>());
    let up = |runs: &[Run]| median(&runs.iter().map(answered).collect::<Vec<_>>());
    let lag = |runs: &[Run]| median(&runs.iter().map(lag_ms).collect::<Vec<_>>());
    let poll = POLL.as_secs_f64() * 1000.0;
    let verdicts = [
        // Samples are 100 ms apart and read in a few ms: no tie margin beyond the figures.
        verdict("Lag while new sessions arrive", lag(ours), lag(theirs), 0.0),
        verdict(
            "Tables equal after the load",
            conv(ours),
            conv(theirs),
            poll,
        ),
        verdict(
            "Resync of a restarted node",
            resync(ours),
            resync(theirs),
            poll,
        ),
    ];
    let all_met = verdicts.iter().all(|(_, met)| *met);
    s.notes.push(format!(
        "Target (issue 6: replication at least as fast as HAProxy's peers): **{}**. {}. A gap \
         within one poll interval ({} ms) counts as a tie.",
        if all_met { "met" } else { "missed" },
        verdicts
            .iter()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>()
            .join(". "),
        POLL.as_millis()
    ));
    s.notes.push(
        "Why stickd's tables lag while sessions arrive: a proxyd worker never waits on stickd in \
         the request path; it writes a new session into its own cache at once and sends stores \
         to stickd in batches (`FLUSH_EVERY` in proxyd/src/stick.rs), and stickd then pushes \
         them to its peers. HAProxy writes the entry in the request path and its peers applet \
         pushes it right away."
            .to_owned(),
    );
    if resync(ours).is_finite() && resync(theirs).is_finite() {
        s.notes.push(format!(
            "Where the resync time goes: the restarted stickd answers after {:.0} ms (process \
             start, opening sled and loading the entries it had) and then catches up in {:.0} \
             ms; the restarted HAProxy answers after {:.0} ms and is equal {:.0} ms later \
             (medians of the rounds).",
            up(ours),
            (resync(ours) - up(ours)).max(0.0),
            up(theirs),
            (resync(theirs) - up(theirs)).max(0.0)
        ));
    }
    s.notes.push(format!(
        "A time is taken when the entry counts of the three nodes agree (one small request \
         per node, polled every {} ms), once the full reads that follow have found the \
         contents equal: figures under one poll interval are at the resolution of the method, \
         and one that was already equal at the first read mostly measures that read. Sessions \
         per second depend mostly on the proxies' request \
         handling (the HTTP section measures that alone); here they are the rate the \
         replication had to keep up with.",
        POLL.as_millis()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's `show table` output (HAProxy 1.x: no server_key) and 2.6's (with it).
    const SHOW: &str = "# table: dynamic_group, type: string, size:5120, used:3\n\
        0x1551cc4: key=1t1lr3s5s7pm4tuu3476c40jk3 use=0 exp=286311 server_id=2\n\
        0x1551f04: key=3m3o6qkfvk8l4lenk0k8to2bd6 use=0 exp=288500 server_id=1\n\
        0x55de4c3e71a0: key=8bg6ej7md7453sp0rrgi5vsiu7 use=0 exp=298787 server_id=1 server_key=app2\n\n";

    #[test]
    fn parses_haproxy_show_table() {
        assert_eq!(parse_used(SHOW).expect("the header parses"), 3);
        let t =
            parse_table(SHOW, &["app1".to_owned(), "app2".to_owned()]).expect("the entries parse");
        let want: BTreeMap<String, String> = [
            ("1t1lr3s5s7pm4tuu3476c40jk3", "app2"),
            ("3m3o6qkfvk8l4lenk0k8to2bd6", "app1"),
            // server_key wins over server_id: it is the name HAProxy matched on.
            ("8bg6ej7md7453sp0rrgi5vsiu7", "app2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(t, want);
        assert!(parse_used("# table: other, type: ip, size:10, used:1\n").is_err());
        assert!(parse_table("0x1: use=0 server_id=1\n", &[]).is_err());
    }

    #[test]
    fn counts_missing_and_differing_sessions() {
        assert_eq!(missing(&[10, 7, 12], 10), 3);
        let t = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let full = t(&[("a", "app1"), ("b", "app2"), ("c", "app1")]);
        let same = [full.clone(), full.clone(), full.clone()];
        assert_eq!(differing(&same, 3), 0);
        // One session missing on node 2, one with another server on node 3, and one session
        // answered that no table has yet.
        let tables = [
            full.clone(),
            t(&[("a", "app1"), ("b", "app2")]),
            t(&[("a", "app1"), ("b", "app1"), ("c", "app1")]),
        ];
        assert_eq!(differing(&tables, 4), 3);
    }
}
