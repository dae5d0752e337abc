//! One reload storm: reloads at a steady rate under load, each one timed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Backends, Kind, Target, load_config};
use crate::bench::Ctx;
use crate::load::{Load, LoadReport};

/// Time between two reload signals (5/s).
pub(super) const RELOAD_SLOT: Duration = Duration::from_millis(200);

/// A reload that is not visible within this is counted as not verified.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) const TARGETS: [Kind; 4] = [
    Kind::Proxyd,
    Kind::Haproxy {
        idle_close: false,
        no_exit: false,
    },
    Kind::Haproxy {
        idle_close: true,
        no_exit: false,
    },
    Kind::Nginx,
];

/// What one storm against one target measured.
pub(super) struct Storm {
    pub(super) kind: Kind,
    pub(super) reloads: usize,
    pub(super) verified: usize,
    /// Signal to reload seen, per verified reload.
    pub(super) reload_ms: Vec<f64>,
    pub(super) rate: f64,
    pub(super) storm_rps: f64,
    pub(super) report: LoadReport,
    /// Processes of the target (master + workers) at the end, and the most seen during the storm.
    pub(super) end_procs: usize,
    pub(super) max_procs: usize,
    /// First reason a reload was not verified.
    pub(super) unverified: Option<String>,
    /// proxyd only: successful and failed reloads its master counted during the storm.
    pub(super) master_counts: Option<(u64, u64)>,
}

pub(super) async fn storm(
    ctx: &Ctx,
    kind: Kind,
    backends: &Backends,
    reloads: usize,
) -> Result<Storm> {
    let mut target = Target::start(kind, backends, &ctx.tools).await?;
    let load = Load::start(load_config(target.frontend, backends.names()));
    load.wait_ok(300, Duration::from_secs(20))
        .await
        .with_context(|| format!("the load never got going on {}", kind.label()))?;
    // Every client connected and going before the first reload.
    tokio::time::sleep(ctx.pick(Duration::from_millis(200), Duration::from_secs(1))).await;
    let counts_before = target.proxyd_reload_counts().await?;
    let ok_before = load.snapshot().ok;
    let started = Instant::now();
    let mut verified = 0;
    let mut reload_ms = Vec::new();
    let mut max_procs = 0;
    let mut unverified = None;
    for i in 0..reloads {
        tokio::time::sleep_until((started + RELOAD_SLOT * i as u32).into()).await;
        let t0 = Instant::now();
        let mark = target.reload().await?;
        match target.wait_reloaded(&mark, RELOAD_TIMEOUT).await {
            Ok(()) => {
                verified += 1;
                reload_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Err(e) => {
                unverified.get_or_insert_with(|| format!("reload {}: {e:#}", i + 1));
            }
        }
        max_procs = max_procs.max(1 + target.workers().len());
    }
    let storm_time = started.elapsed();
    let storm_rps = (load.snapshot().ok - ok_before) as f64 / storm_time.as_secs_f64();
    // The last generations drain under load too before anything is counted.
    tokio::time::sleep(ctx.pick(Duration::from_millis(300), Duration::from_secs(1))).await;
    let end_procs = usize::from(target.master_alive()) + target.workers().len();
    let master_counts = match (counts_before, target.proxyd_reload_counts().await?) {
        (Some((ok0, failed0)), Some((ok1, failed1))) => Some((ok1 - ok0, failed1 - failed0)),
        _ => None,
    };
    let report = load.finish().await;
    Ok(Storm {
        kind,
        reloads,
        verified,
        reload_ms,
        rate: reloads as f64 / storm_time.as_secs_f64(),
        storm_rps,
        report,
        end_procs,
        max_procs: max_procs.max(end_procs),
        unverified,
        master_counts,
    })
}
