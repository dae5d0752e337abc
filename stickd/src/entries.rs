//! One table's entries in memory: records in a paged slab, a hash index of slots by key, and an ordered set of (expiry, slot).
//!
//! The layout is for tables of millions of entries. A record and its key sit in one slab slot;
//! the index holds a slot number and 32 bits of its key's hash (8 bytes, a twelfth of what a map
//! of keys to records takes, so most of it stays in the CPU's caches), and the expiry order
//! holds (expiry, slot) pairs, not key copies. A snapshot walks the expiry order and reads the
//! slab: records written in time order sit in slot order, so that walk reads memory mostly in
//! sequence instead of one random access per key. Slots are reused after a removal and never
//! move, so a slot number stays valid for as long as its entry is there.
//!
//! Growing never stalls on the table's size: the slab grows a page of slots at a time (nothing
//! is copied), and the index rehashes from the hashes it holds (reading no key). A map of keys
//! rehashes by reading every key, a random memory access each: ~100 ms at half a million
//! entries, during which no write or replicated change could be applied.

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::record::Rec;

/// A record with its key.
struct Slot {
    key: Box<str>,
    rec: Rec,
}

/// Slots per slab page (288 KiB of records).
const PAGE: usize = 4096;

/// A table's entries (see the module's doc). Keys are unique; every method keeps the index, the
/// expiry order and the slab in step.
pub(crate) struct Entries {
    /// Pages of `PAGE` slots; slots below `slot_end` exist.
    pages: Vec<Box<[Option<Slot>]>>,
    slot_end: u32,
    /// Empty slots below `slot_end`, reused first (the slab never holds more slots than the
    /// table has held entries at once, which its size bounds).
    free: Vec<u32>,
    /// Occupied slots with the 32 bits of their key's hash that [`spread`] makes the index's.
    index: HashTable<(u32, u32)>,
    /// Seeded at random per process and table: keys come from clients, who never see a hash and
    /// so cannot aim theirs at one probe sequence.
    hasher: foldhash::fast::RandomState,
    /// The entries nearest to expiry first; the slot breaks ties (many entries share a
    /// millisecond).
    by_expiry: BTreeSet<(i64, u32)>,
}

/// Where a key is, or its hash to insert it with (see [`Entries::find`]).
pub(crate) enum Found {
    At(u32),
    Vacant(u32),
}

/// The index's 64-bit hash from the 32 bits it keeps: hashbrown picks the bucket from the low
/// bits and filters a probe with the top 7, which the copy puts in the high half.
fn spread(h: u32) -> u64 {
    (u64::from(h) << 32) | u64::from(h)
}

