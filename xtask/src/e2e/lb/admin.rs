//! The admin surface: SetServer and ShowServers, refused stick tables, coalesced touches.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Lb, LbNode, TABLE, get};
use crate::cluster::{self, START_TIMEOUT};
use crate::e2e::{Outcome, figure};
use crate::harness::{self, Env};

fn set_server(node: &LbNode, data: serde_json::Value) -> Result<serde_json::Value> {
    harness::grpcurl(&node.proxyd_admin, "proxyd.v1.Admin/SetServer", Some(&data))
}

async fn show_servers(node: &LbNode) -> Result<Vec<serde_json::Value>> {
    let v = harness::grpcurl(
        &node.proxyd_admin,
        "proxyd.v1.Admin/ShowServers",
        Some(&serde_json::json!({})),
    )?;
    Ok(v["servers"].as_array().cloned().unwrap_or_default())
}

async fn new_sessions_on(fe: SocketAddr, n: usize) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = get(fe, None).await?;
        ensure!(r.status == 200, "status {}", r.status);
        out.push((
            r.set_cookie.context("no cookie")?,
            r.server.context("no server")?,
        ));
    }
    Ok(out)
}

pub(super) async fn admin(env: Env) -> Result<Outcome> {
    let mut lb = Lb::start(env).await?;
    let n1 = &lb.nodes[0];
    let servers = harness::wait_for(
        "ShowServers to list both servers",
        START_TIMEOUT,
        || async {
            let s = show_servers(n1).await?;
            Ok((s.len() == 2 && s.iter().all(|x| x["health"] == "up")).then_some(s))
        },
    )
    .await?;
    figure(
        "ShowServers",
        servers
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} w{}",
                    s["server"], s["health"], s["adminState"], s["weight"]
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let clients = new_sessions_on(n1.frontend, 20).await?;
    let on_app1: Vec<&(String, String)> = clients.iter().filter(|(_, s)| s == "app1").collect();
    ensure!(!on_app1.is_empty(), "no session on app1");

    // drain: stuck clients stay, new sessions go elsewhere.
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "drain"}),
    )?;
    for (c, _) in &on_app1 {
        let r = get(n1.frontend, Some(c)).await?;
        ensure!(
            r.server.as_deref() == Some("app1"),
            "a stuck client left a draining server"
        );
    }
    let fresh = new_sessions_on(n1.frontend, 10).await?;
    ensure!(
        fresh.iter().all(|(_, s)| s == "app2"),
        "a new session went to a draining server"
    );

    // maint: stuck clients move (redispatch), with no failure.
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "maint"}),
    )?;
    for (c, _) in &on_app1 {
        let r = get(n1.frontend, Some(c)).await?;
        ensure!(
            r.status == 200 && r.server.as_deref() == Some("app2"),
            "a client stayed on a server in maintenance: {r:?}"
        );
    }
    figure(
        "maint",
        format!("{} clients of app1 moved to app2, 0 failed", on_app1.len()),
    );

    // ready with weight 3: exactly 3 of every 4 new sessions on app1 (smooth round robin).
    set_server(
        n1,
        serde_json::json!({"backend": TABLE, "server": "app1", "state": "ready", "weight": 3}),
    )?;
    let fresh = new_sessions_on(n1.frontend, 8).await?;
    let a1 = fresh.iter().filter(|(_, s)| s == "app1").count();
    figure(
        "weights 3:1, 8 new sessions",
        format!("{a1} on app1, {} on app2", 8 - a1),
    );
    ensure!(a1 == 6, "{a1} of 8 on app1, expected 6");

    // A reload keeps the operator's changes.
    let before = cluster::serving(&cluster::proxyd_status(&n1.proxyd_admin).await?)
        .context("no serving generation")?;
    n1.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    cluster::wait_new_generation(&n1.proxyd_admin, before.generation, Duration::from_secs(20))
        .await?;
    harness::wait_for(
        "the new generation to report weight 3",
        Duration::from_secs(5),
        || async {
            let s = show_servers(n1).await?;
            Ok(s.iter()
                .any(|x| x["server"] == "app1" && x["weight"] == 3 && x["adminState"] == "ready")
                .then_some(()))
        },
    )
    .await?;

    // A crash of the whole proxyd tree keeps them too: the restarted master reads them back
    // from its server_state_file.
    let n1 = &mut lb.nodes[0];
    n1.proxyd.restart()?;
    let n1 = &lb.nodes[0];
    harness::wait_for(
        "the restarted master to report weight 3",
        START_TIMEOUT,
        || async {
            let s = show_servers(n1).await?;
            Ok(s.iter()
                .any(|x| x["server"] == "app1" && x["weight"] == 3 && x["adminState"] == "ready")
                .then_some(()))
        },
    )
    .await?;
    figure("kill -9 of proxyd, restarted", "app1 still weight 3");
    // The reload counter below is the restarted master's: reload once more.
    let before = cluster::serving(&cluster::proxyd_status(&n1.proxyd_admin).await?)
        .context("no serving generation")?;
    n1.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    cluster::wait_new_generation(&n1.proxyd_admin, before.generation, Duration::from_secs(20))
        .await?;

    // Prometheus (counters are the new generation's: give it some traffic). A connection made
    // just as the reload ends may still be accepted by the old generation, whose counters these
    // are not: sessions go one at a time until the new one has counted enough, 20 at most.
    let wanted = [
        ("proxyd_frontend_requests_total{frontend=\"http-in\"}", 4),
        (
            "proxyd_server_requests_total{backend=\"dynamic_group\",server=\"app1\"}",
            2,
        ),
        (
            "proxyd_server_responses_total{backend=\"dynamic_group\",server=\"app1\",code=\"2xx\"}",
            2,
        ),
        ("proxyd_stick_stores_sent_total", 4),
    ];
    let mut short = Vec::new();
    for _ in 0..20 {
        new_sessions_on(n1.frontend, 1).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        short.clear();
        for (name, min) in wanted {
            let v = metric_value(n1.metrics, name).await?;
            if v < min {
                short.push(format!("{name} is {v}, expected at least {min}"));
            }
        }
        if short.is_empty() {
            break;
        }
    }
    ensure!(
        short.is_empty(),
        "after 20 new sessions: {}",
        short.join("; ")
    );
    let text = {
        let mut s = tokio::net::TcpStream::connect(n1.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        String::from_utf8_lossy(&buf).into_owned()
    };
    for want in [
        "proxyd_server_up{backend=\"dynamic_group\",server=\"app1\"} 1",
        "proxyd_server_weight{backend=\"dynamic_group\",server=\"app1\"} 3",
        "proxyd_stickd_link_up 1",
        "proxyd_stick_cache_entries ",
        "proxyd_server_responses_total{backend=\"dynamic_group\",server=\"app2\",code=\"2xx\"}",
        "proxyd_reloads_total{result=\"ok\"} 1",
    ] {
        ensure!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }
    figure("/metrics", format!("{} lines", text.lines().count()));
    Ok(Outcome::Pass)
}

