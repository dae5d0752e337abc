//! Issue 4's scenarios: three load-balancer nodes on 127.0.0.1-3 (fdkeeper + stickd + proxyd
//! each, with the seed's sticky config) in front of two demo backends.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Outcome, Scenario, figure};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::stickd::Table;
use crate::configs::{self, proxyd};
use crate::harness::{self, Env, Proc};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "lb-seed",
            "the seed's test: 5 cookie-less requests to each node; grpcurl Show on every node lists the same 15 keys and servers",
            90,
            |env| Box::pin(seed(env)),
        ),
        s(
            "lb-sticky-200",
            "200 clients keeping their cookie, each request to a random node: every client always reaches the same backend",
            120,
            |env| Box::pin(sticky_200(env)),
        ),
        s(
            "lb-server-down",
            "kill app1 under sticky traffic: marked down within fall x inter, its clients move to app2 with no failed request, the table changes on every node",
            120,
            |env| Box::pin(server_down(env)),
        ),
        s(
            "lb-stickd-kill9",
            "kill -9 stickd on node1: node1 keeps routing sticky clients (a reload is refused rather than start with an empty cache); its new sessions reach the peers once stickd is back",
            120,
            |env| Box::pin(stickd_kill9(env)),
        ),
        s(
            "lb-reload-sticky",
            "reloads on every node during sticky traffic: 0 failed requests, 0 clients moved",
            180,
            |env| Box::pin(reload_sticky(env)),
        ),
        s(
            "lb-bad-input",
            "400 malformed/smuggling, 408 slowloris, 431 huge head, 502 garbage server, 503 no server, 504 silent server: each in bounded time, nothing crashes",
            90,
            |env| Box::pin(bad_input(env)),
        ),
        s(
            "lb-admin",
            "grpcurl ShowServers/SetServer (drain, maint, weight) act at once and survive a reload; /metrics reports servers and the stick cache",
            120,
            |env| Box::pin(admin(env)),
        ),
        s(
            "lb-table-refused",
            "a reload whose stick table is missing in stickd, or has an incompatible type, is refused naming the table; the running generation keeps routing",
            90,
            |env| Box::pin(table_refused(env)),
        ),
        s(
            "lb-touch-coalesced",
            "a session busy for 5 s on a table with expire 2s: never expires, and costs about 4 touches per expire instead of one per request",
            60,
            |env| Box::pin(touch_coalesced(env)),
        ),
    ]
}

const TABLE: &str = "dynamic_group";
/// Health checks of the e2e config: a dead server is down within FALL x INTER.
const INTER_MS: u64 = 300;
const FALL: u32 = 2;

/// One load-balancer node.
pub struct LbNode {
    pub host: u8,
    pub stickd: Proc,
    pub stickd_socket: PathBuf,
    pub fdkeeper: Proc,
    pub proxyd: Proc,
    pub frontend: SocketAddr,
    pub proxyd_admin: PathBuf,
    pub metrics: SocketAddr,
    pub proxyd_config: PathBuf,
}

pub struct Lb {
    /// Held: the temp dir with configs, sockets and logs.
    pub env: Env,
    pub backends: Vec<(String, SocketAddr, Proc)>,
    pub nodes: Vec<LbNode>,
}

fn stickd_config(
    dir: &Path,
    socket: &Path,
    peers: &[(String, SocketAddr)],
    expire: &str,
    size: &str,
) -> configs::Stickd {
    configs::Stickd {
        comment: "stickd for an lb e2e node.",
        heartbeat: Some("500ms"),
        flush_interval: Some("100ms"),
        peers: peers.to_vec(),
        tables: vec![Table::string(TABLE, 32, size, expire)],
        ..configs::Stickd::new(dir.join("data"), socket.to_owned())
    }
}

