//! Replication to peers and a returning node's resync, timed until the tables are equal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use super::writes::{drained, lags, paced, saturate, watch};
use super::{BOOT, DRAIN, Node, TABLE, configure, used};
use crate::bench::stats;
use crate::harness::{self, Env};

#[derive(Default)]
pub(super) struct Replication {
    pub(super) sat_rate: Vec<f64>,
    pub(super) sat_write_rate: Vec<f64>,
    pub(super) sat_p50: Vec<f64>,
    pub(super) sat_p99: Vec<f64>,
    pub(super) sat_cpu_sender: Vec<f64>,
    pub(super) sat_cpu_receiver: Vec<f64>,
    /// CPU µs per update of the three nodes together.
    pub(super) sat_cpu_all: Vec<f64>,
    pub(super) paced_rate: Vec<f64>,
    pub(super) paced_p50: Vec<f64>,
    pub(super) paced_p99: Vec<f64>,
}

/// Three nodes; writes on node1, watched on node2 and node3: paced, then saturating, per round.
pub(super) async fn replication(rounds: usize, dur: Duration) -> Result<Replication> {
    let mut env = Env::new("bench-stickd-repl")?;
    let mut nodes = configure(&mut env, &[1, 2, 3], 1_000_000)?;
    for n in &mut nodes {
        n.start(&env)?;
    }
    connected(&nodes).await?;
    let watchers = [watch(&nodes[1]).await?, watch(&nodes[2]).await?];
    let mut r = Replication::default();
    let mut tag = b'A';
    for _ in 0..rounds {
        let w = paced(&nodes[0], tag, dur).await?;
        drained(&watchers, tag, w.n).await?;
        let (p50, p99) = lags(&watchers, tag, &w);
        r.paced_rate.push(w.n as f64 / w.elapsed.as_secs_f64());
        r.paced_p50.push(p50);
        r.paced_p99.push(p99);
        tag += 1;

        let cpu = |i: usize| stats::cpu_time(nodes[i].pid());
        let (cpu1, cpu2, cpu3) = (cpu(0), cpu(1), cpu(2));
        let w = saturate(&nodes[0], tag, usize::MAX, dur).await?;
        let last = drained(&watchers, tag, w.n).await?;
        let (cpu1, cpu2, cpu3) = (cpu(0) - cpu1, cpu(1) - cpu2, cpu(2) - cpu3);
        r.sat_cpu_all
            .push((cpu1 + cpu2 + cpu3).as_secs_f64() * 1e6 / w.n as f64);
        let (p50, p99) = lags(&watchers, tag, &w);
        r.sat_rate
            .push(w.n as f64 / (last - w.started).as_secs_f64());
        r.sat_write_rate.push(w.n as f64 / w.elapsed.as_secs_f64());
        r.sat_p50.push(p50);
        r.sat_p99.push(p99);
        r.sat_cpu_sender.push(cpu1.as_secs_f64() * 1e6 / w.n as f64);
        r.sat_cpu_receiver
            .push(cpu2.as_secs_f64() * 1e6 / w.n as f64);
        tag += 1;
    }
    Ok(r)
}

