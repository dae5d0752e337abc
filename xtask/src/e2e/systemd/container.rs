//! The systemd-nspawn container: cached root, throwaway copy, boot, commands through nsenter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{EXEC_TIMEOUT, HOSTNAME, INCLUDE, RELEASE, UNITS};
use crate::e2e::figure;
use crate::harness;

/// Why the checks cannot run on this machine (printed as the skip reason).
pub(super) type Skip = String;

/// A booted systemd-nspawn container on a throwaway copy of the cached root.
pub(super) struct Container {
    /// The copy it runs on (removed at the end).
    pub(super) dir: PathBuf,
    pub(super) nspawn: Option<Child>,
    /// Host pid of the container's systemd (pid 1 inside).
    pub(super) pid1: u32,
    /// `systemctl --version`'s first line.
    pub(super) version: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(child) = self.nspawn.as_mut() {
            kill_nspawn(child);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// SIGKILL to nspawn and everything below it (the container's processes), then reap it.
fn kill_nspawn(child: &mut Child) {
    let pid = child.id();
    for d in harness::descendants(pid) {
        let _ = kill(Pid::from_raw(d as i32), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let _ = child.wait();
}

impl Container {
    /// `path` inside the container, seen from the host (through pid 1's root: this crosses the
    /// container's own mounts, e.g. its /run tmpfs).
    pub(super) fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid1))
    }

    /// Runs a command inside every namespace of the container.
    pub(super) async fn exec(&self, args: &[&str]) -> Result<Output> {
        let pid1 = self.pid1.to_string();
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args(["-t", &pid1, "-a", "--"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(EXEC_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("{} took more than {EXEC_TIMEOUT:?}", args.join(" ")))?
            .with_context(|| format!("cannot run nsenter for {}", args.join(" ")))?;
        Ok(out)
    }

    /// Runs a command inside and returns its stdout; fails with its stderr when it fails.
    pub(super) async fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args).await?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(super) async fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.run(&all).await
    }

    /// `systemctl show UNIT -p ...` as a map.
    pub(super) async fn show(&self, unit: &str, props: &[&str]) -> Result<HashMap<String, String>> {
        let mut args = vec!["systemctl", "show", unit];
        for p in props {
            args.extend(["-p", p]);
        }
        let text = self.run(&args).await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    pub(super) async fn prop(&self, unit: &str, prop: &str) -> Result<String> {
        self.show(unit, &[prop])
            .await?
            .remove(prop)
            .with_context(|| format!("systemctl show {unit} has no {prop}"))
    }

    pub(super) async fn main_pid(&self, unit: &str) -> Result<u32> {
        self.prop(unit, "MainPID")
            .await?
            .parse()
            .with_context(|| format!("{unit}: MainPID is not a number"))
    }

    /// A journal cursor: what comes after it is what a check caused.
    pub(super) async fn cursor(&self) -> Result<String> {
        let out = self
            .run(&["journalctl", "-n", "0", "--show-cursor", "-q"])
            .await?;
        out.lines()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .map(str::to_owned)
            .context("journalctl printed no cursor")
    }

    /// The journal lines of `unit` (systemd's lines about it and the daemon's own) after `cursor`.
    pub(super) async fn journal_since(&self, unit: &str, cursor: &str) -> Result<Vec<String>> {
        let unit = format!("{unit}.service");
        let after = format!("--after-cursor={cursor}");
        let out = self
            .run(&[
                "journalctl",
                "-u",
                &unit,
                &after,
                "-o",
                "short-monotonic",
                "--no-pager",
                "-q",
            ])
            .await?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// `systemctl poweroff` inside, then SIGKILL if the container is not gone within 20 s.
    pub(super) async fn shutdown(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        let asked = self.exec(&["systemctl", "--no-block", "poweroff"]).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        if asked.is_ok_and(|o| o.status.success()) {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    figure("container", "powered off");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!("warning: the container did not power off; killing it");
        kill_nspawn(&mut child);
    }

    /// Pids (container namespace) of every process inside whose command is `name`.
    pub(super) fn pids_named(&self, name: &str) -> Vec<u32> {
        let proc = self.path("/proc");
        let Ok(rd) = std::fs::read_dir(&proc) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(proc.join(format!("{pid}/comm")))
                    .is_ok_and(|c| c.trim() == name)
            })
            .collect()
    }

    /// Socket inodes held by a process of the container (pid in its namespace).
    pub(super) fn socket_inodes(&self, pid: u32) -> Result<Vec<u64>> {
        let dir = self.path(&format!("/proc/{pid}/fd"));
        let mut out = Vec::new();
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let Ok(target) = std::fs::read_link(e?.path()) else {
                continue;
            };
            if let Some(n) = target
                .to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// A `Name:\tvalue` line of /proc/PID/status inside the container.
    pub(super) fn proc_status(&self, pid: u32, field: &str) -> Result<String> {
        let path = self.path(&format!("/proc/{pid}/status"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("{} has no {field}", path.display()))
    }

    /// The user name of `uid` in the container's /etc/passwd.
    pub(super) fn user_name(&self, uid: u32) -> String {
        std::fs::read_to_string(self.path("/etc/passwd"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid.to_string()).then(|| name.to_owned())
            })
            .unwrap_or_else(|| uid.to_string())
    }
}

/// The container's pid 1: the child of nspawn that is pid 1 in its own pid namespace.
pub(super) fn container_init(nspawn: u32) -> Option<u32> {
    harness::descendants(nspawn).into_iter().find(|&pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ns| ns.split_whitespace().last() == Some("1"))
        }) && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "systemd")
    })
}

