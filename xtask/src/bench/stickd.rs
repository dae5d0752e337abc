//! Bench section `stickd`: local writes, replication throughput and lag, full resync of a peer and
//! size per entry, on real stickd release binaries (127.0.0.1..3) driven through the gRPC client.
//!
//! Every time is taken in this process on one clock: a store's reply time comes from the writer
//! task, an update's arrival from a `Watch` stream on the peer, so lag = arrival - reply.
//! `STICKD_BENCH_BIN=/path/to/stickd` runs another build (for before/after comparisons);
//! `STICKD_BENCH_RESYNC_ONLY=1` runs only the resync part and `STICKD_BENCH_RESYNC_ROUNDS=N`
//! resyncs a wiped peer N times (default 3, 1 with `--quick`) against the same origin, for a
//! median.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use super::{Ctx, Section, Table, stats};
use crate::configs;
use crate::harness::{self, Env, Proc};

const TABLE: &str = "bench";
/// Items per Store call: what proxyd's stick cache sends at most.
const BATCH: usize = 1000;
/// Concurrent writers at saturation (one per core: more only queue on the store's lock).
const WRITERS: usize = 2;
/// The paced run: `PACED_BATCH` items every millisecond = 10k updates/s.
const PACED_RATE: usize = 10_000;
const PACED_BATCH: usize = 10;
const BOOT: Duration = Duration::from_secs(20);
/// Bound on waiting for replication to deliver what was written.
const DRAIN: Duration = Duration::from_secs(60);
/// Largest message the bench's client accepts (a Watch batch of many entries).
const MAX_MESSAGE: usize = 64 << 20;

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let bin = stickd_bin();
    ensure!(
        bin.exists(),
        "{} is missing: cargo build --release -p stickd",
        bin.display()
    );
    let rounds = ctx.rounds(3);
    let secs = ctx.pick(Duration::from_secs(1), Duration::from_secs(3));
    let resync_n = ctx.pick(100_000, 1_000_000);
    let resync_only = std::env::var_os("STICKD_BENCH_RESYNC_ONLY").is_some();
    let resync_rounds = match std::env::var("STICKD_BENCH_RESYNC_ROUNDS") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("STICKD_BENCH_RESYNC_ROUNDS={v}: a count above 0"))?,
        // A single resync on a shared machine is one sample of a noisy figure: the median of
        // three (the origin is filled once) costs a few seconds more.
        Err(_) => ctx.rounds(3),
    };

    if resync_only {
        let rs = resync(resync_n, resync_rounds).await?;
        let mut s = Section::new("stickd: resync only");
        s.text.push(format!(
            "`{}`, STICKD_BENCH_RESYNC_ONLY: the resync part alone.",
            bin.display()
        ));
        let mut t = Table::new(&["figure", "measured", "target", "met"]);
        resync_rows(&mut t, &rs);
        s.tables.push(t);
        s.notes.push(resync_note(&rs));
        return Ok(s);
    }

    let mut local = Vec::new();
    let mut local_cpu = Vec::new();
    for _ in 0..rounds {
        let (rate, cpu_us) = local_writes(secs).await?;
        local.push(rate);
        local_cpu.push(cpu_us);
    }
    let repl = replication(rounds, secs).await?;
    let rs = resync(resync_n, resync_rounds).await?;

    let mut s = Section::new("stickd: writes, replication lag, resync, size per entry");
    s.text.push(format!(
        "Real stickd release binaries on 127.0.0.1..3 (`{}`), driven by a tonic client over each \
         node's unix socket. Writes are `Store` calls of {BATCH} fresh string keys (proxyd's batch \
         size) from {WRITERS} concurrent writers; the paced run sends {PACED_BATCH} keys every \
         millisecond ({PACED_RATE} updates/s). Replication is counted where it is seen: a `Watch` \
         stream on node2 and node3 timestamps every update as it arrives, on the same clock as the \
         writer's reply from node1 (lag = arrival - reply, 0 when the peer saw it first). \
         {rounds} round(s) of {secs:?} per load; medians (min..max) over rounds.",
        bin.display()
    ));
    let mut t = Table::new(&["figure", "measured", "target", "met"]);
    let met = |ok: bool| if ok { "met" } else { "missed" }.to_owned();
    let none = || "-".to_owned();
    t.row(vec![
        "local writes/s, one node without peers".into(),
        stats::with_spread(&local, 0),
        none(),
        none(),
    ]);
    t.row(vec![
        "stickd CPU µs per local write".into(),
        stats::with_spread(&local_cpu, 2),
        none(),
        none(),
    ]);
    let sat = stats::median(&repl.sat_rate);
    t.row(vec![
        "updates/s written on node1 and seen on node2 and node3 (saturation)".into(),
        stats::with_spread(&repl.sat_rate, 0),
        ">= 100000".into(),
        met(sat >= 100_000.0),
    ]);
    t.row(vec![
        "writes/s accepted by node1 during that run".into(),
        stats::with_spread(&repl.sat_write_rate, 0),
        none(),
        none(),
    ]);
    t.row(vec![
        "CPU µs per replicated update: node1 (sender) / node2 (receiver)".into(),
        format!(
            "{} / {}",
            stats::with_spread(&repl.sat_cpu_sender, 2),
            stats::with_spread(&repl.sat_cpu_receiver, 2)
        ),
        none(),
        none(),
    ]);
    t.row(vec![
        format!(
            "replication lag p50 / p99 at {}k updates/s (achieved {} /s)",
            PACED_RATE / 1000,
            stats::with_spread(&repl.paced_rate, 0)
        ),
        format!(
            "{} / {} ms",
            stats::with_spread(&repl.paced_p50, 2),
            stats::with_spread(&repl.paced_p99, 2)
        ),
        "p99 < 10 ms".into(),
        met(stats::median(&repl.paced_p99) < 10.0),
    ]);
    t.row(vec![
        "replication lag p50 / p99 at saturation".into(),
        format!(
            "{} / {} ms",
            stats::with_spread(&repl.sat_p50, 1),
            stats::with_spread(&repl.sat_p99, 1)
        ),
        none(),
        none(),
    ]);
    resync_rows(&mut t, &rs);
    s.tables.push(t);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = stats::median(&repl.sat_cpu_all);
    s.notes.push(format!(
        "Where saturation stops: the three stickd together used {all:.1} µs of CPU per replicated \
         update (sender, two receivers, their sled writers), so on this machine's {cores} cores \
         they alone could carry at most {:.0} updates/s; the bench's load client and its two \
         Watch streams run on the same cores, and so does whatever else the machine is doing \
         (load average {} at the end of this section).",
        cores as f64 * 1e6 / all,
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into())
    ));
    s.notes.push(resync_note(&rs));
    Ok(s)
}

