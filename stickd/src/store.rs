//! The stick tables: in-memory maps backed by sled, the local change log, LWW merge and expiry.
//!
//! Every table lives twice: in memory ([`Entries`]), which answers reads, and in sled (a
//! checkpoint and the journal of the writes since), which survives restarts.
//! Local changes get a sequence number in the `log` tree (what peers replay); remote changes are
//! merged by last-writer-wins on (HLC version, origin name) and are not logged again, because every
//! node pushes only its own changes to every other node (full mesh).
//!
//! Durability: sled is flushed every `flush_interval` (500 ms by default) and on shutdown, so a
//! kill -9 loses at most the writes of the last flush interval plus the flush itself (well under
//! a second); anything written a second before the kill is on disk.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use proto::stick::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::config::{Config, KeyType, TableDef};
use crate::entries::{Entries, Found};
use crate::hlc::Hlc;
use crate::limits::{MAX_SERVER_LEN, MAX_TYPED_KEY_LEN};
use crate::logbound::LogBound;

/// Entries a watcher may fall behind before it is cut off (and must watch again).
const WATCH_BUFFER: usize = 16 * 1024;
/// Earlier log epochs remembered (one per restart).
const EPOCH_HISTORY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown table '{0}'")]
    UnknownTable(String),
    #[error("table '{table}': key '{key}' is not {expected}")]
    BadKey {
        table: String,
        key: String,
        expected: &'static str,
    },
    #[error(
        "table '{table}': key of {len} bytes is longer than the table's len {max} (keys are refused, not truncated)"
    )]
    KeyTooLong { table: String, len: usize, max: u32 },
    #[error(
        "table '{table}': key has {what} at byte {at} (control characters are refused in keys)"
    )]
    KeyControl {
        table: String,
        at: usize,
        what: &'static str,
    },
    #[error("table '{table}': key '{key}': {reason}")]
    BadServer {
        table: String,
        key: String,
        reason: &'static str,
    },
    #[error("empty request: {0}")]
    Empty(&'static str),
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the change log no longer holds sequence {0}")]
    LogGap(u64),
}

impl StoreError {
    /// A key that does not fit its table's definition (a peer's such entries are skipped).
    pub fn is_bad_key(&self) -> bool {
        matches!(
            self,
            StoreError::BadKey { .. }
                | StoreError::KeyTooLong { .. }
                | StoreError::KeyControl { .. }
        )
    }
}

/// What watchers receive: a batch of entries as applied, or a clear.
#[derive(Clone, Debug)]
pub enum Event {
    Changes {
        table: Arc<str>,
        entries: Vec<pb::Entry>,
    },
    Cleared(pb::TableCleared),
}

impl Event {
    pub fn table(&self) -> &str {
        match self {
            Event::Changes { table, .. } => table,
            Event::Cleared(c) => &c.table,
        }
    }
}

/// One entry in memory (the key is kept beside it, see [`Entries`]). Server and origin names
/// are shared by every entry that names them (see [`Names`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rec {
    pub server: Arc<str>,
    pub expires: i64,
    pub version: u64,
    pub origin: Arc<str>,
    pub deleted: bool,
}

impl Rec {
    fn to_pb(&self, key: &str, now: i64) -> pb::Entry {
        pb::Entry {
            key: key.to_owned(),
            server: self.server.to_string(),
            expires_unix_ms: self.expires,
            version: self.version,
            origin: self.origin.to_string(),
            deleted: self.deleted,
            expires_in_ms: self.expires - now,
        }
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18 + self.origin.len() + self.server.len());
        self.encode_into(&mut v);
        v
    }

    fn encoded_len(&self) -> usize {
        18 + self.origin.len().min(255) + self.server.len()
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.expires.to_be_bytes());
        v.push(u8::from(self.deleted));
        // Origin names are at most 64 bytes (config), so one length byte is enough.
        v.push(self.origin.len().min(255) as u8);
        v.extend_from_slice(&self.origin.as_bytes()[..self.origin.len().min(255)]);
        v.extend_from_slice(self.server.as_bytes());
    }

    fn decode(b: &[u8], names: &mut Names) -> Result<Rec, String> {
        if b.len() < 18 {
            return Err(format!("{} bytes, expected at least 18", b.len()));
        }
        let version = u64::from_be_bytes(b[0..8].try_into().map_err(|_| "version")?);
        let expires = i64::from_be_bytes(b[8..16].try_into().map_err(|_| "expiry")?);
        let deleted = b[16] != 0;
        let olen = usize::from(b[17]);
        let origin = b.get(18..18 + olen).ok_or("origin runs past the record")?;
        let server = &b[18 + olen..];
        Ok(Rec {
            server: names.get(std::str::from_utf8(server).map_err(|e| e.to_string())?),
            expires,
            version,
            origin: names.get(std::str::from_utf8(origin).map_err(|e| e.to_string())?),
            deleted,
        })
    }
}

/// Names that millions of entries share (their server's and their origin's): one allocation
/// per name instead of one per entry, and no allocation to store or merge an entry whose names
/// are known.
#[derive(Default)]
struct Names {
    set: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

/// Most names remembered: they come from clients and peers, and random ones must not grow the
/// set for ever. Past this, names no entry holds any more are forgotten; if every one is still
/// held, a new name gets an allocation of its own (correct, only bigger).
const MAX_NAMES: usize = 4096;

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.set.get(name) {
            return n.clone();
        }
        if self.set.len() >= MAX_NAMES {
            self.set.retain(|n| Arc::strong_count(n) > 1);
        }
        let n: Arc<str> = Arc::from(name);
        if self.set.len() < MAX_NAMES {
            self.set.insert(n.clone());
        }
        n
    }
}

/// Writes to sled waiting for the writer (`persist`), in order. Keeping sled off the hot path
/// makes a write cost a few map operations instead of several sled inserts; `persist` runs every
/// few milliseconds, so the durability window grows by that much only.
#[derive(Default)]
struct Pending {
    queue: Mutex<Queue>,
}

/// Table writes encoded as a journal value (see `disk::writes`), and how many.
#[derive(Default)]
struct Journal {
    buf: Vec<u8>,
    writes: usize,
}

impl Journal {
    /// A table entry written (`Some`) or gone (`None`), encoded in place (no buffer per write).
    fn entry(&mut self, table: &str, key: &str, rec: Option<&Rec>) {
        self.writes += 1;
        let buf = &mut self.buf;
        crate::disk::put_bytes(buf, table.as_bytes());
        crate::disk::put_bytes(buf, key.as_bytes());
        match rec {
            Some(r) => {
                buf.push(1);
                prost::encoding::encode_varint(r.encoded_len() as u64, buf);
                r.encode_into(buf);
            }
            None => buf.push(0),
        }
    }
}

/// The queued writes, by kind (`persist` writes them in this order: table writes, log, meta).
#[derive(Default)]
struct Queue {
    /// Table writes encoded in place as the next journal value (no allocation per write).
    journal: Vec<u8>,
    writes: usize,
    /// Records of our change log (encoded `pb::Change`s), in sequence order.
    log: Vec<(u64, Vec<u8>)>,
    /// Keys of the meta tree (positions, clears), in order.
    meta: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table entry written (`Some`) or gone (`None`).
    fn entry(&self, table: &str, key: &str, rec: Option<&Rec>) {
        let mut q = self.lock();
        q.writes += 1;
        let mut j = Journal {
            buf: std::mem::take(&mut q.journal),
            writes: 0,
        };
        j.entry(table, key, rec);
        q.journal = j.buf;
    }

    /// Queues the writes of `j` after those already queued, and empties it (one lock for a
    /// whole batch of writes made under the store's lock).
    fn append(&self, j: &mut Journal) {
        if j.writes == 0 {
            return;
        }
        let mut q = self.lock();
        q.writes += j.writes;
        if q.journal.is_empty() {
            std::mem::swap(&mut q.journal, &mut j.buf);
        } else {
            q.journal.extend_from_slice(&j.buf);
        }
        j.buf.clear();
        j.writes = 0;
    }

    fn log(&self, seq: u64, change: Vec<u8>) {
        self.lock().log.push((seq, change));
    }

    fn meta(&self, key: Vec<u8>, value: Vec<u8>) {
        self.lock().meta.push((key, value));
    }

    fn len(&self) -> usize {
        let q = self.lock();
        q.writes + q.log.len() + q.meta.len()
    }

    fn take(&self) -> Queue {
        std::mem::take(&mut *self.lock())
    }
}

struct Table {
    def: TableDef,
    name: Arc<str>,
    pending: Arc<Pending>,
    entries: Entries,
    live: u64,
    cleared_version: u64,
    cleared_origin: String,
}

impl Table {
    /// Inserts or replaces in memory, keeping the live count right.
    fn set(&mut self, key: &str, rec: Rec) {
        if !rec.deleted {
            self.live += 1;
        }
        if let Some(old) = self.entries.insert(key, rec)
            && !old.deleted
        {
            self.live -= 1;
        }
    }

    /// Removes from memory.
    fn unset(&mut self, key: &str) -> Option<Rec> {
        let old = self.entries.remove(key)?;
        if !old.deleted {
            self.live -= 1;
        }
        Some(old)
    }

    /// Removes the entry nearest to expiry and queues its removal for sled; false when empty.
    fn remove_first(&mut self) -> bool {
        let Some((key, old)) = self.entries.pop_first() else {
            return false;
        };
        if !old.deleted {
            self.live -= 1;
        }
        self.pending.entry(&self.name, &key, None);
        true
    }

    fn remove(&mut self, key: &str) -> Result<Option<Rec>, sled::Error> {
        let old = self.unset(key);
        if old.is_some() {
            self.pending.entry(&self.name, key, None);
        }
        Ok(old)
    }