/// The seed's backend (examples/proxyd-seed.toml) with faster checks.
pub fn proxyd_seed_config(
    admin: &Path,
    fdkeeper: &Path,
    stickd: &Path,
    frontend: SocketAddr,
    metrics: SocketAddr,
    servers: &[(String, SocketAddr)],
) -> configs::Proxyd {
    let mut global = proxyd::Global::new(admin, fdkeeper);
    global.stickd_socket = Some(stickd.to_owned());
    global.metrics = Some(metrics);
    global.drain_timeout = Some("10s");
    // SetServer's states outlive a restart of the master (like HAProxy's server-state-file).
    global.server_state_file = Some(admin.with_file_name("server-state"));
    // A new generation waits up to half of this for stickd's snapshot.
    global.worker_ready_timeout = Some("4s");
    proxyd::Seed {
        global,
        frontend,
        table: TABLE,
        timeout_check: "1s",
        check_inter: format!("{INTER_MS}ms"),
        fall: FALL,
        servers,
    }
    .proxyd("proxyd for an lb e2e node: the seed's sticky backend.")
}

impl Lb {
    /// Two backends on 127.0.0.1, three nodes on 127.0.0.1-3, all serving and peered.
    pub async fn start(env: Env) -> Result<Lb> {
        Self::start_with(env, 3, None).await
    }

    /// `nodes` nodes on 127.0.0.1-`nodes`; `stable`: use the demo's well-known ports when free
    /// (frontends :8080, backends :9001+, stickd peers :10000, metrics :9100).
    pub async fn start_with(env: Env, count: u8, stable: Option<()>) -> Result<Lb> {
        Self::start_opts(env, count, stable, "5m").await
    }

    /// Like `start_with`, with the stick table's `expire`.
    pub async fn start_opts(env: Env, count: u8, stable: Option<()>, expire: &str) -> Result<Lb> {
        Self::start_sized(env, count, stable, expire, "5k").await
    }

