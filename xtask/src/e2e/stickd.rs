//! Issue 3's scenarios: three stickd on 127.0.0.1, .2 and .3 replicating stick tables, checked
//! with the real grpcurl and a tonic client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use super::{Outcome, Scenario, figure, ms};
use crate::configs::{self, stickd::Key, stickd::Table};
use crate::harness::{self, Env, Proc};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "stick-15-stores",
            "15 stores spread over 3 nodes: grpcurl Show on each node gives the same 15 keys and servers within 1 s",
            60,
            |env| Box::pin(fifteen_stores(env)),
        ),
        s(
            "stick-kill9-resync",
            "kill -9 one node during 50,000 writes on the others, restart it: identical tables, incremental resync",
            120,
            |env| Box::pin(kill9_resync(env)),
        ),
        s(
            "stick-cluster-restart",
            "kill -9 all three nodes, start them again: every unexpired entry is still there",
            60,
            |env| Box::pin(cluster_restart(env)),
        ),
        s(
            "stick-lww",
            "the same key written at once on two nodes with different servers: all three converge to one value",
            60,
            |env| Box::pin(lww(env)),
        ),
        s(
            "stick-delete-clear",
            "Delete and Clear replicate to every node as tombstones",
            60,
            |env| Box::pin(delete_clear(env)),
        ),
        s(
            "stick-partition",
            "one node cut off for 10 s with writes on both sides, healed: identical tables within 1 s",
            90,
            |env| Box::pin(partition(env)),
        ),
        s(
            "stick-refusal-mismatch",
            "an unknown peer is refused; a table defined differently is reported in ShowPeers and not replicated",
            60,
            |env| Box::pin(refusal_mismatch(env)),
        ),
        s(
            "stick-damaged-data-dir",
            "one node's data_dir damaged while it is down: it exits 65 naming the dir, no crash loop; with --recover-from-peers it moves it aside and refills: grpcurl Show equal on all three",
            90,
            |env| Box::pin(damaged_data_dir(env)),
        ),
        s(
            "stick-expiry",
            "entries with a short expire disappear on every node",
            60,
            |env| Box::pin(expiry(env)),
        ),
    ]
}

/// The tables of every node: the seed's, a big one and a short-lived one with integer keys.
fn tables() -> Vec<Table> {
    vec![
        Table::string("dynamic_group", 32, "5k", "5m"),
        Table::string("bulk", 32, "200k", "10m"),
        Table::integer("short", "1k", "2s"),
    ]
}

const BOOT: Duration = Duration::from_secs(20);

