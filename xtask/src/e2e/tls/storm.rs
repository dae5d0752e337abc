//! Reloads and certificate rotations under TLS load from real clients, which must see no
//! failure: the reload storm, and certificates replaced on disk (one of them refused).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use proto::proxyd::v1::RotationOutcome;

use super::load::{Client, Expect, Load, Totals};
use super::pki::Leaf;
use super::relay::Relay;
use super::{TlsNode, clients, metric_value, metrics, report_load, tls_setting};
use crate::e2e::{Outcome, figure, ms};
use crate::harness::{self, Env};
use crate::load::percentile;

/// Streams at once on each HTTP/2 connection.
const STREAMS: u64 = 10;

/// The clients of both scenarios: HTTP/1.1 keep-alive, HTTP/1.1 with a new connection (and
/// handshake) per request, HTTP/2 with 10 streams at once over TLS and over h2c through the
/// frame relay, and curl. The HTTP/2 ones are paced (`--rps`) so that the reloads keep their
/// rate on two cores.
fn clients(node: &TlsNode, relay: &Relay) -> Vec<Client> {
    let h2 = ["-c", "1", "-m", "10", "--rps", "300", "-n", "300"];
    let multiplexed = Expect::Multiplexed { streams: STREAMS };
    vec![
        node.h2load_tls(
            "HTTP/1.1 keep-alive (h2load --h1 -c 4)",
            &["--h1", "-c", "4", "-n", "1000"],
            Expect::KeepAlive,
        ),
        node.h2load_tls(
            "HTTP/1.1, a new connection and handshake per request (h2load --h1 -c 2, Connection: close)",
            &["--h1", "-c", "2", "-n", "100", "-H", "Connection: close"],
            Expect::HandshakePerRequest,
        ),
        node.h2load_tls(
            "HTTP/2 over TLS, 10 streams at once on one connection (h2load -c 1 -m 10)",
            &h2,
            multiplexed,
        ),
        Client::H2load {
            label: "HTTP/2 h2c through the frame relay (h2load -c 1 -m 10)".into(),
            args: h2.map(str::to_owned).to_vec(),
            expect: multiplexed,
            url: format!("http://{}/", relay.addr),
            connect_to: None,
        },
        Client::Curl {
            label: "curl --http2, a process and a full handshake per request".into(),
            ca: node.pki.ca_path().to_owned(),
            name: "a.test".into(),
            addr: node.tls,
            pause: Duration::from_millis(20),
        },
    ]
}

/// Starts the load and waits until it flows.
async fn start_load(env: &Env, node: &TlsNode, relay: &Relay, max_time: Duration) -> Result<Load> {
    let load = Load::start(&clients(node, relay), &env.logs_dir(), max_time);
    load.wait_flowing(500, Duration::from_secs(30))
        .await
        .context("the TLS load never got going")?;
    Ok(load)
}

/// Prints what crossed the h2c relay and fails if proxyd reset or left unanswered a stream
/// that reached it.
fn check_wire(relay: &Relay) -> Result<()> {
    let wire = relay.wire();
    figure("HTTP/2 on the wire (h2c relay)", wire.summary());
    ensure!(
        wire.opened > 0
            && wire.reset_by_server == 0
            && wire.unanswered == 0
            && wire.goaway_errors == 0,
        "proxyd did not answer every stream that reached it: {}",
        wire.summary()
    );
    Ok(())
}

/// Handshakes that failed as the clients saw them: requests on a connection of their own that
/// errored, HTTP/2 connections that carried nothing.
fn failed_handshakes(totals: &[Totals]) -> (u64, u64) {
    let mut handshakes = 0;
    let mut failed = 0;
    for t in totals {
        match t.expect {
            Expect::HandshakePerRequest => {
                handshakes += t.counts.total;
                failed += t.counts.errored;
            }
            Expect::Multiplexed { .. } => {
                handshakes += t.rounds;
                failed += t.empty_rounds;
            }
            Expect::KeepAlive => {}
        }
    }
    (handshakes, failed)
}

fn quantiles(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    format!(
        "p50 {} p99 {} max {}",
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 99.0)),
        ms(percentile(&v, 100.0))
    )
}

