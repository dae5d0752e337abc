//! One load-balancer node made of the real binaries (demo backends, fdkeeper, proxyd) in an
//! [`Env`], with its generated configs and the clients of proxyd's and stickd's gRPC; shared by
//! the e2e scenarios, the demo and the bench.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::proxyd::v1::admin_client::AdminClient as ProxydAdminClient;
use proto::proxyd::v1::{GenerationState, StatusReply, StatusRequest};
use proto::stick::v1 as stick;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

use crate::configs::{self, proxyd};
use crate::harness::{self, Env, Proc, ProcSpec};

/// Generous waits: the e2e machine has 2 cores and four builds may run beside it.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to lay out a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The node's frontend listens on 127.0.0.`host`.
    pub host: u8,
    /// Demo backends, by server name; they listen on 127.0.0.`host`+1.
    pub backends: Vec<String>,
    /// Delay of every backend response (keeps requests in flight during reloads and kills).
    pub backend_delay: Duration,
    pub drain_timeout: &'static str,
    pub max_draining: u32,
    /// The proxyd binary to run (a copy, for the upgrade scenario); default target/release/proxyd.
    pub proxyd_binary: Option<PathBuf>,
    /// Ports to use when free (the demo's stable addresses): frontend, then the first backend's
    /// (the next backends count up from it). `None`: any free port.
    pub preferred_ports: Option<(u16, u16)>,
    /// Proxy to these servers (started by the caller, shared by several nodes) instead of
    /// starting `backends`.
    pub servers: Option<Vec<(String, SocketAddr)>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            host: 1,
            backends: vec!["app1".into(), "app2".into()],
            backend_delay: Duration::ZERO,
            drain_timeout: "10s",
            max_draining: 4,
            proxyd_binary: None,
            preferred_ports: None,
            servers: None,
        }
    }
}

/// A running node.
pub struct Node {
    /// Held: the demo backends this node started (none when given `servers`); dropping a
    /// `Proc` kills it.
    _backends: Vec<Proc>,
    /// What its proxyd balances over.
    pub servers: Vec<(String, SocketAddr)>,
    pub fdkeeper: Proc,
    pub proxyd: Proc,
    pub frontend: SocketAddr,
    pub fdkeeper_socket: PathBuf,
    pub fdkeeper_admin: PathBuf,
    pub proxyd_config: PathBuf,
    pub proxyd_admin: PathBuf,
}

/// Writes `DIR/fdkeeper.toml` (lending socket `DIR/fdkeeper/lend.sock`, admin socket
/// `DIR/fdkeeper-admin.sock`) and starts fdkeeper as `name`; returns once it lends.
pub async fn start_fdkeeper(env: &Env, dir: &str, name: &str) -> Result<RunningFdkeeper> {
    let socket = env.path(&format!("{dir}/fdkeeper/lend.sock"));
    let admin = env.path(&format!("{dir}/fdkeeper-admin.sock"));
    let config = env.write(
        &format!("{dir}/fdkeeper.toml"),
        &configs::Fdkeeper::new(socket.clone(), admin.clone()).render(),
    )?;
    let proc = env.spawn(
        name,
        harness::release_bin("fdkeeper"),
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_seqpacket(&socket, START_TIMEOUT).await?;
    Ok(RunningFdkeeper {
        proc,
        socket,
        admin,
    })
}

/// An fdkeeper that [`start_fdkeeper`] started.
pub struct RunningFdkeeper {
    pub proc: Proc,
    pub socket: PathBuf,
    pub admin: PathBuf,
}

/// Starts one demo backend per name on 127.0.0.`host` (ports from `preferred_base` up when
/// free), and waits until each accepts.
pub async fn start_backends(
    env: &mut Env,
    names: &[String],
    host: u8,
    delay: Duration,
    preferred_base: Option<u16>,
) -> Result<Vec<(String, SocketAddr, Proc)>> {
    // This very binary, even if cargo has rebuilt (unlinked) it since we started: the forked
    // child's /proc/self/exe is ours until it execs.
    let me = PathBuf::from("/proc/self/exe");
    let mut backends = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let preferred = preferred_base.map(|b| b + i as u16);
        let addr = env.port_or_free(host, preferred)?;
        let spec = ProcSpec::new(&format!("backend-{name}"), &me)
            .arg("backend")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--name")
            .arg(name)
            .arg("--delay")
            .arg(format!("{}ms", delay.as_millis()));
        let p = env.spawn_spec(spec)?;
        backends.push((name.clone(), addr, p));
    }
    for (_, addr, _) in &backends {
        harness::wait_tcp(*addr, START_TIMEOUT).await?;
    }
    Ok(backends)
}

