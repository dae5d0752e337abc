//! `cargo xtask demo`: a cluster of load-balancer nodes on 127.0.0.1-N (fdkeeper + proxyd each)
//! in front of two demo backends, with the commands to try it, until Ctrl-C.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Result, ensure};
use tokio::signal::unix::{SignalKind, signal};

use crate::cluster::{self, Node, NodeOptions};
use crate::harness::{self, Env};

/// Stable addresses when they are free: frontends on 127.0.0.N:8080, backends on 127.0.0.1:9001+.
const FRONTEND_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9001;

pub async fn run(build: bool, nodes: u8) -> Result<()> {
    ensure!((1..=3).contains(&nodes), "--nodes must be 1 to 3");
    // From the start: processes sit in their own groups, so a Ctrl-C must go through us.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut env = Env::new("demo")?;
    let start = async {
        if build {
            println!("building release binaries...");
            tokio::task::spawn_blocking(harness::build_release).await??;
        }
        let names = vec!["app1".to_owned(), "app2".to_owned()];
        let backends =
            cluster::start_backends(&mut env, &names, 1, Duration::ZERO, Some(BACKEND_PORT))
                .await?;
        let servers: Vec<_> = backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let mut started = Vec::new();
        for host in 1..=nodes {
            let node = Node::start(
                &mut env,
                NodeOptions {
                    host,
                    servers: Some(servers.clone()),
                    preferred_ports: Some((FRONTEND_PORT, BACKEND_PORT)),
                    ..NodeOptions::default()
                },
            )
            .await?;
            started.push(node);
        }
        anyhow::Ok((backends, started))
    };
    let (backends, nodes) = tokio::select! {
        r = start => r?,
        _ = int.recv() => return stopped(),
        _ = term.recv() => return stopped(),
    };
    println!("{}", instructions(&env, &backends, &nodes));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    drop(nodes);
    drop(backends);
    stopped()
}

fn instructions(
    env: &Env,
    backends: &[(String, std::net::SocketAddr, harness::Proc)],
    nodes: &[Node],
) -> String {
    let proxyd = harness::release_bin("proxyd");
    let fdkeeper = harness::release_bin("fdkeeper");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ndemo cluster running (files and logs under {})",
        env.dir().display()
    );
    for (name, addr, _) in backends {
        let _ = writeln!(s, "  backend {name} on {addr}");
    }
    for (i, n) in nodes.iter().enumerate() {
        let _ = writeln!(
            s,
            "  node{} frontend http://{}/  proxyd master pid {}  fdkeeper pid {}\n    configs {} {}",
            i + 1,
            n.frontend,
            n.proxyd.pid(),
            n.fdkeeper.pid(),
            n.proxyd_config.display(),
            n.fdkeeper_config.display()
        );
    }
    if let Some(n) = nodes.first() {
        // grpcurl 1.8 sends a unix socket's path as HTTP/2 :authority, which the servers reject;
        // -authority gives it a host name instead.
        let _ = write!(
            s,
            r#"
try:
  curl -si http://{fe}/                  # round robin over app1, app2; a new PHPSESSID each time
  curl -si -b PHPSESSID=abc http://{fe}/index.php
  kill -USR2 {master}                     # reload: a new worker generation, no request lost
  {proxyd} reload --config {pconf}
  grpcurl -plaintext -authority localhost -unix {padmin} list
  grpcurl -plaintext -authority localhost -unix {padmin} proxyd.v1.Admin/Status
  grpcurl -plaintext -authority localhost -unix {fadmin} fdkeeper.v1.Admin/ListListeners
  {fdkeeper} list --socket {fsock}
  tail -f {dir}/logs/*.log

Ctrl-C stops everything."#,
            fe = n.frontend,
            master = n.proxyd.pid(),
            proxyd = proxyd.display(),
            pconf = n.proxyd_config.display(),
            padmin = n.proxyd_admin.display(),
            fadmin = n.fdkeeper_admin.display(),
            fdkeeper = fdkeeper.display(),
            fsock = n.fdkeeper_socket.display(),
            dir = env.dir().display(),
        );
    }
    s
}

fn stopped() -> Result<()> {
    println!("stopping...");
    harness::kill_all();
    Ok(())
}
