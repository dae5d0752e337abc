//! Processes the harness starts, and the reaper that leaves none of them or theirs behind.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Pids of every process the harness started and has not reaped yet, so that the Ctrl-C
/// handler and the final sweep can kill them even when their `Proc` is out of reach.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

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
    /// Starts `spec` with its output appended to `log`.
    pub(super) fn spawn(spec: ProcSpec, log: PathBuf) -> Result<Proc> {
        let mut proc = Proc {
            spec,
            log,
            child: None,
            reaped: false,
        };
        proc.start()?;
        Ok(proc)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{Env, wait_for};

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
}