impl Node {
    /// Starts backends, fdkeeper and proxyd, and waits until the frontend serves.
    pub async fn start(env: &mut Env, options: NodeOptions) -> Result<Node> {
        let h = options.host;
        let backends = match &options.servers {
            Some(_) => Vec::new(),
            None => {
                start_backends(
                    env,
                    &options.backends,
                    h + 1,
                    options.backend_delay,
                    options.preferred_ports.map(|(_, b)| b),
                )
                .await?
            }
        };
        let servers: Vec<(String, SocketAddr)> = match &options.servers {
            Some(s) => s.clone(),
            None => backends.iter().map(|(n, a, _)| (n.clone(), *a)).collect(),
        };

        let RunningFdkeeper {
            proc: fdkeeper,
            socket: fdkeeper_socket,
            admin: fdkeeper_admin,
        } = start_fdkeeper(env, &format!("n{h}"), &format!("fdkeeper-n{h}")).await?;
        harness::wait_unix(&fdkeeper_admin, START_TIMEOUT).await?;
        harness::wait_grpc_health(&fdkeeper_admin, START_TIMEOUT).await?;

        let frontend = env.port_or_free(h, options.preferred_ports.map(|(f, _)| f))?;
        let proxyd_admin = env.path(&format!("n{h}/proxyd-admin.sock"));
        let mut global = proxyd::Global::new(&proxyd_admin, &fdkeeper_socket);
        global.drain_timeout = Some(options.drain_timeout);
        global.max_draining = Some(options.max_draining);
        global.threads = Some(1);
        let proxyd_config = env.write(
            &format!("n{h}/proxyd.toml"),
            &configs::Proxyd::round_robin(global, frontend, &servers).render(),
        )?;
        let binary = options
            .proxyd_binary
            .clone()
            .unwrap_or_else(|| harness::release_bin("proxyd"));
        let proxyd = env.spawn(
            &format!("proxyd-n{h}"),
            binary,
            ["--config".as_ref(), proxyd_config.as_os_str()],
        )?;
        let node = Node {
            _backends: backends.into_iter().map(|(_, _, p)| p).collect(),
            servers,
            fdkeeper,
            proxyd,
            frontend,
            fdkeeper_socket,
            fdkeeper_admin,
            proxyd_config,
            proxyd_admin,
        };
        node.wait_serving(START_TIMEOUT).await?;
        Ok(node)
    }

    /// Server names of the backends (what the load generator expects in bodies).
    pub fn server_names(&self) -> Vec<String> {
        self.servers.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Waits until proxyd's Status shows a serving generation and the frontend answers a request.
    pub async fn wait_serving(&self, timeout: Duration) -> Result<ServingGeneration> {
        let admin = self.proxyd_admin.clone();
        let generation = harness::wait_for("proxyd to serve", timeout, || {
            let admin = admin.clone();
            async move { Ok(serving(&proxyd_status(&admin).await?)) }
        })
        .await?;
        let frontend = self.frontend;
        harness::wait_for("the frontend to answer 200", timeout, || async move {
            Ok(probe(frontend, Duration::from_secs(5))
                .await
                .ok()
                .map(|_| ()))
        })
        .await?;
        Ok(generation)
    }

    pub async fn status(&self) -> Result<StatusReply> {
        proxyd_status(&self.proxyd_admin).await
    }
}

/// The newest serving generation and its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServingGeneration {
    pub generation: u64,
    pub pid: u32,
    pub restarts: u32,
}

