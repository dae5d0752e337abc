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

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::{Config, StickOn};
use crate::sys::TableAlloc;

/// Unsent writes kept while stickd is away; beyond this new ones are dropped (and counted).
pub const MAX_PENDING: usize = 100_000;
/// Items per Store or Touch call.
const BATCH: usize = 1000;
/// How long touches gather before a flush; a store wakes the flusher at once (see `store`).
const FLUSH_EVERY: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Shards per table (a power of two). Few enough that a big cache's shards reach the 2 MiB
/// from which their tables go on huge pages (past some 460k entries a table); enough that a
/// lookup, which holds its shard's mutex for some 40 ns, seldom waits: 32 threads making 1M
/// lookups/s each would find a shard busy 8 % of the time.
pub const SHARDS: usize = 16;
/// Buckets a sweep step visits (over all tables), each shard locked only for its part.
pub const SWEEP_BUCKETS: usize = 4096;
/// Pause between sweep steps: 1M entries (2M buckets) are swept in about 10 s.
const SWEEP_EVERY: Duration = Duration::from_millis(20);
/// Expiry assumed for a table until stickd has described it (only stores exist then).
const UNKNOWN_EXPIRE_MS: i64 = 300_000;

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("stick table '{table}': {reason}")]
    Table { table: String, reason: String },
}

/// What a table's keys are, from the rules that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A cookie value: needs a `string` table.
    Text,
    /// A client address: needs an `ip` or `ipv6` table.
    Address,
}

/// Keys up to this long live in the entry itself: no allocation of their own (whose malloc
/// overhead would cost more than the key) and no pointer to chase on a lookup.
const INLINE_KEY: usize = 30;

/// A key: inline up to [`INLINE_KEY`] bytes (PHP's 26-character session ids, 24-character
/// ASP.NET ids, addresses), boxed beyond. 32 bytes either way.
#[derive(Debug)]
enum SlotKey {
    Inline(u8, [u8; INLINE_KEY]),
    Boxed(Box<str>),
}

impl SlotKey {
    fn new(key: &str) -> SlotKey {
        match u8::try_from(key.len()) {
            Ok(n) if key.len() <= INLINE_KEY => {
                let mut b = [0; INLINE_KEY];
                b[..key.len()].copy_from_slice(key.as_bytes());
                SlotKey::Inline(n, b)
            }
            _ => SlotKey::Boxed(Box::from(key)),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            SlotKey::Inline(n, b) => &b[..usize::from(*n)],
            SlotKey::Boxed(k) => k.as_bytes(),
        }
    }

    fn is(&self, key: &str) -> bool {
        self.as_bytes() == key.as_bytes()
    }
}

/// Keys are hashed as bytes, whichever form they are kept in.
fn hash_key(hasher: &RandomState, key: &[u8]) -> u64 {
    hasher.hash_one(key)
}

/// One cached entry: 56 bytes (32 key + 8 + 8 + 2, padded), the key included up to
/// [`INLINE_KEY`] bytes.
#[derive(Debug)]
struct Slot {
    key: SlotKey,
    /// Absolute, in Unix ms (stickd's expiry, or ours for a store it has not echoed yet). A
    /// touch pushes it to `now + expire`, so `expires_ms - expire` is when it was last
    /// refreshed: no separate field is needed to coalesce touches.
    expires_ms: i64,
    /// stickd's version; 0 for a local store not echoed yet.
    version: u64,
    /// Index into the shard's `servers`.
    server: u16,
}

/// A part of a table: the entries whose key hashes here, and the server names they use.
#[derive(Debug, Default)]
struct Shard {
    entries: HashTable<Slot, TableAlloc>,
    /// Interned names: an entry holds an index, a lookup lends the name.
    servers: Vec<Arc<str>>,
    /// Lookups that found a live entry, and the others: counted under the shard's lock, so
    /// that threads do not contend on one shared counter's cache line.
    hits: u64,
    misses: u64,
}

impl Shard {
    /// The index of `name`, added if new; `None` only if 65536 names are in use at once.
    fn intern(&mut self, name: &str) -> Option<u16> {
        if let Some(i) = self.servers.iter().position(|s| **s == *name) {
            return u16::try_from(i).ok();
        }
        if self.servers.len() > usize::from(u16::MAX) {
            // Names of servers no entry uses any more (renamed, removed) pile up over a long
            // life: drop them before giving up.
            self.compact_servers();
        }
        let i = u16::try_from(self.servers.len()).ok()?;
        self.servers.push(Arc::from(name));
        Some(i)
    }

