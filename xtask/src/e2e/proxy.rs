//! The reload scenarios: reloads, worker crashes, broken configs, an fdkeeper restart, peer
//! credentials and a binary upgrade, each under load, each with 0 failed requests.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Outcome, Scenario, ensure_no_failures, figure, ms, print_load};
use crate::cluster::{self, Node, NodeOptions};
use crate::configs;
use crate::harness::{self, Env};
use crate::load::{FailKind, Load, LoadConfig, percentile};

mod release;

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s(
            "reload-storm",
            "200 reloads at >= 5/s under 50 keep-alive + 50 close + 20 pausing keep-alive clients: 0 failed requests",
            240,
            |env| Box::pin(reload_storm(env)),
        ),
        s(
            "worker-kill",
            "kill -9 of the worker 20 times under load: 0 refused, failures <= requests at risk, new worker serves < 1s",
            180,
            |env| Box::pin(worker_kill(env)),
        ),
        s(
            "broken-config",
            "a reload with a broken config is refused with file:line, the old worker keeps serving: 0 failed requests",
            120,
            |env| Box::pin(broken_config(env)),
        ),
        s(
            "fdkeeper-restart",
            "kill -9 of fdkeeper under load, start it again: 0 refused, the next reload gets the same socket inode",
            120,
            |env| Box::pin(fdkeeper_restart(env)),
        ),
        s(
            "peercred",
            "a borrower whose uid the config does not allow is refused by SO_PEERCRED",
            60,
            |env| Box::pin(peercred(env)),
        ),
        s(
            "binary-upgrade",
            "a new proxyd binary on disk, then reload: the new generation runs it, 0 failed requests",
            120,
            |env| Box::pin(binary_upgrade(env)),
        ),
    ]
    .into_iter()
    .chain(release::scenarios())
    .collect()
}

/// The load every scenario runs: at least 50 keep-alive and 50 connection-close clients.
fn load_config(node: &Node) -> LoadConfig {
    LoadConfig {
        keepalive_clients: 50,
        close_clients: 50,
        // Idle keep-alive connections when a drain starts: closing them must not race a request.
        think_clients: 20,
        think_time: Duration::from_millis(100),
        max_duration: Duration::from_secs(180),
        max_requests: 50_000_000,
        request_timeout: Duration::from_secs(10),
        path: "/".to_owned(),
        expect_servers: node.server_names(),
        ..LoadConfig::new(node.frontend)
    }
}

/// Starts the load and checks it flows before the scenario does anything to the node.
async fn start_load(node: &Node) -> Result<Load> {
    let cfg = load_config(node);
    figure(
        "clients",
        format!(
            "{} keep-alive, {} connection-close, {} keep-alive pausing 0-{:?} between requests",
            cfg.keepalive_clients, cfg.close_clients, cfg.think_clients, cfg.think_time
        ),
    );
    let load = Load::start(cfg);
    load.wait_ok(500, Duration::from_secs(30))
        .await
        .context("the load never got going")?;
    Ok(load)
}

fn quantiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort_unstable();
    (
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        percentile(&v, 100.0),
    )
}

/// Measures successful requests per second over `window` of a running load.
async fn measure_rps(load: &Load, window: Duration) -> f64 {
    let before = load.snapshot().ok;
    let t = Instant::now();
    tokio::time::sleep(window).await;
    (load.snapshot().ok - before) as f64 / t.elapsed().as_secs_f64()
}

// ---- 1 ----------------------------------------------------------------------------------------

const RELOADS: usize = 200;
/// One reload per slot: 180 ms keeps the rate above 5/s with room for a slow poll.
const RELOAD_SLOT: Duration = Duration::from_millis(180);