/// The resync figures' rows.
fn resync_rows(t: &mut Table, rs: &Resync) {
    let met = |ok: bool| if ok { "met" } else { "missed" }.to_owned();
    let none = || "-".to_owned();
    let equal: Vec<f64> = rs.equal.iter().map(Duration::as_secs_f64).collect();
    let serving: Vec<f64> = rs.serving.iter().map(Duration::as_secs_f64).collect();
    t.row(vec![
        format!(
            "full resync of {} entries: new empty peer started until its table equals",
            rs.n
        ),
        format!(
            "{} s (serving after {} s)",
            stats::with_spread(&equal, 2),
            stats::with_spread(&serving, 2)
        ),
        if rs.n >= 1_000_000 {
            "< 2 s".into()
        } else {
            "< 2 s at 1M (quick: smaller)".into()
        },
        met(stats::median(&equal) < 2.0),
    ]);
    t.row(vec![
        "CPU s used until then: node1 (sender) / node2 (receiver, from its start)".into(),
        format!(
            "{} / {}",
            stats::with_spread(&rs.cpu_sender, 2),
            stats::with_spread(&rs.cpu_receiver, 2)
        ),
        none(),
        none(),
    ]);
    t.row(vec![
        format!("local writes/s while filling {} entries", rs.n),
        format!("{:.0}", rs.fill_rate),
        none(),
        none(),
    ]);
    t.row(vec![
        format!(
            "disk bytes per entry at {} entries: origin (log of {} kept) / resynced peer",
            rs.n, rs.log_keep
        ),
        format!(
            "{:.0} / {:.0}",
            rs.disk_origin as f64 / rs.n as f64,
            rs.disk_peer as f64 / rs.n as f64
        ),
        none(),
        none(),
    ]);
    t.row(vec![
        format!(
            "RSS bytes per entry at {} entries: origin / resynced peer",
            rs.n
        ),
        format!(
            "{:.0} / {:.0}",
            rs.rss_origin as f64 / rs.n as f64,
            rs.rss_peer as f64 / rs.n as f64
        ),
        none(),
        none(),
    ]);
}