const RELOADS: usize = 200;
/// One reload per slot: 180 ms keeps the rate above 5/s with room for a slow poll.
const RELOAD_SLOT: Duration = Duration::from_millis(180);

pub async fn reload_storm(mut env: Env) -> Result<Outcome> {
    let node = TlsNode::start(&mut env, Duration::from_millis(1)).await?;
    let relay = Relay::start(node.h2c).await?;
    let load = start_load(&env, &node, &relay, Duration::from_secs(150)).await?;
    let status0 = node.status().await?;
    let mut generation = node.serving().await?.generation;
    let mut latencies = Vec::with_capacity(RELOADS);
    let ok_before = load.succeeded();
    let storm = Instant::now();
    for i in 0..RELOADS {
        tokio::time::sleep_until((storm + RELOAD_SLOT * i as u32).into()).await;
        let (next, took) = node
            .reload(generation)
            .await
            .with_context(|| format!("reload {} of {RELOADS}", i + 1))?;
        generation = next.generation;
        latencies.push(took);
    }
    let storm_time = storm.elapsed();
    let storm_ok = load.succeeded() - ok_before;
    // The last generations drain under load too before the count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let totals = load.finish().await;
    let status1 = node.status().await?;

    let rate = RELOADS as f64 / storm_time.as_secs_f64();
    figure(
        "reloads",
        format!(
            "{RELOADS} in {:.1}s = {rate:.2}/s",
            storm_time.as_secs_f64()
        ),
    );
    figure(
        "reload latency, SIGUSR2 -> new generation serving in Status",
        quantiles(latencies),
    );
    figure(
        "requests that succeeded during the storm",
        format!(
            "{storm_ok} ({:.0}/s, counted by finished rounds)",
            storm_ok as f64 / storm_time.as_secs_f64()
        ),
    );
    let (ok, failed) = (
        status1.reloads_ok - status0.reloads_ok,
        status1.reloads_failed - status0.reloads_failed,
    );
    figure(
        "reloads ok/failed (master counters)",
        format!("+{ok} / +{failed}"),
    );
    let (handshakes, failed_hs) = failed_handshakes(&totals);
    figure(
        "handshakes failed, as the clients saw them",
        format!("{failed_hs} of {handshakes} counted (plus the keep-alive clients' reconnections)"),
    );
    report_load(&totals)?;
    check_wire(&relay)?;
    ensure!(rate >= 5.0, "only {rate:.2} reloads/s");
    ensure!(
        ok >= RELOADS as u64 && failed == 0,
        "the master counted +{ok} ok / +{failed} failed reloads"
    );
    Ok(Outcome::Pass)
}

const ROTATIONS: usize = 20;
/// How soon a new handshake must get a rotated certificate: the master looks every second and
/// waits a quarter of a second for the files to stand still.
const ROTATION_DEADLINE: Duration = Duration::from_millis(2500);

