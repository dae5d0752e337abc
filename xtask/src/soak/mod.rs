//! `cargo xtask soak --minutes N`: mixed traffic on the lb e2e's 3-node cluster for N minutes
//! under seeded random reloads, kill -9s of every daemon kind and stickd partitions; then every
//! failure attributed, the stick tables compared, RSS trends fitted, and a report written.

mod procfs;
mod report;
mod traffic;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::cluster::{self, START_TIMEOUT};
use crate::e2e::lb::{self, Lb, LbNode};
use crate::harness::{self, Env};
use report::{Daemon, Event, EventKind, RssSample};

/// What `cargo xtask soak` was asked.
pub struct Options {
    pub minutes: f64,
    pub seed: Option<u64>,
    pub build: bool,
    /// Where report.md goes.
    pub out: PathBuf,
}

/// Traffic before the first event, and after the last one.
const WARM_UP: Duration = Duration::from_secs(10);
const QUIET_END: Duration = Duration::from_secs(10);
/// Seconds between two events (drawn uniformly), and how long a partition lasts. Runs of
/// `LONG_RUN` or more space their events wider, so that a daemon lives minutes between two kills:
/// an RSS trend can only be read over lifetimes longer than a process's warm-up.
const GAP_S: (f64, f64) = (3.0, 10.0);
const LONG_GAP_S: (f64, f64) = (10.0, 30.0);
const LONG_RUN: Duration = Duration::from_secs(600);
const PARTITION_S: (f64, f64) = (3.0, 8.0);
const RSS_EVERY: Duration = Duration::from_secs(10);
/// How long the tables may take to agree once the traffic has stopped.
const SETTLE: Duration = Duration::from_secs(30);
/// systemd's RestartSec of each unit in dist/systemd.
const RESTART_PROXYD: Duration = Duration::from_millis(100);
const RESTART_FDKEEPER: Duration = Duration::from_millis(100);
const RESTART_STICKD: Duration = Duration::from_secs(1);
/// A killed master's workers drain (drain_timeout 10s in the lb config) before systemd starts
/// the unit again; past this the rest of the group is killed, as TimeoutStopSec would.
const MASTER_GROUP_WAIT: Duration = Duration::from_secs(12);

const PARTITION_METHOD: &str = "SIGSTOP of the node's stickd, SIGCONT to heal (the cluster runs on \
    127.0.0.1-3 in one network namespace, where the stick-partition e2e's per-node namespaces do \
    not fit: to its peers the node is silent, and its proxyd serves from its cache and queues its \
    writes, as when its peer links are cut)";

/// The traffic mix: about 120 requests/s in all.
const MIX: traffic::Mix = traffic::Mix {
    keepalive: 4,
    close: 3,
    sticky: 16,
    upload: 2,
};

