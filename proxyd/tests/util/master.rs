//! The real proxyd binary (master and workers) over an in-process fdkeeper on a temp dir, and
//! what its tests ask of it: its status, a reload, its processes in /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
use tokio_util::sync::CancellationToken;

use crate::util::{self, PROXYD, backend, config_text, ok, start_fdkeeper};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: PathBuf,
    pub front: std::net::SocketAddr,
    pub master: Child,
    pub fdk_stop: CancellationToken,
    pub servers: Vec<std::net::SocketAddr>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        self.fdk_stop.cancel();
    }
}

pub fn free_addr() -> std::net::SocketAddr {
    util::closed_port()
}

pub async fn env(extra_global: &str) -> Env {
    env_with(extra_global, |_| Stdio::inherit()).await
}

/// Like [`env`], the master's stderr (its log) going where `stderr` says, given the temp dir.
pub async fn env_with(extra_global: &str, stderr: impl FnOnce(&Path) -> Stdio) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let fdk_stop = start_fdkeeper(dir.path());
    let b1 = backend(|_| ok("one")).await;
    let b2 = backend(|_| ok("two")).await;
    let front = free_addr();
    let servers = vec![b1.addr, b2.addr];
    let text = config_text(dir.path(), &front.to_string(), &servers, extra_global);
    let config = dir.path().join("proxyd.toml");
    std::fs::write(&config, text).expect("write config");
    let master = Command::new(PROXYD)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(stderr(dir.path()))
        // A log file without colour codes between a field's name and its value.
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("spawn proxyd");
    let admin = dir.path().join("proxyd/admin.sock");
    let env = Env {
        dir,
        config,
        admin,
        front,
        master,
        fdk_stop,
        servers,
    };
    wait_for(Duration::from_secs(10), || async {
        serving(&env.admin).await.is_some()
    })
    .await;
    env
}

pub async fn status(admin: &Path) -> Option<api::StatusReply> {
    let ch = common::grpc::connect_unix(admin).await.ok()?;
    let mut c = api::admin_client::AdminClient::new(ch);
    c.status(api::StatusRequest {})
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

pub async fn reload(admin: &Path) -> Result<api::ReloadResult, tonic::Status> {
    let ch = common::grpc::connect_unix(admin)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = api::admin_client::AdminClient::new(ch);
    c.reload(api::ReloadRequest {})
        .await
        .map(|r| r.into_inner().result.unwrap_or_default())
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