pub(super) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn cache_dir() -> PathBuf {
    harness::workspace_root().join("target/systemd-root")
}

pub(super) fn dist(rel: &str) -> PathBuf {
    harness::workspace_root().join("dist").join(rel)
}

/// The cached debootstrap root, built on first use (about a minute). `Ok(Err)` when it cannot be.
pub(super) async fn ensure_base(logs: &Path) -> Result<std::result::Result<PathBuf, Skip>> {
    let cache = cache_dir();
    let base = cache.join("base");
    let marker = base.join(".xtask-root");
    let wanted = format!("{RELEASE} minbase {INCLUDE}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        figure("root", format!("cached in {}", base.display()));
        return Ok(Ok(base));
    }
    let Some(debootstrap) = which("debootstrap") else {
        return Ok(Err(
            "no cached root and debootstrap is not installed (apt-get install debootstrap)".into(),
        ));
    };
    std::fs::create_dir_all(&cache)?;
    let tmp = cache.join(format!("base.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    println!("    debootstrap --variant=minbase --include={INCLUDE} {RELEASE} (about a minute)...");
    let started = Instant::now();
    let log = std::fs::File::create(logs.join("debootstrap.log"))?;
    let mut cmd = tokio::process::Command::new(debootstrap);
    cmd.args([
        "--variant=minbase",
        &format!("--include={INCLUDE}"),
        RELEASE,
    ])
    .arg(&tmp)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log)
    .kill_on_drop(true);
    let status = tokio::time::timeout(Duration::from_secs(900), cmd.status()).await;
    let ok = matches!(status, Ok(Ok(s)) if s.success());
    if !ok {
        let _ = std::fs::remove_dir_all(&tmp);
        let tail = harness::log_tails(logs, 5);
        return Ok(Err(format!(
            "debootstrap failed ({status:?}), no root to boot: {}",
            tail.lines().last().unwrap_or_default()
        )));
    }
    if base.exists() {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove the stale {}", base.display()))?;
    }
    std::fs::rename(&tmp, &base)?;
    std::fs::write(&marker, wanted)?;
    figure(
        "root",
        format!(
            "debootstrapped in {:.0}s into {}",
            started.elapsed().as_secs_f64(),
            base.display()
        ),
    );
    Ok(Ok(base))
}

/// A throwaway copy of the base root for this run (the base stays pristine); copies left by
/// runs that died are removed first.
pub(super) async fn fresh_copy(base: &Path) -> Result<PathBuf> {
    let cache = cache_dir();
    for e in std::fs::read_dir(&cache)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
            && !harness::pid_alive(pid)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = cache.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let status = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(base)
        .arg(&dir)
        .status()
        .await
        .context("cannot run cp")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "cp -a {} {} failed ({status})",
            base.display(),
            dir.display()
        );
    }
    Ok(dir)
}

