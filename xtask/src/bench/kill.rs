//! Bench section `kill`: the serving worker SIGKILLed under load, for proxyd, HAProxy
//! master-worker (default, and `master-worker no-exit-on-failure`) and nginx: failed requests,
//! refused connections, and the time until a fresh connection is served again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::reload::{Backends, Kind, Target, load_config};
use super::stats::{median, with_spread};
use super::{Ctx, Section, Table};
use crate::cluster;
use crate::load::{FailKind, Load};

const TARGETS: [Kind; 4] = [
    Kind::Proxyd,
    Kind::Haproxy {
        idle_close: false,
        no_exit: false,
    },
    Kind::Haproxy {
        idle_close: false,
        no_exit: true,
    },
    Kind::Nginx,
];

/// Time between two fresh-connection probes while nothing serves.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// How long to wait for a target to serve again, and to count failures.
#[derive(Clone, Copy)]
struct Timing {
    /// Poll for a fresh connection's answer this long at most.
    limit: Duration,
    /// Failures are counted over this long after the kill, the same for every target...
    window: Duration,
}
/// ...or until this long after serving again, if that is later: the clients whose requests
/// died reconnect and get going.
const SETTLE: Duration = Duration::from_millis(300);

/// What one kill measured.
struct KillRun {
    kind: Kind,
    /// From the SIGKILL to the answer of a fresh connection, or why there was none.
    served_after: Result<Duration, String>,
    failed: u64,
    refused: u64,
    /// Requests in flight or idle keep-alive connections on the target when it was killed.
    at_risk: u64,
    /// Probes that met a refused connection.
    refused_probes: u64,
    /// What the master did, as seen from its processes.
    aftermath: Aftermath,
    /// HAProxy: its log says "exit-on-failure" (the master killed everything and exited).
    exit_on_failure_logged: bool,
}

async fn kill_once(
    ctx: &Ctx,
    kind: Kind,
    slot: &mut Option<Target>,
    backends: &Backends,
    timing: Timing,
) -> Result<KillRun> {
    let Timing { limit, window } = timing;
    // A target that came back by itself is killed again as it is; one that did not (HAProxy)
    // is started afresh.
    let mut target = match slot.take() {
        Some(t) => t,
        None => Target::start(kind, backends, &ctx.tools).await?,
    };
    let load = Load::start(load_config(target.frontend, backends.names()));
    load.wait_ok(300, Duration::from_secs(20))
        .await
        .with_context(|| format!("the load never got going on {}", kind.label()))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let worker = target
        .current_worker()
        .await?
        .with_context(|| format!("{} has no serving worker", kind.label()))?;

    let before = load.snapshot();
    let at_risk = load.at_risk();
    let t0 = Instant::now();
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL)
        .with_context(|| format!("kill -9 {worker}"))?;
    // A fresh connection that the kernel queues is answered as soon as a worker accepts it, so
    // one probe may wait the whole remaining time; a refused one is retried.
    let mut refused_probes = 0;
    let served_after = loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break Err(format!("not within {} s", limit.as_secs()));
        }
        match cluster::probe(target.frontend, left).await {
            Ok(_) => break Ok(t0.elapsed()),
            Err(e) => {
                let refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                refused_probes += u64::from(refused);
                // Nobody listens and the master is gone: nothing will ever listen again.
                if refused && !target.master_alive() {
                    break Err("no listener, master exited".to_owned());
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let count_until = match &served_after {
        Ok(d) => window.max(*d + SETTLE),
        Err(_) => window,
    };
    tokio::time::sleep_until((t0 + count_until).into()).await;
    let failures = load.snapshot().failures.since(&before.failures);
    let aftermath = aftermath(&mut target, worker).await;
    let exit_on_failure_logged = target.master_log().contains("exit-on-failure");
    drop(load.finish().await);
    if served_after.is_ok() && target.master_alive() {
        *slot = Some(target);
    }
    Ok(KillRun {
        kind,
        served_after,
        failed: failures.total(),
        refused: failures.get(FailKind::Refused),
        at_risk,
        refused_probes,
        aftermath,
        exit_on_failure_logged,
    })
}

/// What the target's master did after its worker was killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aftermath {
    MasterExited,
    NewWorker,
    NoWorker,
    NoNewWorker,
}

impl std::fmt::Display for Aftermath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Aftermath::MasterExited => "master exited",
            Aftermath::NewWorker => "master started a new worker",
            Aftermath::NoWorker => "master alive, no worker",
            Aftermath::NoNewWorker => "master alive, no new worker",
        })
    }
}

