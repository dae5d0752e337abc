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

/// What the demo prints once the cluster serves.
pub fn instructions(lb: &Lb) -> String {
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
    let commands = try_commands(lb);
    if !commands.is_empty() {
        let _ = writeln!(
            s,
            "\ntry (the seed's test: each curl is a new session, stored on every node):"
        );
        for c in &commands {
            let _ = writeln!(s, "  {}\n      # {}", c.line, c.shows);
        }
    }
    s.push_str("\nCtrl-C stops everything.");
    s
}

/// What a printed command is for (the e2e that runs them checks each by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Try {
    /// Five new sessions: each curl prints a server's greeting and name.
    NewSessions,
    /// The stick table through grpcurl (JSON with every session).
    TableGrpc,
    /// The stick table through `stickd table show`.
    TableCli,
    /// One session's two requests: the same server twice.
    SameServer,
    /// Servers and their state through grpcurl.
    ServersGrpc,
    /// Servers and their state through `proxyd servers`.
    ServersCli,
    /// A server put in maintenance through grpcurl.
    Maint,
    /// The server back to ready through `proxyd set-server`.
    Ready,
    /// SIGUSR2 to the master: a reload, no output.
    Signal,
    /// `proxyd reload`: the new generation's number.
    Reload,
    /// `proxyd status`: generations and workers.
    Status,
    /// Prometheus metrics.
    Metrics,
    /// The end of node1's proxyd log.
    Log,
}

/// One command the demo prints, as an operator would type it.
#[derive(Clone, Debug)]
pub struct TryCommand {
    pub what: Try,
    /// The shell line, printed as is and run as is (`sh -c`) by the e2e.
    pub line: String,
    /// What it shows, printed under it.
    pub shows: &'static str,
}

/// The commands to try on `lb`'s first node, in the order to run them.
pub fn try_commands(lb: &Lb) -> Vec<TryCommand> {
    let Some(n) = lb.nodes.first() else {
        return Vec::new();
    };
    let proxyd = harness::release_bin("proxyd");
    let stickd = harness::release_bin("stickd");
    let (proxyd, stickd) = (proxyd.display(), stickd.display());
    let fe = n.frontend;
    let pconf = n.proxyd_config.display();
    let sconf = n.stickd_config.display();
    let padmin = n.proxyd_admin.display();
    let ssock = n.stickd_socket.display();
    let jar = lb.env.path("cookies");
    let jar = jar.display();
    // grpcurl 1.8 sends a unix socket's path as HTTP/2 :authority, which the servers reject;
    // -authority gives it a host name instead. `-unix` takes no value: the socket is the
    // address, and grpcurl parses no flag after it.
    let grpcurl = "grpcurl -plaintext -authority localhost -unix";
    let c = |what, shows, line: String| TryCommand { what, line, shows };
    vec![
        c(
            Try::NewSessions,
            "five new sessions, each stored on every node",
            format!("for i in 1 2 3 4 5; do curl -s http://{fe}/index.php | head -2; done"),
        ),
        c(
            Try::TableGrpc,
            "the stick table, as HAProxy's `show table`",
            format!(r#"{grpcurl} -d '{{"table":"dynamic_group"}}' {ssock} stick.v1.Stick/Show"#),
        ),
        c(
            Try::TableCli,
            "the same through stickd's own command",
            format!("{stickd} --config {sconf} table show dynamic_group"),
        ),
        c(
            Try::SameServer,
            "a client that keeps its cookie always reaches the same server",
            format!(
                "curl -s -c {jar} http://{fe}/index.php | head -2; curl -s -b {jar} http://{fe}/index.php | head -2"
            ),
        ),
        c(
            Try::ServersGrpc,
            "servers with their health, state and weight",
            format!("{grpcurl} {padmin} proxyd.v1.Admin/ShowServers"),
        ),
        c(
            Try::ServersCli,
            "the same through proxyd's own command",
            format!("{proxyd} --config {pconf} servers"),
        ),
        c(
            Try::Maint,
            "app1 in maintenance: new sessions go to app2, kept across reloads",
            format!(
                r#"{grpcurl} -d '{{"backend":"dynamic_group","server":"app1","state":"maint"}}' {padmin} proxyd.v1.Admin/SetServer"#
            ),
        ),
        c(
            Try::Ready,
            "app1 back to ready",
            format!("{proxyd} --config {pconf} set-server dynamic_group app1 --state ready"),
        ),
        c(
            Try::Signal,
            "reload: a new worker generation, no request lost",
            format!("kill -USR2 {}", n.proxyd.pid()),
        ),
        c(
            Try::Reload,
            "the same, waiting for the new generation to serve",
            format!("{proxyd} --config {pconf} reload"),
        ),
        c(
            Try::Status,
            "the master's generations and workers, and the last reload",
            format!("{proxyd} --config {pconf} status"),
        ),
        c(
            Try::Metrics,
            "Prometheus metrics",
            format!("curl -s http://{}/metrics", n.metrics),
        ),
        c(
            Try::Log,
            "node1's proxyd log (tail -f to follow)",
            format!("tail -n 5 {}", n.proxyd.log_path().display()),
        ),
    ]
}

fn stopped() -> Result<()> {
    println!("stopping...");
    harness::kill_all();
    Ok(())
}
