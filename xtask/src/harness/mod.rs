//! Test environment for e2e scenarios and the demo: a temp dir, free ports on 127.0.0.x, the real
//! binaries with their output in per-process log files, readiness waits, signals, and cleanup that
//! leaves no process behind (on drop, on panic and on Ctrl-C).

mod grpcurl;
mod proc;
mod wait;

pub use grpcurl::{grpcurl, json_u64, require_grpcurl};
pub use proc::{
    Proc, ProcSpec, all_pids, become_subreaper, descendants, group_members, kill_all, pid_alive,
    socket_inodes,
};
pub use wait::{wait_for, wait_grpc_health, wait_seqpacket, wait_tcp, wait_unix};

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

/// Root of the workspace (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of a release binary of the workspace, e.g. `release_bin("proxyd")`.
pub fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}

/// Builds every release binary once; e2e and demo run what this produces.
pub fn build_release() -> Result<()> {
    // xtask itself runs from the debug build; its release build would only cost time.
    cargo_build_release(&["--exclude", "xtask"])
}

/// The release binaries and xtask's own release build, whose load clients the bench runs (see
/// `bench_in_release` in main.rs).
pub fn build_release_with_xtask() -> Result<()> {
    cargo_build_release(&[])
}

fn cargo_build_release(extra: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--bins", "--workspace"])
        .args(extra)
        .status()
        .context("cannot run cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    Ok(())
}

/// Temp dirs of live `Env`s, removed by [`remove_temp_dirs`] when an interrupt skips their drop.
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temp dir of every `Env` still alive (for the Ctrl-C path, which exits at once).
pub fn remove_temp_dirs() {
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// One scenario's sandbox: a temp dir holding configs, sockets and `logs/`.
pub struct Env {
    dir: Arc<tempfile::TempDir>,
    ports: HashSet<SocketAddr>,
}

impl Env {
    /// A fresh temp dir named after the scenario (kept only as long as the `Env` and its
    /// `keep_dir` handles live).
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("xtask-{name}-"))
            .tempdir()
            .context("cannot create a temp dir")?;
        std::fs::create_dir(dir.path().join("logs")).context("cannot create the logs dir")?;
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.path().to_owned());
        Ok(Self {
            dir: Arc::new(dir),
            ports: HashSet::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A handle that keeps the temp dir (and so the logs) alive after the `Env` is gone.
    pub fn keep_dir(&self) -> Arc<tempfile::TempDir> {
        Arc::clone(&self.dir)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir().join("logs")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir().join(rel)
    }

    /// Writes `contents` to `rel` inside the temp dir (creating parent dirs) and returns its path.
    pub fn write(&self, rel: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// A TCP port that is free on 127.0.0.`host` right now (found by binding port 0), and that
    /// this `Env` has not handed out before.
    pub fn free_port(&mut self, host: u8) -> Result<SocketAddr> {
        let ip = Ipv4Addr::new(127, 0, 0, host);
        for _ in 0..50 {
            let listener = TcpListener::bind((ip, 0))
                .with_context(|| format!("cannot bind {ip}:0 to find a free port"))?;
            let addr = listener.local_addr()?;
            if self.ports.insert(addr) {
                return Ok(addr);
            }
        }
        bail!("no free port found on {ip}")
    }

    /// `preferred` on 127.0.0.`host` if it is free right now, else any free port.
    pub fn port_or_free(&mut self, host: u8, preferred: Option<u16>) -> Result<SocketAddr> {
        if let Some(port) = preferred {
            let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), port));
            if !self.ports.contains(&addr) && TcpListener::bind(addr).is_ok() {
                self.ports.insert(addr);
                return Ok(addr);
            }
        }
        self.free_port(host)
    }

    /// Starts `program args...` in its own process group, output appended to `logs/NAME.log`.
    pub fn spawn<I, S>(&self, name: &str, program: impl AsRef<Path>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut spec = ProcSpec::new(name, program.as_ref());
        spec.args = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self.spawn_spec(spec)
    }

    /// Starts a process described by `spec` (env vars, uid/gid, working dir).
    pub fn spawn_spec(&self, spec: ProcSpec) -> Result<Proc> {
        let log = self.logs_dir().join(format!("{}.log", spec.name));
        Proc::spawn(spec, log)
    }

    /// The last `lines` lines of every log file, for a failed scenario's report.
    pub fn log_tails(&self, lines: usize) -> String {
        log_tails(&self.logs_dir(), lines)
    }
}

/// The last `lines` lines of every `*.log` in `dir`, each under a header.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let tail = tail_file(&f, lines);
        out.push_str(&format!(
            "----- {} (last {lines} lines) -----\n",
            f.display()
        ));
        out.push_str(&tail);
        if !tail.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    // Logs can grow large under load; the tail is all we print.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let mut env = Env::new("unit").expect("env");
        let a = env.free_port(1).expect("port");
        let b = env.free_port(1).expect("port");
        assert_ne!(a.port(), b.port());
        TcpListener::bind(a).expect("the port is free");
    }

    #[tokio::test]
    async fn logs_capture_output_and_restart_appends() {
        let env = Env::new("unit").expect("env");
        let mut p = env
            .spawn("echo", "/bin/sh", ["-c", "echo hello; echo oops >&2"])
            .expect("spawn");
        p.wait_exit(Duration::from_secs(5)).await.expect("exit");
        p.restart().expect("restart");
        p.wait_exit(Duration::from_secs(5)).await.expect("exit");
        let text = p.log_text();
        assert_eq!(text.matches("hello").count(), 2, "{text}");
        assert!(env.log_tails(10).contains("oops"));
    }
}