/// The serving generation in a Status reply (the newest one if, briefly, two are).
pub fn serving(status: &StatusReply) -> Option<ServingGeneration> {
    status
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Serving as i32)
        .filter_map(|g| {
            g.worker.as_ref().map(|w| ServingGeneration {
                generation: g.generation,
                pid: w.pid,
                restarts: w.restarts,
            })
        })
        .filter(|s| s.pid != 0)
        .max_by_key(|s| s.generation)
}

/// proxyd.v1.Admin/Status through a tonic client (fast enough to poll every few ms).
pub async fn proxyd_status(admin: &Path) -> Result<StatusReply> {
    let channel = common::grpc::connect_unix(admin)
        .await
        .with_context(|| format!("cannot connect to {}", admin.display()))?;
    let reply = ProxydAdminClient::new(channel)
        .status(StatusRequest {})
        .await
        .context("proxyd.v1.Admin/Status")?;
    Ok(reply.into_inner())
}

/// A stick.v1 client on stickd's unix socket.
pub async fn stick_client(socket: &Path) -> Result<StickClient<Channel>> {
    let channel = common::grpc::connect_unix(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    Ok(StickClient::new(channel))
}

/// key -> server of every entry of `table`, through stick.v1 Show `page_size` entries a page.
pub async fn stick_table(
    c: &mut StickClient<Channel>,
    table: &str,
    page_size: u32,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let r = c
            .show(stick::ShowRequest {
                table: table.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .with_context(|| format!("stick.v1.Stick/Show {table}"))?
            .into_inner();
        out.extend(r.entries.into_iter().map(|e| (e.key, e.server)));
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        token = r.next_page_token;
    }
}

/// One `GET /` on a fresh connection with `Connection: close`; the server name from the body.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))??;
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr} answered {:?}",
            text.lines().next().unwrap_or_default()
        );
    }
    text.lines()
        .find_map(|l| l.strip_prefix("server: "))
        .map(str::to_owned)
        .with_context(|| format!("{addr} answered without a server name"))
}

/// Polls Status until a generation newer than `after` serves; returns it and when it was seen.
/// One connection for the whole wait, so that a poll costs a round trip, not a connect.
pub async fn wait_new_generation(
    admin: &Path,
    after: u64,
    timeout: Duration,
) -> Result<(ServingGeneration, Instant)> {
    let mut client: Option<ProxydAdminClient<tonic::transport::Channel>> = None;
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        if client.is_none() {
            match common::grpc::connect_unix(admin).await {
                Ok(ch) => client = Some(ProxydAdminClient::new(ch)),
                Err(e) => last_err = Some(anyhow::Error::new(e)),
            }
        }
        if let Some(c) = client.as_mut() {
            match c.status(StatusRequest {}).await {
                Ok(reply) => {
                    if let Some(s) = serving(reply.get_ref()).filter(|s| s.generation > after) {
                        return Ok((s, Instant::now()));
                    }
                }
                Err(e) => {
                    last_err = Some(anyhow::Error::new(e));
                    client = None;
                }
            }
        }
        if Instant::now() >= deadline {
            let msg = format!(
                "timed out after {timeout:?} waiting for a generation newer than {after} to serve"
            );
            return Err(match last_err {
                Some(e) => e.context(msg),
                None => anyhow::anyhow!(msg),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Inode of each listener fdkeeper holds, by address, from its admin API through grpcurl.
pub fn fdkeeper_inodes(admin: &Path) -> Result<Vec<(String, u64)>> {
    let v = harness::grpcurl(admin, "fdkeeper.v1.Admin/ListListeners", None)?;
    let mut out = Vec::new();
    for l in v["listeners"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let addr = l["localAddress"]
            .as_str()
            .or_else(|| l["address"].as_str())
            .unwrap_or_default()
            .to_owned();
        let inode = harness::json_u64(&l["inode"]).context("listener without an inode")?;
        out.push((addr, inode));
    }
    Ok(out)
}
