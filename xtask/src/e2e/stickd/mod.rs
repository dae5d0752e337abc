//! The replication scenarios: three stickd on 127.0.0.1, .2 and .3 replicating stick tables, checked
//! with the real grpcurl and a tonic client.

mod partition;
mod refusal;
mod replication;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use super::Scenario;
use crate::cluster;
use crate::configs::{self, stickd::Table};
use crate::harness::{self, Env, Proc};
use partition::partition;
use refusal::{damaged_data_dir, refusal_mismatch};
use replication::{cluster_restart, delete_clear, expiry, fifteen_stores, kill9_resync, lww};

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

    /// key -> server of every entry of `table`, through the tonic client.
    async fn table(&self, table: &str) -> Result<BTreeMap<String, String>> {
        let mut c = self.client().await?;
        cluster::stick_table(&mut c, table, 50_000)
            .await
            .with_context(|| format!("on {}", self.name))
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
                omit_entries: false,
                watcher: 0,
                batch: 0,
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