    /// Like `start_opts`, with the stick table's `size` too (the bench fills tables past 5k).
    pub async fn start_sized(
        mut env: Env,
        count: u8,
        stable: Option<()>,
        expire: &str,
        size: &str,
    ) -> Result<Lb> {
        let port = |p: u16| stable.map(|()| p);
        let names = vec!["app1".to_owned(), "app2".to_owned()];
        let backends =
            cluster::start_backends(&mut env, &names, 1, Duration::ZERO, port(9001)).await?;
        let servers: Vec<(String, SocketAddr)> =
            backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect();
        let peer_addrs = (1..=count)
            .map(|h| env.port_or_free(h, port(10000)))
            .collect::<Result<Vec<_>>>()?;
        let peers: Vec<(String, SocketAddr)> = peer_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("node{}", i + 1), *a))
            .collect();
        let mut nodes = Vec::new();
        for h in 1..=count {
            let dir = env.path(&format!("n{h}"));
            let stickd_socket = dir.join("stickd.sock");
            let stickd_config = env.write(
                &format!("n{h}/stickd.toml"),
                &stickd_config(&dir.join("stickd"), &stickd_socket, &peers, expire, size).render(),
            )?;
            let stickd = env.spawn(
                &format!("stickd-n{h}"),
                harness::release_bin("stickd"),
                [
                    "--config".as_ref(),
                    stickd_config.as_os_str(),
                    "-L".as_ref(),
                    format!("node{h}").as_ref(),
                ],
            )?;
            let fdkeeper =
                cluster::start_fdkeeper(&env, &format!("n{h}"), &format!("fdkeeper-n{h}")).await?;
            harness::wait_unix(&stickd_socket, START_TIMEOUT).await?;
            let frontend = env.port_or_free(h, port(8080))?;
            let metrics = env.port_or_free(h, port(9100))?;
            let proxyd_admin = env.path(&format!("n{h}/proxyd-admin.sock"));
            let proxyd_config = env.write(
                &format!("n{h}/proxyd.toml"),
                &proxyd_seed_config(
                    &proxyd_admin,
                    &fdkeeper.socket,
                    &stickd_socket,
                    frontend,
                    metrics,
                    &servers,
                )
                .render(),
            )?;
            let proxyd = env.spawn(
                &format!("proxyd-n{h}"),
                harness::release_bin("proxyd"),
                ["--config".as_ref(), proxyd_config.as_os_str()],
            )?;
            nodes.push(LbNode {
                host: h,
                stickd,
                stickd_socket,
                fdkeeper: fdkeeper.proc,
                proxyd,
                frontend,
                proxyd_admin,
                metrics,
                proxyd_config,
            });
        }
        // Serving means the worker has its listeners and stickd's snapshot. No probe request
        // here: it would create a session.
        for n in &nodes {
            let admin = n.proxyd_admin.clone();
            harness::wait_for("proxyd to serve", START_TIMEOUT, || {
                let admin = admin.clone();
                async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
            })
            .await?;
        }
        let lb = Lb {
            env,
            backends,
            nodes,
        };
        lb.peered().await?;
        Ok(lb)
    }

    /// Until every stickd pushes to both others.
    async fn peered(&self) -> Result<()> {
        let want = self.nodes.len();
        for n in &self.nodes {
            let socket = n.stickd_socket.clone();
            harness::wait_for("stickd peers to connect", START_TIMEOUT, || {
                let socket = socket.clone();
                async move {
                    let mut c = stick_client(&socket).await?;
                    let peers = c.show_peers(pb::ShowPeersRequest {}).await?.into_inner();
                    let up = peers
                        .peers
                        .iter()
                        .filter(|p| p.name != peers.local && p.state == "connected")
                        .count();
                    Ok((up + 1 == want).then_some(()))
                }
            })
            .await?;
        }
        Ok(())
    }

    /// key -> server of node `i`'s table (tonic).
    async fn table(&self, i: usize) -> Result<BTreeMap<String, String>> {
        show(&self.nodes[i].stickd_socket).await
    }

    /// Until every node's table equals `want`; returns how long it took.
    async fn converged(
        &self,
        want: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let mut same = true;
            let mut last = BTreeMap::new();
            for i in 0..self.nodes.len() {
                // A restarted stickd may not listen yet: that is "not yet", not a failure.
                match self.table(i).await {
                    Ok(t) => last = t,
                    Err(e) if start.elapsed() > timeout => return Err(e),
                    Err(_) => {
                        same = false;
                        break;
                    }
                }
                if &last != want {
                    same = false;
                    break;
                }
            }
            if same {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let missing = want.iter().filter(|(k, v)| last.get(*k) != Some(v)).count();
                bail!(
                    "tables differ after {timeout:?}: {missing} of {} entries missing or different on some node (it has {})",
                    want.len(),
                    last.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn stick_client(socket: &Path) -> Result<StickClient<tonic::transport::Channel>> {
    Ok(StickClient::new(common::grpc::connect_unix(socket).await?))
}

/// key -> server of the stick table on the stickd at `socket` (stick.v1 Show).
pub async fn show(socket: &Path) -> Result<BTreeMap<String, String>> {
    let mut c = stick_client(socket).await?;
    let r = c
        .show(pb::ShowRequest {
            table: TABLE.into(),
            page_size: 50_000,
            ..Default::default()
        })
        .await
        .context("stick.v1.Stick/Show")?
        .into_inner();
    Ok(r.entries.into_iter().map(|e| (e.key, e.server)).collect())
}

/// What a client learns from one response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub server: Option<String>,
    pub set_cookie: Option<String>,
}

/// One `GET /index.php` on a fresh connection, with the session cookie if any.
pub async fn get(addr: SocketAddr, cookie: Option<&str>) -> Result<Reply> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let cookie = cookie.map_or(String::new(), |c| format!("Cookie: PHPSESSID={c}\r\n"));
        s.write_all(
            format!("GET /index.php HTTP/1.1\r\nHost: lb\r\n{cookie}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("no answer from {addr} within 10 s"))??;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad response from {addr}: {text:?}"))?;
    Ok(Reply {
        status,
        server: text
            .lines()
            .find_map(|l| l.strip_prefix("server: "))
            .map(str::to_owned),
        set_cookie: text
            .lines()
            .find_map(|l| l.strip_prefix("Set-Cookie: PHPSESSID="))
            .and_then(|v| v.split(';').next())
            .map(str::to_owned),
    })
}

// ---- 1 ----------------------------------------------------------------------------------------

async fn seed(env: Env) -> Result<Outcome> {
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

// ---- 2 ----------------------------------------------------------------------------------------

const CLIENTS: usize = 200;
const ROUNDS: usize = 10;

async fn sticky_200(env: Env) -> Result<Outcome> {
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

// ---- 3 ----------------------------------------------------------------------------------------

async fn server_down(env: Env) -> Result<Outcome> {
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
    stop.cancel();
    for t in tasks {
        t.await?;
    }
    let (req, failed, moved) = (
        traffic.requests.load(Ordering::Relaxed),
        traffic.failed.load(Ordering::Relaxed),
        traffic.moved.load(Ordering::Relaxed),
    );
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

// ---- 4 ----------------------------------------------------------------------------------------

async fn stickd_kill9(env: Env) -> Result<Outcome> {
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

// ---- 5 ----------------------------------------------------------------------------------------

const RELOADS_PER_NODE: usize = 5;

async fn reload_sticky(env: Env) -> Result<Outcome> {
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
    stop.cancel();
    for t in tasks {
        t.await?;
    }
    let (req, failed, moved) = (
        traffic.requests.load(Ordering::Relaxed),
        traffic.failed.load(Ordering::Relaxed),
        traffic.moved.load(Ordering::Relaxed),
    );
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

// ---- 6 ----------------------------------------------------------------------------------------

/// A server that answers every connection with `reply` (or nothing at all) and keeps it open.
async fn fake_server(reply: Option<&'static [u8]>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if let Some(r) = reply {
                    let _ = s.write_all(r).await;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    Ok(addr)
}

/// Sends raw bytes (then waits without closing) and returns the status line's code, or 0 if
/// the connection closed without one; with the time it took.
async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Result<(u16, Duration)> {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .with_context(|| format!("no answer within {limit:?}"))?;
    let text = String::from_utf8_lossy(&buf);
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, started.elapsed()))
}

async fn bad_input(mut env: Env) -> Result<Outcome> {
    let names = vec!["app1".to_owned()];
    let backends = cluster::start_backends(&mut env, &names, 1, Duration::ZERO, None).await?;
    let garbage = fake_server(Some(b"this is not http\r\n\r\n")).await?;
    let silent = fake_server(None).await?;
    let dead = env.free_port(1)?;
    let fdkeeper = cluster::start_fdkeeper(&env, "n1", "fdkeeper-n1").await?;
    let fe: Vec<SocketAddr> = (0..4).map(|_| env.free_port(1)).collect::<Result<_>>()?;
    let admin = env.path("n1/proxyd-admin.sock");
    let mut config = configs::Proxyd {
        comment: "proxyd for lb-bad-input: one frontend per kind of server.",
        global: proxyd::Global::new(&admin, &fdkeeper.socket),
        defaults: proxyd::Defaults {
            timeout_http_request: Some("1s"),
            timeout_connect: Some("1s"),
            timeout_server: Some("1s"),
            timeout_queue: Some("1s"),
            retries: Some(1),
            ..proxyd::Defaults::default()
        },
        frontends: Vec::new(),
        backends: Vec::new(),
    };
    for (i, (name, server, check)) in [
        ("ok", backends[0].1, false),
        ("garbage", garbage, false),
        ("silent", silent, false),
        ("dead", dead, true),
    ]
    .into_iter()
    .enumerate()
    {
        config.frontends.push(proxyd::Frontend {
            name: name.into(),
            bind: vec![fe[i]],
            mode: None,
            default_backend: name.into(),
        });
        config.backends.push(proxyd::Backend {
            name: name.into(),
            balance: None,
            check: Some(proxyd::Check {
                http_get: None,
                inter: "100ms".into(),
                fall: 1,
            }),
            stick: None,
            servers: vec![proxyd::Server {
                check: Some(check),
                ..proxyd::Server::plain("s", server)
            }],
        });
    }
    let config = env.write("n1/proxyd.toml", &config.render())?;
    let mut proxyd = env.spawn(
        "proxyd-n1",
        harness::release_bin("proxyd"),
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_for("proxyd to serve", START_TIMEOUT, || {
        let admin = admin.clone();
        async move { Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)) }
    })
    .await?;
    // The dead server is found down by its first check.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let limit = Duration::from_secs(5);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let cases: Vec<(&str, SocketAddr, Vec<u8>, u16)> = vec![
        ("malformed", fe[0], b"GET / HTTP/9.9 what\r\n\r\n".to_vec(), 400),
        ("no host", fe[0], b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("cl + te", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("two lengths", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), 400),
        ("obs-fold", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n".to_vec(), 400),
        ("bad chunk", fe[0], b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("slowloris", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), 408),
        ("huge head", fe[0], huge.into_bytes(), 431),
        ("garbage server", fe[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 502),
        ("silent server", fe[2], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 504),
        ("no server", fe[3], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 503),
        ("good", fe[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 200),
    ];
    for (what, addr, bytes, want) in cases {
        let (got, took) = raw(addr, &bytes, limit)
            .await
            .with_context(|| format!("case {what}"))?;
        figure(what, format!("{got} in {} ms", took.as_millis()));
        ensure!(got == want, "{what}: status {got}, expected {want}");
    }
    ensure!(proxyd.is_running(), "proxyd exited");
    let st = cluster::proxyd_status(&admin).await?;
    let g = cluster::serving(&st).context("no serving generation")?;
    ensure!(
        g.restarts == 0,
        "the worker was restarted {} times",
        g.restarts
    );
    Ok(Outcome::Pass)
}

// ---- admin ------------------------------------------------------------------------------------

fn set_server(node: &LbNode, data: serde_json::Value) -> Result<serde_json::Value> {
    harness::grpcurl(&node.proxyd_admin, "proxyd.v1.Admin/SetServer", Some(&data))
}

async fn show_servers(node: &LbNode) -> Result<Vec<serde_json::Value>> {
    let v = harness::grpcurl(
        &node.proxyd_admin,
        "proxyd.v1.Admin/ShowServers",
        Some(&serde_json::json!({})),
    )?;
    Ok(v["servers"].as_array().cloned().unwrap_or_default())
}

async fn new_sessions_on(fe: SocketAddr, n: usize) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = get(fe, None).await?;
        ensure!(r.status == 200, "status {}", r.status);
        out.push((
            r.set_cookie.context("no cookie")?,
            r.server.context("no server")?,
        ));
    }
    Ok(out)
}

async fn admin(env: Env) -> Result<Outcome> {
    let mut lb = Lb::start(env).await?;
    let n1 = &lb.nodes[0];
    let servers = harness::wait_for(
        "ShowServers to list both servers",
        START_TIMEOUT,
        || async {
            let s = show_servers(n1).await?;
            Ok((s.len() == 2 && s.iter().all(|x| x["health"] == "up")).then_some(s))
        },
    )
    .await?;
    figure(
        "ShowServers",
        servers
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} w{}",
                    s["server"], s["health"], s["adminState"], s["weight"]
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let clients = new_sessions_on(n1.frontend, 20).await?;
    let on_app1: Vec<&(String, String)> = clients.iter().filter(|(_, s)| s == "app1").collect();
    ensure!(!on_app1.is_empty(), "no session on app1");

    // drain: stuck clients stay, new sessions go elsewhere.
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "drain"}),
    )?;
    for (c, _) in &on_app1 {
        let r = get(n1.frontend, Some(c)).await?;
        ensure!(
            r.server.as_deref() == Some("app1"),
            "a stuck client left a draining server"
        );
    }
    let fresh = new_sessions_on(n1.frontend, 10).await?;
    ensure!(
        fresh.iter().all(|(_, s)| s == "app2"),
        "a new session went to a draining server"
    );

    // maint: stuck clients move (redispatch), with no failure.
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "maint"}),
    )?;
    for (c, _) in &on_app1 {
        let r = get(n1.frontend, Some(c)).await?;
        ensure!(
            r.status == 200 && r.server.as_deref() == Some("app2"),
            "a client stayed on a server in maintenance: {r:?}"
        );
    }
    figure(
        "maint",
        format!("{} clients of app1 moved to app2, 0 failed", on_app1.len()),
    );

    // ready with weight 3: exactly 3 of every 4 new sessions on app1 (smooth round robin).
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "ready", "weight": 3}),
    )?;
    let fresh = new_sessions_on(n1.frontend, 8).await?;
    let a1 = fresh.iter().filter(|(_, s)| s == "app1").count();
    figure(
        "weights 3:1, 8 new sessions",
        format!("{a1} on app1, {} on app2", 8 - a1),
    );
    ensure!(a1 == 6, "{a1} of 8 on app1, expected 6");

    // A reload keeps the operator's changes.
    let before = cluster::serving(&cluster::proxyd_status(&n1.proxyd_admin).await?)
        .context("no serving generation")?;
    n1.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    cluster::wait_new_generation(&n1.proxyd_admin, before.generation, Duration::from_secs(20))
        .await?;
    harness::wait_for(
        "the new generation to report weight 3",
        Duration::from_secs(5),
        || async {
            let s = show_servers(n1).await?;
            Ok(s.iter()
                .any(|x| x["server"] == "app1" && x["weight"] == 3 && x["adminState"] == "ready")
                .then_some(()))
        },
    )
    .await?;

    // A crash of the whole proxyd tree keeps them too: the restarted master reads them back
    // from its server_state_file.
    let n1 = &mut lb.nodes[0];
    n1.proxyd.restart()?;
    let n1 = &lb.nodes[0];
    harness::wait_for(
        "the restarted master to report weight 3",
        START_TIMEOUT,
        || async {
            let s = show_servers(n1).await?;
            Ok(s.iter()
                .any(|x| x["server"] == "app1" && x["weight"] == 3 && x["adminState"] == "ready")
                .then_some(()))
        },
    )
    .await?;
    figure("kill -9 of proxyd, restarted", "app1 still weight 3");
    // The reload counter below is the restarted master's: reload once more.
    let before = cluster::serving(&cluster::proxyd_status(&n1.proxyd_admin).await?)
        .context("no serving generation")?;
    n1.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    cluster::wait_new_generation(&n1.proxyd_admin, before.generation, Duration::from_secs(20))
        .await?;

    // Prometheus (counters are the new generation's: give it some traffic).
    new_sessions_on(n1.frontend, 4).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (name, min) in [
        ("proxyd_frontend_requests_total{frontend=\"http-in\"}", 4),
        (
            "proxyd_server_requests_total{backend=\"dynamic_group\",server=\"app1\"}",
            2,
        ),
        (
            "proxyd_server_responses_total{backend=\"dynamic_group\",server=\"app1\",code=\"2xx\"}",
            2,
        ),
        ("proxyd_stick_stores_sent_total", 4),
    ] {
        let v = metric_value(n1.metrics, name).await?;
        ensure!(v >= min, "{name} is {v}, expected at least {min}");
    }
    let text = {
        let mut s = tokio::net::TcpStream::connect(n1.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        String::from_utf8_lossy(&buf).into_owned()
    };
    for want in [
        "proxyd_server_up{backend=\"dynamic_group\",server=\"app1\"} 1",
        "proxyd_server_weight{backend=\"dynamic_group\",server=\"app1\"} 3",
        "proxyd_stickd_link_up 1",
        "proxyd_stick_cache_entries ",
        "proxyd_server_responses_total{backend=\"dynamic_group\",server=\"app2\",code=\"2xx\"}",
        "proxyd_reloads_total{result=\"ok\"} 1",
    ] {
        ensure!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }
    figure("/metrics", format!("{} lines", text.lines().count()));
    Ok(Outcome::Pass)
}