/// Until every node of `nodes` pushes to and is pushed to by every other.
async fn connected(nodes: &[Node]) -> Result<()> {
    for n in nodes {
        let c = n.client().await?;
        harness::wait_for(&format!("{} to connect to its peers", n.name), BOOT, || {
            let mut c = c.clone();
            async move {
                let p = c.show_peers(pb::ShowPeersRequest {}).await?.into_inner();
                let up = p
                    .peers
                    .iter()
                    .filter(|p| p.state == "connected" && p.inbound_connected)
                    .count();
                Ok((up + 1 >= nodes.len()).then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

pub(super) struct Resync {
    pub(super) n: usize,
    pub(super) log_keep: u64,
    pub(super) fill_rate: f64,
    pub(super) rss_empty: u64,
    pub(super) disk_origin: u64,
    pub(super) rss_origin: u64,
    /// Of the last round.
    pub(super) disk_peer: u64,
    pub(super) rss_peer: u64,
    /// One per round.
    pub(super) serving: Vec<Duration>,
    pub(super) equal: Vec<Duration>,
    /// CPU seconds of node1 (sender) and node2 (receiver) until equal, per round: what the
    /// resync costs whatever else the machine runs.
    pub(super) cpu_sender: Vec<f64>,
    pub(super) cpu_receiver: Vec<f64>,
    pub(super) snapshots_sent: u64,
    pub(super) entries_sent: u64,
}

/// node1 takes `n` entries while node2 does not exist yet; node2 then starts with an empty
/// data_dir and a log position that node1's trimmed log no longer reaches: a full snapshot.
/// Each further round stops node2, wipes its data_dir and starts it again.
pub(super) async fn resync(n: usize, rounds: usize) -> Result<Resync> {
    let log_keep = (n / 10) as u64;
    let mut env = Env::new("bench-stickd-resync")?;
    let mut nodes = configure(&mut env, &[1, 2], log_keep)?;
    nodes[0].start(&env)?;
    let mut c1 = nodes[0].client().await?;
    let rss_empty = stats::rss_bytes(nodes[0].pid());
    let w = saturate(&nodes[0], b'r', n, Duration::from_secs(60)).await?;
    ensure!(w.n == n, "wrote {} of {n} entries within 60 s", w.n);
    let fill_rate = n as f64 / w.elapsed.as_secs_f64();
    // The log is trimmed every 2 s (once persisted) and sled flushed every 500 ms.
    let s = harness::wait_for("node1 to trim its log", Duration::from_secs(20), || {
        let mut c = c1.clone();
        async move {
            let s = c.stats(pb::StatsRequest {}).await?.into_inner();
            Ok((s.log_first_seq > 1).then_some(s))
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let origin_used = used(&s);
    ensure!(
        origin_used == n as u64,
        "node1 holds {origin_used} entries, wrote {n}"
    );
    let disk_origin = nodes[0].disk_bytes();
    let rss_origin = stats::rss_bytes(nodes[0].pid()).saturating_sub(rss_empty);
    let expected = table(&mut c1).await?;

    let mut serving = Vec::new();
    let mut equal = Vec::new();
    let (mut cpu_sender, mut cpu_receiver) = (Vec::new(), Vec::new());
    let (mut disk_peer, mut rss_peer) = (0, 0);
    for round in 0..rounds {
        if round > 0 {
            let node = &mut nodes[1];
            if let Some(p) = node.proc.as_mut() {
                p.signal(nix::sys::signal::Signal::SIGTERM)?;
                p.wait_exit(BOOT).await?;
            }
            let data = node.dir.join("data");
            std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
        }
        let sender_cpu0 = stats::cpu_time(nodes[0].pid());
        let started = Instant::now();
        nodes[1].start(&env)?;
        let mut c2 = nodes[1].client().await?;
        serving.push(started.elapsed());
        let deadline = started + DRAIN;
        equal.push(loop {
            let s = nodes[1].stats(&mut c2).await?;
            if used(&s) >= origin_used {
                let at = started.elapsed();
                cpu_sender.push((stats::cpu_time(nodes[0].pid()) - sender_cpu0).as_secs_f64());
                cpu_receiver.push(stats::cpu_time(nodes[1].pid()).as_secs_f64());
                break at;
            }
            if Instant::now() > deadline {
                bail!(
                    "node2 holds {} of {origin_used} entries after {DRAIN:?}",
                    used(&s)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        });
        // Not timed: the two tables, key by key.
        let b = table(&mut c2).await?;
        ensure!(
            expected == b,
            "round {round}: node2's table differs from node1's ({} and {} entries)",
            expected.len(),
            b.len()
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        disk_peer = nodes[1].disk_bytes();
        rss_peer = stats::rss_bytes(nodes[1].pid()).saturating_sub(rss_empty);
    }
    let p = c1
        .show_peers(pb::ShowPeersRequest {})
        .await?
        .into_inner()
        .peers
        .into_iter()
        .find(|p| p.name == "node2")
        .context("node1 does not list node2")?;
    Ok(Resync {
        n,
        log_keep,
        fill_rate,
        rss_empty,
        disk_origin,
        rss_origin,
        disk_peer,
        rss_peer,
        serving,
        equal,
        cpu_sender,
        cpu_receiver,
        snapshots_sent: p.snapshots_sent,
        entries_sent: p.entries_sent,
    })
}

/// key -> (server, version) of the bench table, from a Watch snapshot.
async fn table(c: &mut StickClient<Channel>) -> Result<HashMap<String, (String, u64)>> {
    let mut stream = c
        .watch(pb::WatchRequest {
            tables: vec![TABLE.into()],
        })
        .await?
        .into_inner();
    let mut out = HashMap::new();
    loop {
        match stream.message().await?.and_then(|e| e.event) {
            Some(pb::watch_event::Event::Snapshot(b)) => {
                out.extend(
                    b.entries
                        .into_iter()
                        .filter(|e| !e.deleted)
                        .map(|e| (e.key, (e.server, e.version))),
                );
            }
            Some(pb::watch_event::Event::SnapshotEnd(_)) => return Ok(out),
            Some(_) => {}
            None => bail!("watch ended before its snapshot did"),
        }
    }
}
