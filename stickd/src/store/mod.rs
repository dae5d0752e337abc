//! The stick tables: in-memory maps backed by sled, the local change log, LWW merge and expiry.
//!
//! Every table lives twice: in memory ([`crate::entries::Entries`]), which answers reads, and in
//! sled (a checkpoint and the journal of the writes since), which survives restarts.
//! Local changes get a sequence number in the `log` tree (what peers replay); remote changes are
//! merged by last-writer-wins on (HLC version, origin name) and are not logged again, because every
//! node pushes only its own changes to every other node (full mesh).
//!
//! Durability: sled is flushed every `flush_interval` (500 ms by default) and on shutdown, so a
//! kill -9 loses at most the writes of the last flush interval plus the flush itself (well under
//! a second); anything written a second before the kill is on disk.
//!
//! The files: `tables` (one table in memory and the merge), `queue` (writes waiting for sled),
//! `writes` (local writes, clears, expiry), `replicate` (what peers send and are sent), `log`
//! (our change log and its epochs), `durable` (journal, checkpoints, flushes), `migrate` (older
//! on-disk layouts) and `views` (reads for clients and operators).

mod durable;
mod error;
mod log;
mod migrate;
mod queue;
mod replicate;
mod tables;
#[cfg(test)]
pub(crate) mod testing;
mod views;
mod writes;

use common::time::now_ms;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::stick::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::config::{Config, TableDef};
use crate::hlc::Hlc;
use crate::logbound::LogBound;
use crate::record::Names;
use durable::Disk;
use queue::Pending;
use tables::{Loading, Table};

pub use error::StoreError;
pub use replicate::{Mark, SnapshotTable};

/// Entries a watcher may fall behind before it is cut off (and must watch again).
const WATCH_BUFFER: usize = 16 * 1024;

/// What watchers receive: a batch of entries as applied, or a clear.
#[derive(Clone, Debug)]
pub enum Event {
    Changes {
        table: Arc<str>,
        entries: Vec<pb::Entry>,
        /// The local writer that made them and watches too: its own stream is told where they
        /// were applied instead of being sent them.
        writer: Option<Writer>,
    },
    Cleared(pb::TableCleared),
}

/// A Store call of a writer that watches: its Watch stream and the call's number (see
/// `StoreRequest.watcher` in stick.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    pub watcher: u64,
    pub batch: u64,
}

impl Event {
    pub fn table(&self) -> &str {
        match self {
            Event::Changes { table, .. } => table,
            Event::Cleared(c) => &c.table,
        }
    }
}

/// Counters for Stats.
#[derive(Debug, Default)]
pub struct Counters {
    pub local_writes: AtomicU64,
    pub remote_applied: AtomicU64,
    pub remote_ignored: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
    pub watchers: AtomicU64,
}

/// What the store's lock guards.
struct Inner {
    tables: HashMap<String, Table>,
    hlc: Hlc,
    head: u64,
    /// The newest log records, served to pushers without touching sled. Records leave it only
    /// once persisted.
    tail: VecDeque<pb::Change>,
    /// Server and origin names, shared by the entries that name them.
    names: Names,
}

/// The node's tables. Cheap to share (`Arc<Store>`); every method is safe to call from any task.
pub struct Store {
    local: Arc<str>,
    db: sled::Db,
    /// Our change log: values are `pb::Batch` encodings of consecutive records, keyed by the
    /// sequence of their first record.
    log: sled::Tree,
    meta: sled::Tree,
    /// Table writes since the last checkpoint: one value per `persist`, keyed by a counter.
    journal: sled::Tree,
    /// Every table's entries as of the checkpoint named in meta `checkpoint`.
    checkpoint: sled::Tree,
    inner: Mutex<Inner>,
    pending: Arc<Pending>,
    /// One writer at a time, so that sled sees the queue in order.
    persist_lock: Mutex<Disk>,
    /// Highest log sequence handed to sled.
    persisted_seq: AtomicU64,
    first_seq: AtomicU64,
    epoch: u64,
    /// Earlier epochs of our log and the head each reached on disk.
    epochs: Vec<(u64, u64)>,
    /// Set when we may have lost writes of our own (see `durable::recover_since`).
    recover_since: Option<u64>,
    /// Until when (unix ms) a snapshot from a peer is taken to be arriving: checkpoints wait
    /// meanwhile (see `persist`).
    snapshot_until: AtomicI64,
    /// How much of the log `trim_log` keeps (and the in-memory tail holds at most).
    log_bound: LogBound,
    events: broadcast::Sender<Arc<Event>>,
    head_tx: watch::Sender<u64>,
    pub counters: Counters,
}

impl Store {
    /// Opens (or creates) the data directory and loads every configured table into memory.
    /// Tables on disk that are no longer configured are kept on disk untouched.
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let db = durable::open_db(&config.data_dir)?;
        let log = db.open_tree(log::TREE)?;
        let meta = db.open_tree("meta")?;
        let journal = db.open_tree("journal")?;
        let checkpoint = db.open_tree("checkpoint")?;
        let pending = Arc::new(Pending::default());
        let mut loading = Loading::new(&config.tables, &pending, now_ms());
        durable::load_clears(&meta, &mut loading)?;
        let legacy = migrate::load_table_trees(&db, &mut loading)?;
        let disk = durable::load_tables(&checkpoint, &journal, &meta, &mut loading)?;
        migrate::rewrite_old_log(&db, &log)?;
        let last_change = log::last_change(&log)?;
        let own_max = loading
            .own_max(&config.local)
            .max(last_change.as_ref().map_or(0, log::version_of));
        let recover_since = durable::recover_since(&meta, own_max)?;
        let head = log::head(&meta, last_change.as_ref())?;
        let (epoch, epochs) = log::new_epoch(&meta, head)?;
        let first = log::first_seq(&log, head)?;
        let mut hlc = Hlc::default();
        hlc.observe(loading.max_version);
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (head_tx, _) = watch::channel(head);
        let store = Store {
            local: Arc::from(config.local.as_str()),
            db,
            log,
            meta,
            journal,
            checkpoint,
            inner: Mutex::new(Inner {
                tables: loading.tables,
                hlc,
                head,
                tail: VecDeque::new(),
                names: loading.names,
            }),
            pending,
            persist_lock: Mutex::new(disk),
            persisted_seq: AtomicU64::new(head),
            first_seq: AtomicU64::new(first),
            epoch,
            epochs,
            recover_since,
            snapshot_until: AtomicI64::new(0),
            log_bound: LogBound::new(config.log_keep, config.tables.iter().map(|t| t.size).sum()),
            events,
            head_tx,
            counters: Counters::default(),
        };
        migrate::drop_table_trees(&store, legacy)?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent enough to serve.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn table_defs(&self) -> Vec<TableDef> {
        let inner = self.lock();
        let mut v: Vec<_> = inner.tables.values().map(|t| t.def.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// `Some(v)` when this start may have lost writes of our own above version `v` (a kill -9
    /// inside the durability window, or a new data_dir): peers are asked to send them back.
    pub fn recover_since(&self) -> Option<u64> {
        self.recover_since
    }

    /// Moves the published head to the log's and tells watchers of `event`.
    fn publish(&self, inner: &Inner, event: Event) {
        self.head_tx.send_if_modified(|h| {
            let moved = *h != inner.head;
            *h = inner.head;
            moved
        });
        // No watcher is not an error.
        let _ = self.events.send(Arc::new(event));
    }
}
