//! Bench section `stickd`: local writes, replication throughput and lag, full resync of a peer and
//! size per entry, on real stickd release binaries (127.0.0.1..3) driven through the gRPC client.
//!
//! Every time is taken in this process on one clock: a store's reply time comes from the writer
//! task, an update's arrival from a `Watch` stream on the peer, so lag = arrival - reply.
//! `STICKD_BENCH_BIN=/path/to/stickd` runs another build (for before/after comparisons);
//! `STICKD_BENCH_RESYNC_ONLY=1` runs only the resync part and `STICKD_BENCH_RESYNC_ROUNDS=N`
//! resyncs a wiped peer N times (default 3, 1 with `--quick`) against the same origin, for a
//! median.

mod replication;
mod writes;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use super::{Ctx, Section, Table, stats};
use crate::configs;
use crate::harness::{self, Env, Proc};
use replication::{Resync, replication, resync};
use writes::local_writes;

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