fn resync_note(rs: &Resync) -> String {
    format!(
        "Resync: node1 wrote {} entries with `log_keep = {}`, so its log no longer reached back \
         to the start and the new peer got a full snapshot ({} snapshot(s), {} entries sent over \
         {} round(s), each with node2's data_dir wiped before its start); the time runs from the \
         peer's process start until its `Stats` count equals node1's, and the two tables were \
         then compared key by key (server and version): equal. Disk is the data_dir's allocated \
         blocks after a flush; RSS per entry is the growth over an empty stickd ({:.1} MiB).",
        rs.n,
        rs.log_keep,
        rs.snapshots_sent,
        rs.entries_sent,
        rs.equal.len(),
        rs.rss_empty as f64 / f64::from(1 << 20)
    )
}

fn stickd_bin() -> PathBuf {
    std::env::var_os("STICKD_BENCH_BIN")
        .map_or_else(|| harness::release_bin("stickd"), PathBuf::from)
}

/// One stickd of the bench.
struct Node {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn start(&mut self, env: &Env) -> Result<()> {
        let p = env.spawn(
            &self.name,
            stickd_bin(),
            [
                "--config".as_ref(),
                self.config.as_os_str(),
                "-L".as_ref(),
                self.name.as_ref(),
            ],
        )?;
        self.proc = Some(p);
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// A client once the node answers (waits for it to boot).
    async fn client(&self) -> Result<StickClient<Channel>> {
        let socket = self.socket.clone();
        harness::wait_for(&format!("{} to serve", self.name), BOOT, || {
            let socket = socket.clone();
            async move {
                let ch = common::grpc::connect_unix(&socket).await?;
                let mut c = StickClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                c.list_tables(pb::ListTablesRequest {}).await?;
                Ok(Some(c))
            }
        })
        .await
    }

    async fn stats(&self, c: &mut StickClient<Channel>) -> Result<pb::StatsReply> {
        Ok(c.stats(pb::StatsRequest {})
            .await
            .with_context(|| format!("Stats on {}", self.name))?
            .into_inner())
    }