    /// Inserts or replaces, and queues the write for sled.
    fn put(&mut self, key: &str, rec: Rec) -> Result<(), sled::Error> {
        self.pending.entry(&self.name, key, Some(&rec));
        self.set(key, rec);
        Ok(())
    }

    /// Merges one entry from a peer by LWW on (version, origin); the same write with a later
    /// expiry (a touch) replaces it. The caller has checked the table's clear and the expiry.
    /// The write for sled goes to `journal`, which the caller hands to the queue; an eviction
    /// hands it over first, so that the queue keeps the order of the changes.
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        key: String,
        e: &pb::Entry,
        rec: Rec,
        now: i64,
        watched: bool,
        journal: &mut Journal,
        counters: &Counters,
    ) -> Result<Merged, sled::Error> {
        let event = |key: &str| {
            watched.then(|| pb::Entry {
                key: key.to_owned(),
                server: e.server.clone(),
                expires_unix_ms: e.expires_unix_ms,
                version: e.version,
                origin: e.origin.clone(),
                deleted: e.deleted,
                expires_in_ms: e.expires_unix_ms - now,
            })
        };
        // One lookup of the key for the common cases (a new key with room, or a newer write).
        match self.entries.find(&key) {
            Found::At(slot) => {
                let Some((k, old)) = self.entries.at(slot) else {
                    return Ok(Merged::Ignored);
                };
                match (rec.version, &*rec.origin).cmp(&(old.version, &*old.origin)) {
                    std::cmp::Ordering::Less => return Ok(Merged::Ignored),
                    // The same write, touched: the later expiry wins.
                    std::cmp::Ordering::Equal if rec.expires <= old.expires => {
                        return Ok(Merged::Ignored);
                    }
                    _ => {}
                }
                journal.entry(&self.name, k, Some(&rec));
                if !rec.deleted {
                    self.live += 1;
                }
                if let Some(old) = self.entries.replace(slot, rec)
                    && !old.deleted
                {
                    self.live -= 1;
                }
            }
            Found::Vacant(hash) if (self.entries.len() as u64) < self.def.size => {
                journal.entry(&self.name, &key, Some(&rec));
                if !rec.deleted {
                    self.live += 1;
                }
                let event = event(&key);
                self.entries.insert_new(hash, key.into_boxed_str(), rec);
                return Ok(Merged::Applied(event));
            }
            Found::Vacant(_) => {
                // The evictions go to the queue after the writes before them.
                self.pending.append(journal);
                make_room(self, counters)?;
                journal.entry(&self.name, &key, Some(&rec));
                self.set(&key, rec);
            }
        }
        Ok(Merged::Applied(event(&key)))
    }

    /// A record read from disk at start-up: kept unless expired; returns its version.
    fn load(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        now: i64,
        names: &mut Names,
    ) -> Result<u64, StoreError> {
        let key = std::str::from_utf8(key).map_err(|e| StoreError::Corrupt {
            what: format!("table '{}'", self.def.name),
            reason: e.to_string(),
        })?;
        let Some(value) = value else {
            self.unset(key);
            return Ok(0);
        };
        let rec = Rec::decode(value, names).map_err(|reason| StoreError::Corrupt {
            what: format!("table '{}' key '{key}'", self.def.name),
            reason,
        })?;
        let version = rec.version;
        if rec.expires <= now {
            self.unset(key);
        } else {
            self.set(key, rec);
        }
        Ok(version)
    }

    fn info(&self) -> pb::TableInfo {
        pb::TableInfo {
            name: self.def.name.clone(),
            r#type: self.def.key.name().to_owned(),
            len: self.def.key.max_len(),
            size: self.def.size,
            expire_ms: u64::try_from(self.def.expire.as_millis()).unwrap_or(u64::MAX),
            used: self.live,
            tombstones: self.entries.len() as u64 - self.live,
            cleared_version: self.cleared_version,
        }
    }
}

struct Inner {
    tables: HashMap<String, Table>,
    hlc: Hlc,
    head: u64,
    /// The newest log records, served to pushers without touching sled. Records leave it only
    /// once persisted.
    tail: std::collections::VecDeque<pb::Change>,
    /// Per peer: (epoch, sequence) of its log applied here.
    received: HashMap<String, (u64, u64)>,
    /// Server and origin names, shared by the entries that name them.
    names: Names,
}

/// What merging a peer's entry did: nothing, or applied it (with the event for watchers).
enum Merged {
    Ignored,
    Applied(Option<pb::Entry>),
}

