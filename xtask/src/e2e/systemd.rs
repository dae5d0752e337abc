//! Issue 5's proof: the units of `dist/systemd/` under a real systemd, booted with systemd-nspawn
//! from a cached debootstrap root and driven with `systemctl` through nsenter, while the load
//! generator runs outside against 127.0.0.1 (the container shares the host's network).
//!
//! The container boots once for every check (a boot costs seconds, a debootstrap a minute);
//! each check is counted in the closing line like a scenario, and first puts the units in the
//! state it needs, so that one failure does not cascade.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;

use super::{Totals, ensure_no_failures, figure, ms, print_load};
use crate::backend::{self, BackendConfig};
use crate::cluster;
use crate::harness;
use crate::load::{FailKind, Load, LoadConfig, percentile};

/// Packages on top of debootstrap's minbase: systemd as pid 1 (issue 5), and procps for the
/// `/bin/kill` of proxyd's ExecReload. Changing this list rebuilds the cached root.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,procps";
const RELEASE: &str = "bookworm";
/// The container's hostname, which stickd takes as its peer name (dist/config/stickd.toml).
const HOSTNAME: &str = "lb1";
const UNITS: [&str; 3] = ["fdkeeper", "stickd", "proxyd"];
/// How many `systemctl reload proxyd` check 2 runs under load.
const RELOADS: usize = 50;
/// Load clients: keep-alive, connection-close, and keep-alive pausing between requests.
const CLIENTS: (usize, usize, usize) = (25, 25, 10);
/// How long a systemctl (or any command in the container) may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// One counted check, run against the booted container.
struct Check {
    name: &'static str,
    about: &'static str,
    timeout: Duration,
    /// Runs with systemd's log level at debug, so that the journal shows every sd_notify
    /// message. Only where a check reads them: at debug every exec logs ~100 lines, which
    /// fifty reloads would push past journald's rate limit.
    debug: bool,
    run: for<'a> fn(&'a Lab) -> CheckFuture<'a>,
}

fn checks() -> Vec<Check> {
    fn c(
        name: &'static str,
        about: &'static str,
        timeout_s: u64,
        run: for<'a> fn(&'a Lab) -> CheckFuture<'a>,
    ) -> Check {
        Check {
            name,
            about,
            timeout: Duration::from_secs(timeout_s),
            debug: name == "systemd-start" || name == "systemd-stop",
            run,
        }
    }
    vec![
        c(
            "systemd-verify",
            "systemd-analyze verify is clean on the three units",
            60,
            |l| Box::pin(verify(l)),
        ),
        c(
            "systemd-start",
            "1. systemctl start proxyd brings up all three, each active only once it sent READY=1",
            90,
            |l| Box::pin(start(l)),
        ),
        c(
            "systemd-reload",
            "2. 50 systemctl reload proxyd under load: 0 failed requests, status shows the generation",
            240,
            |l| Box::pin(reloads(l)),
        ),
        c(
            "systemd-broken-reload",
            "3. systemctl reload proxyd with a broken config fails visibly, the service keeps serving",
            90,
            |l| Box::pin(broken_reload(l)),
        ),
        c(
            "systemd-kill",
            "4. systemctl kill -s KILL proxyd under load: systemd restarts it, 0 refused connections",
            90,
            |l| Box::pin(kill_proxyd(l)),
        ),
        c(
            "systemd-restart-fdkeeper",
            "5. systemctl restart fdkeeper (then kill -9, stop + start) under load: 0 refused, the same listening socket",
            90,
            |l| Box::pin(restart_fdkeeper(l)),
        ),
        c(
            "systemd-restart-stickd",
            "6. systemctl restart stickd: the table is intact afterwards, proxyd follows it",
            90,
            |l| Box::pin(restart_stickd(l)),
        ),
        c(
            "systemd-stop",
            "7. systemctl stop proxyd stickd fdkeeper: clean stop, STOPPING=1 seen, nothing left",
            90,
            |l| Box::pin(stop(l)),
        ),
    ]
}

/// Whether `filter` selects any check of this module (so that `e2e --filter systemd` is valid).
pub fn any_selected(filter: Option<&str>) -> bool {
    checks()
        .iter()
        .any(|c| filter.is_none_or(|f| c.name.contains(f)))
}

/// Boots the container and runs every selected check; prints each one like a scenario and
/// returns the counts. The container is torn down on every path.
pub async fn run(filter: Option<&str>) -> Result<Totals> {
    let selected: Vec<Check> = checks()
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .collect();
    let mut totals = Totals::default();
    if selected.is_empty() {
        return Ok(totals);
    }
    let logs = tempfile::Builder::new()
        .prefix("xtask-systemd-")
        .tempdir()
        .context("cannot create a temp dir")?;
    println!("== systemd: booting a {RELEASE} container with systemd-nspawn");
    let booted = Instant::now();
    let lab = match Lab::start(logs.path()).await {
        Ok(Ok(lab)) => lab,
        Ok(Err(skip)) => {
            for c in &selected {
                println!("== {}: {}", c.name, c.about);
                println!("  SKIP {} ({skip})", c.name);
                totals.skipped += 1;
            }
            return Ok(totals);
        }
        Err(e) => {
            // Every selected check fails: none of them could run.
            for c in &selected {
                println!("== {}: {}", c.name, c.about);
                println!("  FAIL {}: the container did not come up: {e:#}", c.name);
                totals.failed += 1;
            }
            println!("{}", harness::log_tails(logs.path(), 40));
            return Ok(totals);
        }
    };
    figure(
        "container up",
        format!(
            "{:.1}s ({}, pid 1 is host pid {})",
            booted.elapsed().as_secs_f64(),
            lab.container.version,
            lab.container.pid1
        ),
    );
    for c in selected {
        println!("== {}: {}", c.name, c.about);
        let started = Instant::now();
        let level = if c.debug { "debug" } else { "info" };
        if let Err(e) = lab.c().run(&["systemd-analyze", "log-level", level]).await {
            totals.failed += 1;
            println!("  FAIL {}: cannot set systemd's log level: {e:#}", c.name);
            continue;
        }
        let result = match tokio::time::timeout(c.timeout, (c.run)(&lab)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("timed out after {:?}", c.timeout)),
        };
        let took = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                totals.passed += 1;
                println!("  PASS {} ({took:.1}s)", c.name);
            }
            Err(e) => {
                totals.failed += 1;
                println!("  FAIL {} ({took:.1}s): {e:#}", c.name);
                println!("{}", lab.journal_tail(60).await);
            }
        }
    }
    lab.shutdown().await;
    Ok(totals)
}

