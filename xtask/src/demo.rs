//! `cargo xtask demo`: one node (fdkeeper, proxyd, two demo backends) on loopback, with the
//! commands to try it, until Ctrl-C.

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};

use crate::cluster::{Node, NodeOptions};
use crate::harness::{self, Env};

pub async fn run(build: bool) -> Result<()> {
    // From the start: processes sit in their own groups, so a Ctrl-C must go through us.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut env = Env::new("demo")?;
    let start = async {
        if build {
            println!("building release binaries...");
            tokio::task::spawn_blocking(harness::build_release).await??;
        }
        Node::start(
            &mut env,
            NodeOptions {
                preferred_ports: Some((8080, 9001)),
                ..NodeOptions::default()
            },
        )
        .await
    };
    let node = tokio::select! {
        node = start => node?,
        _ = int.recv() => return stopped(),
        _ = term.recv() => return stopped(),
    };
    let proxyd = harness::release_bin("proxyd");
    let fdkeeper = harness::release_bin("fdkeeper");
    let backends: Vec<String> = node
        .backends
        .iter()
        .map(|(n, a, _)| format!("{n} on {a}"))
        .collect();
    println!(
        r#"
demo node running (files and logs under {dir})
  backends: {backends}
  proxyd master pid {master}, config {pconf}
  fdkeeper pid {fpid}, config {fconf}

try:
  curl -si http://{fe}/                      # round robin: app1, app2, ...; a new PHPSESSID each time
  curl -si -b PHPSESSID=abc http://{fe}/index.php
  kill -USR2 {master}                         # reload: a new worker generation, no request lost
  {proxyd} reload --config {pconf}
  grpcurl -plaintext -authority localhost -unix {padmin} list
  grpcurl -plaintext -authority localhost -unix {padmin} proxyd.v1.Admin/Status
  grpcurl -plaintext -authority localhost -unix {fadmin} fdkeeper.v1.Admin/ListListeners
  {fdkeeper} list --socket {fsock}
  tail -f {dir}/logs/*.log

Ctrl-C stops everything."#,
        dir = env.dir().display(),
        backends = backends.join(", "),
        master = node.proxyd.pid(),
        pconf = node.proxyd_config.display(),
        fpid = node.fdkeeper.pid(),
        fconf = node.fdkeeper_config.display(),
        fe = node.frontend,
        proxyd = proxyd.display(),
        padmin = node.proxyd_admin.display(),
        fadmin = node.fdkeeper_admin.display(),
        fdkeeper = fdkeeper.display(),
        fsock = node.fdkeeper_socket.display(),
    );
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    drop(node);
    stopped()
}

fn stopped() -> Result<()> {
    println!("stopping...");
    harness::kill_all();
    Ok(())
}
