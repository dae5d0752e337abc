//! The backend features on real clusters: cookie-insert persistence that holds across reloads
//! and across the nodes without a table, and a server named by DNS that follows its name to a
//! new address without a reload.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::test_nameserver::nameserver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::lb::{Lb, LbNode};
use super::{Outcome, Scenario, ensure_no_failures, figure, ms, print_load};
use crate::cluster::{self, START_TIMEOUT};
use crate::configs;
use crate::harness::{self, Env};
use crate::load::{Load, LoadConfig};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "cookie-insert",
            "cookie SRV insert indirect nocache instead of a table: 200 clients, each request to the next of the 3 nodes, keep their server across 5 reloads of every node; 0 failed, 0 moved",
            240,
            |env| Box::pin(cookie_insert(env)),
        ),
        s(
            "dns-change",
            "a server named app.e2e.test on a loopback nameserver moves from 127.0.0.2 to 127.0.0.3 under load: traffic follows within resolve_interval, no reload, 0 failed requests",
            120,
            |env| Box::pin(dns_change(env)),
        ),
    ]
}

const CLIENTS: usize = 200;
const RELOADS_PER_NODE: usize = 5;

/// The seed's config with cookie persistence instead of its stick rule.
fn with_cookie(text: &str) -> Result<String> {
    let stick = text
        .find("\n[backend.stick]\n")
        .context("the seed's config has no [backend.stick]")?;
    // The stick table's keys run to the next blank line.
    let end = text[stick + 1..]
        .find("\n\n")
        .map_or(text.len(), |e| stick + 1 + e);
    let mut out = format!("{}{}", &text[..stick], &text[end..]);
    let balance = "balance = \"roundrobin\"\n";
    let at = out
        .find(balance)
        .context("the seed's config has no balance")?
        + balance.len();
    out.insert_str(
        at,
        "cookie = { name = \"SRV\", insert = true, indirect = true, nocache = true, httponly = true }\n",
    );
    Ok(out)
}

/// Reloads one node and waits for its new generation.
async fn reload(n: &LbNode) -> Result<()> {
    let before = cluster::serving(&cluster::proxyd_status(&n.proxyd_admin).await?)
        .context("no serving generation")?;
    n.proxyd.signal(nix::sys::signal::Signal::SIGUSR2)?;
    cluster::wait_new_generation(&n.proxyd_admin, before.generation, Duration::from_secs(20))
        .await?;
    Ok(())
}

/// What a client learns from one response.
struct Answer {
    status: u16,
    server: Option<String>,
    /// The value of SRV the response sets, if it sets one.
    set_srv: Option<String>,
    cache_private: bool,
}

/// One `GET /` with `Connection: close`, with `SRV=value` if given.
async fn get(addr: SocketAddr, srv: Option<&str>) -> Result<Answer> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let cookie = srv.map_or(String::new(), |v| format!("Cookie: SRV={v}\r\n"));
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: lb\r\n{cookie}Connection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("no answer from {addr} within 10 s"))??;
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    Ok(Answer {
        status: text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad response from {addr}: {text:?}"))?,
        server: text
            .lines()
            .find_map(|l| l.strip_prefix("server: "))
            .map(str::to_owned),
        set_srv: head
            .lines()
            .find_map(|l| l.strip_prefix("Set-Cookie: SRV="))
            .and_then(|v| v.split(';').next())
            .map(str::to_owned),
        cache_private: head.lines().any(|l| l == "Cache-Control: private"),
    })
}

/// Counts of the sticky traffic.
#[derive(Default)]
struct Traffic {
    requests: AtomicU64,
    failed: AtomicU64,
    /// Answered by another server than the client's.
    moved: AtomicU64,
    /// Answered with a new SRV although the client's was valid.
    set_again: AtomicU64,
}