/// Replaces `path` with `text`: by a rename over it (what certbot and most tools do), or by
/// writing the file in place.
fn replace_file(path: &Path, text: &str, rename: bool) -> Result<()> {
    if rename {
        let tmp = path.with_extension("pem.new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
    } else {
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// Handshakes with SNI `a.test` until one gets `want`; each before must get `old`. Returns how
/// long after `since` it came.
async fn wait_served(node: &TlsNode, old: &Leaf, want: &Leaf, since: Instant) -> Result<Duration> {
    loop {
        let got = clients::served_cert(node.tls, Some("a.test")).await?;
        if got.serial == want.serial {
            return Ok(since.elapsed());
        }
        ensure!(
            got.serial == old.serial,
            "a.test got serial {}, neither the old {} nor the new {}",
            got.serial,
            old.serial,
            want.serial
        );
        ensure!(
            since.elapsed() < Duration::from_secs(10),
            "a.test still gets serial {} 10s after the file changed",
            old.serial
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn rotation_under_load(mut env: Env) -> Result<Outcome> {
    let node = TlsNode::start(&mut env, Duration::from_millis(1)).await?;
    let file = node.dir.join("certs/a.pem");
    let relay = Relay::start(node.h2c).await?;
    let load = start_load(&env, &node, &relay, Duration::from_secs(120)).await?;
    let before = tls_setting(&node.status().await?)
        .context("Status lists no TLS setting")?
        .clone();
    let generation = node.serving().await?.generation;

    let mut current = node.certs[1].clone();
    let mut latencies = Vec::with_capacity(ROTATIONS);
    for i in 0..ROTATIONS {
        let next = node.pki.leaf("a.test")?;
        let t0 = Instant::now();
        replace_file(&file, &next.pem(), i % 2 == 0)?;
        let took = wait_served(&node, &current, &next, t0)
            .await
            .with_context(|| format!("rotation {} of {ROTATIONS}", i + 1))?;
        latencies.push(took);
        current = next;
    }
    let after = tls_setting(&node.status().await?)
        .context("Status lists no TLS setting")?
        .clone();
    let loaded = after.rotations_loaded - before.rotations_loaded;
    let refused = after.rotations_refused - before.rotations_refused;
    figure(
        "rotations",
        format!(
            "{ROTATIONS} (renamed over the file and written in place in turn); master counted +{loaded} loaded, +{refused} refused"
        ),
    );
    let worst = latencies.iter().max().copied().unwrap_or_default();
    figure(
        "file changed -> a new handshake gets the new serial",
        quantiles(latencies),
    );

    // A certificate with a key that does not match it: refused, the last good one serves.
    replace_file(&file, &current.with_wrong_key()?, true)?;
    let admin = node.admin.clone();
    let refused_before = after.rotations_refused;
    let st = harness::wait_for(
        "the mismatched key to be refused",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let st = crate::cluster::proxyd_status(&admin).await?;
                Ok(tls_setting(&st)
                    .filter(|t| t.rotations_refused > refused_before)
                    .cloned())
            }
        },
    )
    .await?;
    let last = st.last_rotation.clone().unwrap_or_default();
    figure(
        "mismatched key: Status.last_rotation",
        format!("{:?}: {}", last.outcome(), last.message),
    );
    let body = metrics(node.metrics).await?;
    let flag = metric_value(
        &body,
        "proxyd_tls_certificate_last_rotation_refused{tls=\"site\"}",
    );
    figure(
        "mismatched key: proxyd_tls_certificate_last_rotation_refused{tls=\"site\"}",
        format!("{flag:?}"),
    );
    ensure!(
        last.outcome() == RotationOutcome::RotationRefused,
        "last_rotation is {:?}",
        last.outcome()
    );
    ensure!(
        last.message.contains("a.pem"),
        "the refusal does not name a.pem: {}",
        last.message
    );
    ensure!(
        flag == Some(1.0),
        "the refused flag in /metrics is {flag:?}"
    );
    let mut still = 0;
    for _ in 0..10 {
        let got = clients::served_cert(node.tls, Some("a.test")).await?;
        ensure!(
            got.serial == current.serial,
            "after the refused rotation a.test gets serial {}, not the last good {}",
            got.serial,
            current.serial
        );
        still += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    figure(
        "after the refusal",
        format!(
            "{still} handshakes over 1.5s all got the last good serial {}",
            current.serial
        ),
    );
    // And a good file again is taken.
    let fixed = node.pki.leaf("a.test")?;
    let t0 = Instant::now();
    replace_file(&file, &fixed.pem(), true)?;
    let took = wait_served(&node, &current, &fixed, t0).await?;
    figure("a good file after the refusal served in", ms(took));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let totals = load.finish().await;
    let (handshakes, failed_hs) = failed_handshakes(&totals);
    figure(
        "handshakes failed, as the clients saw them",
        format!("{failed_hs} of {handshakes} counted"),
    );
    let end = node.serving().await?.generation;
    figure(
        "generation",
        format!("{generation} before, {end} after (no reload)"),
    );
    report_load(&totals)?;
    check_wire(&relay)?;
    ensure!(
        loaded >= ROTATIONS as u64 && refused == 0,
        "the master counted +{loaded} loaded, +{refused} refused rotations"
    );
    ensure!(
        worst <= ROTATION_DEADLINE,
        "a rotation took {} to serve (limit {})",
        ms(worst),
        ms(ROTATION_DEADLINE)
    );
    ensure!(end == generation, "the rotations started a new generation");
    Ok(Outcome::Pass)
}