/// Runs the soak; `Ok(true)` when no promise was broken.
pub async fn run(opts: Options) -> Result<bool> {
    anyhow::ensure!(
        opts.minutes.is_finite() && opts.minutes > 0.0 && opts.minutes <= 24.0 * 60.0,
        "--minutes must be between 0 and 1440"
    );
    if opts.build {
        println!("building release binaries...");
        tokio::task::spawn_blocking(harness::build_release).await??;
    }
    let seed = opts.seed.unwrap_or_else(rand::random);
    println!(
        "soak: {} minutes, seed {seed}; partition = SIGSTOP/SIGCONT of a node's stickd",
        opts.minutes
    );
    let env = Env::new("soak")?;
    let logs = env.logs_dir();
    // Sessions expire after 2 minutes, so the table reaches its steady size early in a run.
    let mut lb = Lb::start_opts(env, 3, None, "2m").await?;
    println!(
        "cluster up: frontends {}; logs in {}",
        lb.nodes
            .iter()
            .map(|n| n.frontend.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        logs.display()
    );

    let t0 = Instant::now();
    let length = Duration::from_secs_f64(opts.minutes * 60.0);
    let until = t0 + length;
    let rec = Arc::new(traffic::Recorder::new(t0));
    let frontends = lb.nodes.iter().map(|n| n.frontend).collect();
    let clients = traffic::start(Arc::clone(&rec), frontends, MIX, until, seed);
    let stop_rss = CancellationToken::new();
    let sampler = tokio::spawn(sample_rss(logs.clone(), t0, stop_rss.clone()));

    let gap = if length >= LONG_RUN {
        LONG_GAP_S
    } else {
        GAP_S
    };
    let events = inject(&mut lb, seed, t0, until, gap).await?;
    for c in clients {
        c.await?;
    }
    let elapsed = t0.elapsed();
    stop_rss.cancel();
    let rss = sampler.await?;
    let tables = settle(&lb).await;
    let totals = rec.totals();

    let run = report::Run {
        seed,
        minutes: opts.minutes,
        elapsed,
        partition_method: PARTITION_METHOD,
        classes: totals.classes.into_iter().collect(),
        failures: totals.failures,
        unrecorded_failures: totals.unrecorded,
        events,
        moves: totals.moves,
        sessions: totals.sessions,
        uploaded_bytes: totals.uploaded,
        tables,
        rss,
    };
    let verdict = report::render(&run);
    println!("\n{}", verdict.text);
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let path = opts.out.join("report.md");
    std::fs::write(&path, &verdict.text)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let csv = opts.out.join("rss.csv");
    std::fs::write(&csv, report::rss_csv(&run.rss))
        .with_context(|| format!("cannot write {}", csv.display()))?;
    println!(
        "report written to {}, RSS samples to {}",
        path.display(),
        csv.display()
    );
    Ok(verdict.violations.is_empty())
}

/// The events, at seeded random times from `WARM_UP` until `QUIET_END` before the end, one at a
/// time; every kind once in each round, in a shuffled order, on a random node.
async fn inject(
    lb: &mut Lb,
    seed: u64,
    t0: Instant,
    until: Instant,
    gap: (f64, f64),
) -> Result<Vec<Event>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let mut bag: Vec<EventKind> = Vec::new();
    let mut next = t0 + WARM_UP;
    let last = until.checked_sub(QUIET_END).unwrap_or(t0);
    while next < last {
        tokio::time::sleep_until(next.into()).await;
        if bag.is_empty() {
            bag = EventKind::ALL.to_vec();
            bag.shuffle(&mut rng);
        }
        let Some(kind) = bag.pop() else { break };
        let node = rng.random_range(first_node(kind)..lb.nodes.len());
        let hold = Duration::from_secs_f64(rng.random_range(PARTITION_S.0..PARTITION_S.1));
        let start = t0.elapsed();
        let (killed_conns, ok, note) = act(lb, kind, node, hold).await.with_context(|| {
            format!(
                "{} on node{} at +{:.1}s",
                kind.name(),
                node + 1,
                start.as_secs_f64()
            )
        })?;
        let end = t0.elapsed();
        println!(
            "+{:>7.1}s {} on node{}: {note} ({:.2} s)",
            start.as_secs_f64(),
            kind.name(),
            node + 1,
            (end - start).as_secs_f64()
        );
        events.push(Event {
            kind,
            node,
            start,
            end,
            killed_conns,
            ok,
            note,
        });
        next = Instant::now() + Duration::from_secs_f64(rng.random_range(gap.0..gap.1));
    }
    Ok(events)
}

/// The first node an event of `kind` may hit: node1's stickd is never killed, so that one stickd
/// lives the whole run and its RSS can be judged past its warm-up (see
/// `report::rss::STICKD_WARM_UP_S`); the other nodes' stickd are killed often enough that none may.
fn first_node(kind: EventKind) -> usize {
    usize::from(kind == EventKind::KillStickd)
}