async fn reload_storm(mut env: Env) -> Result<Outcome> {
    let node = Node::start(
        &mut env,
        NodeOptions {
            backend_delay: Duration::from_millis(1),
            ..NodeOptions::default()
        },
    )
    .await?;
    let load = start_load(&node).await?;
    let steady_rps = measure_rps(&load, Duration::from_secs(3)).await;

    let status0 = node.status().await?;
    let mut generation = cluster::serving(&status0)
        .context("no serving generation")?
        .generation;
    let mut observed = Vec::with_capacity(RELOADS);
    let mut reported = Vec::with_capacity(RELOADS);
    let ok_before = load.snapshot().ok;
    let storm = Instant::now();
    for i in 0..RELOADS {
        tokio::time::sleep_until((storm + RELOAD_SLOT * i as u32).into()).await;
        let t0 = Instant::now();
        node.proxyd.signal(Signal::SIGUSR2)?;
        let (new, seen) =
            cluster::wait_new_generation(&node.proxyd_admin, generation, Duration::from_secs(15))
                .await
                .with_context(|| format!("reload {} of {RELOADS}", i + 1))?;
        observed.push(seen - t0);
        generation = new.generation;
        let st = node.status().await?;
        if let Some(r) = st.last_reload.filter(|r| r.generation == generation) {
            ensure!(r.ok, "reload {} reported failure: {}", i + 1, r.message);
            reported.push(Duration::from_micros(r.duration_us));
        }
    }
    let storm_time = storm.elapsed();
    let storm_rps = (load.snapshot().ok - ok_before) as f64 / storm_time.as_secs_f64();
    // Let the last generations drain under load too before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    let status1 = node.status().await?;

    let rate = RELOADS as f64 / storm_time.as_secs_f64();
    figure(
        "reloads",
        format!(
            "{RELOADS} in {:.1}s = {rate:.2}/s",
            storm_time.as_secs_f64()
        ),
    );
    let (p50, p99, max) = quantiles(observed);
    figure(
        "reload latency, SIGUSR2 -> new generation serving in Status (polled)",
        format!("p50 {} p99 {} max {}", ms(p50), ms(p99), ms(max)),
    );
    if !reported.is_empty() {
        let n = reported.len();
        let (p50, p99, max) = quantiles(reported);
        figure(
            "reload latency reported by the master (last_reload.duration_us)",
            format!(
                "p50 {} p99 {} max {} ({n} samples)",
                ms(p50),
                ms(p99),
                ms(max)
            ),
        );
    }
    figure(
        "requests/s",
        format!("steady {steady_rps:.0}, during the reload storm {storm_rps:.0}"),
    );
    figure(
        "reloads ok/failed (master counters)",
        format!(
            "+{} / +{}",
            status1.reloads_ok - status0.reloads_ok,
            status1.reloads_failed - status0.reloads_failed
        ),
    );
    figure("generations alive at the end", status1.generations.len());
    print_load(&report);
    ensure_no_failures(&report)?;
    ensure!(rate >= 5.0, "only {rate:.2} reloads/s");
    ensure!(
        status1.reloads_ok - status0.reloads_ok >= RELOADS as u64,
        "the master counted {} successful reloads, expected {RELOADS}",
        status1.reloads_ok - status0.reloads_ok
    );
    ensure!(
        status1.reloads_failed == status0.reloads_failed,
        "the master counted failed reloads"
    );
    Ok(Outcome::Pass)
}

// ---- 2 ----------------------------------------------------------------------------------------

const KILLS: usize = 20;

