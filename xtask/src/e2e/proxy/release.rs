//! Reload scenarios about what a generation leaves behind: a bind dropped from proxyd.toml is
//! closed in fdkeeper, and a crashed old generation is never run with a binary it did not start with.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::proxyd::v1::{GenerationState, StatusReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{exe_inode, install_new_build, private_proxyd, start_load};
use crate::cluster::{self, Node, NodeOptions};
use crate::e2e::{Outcome, Scenario, ensure_no_failures, figure, ms, print_load};
use crate::harness::{self, Env};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "reload-drop-bind",
            "a reload that drops a bind: fdkeeper closes it (refused, gone from ListListeners, logged) while the kept bind serves with 0 failed requests; accepted connections on it are served; re-adding it serves again",
            120,
            |env| Box::pin(reload_drop_bind(env)),
        ),
        s(
            "upgrade-old-generation-crash",
            "binary upgrade on disk: a crashed serving worker comes back with its own binary; a kill -9 of the draining old generation is not respawned at all; 0 failed requests",
            120,
            |env| Box::pin(upgrade_old_generation_crash(env)),
        ),
    ]
}

/// Rewrites the frontend's `bind = [...]` line of the node's proxyd.toml and reloads; returns
/// the new serving generation and when it was seen serving.
async fn reload_with_binds(
    node: &Node,
    binds: &[SocketAddr],
    after: u64,
) -> Result<(cluster::ServingGeneration, Instant)> {
    let text = std::fs::read_to_string(&node.proxyd_config)?;
    let list: Vec<String> = binds.iter().map(|a| format!("\"{a}\"")).collect();
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("bind = ") {
                found = true;
                format!("bind = [{}]", list.join(", "))
            } else {
                l.to_owned()
            }
        })
        .collect();
    ensure!(found, "no bind line in {}", node.proxyd_config.display());
    std::fs::write(&node.proxyd_config, lines.join("\n") + "\n")?;
    node.proxyd.signal(Signal::SIGUSR2)?;
    cluster::wait_new_generation(&node.proxyd_admin, after, Duration::from_secs(20))
        .await
        .with_context(|| format!("no new generation after reloading with binds {list:?}"))
}

/// One request on an open connection; returns the status line and whether the response
/// said `Connection: close`.
async fn request_on(conn: &mut TcpStream) -> Result<(String, bool)> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: e2e\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let fut = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("response without content-length")?;
                if buf.len() >= end + 4 + length {
                    let status = head.lines().next().unwrap_or_default().to_owned();
                    let close = head.lines().any(|l| l == "connection: close");
                    return anyhow::Ok((status, close));
                }
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before a full response");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("no response within 5s")?
}

/// Whether a fresh connection to `addr` is refused (RST), as opposed to accepted or hanging.
async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn generation(st: &StatusReply, number: u64) -> Option<&proto::proxyd::v1::Generation> {
    st.generations.iter().find(|g| g.generation == number)
}

fn fdkeeper_holds(node: &Node, addr: SocketAddr) -> Result<Option<u64>> {
    Ok(cluster::fdkeeper_inodes(&node.fdkeeper_admin)?
        .into_iter()
        .find(|(a, _)| *a == addr.to_string())
        .map(|(_, inode)| inode))
}

