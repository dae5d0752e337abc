//! The writes to stickd: the cache's buffered stores and touches sent in batches, soon after
//! the first of them, and put back to be resent when stickd cannot take them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::sent::{CallIds, Store};
use super::{BACKOFF_MAX, StickCache, connect};

/// Items per Store or Touch call.
const BATCH: usize = 1000;
/// How long touches gather before a flush; a store wakes the flusher at once (see `store`).
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Under a steady flow of new sessions, calls to stickd start at most this often, and the stores
/// made meanwhile go together. A call costs proxyd and stickd about the same whatever its size:
/// gRPC on both sides, stickd's hand-off to the thread that holds its store, the Watch event
/// and the wake-ups of both. At 40k new sessions/s, calls as fast as they came back (some
/// 600/s) cost the two daemons 0.9 µs more per new session than calls at least 5 ms apart (23.5
/// against 22.6 µs, means of 9 runs each), and 2 of their 9 runs had a p99 above 9 ms, against
/// none above 5.4 ms. A store after a quiet spell still goes at once; one made within this of
/// the last call waits at most this long to reach stickd and, from there, the peers.
const STORE_GATHER: Duration = Duration::from_millis(5);

pub(super) async fn flush_loop(cache: Arc<StickCache>, socket: PathBuf, stop: CancellationToken) {
    let mut client: Option<StickClient<Channel>> = None;
    let mut backoff = Duration::from_millis(50);
    let mut last_call: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Last chance for what is buffered (a draining worker's final stores).
                if let Some(c) = client.as_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), flush(&cache, c)).await;
                }
                return;
            }
            _ = cache.wake.notified() => {}
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
        }
        if cache.pending_len() == 0 {
            continue;
        }
        if let Some(due) = last_call.map(|t| t + STORE_GATHER) {
            let now = Instant::now();
            if now < due {
                sleep_or_stop(&stop, due - now).await;
            }
        }
        if client.is_none() {
            match connect(&socket).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "stickd unreachable, writes stay buffered");
                    sleep_or_stop(&stop, backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let began = Instant::now();
        match flush(&cache, c).await {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                last_call = Some(began);
            }
            Err(e) => {
                tracing::warn!(error = %e, pending = cache.pending_len(), "cannot write to stickd, will resend");
                client = None;
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Sends everything pending; on failure what did not go through goes back (behind newer writes).
async fn flush(cache: &StickCache, client: &mut StickClient<Channel>) -> Result<(), String> {
    let taken = cache.take_pending();
    let mut by_table: Vec<Vec<Store>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for (k, server) in taken.stores {
        by_table[k.0].push((k, server));
    }
    // Each table's stores, in calls of at most `BATCH`.
    let mut calls = by_table.into_iter().flat_map(batches);
    let mut touches: Vec<Vec<String>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for (t, key) in &taken.touches {
        touches[*t].push(key.clone());
    }
    let result = async {
        for call in calls.by_ref() {
            let Some(t) = call.first().map(|((t, _), _)| *t) else {
                continue;
            };
            let items = call
                .iter()
                .map(|((_, key), server)| pb::StoreItem {
                    key: key.clone(),
                    server: String::from(&**server),
                    expires_unix_ms: 0,
                })
                .collect();
            let n = call.len() as u64;
            // Held from before the call: its marker may come on the Watch stream before its reply.
            let (ids, unheld) = match cache.sent().hold(call.into_iter().collect()) {
                Ok(ids) => (ids, None),
                Err(stores) => (CallIds::default(), Some(stores)),
            };
            let req = pb::StoreRequest {
                table: cache.tables[t].name.clone(),
                items,
                // Our Watch stream applies them: stickd echoes them there, or only says where
                // they were applied if the call names the stream.
                omit_entries: true,
                watcher: ids.watcher,
                batch: ids.batch,
            };
            match client.store(req).await {
                Ok(_) => {}
                // A refused item (e.g. a key stickd finds invalid) would be resent for ever.
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    cache.sent().release(ids);
                    tracing::warn!(table = %cache.tables[t].name, error = %s.message(), "stickd refused a batch of stores; dropped");
                }
                Err(s) => {
                    let back = unheld.or_else(|| cache.sent().release(ids));
                    return Err((format!("Store: {}", s.message()), back));
                }
            }
            cache.stats.stores_sent.fetch_add(n, Ordering::Relaxed);
        }
        for (t, keys) in touches.into_iter().enumerate() {
            for keys in batches(keys) {
                let n = keys.len() as u64;
                let req = pb::TouchRequest {
                    table: cache.tables[t].name.clone(),
                    keys,
                };
                match client.touch(req).await {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {}
                    Err(s) => return Err((format!("Touch: {}", s.message()), None)),
                }
                cache.stats.touches_sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    let Err((why, failed)) = result else {
        return Ok(());
    };
    cache.put_back(
        failed.into_iter().flatten().chain(calls.flatten()),
        taken.touches,
    );
    Err(why)
}

/// `items` in calls of at most `BATCH`, moved rather than copied.
fn batches<T>(items: Vec<T>) -> impl Iterator<Item = Vec<T>> {
    let mut items = items.into_iter().peekable();
    std::iter::from_fn(move || {
        items.peek()?;
        Some(items.by_ref().take(BATCH).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_every_item_in_order() {
        let items: Vec<u32> = (0..2 * BATCH as u32 + 7).collect();
        let sizes: Vec<usize> = batches(items.clone()).map(|b| b.len()).collect();
        assert_eq!(sizes, [BATCH, BATCH, 7]);
        assert_eq!(batches(items.clone()).flatten().collect::<Vec<_>>(), items);
        assert_eq!(batches(Vec::<u32>::new()).count(), 0);
    }
}