/// Evicts the entries nearest to expiry until one more fits.
fn make_room(t: &mut Table, counters: &Counters) -> Result<(), sled::Error> {
    while t.entries.len() as u64 >= t.def.size && t.remove_first() {
        counters.evicted.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Queued sled writes past which writers wait for sled (see `Store::backpressure`).
const PENDING_HIGH_WATER: usize = 100_000;
/// Log records kept in memory for pushers (older ones are read from sled).
const LOG_TAIL: usize = 256 * 1024;
/// Most log records per sled value (the log is trimmed a chunk at a time).
const LOG_CHUNK: usize = 512;
/// Entries per checkpoint value (and per hold of the store's lock while writing one).
const CHECKPOINT_CHUNK: usize = 4096;
/// Journal bytes that call for a checkpoint, at least (else: the last checkpoint's size).
const CHECKPOINT_AFTER: u64 = 32 << 20;
/// After a snapshot chunk that is not the last, checkpoints wait this long for the next one.
const SNAPSHOT_QUIET_MS: i64 = 2000;

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
    /// Set when we may have lost writes of our own (see `open`).
    recover_since: Option<u64>,
    /// Until when (unix ms) a snapshot from a peer is taken to be arriving: checkpoints wait
    /// meanwhile (see `persist`).
    snapshot_until: std::sync::atomic::AtomicI64,
    /// How much of the log `trim_log` keeps (and the in-memory tail holds at most).
    log_bound: LogBound,
    events: broadcast::Sender<Arc<Event>>,
    head_tx: watch::Sender<u64>,
    pub counters: Counters,
}

/// A (key, encoded record) pair as sled holds it.
type RawRecord = (Vec<u8>, Vec<u8>);

/// The writer's bookkeeping (under `persist_lock`).
#[derive(Default)]
struct Disk {
    /// Key of the next journal value.
    journal_next: u64,
    /// Journal bytes written since the last checkpoint.
    journal_bytes: u64,
    /// Generation and size of the last checkpoint.
    generation: u64,
    checkpoint_bytes: u64,
    /// Tables on disk that are no longer configured: carried from checkpoint to checkpoint
    /// untouched, so that a table put back in the config finds its entries again.
    orphans: Vec<(String, Vec<RawRecord>)>,
}

/// One table of a snapshot in the making (see `Store::snapshot_keys`).
pub struct SnapshotTable {
    pub name: String,
    pub cleared_version: u64,
    pub cleared_origin: String,
    /// Where the table's entries are, nearest expiry first (see `Store::snapshot_entries`).
    pub slots: Vec<u32>,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks a key against its table's type and returns its canonical text.
pub fn canonical_key(def: &TableDef, key: &str) -> Result<String, StoreError> {
    let bad = |expected| StoreError::BadKey {
        table: def.name.clone(),
        key: key.chars().take(80).collect(),
        expected,
    };
    // Parsing trims spaces: bound what it is given first.
    if !matches!(def.key, KeyType::String { .. }) && key.len() > MAX_TYPED_KEY_LEN {
        return Err(StoreError::KeyTooLong {
            table: def.name.clone(),
            len: key.len(),
            max: MAX_TYPED_KEY_LEN as u32,
        });
    }
    match def.key {
        KeyType::Ip => key
            .trim()
            .parse::<Ipv4Addr>()
            .map(|a| a.to_string())
            .map_err(|_| bad("an IPv4 address")),
        KeyType::Ipv6 => match key.trim().parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => Ok(a.to_string()),
            Ok(IpAddr::V4(a)) => Ok(a.to_ipv6_mapped().to_string()),
            Err(_) => Err(bad("an IPv6 (or IPv4) address")),
        },
        KeyType::Integer => key
            .trim()
            .parse::<i64>()
            .map(|n| n.to_string())
            .map_err(|_| bad("a 64-bit integer")),
        KeyType::String { len } => {
            if key.is_empty() {
                return Err(bad("a non-empty string"));
            }
            if key.len() > len as usize {
                return Err(StoreError::KeyTooLong {
                    table: def.name.clone(),
                    len: key.len(),
                    max: len,
                });
            }
            check_key_chars(def, key)?;
            Ok(key.to_owned())
        }
    }
}

/// Refuses control characters in a string key: a NUL or a newline in a key breaks every
/// line-oriented view of the table (logs, grpcurl output, HAProxy-style dumps) and no cookie or
/// header value that proxyd stores can hold one.
fn check_key_chars(def: &TableDef, key: &str) -> Result<(), StoreError> {
    let Some(at) = key.bytes().position(|b| b < 0x20 || b == 0x7f) else {
        return Ok(());
    };
    let what = match key.as_bytes()[at] {
        0 => "a NUL",
        b'\n' => "a newline",
        b'\r' => "a carriage return",
        b'\t' => "a tab",
        _ => "a control character",
    };
    Err(StoreError::KeyControl {
        table: def.name.clone(),
        at,
        what,
    })
}

/// `canonical_key` of a key we own: a string key is checked and kept, not copied.
fn canonical_key_owned(def: &TableDef, key: String) -> Result<String, StoreError> {
    match def.key {
        KeyType::String { len } if !key.is_empty() && key.len() <= len as usize => {
            check_key_chars(def, &key)?;
            Ok(key)
        }
        _ => canonical_key(def, &key),
    }
}

fn check_server(def: &TableDef, key: &str, server: &str) -> Result<(), StoreError> {
    let reason = if server.is_empty() {
        "server name must not be empty"
    } else if server.len() > MAX_SERVER_LEN {
        "server name is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(StoreError::BadServer {
        table: def.name.clone(),
        key: key.to_owned(),
        reason,
    })
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Sequence number to and from sled keys (big-endian, so that sled's order is numeric).
fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl Store {
    /// Opens (or creates) the data directory and loads every configured table into memory.
    /// Tables on disk that are no longer configured are kept on disk untouched.
    pub fn open(config: &Config) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(&config.data_dir)
            // We flush ourselves on a timer (see `flush`), so the window is ours to state.
            .flush_every_ms(None)
            // Reads are served from memory; sled's cache only needs to help writes and start-up.
            .cache_capacity(64 << 20)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let log = db.open_tree("log_chunks")?;
        let meta = db.open_tree("meta")?;
        let journal = db.open_tree("journal")?;
        let checkpoint = db.open_tree("checkpoint")?;
        let pending = Arc::new(Pending::default());
        let mut names = Names::default();
        let now = now_ms();
        let mut max_version = 0u64;
        let mut tables = HashMap::new();
        // Before checkpoints, every entry was a key of its table's own tree: read them once.
        let mut legacy = Vec::new();
        for def in &config.tables {
            let mut t = Table {
                def: def.clone(),
                name: Arc::from(def.name.as_str()),
                pending: pending.clone(),
                entries: Entries::new(),
                live: 0,
                cleared_version: 0,
                cleared_origin: String::new(),
            };
            if let Some(c) = meta.get(format!("cleared/{}", def.name))? {
                t.cleared_version = u64_at(&c, 0).unwrap_or(0);
                t.cleared_origin = String::from_utf8_lossy(c.get(8..).unwrap_or_default()).into();
                max_version = max_version.max(t.cleared_version);
            }
            let old = format!("table/{}", def.name);
            if db.tree_names().iter().any(|n| **n == *old.as_bytes()) {
                for kv in db.open_tree(&old)?.iter() {
                    let (k, v) = kv?;
                    max_version = max_version.max(t.load(&k, Some(&v), now, &mut names)?);
                }
                legacy.push(old);
            }
            tables.insert(def.name.clone(), t);
        }
        let mut disk = Disk::default();
        let corrupt = |what: String| move |reason: String| StoreError::Corrupt { what, reason };
        let mut orphans: HashMap<String, HashMap<Vec<u8>, Vec<u8>>> = HashMap::new();
        if let Some(c) = meta.get("checkpoint")? {
            disk.generation = u64_at(&c, 0).unwrap_or(0);
            disk.journal_next = u64_at(&c, 8).unwrap_or(0);
        }
        for kv in checkpoint.iter() {
            let (k, v) = kv?;
            if u64_at(&k, 0) != Some(disk.generation) {
                // Left by a checkpoint that did not finish, or by one that was superseded.
                checkpoint.remove(k)?;
                continue;
            }
            disk.checkpoint_bytes += v.len() as u64;
            let (table, pairs) = crate::disk::chunk(&v).map_err(corrupt("checkpoint".into()))?;
            let name = String::from_utf8_lossy(table).into_owned();
            match tables.get_mut(&name) {
                Some(t) => {
                    for (k, v) in pairs {
                        max_version = max_version.max(t.load(k, Some(v), now, &mut names)?);
                    }
                }
                None => orphans
                    .entry(name)
                    .or_default()
                    .extend(pairs.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec()))),
            }
        }
        for kv in journal.iter() {
            let (k, v) = kv?;
            let id = u64_at(&k, 0).unwrap_or(0);
            if id < disk.journal_next {
                // Already in the checkpoint (its removal was cut short).
                journal.remove(k)?;
                continue;
            }
            disk.journal_next = id + 1;
            disk.journal_bytes += v.len() as u64;
            let writes = crate::disk::writes(&v).map_err(corrupt(format!("journal {id}")))?;
            for (table, key, value) in writes {
                let name = String::from_utf8_lossy(table);
                match tables.get_mut(&*name) {
                    Some(t) => max_version = max_version.max(t.load(key, value, now, &mut names)?),
                    None => {
                        let o = orphans.entry(name.into_owned()).or_default();
                        match value {
                            Some(v) => o.insert(key.to_vec(), v.to_vec()),
                            None => o.remove(key),
                        };
                    }
                }
            }
        }
        disk.orphans = orphans
            .into_iter()
            .map(|(name, recs)| (name, recs.into_iter().collect()))
            .collect();
        // The log before chunks: one record per key, rewritten as chunks once.
        if db.tree_names().iter().any(|n| **n == *b"log") {
            let old = db.open_tree("log")?;
            let mut buf = Vec::new();
            let mut first = None;
            let mut n = 0;
            for kv in old.iter() {
                let (k, v) = kv?;
                first.get_or_insert(u64_at(&k, 0).unwrap_or(0));
                crate::disk::batch_push(&mut buf, &v);
                n += 1;
                if n == LOG_CHUNK {
                    log.insert(seq_key(first.take().unwrap_or(0)), std::mem::take(&mut buf))?;
                    n = 0;
                }
            }
            if let Some(f) = first {
                log.insert(seq_key(f), buf)?;
            }
            db.drop_tree("log")?;
        }
        let last_change = match log.last()? {
            Some((_, v)) => pb::Batch::decode(&*v)
                .map_err(|e| StoreError::Corrupt {
                    what: "log".into(),
                    reason: e.to_string(),
                })?
                .changes
                .pop(),
            None => None,
        };
        // Our own newest version on disk: after an unclean stop, peers may hold newer ones of
        // ours that we lost, and we ask them back (see `recover_since`).
        let mut own_max = tables
            .values()
            .flat_map(|t: &Table| {
                let cleared = (t.cleared_origin == config.local).then_some(t.cleared_version);
                t.entries
                    .iter()
                    .filter(|(_, r)| *r.origin == *config.local)
                    .map(|(_, r)| r.version)
                    .chain(cleared)
            })
            .max()
            .unwrap_or(0);
        if let Some(c) = &last_change {
            own_max = own_max.max(match &c.kind {
                Some(pb::change::Kind::Entry(e)) => e.version,
                Some(pb::change::Kind::Cleared(c)) => c.version,
                None => 0,
            });
        }
        let had_epoch = meta.get("epoch")?.is_some();
        let clean = meta.get("clean")?.is_some_and(|v| *v == [1u8]);
        let recover_since = match (had_epoch, clean) {
            (false, _) => Some(0),
            (true, false) => Some(own_max),
            (true, true) => None,
        };
        meta.insert("clean", &[0u8])?;
        let head = match &last_change {
            Some(c) => c.seq,
            None => meta
                .get("head")?
                .as_deref()
                .and_then(|b| u64_at(b, 0))
                .unwrap_or(0),
        };
        // Every start opens a new epoch of the log. The previous epoch is remembered with the
        // head it reached on disk: a peer that received more than that from it (sequences lost
        // by a kill -9 and then reused) must get a snapshot; one that received less resumes.
        let mut history = meta.get("epochs")?.map(|v| v.to_vec()).unwrap_or_default();
        if let Some(prev) = meta.get("epoch")?.as_deref().and_then(|b| u64_at(b, 0)) {
            history.extend_from_slice(&prev.to_be_bytes());
            history.extend_from_slice(&head.to_be_bytes());
        }
        let keep = EPOCH_HISTORY * 16;
        if history.len() > keep {
            history.drain(..history.len() - keep);
        }
        let epoch: u64 = rand::random::<u64>() | 1;
        meta.insert("epochs", history.clone())?;
        meta.insert("epoch", &epoch.to_be_bytes())?;
        let epochs = history
            .chunks_exact(16)
            .filter_map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
            .collect();
        let first = match log.first()? {
            Some((k, _)) => u64_at(&k, 0).unwrap_or(head + 1),
            None => head + 1,
        };
        let mut received = HashMap::new();
        for kv in meta.scan_prefix("recv/") {
            let (k, v) = kv?;
            let peer = String::from_utf8_lossy(&k[5..]).into_owned();
            received.insert(
                peer,
                (u64_at(&v, 0).unwrap_or(0), u64_at(&v, 8).unwrap_or(0)),
            );
        }
        let mut hlc = Hlc::default();
        hlc.observe(max_version);
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
                tables,
                hlc,
                head,
                tail: std::collections::VecDeque::new(),
                received,
                names,
            }),
            pending,
            persist_lock: Mutex::new(disk),
            persisted_seq: AtomicU64::new(head),
            first_seq: AtomicU64::new(first),
            epoch,
            epochs,
            recover_since,
            snapshot_until: std::sync::atomic::AtomicI64::new(0),
            log_bound: LogBound::new(config.log_keep, config.tables.iter().map(|t| t.size).sum()),
            events,
            head_tx,
            counters: Counters::default(),
        };
        if !legacy.is_empty() {
            // The entries now live in a checkpoint: the per-key trees can go.
            store.write_checkpoint(&mut store.disk())?;
            for name in legacy {
                store.db.drop_tree(name)?;
            }
        }
        Ok(store)
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.persist_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent enough to serve.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn head(&self) -> u64 {
        *self.head_tx.borrow()
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq.load(Ordering::Relaxed)
    }

    /// Wakes up whenever the log head moves.
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    pub fn table_defs(&self) -> Vec<TableDef> {
        let inner = self.lock();
        let mut v: Vec<_> = inner.tables.values().map(|t| t.def.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Appends a local change to the log (caller holds the lock and bumps `head`).
    fn append(&self, inner: &mut Inner, change: pb::Change) -> Result<(), sled::Error> {
        inner.head += 1;
        let seq = inner.head;
        let change = pb::Change { seq, ..change };
        self.pending.log(seq, change.encode_to_vec());
        inner.tail.push_back(change);
        Ok(())
    }

    fn publish(&self, inner: &Inner, event: Event) {
        self.head_tx.send_if_modified(|h| {
            let moved = *h != inner.head;
            *h = inner.head;
            moved
        });
        // No watcher is not an error.
        let _ = self.events.send(Arc::new(event));
    }

    /// Evicts the entries nearest to expiry until one more fits.
    /// One local write (a store or a tombstone): makes room for a new key, keeps the record and
    /// logs it for the peers. Callers count and publish once per call of theirs.
    fn write_local(
        &self,
        inner: &mut Inner,
        table: &str,
        key: &str,
        rec: Rec,
        now: i64,
    ) -> Result<pb::Entry, StoreError> {
        let entry = rec.to_pb(key, now);
        let t = inner
            .tables
            .get_mut(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        if !t.entries.contains_key(key) {
            make_room(t, &self.counters)?;
        }
        t.put(key, rec)?;
        self.append(
            inner,
            pb::Change {
                seq: 0,
                table: table.to_owned(),
                kind: Some(pb::change::Kind::Entry(entry.clone())),
            },
        )?;
        Ok(entry)
    }

    /// Stores (key, server) pairs with new versions.
    pub fn store(
        &self,
        table: &str,
        items: &[pb::StoreItem],
    ) -> Result<Vec<pb::Entry>, StoreError> {
        if items.is_empty() {
            return Err(StoreError::Empty("no items"));
        }
        let mut inner = self.lock();
        let def = &inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?
            .def;
        // Validate the whole batch first: a bad item refuses the batch, nothing half-applied.
        let mut keyed = Vec::with_capacity(items.len());
        for it in items {
            let key = canonical_key(def, &it.key)?;
            check_server(def, &key, &it.server)?;
            keyed.push(key);
        }
        let expire = i64::try_from(def.expire.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let mut out = Vec::with_capacity(items.len());
        for (it, key) in items.iter().zip(keyed) {
            let version = inner.hlc.now(now);
            let rec = Rec {
                server: inner.names.get(&it.server),
                // A client may shorten an entry's life, never make it outlive the table's
                // expire (i64::MAX would be an entry that never goes).
                expires: if it.expires_unix_ms > 0 {
                    it.expires_unix_ms.min(now.saturating_add(expire))
                } else {
                    now.saturating_add(expire)
                },
                version,
                origin: self.local.clone(),
                deleted: false,
            };
            out.push(self.write_local(&mut inner, table, &key, rec, now)?);
        }
        self.counters
            .local_writes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        // Copied for watchers only (checked under the lock, under which `watch` subscribes).
        let entries = if self.events.receiver_count() > 0 {
            out.clone()
        } else {
            Vec::new()
        };
        self.publish(
            &inner,
            Event::Changes {
                table: Arc::from(table),
                entries,
            },
        );
        Ok(out)
    }

    /// Refreshes the expiry of live keys; the version stays, so a touch never wins over a store.
    pub fn touch(&self, table: &str, keys: &[String]) -> Result<u32, StoreError> {
        if keys.is_empty() {
            return Err(StoreError::Empty("no keys"));
        }
        let mut inner = self.lock();
        let t = inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        let canon = keys
            .iter()
            .map(|k| canonical_key(&t.def, k))
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_ms();
        let expires =
            now.saturating_add(i64::try_from(t.def.expire.as_millis()).unwrap_or(i64::MAX));
        let mut changed = Vec::new();
        for key in canon {
            let Some(t) = inner.tables.get_mut(table) else {
                break;
            };
            let Some(old) = t.entries.get(&key) else {
                continue;
            };
            if old.deleted || old.expires <= now || old.expires >= expires {
                continue;
            }
            let rec = Rec {
                expires,
                ..old.clone()
            };
            let entry = rec.to_pb(&key, now);
            t.put(&key, rec)?;
            self.append(
                &mut inner,
                pb::Change {
                    seq: 0,
                    table: table.to_owned(),
                    kind: Some(pb::change::Kind::Entry(entry.clone())),
                },
            )?;
            changed.push(entry);
        }
        let n = changed.len() as u32;
        if !changed.is_empty() {
            self.counters
                .local_writes
                .fetch_add(u64::from(n), Ordering::Relaxed);
            self.publish(
                &inner,
                Event::Changes {
                    table: Arc::from(table),
                    entries: changed,
                },
            );
        }
        Ok(n)
    }

    /// Deletes a key by writing a tombstone (kept for the table's expire, so that it reaches
    /// every peer and beats older values arriving late). Returns whether a live entry existed.
    pub fn delete(&self, table: &str, key: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let t = inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        let key = canonical_key(&t.def, key)?;
        let now = now_ms();
        let expire = i64::try_from(t.def.expire.as_millis()).unwrap_or(i64::MAX);
        let version = inner.hlc.now(now);
        let t = inner
            .tables
            .get_mut(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        let existed = t
            .entries
            .get(&key)
            .is_some_and(|r| !r.deleted && r.expires > now);
        let rec = Rec {
            server: inner.names.get(""),
            expires: now.saturating_add(expire),
            version,
            origin: self.local.clone(),
            deleted: true,
        };
        let entry = self.write_local(&mut inner, table, &key, rec, now)?;
        self.counters.local_writes.fetch_add(1, Ordering::Relaxed);
        self.publish(
            &inner,
            Event::Changes {
                table: Arc::from(table),
                entries: vec![entry],
            },
        );
        Ok(existed)
    }

    /// Clears a table: every entry older than the clear's version goes, here and on every peer.
    pub fn clear(&self, table: &str) -> Result<(u64, u64), StoreError> {
        let mut inner = self.lock();
        if !inner.tables.contains_key(table) {
            return Err(StoreError::UnknownTable(table.to_owned()));
        }
        let version = inner.hlc.now(now_ms());
        let cleared = pb::TableCleared {
            table: table.to_owned(),
            version,
            origin: self.local.to_string(),
        };
        let removed = self.apply_clear(&mut inner, &cleared)?;
        self.append(
            &mut inner,
            pb::Change {
                seq: 0,
                table: table.to_owned(),
                kind: Some(pb::change::Kind::Cleared(cleared.clone())),
            },
        )?;
        self.counters.local_writes.fetch_add(1, Ordering::Relaxed);
        self.publish(&inner, Event::Cleared(cleared));
        Ok((removed, version))
    }

    /// Removes every entry at or below the clear's version; returns how many live ones went.
    fn apply_clear(&self, inner: &mut Inner, c: &pb::TableCleared) -> Result<u64, StoreError> {
        let Some(t) = inner.tables.get_mut(&c.table) else {
            return Ok(0);
        };
        if (c.version, c.origin.as_str()) <= (t.cleared_version, t.cleared_origin.as_str()) {
            return Ok(0);
        }
        let doomed: Vec<String> = t
            .entries
            .iter()
            .filter(|(_, r)| r.version <= c.version)
            .map(|(k, _)| k.to_owned())
            .collect();
        let mut removed = 0;
        for k in doomed {
            if t.remove(&k)?.is_some_and(|r| !r.deleted) {
                removed += 1;
            }
        }
        t.cleared_version = c.version;
        t.cleared_origin.clone_from(&c.origin);
        let mut v = c.version.to_be_bytes().to_vec();
        v.extend_from_slice(c.origin.as_bytes());
        self.pending
            .meta(format!("cleared/{}", c.table).into_bytes(), v);
        Ok(removed)
    }

    /// Merges one entry from a peer by LWW. The entry is taken by value so that its key moves
    /// into the table instead of being copied (its server and origin are shared names); the
    /// event for watchers is built only when someone watches. Table writes go to `journal` (see
    /// `Table::merge`).
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &self,
        tables: &mut HashMap<String, Table>,
        names: &mut Names,
        table: &str,
        mut e: pb::Entry,
        now: i64,
        watched: bool,
        journal: &mut Journal,
    ) -> Result<Merged, StoreError> {
        let Some(t) = tables.get_mut(table) else {
            return Ok(Merged::Ignored);
        };
        if e.version <= t.cleared_version || e.expires_unix_ms <= now {
            return Ok(Merged::Ignored);
        }
        let key = canonical_key_owned(&t.def, std::mem::take(&mut e.key))?;
        // The origin already bounded the expiry by the table's expire; twice that leaves room
        // for clocks that disagree, and still no peer can send an entry that never expires.
        let expire = i64::try_from(t.def.expire.as_millis()).unwrap_or(i64::MAX);
        e.expires_unix_ms = e
            .expires_unix_ms
            .min(now.saturating_add(expire.saturating_mul(2)));
        let rec = Rec {
            server: names.get(&e.server),
            expires: e.expires_unix_ms,
            version: e.version,
            origin: names.get(&e.origin),
            deleted: e.deleted,
        };
        Ok(t.merge(key, &e, rec, now, watched, journal, &self.counters)?)
    }

    /// Applies changes received from peer `from`, then records `through` as its position,
    /// in this order so that a crash never leaves the position ahead of the data.
    pub fn apply_remote(
        &self,
        from: &str,
        epoch: u64,
        changes: Vec<pb::Change>,
        skip_tables: &[String],
        through: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        // Under the lock, as `watch` subscribes under it: no watcher can slip in between.
        let watched = self.events.receiver_count() > 0;
        let now = now_ms();
        let mut journal = Journal::default();
        let mut events: Vec<Event> = Vec::new();
        let (mut applied, mut ignored) = (0, 0);
        for c in changes {
            if skip_tables.contains(&c.table) {
                continue;
            }
            match c.kind {
                Some(pb::change::Kind::Entry(e)) => {
                    inner.hlc.observe(e.version);
                    let Inner { tables, names, .. } = &mut *inner;
                    match self.merge(tables, names, &c.table, e, now, watched, &mut journal) {
                        Ok(Merged::Applied(e)) => {
                            applied += 1;
                            let Some(e) = e else { continue };
                            match events.last_mut() {
                                Some(Event::Changes { table, entries }) if **table == *c.table => {
                                    entries.push(e);
                                }
                                _ => events.push(Event::Changes {
                                    table: Arc::from(c.table.as_str()),
                                    entries: vec![e],
                                }),
                            }
                        }
                        // A key that does not fit our definition: the handshake should have
                        // caught it; skip the entry rather than the whole stream.
                        Ok(Merged::Ignored) => ignored += 1,
                        Err(e) if e.is_bad_key() => ignored += 1,
                        Err(e) => {
                            self.pending.append(&mut journal);
                            return Err(e);
                        }
                    }
                }
                Some(pb::change::Kind::Cleared(cl)) => {
                    self.pending.append(&mut journal);
                    inner.hlc.observe(cl.version);
                    self.apply_clear(&mut inner, &cl)?;
                    events.push(Event::Cleared(cl));
                }
                None => {}
            }
        }
        self.pending.append(&mut journal);
        self.count_remote(applied, ignored);
        if let Some(through) = through {
            self.set_received(&mut inner, from, epoch, through);
        }
        for ev in events {
            self.publish(&inner, ev);
        }
        Ok(())
    }

    /// Counts what a batch from a peer changed and what it did not (older, expired, bad keys).
    fn count_remote(&self, applied: u64, ignored: u64) {
        let c = &self.counters;
        c.remote_applied.fetch_add(applied, Ordering::Relaxed);
        c.remote_ignored.fetch_add(ignored, Ordering::Relaxed);
    }

    /// Applies one chunk of a peer's snapshot: entries merge by LWW like any change, in one
    /// hold of the lock, without a change record per entry, and with one hand-over of the
    /// chunk's table writes to the sled queue (the journal makes them as durable as any write).
    pub fn apply_snapshot(
        &self,
        from: &str,
        epoch: u64,
        chunk: pb::SnapshotChunk,
    ) -> Result<(), StoreError> {
        let pb::SnapshotChunk {
            table,
            entries,
            cleared_version,
            cleared_origin,
            last,
            through_seq,
            table_entries,
        } = chunk;
        let mut inner = self.lock();
        if let Some(t) = inner.tables.get_mut(&table) {
            // Grown once to what is coming instead of doubling (and rehashing) all the way there;
            // never past the table's size, whatever the peer announces.
            let want = table_entries.min(t.def.size);
            let have = t.entries.len() as u64;
            if want > have {
                t.entries.reserve(usize::try_from(want - have).unwrap_or(0));
            }
        }
        let watched = self.events.receiver_count() > 0;
        let now = now_ms();
        let mut events: Vec<Event> = Vec::new();
        if cleared_version > 0 {
            let cl = pb::TableCleared {
                table: table.clone(),
                version: cleared_version,
                origin: cleared_origin,
            };
            inner.hlc.observe(cl.version);
            self.apply_clear(&mut inner, &cl)?;
            events.push(Event::Cleared(cl));
        }
        if let Some(max) = entries.iter().map(|e| e.version).max() {
            inner.hlc.observe(max);
        }
        let mut journal = Journal {
            // About what the chunk's writes take, so that the buffer grows once.
            buf: Vec::with_capacity(entries.len() * 64),
            writes: 0,
        };
        let mut changed = Vec::new();
        let (mut applied, mut ignored) = (0, 0);
        let Inner { tables, names, .. } = &mut *inner;
        for e in entries {
            match self.merge(tables, names, &table, e, now, watched, &mut journal) {
                Ok(Merged::Applied(e)) => {
                    applied += 1;
                    changed.extend(e);
                }
                Ok(Merged::Ignored) => ignored += 1,
                Err(e) if e.is_bad_key() => ignored += 1,
                Err(e) => {
                    self.pending.append(&mut journal);
                    return Err(e);
                }
            }
        }
        self.pending.append(&mut journal);
        self.count_remote(applied, ignored);
        // The position moves only with the last chunk: an interrupted snapshot starts over.
        if last {
            self.set_received(&mut inner, from, epoch, through_seq);
            self.snapshot_until.store(0, Ordering::Relaxed);
        } else {
            // A stream cut in the middle of a snapshot stops holding checkpoints back soon.
            self.snapshot_until
                .store(now.saturating_add(SNAPSHOT_QUIET_MS), Ordering::Relaxed);
        }
        if !changed.is_empty() {
            events.push(Event::Changes {
                table: Arc::from(table.as_str()),
                entries: changed,
            });
        }
        for ev in events {
            self.publish(&inner, ev);
        }
        Ok(())
    }

    /// The last (epoch, sequence) of `peer`'s log applied here ((0, 0) when nothing was).
    pub fn received(&self, peer: &str) -> Result<(u64, u64), StoreError> {
        Ok(self.lock().received.get(peer).copied().unwrap_or((0, 0)))
    }

    fn set_received(&self, inner: &mut Inner, peer: &str, epoch: u64, seq: u64) {
        let mut v = epoch.to_be_bytes().to_vec();
        v.extend_from_slice(&seq.to_be_bytes());
        // Queued after the changes it covers, so it never reaches the disk before them.
        self.pending.meta(format!("recv/{peer}").into_bytes(), v);
        inner.received.insert(peer.to_owned(), (epoch, seq));
    }

    /// Whether a peer that applied our log up to `seq` of `epoch` can resume from our log at
    /// `seq + 1`: true for this epoch, and for an earlier one if `seq` did not go past what that
    /// epoch had on disk (otherwise it saw changes we lost and then reused the numbers of).
    pub fn can_resume(&self, epoch: u64, seq: u64) -> bool {
        if seq == 0 {
            return true;
        }
        if epoch == self.epoch {
            return seq <= self.head();
        }
        self.epochs
            .iter()
            .any(|&(e, head)| e == epoch && seq <= head)
    }

    /// Persists the position `peer` acknowledged in our log (for ShowPeers after a restart).
    pub fn set_acked(&self, peer: &str, seq: u64) -> Result<(), StoreError> {
        self.meta
            .insert(format!("acked/{peer}"), &seq.to_be_bytes())?;
        Ok(())
    }

    pub fn acked(&self, peer: &str) -> u64 {
        self.meta
            .get(format!("acked/{peer}"))
            .ok()
            .flatten()
            .and_then(|v| u64_at(&v, 0))
            .unwrap_or(0)
    }

    /// Up to `max` changes of our log starting at `from`; `LogGap` if the log no longer has `from`.
    pub fn read_log(&self, from: u64, max: usize) -> Result<Vec<pb::Change>, StoreError> {
        if from < self.first_seq() {
            return Err(StoreError::LogGap(from));
        }
        {
            let inner = self.lock();
            if let Some(first) = inner.tail.front().map(|c| c.seq)
                && from >= first
            {
                let start = usize::try_from(from - first).unwrap_or(usize::MAX);
                if start >= inner.tail.len() {
                    return Ok(Vec::new());
                }
                let end = start.saturating_add(max).min(inner.tail.len());
                return Ok(inner.tail.range(start..end).cloned().collect());
            }
        }
        // The chunk holding `from` starts at or before it.
        let start = match self.log.range(..=seq_key(from)).next_back() {
            Some(kv) => kv?.0,
            None if from > self.head() => return Ok(Vec::new()),
            None => return Err(StoreError::LogGap(from)),
        };
        let mut out = Vec::new();
        'chunks: for kv in self.log.range(start..) {
            let (k, v) = kv?;
            let b = pb::Batch::decode(&*v).map_err(|e| StoreError::Corrupt {
                what: format!("log chunk {}", u64_at(&k, 0).unwrap_or(0)),
                reason: e.to_string(),
            })?;
            for c in b.changes {
                if c.seq < from {
                    continue;
                }
                if c.seq != from + out.len() as u64 {
                    return Err(StoreError::LogGap(from + out.len() as u64));
                }
                out.push(c);
                if out.len() >= max {
                    break 'chunks;
                }
            }
        }
        if out.is_empty() && from <= self.head() {
            return Err(StoreError::LogGap(from));
        }
        Ok(out)
    }

    /// Hands the queued writes to sled and lets the in-memory log tail shrink: the table writes
    /// as one journal value, the log records as chunks, then the meta keys (positions last, so
    /// that they never get ahead of the data: sled recovers a prefix of its writes). Writes a
    /// checkpoint when the journal has grown past the last one. Returns how many writes went.
    pub fn persist(&self) -> Result<usize, StoreError> {
        let mut disk = self.disk();
        // Read the head first: every record up to it is already queued (append queues before
        // publishing the head), so after this batch sled has the log through it.
        let head = self.head();
        let queue = self.pending.take();
        let n = queue.writes + queue.log.len() + queue.meta.len();
        if n == 0 {
            return Ok(0);
        }
        let journal = queue.journal;
        let meta = queue.meta;
        let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut in_chunk = 0;
        for (seq, change) in queue.log {
            if log.is_empty() || in_chunk == LOG_CHUNK {
                log.push((seq, Vec::new()));
                in_chunk = 0;
            }
            if let Some((_, buf)) = log.last_mut() {
                crate::disk::batch_push(buf, &change);
            }
            in_chunk += 1;
        }
        if !journal.is_empty() {
            disk.journal_bytes += journal.len() as u64;
            self.journal
                .insert(disk.journal_next.to_be_bytes(), journal)?;
            disk.journal_next += 1;
        }
        for (first, chunk) in log {
            self.log.insert(seq_key(first), chunk)?;
        }
        for (k, v) in meta {
            self.meta.insert(k, v)?;
        }
        self.persisted_seq.fetch_max(head, Ordering::Relaxed);
        let persisted = self.persisted_seq.load(Ordering::Relaxed);
        {
            let mut inner = self.lock();
            let keep = usize::try_from(self.log_bound.changes).unwrap_or(usize::MAX);
            while inner.tail.len() > LOG_TAIL.min(keep)
                && inner.tail.front().is_some_and(|c| c.seq <= persisted)
            {
                inner.tail.pop_front();
            }
        }
        // Not while a snapshot arrives: its writes are in the journal already (as durable as
        // any), and a checkpoint then would copy the table while it fills, then again after.
        if disk.journal_bytes > CHECKPOINT_AFTER.max(disk.checkpoint_bytes)
            && self.snapshot_until.load(Ordering::Relaxed) < now_ms()
        {
            self.write_checkpoint(&mut disk)?;
        }
        Ok(n)
    }

    /// Rewrites every table as a new checkpoint generation, then drops the old one and the
    /// journal it needed. The copy is fuzzy (the lock is taken per chunk, not for the whole
    /// copy) and still exact after a restart: a key written while it runs has its write in the
    /// journal from `journal_next` on, which the start-up replays over the checkpoint in order.
    fn write_checkpoint(&self, disk: &mut Disk) -> Result<(), StoreError> {
        let generation = disk.generation + 1;
        let journal_from = disk.journal_next;
        let names: Vec<Arc<str>> = self
            .lock()
            .tables
            .values()
            .map(|t| t.name.clone())
            .collect();
        let mut n = 0u32;
        let mut bytes = 0u64;
        let mut value = Vec::new();
        for name in names {
            // In slot order: an entry that moves to another slot meanwhile was removed and
            // written again, and both are in the journal that the start-up replays over this.
            let mut slot = 0;
            loop {
                let mut chunk = crate::disk::chunk_start(&name);
                let mut entries = 0;
                {
                    let inner = self.lock();
                    let Some(t) = inner.tables.get(&*name) else {
                        break;
                    };
                    let end = t.entries.slot_end();
                    if slot >= end {
                        break;
                    }
                    while slot < end && entries < CHECKPOINT_CHUNK {
                        if let Some((k, r)) = t.entries.at(slot) {
                            value.clear();
                            r.encode_into(&mut value);
                            crate::disk::chunk_put(&mut chunk, k.as_bytes(), &value);
                            entries += 1;
                        }
                        slot += 1;
                    }
                }
                if entries == 0 {
                    continue;
                }
                bytes += chunk.len() as u64;
                self.checkpoint
                    .insert(crate::disk::chunk_key(generation, n), chunk)?;
                n += 1;
            }
        }
        for (name, recs) in &disk.orphans {
            for part in recs.chunks(CHECKPOINT_CHUNK) {
                let mut chunk = crate::disk::chunk_start(name);
                for (k, v) in part {
                    crate::disk::chunk_put(&mut chunk, k, v);
                }
                bytes += chunk.len() as u64;
                self.checkpoint
                    .insert(crate::disk::chunk_key(generation, n), chunk)?;
                n += 1;
            }
        }
        let mut mark = generation.to_be_bytes().to_vec();
        mark.extend_from_slice(&journal_from.to_be_bytes());
        self.meta.insert("checkpoint", mark)?;
        for k in self
            .checkpoint
            .scan_prefix(disk.generation.to_be_bytes())
            .keys()
        {
            self.checkpoint.remove(k?)?;
        }
        for k in self.journal.range(..journal_from.to_be_bytes()).keys() {
            self.journal.remove(k?)?;
        }
        tracing::debug!(generation, chunks = n, bytes, "checkpoint written");
        disk.generation = generation;
        disk.checkpoint_bytes = bytes;
        disk.journal_bytes = 0;
        Ok(())
    }

    /// The start of a snapshot of `tables`: the slots of their entries and the log head they
    /// correspond to. `snapshot_entries` then copies them a chunk at a time, so that the store's
    /// lock is held for one chunk, never for a whole table. An entry stays in its slot for as
    /// long as it is there (see [`Entries`]); a key written after this point is in the log after
    /// the head, which follows the snapshot, and one written meanwhile may arrive twice (or a
    /// slot emptied and reused may send another key than planned), which LWW makes harmless.
    pub fn snapshot_keys(&self, tables: &[String]) -> (u64, Vec<SnapshotTable>) {
        let inner = self.lock();
        let out = tables
            .iter()
            .filter_map(|name| {
                let t = inner.tables.get(name)?;
                Some(SnapshotTable {
                    name: name.clone(),
                    cleared_version: t.cleared_version,
                    cleared_origin: t.cleared_origin.clone(),
                    // Nearest expiry first: the receiver's expiry index then grows at its end
                    // (an insert at a random place of a large B-tree misses the cache).
                    slots: t.entries.slots_by_expiry(),
                })
            })
            .collect();
        (inner.head, out)
    }

    /// The unexpired entries (tombstones included) in `slots` of `table`.
    pub fn snapshot_entries(&self, table: &str, slots: &[u32]) -> Vec<pb::Entry> {
        let inner = self.lock();
        let Some(t) = inner.tables.get(table) else {
            return Vec::new();
        };
        let now = now_ms();
        let mut out = Vec::with_capacity(slots.len());
        out.extend(slots.iter().filter_map(|&slot| {
            let (k, r) = t.entries.at(slot).filter(|(_, r)| r.expires > now)?;
            Some(r.to_pb(k, now))
        }));
        out
    }

    /// Current content of `tables` (all when empty) and a subscription that starts right after it.
    pub fn watch(
        &self,
        tables: &[String],
    ) -> Result<(Vec<pb::EntryBatch>, broadcast::Receiver<Arc<Event>>), StoreError> {
        let inner = self.lock();
        for t in tables {
            if !inner.tables.contains_key(t) {
                return Err(StoreError::UnknownTable(t.clone()));
            }
        }
        let now = now_ms();
        let mut out = Vec::new();
        let mut names: Vec<&String> = inner.tables.keys().collect();
        names.sort();
        for name in names {
            if !tables.is_empty() && !tables.contains(name) {
                continue;
            }
            let t = &inner.tables[name];
            let entries: Vec<_> = t
                .entries
                .iter()
                .filter(|(_, r)| r.expires > now)
                .map(|(k, r)| r.to_pb(k, now))
                .collect();
            for part in entries.chunks(1024) {
                out.push(pb::EntryBatch {
                    table: name.clone(),
                    entries: part.to_vec(),
                });
            }
        }
        Ok((out, self.events.subscribe()))
    }

    /// Live entries for `keys`.
    pub fn lookup(&self, table: &str, keys: &[String]) -> Result<Vec<pb::Entry>, StoreError> {
        let inner = self.lock();
        let t = inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        let now = now_ms();
        let mut out = Vec::new();
        for k in keys {
            let key = canonical_key(&t.def, k)?;
            if let Some(r) = t
                .entries
                .get(&key)
                .filter(|r| !r.deleted && r.expires > now)
            {
                out.push(r.to_pb(&key, now));
            }
        }
        Ok(out)
    }

    /// HAProxy's `show table`: header and entries sorted by key, filtered, paged.
    pub fn show(&self, req: &pb::ShowRequest) -> Result<pb::ShowReply, StoreError> {
        let now = now_ms();
        let page = if req.page_size == 0 {
            1000
        } else {
            req.page_size as usize
        };
        // Under the lock, the matching entries are only pointed at, and the page's (and one
        // more, which says whether a next page exists) picked out in linear time; only those
        // are copied, and sorted outside it. A page of a big table then costs a pass over it,
        // not a copy and a sort of all that follows the page token.
        let (info, mut found) = {
            let inner = self.lock();
            let t = inner
                .tables
                .get(&req.table)
                .ok_or_else(|| StoreError::UnknownTable(req.table.clone()))?;
            let key = if req.key.is_empty() {
                None
            } else {
                Some(canonical_key(&t.def, &req.key)?)
            };
            let wanted = |k: &str, r: &Rec| {
                r.expires > now
                    && (req.include_deleted || !r.deleted)
                    && (req.server.is_empty() || *r.server == *req.server)
                    && (req.page_token.is_empty() || k > req.page_token.as_str())
            };
            let mut refs: Vec<(&str, &Rec)> = Vec::new();
            // The one key asked for is checked like the others (expiry, server, page token).
            match &key {
                Some(k) => refs.extend(
                    t.entries
                        .get(k)
                        .map(|r| (k.as_str(), r))
                        .filter(|(k, r)| wanted(k, r)),
                ),
                None => refs.extend(t.entries.iter().filter(|(k, r)| wanted(k, r))),
            }
            if refs.len() > page + 1 {
                refs.select_nth_unstable_by(page, |a, b| a.0.cmp(b.0));
                refs.truncate(page + 1);
            }
            let found: Vec<(String, Rec)> = refs
                .into_iter()
                .map(|(k, r)| (k.to_owned(), r.clone()))
                .collect();
            (t.info(), found)
        };
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > page;
        found.truncate(page);
        let entries: Vec<_> = found.iter().map(|(k, r)| r.to_pb(k, now)).collect();
        Ok(pb::ShowReply {
            table: Some(info),
            next_page_token: if more {
                entries.last().map(|e| e.key.clone()).unwrap_or_default()
            } else {
                String::new()
            },
            entries,
        })
    }

    pub fn tables_info(&self) -> Vec<pb::TableInfo> {
        let inner = self.lock();
        let mut v: Vec<_> = inner.tables.values().map(Table::info).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Drops expired entries (tombstones included). Not replicated: every node expires the same
    /// entries by itself because expiry is absolute. Returns how many went.
    pub fn sweep(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut inner = self.lock();
        let mut n = 0;
        for t in inner.tables.values_mut() {
            while t.entries.first_expiry().is_some_and(|e| e <= now) && t.remove_first() {
                n += 1;
            }
        }
        self.counters.expired.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Trims the log to its bound (see `logbound`); peers further behind get a snapshot.
    pub fn trim_log(&self) -> Result<u64, StoreError> {
        let head = self.head();
        let first = self.first_seq();
        // Every chunk's first sequence and size (a few hundred values at most once trimmed).
        let chunks: Vec<(u64, u64)> = self
            .log
            .iter()
            .map(|kv| kv.map(|(k, v)| (u64_at(&k, 0).unwrap_or(0), v.len() as u64)))
            .collect::<Result<_, _>>()?;
        let Some(keep_from) = self.log_bound.first_kept(head, &chunks) else {
            return Ok(0);
        };
        if keep_from <= first {
            return Ok(0);
        }
        // Move the mark first: a reader that raced us sees a gap, never a half-deleted range.
        self.first_seq.store(keep_from, Ordering::Relaxed);
        for &(s, _) in chunks.iter().take_while(|(s, _)| *s < keep_from) {
            self.log.remove(seq_key(s))?;
        }
        Ok(keep_from - first)
    }

    /// Changes the log holds now (for tests and Stats' log_first_seq).
    pub fn log_len(&self) -> u64 {
        (self.head() + 1).saturating_sub(self.first_seq())
    }

    /// Called by writers after a write (off the async workers): when sled falls behind, the
    /// writer persists the queue itself, which slows writes down to what sled can take and
    /// keeps the durability window and the queue's memory bounded.
    pub fn backpressure(&self) {
        if self.pending.len() > PENDING_HIGH_WATER
            && let Err(e) = self.persist()
        {
            tracing::error!(error = %e, "writing to sled failed");
        }
    }

    /// `Some(v)` when this start may have lost writes of our own above version `v` (a kill -9
    /// inside the durability window, or a new data_dir): peers are asked to send them back.
    pub fn recover_since(&self) -> Option<u64> {
        self.recover_since
    }

    /// Entries (and a clear) that `origin` wrote with a version above `since`, as snapshot
    /// chunks that do not move the receiver's position.
    pub fn entries_of(&self, origin: &str, since: u64) -> Vec<pb::SnapshotChunk> {
        let inner = self.lock();
        let now = now_ms();
        let mut out = Vec::new();
        let mut names: Vec<&String> = inner.tables.keys().collect();
        names.sort();
        for name in names {
            let t = &inner.tables[name];
            let entries: Vec<pb::Entry> = t
                .entries
                .iter()
                .filter(|(_, r)| &*r.origin == origin && r.version > since && r.expires > now)
                .map(|(k, r)| r.to_pb(k, now))
                .collect();
            let cleared = t.cleared_origin == origin && t.cleared_version > since;
            if entries.is_empty() && !cleared {
                continue;
            }
            let mut first = true;
            for part in entries
                .chunks(4096)
                .map(<[pb::Entry]>::to_vec)
                .chain(entries.is_empty().then(Vec::new))
            {
                out.push(pb::SnapshotChunk {
                    table: name.clone(),
                    entries: part,
                    cleared_version: if first && cleared {
                        t.cleared_version
                    } else {
                        0
                    },
                    cleared_origin: if first && cleared {
                        t.cleared_origin.clone()
                    } else {
                        String::new()
                    },
                    last: false,
                    through_seq: 0,
                    // A part of the table only: no sizing hint.
                    table_entries: 0,
                });
                first = false;
            }
        }
        out
    }

    /// Records a clean stop (everything flushed), so that the next start asks nothing back.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.flush().await?;
        self.meta.insert("clean", &[1u8])?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Writes everything to disk; returns the bytes flushed.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        self.persist()?;
        self.meta.insert("head", &self.head().to_be_bytes())?;
        Ok(self.db.flush_async().await?)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::SourceFile;

    fn config(dir: &std::path::Path, local: &str, extra: &str) -> Config {
        let text = format!(
            r#"
data_dir = "{}"
socket = "{}/s.sock"
log_keep = 1000
[[peers]]
name = "a"
address = "127.0.0.1:1"
[[peers]]
name = "b"
address = "127.0.0.2:1"
[[tables]]
name = "web"
type = "string"
len = 8
size = "3"
expire = "5m"
[[tables]]
name = "ips"
type = "ip"
size = "5k"
expire = "5m"
{extra}
"#,
            dir.join(local).display(),
            dir.display()
        );
        Config::from_source(&SourceFile::from_text("t.toml", text), Some(local)).expect("config")
    }

    /// sled releases its directory lock from a background thread shortly after the last handle
    /// goes: a reopen in the same process may need a few tries (a new process never does).
    fn reopen(c: &Config) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(c) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    fn item(key: &str, server: &str) -> pb::StoreItem {
        pb::StoreItem {
            key: key.into(),
            server: server.into(),
            expires_unix_ms: 0,
        }
    }

    #[test]
    fn keys_are_checked_and_canonical() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        let s = Store::open(&c).expect("open");
        assert!(matches!(
            s.store("nope", &[item("k", "s")]),
            Err(StoreError::UnknownTable(_))
        ));
        assert!(matches!(
            s.store("web", &[item("123456789", "s")]),
            Err(StoreError::KeyTooLong { .. })
        ));
        assert!(matches!(
            s.store("ips", &[item("10.0.0.300", "s")]),
            Err(StoreError::BadKey { .. })
        ));
        assert!(matches!(
            s.store("web", &[item("k", "")]),
            Err(StoreError::BadServer { .. })
        ));
        let e = s.store("ips", &[item(" 10.0.0.1", "app1")]).expect("store");
        assert_eq!(e[0].key, "10.0.0.1");
        assert_eq!(
            s.lookup("ips", &["10.0.0.1".into()]).expect("lookup").len(),
            1
        );
    }

    /// Pages of a filtered Show: every matching key once, in key order, and a token only where
    /// more follow.
    #[test]
    fn show_pages_through_a_filtered_table_in_key_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        let s = Store::open(&c).expect("open");
        let items: Vec<_> = (0..1500u32)
            .map(|i| {
                let ip = format!("10.{}.{}.{}", i % 7, (i * 37) % 256, i % 251);
                item(&ip, if i % 3 == 0 { "app1" } else { "app2" })
            })
            .collect();
        s.store("ips", &items).expect("store");
        let mut want: Vec<String> = s
            .lookup(
                "ips",
                &items.iter().map(|i| i.key.clone()).collect::<Vec<_>>(),
            )
            .expect("lookup")
            .into_iter()
            .filter(|e| e.server == "app1")
            .map(|e| e.key)
            .collect();
        want.sort();
        want.dedup();
        let mut got = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let reply = s
                .show(&pb::ShowRequest {
                    table: "ips".into(),
                    server: "app1".into(),
                    page_size: 64,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .expect("show");
            pages += 1;
            assert!(reply.entries.len() <= 64);
            assert!(reply.entries.iter().all(|e| e.server == "app1"));
            got.extend(reply.entries.into_iter().map(|e| e.key));
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
            assert!(pages < 100, "paging does not end");
        }
        assert_eq!(got, want);
        assert_eq!(pages, want.len().div_ceil(64));
        let one = s
            .show(&pb::ShowRequest {
                table: "ips".into(),
                key: want[3].clone(),
                server: "app2".into(),
                ..Default::default()
            })
            .expect("show");
        assert!(one.entries.is_empty(), "the key's server is app1");
    }

    #[test]
    fn full_table_evicts_nearest_expiry_first() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(&config(dir.path(), "a", "")).expect("open");
        // Within the table's expire (5m): a longer one would be clamped to it.
        let far = now_ms() + 200_000;
        for (k, exp) in [("a", far), ("b", far - 1000), ("c", far + 1000)] {
            s.store(
                "web",
                &[pb::StoreItem {
                    key: k.into(),
                    server: "s".into(),
                    expires_unix_ms: exp,
                }],
            )
            .expect("store");
        }
        s.store("web", &[item("d", "s")]).expect("store");
        let keys: Vec<_> = s
            .lookup("web", &["a".into(), "b".into(), "c".into(), "d".into()])
            .expect("lookup")
            .into_iter()
            .map(|e| e.key)
            .collect();
        // "d" expires in 5m, later than "a", "b" and "c" (about 3m20s): "b" was nearest and went.
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(s.counters.evicted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_rewrite_with_the_same_expiry_is_still_swept() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(&config(dir.path(), "a", "")).expect("open");
        let soon = now_ms() + 30;
        for server in ["s1", "s2"] {
            s.store(
                "web",
                &[pb::StoreItem {
                    key: "k".into(),
                    server: server.into(),
                    expires_unix_ms: soon,
                }],
            )
            .expect("store");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.sweep().expect("sweep"), 1);
        assert_eq!(s.tables_info()[1].used, 0);
    }

    #[test]
    fn lww_converges_in_any_order_and_touch_keeps_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Store::open(&config(dir.path(), "a", "")).expect("open a");
        let b = Store::open(&config(dir.path(), "b", "")).expect("open b");
        let ea = a.store("web", &[item("k", "s1")]).expect("a");
        let eb = b.store("web", &[item("k", "s2")]).expect("b");
        let ca = a.read_log(1, 10).expect("log a");
        let cb = b.read_log(1, 10).expect("log b");
        a.apply_remote("b", b.epoch(), cb, &[], Some(1))
            .expect("apply");
        b.apply_remote("a", a.epoch(), ca, &[], Some(1))
            .expect("apply");
        let va = a.lookup("web", &["k".into()]).expect("a");
        let vb = b.lookup("web", &["k".into()]).expect("b");
        assert_eq!(va[0].server, vb[0].server);
        let winner = if (ea[0].version, "a") > (eb[0].version, "b") {
            "s1"
        } else {
            "s2"
        };
        assert_eq!(va[0].server, winner);
        // A touch extends expiry but does not bump the version.
        let before = va[0].version;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(a.touch("web", &["k".into()]).expect("touch"), 1);
        let after = a.lookup("web", &["k".into()]).expect("a");
        assert_eq!(after[0].version, before);
        assert!(after[0].expires_unix_ms > va[0].expires_unix_ms);
        assert_eq!(a.received("b").expect("recv"), (b.epoch(), 1));
        assert_eq!(a.received("c").expect("recv"), (0, 0));
    }

    fn entry(key: &str, server: &str, version: u64, expires: i64, deleted: bool) -> pb::Entry {
        pb::Entry {
            key: key.into(),
            server: server.into(),
            expires_unix_ms: expires,
            version,
            origin: "b".into(),
            deleted,
            expires_in_ms: 0,
        }
    }

    #[test]
    fn snapshot_chunks_merge_by_lww_evict_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        let now = now_ms();
        let far = now + 600_000;
        {
            let s = Store::open(&c).expect("open");
            let mine = s.store("web", &[item("k1", "mine")]).expect("store");
            let (_, mut events) = s.watch(&["web".into()]).expect("watch");
            // "web" holds 3. k1 is ours and newer than b's; k3 is a tombstone (it takes room);
            // k4 arrives with the table full: the nearest expiry (k2, from this very chunk) goes.
            let chunk = pb::SnapshotChunk {
                table: "web".into(),
                entries: vec![
                    entry("k1", "old", mine[0].version - 1, far, false),
                    entry("k2", "s2", 5 << 16, now + 60_000, false),
                    entry("k3", "", 6 << 16, far, true),
                    entry("k4", "s4", 7 << 16, far, false),
                    entry("gone", "s5", 8 << 16, now - 1, false),
                ],
                last: true,
                through_seq: 9,
                // A size hint never sizes the table past its `size` (here 3), whatever it says.
                table_entries: u64::MAX,
                ..Default::default()
            };
            s.apply_snapshot("b", 42, chunk).expect("apply");
            assert_eq!(s.received("b").expect("received"), (42, 9));
            assert_eq!(s.counters.evicted.load(Ordering::Relaxed), 1);
            assert_eq!(s.counters.remote_applied.load(Ordering::Relaxed), 3);
            assert_eq!(s.counters.remote_ignored.load(Ordering::Relaxed), 2);
            let ev = events.try_recv().expect("an event for the chunk");
            let Event::Changes { entries, .. } = &*ev else {
                panic!("not changes: {ev:?}");
            };
            let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["k2", "k3", "k4"]);
            s.persist().expect("persist");
        }
        let s = reopen(&c);
        let live: Vec<(String, String)> = s
            .lookup("web", &["k1".into(), "k2".into(), "k3".into(), "k4".into()])
            .expect("lookup")
            .into_iter()
            .map(|e| (e.key, e.server))
            .collect();
        assert_eq!(
            live,
            [("k1".into(), "mine".into()), ("k4".into(), "s4".into())]
        );
        let info = &s.tables_info()[1];
        assert_eq!((info.used, info.tombstones), (2, 1));
        assert_eq!(s.received("b").expect("received"), (42, 9));
    }

    #[test]
    fn delete_and_clear_beat_older_values() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Store::open(&config(dir.path(), "a", "")).expect("open a");
        let b = Store::open(&config(dir.path(), "b", "")).expect("open b");
        b.store("web", &[item("old", "s")]).expect("b");
        let old = b.read_log(1, 10).expect("log");
        // a has seen the value, then deletes it; a late duplicate must not resurrect it.
        a.apply_remote("b", b.epoch(), old.clone(), &[], Some(1))
            .expect("value");
        assert_eq!(a.lookup("web", &["old".into()]).expect("a").len(), 1);
        a.delete("web", "old").expect("delete");
        a.apply_remote("b", b.epoch(), old.clone(), &[], Some(1))
            .expect("late old value");
        assert!(a.lookup("web", &["old".into()]).expect("a").is_empty());
        a.store("web", &[item("x", "s")]).expect("a");
        a.clear("web").expect("clear");
        let log = a.read_log(1, 10).expect("log");
        b.apply_remote("a", a.epoch(), log.clone(), &[], Some(log.len() as u64))
            .expect("apply");
        assert!(
            b.lookup("web", &["old".into(), "x".into()])
                .expect("b")
                .is_empty()
        );
    }

    #[test]
    fn restart_keeps_entries_and_log() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        {
            let s = Store::open(&c).expect("open");
            s.store("ips", &[item("10.0.0.1", "app1"), item("10.0.0.2", "app2")])
                .expect("store");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt");
            rt.block_on(s.flush()).expect("flush");
        }
        let old_epoch = reopen(&c).epoch();
        // That epoch reached sequence 2 on disk: a peer claiming 3 saw changes we lost.
        let s = reopen(&c);
        assert_ne!(s.epoch(), old_epoch);
        assert!(s.can_resume(old_epoch, 2));
        assert!(!s.can_resume(old_epoch, 3));
        assert!(!s.can_resume(12345, 1));
        assert!(s.can_resume(12345, 0));
        assert_eq!(s.head(), 2);
        assert_eq!(
            s.lookup("ips", &["10.0.0.2".into()]).expect("l")[0].server,
            "app2"
        );
        let v = s.store("ips", &[item("10.0.0.3", "x")]).expect("store");
        assert!(
            v[0].version
                > s.read_log(1, 1).expect("log")[0]
                    .kind
                    .as_ref()
                    .map_or(0, |k| match k {
                        pb::change::Kind::Entry(e) => e.version,
                        pb::change::Kind::Cleared(c) => c.version,
                    })
        );
    }

    #[test]
    fn log_trim_makes_a_gap() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(&config(dir.path(), "a", "")).expect("open");
        for i in 0..2500 {
            s.store(
                "ips",
                &[item(&format!("10.0.{}.{}", i / 256, i % 256), "s")],
            )
            .expect("store");
        }
        assert_eq!(s.trim_log().expect("trim before persisting"), 0);
        s.persist().expect("persist");
        // log_keep 1000 of 2500: whole chunks of 512 below 1501 go.
        assert_eq!(s.trim_log().expect("trim"), 1024);
        assert_eq!(s.first_seq(), 1025);
        assert!(matches!(s.read_log(3, 10), Err(StoreError::LogGap(3))));
        assert_eq!(s.read_log(1025, 10).expect("read")[0].seq, 1025);
        assert!(s.read_log(2501, 10).expect("at head").is_empty());
        // From sled rather than the in-memory tail, across a chunk boundary.
        s.lock().tail.clear();
        let across: Vec<u64> = s
            .read_log(1530, 10)
            .expect("read")
            .iter()
            .map(|c| c.seq)
            .collect();
        assert_eq!(across, (1530..1540).collect::<Vec<_>>());
        assert!(s.read_log(2501, 10).expect("at head").is_empty());
    }

    #[test]
    fn journal_and_checkpoint_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        {
            let s = Store::open(&c).expect("open");
            for i in 0..300 {
                s.store(
                    "ips",
                    &[item(&format!("10.1.{}.{}", i / 256, i % 256), "old")],
                )
                .expect("store");
            }
            s.persist().expect("persist");
            s.write_checkpoint(&mut s.disk()).expect("checkpoint");
            // After the checkpoint: a replacement, a delete and new keys, in the journal only.
            s.store("ips", &[item("10.1.0.1", "new")]).expect("store");
            s.delete("ips", "10.1.0.2").expect("delete");
            s.store("ips", &[item("10.2.0.1", "x")]).expect("store");
            s.sweep().expect("sweep");
            s.persist().expect("persist");
        }
        let s = reopen(&c);
        let got = |k: &str| {
            s.lookup("ips", &[k.into()])
                .expect("lookup")
                .pop()
                .map(|e| e.server)
        };
        assert_eq!(got("10.1.0.1").as_deref(), Some("new"));
        assert_eq!(got("10.1.0.2"), None);
        assert_eq!(got("10.1.0.3").as_deref(), Some("old"));
        assert_eq!(got("10.2.0.1").as_deref(), Some("x"));
        assert_eq!(s.tables_info()[0].used, 300);
        assert_eq!(s.head(), 303);
        assert_eq!(s.read_log(303, 1).expect("log")[0].seq, 303);
    }

    #[test]
    fn per_key_trees_of_older_versions_are_read_and_moved() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        {
            let db = sled::open(&c.data_dir).expect("sled");
            let rec = Rec {
                server: "app1".into(),
                expires: now_ms() + 60_000,
                version: 7 << 16,
                origin: Arc::from("a"),
                deleted: false,
            };
            db.open_tree("table/ips")
                .expect("tree")
                .insert("10.0.0.9", rec.encode())
                .expect("insert");
            let change = pb::Change {
                seq: 1,
                table: "ips".into(),
                kind: Some(pb::change::Kind::Entry(rec.to_pb("10.0.0.9", now_ms()))),
            };
            db.open_tree("log")
                .expect("tree")
                .insert(seq_key(1), change.encode_to_vec())
                .expect("insert");
            db.flush().expect("flush");
        }
        let s = reopen(&c);
        assert_eq!(s.head(), 1);
        assert_eq!(s.read_log(1, 5).expect("log").len(), 1);
        assert_eq!(
            s.lookup("ips", &["10.0.0.9".into()]).expect("l")[0].server,
            "app1"
        );
        let names = s.db.tree_names();
        assert!(!names.iter().any(|n| **n == *b"table/ips" || **n == *b"log"));
        drop(s);
        assert_eq!(reopen(&c).tables_info()[0].used, 1);
    }
}
