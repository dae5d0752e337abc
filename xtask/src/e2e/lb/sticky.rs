//! Sticky traffic: the seed's test, 200 clients, a server down, stickd killed, reloads.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::{FALL, INTER_MS, Lb, TABLE, get};
use crate::cluster;
use crate::e2e::{Outcome, figure};
use crate::harness::{self, Env};

pub(super) async fn seed(env: Env) -> Result<Outcome> {
    let lb = Lb::start(env).await?;
    // Like the seed's curl loop: five cookie-less requests to each node, 0.1 s apart.
    let mut sessions = BTreeMap::new();
    for n in &lb.nodes {
        for _ in 0..5 {
            let r = get(n.frontend, None).await?;
            ensure!(r.status == 200, "node {} answered {}", n.host, r.status);
            let server = r.server.context("a response without a server name")?;
            let cookie = r.set_cookie.context("a new session without a PHPSESSID")?;
            sessions.insert(cookie, server);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ensure!(sessions.len() == 15, "{} distinct sessions", sessions.len());
    let took = lb.converged(&sessions, Duration::from_secs(5)).await?;
    figure(
        "all three tables equal to the 15 sessions after",
        format!("{took:?}"),
    );
    let per_server = sessions.values().filter(|s| *s == "app1").count();
    figure(
        "sessions on app1 / app2",
        format!("{per_server} / {}", 15 - per_server),
    );
    // The operator's view, with the real grpcurl, on every node.
    for n in &lb.nodes {
        let v = harness::grpcurl(
            &n.stickd_socket,
            "stick.v1.Stick/Show",
            Some(&serde_json::json!({ "table": TABLE })),
        )?;
        let shown: BTreeMap<String, String> = v["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["key"].as_str().unwrap_or_default().to_owned(),
                    e["server"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        ensure!(
            shown == sessions,
            "grpcurl Show on node{} differs: {shown:?}",
            n.host
        );
        if n.host == 1 {
            figure(
                "node1 header",
                format!(
                    "table {} type {} size {} used {}",
                    v["table"]["name"], v["table"]["type"], v["table"]["size"], v["table"]["used"]
                ),
            );
        }
    }
    Ok(Outcome::Pass)
}

const CLIENTS: usize = 200;

const ROUNDS: usize = 10;

pub(super) async fn sticky_200(env: Env) -> Result<Outcome> {
    let lb = Lb::start(env).await?;
    let frontends: Vec<SocketAddr> = lb.nodes.iter().map(|n| n.frontend).collect();
    // Each client's first request (to a random node) creates its session.
    let mut first = Vec::new();
    for _ in 0..CLIENTS {
        let fe = frontends[rand::random_range(0..frontends.len())];
        first.push(tokio::spawn(async move { get(fe, None).await }));
    }
    let mut clients: Vec<(String, String)> = Vec::new();
    for t in first {
        let r = t.await??;
        ensure!(r.status == 200, "a first request got {}", r.status);
        clients.push((
            r.set_cookie.context("no PHPSESSID")?,
            r.server.context("no server name")?,
        ));
    }
    let want: BTreeMap<String, String> = clients.iter().cloned().collect();
    ensure!(want.len() == CLIENTS, "{} distinct sessions", want.len());
    // As between two clicks of a user: the sessions reach every node first.
    let took = lb.converged(&want, Duration::from_secs(5)).await?;
    figure("200 sessions on every node after", format!("{took:?}"));

    let moved = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (cookie, server) in clients {
        let frontends = frontends.clone();
        let (moved, failed) = (moved.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let fe = frontends[rand::random_range(0..frontends.len())];
                match get(fe, Some(&cookie)).await {
                    Ok(r) if r.status == 200 => {
                        if r.server.as_deref() != Some(server.as_str()) {
                            moved.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let total = CLIENTS * ROUNDS;
    figure(
        "sticky requests",
        format!(
            "{total} in {:.2}s, {} moved, {} failed",
            started.elapsed().as_secs_f64(),
            moved.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        ),
    );
    ensure!(moved.load(Ordering::Relaxed) == 0, "some clients moved");
    ensure!(failed.load(Ordering::Relaxed) == 0, "some requests failed");
    // No request created a session: the tables hold exactly the 200.
    lb.converged(&want, Duration::from_secs(2)).await?;
    Ok(Outcome::Pass)
}

/// `n` new sessions, each created by a cookie-less request to a random node; waits until
/// every node's table has them all. Returns cookie -> server.
async fn sessions(n: usize, on: &[SocketAddr]) -> Result<Vec<(String, String)>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let fe = on[rand::random_range(0..on.len())];
        tasks.push(tokio::spawn(async move { get(fe, None).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await??;
        ensure!(r.status == 200, "a first request got {}", r.status);
        out.push((
            r.set_cookie.context("no PHPSESSID")?,
            r.server.context("no server name")?,
        ));
    }
    Ok(out)
}

/// Sticky traffic until `stop`: each client sends requests with its cookie to random nodes,
/// 20 ms apart. Counts requests, failures, and answers from another server than `expect(cookie)`.
#[derive(Default)]
struct Traffic {
    requests: AtomicU64,
    failed: AtomicU64,
    moved: AtomicU64,
}

fn sticky_traffic(
    clients: Vec<(String, String)>,
    frontends: Vec<SocketAddr>,
    expect: Arc<std::sync::Mutex<HashMap<String, String>>>,
    stop: tokio_util::sync::CancellationToken,
) -> (Arc<Traffic>, Vec<tokio::task::JoinHandle<()>>) {
    let traffic = Arc::new(Traffic::default());
    let mut tasks = Vec::new();
    for (cookie, _) in clients {
        let (frontends, expect, stop, traffic) = (
            frontends.clone(),
            expect.clone(),
            stop.clone(),
            traffic.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let fe = frontends[rand::random_range(0..frontends.len())];
                let r = get(fe, Some(&cookie)).await;
                traffic.requests.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status == 200 => {
                        let want = expect
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&cookie)
                            .cloned();
                        if want.is_some() && r.server != want {
                            traffic.moved.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(r) => {
                        eprintln!("    {fe}: status {}", r.status);
                        traffic.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("    {fe}: {e:#}");
                        traffic.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    (traffic, tasks)
}

/// Stops the traffic, waits for every client and returns its requests, failures and moves.
async fn finish_traffic(
    stop: &tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    traffic: &Traffic,
) -> Result<(u64, u64, u64)> {
    stop.cancel();
    for t in tasks {
        t.await?;
    }
    Ok((
        traffic.requests.load(Ordering::Relaxed),
        traffic.failed.load(Ordering::Relaxed),
        traffic.moved.load(Ordering::Relaxed),
    ))
}

pub(super) async fn server_down(env: Env) -> Result<Outcome> {
    let mut lb = Lb::start(env).await?;
    let frontends: Vec<SocketAddr> = lb.nodes.iter().map(|n| n.frontend).collect();
    let clients = sessions(60, &frontends).await?;
    let want: BTreeMap<String, String> = clients.iter().cloned().collect();
    lb.converged(&want, Duration::from_secs(5)).await?;
    let on_app1 = clients.iter().filter(|(_, s)| s == "app1").count();
    ensure!(on_app1 > 0, "no session on app1");
    // During the switch, app1's clients may be answered by app1 (before the kill) or app2.
    let expect = Arc::new(std::sync::Mutex::new(
        clients
            .iter()
            .filter(|(_, s)| s == "app2")
            .cloned()
            .collect::<HashMap<_, _>>(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let (traffic, tasks) = sticky_traffic(clients.clone(), frontends, expect.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let killed = Instant::now();
    let app1 = lb
        .backends
        .iter_mut()
        .find(|(n, _, _)| n == "app1")
        .context("no app1")?;
    app1.2.kill9()?;
    // Each node's worker logs the state change.
    let mut down_after = Vec::new();
    for n in &lb.nodes {
        let log = n.proxyd.log_path().to_owned();
        let t = harness::wait_for("app1 to be marked down", Duration::from_secs(10), || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .any(|l| l.contains("server is down") && l.contains("app1"))
                    .then(|| killed.elapsed()))
            }
        })
        .await?;
        down_after.push(t);
    }
    let limit = Duration::from_millis(INTER_MS * u64::from(FALL + 1)) + Duration::from_millis(300);
    figure(
        "app1 marked down after (node1, node2, node3)",
        format!(
            "{down_after:?} (fall x inter = {} ms)",
            INTER_MS * u64::from(FALL)
        ),
    );
    // From now on app1's clients must all be on app2.
    for (c, _) in clients.iter().filter(|(_, s)| s == "app1") {
        expect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.clone(), "app2".into());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (req, failed, moved) = finish_traffic(&stop, tasks, &traffic).await?;
    figure(
        "sticky requests",
        format!(
            "{req}, {failed} failed, {moved} answered by an unexpected server ({on_app1} clients were on app1)"
        ),
    );
    ensure!(failed == 0, "{failed} requests failed");
    ensure!(moved == 0, "{moved} requests went to an unexpected server");
    for (i, d) in down_after.iter().enumerate() {
        ensure!(
            *d <= limit,
            "node{} marked app1 down after {d:?} (allowed {limit:?})",
            i + 1
        );
    }
    let all_app2: BTreeMap<String, String> = want
        .keys()
        .map(|k| (k.clone(), "app2".to_owned()))
        .collect();
    let took = lb.converged(&all_app2, Duration::from_secs(5)).await?;
    figure(
        "every node's table points app1's sessions at app2 after",
        format!("{took:?}"),
    );
    // A new generation starts with app1 known down (from the master), not assumed up.
    let n1 = &lb.nodes[0];
    let before = cluster::serving(&cluster::proxyd_status(&n1.proxyd_admin).await?)
        .context("no serving generation")?;
    n1.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    let (g, _) =
        cluster::wait_new_generation(&n1.proxyd_admin, before.generation, Duration::from_secs(20))
            .await?;
    let first = harness::wait_for(
        "the new generation's first report",
        Duration::from_secs(5),
        || async {
            let v = harness::grpcurl(
                &n1.proxyd_admin,
                "proxyd.v1.Admin/ShowServers",
                Some(&serde_json::json!({})),
            )?;
            let fresh = harness::json_u64(&v["generation"]) == Some(g.generation);
            let servers = v["servers"].as_array().cloned().unwrap_or_default();
            Ok((fresh && !servers.is_empty()).then_some(servers))
        },
    )
    .await?;
    let app1 = first
        .iter()
        .find(|s| s["server"] == "app1")
        .context("no app1")?;
    ensure!(
        app1["health"] == "down",
        "generation {} started with app1 {}",
        g.generation,
        app1["health"]
    );
    figure(
        "after a reload, app1 in the new generation",
        "down from the start",
    );
    Ok(Outcome::Pass)
}

pub(super) async fn stickd_kill9(env: Env) -> Result<Outcome> {
    let mut lb = Lb::start(env).await?;
    let frontends: Vec<SocketAddr> = lb.nodes.iter().map(|n| n.frontend).collect();
    let clients = sessions(50, &frontends).await?;
    let mut want: BTreeMap<String, String> = clients.iter().cloned().collect();
    lb.converged(&want, Duration::from_secs(5)).await?;

    lb.nodes[0].stickd.kill9()?;
    let node1 = lb.nodes[0].frontend;
    // Node1 keeps routing the known sessions from its cache.
    let mut moved = 0;
    for (cookie, server) in &clients {
        let r = get(node1, Some(cookie)).await?;
        ensure!(
            r.status == 200,
            "node1 answered {} with stickd down",
            r.status
        );
        if r.server.as_deref() != Some(server.as_str()) {
            moved += 1;
        }
    }
    ensure!(
        moved == 0,
        "{moved} of {} clients moved while stickd was down",
        clients.len()
    );
    // New sessions on node1 while its stickd is down: node1 itself knows them at once.
    let fresh = sessions(20, &[node1]).await?;
    for (cookie, server) in &fresh {
        for _ in 0..3 {
            let r = get(node1, Some(cookie)).await?;
            ensure!(
                r.status == 200 && r.server.as_deref() == Some(server.as_str()),
                "a new session moved on node1 while stickd was down"
            );
        }
    }
    figure(
        "with stickd down on node1",
        format!(
            "{} known + {} new sessions routed correctly",
            clients.len(),
            fresh.len()
        ),
    );
    // A reload now would start a worker with an empty cache: it is refused, and the running
    // generation keeps routing with its cache.
    let out = std::process::Command::new(harness::release_bin("proxyd"))
        .arg("reload")
        .arg("--config")
        .arg(&lb.nodes[0].proxyd_config)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && said.contains("did not answer"),
        "a reload with stickd down was not refused: {said:?}"
    );
    figure("reload with stickd down", said.trim());
    for (cookie, server) in clients.iter().chain(&fresh) {
        let r = get(node1, Some(cookie)).await?;
        ensure!(
            r.server.as_deref() == Some(server.as_str()),
            "a client moved after the refused reload"
        );
    }
    let back = Instant::now();
    lb.nodes[0].stickd.restart()?;
    want.extend(fresh.iter().cloned());
    let took = lb.converged(&want, Duration::from_secs(15)).await?;
    figure(
        "new sessions on every node after stickd restart",
        format!(
            "{:?} (all {} sessions)",
            back.elapsed().max(took),
            want.len()
        ),
    );
    // And node1's cache routes them all, fed again by the restarted stickd.
    for (cookie, server) in &want {
        let fe = frontends[rand::random_range(0..frontends.len())];
        let r = get(fe, Some(cookie)).await?;
        ensure!(
            r.server.as_deref() == Some(server.as_str()),
            "after the restart a client moved"
        );
    }
    Ok(Outcome::Pass)
}

const RELOADS_PER_NODE: usize = 5;

pub(super) async fn reload_sticky(env: Env) -> Result<Outcome> {
    let lb = Lb::start(env).await?;
    let frontends: Vec<SocketAddr> = lb.nodes.iter().map(|n| n.frontend).collect();
    let clients = sessions(100, &frontends).await?;
    let want: BTreeMap<String, String> = clients.iter().cloned().collect();
    lb.converged(&want, Duration::from_secs(5)).await?;
    let expect = Arc::new(std::sync::Mutex::new(want.clone().into_iter().collect()));
    let stop = tokio_util::sync::CancellationToken::new();
    let (traffic, tasks) = sticky_traffic(clients, frontends, expect, stop.clone());
    let started = Instant::now();
    let mut reloads = 0;
    for _ in 0..RELOADS_PER_NODE {
        for n in &lb.nodes {
            let before = cluster::serving(&cluster::proxyd_status(&n.proxyd_admin).await?)
                .context("no serving generation")?;
            n.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
            cluster::wait_new_generation(
                &n.proxyd_admin,
                before.generation,
                Duration::from_secs(20),
            )
            .await?;
            reloads += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (req, failed, moved) = finish_traffic(&stop, tasks, &traffic).await?;
    figure(
        "during reloads",
        format!(
            "{reloads} reloads in {:.1}s, {req} sticky requests, {failed} failed, {moved} moved",
            started.elapsed().as_secs_f64()
        ),
    );
    ensure!(failed == 0, "{failed} requests failed");
    ensure!(moved == 0, "{moved} requests reached another server");
    lb.converged(&want, Duration::from_secs(2)).await?;
    Ok(Outcome::Pass)
}
