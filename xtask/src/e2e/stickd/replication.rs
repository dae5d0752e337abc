//! Replication: stores, kill -9 and resync, cluster restart, last writer wins, deletes, expiry.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use proto::stick::v1 as pb;

use super::{StickCluster, grpcurl, pairs, tables};
use crate::e2e::{Outcome, figure, ms};
use crate::harness::{self, Env};

pub(super) async fn fifteen_stores(env: Env) -> Result<Outcome> {
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

pub(super) async fn kill9_resync(env: Env) -> Result<Outcome> {
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

pub(super) async fn cluster_restart(env: Env) -> Result<Outcome> {
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

pub(super) async fn lww(env: Env) -> Result<Outcome> {
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
            omit_entries: false,
            watcher: 0,
            batch: 0,
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

pub(super) async fn delete_clear(env: Env) -> Result<Outcome> {
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

pub(super) async fn expiry(env: Env) -> Result<Outcome> {
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