async fn cookie_insert(env: Env) -> Result<Outcome> {
    let lb = Lb::start(env).await?;
    for n in &lb.nodes {
        let text = std::fs::read_to_string(&n.proxyd_config)?;
        std::fs::write(&n.proxyd_config, with_cookie(&text)?)?;
        reload(n).await?;
    }
    let frontends: Vec<SocketAddr> = lb.nodes.iter().map(|n| n.frontend).collect();

    // Each client's first request, without a cookie, to the node of its number: the response
    // names the server that answered in SRV, uncacheable.
    let mut first = Vec::new();
    for i in 0..CLIENTS {
        let fe = frontends[i % frontends.len()];
        first.push(tokio::spawn(async move { get(fe, None).await }));
    }
    let mut clients = Vec::new();
    for t in first {
        let a = t.await??;
        ensure!(a.status == 200, "a first request got {}", a.status);
        let server = a.server.context("no server name")?;
        ensure!(
            a.set_srv.as_deref() == Some(server.as_str()),
            "SRV={:?} set by a response of {server}",
            a.set_srv
        );
        ensure!(
            a.cache_private,
            "no Cache-Control: private with the new SRV"
        );
        clients.push(server);
    }
    let spread: BTreeSet<&String> = clients.iter().collect();
    figure("servers of the 200 new clients", format!("{spread:?}"));
    ensure!(spread.len() == 2, "new clients all went to {spread:?}");

    // Every client sends its SRV to the next node in turn while every node reloads 5 times.
    let traffic = Arc::new(Traffic::default());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, server) in clients.into_iter().enumerate() {
        let (frontends, traffic, stop) = (frontends.clone(), traffic.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut nodes = BTreeSet::new();
            let mut k = i;
            // Bounded: the scenario's own timeout aside, at most 10 000 requests a client.
            for _ in 0..10_000 {
                if stop.is_cancelled() {
                    break;
                }
                k += 1;
                let node = k % frontends.len();
                let a = get(frontends[node], Some(&server)).await;
                traffic.requests.fetch_add(1, Ordering::Relaxed);
                match a {
                    Ok(a) if a.status == 200 => {
                        nodes.insert(node);
                        if a.server.as_deref() != Some(server.as_str()) {
                            traffic.moved.fetch_add(1, Ordering::Relaxed);
                        }
                        if a.set_srv.is_some() {
                            traffic.set_again.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        traffic.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            nodes.len()
        }));
    }
    let started = Instant::now();
    let mut reloads = 0;
    for _ in 0..RELOADS_PER_NODE {
        for n in &lb.nodes {
            reload(n).await?;
            reloads += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let mut on_every_node = 0;
    for t in tasks {
        if t.await? == frontends.len() {
            on_every_node += 1;
        }
    }
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (req, failed, moved, set_again) = (
        ld(&traffic.requests),
        ld(&traffic.failed),
        ld(&traffic.moved),
        ld(&traffic.set_again),
    );
    figure(
        "during reloads",
        format!(
            "{reloads} reloads in {:.1}s, {req} requests, {failed} failed, {moved} moved, {set_again} SRV set again, {on_every_node} of {CLIENTS} clients on all 3 nodes",
            started.elapsed().as_secs_f64()
        ),
    );
    ensure!(failed == 0, "{failed} requests failed");
    ensure!(moved == 0, "{moved} requests reached another server");
    ensure!(set_again == 0, "{set_again} valid cookies were set again");
    ensure!(
        on_every_node == CLIENTS,
        "only {on_every_node} clients reached all 3 nodes"
    );
    Ok(Outcome::Pass)
}

/// The server's name: the scenario's nameserver answers it with the A record the scenario sets.
const NAME: &str = "app.e2e.test.";
const RESOLVE_INTERVAL: Duration = Duration::from_millis(500);

async fn dns_change(mut env: Env) -> Result<Outcome> {
    let (old_ip, new_ip) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    // One port on both addresses: the config names it once, beside the name.
    let old = cluster::start_backends(&mut env, &["old".into()], 2, Duration::ZERO, None).await?;
    let port = old[0].1.port();
    let new =
        cluster::start_backends(&mut env, &["new".into()], 3, Duration::ZERO, Some(port)).await?;
    if new[0].1.port() != port {
        bail!("port {port} is taken on {new_ip}");
    }
    let ns = nameserver(NAME, old_ip).await?;
    let (dns, answer) = (ns.addr, ns.answer);
    let fdk = cluster::start_fdkeeper(&env, "n1", "fdkeeper-n1").await?;
    let frontend = env.port_or_free(1, None)?;
    let admin = env.path("n1/proxyd-admin.sock");
    let servers = vec![("app".to_owned(), old[0].1)];
    let text = configs::Proxyd::round_robin(
        configs::proxyd::Global::new(&admin, &fdk.socket),
        frontend,
        &servers,
    )
    .render();
    let written = format!("address = \"{}\"", old[0].1);
    ensure!(text.contains(&written), "no {written} in {text}");
    let text = text
        .replace(
            &written,
            &format!("address = \"{}:{port}\"", NAME.trim_end_matches('.')),
        )
        .replace(
            "\n[[backend.server]]",
            &format!(
                "resolvers = \"e2e\"\nresolve_interval = \"{}ms\"\n\n[[backend.server]]",
                RESOLVE_INTERVAL.as_millis()
            ),
        );
    let text = format!(
        "{text}\n[[resolvers]]\nname = \"e2e\"\nnameservers = [\"{dns}\"]\ntimeout = \"300ms\"\n"
    );
    let config = env.write("n1/proxyd.toml", &text)?;
    let _proxyd = env.spawn(
        "proxyd-n1",
        harness::release_bin("proxyd"),
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_for("the frontend to answer 200", START_TIMEOUT, || async move {
        Ok(cluster::probe(frontend, Duration::from_secs(5)).await.ok())
    })
    .await?;
    let generation = cluster::serving(&cluster::proxyd_status(&admin).await?)
        .context("no serving generation")?;
    ensure!(
        cluster::probe(frontend, Duration::from_secs(5)).await? == "old",
        "the name's first address is not served"
    );

    let load = Load::start(LoadConfig {
        keepalive_clients: 20,
        close_clients: 20,
        max_duration: Duration::from_secs(60),
        max_requests: 5_000_000,
        request_timeout: Duration::from_secs(5),
        expect_servers: vec!["old".into(), "new".into()],
        ..LoadConfig::new(frontend)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    *answer.lock().unwrap_or_else(|p| p.into_inner()) = new_ip;
    let changed = Instant::now();
    let took = harness::wait_for(
        "traffic to reach the new address",
        Duration::from_secs(10),
        || async move {
            let s = cluster::probe(frontend, Duration::from_secs(5)).await?;
            Ok((s == "new").then(|| changed.elapsed()))
        },
    )
    .await?;
    figure("first answer from the new address after", ms(took));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..10 {
        let s = cluster::probe(frontend, Duration::from_secs(5)).await?;
        ensure!(s == "new", "{s} answered after the move");
    }
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    // The name is resolved again every RESOLVE_INTERVAL, so the move is seen within one (the
    // rest is the probe's own pace and a loaded machine).
    ensure!(
        took < RESOLVE_INTERVAL + Duration::from_secs(1),
        "the move took {took:?}, resolve_interval is {RESOLVE_INTERVAL:?}"
    );
    let now = cluster::serving(&cluster::proxyd_status(&admin).await?)
        .context("no serving generation")?;
    ensure!(
        now.generation == generation.generation,
        "a new generation ({}) serves: the move took a reload",
        now.generation
    );
    drop(fdk);
    Ok(Outcome::Pass)
}