pub(super) fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Replaces each `from` (which must occur exactly once) in a shipped config, so that the test
/// runs the shipped file with only its addresses changed.
pub(super) fn patch(text: &str, file: &str, edits: &[(&str, String)]) -> Result<String> {
    let mut out = text.to_owned();
    for (from, to) in edits {
        let n = out.matches(from).count();
        ensure!(n == 1, "{file}: expected `{from}` once, found it {n} times");
        out = out.replace(from, to);
    }
    Ok(out)
}

/// Installs what an operator would (dist/systemd/README.md): binaries, units, sysusers, configs.
pub(super) fn install(
    root: &Path,
    frontend: SocketAddr,
    backends: &[SocketAddr],
    peer: SocketAddr,
) -> Result<()> {
    for bin in UNITS {
        copy(
            &harness::release_bin(bin),
            &root.join("usr/local/bin").join(bin),
            0o755,
        )?;
        copy(
            &dist(&format!("systemd/{bin}.service")),
            &root.join(format!("etc/systemd/system/{bin}.service")),
            0o644,
        )?;
    }
    std::fs::create_dir_all(root.join("etc/sysusers.d"))?;
    copy(
        &dist("systemd/lb.sysusers"),
        &root.join("etc/sysusers.d/lb.conf"),
        0o644,
    )?;
    std::fs::write(root.join("etc/hostname"), format!("{HOSTNAME}\n"))?;
    // Test only: the checks read the journal as evidence, so journald must drop nothing.
    let journald = root.join("etc/systemd/journald.conf.d");
    std::fs::create_dir_all(&journald)?;
    std::fs::write(
        journald.join("xtask.conf"),
        "[Journal]\nRateLimitIntervalSec=0\n",
    )?;

    let read = |name: &str| -> Result<String> {
        let p = dist(&format!("config/{name}.toml"));
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let proxyd = patch(
        &read("proxyd")?,
        "proxyd.toml",
        &[
            (
                r#"bind = ["0.0.0.0:80"]"#,
                format!(r#"bind = ["{frontend}"]"#),
            ),
            (r#""127.0.0.1:9001""#, format!(r#""{}""#, backends[0])),
            (r#""127.0.0.1:9002""#, format!(r#""{}""#, backends[1])),
        ],
    )?;
    let stickd = patch(
        &read("stickd")?,
        "stickd.toml",
        &[(r#""127.0.0.1:10000""#, format!(r#""{peer}""#))],
    )?;
    let fdkeeper = read("fdkeeper")?;
    for (name, text) in [
        ("fdkeeper", fdkeeper),
        ("stickd", stickd),
        ("proxyd", proxyd),
    ] {
        let dir = root.join("etc").join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.toml")), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_replaces_exactly_once_or_fails() {
        let text = "a = 1\nb = \"127.0.0.1:9001\"\n";
        let out =
            patch(text, "t.toml", &[("\"127.0.0.1:9001\"", "\"x\"".into())]).expect("patched");
        assert_eq!(out, "a = 1\nb = \"x\"\n");
        assert!(patch(text, "t.toml", &[("missing", String::new())]).is_err());
        assert!(patch("x x", "t.toml", &[("x", "y".into())]).is_err());
    }

    #[test]
    fn shipped_configs_carry_the_lines_the_test_patches() {
        let read =
            |n: &str| std::fs::read_to_string(dist(&format!("config/{n}.toml"))).expect("read");
        let edits = [
            (r#"bind = ["0.0.0.0:80"]"#, String::new()),
            (r#""127.0.0.1:9001""#, String::new()),
            (r#""127.0.0.1:9002""#, String::new()),
        ];
        patch(&read("proxyd"), "proxyd.toml", &edits).expect("proxyd.toml");
        patch(
            &read("stickd"),
            "stickd.toml",
            &[(r#""127.0.0.1:10000""#, String::new())],
        )
        .expect("stickd.toml");
    }
}