    fn compact_servers(&mut self) {
        let mut used = vec![false; self.servers.len()];
        for e in self.entries.iter() {
            used[usize::from(e.server)] = true;
        }
        let mut remap = vec![0u16; self.servers.len()];
        let mut kept = Vec::new();
        for (i, name) in self.servers.drain(..).enumerate() {
            if used[i] {
                remap[i] = kept.len() as u16;
                kept.push(name);
            }
        }
        self.servers = kept;
        for e in self.entries.iter_mut() {
            e.server = remap[usize::from(e.server)];
        }
    }

    /// Sets `key`'s entry (new or replaced); `false` if the server name could not be interned.
    fn upsert(
        &mut self,
        hasher: &RandomState,
        hash: u64,
        key: &str,
        server: &str,
        expires_ms: i64,
        version: u64,
    ) -> bool {
        let Some(server) = self.intern(server) else {
            return false;
        };
        self.upsert_at(hasher, hash, key, server, expires_ms, version);
        true
    }

    fn upsert_at(
        &mut self,
        hasher: &RandomState,
        hash: u64,
        key: &str,
        server: u16,
        expires_ms: i64,
        version: u64,
    ) {
        if let Some(e) = self.entries.find_mut(hash, |e| e.key.is(key)) {
            e.server = server;
            e.expires_ms = expires_ms;
            e.version = version;
        } else {
            let slot = Slot {
                key: SlotKey::new(key),
                expires_ms,
                version,
                server,
            };
            self.entries
                .insert_unique(hash, slot, |e| hash_key(hasher, e.key.as_bytes()));
        }
    }

    fn remove(&mut self, hash: u64, key: &str) {
        if let Ok(o) = self.entries.find_entry(hash, |e| e.key.is(key)) {
            o.remove();
        }
    }
}