impl Entries {
    pub fn new() -> Entries {
        Entries {
            pages: Vec::new(),
            slot_end: 0,
            free: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn hash(&self, key: &str) -> u32 {
        let h = self.hasher.hash_one(key);
        (h ^ (h >> 32)) as u32
    }

    /// Room for `more` entries beyond those there, made once instead of growing step by step.
    pub fn reserve(&mut self, more: usize) {
        self.index.reserve(more, |&(_, h)| spread(h));
        let slots = (self.slot_end as usize + more.saturating_sub(self.free.len())).div_ceil(PAGE);
        self.pages.reserve(slots.saturating_sub(self.pages.len()));
    }

    fn slot(&self, slot: u32) -> Option<&Slot> {
        let i = slot as usize;
        self.pages.get(i / PAGE)?.get(i % PAGE)?.as_ref()
    }

    fn slot_mut(&mut self, slot: u32) -> Option<&mut Option<Slot>> {
        let i = slot as usize;
        self.pages.get_mut(i / PAGE)?.get_mut(i % PAGE)
    }

    /// The slot of `key`, or the hash that [`Self::insert_new`] takes.
    pub fn find(&self, key: &str) -> Found {
        let h = self.hash(key);
        let hit = self
            .index
            .find(spread(h), |&(i, ih)| ih == h && self.key_is(i, key));
        match hit {
            Some(&(i, _)) => Found::At(i),
            None => Found::Vacant(h),
        }
    }

    fn key_is(&self, slot: u32, key: &str) -> bool {
        self.slot(slot).is_some_and(|s| *s.key == *key)
    }

    pub fn get(&self, key: &str) -> Option<&Rec> {
        match self.find(key) {
            Found::At(i) => self.at(i).map(|(_, r)| r),
            Found::Vacant(_) => None,
        }
    }

    #[cfg(test)]
    pub fn contains_key(&self, key: &str) -> bool {
        matches!(self.find(key), Found::At(_))
    }

    /// The entry in `slot`, if there is one.
    pub fn at(&self, slot: u32) -> Option<(&str, &Rec)> {
        self.slot(slot).map(|s| (&*s.key, &s.rec))
    }

    /// Slots numbered below this one may hold entries (for a walk in slot order).
    pub fn slot_end(&self) -> u32 {
        self.slot_end
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Rec)> {
        self.pages
            .iter()
            .flat_map(|p| p.iter())
            .filter_map(|s| s.as_ref().map(|s| (&*s.key, &s.rec)))
    }

    /// The slots of every entry, nearest expiry first.
    pub fn slots_by_expiry(&self) -> Vec<u32> {
        self.by_expiry.iter().map(|&(_, slot)| slot).collect()
    }

    /// The nearest expiry.
    pub fn first_expiry(&self) -> Option<i64> {
        self.by_expiry.first().map(|&(expires, _)| expires)
    }

    /// A key that [`Self::find`] did not find, with the hash it returned.
    pub fn insert_new(&mut self, hash: u32, key: Box<str>, rec: Rec) -> u32 {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slot_end as usize == self.pages.len() * PAGE {
                    self.pages.push((0..PAGE).map(|_| None).collect());
                }
                self.slot_end += 1;
                self.slot_end - 1
            }
        };
        self.by_expiry.insert((rec.expires, slot));
        if let Some(s) = self.slot_mut(slot) {
            *s = Some(Slot { key, rec });
        }
        self.index
            .insert_unique(spread(hash), (slot, hash), |&(_, h)| spread(h));
        slot
    }

    /// Replaces the record in `slot` (which holds an entry) and returns the old one.
    pub fn replace(&mut self, slot: u32, rec: Rec) -> Option<Rec> {
        let s = self.slot_mut(slot)?.as_mut()?;
        let old = std::mem::replace(&mut s.rec, rec);
        let new = s.rec.expires;
        if old.expires != new {
            self.by_expiry.remove(&(old.expires, slot));
            self.by_expiry.insert((new, slot));
        }
        Some(old)
    }