async fn worker_kill(mut env: Env) -> Result<Outcome> {
    let node = Node::start(
        &mut env,
        NodeOptions {
            backend_delay: Duration::from_millis(1),
            ..NodeOptions::default()
        },
    )
    .await?;
    let load = start_load(&node).await?;
    let mut serve_times = Vec::new();
    let mut worst_round = (0u64, 0u64);
    let (mut sum_failed, mut sum_at_risk, mut sum_reported) = (0u64, 0u64, 0u64);
    for round in 1..=KILLS {
        let st = node.status().await?;
        let cur = cluster::serving(&st).context("no serving generation")?;
        // The worker's own figures (sent periodically, so slightly stale): for the printout.
        sum_reported += st
            .generations
            .iter()
            .filter_map(|g| g.worker.as_ref())
            .filter(|w| w.pid == cur.pid)
            .map(|w| w.active_connections)
            .sum::<u64>();
        let before = load.snapshot();
        let at_risk = load.at_risk();
        let t0 = Instant::now();
        kill(Pid::from_raw(cur.pid as i32), Signal::SIGKILL)
            .with_context(|| format!("kill -9 {}", cur.pid))?;
        // A fresh connection waits in the shared accept queue until a worker accepts it: its
        // answer is the moment a new worker serves.
        let served = loop {
            match cluster::probe(node.frontend, Duration::from_secs(5)).await {
                Ok(_) => break t0.elapsed(),
                Err(e) if t0.elapsed() > Duration::from_secs(5) => {
                    return Err(
                        e.context(format!("round {round}: no worker serves 5s after the kill"))
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        serve_times.push(served);
        let admin = node.proxyd_admin.clone();
        harness::wait_for(
            "a respawned worker in Status",
            Duration::from_secs(10),
            || {
                let admin = admin.clone();
                async move {
                    Ok(cluster::serving(&cluster::proxyd_status(&admin).await?)
                        .filter(|s| s.pid != cur.pid))
                }
            },
        )
        .await
        .with_context(|| format!("round {round}"))?;
        ensure!(
            !harness::pid_alive(cur.pid),
            "round {round}: the killed worker {} is still alive",
            cur.pid
        );
        // Let the clients whose requests died reconnect and get going on the new worker.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let round_failures = load.snapshot().failures.since(&before.failures);
        ensure!(
            round_failures.get(FailKind::Refused) == 0,
            "round {round}: {} refused connections",
            round_failures.get(FailKind::Refused)
        );
        ensure!(
            round_failures.total() <= at_risk,
            "round {round}: {} failures ({round_failures}) but only {at_risk} requests were at risk on the killed worker",
            round_failures.total()
        );
        sum_failed += round_failures.total();
        sum_at_risk += at_risk;
        if round_failures.total() > worst_round.0 {
            worst_round = (round_failures.total(), at_risk);
        }
    }
    let report = load.finish().await;
    let restarts = cluster::serving(&node.status().await?).map_or(0, |s| s.restarts);
    let (p50, _, max) = quantiles(serve_times);
    figure("kills", KILLS);
    figure(
        "kill -9 -> a new worker answers a fresh connection",
        format!("p50 {} max {}", ms(p50), ms(max)),
    );
    figure("worker restarts counted by the master", restarts);
    figure(
        "per kill (mean)",
        format!(
            "{:.1} failed requests, {:.1} requests at risk (client side), {:.1} connections on the worker (its last Stats)",
            sum_failed as f64 / KILLS as f64,
            sum_at_risk as f64 / KILLS as f64,
            sum_reported as f64 / KILLS as f64
        ),
    );
    figure(
        "worst round",
        format!(
            "{} failed of {} requests at risk (in flight or on an idle keep-alive connection)",
            worst_round.0, worst_round.1
        ),
    );
    print_load(&report);
    ensure!(
        report.failures.get(FailKind::Refused) == 0,
        "refused connections"
    );
    ensure!(
        max < Duration::from_secs(1),
        "a new worker took {} to serve",
        ms(max)
    );
    Ok(Outcome::Pass)
}

// ---- 3 ----------------------------------------------------------------------------------------

async fn broken_config(mut env: Env) -> Result<Outcome> {
    let node = Node::start(&mut env, NodeOptions::default()).await?;
    let load = start_load(&node).await?;
    let before = cluster::serving(&node.status().await?).context("no serving generation")?;
    let good = std::fs::read_to_string(&node.proxyd_config)?;
    // An unknown key in [global], on a line we know.
    let mut lines: Vec<&str> = good.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("threads"))
        .context("no threads line in the generated config")?;
    lines.insert(at + 1, "no_such_key = true");
    let bad_line = at + 2;
    std::fs::write(&node.proxyd_config, lines.join("\n") + "\n")?;
    let where_ = format!("{}:{bad_line}", node.proxyd_config.display());

    // 1. The CLI.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(harness::release_bin("proxyd"))
            .arg("reload")
            .arg("--config")
            .arg(&node.proxyd_config)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .context("proxyd reload hung")??;
    let cli_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    figure(
        "proxyd reload",
        format!("{} -> {}", out.status, cli_text.trim().replace('\n', " | ")),
    );
    ensure!(
        !out.status.success(),
        "proxyd reload of a broken config succeeded"
    );
    ensure!(
        cli_text.contains(&where_),
        "proxyd reload did not name {where_}: {cli_text}"
    );

    // 2. The admin API.
    let target = node.proxyd_admin.clone();
    let grpc = tokio::task::spawn_blocking(move || {
        harness::grpcurl(
            &target,
            "proxyd.v1.Admin/Reload",
            Some(&serde_json::json!({})),
        )
    })
    .await?;
    let grpc_err = match grpc {
        Ok(v) => bail!("Admin/Reload of a broken config answered OK: {v}"),
        Err(e) => format!("{e:#}"),
    };
    figure("Admin/Reload", grpc_err.replace('\n', " | "));
    ensure!(
        grpc_err.contains(&where_),
        "Admin/Reload did not name {where_}"
    );

    // 3. SIGUSR2: the refusal shows in Status.
    let failed_before = node.status().await?.reloads_failed;
    node.proxyd.signal(Signal::SIGUSR2)?;
    let admin = node.proxyd_admin.clone();
    let st = harness::wait_for(
        "the refused reload in Status",
        Duration::from_secs(15),
        || {
            let admin = admin.clone();
            async move {
                let st = cluster::proxyd_status(&admin).await?;
                Ok((st.reloads_failed > failed_before).then_some(st))
            }
        },
    )
    .await?;
    let last = st.last_reload.clone().unwrap_or_default();
    figure(
        "Status.last_reload after SIGUSR2",
        format!("ok={} message={:?}", last.ok, last.message),
    );
    ensure!(!last.ok, "last_reload says ok after a broken config");
    ensure!(
        last.message.contains(&where_),
        "last_reload does not name {where_}"
    );
    let still = cluster::serving(&st).context("no serving generation after the refusal")?;
    ensure!(
        still == before,
        "the serving generation changed: {before:?} -> {still:?}"
    );
    cluster::probe(node.frontend, Duration::from_secs(5)).await?;

    // The fixed config reloads again.
    std::fs::write(&node.proxyd_config, &good)?;
    node.proxyd.signal(Signal::SIGUSR2)?;
    let (after, _) = cluster::wait_new_generation(
        &node.proxyd_admin,
        before.generation,
        Duration::from_secs(15),
    )
    .await
    .context("the repaired config did not reload")?;
    figure(
        "after repair",
        format!("generation {} -> {}", before.generation, after.generation),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    Ok(Outcome::Pass)
}

// ---- 4 ----------------------------------------------------------------------------------------

async fn fdkeeper_restart(mut env: Env) -> Result<Outcome> {
    let mut node = Node::start(&mut env, NodeOptions::default()).await?;
    let frontend = node.frontend.to_string();
    let target = node.fdkeeper_admin.clone();
    let inode_of = |target: &Path| -> Result<u64> {
        cluster::fdkeeper_inodes(target)?
            .into_iter()
            .find(|(a, _)| *a == frontend)
            .map(|(_, i)| i)
            .with_context(|| format!("fdkeeper holds no listener for {frontend}"))
    };
    let inode0 = inode_of(&target)?;
    let first = cluster::serving(&node.status().await?).context("no serving generation")?;
    ensure!(
        harness::socket_inodes(first.pid)?.contains(&inode0),
        "worker {} does not hold socket inode {inode0}",
        first.pid
    );
    figure("listener inode", format!("{frontend} -> {inode0}"));

    let load = start_load(&node).await?;
    let old_pid = node.fdkeeper.pid();
    node.fdkeeper.kill9()?;
    figure("fdkeeper killed", old_pid);
    // Traffic goes on without fdkeeper: the worker holds the listener.
    load.wait_ok(500, Duration::from_secs(10))
        .await
        .context("no traffic while fdkeeper was down")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.fdkeeper.restart()?;
    harness::wait_unix(&node.fdkeeper_admin, cluster::START_TIMEOUT).await?;
    harness::wait_seqpacket(&node.fdkeeper_socket, cluster::START_TIMEOUT).await?;
    figure("fdkeeper restarted", node.fdkeeper.pid());

    node.proxyd.signal(Signal::SIGUSR2)?;
    let (next, _) = cluster::wait_new_generation(
        &node.proxyd_admin,
        first.generation,
        Duration::from_secs(20),
    )
    .await
    .context("no reload after the fdkeeper restart")?;
    let inode1 = inode_of(&target)?;
    figure(
        "after the reload",
        format!(
            "generation {}, fdkeeper holds inode {inode1}, worker {}",
            next.generation, next.pid
        ),
    );
    ensure!(
        inode1 == inode0,
        "the new fdkeeper holds inode {inode1}, not the original {inode0}"
    );
    ensure!(
        harness::socket_inodes(next.pid)?.contains(&inode0),
        "the new worker {} does not hold the original socket inode {inode0}",
        next.pid
    );
    // And what the worker itself reported when it became ready.
    let reported: Vec<u64> = node
        .status()
        .await?
        .generations
        .iter()
        .find(|g| g.generation == next.generation)
        .map(|g| g.listener_inodes.clone())
        .unwrap_or_default();
    figure(
        "listener inodes in the new generation's Ready",
        format!("{reported:?}"),
    );
    ensure!(
        reported == [inode0],
        "the new generation reported listener inodes {reported:?}, expected [{inode0}]"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure!(
        report.failures.get(FailKind::Refused) == 0,
        "refused connections"
    );
    ensure_no_failures(&report)?;
    Ok(Outcome::Pass)
}

// ---- 5 ----------------------------------------------------------------------------------------

/// Group that may open the lending socket (0660) and uid that fdkeeper allows.
const LEND_GID: u32 = 4242;
const ALLOWED_UID: u32 = 4243;
const NOBODY: u32 = 65534;

async fn peercred(mut env: Env) -> Result<Outcome> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(Outcome::Skip(
            "not root: cannot run a borrower under another uid".into(),
        ));
    }
    // Other uids must reach the binary and the socket dir (tempdirs are 0700).
    std::fs::set_permissions(env.dir(), std::fs::Permissions::from_mode(0o711))?;
    let bin = env.path("bin");
    std::fs::create_dir(&bin)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let fdkeeper = bin.join("fdkeeper");
    std::fs::copy(harness::release_bin("fdkeeper"), &fdkeeper)?;
    std::fs::set_permissions(&fdkeeper, std::fs::Permissions::from_mode(0o755))?;

    let socket = env.path("fdk/lend.sock");
    let admin = env.path("fdk-admin.sock");
    let config = env.write(
        "fdkeeper.toml",
        &configs::Fdkeeper {
            allowed_uids: vec![0, ALLOWED_UID],
            socket_access: Some(("0660", LEND_GID)),
            ..configs::Fdkeeper::new(socket.clone(), admin.clone())
        }
        .render(),
    )?;
    let daemon = env.spawn(
        "fdkeeper",
        &fdkeeper,
        ["--config".as_ref(), config.as_os_str()],
    )?;
    harness::wait_seqpacket(&socket, cluster::START_TIMEOUT).await?;
    let meta = std::fs::metadata(&socket)?;
    figure(
        "lending socket",
        format!(
            "{} mode {:o} gid {}",
            socket.display(),
            meta.mode() & 0o777,
            meta.gid()
        ),
    );
    let addr = env.free_port(1)?.to_string();

    let acquire = |uid: u32, gid: u32| {
        let fdkeeper = fdkeeper.clone();
        let socket = socket.clone();
        let addr = addr.clone();
        async move {
            let out = tokio::time::timeout(
                Duration::from_secs(20),
                tokio::process::Command::new(&fdkeeper)
                    .arg("acquire")
                    .arg("--socket")
                    .arg(&socket)
                    .arg(&addr)
                    .uid(uid)
                    .gid(gid)
                    .env("RUST_LOG", "info")
                    .stdin(std::process::Stdio::null())
                    .output(),
            )
            .await
            .context("fdkeeper acquire hung")??;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok((out.status, text))
        }
    };

    // Same group, allowed uid: the socket's permissions let the group in, fdkeeper lends.
    let (status, text) = acquire(ALLOWED_UID, LEND_GID).await?;
    figure(
        &format!("uid {ALLOWED_UID} gid {LEND_GID} (allowed)"),
        format!("{status}: {}", text.trim().replace('\n', " | ")),
    );
    ensure!(status.success(), "the allowed uid was refused");

    // Same group, uid not allowed: gets through the file permissions, refused by SO_PEERCRED.
    let log_before = daemon.log_text().len();
    let (status, text) = acquire(NOBODY, LEND_GID).await?;
    figure(
        &format!("uid {NOBODY} gid {LEND_GID} (not allowed)"),
        format!("{status}: {}", text.trim().replace('\n', " | ")),
    );
    ensure!(
        status.code() == Some(1),
        "a uid that is not allowed got {status}"
    );
    let log = daemon.log_text();
    let new_log = log.get(log_before..).unwrap_or_default();
    let refusal = new_log
        .lines()
        .find(|l| l.contains(&NOBODY.to_string()))
        .with_context(|| format!("fdkeeper logged no refusal naming uid {NOBODY}: {new_log}"))?;
    figure("fdkeeper logged", refusal.trim());
    ensure!(
        !text.to_lowercase().contains("os error 13"),
        "refused by file permissions, not by fdkeeper: {text}"
    );

    // Control: outside the group, the file permissions stop it before fdkeeper sees anything.
    let (status, text) = acquire(NOBODY, NOBODY).await?;
    figure(
        &format!("uid {NOBODY} gid {NOBODY} (outside the socket's group)"),
        format!("{status}: {}", text.trim().replace('\n', " | ")),
    );
    ensure!(!status.success(), "a peer outside the group got a listener");
    drop(daemon);
    Ok(Outcome::Pass)
}

// ---- 6 ----------------------------------------------------------------------------------------

fn exe_inode(pid: u32) -> Result<u64> {
    Ok(std::fs::metadata(format!("/proc/{pid}/exe"))
        .with_context(|| format!("cannot stat /proc/{pid}/exe"))?
        .ino())
}

/// Writes a different build of proxyd next to `path` and renames it over `path` (what a package
/// manager does), returning the new file's inode.
fn install_new_build(path: &Path) -> Result<u64> {
    let tmp = path.with_extension("new");
    std::fs::copy(harness::release_bin("proxyd"), &tmp)?;
    {
        use std::io::Write;
        // Bytes after the ELF image change the file without changing what runs.
        let mut f = std::fs::OpenOptions::new().append(true).open(&tmp)?;
        writeln!(f, "xtask-upgrade-marker {:?}", std::time::SystemTime::now())?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, path)?;
    Ok(std::fs::metadata(path)?.ino())
}

/// A copy of the release proxyd in the scenario's own bin/, for a node to run and a scenario to
/// replace as an upgrade would.
fn private_proxyd(env: &Env) -> Result<std::path::PathBuf> {
    let bin = env.path("bin/proxyd");
    std::fs::create_dir_all(env.path("bin"))?;
    std::fs::copy(harness::release_bin("proxyd"), &bin)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

async fn binary_upgrade(mut env: Env) -> Result<Outcome> {
    let bin = private_proxyd(&env)?;
    let node = Node::start(
        &mut env,
        NodeOptions {
            proxyd_binary: Some(bin.clone()),
            backend_delay: Duration::from_millis(1),
            ..NodeOptions::default()
        },
    )
    .await?;
    let old = cluster::serving(&node.status().await?).context("no serving generation")?;
    let old_inode = exe_inode(old.pid)?;
    ensure!(
        old_inode == std::fs::metadata(&bin)?.ino(),
        "worker {} does not run {}",
        old.pid,
        bin.display()
    );
    let load = start_load(&node).await?;
    let new_inode = install_new_build(&bin)?;
    ensure!(new_inode != old_inode, "the new build has the old inode");
    node.proxyd.signal(Signal::SIGUSR2)?;
    let (new, _) =
        cluster::wait_new_generation(&node.proxyd_admin, old.generation, Duration::from_secs(20))
            .await?;
    let running = exe_inode(new.pid)?;
    let st = node.status().await?;
    let binary = st
        .generations
        .iter()
        .find(|g| g.generation == new.generation)
        .map(|g| g.binary.clone())
        .unwrap_or_default();
    figure(
        "old generation",
        format!(
            "{} worker {} exe inode {old_inode}",
            old.generation, old.pid
        ),
    );
    figure(
        "new generation",
        format!(
            "{} worker {} exe inode {running} (file on disk: {new_inode}; Status.binary {binary:?})",
            new.generation, new.pid
        ),
    );
    ensure!(
        running == new_inode,
        "the new worker runs inode {running}, not the new file {new_inode}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    print_load(&report);
    ensure_no_failures(&report)?;
    Ok(Outcome::Pass)
}
