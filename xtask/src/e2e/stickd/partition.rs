//! One stickd cut off in its own network namespace, writes on both sides, then healed.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::{StickCluster, StickNode, pairs, stickd_config, tables};
use crate::e2e::{Outcome, figure, ms};
use crate::harness::{self, Env};

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

pub(super) async fn partition(env: Env) -> Result<Outcome> {
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
