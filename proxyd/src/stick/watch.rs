//! The feed from stickd: one Watch stream per worker, a snapshot then every change, local and
//! remote, applied to the cache; lost and reopened with backoff while stickd is away.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::stick::v1 as pb;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{BACKOFF_MAX, StickCache, StickError, connect};

enum WatchEnd {
    Stopped,
    Lost(String),
    Refused(StickError),
}

pub(super) async fn watch_loop(
    cache: Arc<StickCache>,
    socket: PathBuf,
    stop: CancellationToken,
    first: oneshot::Sender<Result<(), StickError>>,
) {
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let end = watch_once(&cache, &socket, &stop, &mut first).await;
        // The stream's markers are gone with it: the calls still awaiting one are buffered
        // again, to be resent (they may have failed with it; stores are idempotent).
        let unmarked = cache.sent().restart(0);
        cache.put_back(unmarked, []);
        // A link that was up starts its retries over from the shortest wait: the backoff is for
        // a stickd that stays away, and a restarted one is back within a few hundred ms.
        if cache.stats.link_up.swap(false, Ordering::Relaxed) {
            backoff = Duration::from_millis(50);
        }
        match end {
            WatchEnd::Stopped => return,
            WatchEnd::Lost(why) => {
                tracing::warn!(reason = %why, "stickd watch lost; serving from the cache, retrying");
            }
            WatchEnd::Refused(e) => {
                tracing::error!(error = %e, "stick table refused");
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn watch_once(
    cache: &StickCache,
    socket: &std::path::Path,
    stop: &CancellationToken,
    first: &mut Option<oneshot::Sender<Result<(), StickError>>>,
) -> WatchEnd {
    let mut client = match connect(socket).await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Lost(e),
    };
    let tables = match client.list_tables(pb::ListTablesRequest {}).await {
        Ok(r) => r.into_inner().tables,
        Err(e) => return WatchEnd::Lost(format!("ListTables: {}", e.message())),
    };
    if let Err(e) = cache.check_tables(&tables) {
        return WatchEnd::Refused(e);
    }
    let names: Vec<String> = cache.tables.iter().map(|t| t.name.clone()).collect();
    let mut stream = match client.watch(pb::WatchRequest { tables: names }).await {
        Ok(r) => r.into_inner(),
        Err(e) => return WatchEnd::Lost(format!("Watch: {}", e.message())),
    };
    let mut snapshot: Vec<Vec<pb::Entry>> = cache.tables.iter().map(|_| Vec::new()).collect();
    let mut in_snapshot = true;
    // What stickd numbered this stream (0: a stickd that echoes every store).
    let mut watcher = 0;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return WatchEnd::Stopped,
            m = stream.message() => m,
        };
        let event = match msg {
            Ok(Some(ev)) => ev.event,
            Ok(None) => return WatchEnd::Lost("stream ended".into()),
            Err(e) => return WatchEnd::Lost(format!("Watch: {}", e.message())),
        };
        match event {
            Some(pb::watch_event::Event::Snapshot(b)) => {
                if let Some(t) = cache.table_index(&b.table) {
                    snapshot[t].extend(b.entries);
                }
            }
            Some(pb::watch_event::Event::SnapshotEnd(end)) => {
                for (t, entries) in snapshot.iter_mut().enumerate() {
                    cache.install_snapshot(t, std::mem::take(entries));
                }
                watcher = end.watcher;
                let unmarked = cache.sent().restart(watcher);
                cache.put_back(unmarked, []);
                in_snapshot = false;
                cache.stats.link_up.store(true, Ordering::Relaxed);
                tracing::info!(entries = end.entries, "stick cache loaded from stickd");
                // A reconnect may have writes waiting.
                cache.wake.notify_one();
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Some(pb::watch_event::Event::Changes(b)) => {
                if let Some(t) = cache.table_index(&b.table) {
                    if in_snapshot {
                        snapshot[t].extend(b.entries);
                    } else {
                        cache.apply(t, b.entries);
                    }
                }
            }
            Some(pb::watch_event::Event::Applied(a)) => {
                cache.sent().applied(watcher, a.batch);
            }
            Some(pb::watch_event::Event::Cleared(c)) => {
                if let Some(t) = cache.table_index(&c.table) {
                    snapshot[t].clear();
                    cache.clear(t, c.version);
                }
            }
            None => {}
        }
    }
}