async fn aftermath(target: &mut Target, killed: u32) -> Aftermath {
    if !target.master_alive() {
        return Aftermath::MasterExited;
    }
    match target.current_worker().await {
        Ok(Some(pid)) if pid != killed => Aftermath::NewWorker,
        _ if target.workers().is_empty() => Aftermath::NoWorker,
        _ => Aftermath::NoNewWorker,
    }
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let kills = ctx.pick(2, 5);
    let timing = Timing {
        limit: ctx.pick(Duration::from_secs(2), Duration::from_secs(5)),
        window: ctx.pick(Duration::from_millis(500), Duration::from_secs(1)),
    };
    let backends = Backends::start("bench-kill-backends").await?;
    let mut running: [Option<Target>; TARGETS.len()] = Default::default();
    let mut runs = Vec::new();
    for round in 0..kills {
        for k in 0..TARGETS.len() {
            let i = (k + round) % TARGETS.len();
            let kind = TARGETS[i];
            let t = Instant::now();
            let r = kill_once(ctx, kind, &mut running[i], &backends, timing)
                .await
                .with_context(|| format!("kill {} of {}", round + 1, kind.label()))?;
            eprintln!(
                "   kill {} of {}: serving again after {}, {} failed ({} refused) of {} at \
                 risk; {} ({:.1?})",
                round + 1,
                kind.label(),
                match &r.served_after {
                    Ok(d) => format!("{d:.1?}"),
                    Err(why) => format!("never ({why})"),
                },
                r.failed,
                r.refused,
                r.at_risk,
                r.aftermath,
                t.elapsed()
            );
            runs.push(r);
        }
    }
    Ok(section(&runs, kills, timing))
}