pub(super) async fn table_refused(env: Env) -> Result<Outcome> {
    let lb = Lb::start_with(env, 1, None).await?;
    let n = &lb.nodes[0];
    let clients = new_sessions_on(n.frontend, 6).await?;
    let good = std::fs::read_to_string(&n.proxyd_config)?;
    for (what, replace, want) in [
        (
            "missing table",
            "[backend.stick]\ntable = \"missing\"\n",
            "stick table 'missing': not defined in stickd",
        ),
        (
            "incompatible type",
            "[backend.stick]\non = \"src\"\n#",
            "stick table 'dynamic_group': type string in stickd, ip or ipv6 (for src) needed",
        ),
    ] {
        std::fs::write(
            &n.proxyd_config,
            good.replacen("[backend.stick]\n", replace, 1),
        )?;
        let out = std::process::Command::new(harness::release_bin("proxyd"))
            .arg("reload")
            .arg("--config")
            .arg(&n.proxyd_config)
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "{what}: the reload succeeded");
        ensure!(said.contains(want), "{what}: `proxyd reload` said {said:?}");
        figure(what, said.trim());
        // The running generation still routes every session where it was.
        for (c, server) in &clients {
            let r = get(n.frontend, Some(c)).await?;
            ensure!(
                r.server.as_deref() == Some(server.as_str()),
                "{what}: a client moved"
            );
        }
    }
    std::fs::write(&n.proxyd_config, good)?;
    Ok(Outcome::Pass)
}

async fn metric_value(addr: SocketAddr, name: &str) -> Result<u64> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

pub(super) async fn touch_coalesced(env: Env) -> Result<Outcome> {
    let lb = Lb::start_opts(env, 1, None, "2s").await?;
    let n = &lb.nodes[0];
    let (cookie, server) = new_sessions_on(n.frontend, 1)
        .await?
        .pop()
        .context("no session")?;
    let busy = Duration::from_secs(5);
    let started = Instant::now();
    let mut requests = 0u64;
    while started.elapsed() < busy {
        let r = get(n.frontend, Some(&cookie)).await?;
        ensure!(
            r.status == 200 && r.server.as_deref() == Some(server.as_str()),
            "after {:?} the session moved or failed: {r:?}",
            started.elapsed()
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The worker reports its counters every 250 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let touches = metric_value(n.metrics, "proxyd_stick_touches_sent_total").await?;
    figure(
        "one session busy for 5 s (expire 2s)",
        format!("{requests} requests, {touches} touches sent to stickd"),
    );
    ensure!(
        (4..=20).contains(&touches),
        "{touches} touches (expected about 10: one per quarter of expire)"
    );
    ensure!(
        lb.table(0).await?.get(&cookie) == Some(&server),
        "the busy session is not in stickd"
    );
    // Idle: it expires.
    let gone = harness::wait_for(
        "the idle session to expire",
        Duration::from_secs(6),
        || async { Ok((!lb.table(0).await?.contains_key(&cookie)).then_some(())) },
    )
    .await;
    ensure!(gone.is_ok(), "the idle session did not expire");
    Ok(Outcome::Pass)
}
