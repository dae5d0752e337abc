//! A worker's stick cache: an in-memory copy of each stickd table it uses, fed by stickd's
//! Watch stream, written locally at once (read-your-writes) and flushed to stickd in batches.
//!
//! The request path only takes one shard's mutex (of [`SHARDS`] per table, chosen by the key's
//! hash): it never awaits stickd and workers' threads rarely meet on a lock. An entry is its key
//! (inline up to 30 bytes, else boxed), an absolute expiry, stickd's version and a 16-bit index
//! into the shard's interned server names: 56 bytes in a hash bucket, big tables on huge pages
//! ([`TableAlloc`]) so that a lookup's random access costs no page walk. Touches that refresh an
//! entry's expiry are coalesced: an entry is touched at most once per quarter of its table's
//! `expire`, so a busy session costs a few replication messages per `expire`. Expired entries
//! are dropped by the lookup that finds them and by a sweep that visits a bounded number of
//! buckets per step, so no lock is held for a walk of the whole table. While stickd is away
//! the cache keeps serving, writes wait in a bounded buffer and go out on reconnect; the
//! reconnect's snapshot replaces the cache, with the unsent writes on top.
//!
//! - `cache`: lookups, local stores and the write buffer; stickd's snapshots and changes.
//! - `sent`: the stores sent to stickd that the Watch stream has not yet shown applied.
//! - `table`: one table's shards and their compact entries.
//! - `alloc`: the shard tables' allocator (huge pages, prefetch) and the counting allocator of
//!   the memory figures; the only `unsafe` of the stick cache.
//! - `rules`: the tables the stick rules use, their check against stickd, address keys.
//! - `watch`, `flush`, `sweep`: the three tasks [`StickCache::start`] spawns.

mod alloc;
mod cache;
mod flush;
mod rules;
mod sent;
mod sweep;
mod table;
#[cfg(test)]
mod testing;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::stick::v1::stick_client::StickClient;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use alloc::{CountingAlloc, TableAlloc};
pub use cache::{MAX_PENDING, Pending, StickCache, StickStats, TableCounts};
pub use rules::{KeyKind, StickError};
pub use sweep::SWEEP_BUCKETS;
pub use table::{SHARDS, Table};

/// Longest wait between two attempts to reach stickd (the watch's and the flusher's).
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl StickCache {
    /// Starts the watch, flush and sweep tasks. Returns `Ok(true)` once the first snapshot is
    /// in, `Ok(false)` if stickd did not answer within `wait` (the tasks keep trying), or the
    /// table that stickd does not have (or has with another type).
    pub async fn start(
        self: &Arc<Self>,
        socket: PathBuf,
        stop: CancellationToken,
        wait: Duration,
    ) -> Result<bool, StickError> {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(watch::watch_loop(
            self.clone(),
            socket.clone(),
            stop.clone(),
            tx,
        ));
        tokio::spawn(flush::flush_loop(self.clone(), socket, stop.clone()));
        tokio::spawn(sweep::sweep_loop(self.clone(), stop));
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r.map(|()| true),
            Ok(Err(_)) | Err(_) => Ok(false),
        }
    }
}

async fn connect(socket: &std::path::Path) -> Result<StickClient<Channel>, String> {
    let ch = common::grpc::connect_unix(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    Ok(StickClient::new(ch))
}
