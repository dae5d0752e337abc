//! One stick table in memory: its shards, each a hash table of compact entries and the
//! server names they share, and what stickd said about the table (expiry, key length, type).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use common::stick_key::KeyType;

use super::KeyKind;
use super::alloc::TableAlloc;

/// Shards per table (a power of two). Few enough that a big cache's shards reach the 2 MiB
/// from which their tables go on huge pages (past some 460k entries a table); enough that a
/// lookup, which holds its shard's mutex for some 40 ns, seldom waits: 32 threads making 1M
/// lookups/s each would find a shard busy 8 % of the time.
pub const SHARDS: usize = 16;
/// Expiry assumed for a table until stickd has described it (only stores exist then).
const UNKNOWN_EXPIRE_MS: i64 = 300_000;

/// Keys up to this long live in the entry itself: no allocation of their own (whose malloc
/// overhead would cost more than the key) and no pointer to chase on a lookup.
const INLINE_KEY: usize = 30;

/// A key: inline up to [`INLINE_KEY`] bytes (PHP's 26-character session ids, 24-character
/// ASP.NET ids, addresses), boxed beyond. 32 bytes either way.
#[derive(Debug)]
pub(super) enum SlotKey {
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

    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            SlotKey::Inline(n, b) => &b[..usize::from(*n)],
            SlotKey::Boxed(k) => k.as_bytes(),
        }
    }

    pub(super) fn is(&self, key: &str) -> bool {
        self.as_bytes() == key.as_bytes()
    }
}

/// Keys are hashed as bytes, whichever form they are kept in.
pub(super) fn hash_key(hasher: &RandomState, key: &[u8]) -> u64 {
    hasher.hash_one(key)
}

/// One cached entry: 56 bytes (32 key + 8 + 8 + 2, padded), the key included up to
/// [`INLINE_KEY`] bytes.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) key: SlotKey,
    /// Absolute, in Unix ms (stickd's expiry, or ours for a store it has not echoed yet). A
    /// touch pushes it to `now + expire`, so `expires_ms - expire` is when it was last
    /// refreshed: no separate field is needed to coalesce touches.
    pub(super) expires_ms: i64,
    /// stickd's version; 0 for a local store not echoed yet.
    pub(super) version: u64,
    /// Index into the shard's `servers`.
    pub(super) server: u16,
}

/// A part of a table: the entries whose key hashes here, and the server names they use.
#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) entries: HashTable<Slot, TableAlloc>,
    /// Interned names: an entry holds an index, a lookup lends the name.
    pub(super) servers: Vec<Arc<str>>,
    /// Lookups that found a live entry, and the others: counted under the shard's lock, so
    /// that threads do not contend on one shared counter's cache line.
    pub(super) hits: u64,
    pub(super) misses: u64,
}

impl Shard {
    /// The index of `name`, added if new; `None` only if 65536 names are in use at once.
    pub(super) fn intern(&mut self, name: &str) -> Option<u16> {
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

    pub(super) fn compact_servers(&mut self) {
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
    pub(super) fn upsert(
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

    pub(super) fn upsert_at(
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
            // A table that has just grown is filled now (see `TableAlloc::advise_huge`).
            self.entries.allocator().advise_huge();
        }
    }

    pub(super) fn remove(&mut self, hash: u64, key: &str) {
        if let Ok(o) = self.entries.find_entry(hash, |e| e.key.is(key)) {
            o.remove();
        }
    }
}

#[derive(Debug)]
pub struct Table {
    pub name: String,
    pub(super) kind: KeyKind,
    /// From stickd (ListTables); until known, [`UNKNOWN_EXPIRE_MS`] is assumed.
    pub(super) expire_ms: AtomicU64,
    /// Longest key (string tables); 0: unknown or not a string table.
    pub(super) max_len: AtomicU64,
    pub(super) ipv6: AtomicBool,
    /// Seeded at random per process and per table (foldhash, hashbrown's own default): cookie
    /// values come from clients, who must not be able to aim their keys at one probe sequence
    /// or one shard, and who never see a hash. SipHash took three times as long on a session id.
    pub(super) hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Table {
    pub(super) fn new(name: String, kind: KeyKind) -> Table {
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

    /// The table's key type as far as stickd has told it (ListTables): a string table of
    /// unknown length takes any length until then.
    pub(super) fn key_type(&self) -> KeyType {
        match self.kind {
            KeyKind::Text => match self.max_len.load(Ordering::Relaxed) {
                0 => KeyType::String { len: u32::MAX },
                len => KeyType::String {
                    len: u32::try_from(len).unwrap_or(u32::MAX),
                },
            },
            KeyKind::Address if self.ipv6.load(Ordering::Relaxed) => KeyType::Ipv6,
            KeyKind::Address => KeyType::Ip,
        }
    }

    pub(super) fn hash(&self, key: &str) -> u64 {
        hash_key(&self.hasher, key.as_bytes())
    }

    /// The shard of a hash. hashbrown places by the low bits and filters by the top 7: the
    /// shard takes bits 32.. so that neither loses entropy within a shard.
    pub(super) fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        self.shard_at((hash >> 32) as usize % SHARDS)
    }

    pub(super) fn shard_at(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long an entry lives after a store or a touch.
    pub(super) fn life_ms(&self) -> i64 {
        match self.expire_ms.load(Ordering::Relaxed) {
            0 => UNKNOWN_EXPIRE_MS,
            ms => i64::try_from(ms).unwrap_or(i64::MAX / 4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stick::testing::{cache, entry, session_key};
    use common::time::coarse_now_ms;

    /// The lookup's prefetch guesses hashbrown's layout: most entries must sit in the first
    /// group of buckets their probe visits, starting at the guessed home bucket.
    #[test]
    fn prefetch_hints_point_at_the_buckets_lookups_read() {
        let h = RandomState::default();
        let mut shard = Shard::default();
        let now = coarse_now_ms();
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
        let now = coarse_now_ms();
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
}