#[derive(Debug)]
pub struct Table {
    pub name: String,
    kind: KeyKind,
    /// From stickd (ListTables); until known, [`UNKNOWN_EXPIRE_MS`] is assumed.
    expire_ms: AtomicU64,
    /// Longest key (string tables); 0: unknown or not a string table.
    max_len: AtomicU64,
    ipv6: AtomicBool,
    /// Seeded at random per process and per table (foldhash, hashbrown's own default): cookie
    /// values come from clients, who must not be able to aim their keys at one probe sequence
    /// or one shard, and who never see a hash. SipHash took three times as long on a session id.
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Table {
    fn new(name: String, kind: KeyKind) -> Table {
        Table {
            name,
            kind,
            expire_ms: AtomicU64::new(0),
            max_len: AtomicU64::new(0),
            ipv6: AtomicBool::new(false),
            hasher: RandomState::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn hash(&self, key: &str) -> u64 {
        hash_key(&self.hasher, key.as_bytes())
    }

    /// The shard of a hash. hashbrown places by the low bits and filters by the top 7: the
    /// shard takes bits 32.. so that neither loses entropy within a shard.
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        self.shard_at((hash >> 32) as usize % SHARDS)
    }

    fn shard_at(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long an entry lives after a store or a touch.
    fn life_ms(&self) -> i64 {
        match self.expire_ms.load(Ordering::Relaxed) {
            0 => UNKNOWN_EXPIRE_MS,
            ms => i64::try_from(ms).unwrap_or(i64::MAX / 4),
        }
    }
}

#[derive(Debug, Default)]
pub struct Pending {
    // foldhash as in the tables: a store hashes its key here too, on a new session's path.
    stores: HashMap<(usize, String), Arc<str>, RandomState>,
    touches: HashSet<(usize, String), RandomState>,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.stores.len() + self.touches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct StickStats {
    pub stores: AtomicU64,
    pub stores_sent: AtomicU64,
    pub touches_sent: AtomicU64,
    pub dropped: AtomicU64,
    pub link_up: AtomicBool,
}

#[derive(Debug)]
pub struct StickCache {
    pub tables: Vec<Table>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Where the sweep resumes: table, shard, bucket.
    sweep_at: Mutex<(usize, usize, usize)>,
    pub stats: StickStats,
}

/// Unix time in ms from the coarse clock (a few ns instead of tens on the lookup path; a few
/// ms of resolution are nothing against an expiry of seconds or minutes).
pub fn now_ms() -> i64 {
    common::time::coarse_unix_ms().unwrap_or_else(|_| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// Lookups and entries of a table, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Entries held, expired ones not swept yet included.
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
}

impl StickCache {
    /// The tables the config's stick rules use; `None` without any rule.
    pub fn for_config(config: &Config) -> Option<Arc<StickCache>> {
        let mut tables: Vec<(String, KeyKind)> = Vec::new();
        for s in config.backends.iter().filter_map(|b| b.stick.as_ref()) {
            let kind = match s.on {
                StickOn::Cookie(_) => KeyKind::Text,
                StickOn::Src => KeyKind::Address,
            };
            if !tables.iter().any(|(n, _)| *n == s.table) {
                tables.push((s.table.clone(), kind));
            }
        }
        (!tables.is_empty()).then(|| Arc::new(StickCache::new(tables)))
    }

    pub fn new(tables: Vec<(String, KeyKind)>) -> StickCache {
        StickCache {
            tables: tables
                .into_iter()
                .map(|(name, kind)| Table::new(name, kind))
                .collect(),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            sweep_at: Mutex::new((0, 0, 0)),
            stats: StickStats::default(),
        }
    }

    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.name == name)
    }

    /// The key of a client address in table `t` (its canonical form in stickd).
    pub fn address_key(&self, t: usize, ip: std::net::IpAddr) -> Option<String> {
        let v6 = self.tables[t].ipv6.load(Ordering::Relaxed);
        match ip {
            std::net::IpAddr::V4(a) if v6 => Some(a.to_ipv6_mapped().to_string()),
            std::net::IpAddr::V4(a) => Some(a.to_string()),
            std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if !v6 => Some(v4.to_string()),
                _ if v6 => Some(a.to_string()),
                _ => None,
            },
        }
    }

    /// The server stuck to `key`, if a live entry exists; schedules a coalesced touch.
    pub fn lookup(&self, t: usize, key: &str) -> Option<Arc<str>> {
        self.lookup_with(t, key, Arc::clone)
    }

    /// [`lookup`](Self::lookup) that lends the server's name to `f` (under the shard's lock:
    /// keep it short) instead of cloning it. Allocates nothing unless a touch is due.
    pub fn lookup_with<R>(&self, t: usize, key: &str, f: impl FnOnce(&Arc<str>) -> R) -> Option<R> {
        let table = &self.tables[t];
        let now = now_ms();
        let life = table.life_ms();
        let hash = table.hash(key);
        let mut touch = false;
        let found = {
            let mut shard = table.shard(hash);
            let shard = &mut *shard;
            // The bucket's load starts now, beside the control bytes' instead of after them.
            shard.entries.allocator().prefetch::<Slot>(hash);
            let found = match shard.entries.find_entry(hash, |e| e.key.is(key)) {
                Ok(mut o) if o.get().expires_ms > now => {
                    let e = o.get_mut();
                    // Last refreshed at `expires_ms - life`: due a quarter of `life` later.
                    if e.expires_ms.saturating_sub(now) <= life - life / 4 {
                        e.expires_ms = now.saturating_add(life);
                        touch = true;
                    }
                    shard.servers.get(usize::from(e.server)).map(f)
                }
                Ok(o) => {
                    o.remove();
                    None
                }
                Err(_) => None,
            };
            match found {
                Some(_) => shard.hits += 1,
                None => shard.misses += 1,
            }
            found
        };
        if touch {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() < MAX_PENDING {
                p.touches.insert((t, key.to_owned()));
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        found
    }

    /// Sticks `key` to `server`: visible to this worker at once, sent to stickd soon.
    pub fn store(&self, t: usize, key: &str, server: &str) {
        let table = &self.tables[t];
        let max_len = table.max_len.load(Ordering::Relaxed);
        if key.is_empty() || (max_len > 0 && key.len() as u64 > max_len) {
            // stickd refuses it (never truncates): keep it out of the buffer.
            tracing::debug!(table = %table.name, key_len = key.len(), "key too long for the table, not stored");
            return;
        }
        let now = now_ms();
        let hash = table.hash(key);
        let name = {
            let mut shard = table.shard(hash);
            let shard = &mut *shard;
            let Some(s) = shard.intern(server) else {
                tracing::warn!(table = %table.name, "too many server names in the stick cache, not stored");
                return;
            };
            if let Some(e) = shard.entries.find(hash, |e| e.key.is(key))
                && e.server == s
                && e.expires_ms > now
            {
                return;
            }
            // Until stickd echoes the entry, it lives for the table's expire.
            shard.upsert_at(
                &table.hasher,
                hash,
                key,
                s,
                now.saturating_add(table.life_ms()),
                0,
            );
            shard.servers[usize::from(s)].clone()
        };
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let first = p.stores.is_empty();
            if p.len() < MAX_PENDING {
                let k = (t, key.to_owned());
                // Touches are few (a quarter of `expire` apart per session): skip the hash.
                if !p.touches.is_empty() {
                    p.touches.remove(&k);
                }
                p.stores.insert(k, name);
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            first
        };
        // A new session goes to stickd (and on to the peers) at once, not after a timer: the
        // first store wakes the flusher, and the stores made while its call is in flight form
        // the next batch. Under load the batches grow by themselves, with no added delay.
        if first {
            self.wake.notify_one();
        }
    }

    /// Entries held for table `t`, expired ones not swept yet included: one lock per shard,
    /// no walk.
    pub fn held(&self, t: usize) -> usize {
        self.counts(t).entries as usize
    }

    /// Entries, hits and misses of table `t`: one lock per shard, no walk (for metrics).
    pub fn counts(&self, t: usize) -> TableCounts {
        let table = &self.tables[t];
        let mut c = TableCounts::default();
        for i in 0..SHARDS {
            let s = table.shard_at(i);
            c.entries += s.entries.len() as u64;
            c.hits += s.hits;
            c.misses += s.misses;
        }
        c
    }

    /// Live entries of table `t` (tests); walks the whole table.
    pub fn len(&self, t: usize) -> usize {
        let now = now_ms();
        let table = &self.tables[t];
        (0..SHARDS)
            .map(|i| {
                table
                    .shard_at(i)
                    .entries
                    .iter()
                    .filter(|e| e.expires_ms > now)
                    .count()
            })
            .sum()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Everything buffered for stickd, taken out (what a flush sends).
    pub fn take_pending(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

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
        tokio::spawn(watch_loop(self.clone(), socket.clone(), stop.clone(), tx));
        tokio::spawn(flush_loop(self.clone(), socket, stop.clone()));
        tokio::spawn(sweep_loop(self.clone(), stop));
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r.map(|()| true),
            Ok(Err(_)) | Err(_) => Ok(false),
        }
    }

    /// Learns the tables' types, expiry and key length from stickd's ListTables; names the
    /// first table that stickd lacks or has with a type the rules cannot use.
    pub fn check_tables(&self, have: &[pb::TableInfo]) -> Result<(), StickError> {
        for t in &self.tables {
            let Some(info) = have.iter().find(|i| i.name == t.name) else {
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: "not defined in stickd".into(),
                });
            };
            let ok = match t.kind {
                KeyKind::Text => info.r#type == "string",
                KeyKind::Address => info.r#type == "ip" || info.r#type == "ipv6",
            };
            if !ok {
                let want = match t.kind {
                    KeyKind::Text => "string (for a cookie)",
                    KeyKind::Address => "ip or ipv6 (for src)",
                };
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: format!("type {} in stickd, {want} needed", info.r#type),
                });
            }
            t.expire_ms.store(info.expire_ms, Ordering::Relaxed);
            t.max_len.store(
                if info.r#type == "string" {
                    u64::from(info.len)
                } else {
                    0
                },
                Ordering::Relaxed,
            );
            t.ipv6.store(info.r#type == "ipv6", Ordering::Relaxed);
        }
        Ok(())
    }

    /// Replaces table `t` with a snapshot; unsent local stores stay on top.
    fn install_snapshot(&self, t: usize, entries: Vec<pb::Entry>) {
        let table = &self.tables[t];
        let now = now_ms();
        let mut fresh: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        for e in entries {
            if !e.deleted && e.expires_unix_ms > now {
                let hash = table.hash(&e.key);
                let shard = &mut fresh[(hash >> 32) as usize % SHARDS];
                shard.upsert(
                    &table.hasher,
                    hash,
                    &e.key,
                    &e.server,
                    e.expires_unix_ms,
                    e.version,
                );
            }
        }
        let pending: Vec<(String, Arc<str>)> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.stores
                .iter()
                .filter(|((ti, _), _)| *ti == t)
                .map(|((_, k), s)| (k.clone(), s.clone()))
                .collect()
        };
        let expires = now.saturating_add(table.life_ms().max(1000));
        for (k, s) in pending {
            let hash = table.hash(&k);
            fresh[(hash >> 32) as usize % SHARDS].upsert(&table.hasher, hash, &k, &s, expires, 0);
        }
        // Shard by shard: a lookup meanwhile sees either the old or the new copy of its key.
        for (i, shard) in fresh.into_iter().enumerate() {
            let mut old = table.shard_at(i);
            old.entries = shard.entries;
            old.servers = shard.servers;
        }
    }

