//! Writers and watchers of the stickd bench: saturating and paced stores, lag to every watcher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proto::stick::v1 as pb;

use super::{BATCH, DRAIN, Node, PACED_BATCH, PACED_RATE, TABLE, WRITERS, configure};
use crate::bench::stats;
use crate::harness::Env;

fn items(tag: u8, range: std::ops::Range<usize>) -> Vec<pb::StoreItem> {
    range
        .map(|i| pb::StoreItem {
            key: format!("{}{i}", tag as char),
            server: format!("app{}", i % 4 + 1),
            expires_unix_ms: 0,
        })
        .collect()
}

/// What a writer run did: keys `{tag}0..{tag}{n}`, and when each batch's reply came.
pub(super) struct Written {
    pub(super) n: usize,
    pub(super) started: Instant,
    pub(super) elapsed: Duration,
    /// (first index, reply time) of every batch.
    replies: Vec<(usize, usize, Instant)>,
}

impl Written {
    fn reply_times(&self) -> Vec<Option<Instant>> {
        let mut at = vec![None; self.n];
        for &(first, len, t) in &self.replies {
            for slot in at.iter_mut().skip(first).take(len) {
                *slot = Some(t);
            }
        }
        at
    }
}

/// Stores batches of fresh keys on `node` from `WRITERS` tasks until `count` keys or `dur`.
pub(super) async fn saturate(node: &Node, tag: u8, count: usize, dur: Duration) -> Result<Written> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let mut c = node.client().await?;
        let next = next.clone();
        tasks.spawn(async move {
            let mut replies = Vec::new();
            // Checked before a batch is claimed, so that claimed batches are exactly the written
            // ones and the keys written are 0..n without holes.
            while started.elapsed() < dur {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let end = (first + BATCH).min(count);
                c.store(pb::StoreRequest {
                    table: TABLE.into(),
                    items: items(tag, first..end),
                    omit_entries: false,
                    watcher: 0,
                    batch: 0,
                })
                .await
                .context("Store")?;
                replies.push((first, end - first, Instant::now()));
            }
            anyhow::Ok(replies)
        });
    }
    let mut replies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        replies.extend(r.context("writer task")??);
    }
    let n = replies.iter().map(|r| r.1).sum();
    let last = replies.iter().map(|r| r.2).max().unwrap_or(started);
    Ok(Written {
        n,
        started,
        elapsed: last - started,
        replies,
    })
}

/// One writer sending `PACED_BATCH` keys every millisecond for `dur`.
pub(super) async fn paced(node: &Node, tag: u8, dur: Duration) -> Result<Written> {
    let mut c = node.client().await?;
    let started = Instant::now();
    let period = Duration::from_secs_f64(PACED_BATCH as f64 / PACED_RATE as f64);
    // Burst (the default): a late tick is made up, so the average rate stays the offered one.
    let mut tick = tokio::time::interval(period);
    let mut replies = Vec::new();
    let mut n = 0;
    while started.elapsed() < dur {
        tick.tick().await;
        c.store(pb::StoreRequest {
            table: TABLE.into(),
            items: items(tag, n..n + PACED_BATCH),
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await
        .context("Store")?;
        replies.push((n, PACED_BATCH, Instant::now()));
        n += PACED_BATCH;
    }
    Ok(Written {
        n,
        started,
        elapsed: started.elapsed(),
        replies,
    })
}

/// Arrivals seen by a Watch stream on one node: (tag, index, when).
#[derive(Default)]
pub(super) struct Seen {
    arrivals: Vec<(u8, u32, Instant)>,
    per_tag: HashMap<u8, usize>,
    error: Option<String>,
}

/// Opens a Watch on `node`, waits for its snapshot to end, then records every change in the
/// background until the stream ends (the node stops or the bench drops the runtime's task).
pub(super) async fn watch(node: &Node) -> Result<Arc<Mutex<Seen>>> {
    let mut c = node.client().await?;
    let mut stream = c
        .watch(pb::WatchRequest {
            tables: vec![TABLE.into()],
        })
        .await
        .with_context(|| format!("Watch on {}", node.name))?
        .into_inner();
    loop {
        match stream.message().await?.and_then(|e| e.event) {
            Some(pb::watch_event::Event::SnapshotEnd(_)) => break,
            Some(_) => {}
            None => bail!("watch on {} ended before its snapshot did", node.name),
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return,
                Err(e) => {
                    lock(&seen).error = Some(e.to_string());
                    return;
                }
            };
            let Some(pb::watch_event::Event::Changes(b)) = ev.event else {
                continue;
            };
            let now = Instant::now();
            let mut s = lock(&seen);
            for e in b.entries {
                let Some((&tag, idx)) = e.key.as_bytes().split_first() else {
                    continue;
                };
                let Some(idx) = std::str::from_utf8(idx)
                    .ok()
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                s.arrivals.push((tag, idx, now));
                *s.per_tag.entry(tag).or_default() += 1;
            }
        }
    });
    Ok(out)
}

fn lock(m: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until every watcher has seen `n` updates tagged `tag`; returns the last arrival overall.
pub(super) async fn drained(watchers: &[Arc<Mutex<Seen>>], tag: u8, n: usize) -> Result<Instant> {
    let deadline = Instant::now() + DRAIN;
    loop {
        let mut done = true;
        for w in watchers {
            let s = lock(w);
            if let Some(e) = &s.error {
                bail!("a watch stream failed: {e}");
            }
            done &= s.per_tag.get(&tag).copied().unwrap_or(0) >= n;
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            let counts: Vec<usize> = watchers
                .iter()
                .map(|w| lock(w).per_tag.get(&tag).copied().unwrap_or(0))
                .collect();
            bail!("replication did not deliver {n} updates within {DRAIN:?}: peers saw {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(watchers
        .iter()
        .filter_map(|w| {
            lock(w)
                .arrivals
                .iter()
                .filter(|a| a.0 == tag)
                .map(|a| a.2)
                .max()
        })
        .max()
        .unwrap_or_else(Instant::now))
}

/// p50 and p99 of the lags (ms) of every update tagged `tag` on every watcher.
pub(super) fn lags(watchers: &[Arc<Mutex<Seen>>], tag: u8, w: &Written) -> (f64, f64) {
    let replies = w.reply_times();
    let mut lags: Vec<f64> = Vec::new();
    for s in watchers {
        let s = lock(s);
        for &(t, idx, at) in &s.arrivals {
            if t != tag {
                continue;
            }
            if let Some(Some(reply)) = replies.get(idx as usize) {
                lags.push(at.saturating_duration_since(*reply).as_secs_f64() * 1000.0);
            }
        }
    }
    (percentile(&mut lags, 0.50), percentile(&mut lags, 0.99))
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    v[i]
}

/// Writes/s on one node with no peers, and stickd's CPU µs per write.
pub(super) async fn local_writes(dur: Duration) -> Result<(f64, f64)> {
    let mut env = Env::new("bench-stickd-local")?;
    let mut nodes = configure(&mut env, &[1], 1_000_000)?;
    let node = &mut nodes[0];
    node.start(&env)?;
    node.client().await?;
    let cpu0 = stats::cpu_time(node.pid());
    let w = saturate(node, b'l', usize::MAX, dur).await?;
    let cpu = stats::cpu_time(node.pid()) - cpu0;
    ensure!(w.n > 0, "no write went through");
    Ok((
        w.n as f64 / w.elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / w.n as f64,
    ))
}
