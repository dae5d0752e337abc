//! WebSocket through reloads with a real client and server (Python's `websockets`, ws.py): the
//! tunnels of a draining generation keep echoing until its `drain_timeout`, then each side gets
//! a close frame, 1001 (going away).

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Outcome, Scenario, figure};
use crate::cluster::{self, Node, NodeOptions, START_TIMEOUT};
use crate::harness::{self, Env};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new(
        "websocket",
        "50 WebSocket tunnels (Python websockets client and echo server) echo through 20 reloads; none closes before drain_timeout, then each gets a close frame 1001",
        60,
        |env| Box::pin(websocket(env)),
    )]
}

const TUNNELS: usize = 50;
const RELOADS: usize = 20;
const RELOAD_EVERY: Duration = Duration::from_millis(250);
/// The draining generation's deadline (`drain_timeout`, and in seconds): long enough for the
/// reloads on a loaded machine.
const DRAIN: &str = "20s";
const DRAIN_S: u64 = 20;
/// How much earlier than the deadline a close may be seen (clocks read in two processes).
const EARLY: f64 = 0.3;
/// How much later than the deadline every tunnel must have closed.
const LATE: f64 = 5.0;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Why ws.py cannot run here, if it cannot.
async fn missing_websockets() -> Option<String> {
    let out = tokio::process::Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .stdin(Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => None,
        Ok(_) => {
            Some("python3 has no `websockets` (13 or later): pip install websockets".to_owned())
        }
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// What ws.py's clients report of one tunnel.
#[derive(Debug, serde::Deserialize)]
struct Tunnel {
    tunnel: usize,
    echoes: u64,
    last_echo_at: Option<f64>,
    closed_at: Option<f64>,
    code: Option<u16>,
    error: Option<String>,
}

async fn websocket(mut env: Env) -> Result<Outcome> {
    if let Some(why) = missing_websockets().await {
        return Ok(Outcome::Skip(why));
    }
    let script = env.write("ws.py", include_str!("ws.py"))?;
    let server = env.free_port(2)?;
    let _server = env.spawn(
        "ws-server",
        "python3",
        [
            script.as_os_str(),
            "serve".as_ref(),
            server.ip().to_string().as_ref(),
            server.port().to_string().as_ref(),
        ],
    )?;
    harness::wait_tcp(server, START_TIMEOUT).await?;
    let node = Node::start(
        &mut env,
        NodeOptions {
            servers: Some(vec![("ws".to_owned(), server)]),
            drain_timeout: DRAIN,
            // Every reload leaves a draining generation: none may be stopped early for that.
            max_draining: 64,
            ..NodeOptions::default()
        },
    )
    .await?;

    let mut clients = tokio::process::Command::new("python3")
        .arg(&script)
        .arg("clients")
        .arg(format!("ws://{}/chat", node.frontend))
        .arg(TUNNELS.to_string())
        .arg((DRAIN_S + 20).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run ws.py clients")?;
    let mut lines = BufReader::new(clients.stdout.take().context("no stdout")?).lines();
    let opened = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await? {
            if l == format!("open {TUNNELS}") {
                return anyhow::Ok(());
            }
            if l.starts_with('{') {
                bail!("a tunnel ended before all were open: {l}");
            }
        }
        bail!("ws.py clients ended before opening every tunnel")
    })
    .await
    .context("the tunnels did not all open within 20 s")?;
    opened?;
    figure("tunnels open", TUNNELS);

    // The first reload starts the drain of the generation that holds every tunnel.
    let mut generation = node.wait_serving(START_TIMEOUT).await?.generation;
    let asked = unix_now();
    let mut drain_seen = 0.0;
    for i in 0..RELOADS {
        node.proxyd.signal(Signal::SIGUSR2)?;
        let (g, _) =
            cluster::wait_new_generation(&node.proxyd_admin, generation, START_TIMEOUT).await?;
        generation = g.generation;
        if i == 0 {
            drain_seen = unix_now();
        }
        // Spread over seconds, so that the tunnels carry messages between the reloads.
        tokio::time::sleep(RELOAD_EVERY).await;
    }
    let reloads_done = unix_now();
    figure(
        "reloads",
        format!("{RELOADS} in {:.1}s", reloads_done - asked),
    );
    ensure!(
        reloads_done < asked + DRAIN_S as f64,
        "the {RELOADS} reloads took {:.1}s, past the drain deadline",
        reloads_done - asked
    );

    let mut tunnels = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(DRAIN_S + 10), async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with('{') {
                tunnels.push(serde_json::from_str::<Tunnel>(&l).with_context(|| l.clone())?);
            }
        }
        anyhow::Ok(())
    })
    .await;
    let output = clients.wait_with_output().await?;
    ended.context("ws.py clients did not end")??;
    ensure!(
        tunnels.len() == TUNNELS,
        "{} tunnels reported, not {TUNNELS}; ws.py said: {}",
        tunnels.len(),
        String::from_utf8_lossy(&output.stderr)
    );

    let deadline_from = asked + DRAIN_S as f64;
    let deadline_to = drain_seen + DRAIN_S as f64;
    let mut first_close = f64::MAX;
    let mut last_close = 0.0f64;
    for t in &tunnels {
        let n = t.tunnel;
        ensure!(t.error.is_none(), "tunnel {n}: {:?}", t.error);
        let closed = t
            .closed_at
            .with_context(|| format!("tunnel {n} was never closed by the proxy: {t:?}"))?;
        ensure!(
            t.code == Some(1001),
            "tunnel {n} closed with {:?}, not a close frame 1001: {t:?}",
            t.code
        );
        ensure!(
            closed >= deadline_from - EARLY,
            "tunnel {n} closed {:.2}s before drain_timeout",
            deadline_from - closed
        );
        ensure!(
            closed <= deadline_to + LATE,
            "tunnel {n} closed {:.2}s after drain_timeout",
            closed - deadline_to
        );
        ensure!(
            t.last_echo_at.is_some_and(|at| at > reloads_done),
            "tunnel {n} echoed nothing after the last reload: {t:?}"
        );
        first_close = first_close.min(closed);
        last_close = last_close.max(closed);
    }
    let echoes: u64 = tunnels.iter().map(|t| t.echoes).sum();
    figure("echoes", echoes);
    figure(
        "closes (1001) after the first reload",
        format!(
            "{:.2}s to {:.2}s (drain_timeout {DRAIN_S}s)",
            first_close - asked,
            last_close - asked
        ),
    );
    Ok(Outcome::Pass)
}