/// Does one event and waits until the node is whole again. Returns the connections a killed
/// worker held, whether the event went as it should, and a note for the log.
async fn act(
    lb: &mut Lb,
    kind: EventKind,
    node: usize,
    hold: Duration,
) -> Result<(HashSet<std::net::SocketAddr>, bool, String)> {
    let lend_socket = lb.env.path(&format!("n{}/fdkeeper/lend.sock", node + 1));
    let n = &mut lb.nodes[node];
    let mut conns = HashSet::new();
    let mut ok = true;
    let note = match kind {
        EventKind::Reload => {
            let out = tokio::process::Command::new(harness::release_bin("proxyd"))
                .arg("reload")
                .arg("--config")
                .arg(&n.proxyd_config)
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(30), out)
                .await
                .context("proxyd reload did not return within 30 s")??;
            ok = out.status.success();
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.trim();
            if ok {
                "reloaded".to_owned()
            } else {
                format!("reload refused: {said}")
            }
        }
        EventKind::KillWorker => {
            let before = serving(n).await?;
            let pid = Pid::from_raw(before.pid as i32);
            // Stopped first, so that it accepts nothing between the look at its connections and
            // its death: a connection it did not take waits in the shared queue for the next.
            kill(pid, Signal::SIGSTOP).context("SIGSTOP of the worker")?;
            conns = procfs::client_conns(before.pid, n.frontend);
            kill(pid, Signal::SIGKILL).context("kill -9 of the worker")?;
            let admin = n.proxyd_admin.clone();
            let after =
                harness::wait_for("the master to respawn its worker", START_TIMEOUT, || {
                    let admin = admin.clone();
                    async move {
                        let s = cluster::serving(&cluster::proxyd_status(&admin).await?);
                        Ok(s.filter(|s| s.pid != before.pid))
                    }
                })
                .await?;
            format!(
                "worker {} held {} client connections; worker {} serves",
                before.pid,
                conns.len(),
                after.pid
            )
        }
        EventKind::KillMaster => {
            let pid = n.proxyd.pid();
            n.proxyd.kill9()?;
            // Its workers got SIGTERM (parent-death signal) and drain; systemd starts the unit
            // again once its cgroup is empty.
            let drained = harness::wait_for(
                "the killed master's workers to drain",
                MASTER_GROUP_WAIT,
                || async move { Ok(harness::group_members(pid).is_empty().then_some(())) },
            )
            .await
            .is_ok();
            tokio::time::sleep(RESTART_PROXYD).await;
            n.proxyd.restart()?;
            let g = serving(n).await?;
            format!(
                "master {pid} killed, {}; new master {} serves with worker {}",
                if drained {
                    "its workers drained"
                } else {
                    "its workers killed after 12 s"
                },
                n.proxyd.pid(),
                g.pid
            )
        }
        EventKind::KillStickd => {
            let pid = n.stickd.pid();
            n.stickd.kill9()?;
            tokio::time::sleep(RESTART_STICKD).await;
            n.stickd.restart()?;
            harness::wait_unix(&n.stickd_socket, START_TIMEOUT).await?;
            format!("stickd {pid} killed, {} serves", n.stickd.pid())
        }
        EventKind::KillFdkeeper => {
            let pid = n.fdkeeper.pid();
            n.fdkeeper.kill9()?;
            tokio::time::sleep(RESTART_FDKEEPER).await;
            n.fdkeeper.restart()?;
            harness::wait_seqpacket(&lend_socket, START_TIMEOUT).await?;
            format!("fdkeeper {pid} killed, {} lends", n.fdkeeper.pid())
        }
        EventKind::Partition => {
            n.stickd.signal(Signal::SIGSTOP)?;
            tokio::time::sleep(hold).await;
            n.stickd.signal(Signal::SIGCONT)?;
            format!(
                "stickd {} stopped for {:.1} s",
                n.stickd.pid(),
                hold.as_secs_f64()
            )
        }
    };
    Ok((conns, ok, note))
}

async fn serving(n: &LbNode) -> Result<cluster::ServingGeneration> {
    let admin = n.proxyd_admin.clone();
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await
}

/// Every `RSS_EVERY` until stopped: the RSS of each daemon kind on each node.
async fn sample_rss(
    logs: PathBuf,
    t0: Instant,
    stop: CancellationToken,
) -> BTreeMap<(usize, Daemon), Vec<RssSample>> {
    let mut out: BTreeMap<(usize, Daemon), Vec<RssSample>> = BTreeMap::new();
    loop {
        let t = t0.elapsed().as_secs_f64();
        let logs2 = logs.clone();
        if let Ok(now) = tokio::task::spawn_blocking(move || procfs::cluster_rss(&logs2)).await {
            for (key, (bytes, pids)) in now {
                out.entry(key).or_default().push(RssSample {
                    t,
                    mib: bytes as f64 / (1024.0 * 1024.0),
                    pids,
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RSS_EVERY) => {}
            _ = stop.cancelled() => return out,
        }
    }
}

/// Until every node's stick table is the same (bounded by `SETTLE`): how long it took and how
/// many entries, or what still differed.
async fn settle(lb: &Lb) -> Result<(Duration, usize), String> {
    let start = Instant::now();
    loop {
        let mut tables = Vec::new();
        let mut err = None;
        for n in &lb.nodes {
            match lb::show(&n.stickd_socket).await {
                Ok(t) => tables.push(t),
                Err(e) => err = Some(format!("node{}: {e:#}", n.host)),
            }
        }
        let same = err.is_none() && tables.windows(2).all(|w| w[0] == w[1]);
        if same {
            return Ok((start.elapsed(), tables.first().map_or(0, BTreeMap::len)));
        }
        if start.elapsed() > SETTLE {
            let Some(base) = tables.first() else {
                return Err(err.unwrap_or_else(|| "no node".into()));
            };
            return Err(err.unwrap_or_else(|| {
                let diffs: Vec<String> = tables
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(i, t)| {
                        let differ = base.iter().filter(|(k, v)| t.get(*k) != Some(v)).count()
                            + t.keys().filter(|k| !base.contains_key(*k)).count();
                        format!("node{} differs from node1 in {differ} keys", i + 1)
                    })
                    .collect();
                format!(
                    "after {} s: {} ({} / {} entries)",
                    SETTLE.as_secs(),
                    diffs.join(", "),
                    base.len(),
                    tables
                        .iter()
                        .skip(1)
                        .map(|t| t.len().to_string())
                        .collect::<Vec<_>>()
                        .join(" / ")
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
