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

mod nodes;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::stats::median;
use super::{Ctx, Section};
use crate::load::{Load, LoadConfig, LoadReport};
use nodes::Nodes;
use report::section;

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

#[cfg(test)]
mod tests {
    use super::*;

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
