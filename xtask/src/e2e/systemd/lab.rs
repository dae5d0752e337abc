//! The booted container with the units and the demo backends: what every check drives.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use proto::stick::v1::stick_client::StickClient;

use super::CLIENTS;
use super::container::{
    Container, Skip, container_init, copy, dist, ensure_base, fresh_copy, install, which,
};
use crate::backend::{self, BackendConfig};
use crate::cluster;
use crate::e2e::figure;
use crate::harness;
use crate::load::{Load, LoadConfig};

/// The booted container with the units installed, and the backends it proxies to.
pub(super) struct Lab {
    pub(super) container: Container,
    /// proxyd's frontend, a port below 1024 that only fdkeeper's capability can bind.
    pub(super) frontend: SocketAddr,
    pub(super) servers: Vec<String>,
    _backends: Backends,
}

/// The in-process demo backends; stopped when dropped, on every path.
struct Backends(Vec<tokio::task::JoinHandle<Result<()>>>);

impl Drop for Backends {
    fn drop(&mut self) {
        for b in &self.0 {
            b.abort();
        }
    }
}

impl Lab {
    /// Everything up to a booted container with users, binaries, units and configs in place.
    /// `Ok(Err(reason))` when this machine cannot do it.
    pub(super) async fn start(logs: &Path) -> Result<std::result::Result<Lab, Skip>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Err("needs root for systemd-nspawn and nsenter".into()));
        }
        for tool in ["systemd-nspawn", "nsenter", "cp"] {
            if which(tool).is_none() {
                return Ok(Err(format!(
                    "{tool} is not installed (apt-get install systemd-container util-linux)"
                )));
            }
        }
        let base = match ensure_base(logs).await? {
            Ok(b) => b,
            Err(skip) => return Ok(Err(skip)),
        };

        // Backends first: their ports go into proxyd.toml.
        let mut backends = Backends(Vec::new());
        let mut addrs = Vec::new();
        let servers = vec!["app1".to_owned(), "app2".to_owned()];
        for name in &servers {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .context("cannot bind a backend on 127.0.0.1")?;
            let listen = listener.local_addr()?;
            addrs.push(listen);
            backends.0.push(tokio::spawn(backend::serve(
                listener,
                BackendConfig {
                    listen,
                    name: name.clone(),
                    delay: Duration::from_millis(1),
                },
            )));
        }
        let frontend = privileged_free_port()?;
        let stickd_peer = free_port()?;

        let dir = fresh_copy(&base).await?;
        // From here on the copy is removed on every path: the Container owns it.
        let mut container = Container {
            dir: dir.clone(),
            nspawn: None,
            pid1: 0,
            version: String::new(),
        };
        install(&dir, frontend, &addrs, stickd_peer)?;
        let log = std::fs::File::create(logs.join("nspawn.log"))?;
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&dir)
            .args(["-b", "--register=no", "--keep-unit", "--console=passive"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own group: Ctrl-C reaches xtask, whose handler kills the whole tree.
            .process_group(0)
            .spawn()
            .context("cannot start systemd-nspawn")?;
        let nspawn_pid = child.id();
        container.nspawn = Some(child);
        container.pid1 = harness::wait_for(
            "the container's systemd to start",
            Duration::from_secs(20),
            || async move { Ok(container_init(nspawn_pid)) },
        )
        .await?;
        // systemctl answers once pid 1 has its private bus socket; then wait for the boot.
        let c = &container;
        let state = harness::wait_for(
            "the container to finish booting",
            Duration::from_secs(90),
            || async move {
                let out = c
                    .exec(&["systemctl", "is-system-running", "--wait"])
                    .await?;
                let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                Ok(matches!(state.as_str(), "running" | "degraded").then_some(state))
            },
        )
        .await?;
        if state == "degraded" {
            let failed = container
                .systemctl(&["--failed", "--no-legend", "--plain"])
                .await?;
            figure(
                "boot degraded, failed units",
                failed.trim().replace('\n', "; "),
            );
        }
        container.version = container
            .run(&["systemctl", "--version"])
            .await?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        // FileDescriptorStorePreserve= exists from systemd 254 on; 252 would warn about it.
        let major: u32 = container
            .version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("cannot read systemd's version")?;
        if major >= 254 {
            let dropin = dir.join("etc/systemd/system/fdkeeper.service.d");
            std::fs::create_dir_all(&dropin)?;
            copy(
                &dist("systemd/fdkeeper.service.d/fdstore-preserve.conf"),
                &dropin.join("fdstore-preserve.conf"),
                0o644,
            )?;
            container.systemctl(&["daemon-reload"]).await?;
        }
        Ok(Ok(Lab {
            container,
            frontend,
            servers,
            _backends: backends,
        }))
    }

    pub(super) async fn shutdown(mut self) {
        self.container.shutdown().await;
    }

    pub(super) fn c(&self) -> &Container {
        &self.container
    }

    /// The last lines the three units logged, for a failed check's report.
    pub(super) async fn journal_tail(&self, lines: usize) -> String {
        let n = lines.to_string();
        match self
            .c()
            .exec(&[
                "journalctl",
                "-u",
                "fdkeeper.service",
                "-u",
                "stickd.service",
                "-u",
                "proxyd.service",
                "-n",
                &n,
                "-o",
                "short-monotonic",
                "--no-pager",
                "-q",
            ])
            .await
        {
            Ok(out) => format!(
                "----- journal of the three units (last {lines} lines) -----\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(no journal: {e:#})"),
        }
    }

    pub(super) fn proxyd_admin(&self) -> PathBuf {
        self.c().path("/run/proxyd/admin.sock")
    }

    pub(super) fn fdkeeper_admin(&self) -> PathBuf {
        self.c().path("/run/fdkeeper/admin.sock")
    }

    /// Starts proxyd (and so the other two) if needed, and waits until the frontend answers.
    pub(super) async fn ensure_serving(&self) -> Result<cluster::ServingGeneration> {
        self.c().systemctl(&["start", "proxyd"]).await?;
        let frontend = self.frontend;
        harness::wait_for(
            "the frontend to answer 200",
            Duration::from_secs(15),
            || async move {
                Ok(cluster::probe(frontend, Duration::from_secs(2))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        self.serving().await
    }

    /// proxyd's serving generation, from its admin socket.
    pub(super) async fn serving(&self) -> Result<cluster::ServingGeneration> {
        let st = cluster::proxyd_status(&self.proxyd_admin()).await?;
        cluster::serving(&st).context("proxyd reports no serving generation")
    }

    pub(super) async fn start_load(&self) -> Result<Load> {
        let cfg = LoadConfig {
            keepalive_clients: CLIENTS.0,
            close_clients: CLIENTS.1,
            think_clients: CLIENTS.2,
            think_time: Duration::from_millis(100),
            max_duration: Duration::from_secs(200),
            max_requests: 50_000_000,
            request_timeout: Duration::from_secs(10),
            expect_servers: self.servers.clone(),
            ..LoadConfig::new(self.frontend)
        };
        figure(
            "clients",
            format!(
                "{} keep-alive, {} connection-close, {} keep-alive pausing 0-{:?}, against {}",
                cfg.keepalive_clients,
                cfg.close_clients,
                cfg.think_clients,
                cfg.think_time,
                cfg.target
            ),
        );
        let load = Load::start(cfg);
        load.wait_ok(300, Duration::from_secs(30))
            .await
            .context("the load never got going")?;
        Ok(load)
    }

    pub(super) async fn stick_client(&self) -> Result<StickClient<tonic::transport::Channel>> {
        cluster::stick_client(&self.c().path("/run/stickd/stickd.sock")).await
    }
}

/// A port below 1024 free on 127.0.0.1 (we are root, so binding it proves nothing; fdkeeper,
/// running as its own user, binds it through CAP_NET_BIND_SERVICE alone).
fn privileged_free_port() -> Result<SocketAddr> {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1024)
        .chain(600..start)
        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .context("no free port below 1024 on 127.0.0.1")
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?)
}
