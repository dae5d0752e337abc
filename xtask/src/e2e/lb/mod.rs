//! The load balancer's scenarios: three load-balancer nodes on 127.0.0.1-3 (fdkeeper + stickd + proxyd
//! each, with the seed's sticky config) in front of two demo backends.

mod admin;
mod bad_input;
mod sticky;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::stick::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Scenario;
use crate::cluster::{self, START_TIMEOUT};
use crate::configs::stickd::Table;
use crate::configs::{self, proxyd};
use crate::harness::{self, Env, Proc};
use admin::{admin, table_refused, touch_coalesced};
use bad_input::bad_input;
use sticky::{reload_sticky, seed, server_down, stickd_kill9, sticky_200};

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
    pub stickd_config: PathBuf,
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
                stickd_config,
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
        let sockets: Vec<PathBuf> = self.nodes.iter().map(|n| n.stickd_socket.clone()).collect();
        wait_peered(&sockets).await
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

/// Until the stickd on each of `sockets` shows every other one connected.
pub async fn wait_peered(sockets: &[PathBuf]) -> Result<()> {
    let want = sockets.len();
    for socket in sockets {
        harness::wait_for("stickd peers to connect", START_TIMEOUT, || {
            let socket = socket.clone();
            async move {
                let mut c = cluster::stick_client(&socket).await?;
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

/// key -> server of the stick table on the stickd at `socket` (stick.v1 Show).
pub async fn show(socket: &Path) -> Result<BTreeMap<String, String>> {
    let mut c = cluster::stick_client(socket).await?;
    cluster::stick_table(&mut c, TABLE, 50_000).await
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
