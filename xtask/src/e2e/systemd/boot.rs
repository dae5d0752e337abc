//! Checks 0 and 1: the units verify clean, start in order on READY=1, and run hardened.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;

use super::lab::Lab;
use super::{UNITS, monotonic};
use crate::cluster;
use crate::e2e::{figure, ms};

pub(super) async fn verify(lab: &Lab) -> Result<()> {
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

pub(super) async fn start(lab: &Lab) -> Result<()> {
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
