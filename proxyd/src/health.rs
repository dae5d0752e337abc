//! Health checks: a TCP connect or an HTTP request every `inter`; `rise` successes in a row
//! bring a server up, `fall` failures in a row take it down.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Check, CheckKind};
use crate::shared::{ServerRt, Shared};

/// A server's health changed (reported to the master, which hands the last known state to
/// the next generation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub backend: String,
    pub server: String,
    pub up: bool,
}

/// Starts one check task per checked server; they stop with `stop`.
pub fn spawn_all(
    shared: &Arc<Shared>,
    changes: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
) {
    for (b, backend) in shared.backends.iter().enumerate() {
        for (s, server) in backend.servers.iter().enumerate() {
            if !server.config.check {
                continue;
            }
            let span = tracing::info_span!("check", backend = %backend.name, server = %server.name);
            tokio::spawn(run(shared.clone(), b, s, changes.clone(), stop.clone()).instrument(span));
        }
    }
}

async fn run(
    shared: Arc<Shared>,
    b: usize,
    s: usize,
    changes: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
) {
    let backend = &shared.backends[b];
    let server = &backend.servers[s];
    let check = &shared.config.backends[b].check;
    let timeout = shared.config.defaults.timeout_check;
    let (rise, fall) = (server.config.rise, server.config.fall);
    // Spread the first checks of many servers instead of firing them all at once.
    let first = server.config.inter.mul_f64(0.1 * (s % 10) as f64);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + first, server.config.inter);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = check_once(server, check, timeout) => r,
        };
        let up = server.up.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                fail_run = 0;
                ok_run = ok_run.saturating_add(1);
                if !up && ok_run >= rise {
                    server.up.store(true, Ordering::Relaxed);
                    tracing::warn!(checks = ok_run, "server is up");
                    backend.freed.notify_waiters();
                    let _ = changes.send(change(backend.name.clone(), server, true));
                }
            }
            Err(why) => {
                ok_run = 0;
                fail_run = fail_run.saturating_add(1);
                tracing::debug!(reason = %why, "check failed");
                if up && fail_run >= fall {
                    server.up.store(false, Ordering::Relaxed);
                    tracing::warn!(checks = fail_run, reason = %why, "server is down");
                    // Requests queued for it must look for another server now.
                    backend.freed.notify_waiters();
                    let _ = changes.send(change(backend.name.clone(), server, false));
                }
            }
        }
    }
}

fn change(backend: String, server: &ServerRt, up: bool) -> Change {
    Change {
        backend,
        server: server.name.clone(),
        up,
    }
}

/// One check; the error says why it failed.
pub async fn check_once(server: &ServerRt, check: &Check, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = server
            .connect(timeout)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let CheckKind::Http {
            method,
            path,
            expect_status,
        } = &check.kind
        else {
            return Ok(());
        };
        // HTTP/1.0 with Connection: close, as HAProxy's httpchk: the answer ends with the
        // connection. The Host is the configured one, else the address as written (a server
        // named by DNS is asked for by its name).
        let host = match &check.host {
            Some(h) => h.clone(),
            None => server.config.address.to_string(),
        };
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: proxyd-check\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        // Only the status line matters; stop reading once it is complete.
        while !buf.contains(&b'\n') && buf.len() < 4096 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.lines().next().unwrap_or_default();
        let status = line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        if status == *expect_status {
            Ok(())
        } else {
            Err(format!("status {status}, expected {expect_status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