// ---- the container ----------------------------------------------------------------------------

/// Why the checks cannot run on this machine (printed as the skip reason).
type Skip = String;

/// A booted systemd-nspawn container on a throwaway copy of the cached root.
struct Container {
    /// The copy it runs on (removed at the end).
    dir: PathBuf,
    nspawn: Option<Child>,
    /// Host pid of the container's systemd (pid 1 inside).
    pid1: u32,
    /// `systemctl --version`'s first line.
    version: String,
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
    fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid1))
    }

    /// Runs a command inside every namespace of the container.
    async fn exec(&self, args: &[&str]) -> Result<Output> {
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
    async fn run(&self, args: &[&str]) -> Result<String> {
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

    async fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.run(&all).await
    }

    /// `systemctl show UNIT -p ...` as a map.
    async fn show(&self, unit: &str, props: &[&str]) -> Result<HashMap<String, String>> {
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

    async fn prop(&self, unit: &str, prop: &str) -> Result<String> {
        self.show(unit, &[prop])
            .await?
            .remove(prop)
            .with_context(|| format!("systemctl show {unit} has no {prop}"))
    }

    async fn main_pid(&self, unit: &str) -> Result<u32> {
        self.prop(unit, "MainPID")
            .await?
            .parse()
            .with_context(|| format!("{unit}: MainPID is not a number"))
    }

    /// A journal cursor: what comes after it is what a check caused.
    async fn cursor(&self) -> Result<String> {
        let out = self
            .run(&["journalctl", "-n", "0", "--show-cursor", "-q"])
            .await?;
        out.lines()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .map(str::to_owned)
            .context("journalctl printed no cursor")
    }

    /// The journal lines of `unit` (systemd's lines about it and the daemon's own) after `cursor`.
    async fn journal_since(&self, unit: &str, cursor: &str) -> Result<Vec<String>> {
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
    async fn shutdown(&mut self) {
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
    fn pids_named(&self, name: &str) -> Vec<u32> {
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
    fn socket_inodes(&self, pid: u32) -> Result<Vec<u64>> {
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
    fn proc_status(&self, pid: u32, field: &str) -> Result<String> {
        let path = self.path(&format!("/proc/{pid}/status"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("{} has no {field}", path.display()))
    }

    /// The user name of `uid` in the container's /etc/passwd.
    fn user_name(&self, uid: u32) -> String {
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

/// The booted container with the units installed, and the backends it proxies to.
struct Lab {
    container: Container,
    /// proxyd's frontend, a port below 1024 that only fdkeeper's capability can bind.
    frontend: SocketAddr,
    servers: Vec<String>,
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
    async fn start(logs: &Path) -> Result<std::result::Result<Lab, Skip>> {
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

    async fn shutdown(mut self) {
        self.container.shutdown().await;
    }

    fn c(&self) -> &Container {
        &self.container
    }

    /// The last lines the three units logged, for a failed check's report.
    async fn journal_tail(&self, lines: usize) -> String {
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

    fn proxyd_admin(&self) -> PathBuf {
        self.c().path("/run/proxyd/admin.sock")
    }

    fn fdkeeper_admin(&self) -> PathBuf {
        self.c().path("/run/fdkeeper/admin.sock")
    }

    /// Starts proxyd (and so the other two) if needed, and waits until the frontend answers.
    async fn ensure_serving(&self) -> Result<cluster::ServingGeneration> {
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
    async fn serving(&self) -> Result<cluster::ServingGeneration> {
        let st = cluster::proxyd_status(&self.proxyd_admin()).await?;
        cluster::serving(&st).context("proxyd reports no serving generation")
    }

    async fn start_load(&self) -> Result<Load> {
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

    async fn stick_client(&self) -> Result<StickClient<tonic::transport::Channel>> {
        let socket = self.c().path("/run/stickd/stickd.sock");
        let ch = common::grpc::connect_unix(&socket)
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        Ok(StickClient::new(ch))
    }
}

/// The container's pid 1: the child of nspawn that is pid 1 in its own pid namespace.
fn container_init(nspawn: u32) -> Option<u32> {
    harness::descendants(nspawn).into_iter().find(|&pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ns| ns.split_whitespace().last() == Some("1"))
        }) && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "systemd")
    })
}

fn which(tool: &str) -> Option<PathBuf> {
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

fn dist(rel: &str) -> PathBuf {
    harness::workspace_root().join("dist").join(rel)
}

/// The cached debootstrap root, built on first use (about a minute). `Ok(Err)` when it cannot be.
async fn ensure_base(logs: &Path) -> Result<std::result::Result<PathBuf, Skip>> {
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
async fn fresh_copy(base: &Path) -> Result<PathBuf> {
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

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Replaces each `from` (which must occur exactly once) in a shipped config, so that the test
/// runs the shipped file with only its addresses changed.
fn patch(text: &str, file: &str, edits: &[(&str, String)]) -> Result<String> {
    let mut out = text.to_owned();
    for (from, to) in edits {
        let n = out.matches(from).count();
        ensure!(n == 1, "{file}: expected `{from}` once, found it {n} times");
        out = out.replace(from, to);
    }
    Ok(out)
}

/// Installs what an operator would (dist/systemd/README.md): binaries, units, sysusers, configs.
fn install(
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

// ---- shared bits of the checks ----------------------------------------------------------------

/// Polls `systemctl show` until `prop` of `unit` satisfies `ok`.
async fn wait_prop(
    lab: &Lab,
    unit: &str,
    prop: &str,
    timeout: Duration,
    ok: impl Fn(&str) -> bool,
) -> Result<String> {
    let ok = &ok;
    harness::wait_for(&format!("{unit}'s {prop}"), timeout, || async move {
        let v = lab.c().prop(unit, prop).await?;
        Ok(ok(&v).then_some(v))
    })
    .await
}

/// The first journal line of `unit` after `cursor` that matches, waiting up to 5 s for it: a
/// daemon's own output reaches the journal through its stream, which may lag systemd's lines.
async fn journal_line(
    c: &Container,
    unit: &str,
    cursor: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<String> {
    let matches = &matches;
    harness::wait_for(
        &format!("a matching line in {unit}'s journal"),
        Duration::from_secs(5),
        || async move {
            let lines = c.journal_since(unit, cursor).await?;
            Ok(lines.into_iter().find(|l| matches(l)))
        },
    )
    .await
}

/// How a unit's main process ended, from systemd's `ExecMainCode` (waitid's `CLD_*` code) and
/// `ExecMainStatus` (the exit code, or the signal).
fn main_exit(code: &str, status: &str) -> Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let status: i32 = status
        .parse()
        .with_context(|| format!("ExecMainStatus {status:?} is not a number"))?;
    let code: i32 = code
        .parse()
        .with_context(|| format!("ExecMainCode {code:?} is not a number"))?;
    // The wait status that waitpid would have given.
    let raw = match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_KILLED => status & 0x7f,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => bail!("ExecMainCode {code}: the main process has not ended"),
    };
    Ok(ExitStatus::from_raw(raw))
}

/// "[ 2351.730203] host ident[pid]: text" → the monotonic seconds.
fn monotonic(line: &str) -> Option<f64> {
    line.trim_start()
        .strip_prefix('[')?
        .split_once(']')?
        .0
        .trim()
        .parse()
        .ok()
}

// ---- the checks -------------------------------------------------------------------------------

async fn verify(lab: &Lab) -> Result<()> {
    let units: Vec<String> = UNITS
        .iter()
        .map(|u| format!("/etc/systemd/system/{u}.service"))
        .collect();
    let mut args = vec!["systemd-analyze", "verify"];
    args.extend(units.iter().map(String::as_str));
    let out = lab.c().exec(&args).await?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    figure(
        "systemd-analyze verify",
        format!(
            "{} on {} unit files, {} lines of output",
            out.status,
            units.len(),
            said.lines().count()
        ),
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify is not clean: {said}"
    );
    // systemd's own hardening score, for the record (lower is better; not a pass criterion).
    for u in UNITS {
        let unit = format!("{u}.service");
        let out = lab
            .c()
            .exec(&["systemd-analyze", "security", "--no-pager", &unit])
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.contains("Overall exposure level")) {
            figure(
                "systemd-analyze security",
                line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()),
            );
        }
    }
    let users = lab
        .c()
        .run(&["getent", "passwd", "fdkeeper", "stickd", "proxyd"])
        .await
        .context("the sysusers.d users are missing")?;
    figure("users", users.trim().replace('\n', "; "));
    Ok(())
}

async fn start(lab: &Lab) -> Result<()> {
    let c = lab.c();
    for u in UNITS {
        let state = c.prop(u, "ActiveState").await?;
        ensure!(state == "inactive", "{u} is {state} before the start");
    }
    let cursor = c.cursor().await?;
    let t0 = Instant::now();
    c.systemctl(&["start", "--no-block", "proxyd"]).await?;
    // Poll is-active; the moment a unit turns active, probe the daemon once: it must already
    // serve, since systemd waits for READY=1 and each daemon sends it only once it serves.
    let mut activating: BTreeMap<&str, u32> = BTreeMap::new();
    let mut active_at: BTreeMap<&str, Duration> = BTreeMap::new();
    while active_at.len() < UNITS.len() {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "not all active after 30s: {active_at:?}"
        );
        let mut args = vec!["systemctl", "is-active"];
        args.extend(UNITS);
        let out = c.exec(&args).await?;
        let states: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        ensure!(states.len() == UNITS.len(), "is-active printed {states:?}");
        for (u, state) in UNITS.iter().zip(&states) {
            if active_at.contains_key(u) {
                continue;
            }
            match state.as_str() {
                "active" => {
                    active_at.insert(u, t0.elapsed());
                    probe_ready(lab, u)
                        .await
                        .with_context(|| format!("{u} is active but does not serve yet"))?;
                }
                "activating" => *activating.entry(u).or_default() += 1,
                "failed" => bail!("{u} failed to start"),
                _ => {}
            }
        }
    }
    for u in UNITS {
        figure(
            u,
            format!(
                "active after {} (seen activating {} times), and serving at that moment",
                ms(active_at[u]),
                activating.get(u).copied().unwrap_or(0)
            ),
        );
    }

    // The journal: each unit went from start to running right after its daemon's READY=1.
    let mut ready_at = BTreeMap::new();
    for u in UNITS {
        let pid = c.main_pid(u).await?;
        let lines = c.journal_since(u, &cursor).await?;
        let ready = format!("Got notification message from PID {pid} (READY=1");
        let ready_idx = lines
            .iter()
            .position(|l| l.contains(&ready))
            .with_context(|| format!("{u}: no READY=1 from its main pid {pid} in the journal"))?;
        let running_idx = lines
            .iter()
            .position(|l| l.contains("Changed start -> running"))
            .with_context(|| format!("{u}: never changed start -> running"))?;
        ensure!(
            ready_idx < running_idx,
            "{u}: running before READY=1: {:?} / {:?}",
            lines[running_idx],
            lines[ready_idx]
        );
        let props = c
            .show(
                u,
                &[
                    "ExecMainStartTimestampMonotonic",
                    "ActiveEnterTimestampMonotonic",
                    "StatusText",
                ],
            )
            .await?;
        let num = |k: &str| -> Result<u64> {
            props
                .get(k)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{u}: no {k}"))
        };
        let (exec, active) = (
            num("ExecMainStartTimestampMonotonic")?,
            num("ActiveEnterTimestampMonotonic")?,
        );
        ready_at.insert(u, (exec, active));
        let (t_ready, t_running) = monotonic(&lines[ready_idx])
            .zip(monotonic(&lines[running_idx]))
            .with_context(|| format!("{u}: journal lines without a monotonic time"))?;
        figure(
            &format!("{u} READY"),
            format!(
                "{} after exec; running {:.0}us after {:?}; status {:?}",
                ms(Duration::from_micros(active.saturating_sub(exec))),
                (t_running - t_ready) * 1e6,
                lines[ready_idx]
                    .split_once(": ")
                    .map_or("", |(_, r)| r.trim()),
                props.get("StatusText").map(String::as_str).unwrap_or("")
            ),
        );
    }
    // Ordering: proxyd's master started only once both others were active.
    let proxyd_exec = ready_at["proxyd"].0;
    for u in ["fdkeeper", "stickd"] {
        ensure!(
            ready_at[u].1 <= proxyd_exec,
            "proxyd started before {u} was active"
        );
    }
    figure(
        "ordering",
        "proxyd's ExecStart ran after fdkeeper and stickd were active",
    );
    hardening(lab).await
}

/// The daemon behind `unit` serves right now (one attempt, no retry).
async fn probe_ready(lab: &Lab, unit: &str) -> Result<()> {
    match unit {
        "fdkeeper" => {
            let inodes = cluster::fdkeeper_inodes(&lab.fdkeeper_admin())?;
            figure(
                "fdkeeper at active",
                format!("admin answers, {} listeners", inodes.len()),
            );
        }
        "stickd" => {
            let tables = lab
                .stick_client()
                .await?
                .list_tables(pb::ListTablesRequest {})
                .await?
                .into_inner();
            figure(
                "stickd at active",
                format!("ListTables answers, {} tables", tables.tables.len()),
            );
        }
        "proxyd" => {
            let server = cluster::probe(lab.frontend, Duration::from_secs(2)).await?;
            figure(
                "proxyd at active",
                format!("{} answered 200 from {server}", lab.frontend),
            );
        }
        _ => bail!("unknown unit {unit}"),
    }
    Ok(())
}

/// Users, capabilities and modes: only fdkeeper may bind low ports, only proxyd may borrow.
async fn hardening(lab: &Lab) -> Result<()> {
    let c = lab.c();
    for u in UNITS {
        let pid = c.main_pid(u).await?;
        let uid: u32 = c
            .proc_status(pid, "Uid")?
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("bad Uid line")?;
        let user = c.user_name(uid);
        let cap_eff = c.proc_status(pid, "CapEff")?;
        let cap_bnd = c.proc_status(pid, "CapBnd")?;
        let no_new_privs = c.proc_status(pid, "NoNewPrivs")?;
        figure(
            &format!("{u} main pid {pid}"),
            format!("user {user}, CapEff {cap_eff}, CapBnd {cap_bnd}, NoNewPrivs {no_new_privs}"),
        );
        ensure!(user == u, "{u} runs as {user}");
        let want = if u == "fdkeeper" {
            1u64 << 10 // CAP_NET_BIND_SERVICE
        } else {
            0
        };
        let eff = u64::from_str_radix(&cap_eff, 16).context("bad CapEff")?;
        let bnd = u64::from_str_radix(&cap_bnd, 16).context("bad CapBnd")?;
        ensure!(
            eff == want && bnd == want,
            "{u}: capabilities {eff:#x}/{bnd:#x}, want {want:#x}"
        );
        ensure!(no_new_privs == "1", "{u}: NoNewPrivs is {no_new_privs}");
    }
    for (path, want_mode, want_owner) in [
        ("/run/fdkeeper", 0o750, "fdkeeper"),
        ("/run/fdkeeper/lend.sock", 0o660, "fdkeeper"),
        ("/run/fdkeeper/admin.sock", 0o600, "fdkeeper"),
        ("/var/lib/stickd", 0o700, "stickd"),
        ("/run/proxyd/admin.sock", 0o600, "proxyd"),
    ] {
        let meta = std::fs::metadata(c.path(path)).with_context(|| format!("{path} is missing"))?;
        let mode = meta.mode() & 0o7777;
        let owner = c.user_name(meta.uid());
        figure(path, format!("{mode:04o} {owner}"));
        ensure!(
            mode == want_mode && owner == want_owner,
            "{path} is {mode:04o} {owner}, want {want_mode:04o} {want_owner}"
        );
    }
    // Borrowing: the stickd user cannot reach the lending socket, the proxyd user can.
    let addr = lab.frontend.to_string();
    let borrow = |user: &'static str| {
        let addr = addr.clone();
        async move {
            c.exec(&[
                "runuser",
                "-u",
                user,
                "--",
                "/usr/local/bin/fdkeeper",
                "acquire",
                "--socket",
                "/run/fdkeeper/lend.sock",
                "--borrower",
                "systemd e2e",
                &addr,
            ])
            .await
        }
    };
    let as_stickd = borrow("stickd").await?;
    let err = String::from_utf8_lossy(&as_stickd.stderr).trim().to_owned();
    figure("borrow as stickd", format!("{}: {err}", as_stickd.status));
    ensure!(
        !as_stickd.status.success(),
        "the stickd user could borrow a listener"
    );
    let as_proxyd = borrow("proxyd").await?;
    let said = String::from_utf8_lossy(&as_proxyd.stdout).trim().to_owned();
    figure("borrow as proxyd", format!("{}: {said}", as_proxyd.status));
    ensure!(
        as_proxyd.status.success(),
        "the proxyd user could not borrow: {}",
        String::from_utf8_lossy(&as_proxyd.stderr).trim()
    );
    Ok(())
}

async fn reloads(lab: &Lab) -> Result<()> {
    let c = lab.c();
    let first = lab.ensure_serving().await?;
    let admin = lab.proxyd_admin();
    let load = lab.start_load().await?;
    let mut generation = first.generation;
    let mut took = Vec::with_capacity(RELOADS);
    for i in 1..=RELOADS {
        let t0 = Instant::now();
        c.systemctl(&["reload", "proxyd"])
            .await
            .with_context(|| format!("reload {i}"))?;
        let (s, seen) = cluster::wait_new_generation(&admin, generation, Duration::from_secs(15))
            .await
            .with_context(|| format!("reload {i}"))?;
        took.push(seen - t0);
        generation = s.generation;
    }
    // systemd's view: the STATUS= that proxyd sent with READY=1 after the last reload.
    let want = format!("generation {generation},");
    wait_prop(lab, "proxyd", "StatusText", Duration::from_secs(10), |s| {
        s.starts_with(&want)
    })
    .await?;
    let status = c
        .systemctl(&["status", "proxyd", "--no-pager", "-n", "0"])
        .await?;
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with("Status:"))
        .context("systemctl status shows no Status: line")?;
    figure("systemctl status", line.trim());
    ensure!(line.contains(&want), "status line {line:?} lacks {want:?}");
    // Let the last drains finish under load before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    took.sort_unstable();
    figure(
        "reloads",
        format!(
            "{RELOADS} (generation {} -> {generation}); systemctl reload to new generation serving: \
             p50 {} p99 {} max {}",
            first.generation,
            ms(percentile(&took, 50.0)),
            ms(percentile(&took, 99.0)),
            ms(percentile(&took, 100.0))
        ),
    );
    print_load(&report);
    ensure!(
        generation == first.generation + RELOADS as u64,
        "expected generation {}, got {generation}",
        first.generation + RELOADS as u64
    );
    ensure_no_failures(&report)
}

async fn broken_reload(lab: &Lab) -> Result<()> {
    let c = lab.c();
    let before = lab.ensure_serving().await?;
    let master = c.main_pid("proxyd").await?;
    let status_before = c.prop("proxyd", "StatusText").await?;
    let config = c.path("/etc/proxyd/proxyd.toml");
    let good = std::fs::read_to_string(&config)?;
    let broken = patch(
        &good,
        "proxyd.toml",
        &[("[global]\n", "[global]\nworkers = 4\n".to_owned())],
    )?;
    let broken_line = broken
        .lines()
        .position(|l| l == "workers = 4")
        .map(|i| i + 1)
        .context("broken line")?;
    let load = lab.start_load().await?;
    let cursor = c.cursor().await?;
    std::fs::write(&config, &broken)?;
    let result = c.exec(&["systemctl", "reload", "proxyd"]).await;
    // Put the good file back whatever happened, before anything can fail.
    std::fs::write(&config, &good)?;
    let out = result?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    figure(
        "systemctl reload (broken)",
        format!("{}: {said}", out.status),
    );
    ensure!(
        !out.status.success(),
        "the reload of a broken config succeeded"
    );
    let want = format!("/etc/proxyd/proxyd.toml:{broken_line}:");
    // The check's stderr reaches the journal through its own stream, after systemd's lines.
    let reason = journal_line(c, "proxyd", &cursor, |l| l.contains(&want)).await?;
    let journal = c.journal_since("proxyd", &cursor).await?;
    figure("journal", reason.split_once(": ").map_or("", |(_, r)| r));
    let failed = journal
        .iter()
        .find(|l| l.contains("Reload failed") || l.contains("status=64"))
        .context("the journal does not say the reload failed")?;
    figure("journal", failed.split_once(": ").map_or("", |(_, r)| r));

    // Still serving: same master, same generation, same status, traffic flows.
    load.wait_ok(300, Duration::from_secs(10)).await?;
    let props = c
        .show(
            "proxyd",
            &["ActiveState", "SubState", "MainPID", "StatusText"],
        )
        .await?;
    let now = lab.serving().await?;
    figure(
        "after",
        format!(
            "{}/{}, master {} (was {master}), generation {} (was {}), status {:?}",
            props["ActiveState"],
            props["SubState"],
            props["MainPID"],
            now.generation,
            before.generation,
            props["StatusText"]
        ),
    );
    ensure!(
        props["ActiveState"] == "active",
        "proxyd is {}",
        props["ActiveState"]
    );
    ensure!(props["MainPID"] == master.to_string(), "the master changed");
    ensure!(
        now.generation == before.generation,
        "the generation changed"
    );
    ensure!(
        props["StatusText"] == status_before,
        "the master was signalled: status {:?} -> {:?}",
        status_before,
        props["StatusText"]
    );
    // And the good config reloads again.
    c.systemctl(&["reload", "proxyd"]).await?;
    let (next, _) =
        cluster::wait_new_generation(&lab.proxyd_admin(), now.generation, Duration::from_secs(15))
            .await?;
    figure(
        "reload with the good config",
        format!("generation {} serves", next.generation),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)
}

async fn kill_proxyd(lab: &Lab) -> Result<()> {
    let c = lab.c();
    lab.ensure_serving().await?;
    let props = c.show("proxyd", &["MainPID", "NRestarts"]).await?;
    let master: u32 = props["MainPID"].parse()?;
    let restarts: u64 = props["NRestarts"].parse()?;
    let before_pids = c.pids_named("proxyd");
    let load = lab.start_load().await?;
    let snap = load.snapshot();
    let at_risk = load.at_risk();
    let t0 = Instant::now();
    c.systemctl(&["kill", "-s", "KILL", "proxyd"]).await?;
    // A fresh connection waits in fdkeeper's accept queue until a new worker accepts it.
    let served = loop {
        match cluster::probe(lab.frontend, Duration::from_secs(5)).await {
            Ok(_) => break t0.elapsed(),
            Err(e) if t0.elapsed() > Duration::from_secs(15) => {
                return Err(e.context("nothing serves 15s after the kill"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let want = (restarts + 1).to_string();
    wait_prop(lab, "proxyd", "NRestarts", Duration::from_secs(15), |v| {
        v == want
    })
    .await?;
    let new_master = wait_prop(lab, "proxyd", "MainPID", Duration::from_secs(15), |v| {
        v != "0" && v != master.to_string()
    })
    .await?;
    wait_prop(lab, "proxyd", "ActiveState", Duration::from_secs(15), |v| {
        v == "active"
    })
    .await?;
    let survivors: Vec<u32> = c
        .pids_named("proxyd")
        .into_iter()
        .filter(|p| before_pids.contains(p))
        .collect();
    ensure!(
        survivors.is_empty(),
        "killed processes still alive: {survivors:?}"
    );
    // The restarted proxyd carries the load for a while before counting.
    load.wait_ok(300, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    let failures = report.failures.since(&snap.failures);
    figure(
        "kill",
        format!(
            "{} processes killed (master {master} and workers); a new master {new_master} \
             (NRestarts {want}); first 200 after {}",
            before_pids.len(),
            ms(served)
        ),
    );
    figure(
        "failures",
        format!(
            "{} ({}, in flight or idle keep-alive at the kill: {at_risk})",
            failures.total(),
            failures
        ),
    );
    // Every in-flight request fails the same way: a few samples are enough.
    figure("load", report.summary());
    for f in report.samples.iter().take(3) {
        figure("failure", f);
    }
    ensure!(
        report.failures.get(FailKind::Refused) == 0,
        "{} refused connections",
        report.failures.get(FailKind::Refused)
    );
    // Each client has at most one request on the killed worker (the next one waits in the
    // accept queue for the new worker). The at-risk count is printed for comparison, but a
    // connection-close client may connect in the instant between that count and the kill.
    let clients = (CLIENTS.0 + CLIENTS.1 + CLIENTS.2) as u64;
    ensure!(
        failures.total() <= clients,
        "{} failures, more than one per client ({clients})",
        failures.total()
    );
    Ok(())
}

async fn restart_fdkeeper(lab: &Lab) -> Result<()> {
    let c = lab.c();
    let gen_before = lab.ensure_serving().await?;
    let frontend = lab.frontend.to_string();
    let inode_of = |listing: &[(String, u64)]| -> Result<u64> {
        listing
            .iter()
            .find(|(a, _)| *a == frontend)
            .map(|(_, i)| *i)
            .with_context(|| format!("fdkeeper holds no {frontend}: {listing:?}"))
    };
    let inode = inode_of(&cluster::fdkeeper_inodes(&lab.fdkeeper_admin())?)?;
    let props = c
        .show("fdkeeper", &["MainPID", "NFileDescriptorStore"])
        .await?;
    let old_pid = props["MainPID"].clone();
    let load = lab.start_load().await?;
    let cursor = c.cursor().await?;
    let t0 = Instant::now();
    c.systemctl(&["restart", "fdkeeper"]).await?;
    let took = t0.elapsed();
    let after = c
        .show(
            "fdkeeper",
            &["MainPID", "NFileDescriptorStore", "ActiveState"],
        )
        .await?;
    ensure!(after["MainPID"] != old_pid, "fdkeeper's pid did not change");
    ensure!(
        after["ActiveState"] == "active",
        "fdkeeper is {}",
        after["ActiveState"]
    );
    let inode_after = inode_of(&cluster::fdkeeper_inodes(&lab.fdkeeper_admin())?)?;
    let adopted = journal_line(c, "fdkeeper", &cursor, |l| {
        l.contains("systemd-fdstore") && l.contains(&frontend)
    })
    .await
    .context("the new fdkeeper did not take the listener from the fd store")?;
    figure(
        "restart",
        format!(
            "pid {old_pid} -> {} in {}; fd store {} -> {} fds",
            after["MainPID"],
            ms(took),
            props["NFileDescriptorStore"],
            after["NFileDescriptorStore"]
        ),
    );
    figure("journal", adopted.split_once(": ").map_or("", |(_, r)| r));
    figure("listener inode", format!("{inode} -> {inode_after}"));
    ensure!(
        inode == inode_after,
        "the listener changed: {inode} -> {inode_after}"
    );
    // A crash too: after a SIGKILL, systemd's automatic restart hands the store back.
    let restarts: u64 = c.prop("fdkeeper", "NRestarts").await?.parse()?;
    let t1 = Instant::now();
    // fdkeeper is one process: --kill-who=main spares systemd a cgroup-wide kill, which fails
    // with EIO on this hybrid cgroup v1 host when the cgroup holds nothing but the main pid.
    c.systemctl(&["kill", "--kill-who=main", "-s", "KILL", "fdkeeper"])
        .await?;
    let want = (restarts + 1).to_string();
    wait_prop(lab, "fdkeeper", "NRestarts", Duration::from_secs(15), |v| {
        v == want
    })
    .await?;
    wait_prop(
        lab,
        "fdkeeper",
        "ActiveState",
        Duration::from_secs(15),
        |v| v == "active",
    )
    .await?;
    let back = t1.elapsed();
    let revived = c.main_pid("fdkeeper").await?;
    let inode_revived = inode_of(&cluster::fdkeeper_inodes(&lab.fdkeeper_admin())?)?;
    figure(
        "kill -9",
        format!(
            "pid {} -> {revived}, active again after {} (NRestarts {want}); listener inode {inode_revived}",
            after["MainPID"],
            ms(back)
        ),
    );
    ensure!(
        revived.to_string() != after["MainPID"],
        "fdkeeper's pid did not change"
    );
    ensure!(
        inode_revived == inode,
        "the listener changed after the kill: {inode} -> {inode_revived}"
    );
    // A full stop and start: systemd 252 releases the fd store with the stopped unit (254+
    // with the fdstore-preserve drop-in would keep it); proxyd's workers hold the listener
    // meanwhile and deposit it with the new fdkeeper, so it is the same socket again.
    let cursor = c.cursor().await?;
    c.systemctl(&["stop", "fdkeeper"]).await?;
    let stored_stopped = c.prop("fdkeeper", "NFileDescriptorStore").await?;
    let t2 = Instant::now();
    c.systemctl(&["start", "fdkeeper"]).await?;
    let admin = lab.fdkeeper_admin();
    let inode_deposited = harness::wait_for(
        "the workers to deposit the listener with the new fdkeeper",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            let frontend = frontend.clone();
            async move {
                Ok(cluster::fdkeeper_inodes(&admin)?
                    .into_iter()
                    .find(|(a, _)| *a == frontend)
                    .map(|(_, i)| i))
            }
        },
    )
    .await?;
    let held_again = t2.elapsed();
    let held_line = journal_line(c, "fdkeeper", &cursor, |l| {
        l.contains("holding listener") && l.contains(&frontend)
    })
    .await?;
    let origin = held_line
        .split("origin=")
        .nth(1)
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    figure(
        "stop + start",
        format!(
            "fd store while stopped: {stored_stopped} fds; listener held again {} after the \
             start (origin {origin}), inode {inode_deposited}",
            ms(held_again)
        ),
    );
    ensure!(
        inode_deposited == inode,
        "the listener changed across stop and start: {inode} -> {inode_deposited}"
    );
    // The next generation borrows from the new fdkeeper, and gets the very same socket.
    c.systemctl(&["reload", "proxyd"]).await?;
    let (next, _) = cluster::wait_new_generation(
        &lab.proxyd_admin(),
        gen_before.generation,
        Duration::from_secs(15),
    )
    .await?;
    let held = c.socket_inodes(next.pid)?;
    figure(
        "after a reload",
        format!(
            "generation {} (worker {}) holds inode {inode}: {}",
            next.generation,
            next.pid,
            held.contains(&inode)
        ),
    );
    ensure!(
        held.contains(&inode),
        "the new worker does not hold inode {inode}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure!(
        report.failures.get(FailKind::Refused) == 0,
        "{} refused connections",
        report.failures.get(FailKind::Refused)
    );
    ensure_no_failures(&report)
}

async fn restart_stickd(lab: &Lab) -> Result<()> {
    let c = lab.c();
    // proxyd runs across the restart: it must follow stickd, not be restarted with it.
    let serving = lab.ensure_serving().await?;
    let master = c.main_pid("proxyd").await?;
    let table = "sessions";
    let items: Vec<pb::StoreItem> = (0..15)
        .map(|i| pb::StoreItem {
            key: backend::new_session_id(),
            server: lab.servers[i % lab.servers.len()].clone(),
            expires_unix_ms: 0,
        })
        .collect();
    lab.stick_client()
        .await?
        .store(pb::StoreRequest {
            table: table.into(),
            items: items.clone(),
        })
        .await
        .context("Store")?;
    // Every page: the load of the earlier checks stored a session per cookie-less request.
    let show = || async {
        let mut client = lab.stick_client().await?;
        let mut out = BTreeMap::new();
        let mut page_token = String::new();
        loop {
            let reply = client
                .show(pb::ShowRequest {
                    table: table.into(),
                    page_token,
                    ..Default::default()
                })
                .await
                .context("Show")?
                .into_inner();
            for e in reply.entries {
                out.insert(e.key, (e.server, e.expires_unix_ms, e.version, e.origin));
            }
            if reply.next_page_token.is_empty() {
                return anyhow::Ok(out);
            }
            page_token = reply.next_page_token;
        }
    };
    // The earlier checks' load may still have batched stores on their way (and a full table
    // evicts for each): compare a table that has settled, so that only the restart can change it.
    let settle = Instant::now();
    let mut before = show().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = show().await?;
        if again == before {
            break;
        }
        ensure!(
            settle.elapsed() < Duration::from_secs(15),
            "the table kept changing for 15 s with no load"
        );
        before = again;
    }
    figure("table settled after", ms(settle.elapsed()));
    for it in &items {
        ensure!(before.contains_key(&it.key), "{} was not stored", it.key);
    }
    let old_pid = c.main_pid("stickd").await?;
    let cursor = c.cursor().await?;
    let t0 = Instant::now();
    c.systemctl(&["restart", "stickd"]).await?;
    let took = t0.elapsed();
    let new_pid = c.main_pid("stickd").await?;
    ensure!(new_pid != old_pid, "stickd's pid did not change");
    let after = show().await?;
    figure(
        "restart",
        format!("pid {old_pid} -> {new_pid} in {} (active again)", ms(took)),
    );
    figure(
        "table",
        format!(
            "{} entries before, {} after, identical (key, server, expiry, version, origin): {}",
            before.len(),
            after.len(),
            before == after
        ),
    );
    ensure!(before.len() >= 15, "only {} entries before", before.len());
    if before != after {
        let missing: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let changed: Vec<_> = before
            .iter()
            .filter_map(|(k, v)| after.get(k).filter(|a| *a != v).map(|a| (k, v, a)))
            .collect();
        bail!(
            "the table changed across the restart: {} missing (e.g. {:?}), {} added (e.g. {:?}), {} changed (e.g. {:?})",
            missing.len(),
            missing.first(),
            added.len(),
            added.first(),
            changed.len(),
            changed.first()
        );
    }

    // proxyd (user proxyd, group stickd) follows the restarted stickd: a session stored now
    // reaches its workers through a fresh Watch stream, and requests carrying that cookie
    // stick to the stored server instead of alternating round robin.
    let still = lab.serving().await?;
    let master_now = c.main_pid("proxyd").await?;
    ensure!(
        master_now == master && still.pid == serving.pid,
        "proxyd was restarted with stickd (master {master} -> {master_now})"
    );
    // First the fresh stream itself: until proxyd's worker has reloaded its cache from the new
    // stickd, a request with an unknown cookie stores the worker's own pick (`stick on` matches
    // and stores, as in HAProxy), a newer write than the test's, which it would then win.
    journal_line(c, "proxyd", &cursor, |l| {
        l.contains("stick cache loaded from stickd")
    })
    .await
    .context("proxyd's worker did not reload its stick cache from the restarted stickd")?;
    figure(
        "proxyd's stick cache reloaded from the new stickd",
        format!("seen {} after the restart began", ms(t0.elapsed())),
    );
    let key = backend::new_session_id();
    let server = lab.servers[1].clone();
    let t1 = Instant::now();
    lab.stick_client()
        .await?
        .store(pb::StoreRequest {
            table: table.into(),
            items: vec![pb::StoreItem {
                key: key.clone(),
                server: server.clone(),
                expires_unix_ms: 0,
            }],
        })
        .await
        .context("Store after the restart")?;
    const IN_A_ROW: usize = 6;
    let (frontend, key_ref, server_ref) = (lab.frontend, &key, &server);
    harness::wait_for(
        &format!("{IN_A_ROW} requests with PHPSESSID={key} in a row to reach {server}"),
        Duration::from_secs(10),
        || async move {
            for _ in 0..IN_A_ROW {
                if probe_cookie(frontend, key_ref).await? != *server_ref {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    figure(
        "stickiness after the restart",
        format!(
            "proxyd (master {master}, worker {}) untouched; a session stored after the restart: \
             {IN_A_ROW} requests in a row to {server} within {}",
            serving.pid,
            ms(t1.elapsed())
        ),
    );
    Ok(())
}

/// One `GET /` with `Cookie: PHPSESSID=key` on a fresh connection; the server that answered.
async fn probe_cookie(addr: SocketAddr, key: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: probe\r\nCookie: PHPSESSID={key}\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no answer within 5s")??;
    ensure!(
        text.starts_with("HTTP/1.1 200"),
        "answered {:?}",
        text.lines().next().unwrap_or_default()
    );
    text.lines()
        .find_map(|l| l.strip_prefix("server: "))
        .map(str::to_owned)
        .context("an answer without a server name")
}

async fn stop(lab: &Lab) -> Result<()> {
    let c = lab.c();
    lab.ensure_serving().await?;
    let mut mains = BTreeMap::new();
    for u in UNITS {
        mains.insert(u, c.main_pid(u).await?);
    }
    let cursor = c.cursor().await?;
    let t0 = Instant::now();
    c.systemctl(&["stop", "proxyd", "stickd", "fdkeeper"])
        .await?;
    figure(
        "systemctl stop",
        format!("returned after {}", ms(t0.elapsed())),
    );
    for u in UNITS {
        let p = c
            .show(
                u,
                &["ActiveState", "Result", "ExecMainCode", "ExecMainStatus"],
            )
            .await?;
        let exit = main_exit(&p["ExecMainCode"], &p["ExecMainStatus"]);
        let journal = c.journal_since(u, &cursor).await?;
        let stopping = format!("Got notification message from PID {} (STOPPING=1", mains[u]);
        let seen = journal.iter().find(|l| l.contains(&stopping));
        let killed = journal
            .iter()
            .find(|l| l.contains("SIGKILL") || l.contains("Killing process"));
        figure(
            u,
            format!(
                "{}, result {}, {}; {}",
                p["ActiveState"],
                p["Result"],
                exit.as_ref()
                    .map_or_else(|e| format!("{e:#}"), ToString::to_string),
                seen.map_or("no STOPPING=1".to_owned(), |l| l
                    .split_once(": ")
                    .map_or(String::new(), |(_, r)| r.to_owned()))
            ),
        );
        ensure!(
            p["ActiveState"] == "inactive",
            "{u} is {}",
            p["ActiveState"]
        );
        ensure!(p["Result"] == "success", "{u}: result {}", p["Result"]);
        // Result=success already rules out a non-zero exit and an unclean signal.
        let exit = exit?;
        ensure!(exit.success(), "{u} ended with {exit}");
        ensure!(seen.is_some(), "{u}: no STOPPING=1 from pid {}", mains[u]);
        ensure!(killed.is_none(), "{u} needed a SIGKILL: {killed:?}");
    }
    let left: Vec<(&str, Vec<u32>)> = UNITS
        .iter()
        .map(|u| (*u, c.pids_named(u)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    ensure!(left.is_empty(), "still running: {left:?}");
    ensure!(
        !c.path("/run/fdkeeper").exists(),
        "/run/fdkeeper survived the stop"
    );
    // The fd store is released with the unit: nothing listens on the frontend any more.
    let refused = match tokio::net::TcpStream::connect(lab.frontend).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    };
    figure(
        "after",
        format!(
            "no fdkeeper/stickd/proxyd process left, /run/fdkeeper removed, {} refuses connections: {refused}",
            lab.frontend
        ),
    );
    ensure!(refused, "{} still accepts connections", lab.frontend);
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

    #[test]
    fn main_exit_reads_systemd_codes() {
        let ok = main_exit("1", "0").expect("exited");
        assert!(ok.success());
        assert_eq!(ok.code(), Some(0));
        assert_eq!(main_exit("1", "64").expect("exited").code(), Some(64));
        let killed = main_exit("2", "9").expect("killed");
        assert!(!killed.success());
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&killed),
            Some(9)
        );
        assert!(main_exit("0", "0").is_err());
        assert!(main_exit("1", "x").is_err());
    }

    #[test]
    fn journal_monotonic_time() {
        assert_eq!(
            monotonic("[ 2351.730203] vm systemd[1]: fdkeeper.service: Changed start -> running"),
            Some(2351.730203)
        );
        assert_eq!(monotonic("no time"), None);
    }
}
