//! `cargo xtask demo`: the seed's cluster of load-balancer nodes on 127.0.0.1-N (fdkeeper +
//! stickd + proxyd each, sticky on PHPSESSID) in front of two demo backends, with the commands
//! to try it, until Ctrl-C.

use std::fmt::Write as _;

use anyhow::{Result, ensure};
use tokio::signal::unix::{SignalKind, signal};

use crate::e2e::lb::Lb;
use crate::harness::{self, Env};

pub async fn run(build: bool, nodes: u8) -> Result<()> {
    ensure!((1..=3).contains(&nodes), "--nodes must be 1 to 3");
    // From the start: processes sit in their own groups, so a Ctrl-C must go through us.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let env = Env::new("demo")?;
    let start = async {
        if build {
            println!("building release binaries...");
            tokio::task::spawn_blocking(harness::build_release).await??;
        }
        // The seed's cluster: fdkeeper + stickd + proxyd per node, sticky on PHPSESSID.
        Lb::start_with(env, nodes, Some(())).await
    };
    let lb = tokio::select! {
        r = start => r?,
        _ = int.recv() => return stopped(),
        _ = term.recv() => return stopped(),
    };
    println!("{}", instructions(&lb));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    drop(lb);
    stopped()
}

fn instructions(lb: &Lb) -> String {
    let proxyd = harness::release_bin("proxyd");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ndemo cluster running (files and logs under {})",
        lb.env.dir().display()
    );
    for (name, addr, _) in &lb.backends {
        let _ = writeln!(s, "  backend {name} on {addr}");
    }
    for n in &lb.nodes {
        let _ = writeln!(
            s,
            "  node{} frontend http://{}/  metrics http://{}/metrics  proxyd master pid {}  stickd pid {}\n    proxyd config {}",
            n.host,
            n.frontend,
            n.metrics,
            n.proxyd.pid(),
            n.stickd.pid(),
            n.proxyd_config.display(),
        );
    }
    if let Some(n) = lb.nodes.first() {
        // grpcurl 1.8 sends a unix socket's path as HTTP/2 :authority, which the servers reject;
        // -authority gives it a host name instead. `-unix` takes no value: the socket is the
        // address, and grpcurl parses no flag after it.
        let _ = write!(
            s,
            r#"
try (the seed's test: each curl is a new session, stored on every node):
  for i in 1 2 3 4 5; do curl -s http://{fe}/index.php | head -2; done
  grpcurl -plaintext -authority localhost -unix -d '{{"table":"dynamic_group"}}' {ssock} stick.v1.Stick/Show
  curl -s -b PHPSESSID=<one of the keys> http://{fe}/index.php     # always the same server
  grpcurl -plaintext -authority localhost -unix {padmin} proxyd.v1.Admin/ShowServers
  grpcurl -plaintext -authority localhost -unix -d '{{"backend":"dynamic_group","server":"app1","state":"maint"}}' {padmin} proxyd.v1.Admin/SetServer
  kill -USR2 {master}                     # reload: a new worker generation, no request lost
  {proxyd} reload --config {pconf}
  curl -s http://{metrics}/metrics
  tail -f {dir}/logs/*.log

Ctrl-C stops everything."#,
            fe = n.frontend,
            ssock = n.stickd_socket.display(),
            master = n.proxyd.pid(),
            proxyd = proxyd.display(),
            pconf = n.proxyd_config.display(),
            padmin = n.proxyd_admin.display(),
            metrics = n.metrics,
            dir = lb.env.dir().display(),
        );
    }
    s
}

fn stopped() -> Result<()> {
    println!("stopping...");
    harness::kill_all();
    Ok(())
}
