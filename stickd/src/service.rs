//! The local `stick.v1.Stick` service: proxyd's reads, writes and Watch, and the operator commands.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::Stream;
use proto::stick::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::peer::Peers;
use crate::store::{Event, Store, StoreError, Writer};

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::UnknownTable(_) => Status::not_found(e.to_string()),
            StoreError::Key { .. } | StoreError::BadServer { .. } | StoreError::Empty(_) => {
                Status::invalid_argument(e.to_string())
            }
            StoreError::Sled(_) | StoreError::Corrupt { .. } | StoreError::LogGap(_) => {
                Status::internal(e.to_string())
            }
        }
    }
}

pub struct LocalService {
    pub store: Arc<Store>,
    pub peers: Arc<Peers>,
    pub started: Instant,
    pub shutdown: CancellationToken,
    /// The id of the next Watch stream (from 1: 0 names none).
    pub next_watcher: AtomicU64,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

fn event(e: pb::watch_event::Event) -> Result<pb::WatchEvent, Status> {
    Ok(pb::WatchEvent { event: Some(e) })
}

/// Whether `ev` holds the stores of the writer that watches on stream `me`.
fn is_writers(ev: &Event, me: u64) -> bool {
    matches!(ev, Event::Changes { writer: Some(w), .. } if w.watcher == me)
}

/// The store's methods take its lock and touch sled: keep them off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl pb::stick_server::Stick for LocalService {
    async fn lookup(
        &self,
        r: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        let r = r.into_inner();
        let entries = self.store.lookup(&r.table, &r.keys)?;
        Ok(Response::new(pb::LookupReply { entries }))
    }

    async fn store(
        &self,
        r: Request<pb::StoreRequest>,
    ) -> Result<Response<pb::StoreReply>, Status> {
        let r = r.into_inner();
        let store = self.store.clone();
        let entries = blocking(move || {
            let stored = if r.omit_entries {
                let writer = (r.watcher != 0).then_some(Writer {
                    watcher: r.watcher,
                    batch: r.batch,
                });
                store
                    .store_unreturned(&r.table, &r.items, writer)
                    .map(|_| Vec::new())
            } else {
                store.store(&r.table, &r.items)
            };
            store.backpressure();
            stored
        })
        .await?;
        Ok(Response::new(pb::StoreReply { entries }))
    }

    async fn touch(
        &self,
        r: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchReply>, Status> {
        let r = r.into_inner();
        let store = self.store.clone();
        let touched = blocking(move || {
            let r = store.touch(&r.table, &r.keys);
            store.backpressure();
            r
        })
        .await?;
        Ok(Response::new(pb::TouchReply { touched }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let tables = r.into_inner().tables;
        let (snapshot, mut rx) = self.store.watch(&tables)?;
        let me = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let (tx, out) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        let store = self.store.clone();
        store.counters.watchers.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut n = 0u64;
            for batch in snapshot {
                n += batch.entries.len() as u64;
                if tx
                    .send(event(pb::watch_event::Event::Snapshot(batch)))
                    .await
                    .is_err()
                {
                    store.counters.watchers.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
            let end = pb::watch_event::Event::SnapshotEnd(pb::SnapshotEnd {
                entries: n,
                watcher: me,
            });
            let mut open = tx.send(event(end)).await.is_ok();
            while open {
                let ev = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    ev = rx.recv() => ev,
                };
                let msg = match ev {
                    // Our own writer's marker comes whatever the table: the writer awaits it.
                    Ok(ev)
                        if !is_writers(&ev, me)
                            && !tables.is_empty()
                            && !tables.iter().any(|t| t == ev.table()) =>
                    {
                        continue;
                    }
                    Ok(ev) => match &*ev {
                        // Our own writer's stores: it has them, it only learns where they were
                        // applied.
                        Event::Changes {
                            table,
                            writer: Some(w),
                            ..
                        } if w.watcher == me => {
                            event(pb::watch_event::Event::Applied(pb::StoreApplied {
                                table: table.to_string(),
                                batch: w.batch,
                            }))
                        }
                        Event::Changes { table, entries, .. } => {
                            event(pb::watch_event::Event::Changes(pb::EntryBatch {
                                table: table.to_string(),
                                entries: entries.clone(),
                            }))
                        }
                        Event::Cleared(c) => event(pb::watch_event::Event::Cleared(c.clone())),
                    },
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        open = false;
                        Err(Status::data_loss(format!(
                            "watcher fell {missed} changes behind: watch again for a new snapshot"
                        )))
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                open &= tx.send(msg).await.is_ok();
            }
            store.counters.watchers.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn show(&self, r: Request<pb::ShowRequest>) -> Result<Response<pb::ShowReply>, Status> {
        Ok(Response::new(self.store.show(&r.into_inner())?))
    }

    async fn set(&self, r: Request<pb::SetRequest>) -> Result<Response<pb::SetReply>, Status> {
        let r = r.into_inner();
        let item = pb::StoreItem {
            key: r.key,
            server: r.server,
            expires_unix_ms: r.expires_unix_ms,
        };
        let store = self.store.clone();
        let mut entries = blocking(move || store.store(&r.table, &[item])).await?;
        Ok(Response::new(pb::SetReply {
            entry: entries.pop(),
        }))
    }

    async fn delete(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let r = r.into_inner();
        let store = self.store.clone();
        let existed = blocking(move || store.delete(&r.table, &r.key)).await?;
        Ok(Response::new(pb::DeleteReply { existed }))
    }

    async fn clear(
        &self,
        r: Request<pb::ClearRequest>,
    ) -> Result<Response<pb::ClearReply>, Status> {
        let r = r.into_inner();
        let store = self.store.clone();
        let (removed, version) = blocking(move || store.clear(&r.table)).await?;
        Ok(Response::new(pb::ClearReply { removed, version }))
    }

    async fn list_tables(
        &self,
        _: Request<pb::ListTablesRequest>,
    ) -> Result<Response<pb::ListTablesReply>, Status> {
        Ok(Response::new(pb::ListTablesReply {
            tables: self.store.tables_info(),
        }))
    }

    async fn show_peers(
        &self,
        _: Request<pb::ShowPeersRequest>,
    ) -> Result<Response<pb::ShowPeersReply>, Status> {
        Ok(Response::new(self.peers.show(&self.store)))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        let s = &self.store;
        let c = &s.counters;
        Ok(Response::new(pb::StatsReply {
            local: s.local().to_owned(),
            head_seq: s.head(),
            log_first_seq: s.first_seq(),
            local_writes: c.local_writes.load(Ordering::Relaxed),
            remote_applied: c.remote_applied.load(Ordering::Relaxed),
            remote_ignored: c.remote_ignored.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            watchers: c.watchers.load(Ordering::Relaxed),
            disk_bytes: s.disk_bytes(),
            tables: s.tables_info(),
            uptime_ms: i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX),
        }))
    }
}