    /// Allocated bytes of the data_dir.
    fn disk_bytes(&self) -> u64 {
        dir_blocks(&self.dir.join("data"))
    }
}

fn dir_blocks(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_blocks(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn used(s: &pb::StatsReply) -> u64 {
    s.tables
        .iter()
        .find(|t| t.name == TABLE)
        .map_or(0, |t| t.used)
}

/// Configs for node{h} on 127.0.0.{h} for each of `hosts`, each naming all of them as peers.
fn configure(env: &mut Env, hosts: &[u8], log_keep: u64) -> Result<Vec<Node>> {
    let peers = hosts
        .iter()
        .map(|&h| Ok((format!("node{h}"), env.free_port(h)?)))
        .collect::<Result<Vec<_>>>()?;
    hosts
        .iter()
        .map(|&h| {
            let name = format!("node{h}");
            let dir = env.path(&name);
            let socket = dir.join("stickd.sock");
            let text = configs::Stickd {
                log_keep: Some(log_keep),
                peers: peers.clone(),
                // Big enough that no run evicts.
                tables: vec![configs::stickd::Table::string(TABLE, 32, "4m", "10m")],
                ..configs::Stickd::new(dir.join("data"), socket.clone())
            }
            .render();
            let config = env.write(&format!("{name}/stickd.toml"), &text)?;
            Ok(Node {
                name,
                dir,
                socket,
                config,
                proc: None,
            })
        })
        .collect()
}

fn items(tag: u8, range: std::ops::Range<usize>) -> Vec<pb::StoreItem> {
    range
        .map(|i| pb::StoreItem {
            key: format!("{}{i}", tag as char),
            server: format!("app{}", i % 4 + 1),
            expires_unix_ms: 0,
        })
        .collect()
}

/// What a writer run did: keys `{tag}0..{tag}{n}`, and when each batch's reply came.
struct Written {
    n: usize,
    started: Instant,
    elapsed: Duration,
    /// (first index, reply time) of every batch.
    replies: Vec<(usize, usize, Instant)>,
}

impl Written {
    fn reply_times(&self) -> Vec<Option<Instant>> {
        let mut at = vec![None; self.n];
        for &(first, len, t) in &self.replies {
            for slot in at.iter_mut().skip(first).take(len) {
                *slot = Some(t);
            }
        }
        at
    }
}

/// Stores batches of fresh keys on `node` from `WRITERS` tasks until `count` keys or `dur`.
async fn saturate(node: &Node, tag: u8, count: usize, dur: Duration) -> Result<Written> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let mut c = node.client().await?;
        let next = next.clone();
        tasks.spawn(async move {
            let mut replies = Vec::new();
            // Checked before a batch is claimed, so that claimed batches are exactly the written
            // ones and the keys written are 0..n without holes.
            while started.elapsed() < dur {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let end = (first + BATCH).min(count);
                c.store(pb::StoreRequest {
                    table: TABLE.into(),
                    items: items(tag, first..end),
                })
                .await
                .context("Store")?;
                replies.push((first, end - first, Instant::now()));
            }
            anyhow::Ok(replies)
        });
    }
    let mut replies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        replies.extend(r.context("writer task")??);
    }
    let n = replies.iter().map(|r| r.1).sum();
    let last = replies.iter().map(|r| r.2).max().unwrap_or(started);
    Ok(Written {
        n,
        started,
        elapsed: last - started,
        replies,
    })
}

/// One writer sending `PACED_BATCH` keys every millisecond for `dur`.
async fn paced(node: &Node, tag: u8, dur: Duration) -> Result<Written> {
    let mut c = node.client().await?;
    let started = Instant::now();
    let period = Duration::from_secs_f64(PACED_BATCH as f64 / PACED_RATE as f64);
    // Burst (the default): a late tick is made up, so the average rate stays the offered one.
    let mut tick = tokio::time::interval(period);
    let mut replies = Vec::new();
    let mut n = 0;
    while started.elapsed() < dur {
        tick.tick().await;
        c.store(pb::StoreRequest {
            table: TABLE.into(),
            items: items(tag, n..n + PACED_BATCH),
        })
        .await
        .context("Store")?;
        replies.push((n, PACED_BATCH, Instant::now()));
        n += PACED_BATCH;
    }
    Ok(Written {
        n,
        started,
        elapsed: started.elapsed(),
        replies,
    })
}

/// Arrivals seen by a Watch stream on one node: (tag, index, when).
#[derive(Default)]
struct Seen {
    arrivals: Vec<(u8, u32, Instant)>,
    per_tag: HashMap<u8, usize>,
    error: Option<String>,
}

/// Opens a Watch on `node`, waits for its snapshot to end, then records every change in the
/// background until the stream ends (the node stops or the bench drops the runtime's task).
async fn watch(node: &Node) -> Result<Arc<Mutex<Seen>>> {
    let mut c = node.client().await?;
    let mut stream = c
        .watch(pb::WatchRequest {
            tables: vec![TABLE.into()],
        })
        .await
        .with_context(|| format!("Watch on {}", node.name))?
        .into_inner();
    loop {
        match stream.message().await?.and_then(|e| e.event) {
            Some(pb::watch_event::Event::SnapshotEnd(_)) => break,
            Some(_) => {}
            None => bail!("watch on {} ended before its snapshot did", node.name),
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(e) => {
                    lock(&seen).error = Some(e.to_string());
                    return;
                }
            };
            let Some(pb::watch_event::Event::Changes(b)) = ev.event else {
                continue;
            };
            let now = Instant::now();
            let mut s = lock(&seen);
            for e in b.entries {
                let Some((&tag, idx)) = e.key.as_bytes().split_first() else {
                    continue;
                };
                let Some(idx) = std::str::from_utf8(idx)
                    .ok()
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                s.arrivals.push((tag, idx, now));
                *s.per_tag.entry(tag).or_default() += 1;
            }
        }
    });
    Ok(out)
}

