//! Checks 2 to 4: reloads under load, a broken reload, a killed proxyd that systemd restarts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::container::patch;
use super::lab::Lab;
use super::{CLIENTS, RELOADS, journal_line, wait_prop};
use crate::cluster;
use crate::e2e::{ensure_no_failures, figure, ms, print_load};
use crate::load::{FailKind, percentile};

pub(super) async fn reloads(lab: &Lab) -> Result<()> {
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

pub(super) async fn broken_reload(lab: &Lab) -> Result<()> {
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

pub(super) async fn kill_proxyd(lab: &Lab) -> Result<()> {
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