async fn reload_drop_bind(mut env: Env) -> Result<Outcome> {
    let node = Node::start(
        &mut env,
        NodeOptions {
            backend_delay: Duration::from_millis(1),
            drain_timeout: "20s",
            ..NodeOptions::default()
        },
    )
    .await?;
    let a = node.frontend;
    let b = env.free_port(1)?;
    let first = cluster::serving(&node.status().await?).context("no serving generation")?;
    let inode_a = fdkeeper_holds(&node, a)?.context("fdkeeper does not hold A")?;

    // 1. Bind A and B.
    let (with_b, _) = reload_with_binds(&node, &[a, b], first.generation).await?;
    cluster::probe(b, Duration::from_secs(5))
        .await
        .context("B does not serve after the reload that added it")?;
    let inode_b = fdkeeper_holds(&node, b)?.context("fdkeeper does not hold B")?;
    figure(
        "binds",
        format!(
            "A {a} (inode {inode_a}), B {b} (inode {inode_b}), generation {}",
            with_b.generation
        ),
    );

    // Bounded load on A for the whole scenario.
    let load = start_load(&node).await?;
    // A keep-alive connection on B, accepted by this generation: it must be served to the end.
    let mut kept = TcpStream::connect(b).await?;
    let (status, _) = request_on(&mut kept).await?;
    ensure!(status.starts_with("http/1.1 200"), "B answered {status}");

    // 2. Reload without B.
    let fdk_log_before = node.fdkeeper.log_text().len();
    let (without_b, served) = reload_with_binds(&node, &[a], with_b.generation).await?;
    let refused_after = loop {
        if refused(b).await {
            break served.elapsed();
        }
        if served.elapsed() > Duration::from_secs(5) {
            bail!(
                "B still accepts connections 5s after generation {} serves",
                without_b.generation
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let st = node.status().await?;
    let old_state = generation(&st, with_b.generation).map(|g| g.state);
    figure(
        "B refused",
        format!(
            "{} after generation {} served (generation {} then: {})",
            ms(refused_after),
            without_b.generation,
            with_b.generation,
            match old_state {
                Some(s) if s == GenerationState::Draining as i32 =>
                    "draining, held by our open connection",
                Some(_) => "still there, not draining",
                None => "gone",
            }
        ),
    );
    ensure!(
        old_state == Some(GenerationState::Draining as i32),
        "generation {} should still be draining (we hold a connection open on it)",
        with_b.generation
    );
    ensure!(
        fdkeeper_holds(&node, b)?.is_none(),
        "ListListeners still shows B"
    );
    let log = node.fdkeeper.log_text();
    let closed_line = log
        .get(fdk_log_before..)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("closed listener") && l.contains(&b.to_string()))
        .with_context(|| format!("fdkeeper logged no close of {b}"))?
        .to_owned();
    figure("fdkeeper logged", closed_line.trim());

    // The connection the old generation accepted on B is still served (and told to close).
    let (status, close) = request_on(&mut kept).await?;
    figure(
        "request on the kept connection to B after the close",
        format!("{status}, connection: close {close}"),
    );
    ensure!(
        status.starts_with("http/1.1 200"),
        "kept connection got {status}"
    );
    ensure!(
        close,
        "a draining generation answers with Connection: close"
    );
    drop(kept);

    // The old generation exits; B stays refused, A is the same socket.
    let admin = node.proxyd_admin.clone();
    let old = with_b.generation;
    let t = Instant::now();
    harness::wait_for(
        "the old generation to exit",
        Duration::from_secs(25),
        || {
            let admin = admin.clone();
            async move {
                let st = cluster::proxyd_status(&admin).await?;
                Ok(generation(&st, old).is_none().then_some(()))
            }
        },
    )
    .await?;
    figure(
        "old generation exited",
        format!("{} after its connections closed", ms(t.elapsed())),
    );
    ensure!(
        refused(b).await,
        "B accepts again after the old generation exited"
    );
    ensure!(
        fdkeeper_holds(&node, a)? == Some(inode_a),
        "A is no longer the original socket"
    );

    // 3. Re-add B: served again (a fresh socket: the old one is gone).
    let (readded, _) = reload_with_binds(&node, &[a, b], without_b.generation).await?;
    cluster::probe(b, Duration::from_secs(5))
        .await
        .context("B does not serve after being re-added")?;
    let inode_b2 = fdkeeper_holds(&node, b)?.context("fdkeeper does not hold B again")?;
    figure(
        "B re-added",
        format!(
            "generation {}, inode {inode_b2} (was {inode_b})",
            readded.generation
        ),
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    Ok(Outcome::Pass)
}

/// Pids of the master's children whose binary is the file with inode `inode`.
fn workers_running(master: u32, inode: u64) -> Vec<u32> {
    harness::descendants(master)
        .into_iter()
        .filter(|&p| exe_inode(p).ok() == Some(inode))
        .collect()
}

async fn upgrade_old_generation_crash(mut env: Env) -> Result<Outcome> {
    let bin = private_proxyd(&env)?;
    let node = Node::start(
        &mut env,
        NodeOptions {
            proxyd_binary: Some(bin.clone()),
            backend_delay: Duration::from_millis(1),
            drain_timeout: "20s",
            ..NodeOptions::default()
        },
    )
    .await?;
    let master = node.proxyd.pid();
    let first = cluster::serving(&node.status().await?).context("no serving generation")?;
    let old_inode = exe_inode(first.pid)?;

    // 1. A new build on disk, no reload yet: a crash of the serving worker brings back the
    // binary that generation runs, not the untried file at the path.
    let new_inode = install_new_build(&bin)?;
    ensure!(new_inode != old_inode, "the new build has the old inode");
    kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL)?;
    let admin = node.proxyd_admin.clone();
    let respawned = harness::wait_for("a respawned worker", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)
                .filter(|s| s.pid != first.pid))
        }
    })
    .await?;
    let respawned_inode = exe_inode(respawned.pid)?;
    figure(
        "respawn before any reload",
        format!(
            "generation {} worker {} -> {}, exe inode {respawned_inode} (started with {old_inode}, on disk now {new_inode})",
            first.generation, first.pid, respawned.pid
        ),
    );
    ensure!(
        respawned.generation == first.generation,
        "the respawn is a new generation"
    );
    ensure!(
        respawned_inode == old_inode,
        "the respawned worker runs inode {respawned_inode}, not its generation's binary {old_inode}"
    );

    // 2. Under load (the kill above lost what was in flight; this part must lose nothing):
    // reload, the new generation runs the new file; the old one drains, held open by an idle
    // keep-alive connection, and is killed -9 while draining.
    let load = start_load(&node).await?;
    let mut kept = TcpStream::connect(node.frontend).await?;
    let (status, _) = request_on(&mut kept).await?;
    ensure!(status.starts_with("http/1.1 200"), "answered {status}");
    node.proxyd.signal(Signal::SIGUSR2)?;
    let (new, _) = cluster::wait_new_generation(
        &node.proxyd_admin,
        first.generation,
        Duration::from_secs(20),
    )
    .await?;
    ensure!(
        exe_inode(new.pid)? == new_inode,
        "the new generation does not run the new file"
    );
    // Kill only once the old worker holds nothing but our idle connection, so that the load's
    // requests are not what dies with it.
    let old_gen = first.generation;
    let old = harness::wait_for(
        "the old generation to hold only the idle connection",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let st = cluster::proxyd_status(&admin).await?;
                // A worker reports its counts every 250 ms: only a report sent after the
                // drain began (when the load's connections can only go) is believed.
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                Ok(generation(&st, old_gen)
                    .filter(|g| g.state == GenerationState::Draining as i32)
                    .filter(|g| now_ms - g.draining_since_unix_ms >= 400)
                    .and_then(|g| g.worker.clone())
                    .filter(|w| w.active_connections <= 1 && w.requests_in_flight == 0))
            }
        },
    )
    .await?;
    ensure!(
        old.pid == respawned.pid,
        "the draining worker is not the one we know"
    );
    let log_before = node.proxyd.log_text().len();
    kill(Pid::from_raw(old.pid as i32), Signal::SIGKILL)?;
    let killed = Instant::now();
    // Watch for a while: no worker of the old generation, with either binary, comes back.
    let mut seen = Vec::new();
    while killed.elapsed() < Duration::from_secs(2) {
        let st = node.status().await?;
        if let Some(w) = generation(&st, old_gen)
            .and_then(|g| g.worker.as_ref())
            .filter(|w| w.pid != old.pid && w.pid != 0)
        {
            seen.push(format!("generation {old_gen} worker {} in Status", w.pid));
        }
        for p in workers_running(master, old_inode) {
            seen.push(format!("pid {p} runs the old binary"));
        }
        let olds = harness::descendants(master)
            .into_iter()
            .filter(|&p| p != new.pid && harness::pid_alive(p))
            .filter(|&p| exe_inode(p).is_ok_and(|i| i == new_inode))
            .count();
        if olds > 0 {
            seen.push(format!("{olds} other worker(s) run the new binary"));
        }
        if !seen.is_empty() {
            bail!("the draining generation came back: {}", seen.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = node.status().await?;
    let log = node.proxyd.log_text();
    let line = log
        .get(log_before..)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("not respawned"))
        .unwrap_or("(no log line)")
        .to_owned();
    figure(
        "kill -9 of the draining generation",
        format!(
            "generation {old_gen} worker {}: not respawned within 2s; generations now {:?}",
            old.pid,
            st.generations
                .iter()
                .map(|g| g.generation)
                .collect::<Vec<_>>()
        ),
    );
    figure("master logged", line.trim());
    ensure!(
        generation(&st, old_gen).is_none(),
        "generation {old_gen} is still listed"
    );
    ensure!(
        cluster::serving(&st).map(|s| s.pid) == Some(new.pid),
        "the new generation's worker changed"
    );
    drop(kept);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    Ok(Outcome::Pass)
}