    /// Inserts or replaces; returns the record replaced.
    pub fn insert(&mut self, key: &str, rec: Rec) -> Option<Rec> {
        match self.find(key) {
            Found::At(slot) => self.replace(slot, rec),
            Found::Vacant(hash) => {
                self.insert_new(hash, Box::from(key), rec);
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Rec> {
        let h = self.hash(key);
        let &(slot, _) = self
            .index
            .find(spread(h), |&(i, ih)| ih == h && self.key_is(i, key))?;
        self.vacate(slot, h).map(|(_, r)| r)
    }

    /// Removes the entry nearest to expiry, with its key.
    pub fn pop_first(&mut self) -> Option<(Box<str>, Rec)> {
        let &(_, slot) = self.by_expiry.first()?;
        let h = self.hash(&self.slot(slot)?.key);
        self.vacate(slot, h)
    }

    /// Empties `slot`, whose key hashes to `h`: out of the index, the expiry order and the slab.
    fn vacate(&mut self, slot: u32, h: u32) -> Option<(Box<str>, Rec)> {
        if let Ok(e) = self.index.find_entry(spread(h), |&(i, _)| i == slot) {
            e.remove();
        }
        let s = self.slot_mut(slot)?.take()?;
        self.by_expiry.remove(&(s.rec.expires, slot));
        self.free.push(slot);
        Some((s.key, s.rec))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn rec(expires: i64, server: &str) -> Rec {
        Rec {
            server: Arc::from(server),
            expires,
            version: 1,
            origin: Arc::from("n1"),
            deleted: false,
        }
    }

    /// Every structure agrees with a plain map after a mix of inserts, replaces and removals.
    #[test]
    fn index_slab_and_expiry_order_stay_in_step() {
        let mut e = Entries::new();
        let mut model = std::collections::BTreeMap::new();
        for round in 0..3i64 {
            for i in 0..2000i64 {
                let key = format!("k{}", (i * 7919 + round * 13) % 2500);
                let r = rec(1000 + (i * 31 + round) % 500, &format!("s{}", i % 3));
                e.insert(&key, r.clone());
                model.insert(key, r);
            }
            for i in 0..700i64 {
                let key = format!("k{}", (i * 104_729 + round) % 2500);
                assert_eq!(e.remove(&key), model.remove(&key), "{key}");
            }
            for _ in 0..100 {
                let (key, r) = e.pop_first().expect("entries left");
                let min = model.values().map(|r| r.expires).min();
                assert_eq!(Some(r.expires), min, "nearest expiry first");
                assert_eq!(model.remove(&*key), Some(r));
            }
        }
        assert_eq!(e.len(), model.len());
        for (k, r) in &model {
            assert_eq!(e.get(k), Some(r), "{k}");
        }
        let mut seen: Vec<_> = e.iter().map(|(k, r)| (k.to_owned(), r.clone())).collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<_> = model.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
        assert_eq!(seen, want);
        let order: Vec<i64> = e
            .slots_by_expiry()
            .into_iter()
            .map(|s| e.at(s).expect("slot in use").1.expires)
            .collect();
        assert_eq!(order.len(), model.len());
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "expiry order");
        // Removed slots are reused: the slab is no bigger than the most entries held at once.
        assert!(e.slot_end() as usize <= 2500);
    }

    /// Past one slab page and through index growth (which rehashes from the kept hashes).
    #[test]
    fn many_entries_span_pages_and_survive_growth() {
        let mut e = Entries::new();
        let n = 3 * PAGE + 17;
        for i in 0..n {
            e.insert(&format!("key-{i}"), rec(i as i64, "s"));
        }
        for i in (0..n).step_by(2) {
            assert!(e.remove(&format!("key-{i}")).is_some());
        }
        for i in 0..n / 2 {
            e.insert(&format!("new-{i}"), rec(-(i as i64), "t"));
        }
        assert_eq!(e.len(), n - n.div_ceil(2) + n / 2);
        for i in 0..n {
            let want = (i % 2 == 1).then(|| rec(i as i64, "s"));
            assert_eq!(e.get(&format!("key-{i}")).cloned(), want, "key-{i}");
        }
        for i in 0..n / 2 {
            assert_eq!(e.get(&format!("new-{i}")), Some(&rec(-(i as i64), "t")));
        }
        // Freed slots were reused: no page was added for the new keys.
        assert_eq!(e.slot_end() as usize, n);
        assert_eq!(e.iter().count(), e.len());
        assert_eq!(e.first_expiry(), Some(-((n / 2 - 1) as i64)));
    }

    #[test]
    fn reserve_keeps_what_is_there() {
        let mut e = Entries::new();
        e.insert("a", rec(5, "s1"));
        e.reserve(100_000);
        e.insert("b", rec(4, "s2"));
        assert_eq!(e.get("a"), Some(&rec(5, "s1")));
        assert_eq!(e.first_expiry(), Some(4));
        assert!(!e.contains_key("c"));
        assert_eq!(e.remove("c"), None);
    }
}
