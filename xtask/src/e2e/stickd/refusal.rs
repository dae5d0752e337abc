//! What stickd refuses: unknown peers, tables defined differently, a damaged data_dir.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::{BOOT, StickCluster, StickNode, pairs, stickd_config, tables};
use crate::configs::stickd::Key;
use crate::e2e::{Outcome, figure, ms};
use crate::harness::{self, Env, Proc};

pub(super) async fn refusal_mismatch(env: Env) -> Result<Outcome> {
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

pub(super) async fn damaged_data_dir(env: Env) -> Result<Outcome> {
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
