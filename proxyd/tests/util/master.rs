//! The real proxyd binary (master and workers) over an in-process fdkeeper on a temp dir, and
//! what its tests ask of it: its status, a reload, its processes in /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::util::{self, PROXYD, backend, config_text, ok, start_fdkeeper};

/// A proxyd master and the in-process fdkeeper it borrows from, both stopped when dropped.
pub struct Running {
    pub master: Child,
    fdk_stop: CancellationToken,
}

impl Running {
    /// Starts fdkeeper under `dir` (where the config's `fdkeeper_socket` points), then `master`,
    /// a [`command`].
    pub fn start(dir: &Path, master: &mut Command) -> Running {
        let fdk_stop = start_fdkeeper(dir);
        let master = master.spawn().expect("spawn proxyd");
        Running { master, fdk_stop }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        self.fdk_stop.cancel();
    }
}

/// The real proxyd master on `config`, its log at `RUST_LOG` (warnings by default).
pub fn command(config: &Path) -> Command {
    let mut c = Command::new(PROXYD);
    c.arg("--config").arg(config).stdin(Stdio::null()).env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    c
}

/// A master serving the config of a temp dir.
pub struct Env {
    // Declared first, so that the master stops before its dir goes.
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: PathBuf,
    pub front: std::net::SocketAddr,
    pub servers: Vec<std::net::SocketAddr>,
}

pub fn free_addr() -> std::net::SocketAddr {
    util::closed_port()
}

/// A master in front of two backends (answering `one` and `two`), with `extra_global` in its
/// `[global]`.
pub async fn env(extra_global: &str) -> Env {
    env_with(extra_global, |_| Stdio::inherit()).await
}

/// Like [`env`], the master's stderr (its log) going where `stderr` says, given the temp dir.
pub async fn env_with(extra_global: &str, stderr: impl FnOnce(&Path) -> Stdio) -> Env {
    let b1 = backend(|_| ok("one")).await;
    let b2 = backend(|_| ok("two")).await;
    let servers = vec![b1.addr, b2.addr];
    let mut env = start(
        |dir, front| config_text(dir, &front.to_string(), &servers, extra_global),
        stderr,
    )
    .await;
    env.servers = servers;
    env
}

/// Starts the master on the config `text` writes for the temp dir and a free frontend address,
/// its stderr going where `stderr` says, and waits until a generation serves.
pub async fn start(
    text: impl FnOnce(&Path, std::net::SocketAddr) -> String,
    stderr: impl FnOnce(&Path) -> Stdio,
) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let front = free_addr();
    let config = dir.path().join("proxyd.toml");
    std::fs::write(&config, text(dir.path(), front)).expect("write config");
    let running = Running::start(
        dir.path(),
        command(&config)
            .stderr(stderr(dir.path()))
            // A log file without colour codes between a field's name and its value.
            .env("NO_COLOR", "1"),
    );
    let env = Env {
        running,
        admin: dir.path().join("proxyd/admin.sock"),
        dir,
        config,
        front,
        servers: Vec::new(),
    };
    wait_for(Duration::from_secs(10), || async {
        serving(&env.admin).await.is_some()
    })
    .await;
    env
}

/// A client of the master's admin socket, while it answers.
pub async fn admin(admin: &Path) -> Option<api::admin_client::AdminClient<Channel>> {
    let ch = common::grpc::connect_unix(admin).await.ok()?;
    Some(api::admin_client::AdminClient::new(ch))
}

pub async fn status(path: &Path) -> Option<api::StatusReply> {
    admin(path)
        .await?
        .status(api::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// (generation, pid, restarts) of the serving generation.
pub async fn serving(admin: &Path) -> Option<(u64, u32, u32)> {
    let s = status(admin).await?;
    s.generations
        .iter()
        .filter(|g| g.state == api::GenerationState::Serving as i32)
        .max_by_key(|g| g.generation)
        .and_then(|g| g.worker.as_ref().map(|w| (g.generation, w.pid, w.restarts)))
}

pub async fn reload(path: &Path) -> Result<api::ReloadResult, tonic::Status> {
    admin(path)
        .await
        .ok_or_else(|| tonic::Status::unavailable("no admin socket"))?
        .reload(api::ReloadRequest {})
        .await
        .map(|r| r.into_inner().result.unwrap_or_default())
}

/// Waits until the master has one generation left, the ones before it gone.
pub async fn wait_alone(admin: &Path, limit: Duration) {
    wait_for(limit, || async {
        status(admin)
            .await
            .is_some_and(|s| s.generations.len() == 1)
    })
    .await;
}

pub async fn wait_for<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` still holds a listening TCP socket, i.e. has not closed its listener copies
/// on drain (a worker drains when it handles the master's message, a moment after the next
/// generation is reported serving).
pub fn listens(pid: u32) -> bool {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(&*l.to_string_lossy()))
            })
        })
        .unwrap_or(false)
}

pub fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

pub fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}