fn section(runs: &[KillRun], kills: usize, timing: Timing) -> Section {
    let mut s = Section::new("A worker killed with SIGKILL under load");
    let cfg = load_config(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new());
    s.text.push(format!(
        "The serving worker gets SIGKILL while our client loads the target ({} keep-alive, {} \
         connection-close, {} pausing keep-alive clients; a client whose request failed sends \
         its next one 5 ms later, so a target that refuses connections for the whole window \
         collects thousands of refusals). At risk: requests in flight plus idle keep-alive \
         connections at the moment of the kill. Right after the kill a probe opens a fresh \
         connection every {} ms (one probe may wait in the accept queue) until one is \
         answered, for at most {} s; a probe refused while the master is gone ends the wait \
         (nothing can listen again). The client's failures are counted for {} ms after the \
         kill, or until {} ms after serving again if that is later. A target that serves again \
         by itself is killed again as it is, one that does not is started afresh; {kills} \
         kill(s) per target, targets alternating; medians with (min..max).",
        cfg.keepalive_clients,
        cfg.close_clients,
        cfg.think_clients,
        POLL_EVERY.as_millis(),
        timing.limit.as_secs(),
        timing.window.as_millis(),
        SETTLE.as_millis(),
    ));
    let mut t = Table::new(&[
        "target",
        "kills",
        "serving again after (ms)",
        "failed requests per kill",
        "of which refused",
        "at risk per kill",
        "refused probes per kill",
        "what the master did",
    ]);
    for kind in TARGETS {
        let rs: Vec<&KillRun> = runs.iter().filter(|r| r.kind == kind).collect();
        if rs.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&KillRun) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<f64>>();
        let served: Vec<f64> = rs
            .iter()
            .filter_map(|r| r.served_after.as_ref().ok())
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        let mut why: Vec<&str> = rs
            .iter()
            .filter_map(|r| r.served_after.as_ref().err())
            .map(String::as_str)
            .collect();
        let never = why.len();
        why.sort_unstable();
        why.dedup();
        let served_cell = match (served.is_empty(), never) {
            (true, _) => format!("never ({})", why.join("; ")),
            (false, 0) => with_spread(&served, 1),
            (false, n) => format!(
                "{}; {n} of {} never ({})",
                with_spread(&served, 1),
                rs.len(),
                why.join("; ")
            ),
        };
        let mut what: Vec<String> = rs.iter().map(|r| r.aftermath.to_string()).collect();
        what.sort();
        what.dedup();
        t.row(vec![
            kind.label().to_owned(),
            rs.len().to_string(),
            served_cell,
            with_spread(&col(&|r| r.failed as f64), 0),
            with_spread(&col(&|r| r.refused as f64), 0),
            with_spread(&col(&|r| r.at_risk as f64), 0),
            with_spread(&col(&|r| r.refused_probes as f64), 0),
            what.join("; "),
        ]);
    }
    s.tables.push(t);

    let of = |kind: Kind| runs.iter().filter(move |r| r.kind == kind);
    let served_ms = |kind: Kind| -> Vec<f64> {
        of(kind)
            .filter_map(|r| r.served_after.as_ref().ok())
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect()
    };
    let count = |kind: Kind, f: &dyn Fn(&KillRun) -> bool| of(kind).filter(|r| f(r)).count();
    let refused = |kind: Kind| -> u64 { of(kind).map(|r| r.refused + r.refused_probes).sum() };
    let within_risk = |r: &KillRun| r.failed <= r.at_risk;
    let respawned = |r: &KillRun| r.aftermath == Aftermath::NewWorker;
    let exited = |r: &KillRun| r.aftermath == Aftermath::MasterExited;
    let logged = |r: &KillRun| r.exit_on_failure_logged;

    let p = Kind::Proxyd;
    s.notes.push(format!(
        "proxyd: {} refused connections (client and probes) in {} kills: fdkeeper keeps the \
         listening socket open while the master starts a new worker (it did after {} kills), \
         so connections that arrive meanwhile wait in the accept queue; serving again after \
         {:.1} ms (median). Failed requests stayed within the requests at risk in {} of {} \
         kills: what fails is what the killed worker held.",
        refused(p),
        of(p).count(),
        count(p, &respawned),
        median(&served_ms(p)),
        count(p, &within_risk),
        of(p).count(),
    ));
    let h = TARGETS[1];
    s.notes.push(format!(
        "HAProxy: its master does not start a new worker when one dies (2.6 has no setting \
         for it). By default it treats the death of the current worker as a failure: the \
         master exited after {} of {} kills, logging \"exit-on-failure: killing every \
         processes\" in {}, and nothing listened any more ({} of {} kills never served \
         again). Once the master is gone only a supervisor (e.g. systemd's `Restart=`) brings \
         HAProxy back.",
        count(h, &exited),
        of(h).count(),
        count(h, &logged),
        of(h).count() - served_ms(h).len(),
        of(h).count(),
    ));
    let n = TARGETS[2];
    s.notes.push(if count(n, &exited) > 0 {
        format!(
            "HAProxy with `master-worker no-exit-on-failure` (which `haproxy -c` accepts): the \
             master still exited after {} of {} kills and logged exit-on-failure in {}. Our \
             reading of the 2.6 source: since 2.5 the master re-executes itself in wait mode \
             once its worker runs, without the full configuration, so the option is gone by \
             the time a worker dies.",
            count(n, &exited),
            of(n).count(),
            count(n, &logged),
        )
    } else {
        format!(
            "HAProxy with `master-worker no-exit-on-failure`: the master stayed after {} of {} \
             kills; a fresh connection was served again after {} of them (no new worker until \
             the next reload otherwise).",
            of(n).count() - count(n, &exited),
            of(n).count(),
            served_ms(n).len(),
        )
    });
    let x = Kind::Nginx;
    s.notes.push(format!(
        "nginx: {} refused connections in {} kills: the master holds the listening socket and \
         started a new worker after {} kills, serving again after {:.1} ms (median); failed \
         requests within the requests at risk in {} of {} kills.",
        refused(x),
        of(x).count(),
        count(x, &respawned),
        median(&served_ms(x)),
        count(x, &within_risk),
        of(x).count(),
    ));
    s
}