// ---- table refused ----------------------------------------------------------------------------

async fn table_refused(env: Env) -> Result<Outcome> {
    let lb = Lb::start_with(env, 1, None).await?;
    let n = &lb.nodes[0];
    let clients = new_sessions_on(n.frontend, 6).await?;
    let good = std::fs::read_to_string(&n.proxyd_config)?;
    for (what, replace, want) in [
        (
            "missing table",
            "[backend.stick]\ntable = \"missing\"\n",
            "stick table 'missing': not defined in stickd",
        ),
        (
            "incompatible type",
            "[backend.stick]\non = \"src\"\n#",
            "stick table 'dynamic_group': type string in stickd, ip or ipv6 (for src) needed",
        ),
    ] {
        std::fs::write(
            &n.proxyd_config,
            good.replacen("[backend.stick]\n", replace, 1),
        )?;
        let out = std::process::Command::new(harness::release_bin("proxyd"))
            .arg("reload")
            .arg("--config")
            .arg(&n.proxyd_config)
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "{what}: the reload succeeded");
        ensure!(said.contains(want), "{what}: `proxyd reload` said {said:?}");
        figure(what, said.trim());
        // The running generation still routes every session where it was.
        for (c, server) in &clients {
            let r = get(n.frontend, Some(c)).await?;
            ensure!(
                r.server.as_deref() == Some(server.as_str()),
                "{what}: a client moved"
            );
        }
    }
    std::fs::write(&n.proxyd_config, good)?;
    Ok(Outcome::Pass)
}