fn lock(m: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until every watcher has seen `n` updates tagged `tag`; returns the last arrival overall.
async fn drained(watchers: &[Arc<Mutex<Seen>>], tag: u8, n: usize) -> Result<Instant> {
    let deadline = Instant::now() + DRAIN;
    loop {
        let mut done = true;
        for w in watchers {
            let s = lock(w);
            if let Some(e) = &s.error {
                bail!("a watch stream failed: {e}");
            }
            done &= s.per_tag.get(&tag).copied().unwrap_or(0) >= n;
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            let counts: Vec<usize> = watchers
                .iter()
                .map(|w| lock(w).per_tag.get(&tag).copied().unwrap_or(0))
                .collect();
            bail!("replication did not deliver {n} updates within {DRAIN:?}: peers saw {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(watchers
        .iter()
        .filter_map(|w| {
            lock(w)
                .arrivals
                .iter()
                .filter(|a| a.0 == tag)
                .map(|a| a.2)
                .max()
        })
        .max()
        .unwrap_or_else(Instant::now))
}

/// p50 and p99 of the lags (ms) of every update tagged `tag` on every watcher.
fn lags(watchers: &[Arc<Mutex<Seen>>], tag: u8, w: &Written) -> (f64, f64) {
    let replies = w.reply_times();
    let mut lags: Vec<f64> = Vec::new();
    for s in watchers {
        let s = lock(s);
        for &(t, idx, at) in &s.arrivals {
            if t != tag {
                continue;
            }
            if let Some(Some(reply)) = replies.get(idx as usize) {
                lags.push(at.saturating_duration_since(*reply).as_secs_f64() * 1000.0);
            }
        }
    }
    (percentile(&mut lags, 0.50), percentile(&mut lags, 0.99))
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    v[i]
}

/// Writes/s on one node with no peers, and stickd's CPU µs per write.
async fn local_writes(dur: Duration) -> Result<(f64, f64)> {
    let mut env = Env::new("bench-stickd-local")?;
    let mut nodes = configure(&mut env, &[1], 1_000_000)?;
    let node = &mut nodes[0];
    node.start(&env)?;
    node.client().await?;
    let cpu0 = stats::cpu_time(node.pid());
    let w = saturate(node, b'l', usize::MAX, dur).await?;
    let cpu = stats::cpu_time(node.pid()) - cpu0;
    ensure!(w.n > 0, "no write went through");
    Ok((
        w.n as f64 / w.elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / w.n as f64,
    ))
}

#[derive(Default)]
struct Replication {
    sat_rate: Vec<f64>,
    sat_write_rate: Vec<f64>,
    sat_p50: Vec<f64>,
    sat_p99: Vec<f64>,
    sat_cpu_sender: Vec<f64>,
    sat_cpu_receiver: Vec<f64>,
    /// CPU µs per update of the three nodes together.
    sat_cpu_all: Vec<f64>,
    paced_rate: Vec<f64>,
    paced_p50: Vec<f64>,
    paced_p99: Vec<f64>,
}

/// Three nodes; writes on node1, watched on node2 and node3: paced, then saturating, per round.
async fn replication(rounds: usize, dur: Duration) -> Result<Replication> {
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

struct Resync {
    n: usize,
    log_keep: u64,
    fill_rate: f64,
    rss_empty: u64,
    disk_origin: u64,
    rss_origin: u64,
    /// Of the last round.
    disk_peer: u64,
    rss_peer: u64,
    /// One per round.
    serving: Vec<Duration>,
    equal: Vec<Duration>,
    /// CPU seconds of node1 (sender) and node2 (receiver) until equal, per round: what the
    /// resync costs whatever else the machine runs.
    cpu_sender: Vec<f64>,
    cpu_receiver: Vec<f64>,
    snapshots_sent: u64,
    entries_sent: u64,
}

/// node1 takes `n` entries while node2 does not exist yet; node2 then starts with an empty
/// data_dir and a log position that node1's trimmed log no longer reaches: a full snapshot.
/// Each further round stops node2, wipes its data_dir and starts it again.
async fn resync(n: usize, rounds: usize) -> Result<Resync> {
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
