//! Checks 5 to 7: fdkeeper and stickd restarted under load, then a clean stop of all three.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;

use super::lab::Lab;
use super::{UNITS, journal_line, main_exit, wait_prop};
use crate::backend;
use crate::cluster;
use crate::e2e::{ensure_no_failures, figure, ms, print_load};
use crate::harness;
use crate::load::FailKind;

pub(super) async fn restart_fdkeeper(lab: &Lab) -> Result<()> {
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

pub(super) async fn restart_stickd(lab: &Lab) -> Result<()> {
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
            omit_entries: false,
            watcher: 0,
            batch: 0,
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
            omit_entries: false,
            watcher: 0,
            batch: 0,
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

pub(super) async fn stop(lab: &Lab) -> Result<()> {
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
                match &exit {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => "no exit status kept".to_owned(),
                    Err(e) => format!("{e:#}"),
                },
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
        if let Some(exit) = exit? {
            ensure!(exit.success(), "{u} ended with {exit}");
        }
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