/// One stickd of the cluster.
struct StickNode {
    name: String,
    socket: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl StickNode {
    fn start(&mut self, env: &Env) -> Result<()> {
        let p = env.spawn(
            &self.name,
            harness::release_bin("stickd"),
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

    fn kill9(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill9()?;
        }
        Ok(())
    }

    fn running(&self) -> bool {
        self.proc.is_some()
    }

    async fn client(&self) -> Result<StickClient<Channel>> {
        let socket = self.socket.clone();
        harness::wait_for(&format!("{} to serve", self.name), BOOT, || {
            let socket = socket.clone();
            async move {
                let ch = common::grpc::connect_unix(&socket).await?;
                let mut c = StickClient::new(ch);
                c.list_tables(pb::ListTablesRequest {}).await?;
                Ok(Some(c))
            }
        })
        .await
    }

    /// key -> (server, deleted) of every live entry of `table`, through the tonic client.
    async fn table(&self, table: &str) -> Result<BTreeMap<String, String>> {
        let mut c = self.client().await?;
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let r = c
                .show(pb::ShowRequest {
                    table: table.into(),
                    page_size: 50_000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("Show {table} on {}", self.name))?
                .into_inner();
            out.extend(r.entries.into_iter().map(|e| (e.key, e.server)));
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    /// key -> server through the real grpcurl (the operator's view).
    fn grpcurl_show(&self, table: &str) -> Result<BTreeMap<String, String>> {
        let v = grpcurl(
            self,
            "stick.v1.Stick/Show",
            &format!(r#"{{"table":"{table}"}}"#),
        )?;
        let mut out = BTreeMap::new();
        for e in v["entries"].as_array().into_iter().flatten() {
            out.insert(
                e["key"].as_str().unwrap_or_default().to_owned(),
                e["server"].as_str().unwrap_or_default().to_owned(),
            );
        }
        Ok(out)
    }

    async fn store(&self, table: &str, pairs: &[(String, String)]) -> Result<Vec<pb::Entry>> {
        let items = pairs
            .iter()
            .map(|(k, s)| pb::StoreItem {
                key: k.clone(),
                server: s.clone(),
                expires_unix_ms: 0,
            })
            .collect();
        Ok(self
            .client()
            .await?
            .store(pb::StoreRequest {
                table: table.into(),
                items,
            })
            .await
            .with_context(|| format!("Store on {}", self.name))?
            .into_inner()
            .entries)
    }

    async fn peers(&self) -> Result<pb::ShowPeersReply> {
        Ok(self
            .client()
            .await?
            .show_peers(pb::ShowPeersRequest {})
            .await?
            .into_inner())
    }
}

/// grpcurl on a node's unix socket, `data` being the request as JSON text.
fn grpcurl(node: &StickNode, method: &str, data: &str) -> Result<serde_json::Value> {
    let data: serde_json::Value =
        serde_json::from_str(data).context("a request that is not JSON")?;
    harness::grpcurl(&node.socket, method, Some(&data)).with_context(|| format!("on {}", node.name))
}

struct StickCluster {
    env: Env,
    nodes: Vec<StickNode>,
    addrs: Vec<SocketAddr>,
}

impl StickCluster {
    /// Three nodes on 127.0.0.1-3; node i (1-based) has the stick tables `tables(i)`.
    async fn start(mut env: Env, tables: impl Fn(usize) -> Vec<Table>) -> Result<StickCluster> {
        let addrs = (1..=3u8)
            .map(|i| env.free_port(i))
            .collect::<Result<Vec<_>>>()?;
        let peers: Vec<(String, SocketAddr)> = addrs
            .iter()
            .enumerate()
            .map(|(j, a)| (format!("node{}", j + 1), *a))
            .collect();
        let mut nodes = Vec::new();
        for i in 1..=3usize {
            let name = format!("node{i}");
            let dir = env.path(&name);
            let socket = dir.join("stickd.sock");
            let config = env.write(
                &format!("{name}/stickd.toml"),
                &stickd_config(&dir, &socket, &peers, tables(i)),
            )?;
            nodes.push(StickNode {
                name,
                socket,
                config,
                proc: None,
            });
        }
        for n in &mut nodes {
            n.start(&env)?;
        }
        let c = StickCluster { env, nodes, addrs };
        c.connected().await?;
        Ok(c)
    }

    /// Until every running node pushes to and receives from every other running node.
    async fn connected(&self) -> Result<()> {
        let want = self.nodes.iter().filter(|n| n.running()).count() - 1;
        for n in self.nodes.iter().filter(|n| n.running()) {
            harness::wait_for(
                &format!("{} to connect to its peers", n.name),
                BOOT,
                || async {
                    let p = n.peers().await?;
                    let up = p
                        .peers
                        .iter()
                        .filter(|p| p.state == "connected" && p.inbound_connected)
                        .count();
                    Ok((up >= want).then_some(()))
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Until every running node has applied every other running node's log up to its head
    /// (ShowPeers' received_seq against Stats' head_seq); returns the time since `started`.
    async fn caught_up(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let running: Vec<&StickNode> = self.nodes.iter().filter(|n| n.running()).collect();
            let mut heads = BTreeMap::new();
            for n in &running {
                let s = n
                    .client()
                    .await?
                    .stats(pb::StatsRequest {})
                    .await?
                    .into_inner();
                heads.insert(n.name.clone(), s.head_seq);
            }
            let mut behind = Vec::new();
            for n in &running {
                for q in n.peers().await?.peers {
                    if let Some(&h) = heads.get(&q.name)
                        && q.received_seq < h
                    {
                        behind.push(format!(
                            "{} has {}/{h} of {}",
                            n.name, q.received_seq, q.name
                        ));
                    }
                }
            }
            if behind.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "replication not caught up within {timeout:?}: {}",
                    behind.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Until every running node shows the same `table`; returns it and how long that took.
    async fn converge(
        &self,
        table: &str,
        timeout: Duration,
    ) -> Result<(BTreeMap<String, String>, Duration)> {
        let started = Instant::now();
        loop {
            // Cheap to poll, so the time measured is replication's, not the polling's.
            self.caught_up(timeout).await?;
            let caught_up = started.elapsed();
            let mut views = Vec::new();
            for n in self.nodes.iter().filter(|n| n.running()) {
                views.push(n.table(table).await?);
            }
            if views.windows(2).all(|w| w[0] == w[1]) {
                return Ok((views.swap_remove(0), caught_up));
            }
            if started.elapsed() > timeout {
                let sizes: Vec<usize> = views.iter().map(BTreeMap::len).collect();
                bail!(
                    "table {table} did not converge within {timeout:?}: sizes per node {sizes:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn stickd_config(
    dir: &std::path::Path,
    socket: &std::path::Path,
    peers: &[(String, SocketAddr)],
    tables: Vec<Table>,
) -> String {
    configs::Stickd {
        heartbeat: Some("500ms"),
        peers: peers.to_vec(),
        tables,
        ..configs::Stickd::new(dir.join("data"), socket.to_owned())
    }
    .render()
}

fn pairs(prefix: &str, range: std::ops::Range<usize>, server: &str) -> Vec<(String, String)> {
    range
        .map(|i| (format!("{prefix}{i}"), server.to_owned()))
        .collect()
}

// ---- 1 ----------------------------------------------------------------------------------------

async fn fifteen_stores(env: Env) -> Result<Outcome> {
    let c = StickCluster::start(env, |_| tables()).await?;
    // Like the seed: five requests to each node, each storing a fresh session cookie.
    let mut last_store = Instant::now();
    for (i, node) in c.nodes.iter().enumerate() {
        for j in 0..5 {
            let key = format!("sess{i}{j}-{:08x}", rand::random::<u32>());
            let server = format!("app{}", (i + j) % 2 + 1);
            node.store("dynamic_group", &[(key, server)]).await?;
            last_store = Instant::now();
        }
    }
    let (table, _) = c.converge("dynamic_group", Duration::from_secs(1)).await?;
    let agreed = last_store.elapsed();
    ensure!(table.len() == 15, "expected 15 keys, have {}", table.len());
    figure("agreed after the last store", ms(agreed));
    ensure!(
        agreed < Duration::from_secs(1),
        "took {agreed:?} (allowed: 1 s)"
    );
    // The operator's view, with the real grpcurl, on each node.
    for n in &c.nodes {
        let shown = n.grpcurl_show("dynamic_group")?;
        ensure!(
            shown == table,
            "grpcurl Show on {} differs: {shown:?}",
            n.name
        );
    }
    let v = grpcurl(
        &c.nodes[0],
        "stick.v1.Stick/Show",
        r#"{"table":"dynamic_group"}"#,
    )?;
    figure(
        "node1 header",
        format!(
            "type {} size {} used {}",
            v["table"]["type"], v["table"]["size"], v["table"]["used"]
        ),
    );
    Ok(Outcome::Pass)
}

// ---- 2 ----------------------------------------------------------------------------------------

async fn kill9_resync(env: Env) -> Result<Outcome> {
    let mut c = StickCluster::start(env, |_| tables()).await?;
    let before: Vec<u64> = sent_to(&c, "node3").await?;
    c.nodes[2].kill9()?;
    let started = Instant::now();
    const WRITES: usize = 50_000;
    const BATCH: usize = 500;
    for b in 0..WRITES / BATCH {
        let node = &c.nodes[b % 2];
        node.store(
            "bulk",
            &pairs(&format!("w{b}-"), 0..BATCH, &format!("app{}", b % 3)),
        )
        .await?;
    }
    figure(
        "50,000 writes on node1+node2",
        format!(
            "{:.0} writes/s",
            WRITES as f64 / started.elapsed().as_secs_f64()
        ),
    );
    let restarted = Instant::now();
    c.nodes[2].start(&c.env)?;
    c.nodes[2].client().await?;
    let up = restarted.elapsed();
    let (table, took) = c.converge("bulk", Duration::from_secs(30)).await?;
    ensure!(
        table.len() == WRITES,
        "expected {WRITES} entries, have {}",
        table.len()
    );
    figure("node3 serving after restart", ms(up));
    figure("identical tables after restart", ms(restarted.elapsed()));
    figure("of which resync after serving", ms(took));
    let after = sent_to(&c, "node3").await?;
    let sent: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    figure("entries sent to node3", sent);
    for n in &c.nodes[..2] {
        let p = n.peers().await?;
        let to3 = p
            .peers
            .iter()
            .find(|p| p.name == "node3")
            .context("node3 in ShowPeers")?;
        ensure!(
            to3.snapshots_sent == 0,
            "{} sent node3 a full snapshot",
            n.name
        );
    }
    ensure!(
        sent as usize <= WRITES + 1000,
        "sent {sent} entries for {WRITES} writes: not incremental"
    );
    Ok(Outcome::Pass)
}

/// entries_sent to `peer` by each other node.
async fn sent_to(c: &StickCluster, peer: &str) -> Result<Vec<u64>> {
    let mut v = Vec::new();
    for n in c.nodes.iter().filter(|n| n.name != peer) {
        let p = n.peers().await?;
        v.push(
            p.peers
                .iter()
                .find(|p| p.name == peer)
                .map_or(0, |p| p.entries_sent),
        );
    }
    Ok(v)
}

// ---- 3 ----------------------------------------------------------------------------------------

async fn cluster_restart(env: Env) -> Result<Outcome> {
    let mut c = StickCluster::start(env, |_| tables()).await?;
    for (i, n) in c.nodes.iter().enumerate() {
        n.store(
            "bulk",
            &pairs(&format!("n{i}-"), 0..1000, &format!("app{i}")),
        )
        .await?;
    }
    let (before, _) = c.converge("bulk", Duration::from_secs(5)).await?;
    // Past the durability window (500 ms flush).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in &mut c.nodes {
        n.kill9()?;
    }
    let restarted = Instant::now();
    for n in &mut c.nodes {
        n.start(&c.env)?;
    }
    for n in &c.nodes {
        let t = n.table("bulk").await?;
        ensure!(
            t == before,
            "{} has {} entries after the restart, expected {}",
            n.name,
            t.len(),
            before.len()
        );
    }
    figure("entries kept on every node", before.len());
    figure(
        "all three serving them again after",
        ms(restarted.elapsed()),
    );
    Ok(Outcome::Pass)
}

// ---- 4 ----------------------------------------------------------------------------------------

async fn lww(env: Env) -> Result<Outcome> {
    let c = StickCluster::start(env, |_| tables()).await?;
    let (mut a, mut b) = (c.nodes[0].client().await?, c.nodes[1].client().await?);
    let mut versions = Vec::new();
    for round in 0..50 {
        let key = format!("hot{round}");
        let req = |server: &str| pb::StoreRequest {
            table: "dynamic_group".into(),
            items: vec![pb::StoreItem {
                key: key.clone(),
                server: server.into(),
                expires_unix_ms: 0,
            }],
        };
        let (ra, rb) = tokio::join!(a.store(req("appA")), b.store(req("appB")));
        let (ea, eb) = (ra?.into_inner().entries, rb?.into_inner().entries);
        versions.push((key, ea[0].clone(), eb[0].clone()));
    }
    let (table, took) = c.converge("dynamic_group", Duration::from_secs(2)).await?;
    figure("50 contested keys converged after", ms(took));
    let mut wins = (0, 0);
    for (key, ea, eb) in &versions {
        let expect = if (ea.version, &ea.origin) > (eb.version, &eb.origin) {
            wins.0 += 1;
            "appA"
        } else {
            wins.1 += 1;
            "appB"
        };
        ensure!(
            table.get(key).map(String::as_str) == Some(expect),
            "{key}: expected {expect} (higher HLC version, then peer name), have {:?}",
            table.get(key)
        );
    }
    figure("winners node1/node2", format!("{}/{}", wins.0, wins.1));
    Ok(Outcome::Pass)
}

// ---- 5 ----------------------------------------------------------------------------------------

async fn delete_clear(env: Env) -> Result<Outcome> {
    let c = StickCluster::start(env, |_| tables()).await?;
    c.nodes[0]
        .store("dynamic_group", &pairs("k", 0..10, "app1"))
        .await?;
    c.converge("dynamic_group", Duration::from_secs(1)).await?;
    let r = grpcurl(
        &c.nodes[1],
        "stick.v1.Stick/Delete",
        r#"{"table":"dynamic_group","key":"k3"}"#,
    )?;
    ensure!(r["existed"] == true, "Delete said {r}");
    let (t, took) = c.converge("dynamic_group", Duration::from_secs(1)).await?;
    ensure!(t.len() == 9 && !t.contains_key("k3"), "after Delete: {t:?}");
    figure("Delete on node2 replicated in", ms(took));
    let tomb = grpcurl(
        &c.nodes[2],
        "stick.v1.Stick/Show",
        r#"{"table":"dynamic_group","key":"k3","include_deleted":true}"#,
    )?;
    ensure!(
        tomb["entries"][0]["deleted"] == true,
        "no tombstone on node3: {tomb}"
    );
    let r = grpcurl(
        &c.nodes[2],
        "stick.v1.Stick/Clear",
        r#"{"table":"dynamic_group"}"#,
    )?;
    ensure!(
        harness::json_u64(&r["removed"]) == Some(9),
        "Clear said {r}"
    );
    let (t, took) = c.converge("dynamic_group", Duration::from_secs(1)).await?;
    ensure!(t.is_empty(), "after Clear: {t:?}");
    figure("Clear on node3 replicated in", ms(took));
    for n in &c.nodes {
        ensure!(
            n.grpcurl_show("dynamic_group")?.is_empty(),
            "{} still shows entries",
            n.name
        );
    }
    Ok(Outcome::Pass)
}

// ---- 6 ----------------------------------------------------------------------------------------

/// Four network namespaces made for the scenario: one per node and a bridge between them, so
/// that the cluster's traffic never leaves them. Dropped: the namespaces (and links) go.
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn ip(args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ip")?;
        ensure!(
            out.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Namespaces `<prefix>-br`, `<prefix>-1..3`; node i has 10.251.7.i/24 on a veth whose other
    /// end, `h<i>`, is in the bridge namespace.
    fn create(prefix: &str) -> Result<Netns> {
        let br = format!("{prefix}-br");
        let mut ns = Netns {
            names: vec![br.clone()],
        };
        Self::ip(&["netns", "add", &br])?;
        Self::ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        Self::ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 1..=3 {
            let n = format!("{prefix}-{i}");
            Self::ip(&["netns", "add", &n])?;
            ns.names.push(n.clone());
            let (h, v) = (format!("h{i}"), format!("v{i}"));
            Self::ip(&[
                "-n",
                &br,
                "link",
                "add",
                &h,
                "type",
                "veth",
                "peer",
                "name",
                &v,
                "address",
                &Self::mac(i),
                "netns",
                &n,
            ])?;
            Self::ip(&["-n", &br, "link", "set", &h, "master", "br0", "up"])?;
            Self::ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("10.251.7.{i}/24"),
                "dev",
                &v,
            ])?;
            Self::ip(&["-n", &n, "link", "set", &v, "up"])?;
            Self::ip(&["-n", &n, "link", "set", "lo", "up"])?;
            // Fixed neighbours: after a cut, ARP would retry a lost request only a second later
            // and the healing time would be ARP's, not stickd's.
            for j in (1..=3).filter(|&j| j != i) {
                Self::ip(&[
                    "-n",
                    &n,
                    "neigh",
                    "replace",
                    &format!("10.251.7.{j}"),
                    "lladdr",
                    &Self::mac(j),
                    "dev",
                    &v,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        Ok(ns)
    }

    /// Node i's veth address.
    fn mac(i: usize) -> String {
        format!("02:00:0a:fb:07:{i:02x}")
    }

    fn set_link(&self, node: usize, up: bool) -> Result<()> {
        Self::ip(&[
            "-n",
            &self.names[0],
            "link",
            "set",
            &format!("h{node}"),
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

async fn partition(env: Env) -> Result<Outcome> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(Outcome::Skip("needs root for network namespaces".into()));
    }
    let prefix = format!("stk{}", std::process::id());
    let ns = match Netns::create(&prefix) {
        Ok(ns) => ns,
        Err(e) => {
            return Ok(Outcome::Skip(format!(
                "cannot create network namespaces: {e:#}"
            )));
        }
    };
    let peers: Vec<(String, SocketAddr)> = (1..=3u8)
        .map(|i| {
            (
                format!("node{i}"),
                SocketAddr::from(([10, 251, 7, i], 10000)),
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for i in 1..=3usize {
        let name = format!("node{i}");
        let dir = env.path(&name);
        let socket = dir.join("stickd.sock");
        let config = env.write(
            &format!("{name}/stickd.toml"),
            &stickd_config(&dir, &socket, &peers, tables()),
        )?;
        let mut args: Vec<std::ffi::OsString> =
            vec!["netns".into(), "exec".into(), ns.names[i].clone().into()];
        args.push(harness::release_bin("stickd").into());
        args.extend([
            "--config".into(),
            config.clone().into_os_string(),
            "-L".into(),
            name.clone().into(),
        ]);
        // `ip netns exec` execs stickd, so the process the harness holds is stickd itself.
        let proc = env.spawn(&name, "ip", args)?;
        nodes.push(StickNode {
            name,
            socket,
            config,
            proc: Some(proc),
        });
    }
    let c = StickCluster {
        env,
        nodes,
        addrs: peers.iter().map(|p| p.1).collect(),
    };
    c.connected().await?;
    c.nodes[0]
        .store("bulk", &pairs("before", 0..100, "app1"))
        .await?;
    c.converge("bulk", Duration::from_secs(2)).await?;

    ns.set_link(3, false)?;
    let cut = Instant::now();
    let mut round = 0;
    while cut.elapsed() < Duration::from_secs(10) {
        // Both sides keep writing, including the same keys with different servers.
        c.nodes[0]
            .store("bulk", &pairs(&format!("a{round}-"), 0..50, "app1"))
            .await?;
        c.nodes[1]
            .store("bulk", &pairs(&format!("b{round}-"), 0..50, "app2"))
            .await?;
        c.nodes[2]
            .store("bulk", &pairs(&format!("c{round}-"), 0..50, "app3"))
            .await?;
        c.nodes[0]
            .store("bulk", &pairs("contested", 0..20, "app1"))
            .await?;
        c.nodes[2]
            .store("bulk", &pairs("contested", 0..20, "app3"))
            .await?;
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n3 = c.nodes[2].table("bulk").await?.len();
    let n1 = c.nodes[0].table("bulk").await?.len();
    ensure!(
        n3 < n1,
        "node3 ({n3} entries) was not cut off from node1 ({n1})"
    );
    figure(
        "entries during the cut: node1 / node3",
        format!("{n1} / {n3}"),
    );
    let p = c.nodes[0].peers().await?;
    let to3 = p
        .peers
        .iter()
        .find(|p| p.name == "node3")
        .context("node3")?;
    figure(
        "node1's link to node3 during the cut",
        format!("{} (lag {})", to3.state, to3.lag),
    );

    ns.set_link(3, true)?;
    let healed = Instant::now();
    // `took`: until every node had applied every other's log to its head (then checked equal).
    let (table, took) = c.converge("bulk", Duration::from_secs(5)).await?;
    figure("identical tables after healing", ms(took));
    figure("and compared through Show after", ms(healed.elapsed()));
    figure("entries", table.len());
    ensure!(
        table.len() == 100 + round * 150 + 20,
        "lost writes: {} entries",
        table.len()
    );
    ensure!(
        took <= Duration::from_secs(1),
        "took {took:?} (allowed: 1 s)"
    );
    drop(c);
    drop(ns);
    Ok(Outcome::Pass)
}

// ---- 7 ----------------------------------------------------------------------------------------

async fn refusal_mismatch(env: Env) -> Result<Outcome> {
    // node2 defines dynamic_group with len 64.
    let mut c = StickCluster::start(env, |i| {
        let mut t = tables();
        if i == 2 {
            t[0].key = Key::String { len: 64 };
        }
        t
    })
    .await?;
    harness::wait_for("the mismatch in node1's ShowPeers", BOOT, || async {
        let p = c.nodes[0].peers().await?;
        let to2 = p
            .peers
            .iter()
            .find(|p| p.name == "node2")
            .context("node2")?;
        Ok(to2
            .mismatches
            .iter()
            .find(|m| m.table == "dynamic_group")
            .map(|m| m.reason.clone()))
    })
    .await
    .map(|reason| figure("node1 ShowPeers on node2", reason))?;
    c.nodes[0]
        .store("dynamic_group", &pairs("m", 0..5, "app1"))
        .await?;
    c.nodes[0].store("bulk", &pairs("b", 0..5, "app1")).await?;
    // bulk replicates everywhere; dynamic_group reaches node3 but not node2.
    harness::wait_for("bulk on node2", Duration::from_secs(2), || async {
        Ok((c.nodes[1].table("bulk").await?.len() == 5).then_some(()))
    })
    .await?;
    harness::wait_for("dynamic_group on node3", Duration::from_secs(2), || async {
        Ok((c.nodes[2].table("dynamic_group").await?.len() == 5).then_some(()))
    })
    .await?;
    ensure!(
        c.nodes[1].table("dynamic_group").await?.is_empty(),
        "a table defined differently was replicated to node2"
    );
    let log = c.nodes[0]
        .proc
        .as_ref()
        .map(Proc::log_text)
        .unwrap_or_default();
    ensure!(
        log.contains("table definitions differ"),
        "node1's log does not report the mismatch"
    );

    // An intruder: a fourth stickd calling itself "node9", which no one configured.
    let addr = c.env.free_port(1)?;
    let dir = c.env.path("node9");
    let socket = dir.join("stickd.sock");
    let peers = [("node9".to_owned(), addr), ("node1".to_owned(), c.addrs[0])];
    let text = stickd_config(&dir, &socket, &peers, tables());
    let config = c.env.write("node9/stickd.toml", &text)?;
    let mut intruder = StickNode {
        name: "node9".into(),
        socket,
        config,
        proc: None,
    };
    intruder.start(&c.env)?;
    let err = harness::wait_for("node9 to be refused", BOOT, || async {
        let p = intruder.peers().await?;
        Ok(p.peers
            .iter()
            .find(|p| p.state == "refused")
            .map(|p| p.last_error.clone()))
    })
    .await?;
    figure("node9 was told", &err);
    ensure!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "unexpected refusal: {err}"
    );
    ensure!(
        err.contains("unknown peer 'node9'"),
        "unexpected refusal: {err}"
    );
    intruder.kill9()?;
    c.nodes[0].kill9()?;
    Ok(Outcome::Pass)
}

// ---- 8 ----------------------------------------------------------------------------------------

async fn expiry(env: Env) -> Result<Outcome> {
    let c = StickCluster::start(env, |_| tables()).await?;
    c.nodes[1].store("short", &pairs("", 1..21, "app1")).await?;
    let (t, _) = c.converge("short", Duration::from_secs(1)).await?;
    ensure!(t.len() == 20, "expected 20 entries, have {}", t.len());
    let stored = Instant::now();
    harness::wait_for("expiry on every node", Duration::from_secs(5), || async {
        for n in &c.nodes {
            if !n.table("short").await?.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    figure(
        "gone from Show everywhere after (expire 2s)",
        ms(stored.elapsed()),
    );
    // The sweep (every 100 ms) then drops them from memory and disk: the counters follow.
    harness::wait_for(
        "the sweep on every node",
        Duration::from_secs(1),
        || async {
            for n in &c.nodes {
                let s = n
                    .client()
                    .await?
                    .stats(pb::StatsRequest {})
                    .await?
                    .into_inner();
                let short = s
                    .tables
                    .iter()
                    .find(|t| t.name == "short")
                    .context("short table")?;
                if short.used > 0 || s.expired < 20 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    figure("swept everywhere after", ms(stored.elapsed()));
    Ok(Outcome::Pass)
}

// ---- damaged data_dir ---------------------------------------------------------------------------

async fn damaged_data_dir(env: Env) -> Result<Outcome> {
    let mut c = StickCluster::start(env, |_| tables()).await?;
    for (i, n) in c.nodes.iter().enumerate() {
        n.store(
            "dynamic_group",
            &pairs(&format!("n{i}-"), 0..300, &format!("app{}", i + 1)),
        )
        .await?;
    }
    // Enough for sled's `db` to span several segments: a small one survives a cut as a prefix.
    for b in 0..40 {
        c.nodes[b % 3]
            .store("bulk", &pairs(&format!("b{b}-"), 0..1000, "app1"))
            .await?;
    }
    let (before, _) = c.converge("dynamic_group", Duration::from_secs(5)).await?;
    let (bulk, _) = c.converge("bulk", Duration::from_secs(10)).await?;
    // A clean stop (SIGTERM flushes sled), then half of sled's `db` file goes.
    let mut node3 = c.nodes[2].proc.take().context("node3 runs")?;
    node3.signal(nix::sys::signal::Signal::SIGTERM)?;
    let st = node3.wait_exit(Duration::from_secs(10)).await?;
    ensure!(st.code() == Some(0), "node3 stopped with {st}");
    let data = c.env.path("node3").join("data");
    let db = data.join("db");
    let len = std::fs::metadata(&db)
        .with_context(|| format!("{} after the stop", db.display()))?
        .len();
    // Half of it cut off, and bytes of sled's `conf` flipped: a cut alone is often recovered by
    // sled as a prefix, as after a crash (the peers resend the rest); `conf` has a checksum.
    let mut bytes = std::fs::read(&db)?;
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&db, &bytes)?;
    let conf = data.join("conf");
    let mut bytes = std::fs::read(&conf)?;
    for b in bytes.iter_mut().skip(8).take(12) {
        *b ^= 0x5a;
    }
    std::fs::write(&conf, &bytes)?;
    figure(
        "damage",
        format!("db cut from {len} to {} bytes, conf flipped", len / 2),
    );
    let mut damaged = c.env.spawn(
        "node3-damaged",
        harness::release_bin("stickd"),
        [
            "--config".as_ref(),
            c.nodes[2].config.as_os_str(),
            "-L".as_ref(),
            "node3".as_ref(),
        ],
    )?;
    let st = damaged.wait_exit(Duration::from_secs(15)).await?;
    let said = damaged.log_text();
    ensure!(
        st.code() == Some(65),
        "a damaged data_dir exited with {st}, not 65: {said}"
    );
    ensure!(
        said.contains(&data.display().to_string()) && said.contains("--recover-from-peers"),
        "the message does not name {} and the way out: {said}",
        data.display()
    );
    ensure!(!said.contains("thread '"), "a panic was printed: {said}");
    figure(
        "exit 65, said",
        said.lines().last().unwrap_or_default().trim().to_owned(),
    );
    let recovered = c.env.spawn(
        "node3",
        harness::release_bin("stickd"),
        [
            "--config".as_ref(),
            c.nodes[2].config.as_os_str(),
            "-L".as_ref(),
            "node3".as_ref(),
            "--recover-from-peers".as_ref(),
        ],
    )?;
    c.nodes[2].proc = Some(recovered);
    let started = Instant::now();
    let (after, _) = c.converge("dynamic_group", Duration::from_secs(20)).await?;
    let (bulk_after, _) = c.converge("bulk", Duration::from_secs(20)).await?;
    figure("refilled from the peers in", ms(started.elapsed()));
    ensure!(
        bulk_after == bulk,
        "bulk: node3 has {} entries after recovery, the cluster had {}",
        bulk_after.len(),
        bulk.len()
    );
    ensure!(
        after == before,
        "node3 has {} entries after recovery, the cluster had {}",
        after.len(),
        before.len()
    );
    // The operator's view, with the real grpcurl, on each node.
    for n in &c.nodes {
        let shown = n.grpcurl_show("dynamic_group")?;
        ensure!(
            shown == before,
            "grpcurl Show on {} has {} entries, expected {}",
            n.name,
            shown.len(),
            before.len()
        );
    }
    let log = c.nodes[2]
        .proc
        .as_ref()
        .map(Proc::log_text)
        .unwrap_or_default();
    let moved = log
        .lines()
        .find(|l| l.contains("damaged data_dir moved aside"))
        .context("the move aside was not logged")?;
    figure("logged", moved.trim().to_owned());
    Ok(Outcome::Pass)
}