// ---- touches ----------------------------------------------------------------------------------

async fn metric_value(addr: SocketAddr, name: &str) -> Result<u64> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

async fn touch_coalesced(env: Env) -> Result<Outcome> {
    let lb = Lb::start_opts(env, 1, None, "2s").await?;
    let n = &lb.nodes[0];
    let (cookie, server) = new_sessions_on(n.frontend, 1)
        .await?
        .pop()
        .context("no session")?;
    let busy = Duration::from_secs(5);
    let started = Instant::now();
    let mut requests = 0u64;
    while started.elapsed() < busy {
        let r = get(n.frontend, Some(&cookie)).await?;
        ensure!(
            r.status == 200 && r.server.as_deref() == Some(server.as_str()),
            "after {:?} the session moved or failed: {r:?}",
            started.elapsed()
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The worker reports its counters every 250 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let touches = metric_value(n.metrics, "proxyd_stick_touches_sent_total").await?;
    figure(
        "one session busy for 5 s (expire 2s)",
        format!("{requests} requests, {touches} touches sent to stickd"),
    );
    ensure!(
        (4..=20).contains(&touches),
        "{touches} touches (expected about 10: one per quarter of expire)"
    );
    ensure!(
        lb.table(0).await?.get(&cookie) == Some(&server),
        "the busy session is not in stickd"
    );
    // Idle: it expires.
    let gone = harness::wait_for(
        "the idle session to expire",
        Duration::from_secs(6),
        || async { Ok((!lb.table(0).await?.contains_key(&cookie)).then_some(())) },
    )
    .await;
    ensure!(gone.is_ok(), "the idle session did not expire");
    Ok(Outcome::Pass)
}