    /// Applies entries from stickd's Watch stream (changes, local and remote): an entry that
    /// is deleted or expired goes, any other replaces the cached one, except while a local
    /// store of the same key is still unsent.
    pub fn apply(&self, t: usize, entries: Vec<pb::Entry>) {
        let table = &self.tables[t];
        let now = now_ms();
        let unsent: HashSet<String> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.stores.is_empty() {
                HashSet::new()
            } else {
                entries
                    .iter()
                    .filter(|e| p.stores.contains_key(&(t, e.key.clone())))
                    .map(|e| e.key.clone())
                    .collect()
            }
        };
        for e in entries {
            // Our own newer store is on its way to stickd: it wins, as it will there.
            if unsent.contains(&e.key) {
                continue;
            }
            let hash = table.hash(&e.key);
            let mut shard = table.shard(hash);
            if e.deleted || e.expires_unix_ms <= now {
                shard.remove(hash, &e.key);
            } else if !shard.upsert(
                &table.hasher,
                hash,
                &e.key,
                &e.server,
                e.expires_unix_ms,
                e.version,
            ) {
                tracing::warn!(table = %table.name, "too many server names in the stick cache, entry not cached");
            }
        }
    }

    fn clear(&self, t: usize, version: u64) {
        let table = &self.tables[t];
        for i in 0..SHARDS {
            table
                .shard_at(i)
                .entries
                .retain(|e| e.version >= version && e.version != 0);
        }
    }

    /// One sweep step: visits up to `budget` buckets from where the last step stopped (all
    /// tables, shard after shard, each locked only for its part) and drops expired entries.
    /// Returns how many went. A shard that grew meanwhile may have moved some entries past
    /// or before the cursor: they are found by the next pass (or by the lookup that hits them).
    pub fn sweep_step(&self, budget: usize) -> usize {
        let now = now_ms();
        let mut at = self.sweep_at.lock().unwrap_or_else(|p| p.into_inner());
        let (mut t, mut s, mut b) = *at;
        let mut left = budget;
        let mut removed = 0;
        // Bounded even when every table is empty: one visit of each shard at most.
        let mut shards_seen = 0;
        while left > 0 && !self.tables.is_empty() && shards_seen <= self.tables.len() * SHARDS {
            if t >= self.tables.len() {
                t = 0;
            }
            let mut shard = self.tables[t].shard_at(s);
            let end = shard.entries.num_buckets().min(b + left);
            for i in b..end {
                if let Ok(o) = shard.entries.get_bucket_entry(i)
                    && o.get().expires_ms <= now
                {
                    o.remove();
                    removed += 1;
                }
            }
            left -= end.saturating_sub(b).max(1);
            if end >= shard.entries.num_buckets() {
                b = 0;
                s += 1;
                shards_seen += 1;
                if s == SHARDS {
                    s = 0;
                    t += 1;
                }
            } else {
                b = end;
            }
        }
        *at = (t, s, b);
        removed
    }
}

