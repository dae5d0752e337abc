//! The cache proper: lookups and local stores on the request path, the buffer of writes for
//! stickd, and stickd's snapshots and changes applied on top of it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;
use proto::stick::v1 as pb;
use tokio::sync::Notify;

use super::sent::{Sent, Store, Stores};
use super::table::{SHARDS, Shard, Slot, Table};
use common::time::coarse_now_ms;

use super::KeyKind;

/// Unsent writes kept while stickd is away; beyond this new ones are dropped (and counted).
pub const MAX_PENDING: usize = 100_000;

#[derive(Debug, Default)]
pub struct Pending {
    // foldhash as in the tables: a store hashes its key here too, on a new session's path.
    pub(super) stores: Stores,
    pub(super) touches: HashSet<(usize, String), RandomState>,
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
    pub(super) pending: Mutex<Pending>,
    /// What was sent and is not yet shown applied on the Watch stream (locked after `pending`).
    pub(super) sent: Mutex<Sent>,
    pub(super) wake: Notify,
    /// Where the sweep resumes: table, shard, bucket.
    pub(super) sweep_at: Mutex<(usize, usize, usize)>,
    pub stats: StickStats,
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
    pub fn new(tables: Vec<(String, KeyKind)>) -> StickCache {
        StickCache {
            tables: tables
                .into_iter()
                .map(|(name, kind)| Table::new(name, kind))
                .collect(),
            pending: Mutex::new(Pending::default()),
            sent: Mutex::new(Sent::default()),
            wake: Notify::new(),
            sweep_at: Mutex::new((0, 0, 0)),
            stats: StickStats::default(),
        }
    }

    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.name == name)
    }

    /// The server stuck to `key`, if a live entry exists; schedules a coalesced touch.
    pub fn lookup(&self, t: usize, key: &str) -> Option<Arc<str>> {
        self.lookup_with(t, key, Arc::clone)
    }

    /// [`lookup`](Self::lookup) that lends the server's name to `f` (under the shard's lock:
    /// keep it short) instead of cloning it. Allocates nothing unless a touch is due.
    pub fn lookup_with<R>(&self, t: usize, key: &str, f: impl FnOnce(&Arc<str>) -> R) -> Option<R> {
        let table = &self.tables[t];
        let now = coarse_now_ms();
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
        if let Err(e) = common::stick_key::canonical(table.key_type(), key) {
            // stickd refuses it (never truncates): keep it out of the buffer.
            tracing::debug!(table = %table.name, key_len = key.len(), error = %e, "key refused by the table, not stored");
            return;
        }
        let now = coarse_now_ms();
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
        // first store wakes the flusher. Under a steady flow, the stores made while a call is
        // in flight or just after it go together in the next (see `flush::STORE_GATHER`).
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
        let now = coarse_now_ms();
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

    /// Stores taken out that stickd may not have: buffered again to be resent (stores are
    /// idempotent), behind the writes made meanwhile, which win. Touches likewise, unless a
    /// store of the same key is buffered.
    pub(super) fn put_back(
        &self,
        stores: impl IntoIterator<Item = Store>,
        touches: impl IntoIterator<Item = (usize, String)>,
    ) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in stores {
            if p.len() >= MAX_PENDING {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.stores.entry(k).or_insert(v);
        }
        for k in touches {
            if p.len() >= MAX_PENDING {
                break;
            }
            if !p.stores.contains_key(&k) {
                p.touches.insert(k);
            }
        }
    }

    /// Replaces table `t` with a snapshot; unsent local stores stay on top.
    pub(super) fn install_snapshot(&self, t: usize, entries: Vec<pb::Entry>) {
        let table = &self.tables[t];
        let now = coarse_now_ms();
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

    pub(super) fn sent(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies entries from stickd's Watch stream (changes, local and remote): an entry that
    /// is deleted or expired goes, any other replaces the cached one, except while a local
    /// store of the same key is unsent, or sent and not yet shown applied (see `sent`).
    pub fn apply(&self, t: usize, entries: Vec<pb::Entry>) {
        let table = &self.tables[t];
        let now = coarse_now_ms();
        let outranked: HashSet<String> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let sent = self.sent();
            if p.stores.is_empty() && sent.is_empty() {
                HashSet::new()
            } else {
                entries
                    .iter()
                    .filter(|e| {
                        let k = (t, e.key.clone());
                        p.stores.contains_key(&k) || sent.contains(&k)
                    })
                    .map(|e| e.key.clone())
                    .collect()
            }
        };
        for e in entries {
            // Our own newer store is on its way to stickd, or there after this change: it wins,
            // as it does there.
            if outranked.contains(&e.key) {
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

    /// stickd cleared table `t` (entries below `version` are gone there). Local stores that
    /// are unsent, or sent and not yet shown applied, stay: stickd applies them after the clear.
    /// Those shown applied, which stickd did not echo (version 0), were applied before it.
    pub(super) fn clear(&self, t: usize, version: u64) {
        let table = &self.tables[t];
        let keep: HashSet<Vec<u8>> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let sent = self.sent();
            p.stores
                .keys()
                .filter(|(ti, _)| *ti == t)
                .map(|(_, k)| k.as_str())
                .chain(sent.keys(t))
                .map(|k| k.as_bytes().to_vec())
                .collect()
        };
        for i in 0..SHARDS {
            table.shard_at(i).entries.retain(|e| {
                (e.version >= version && e.version != 0) || keep.contains(e.key.as_bytes())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stick::alloc::CountingAlloc;
    use crate::stick::testing::{cache, entry, session_key};

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
        let now = coarse_now_ms();
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
            expires_unix_ms: coarse_now_ms() + 60_000,
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
    fn expired_entries_and_refused_keys_are_not_kept() {
        let c = cache();
        c.apply(
            0,
            vec![pb::Entry {
                key: "old".into(),
                server: "app1".into(),
                expires_unix_ms: coarse_now_ms() - 1,
                version: 1,
                ..Default::default()
            }],
        );
        assert!(c.lookup(0, "old").is_none());
        c.tables[0].max_len.store(4, Ordering::Relaxed);
        c.store(0, "toolong", "app1");
        assert!(c.lookup(0, "toolong").is_none());
        // stickd refuses control characters in keys: they never reach its buffer either.
        c.store(0, "a\nb", "app1");
        assert!(c.lookup(0, "a\nb").is_none());
        c.store(0, "ok", "app1");
        assert!(c.lookup(0, "ok").is_some());
        assert_eq!(c.pending_len(), 1);
    }

    #[test]
    fn memory_per_entry_stays_under_the_target() {
        const N: usize = 100_000;
        let c = cache();
        let keys: Vec<String> = (0..N as u64).map(session_key).collect();
        let expires = coarse_now_ms() + 600_000;
        let before = CountingAlloc::thread_bytes();
        for chunk in keys.chunks(10_000) {
            let batch = chunk
                .iter()
                .enumerate()
                .map(|(i, k)| entry(k, if i % 2 == 0 { "app1" } else { "app2" }, expires))
                .collect();
            c.apply(0, batch);
        }
        let per_entry = (CountingAlloc::thread_bytes() - before) as f64 / N as f64;
        assert_eq!(std::mem::size_of::<Slot>(), 56);
        assert_eq!(c.held(0), N);
        // The memory target: at most 120 bytes + key per cached entry.
        assert!(
            per_entry - 26.0 <= 120.0,
            "{per_entry:.1} bytes per entry of a 26-byte key"
        );
        // And a hit costs no allocation (the server name is an interned Arc).
        let before = CountingAlloc::thread_bytes();
        let mut allocs = 0;
        for k in keys.iter().take(1000) {
            let b = CountingAlloc::thread_bytes();
            let got = c.lookup(0, k);
            allocs += usize::from(CountingAlloc::thread_bytes() != b);
            assert!(got.is_some());
        }
        assert_eq!(allocs, 0);
        assert_eq!(CountingAlloc::thread_bytes(), before);
    }

    #[test]
    fn sent_stores_win_until_the_stream_shows_them_applied() {
        let c = cache();
        assert!(c.sent().restart(5).is_empty());
        c.store(0, "k", "app2");
        let ids = c
            .sent()
            .hold(c.take_pending().stores)
            .expect("a numbered stream");
        let remote = entry("k", "app1", coarse_now_ms() + 60_000);
        // Applied in stickd before our store, which outranks it there.
        c.apply(0, vec![remote.clone()]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app2"));
        // After the marker, a change is newer than our store.
        c.sent().applied(ids.watcher, ids.batch);
        c.apply(0, vec![remote]);
        assert_eq!(c.lookup(0, "k").as_deref(), Some("app1"));
    }

    #[test]
    fn clear_keeps_newer_entries_and_stores_applied_after_it() {
        let c = cache();
        let now = coarse_now_ms();
        let mut newer = entry("new", "app1", now + 60_000);
        newer.version = 10;
        c.apply(0, vec![entry("old", "app1", now + 60_000), newer]);
        assert!(c.sent().restart(1).is_empty());
        // Shown applied before the clear: gone with it.
        c.store(0, "applied", "app2");
        let ids = c
            .sent()
            .hold(c.take_pending().stores)
            .expect("a numbered stream");
        c.sent().applied(ids.watcher, ids.batch);
        // Sent, not yet shown applied; and not sent yet: stickd applies both after the clear.
        c.store(0, "sent", "app2");
        c.sent()
            .hold(c.take_pending().stores)
            .expect("a numbered stream");
        c.store(0, "unsent", "app2");
        c.clear(0, 5);
        assert!(c.lookup(0, "old").is_none());
        assert!(c.lookup(0, "applied").is_none());
        assert_eq!(c.lookup(0, "new").as_deref(), Some("app1"));
        assert_eq!(c.lookup(0, "sent").as_deref(), Some("app2"));
        assert_eq!(c.lookup(0, "unsent").as_deref(), Some("app2"));
    }
}