async fn connect(socket: &std::path::Path) -> Result<StickClient<Channel>, String> {
    let ch = common::grpc::connect_unix(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    Ok(StickClient::new(ch))
}

enum WatchEnd {
    Stopped,
    Lost(String),
    Refused(StickError),
}

async fn watch_loop(
    cache: Arc<StickCache>,
    socket: PathBuf,
    stop: CancellationToken,
    first: oneshot::Sender<Result<(), StickError>>,
) {
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let end = watch_once(&cache, &socket, &stop, &mut first).await;
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

async fn flush_loop(cache: Arc<StickCache>, socket: PathBuf, stop: CancellationToken) {
    let mut client: Option<StickClient<Channel>> = None;
    let mut backoff = Duration::from_millis(50);
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
        match flush(&cache, c).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, pending = cache.pending_len(), "cannot write to stickd, will resend");
                client = None;
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Drops expired entries a bounded step at a time, whether stickd is up or not.
async fn sweep_loop(cache: Arc<StickCache>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        cache.sweep_step(SWEEP_BUCKETS);
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Sends everything pending; on failure the unsent part goes back (behind newer writes).
async fn flush(cache: &StickCache, client: &mut StickClient<Channel>) -> Result<(), String> {
    let taken = cache.take_pending();
    let mut stores: Vec<Vec<pb::StoreItem>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for ((t, key), server) in &taken.stores {
        stores[*t].push(pb::StoreItem {
            key: key.clone(),
            server: server.to_string(),
            expires_unix_ms: 0,
        });
    }
    let mut touches: Vec<Vec<String>> = cache.tables.iter().map(|_| Vec::new()).collect();
    for (t, key) in &taken.touches {
        touches[*t].push(key.clone());
    }
    let result = async {
        for (t, items) in stores.into_iter().enumerate() {
            for chunk in items.chunks(BATCH) {
                let n = chunk.len() as u64;
                let req = pb::StoreRequest {
                    table: cache.tables[t].name.clone(),
                    items: chunk.to_vec(),
                };
                match client.store(req).await {
                    Ok(_) => {}
                    // A refused item (e.g. a key stickd finds invalid) would be resent for ever.
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        tracing::warn!(table = %cache.tables[t].name, error = %s.message(), "stickd refused a batch of stores; dropped");
                    }
                    Err(s) => return Err(format!("Store: {}", s.message())),
                }
                cache.stats.stores_sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        for (t, keys) in touches.into_iter().enumerate() {
            for chunk in keys.chunks(BATCH) {
                let n = chunk.len() as u64;
                let req = pb::TouchRequest {
                    table: cache.tables[t].name.clone(),
                    keys: chunk.to_vec(),
                };
                match client.touch(req).await {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {}
                    Err(s) => return Err(format!("Touch: {}", s.message())),
                }
                cache.stats.touches_sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // Resend everything (stores are idempotent), newer writes made meanwhile win.
        let mut p = cache.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in taken.stores {
            if p.len() >= MAX_PENDING {
                cache.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.stores.entry(k).or_insert(v);
        }
        for k in taken.touches {
            if p.len() >= MAX_PENDING {
                break;
            }
            if !p.stores.contains_key(&k) {
                p.touches.insert(k);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> StickCache {
        let c = StickCache::new(vec![("t".into(), KeyKind::Text)]);
        c.tables[0].expire_ms.store(60_000, Ordering::Relaxed);
        c
    }

    #[test]
    fn stores_are_read_at_once_and_buffered_once() {
        let c = cache();
        assert!(c.lookup(0, "k").is_none());
        c.store(0, "k", "app1");
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        c.store(0, "k", "app1");
        assert_eq!(c.pending_len(), 1);
        c.store(0, "k", "app2");
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        assert_eq!(c.pending_len(), 1);
        let n = c.counts(0);
        assert_eq!((n.hits, n.misses, n.entries), (2, 1, 1));
    }

    #[test]
    fn touches_are_coalesced() {
        let c = cache();
        let now = now_ms();
        c.apply(
            0,
            vec![pb::Entry {
                key: "k".into(),
                server: "app1".into(),
                expires_unix_ms: now + 60_000,
                version: 7,
                ..Default::default()
            }],
        );
        for _ in 0..1000 {
            assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        }
        // Refreshed by stickd just now: no touch is due for a quarter of the expire.
        assert_eq!(c.pending_len(), 0);
        // A quarter of the expire and a bit later: one touch is due.
        c.with_slot(0, "k", |e| e.expires_ms -= 16_000);
        for _ in 0..1000 {
            c.lookup(0, "k");
        }
        assert_eq!(c.pending_len(), 1);
    }

    #[test]
    fn unsent_stores_win_over_watch_and_snapshot() {
        let c = cache();
        c.store(0, "k", "app2");
        let e = |server: &str| pb::Entry {
            key: "k".into(),
            server: server.into(),
            expires_unix_ms: now_ms() + 60_000,
            version: 9,
            ..Default::default()
        };
        c.apply(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        c.install_snapshot(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        // Once sent, stickd's view is applied.
        c.take_pending();
        c.apply(0, vec![e("app1")]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
        let mut gone = e("app1");
        gone.deleted = true;
        c.apply(0, vec![gone]);
        assert!(c.lookup(0, "k").is_none());
    }

    #[test]
    fn expired_entries_and_long_keys() {
        let c = cache();
        c.apply(
            0,
            vec![pb::Entry {
                key: "old".into(),
                server: "app1".into(),
                expires_unix_ms: now_ms() - 1,
                version: 1,
                ..Default::default()
            }],
        );
        assert!(c.lookup(0, "old").is_none());
        c.tables[0].max_len.store(4, Ordering::Relaxed);
        c.store(0, "toolong", "app1");
        assert!(c.lookup(0, "toolong").is_none());
        assert_eq!(c.pending_len(), 0);
    }

    impl StickCache {
        fn with_slot(&self, t: usize, key: &str, f: impl FnOnce(&mut Slot)) {
            let table = &self.tables[t];
            let hash = table.hash(key);
            let mut shard = table.shard(hash);
            f(shard
                .entries
                .find_mut(hash, |e| e.key.is(key))
                .expect("cached"));
        }
    }

    fn entry(key: &str, server: &str, expires_unix_ms: i64) -> pb::Entry {
        pb::Entry {
            key: key.into(),
            server: server.into(),
            expires_unix_ms,
            version: 3,
            ..Default::default()
        }
    }

    /// A 26-character PHPSESSID-like key (PHP's default: 26 characters of 0-9a-v).
    fn session_key(n: u64) -> String {
        let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..26)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b"0123456789abcdefghijklmnopqrstuv"[(x % 32) as usize])
            })
            .collect()
    }

    #[test]
    fn memory_per_entry_stays_under_the_target() {
        const N: usize = 100_000;
        let c = cache();
        let keys: Vec<String> = (0..N as u64).map(session_key).collect();
        let expires = now_ms() + 600_000;
        let before = crate::sys::CountingAlloc::thread_bytes();
        for chunk in keys.chunks(10_000) {
            let batch = chunk
                .iter()
                .enumerate()
                .map(|(i, k)| entry(k, if i % 2 == 0 { "app1" } else { "app2" }, expires))
                .collect();
            c.apply(0, batch);
        }
        let per_entry = (crate::sys::CountingAlloc::thread_bytes() - before) as f64 / N as f64;
        assert_eq!(std::mem::size_of::<Slot>(), 56);
        assert_eq!(c.held(0), N);
        // Issue 4: at most 120 bytes + key per cached entry.
        assert!(
            per_entry - 26.0 <= 120.0,
            "{per_entry:.1} bytes per entry of a 26-byte key"
        );
        // And a hit costs no allocation (the server name is an interned Arc).
        let before = crate::sys::CountingAlloc::thread_bytes();
        let mut allocs = 0;
        for k in keys.iter().take(1000) {
            let b = crate::sys::CountingAlloc::thread_bytes();
            let got = c.lookup(0, k);
            allocs += usize::from(crate::sys::CountingAlloc::thread_bytes() != b);
            assert!(got.is_some());
        }
        assert_eq!(allocs, 0);
        assert_eq!(crate::sys::CountingAlloc::thread_bytes(), before);
    }

    #[test]
    fn the_sweep_goes_a_bounded_step_at_a_time() {
        let c = cache();
        let now = now_ms();
        // 20 000 expired entries (slipped past a lookup's check: expired after the apply)
        // and 100 live ones.
        let batch = (0..20_000)
            .map(|i| entry(&session_key(i), "app1", now + 60_000))
            .chain((20_000..20_100).map(|i| entry(&session_key(i), "app2", now + 600_000)))
            .collect();
        c.apply(0, batch);
        for i in 0..20_000 {
            c.with_slot(0, &session_key(i), |e| e.expires_ms = now - 1);
        }
        let buckets: usize = (0..SHARDS)
            .map(|s| c.tables[0].shard_at(s).entries.num_buckets())
            .sum();
        let mut steps = 0;
        let mut removed = 0;
        while c.held(0) > 100 {
            let r = c.sweep_step(1000);
            // A step never visits more than its budget of buckets, so never removes more.
            assert!(r <= 1000, "a step removed {r}");
            removed += r;
            steps += 1;
            assert!(
                steps <= buckets / 1000 + SHARDS + 1,
                "the sweep does not advance"
            );
        }
        assert_eq!(removed, 20_000);
        // The first steps cannot have done it all at once.
        assert!(steps >= 20_000 / 1000, "{steps} steps");
        assert_eq!(c.len(0), 100);
        for i in 20_000..20_100 {
            assert_eq!(c.lookup(0, &session_key(i)).as_deref(), Some("app2"));
        }
        // Empty and idle tables cost a bounded step too.
        let idle = cache();
        assert_eq!(idle.sweep_step(SWEEP_BUCKETS), 0);
    }

    /// The lookup's prefetch guesses hashbrown's layout: most entries must sit in the first
    /// group of buckets their probe visits, starting at the guessed home bucket.
    #[test]
    fn prefetch_hints_point_at_the_buckets_lookups_read() {
        let h = RandomState::default();
        let mut shard = Shard::default();
        let now = now_ms();
        let keys: Vec<String> = (0..20_000).map(session_key).collect();
        for k in &keys {
            assert!(shard.upsert(&h, hash_key(&h, k.as_bytes()), k, "app1", now + 60_000, 1));
        }
        let size = std::mem::size_of::<Slot>();
        let (mut home, mut first_group) = (0, 0);
        for k in &keys {
            let hash = hash_key(&h, k.as_bytes());
            let (_, guess) = shard
                .entries
                .allocator()
                .probe_start::<Slot>(hash)
                .expect("a table");
            let at =
                shard.entries.find(hash, |e| e.key.is(k)).expect("stored") as *const Slot as usize;
            // Buckets are laid out in reverse: probe step i is `i` buckets below home.
            if at <= guess && (guess - at).is_multiple_of(size) {
                let step = (guess - at) / size;
                home += usize::from(step == 0);
                first_group += usize::from(step < 16);
            }
        }
        assert!(
            first_group * 10 >= keys.len() * 9,
            "{first_group} of {} in the first group",
            keys.len()
        );
        assert!(home * 4 >= keys.len(), "{home} of {} at home", keys.len());
    }

    #[test]
    fn server_names_are_interned_per_shard() {
        let c = cache();
        let now = now_ms();
        c.apply(
            0,
            (0..1000)
                .map(|i| {
                    entry(
                        &session_key(i),
                        ["a", "b", "c"][i as usize % 3],
                        now + 60_000,
                    )
                })
                .collect(),
        );
        for s in 0..SHARDS {
            assert!(c.tables[0].shard_at(s).servers.len() <= 3);
        }
        let a1 = c.lookup(0, &session_key(0)).expect("hit");
        let a2 = c.lookup(0, &session_key(3)).expect("hit");
        assert_eq!(&*a1, "a");
        assert_eq!(&*a2, "a");
        // Names no entry uses are dropped when the list is compacted.
        let mut shard = Shard::default();
        let h = RandomState::default();
        for i in 0..10 {
            assert!(shard.upsert(&h, hash_key(&h, b"k"), "k", &format!("s{i}"), now + 1000, 1));
        }
        assert_eq!(shard.servers.len(), 10);
        shard.compact_servers();
        assert_eq!(shard.servers.len(), 1);
        let e = shard.entries.iter().next().expect("one entry");
        assert_eq!(&*shard.servers[usize::from(e.server)], "s9");
    }

    #[test]
    fn clear_keeps_only_newer_entries() {
        let c = cache();
        let now = now_ms();
        let mut newer = entry("new", "app1", now + 60_000);
        newer.version = 10;
        c.apply(0, vec![entry("old", "app1", now + 60_000), newer]);
        c.store(0, "mine", "app2");
        c.clear(0, 5);
        assert!(c.lookup(0, "old").is_none());
        assert!(c.lookup(0, "mine").is_none());
        assert_eq!(c.lookup(0, "new").as_deref(), Some("app1"));
    }

    #[test]
    fn table_types_are_checked() {
        let c = StickCache::new(vec![
            ("t".into(), KeyKind::Text),
            ("ips".into(), KeyKind::Address),
        ]);
        let info = |name: &str, ty: &str| pb::TableInfo {
            name: name.into(),
            r#type: ty.into(),
            len: 32,
            expire_ms: 1000,
            ..Default::default()
        };
        let e = c
            .check_tables(&[info("t", "string")])
            .expect_err("ips missing");
        assert!(e.to_string().contains("'ips'"), "{e}");
        let e = c
            .check_tables(&[info("t", "integer"), info("ips", "ip")])
            .expect_err("wrong type");
        assert!(
            e.to_string().contains("'t'") && e.to_string().contains("integer"),
            "{e}"
        );
        c.check_tables(&[info("t", "string"), info("ips", "ipv6")])
            .expect("compatible");
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(c.address_key(1, ip).as_deref(), Some("::ffff:10.0.0.1"));
    }
}
