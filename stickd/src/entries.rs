//! One table's entries in memory: records in a slab, a hash index of slots by key, and an ordered set of (expiry, slot).
//!
//! The layout is for tables of millions of entries. A record and its key sit in one slab slot;
//! the index holds 4-byte slot numbers (a tenth of what a map of keys to records takes, so most
//! of it stays in the CPU's caches), and the expiry order holds (expiry, slot) pairs, not key
//! copies. A snapshot walks the expiry order and reads the slab: records written in time order
//! sit in slot order, so that walk reads memory mostly in sequence instead of one random access
//! per key. Slots are reused after a removal and never move, so a slot number stays valid for
//! as long as its entry is there.

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::store::Rec;

/// A record with its key.
struct Slot {
    key: Box<str>,
    rec: Rec,
}

/// A table's entries (see the module's doc). Keys are unique; every method keeps the index, the
/// expiry order and the slab in step.
pub(crate) struct Entries {
    slots: Vec<Option<Slot>>,
    /// Empty slots, reused before the slab grows (the slab never holds more slots than the
    /// table has held entries at once, which its size bounds).
    free: Vec<u32>,
    /// Occupied slots, hashed by their key.
    index: HashTable<u32>,
    /// Seeded at random per process and table: keys come from clients, who never see a hash and
    /// so cannot aim theirs at one probe sequence.
    hasher: foldhash::fast::RandomState,
    /// The entries nearest to expiry first; the slot breaks ties (many entries share a
    /// millisecond).
    by_expiry: BTreeSet<(i64, u32)>,
}

/// Where a key is, or the hash to insert it with (see [`Entries::find`]).
pub(crate) enum Found {
    At(u32),
    Vacant(u64),
}

impl Entries {
    pub fn new() -> Entries {
        Entries {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Room for `more` entries beyond those there, made once instead of growing step by step.
    pub fn reserve(&mut self, more: usize) {
        let Entries {
            slots,
            free,
            index,
            hasher,
            ..
        } = self;
        slots.reserve(more.saturating_sub(free.len()));
        index.reserve(more, |&i| hash_slot(hasher, slots, i));
    }

    /// The slot of `key`, or the hash that [`Self::insert_new`] takes.
    pub fn find(&self, key: &str) -> Found {
        let hash = self.hasher.hash_one(key);
        match self.index.find(hash, |&i| self.key_is(i, key)) {
            Some(&i) => Found::At(i),
            None => Found::Vacant(hash),
        }
    }

    fn key_is(&self, slot: u32, key: &str) -> bool {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| *s.key == *key)
    }

    pub fn get(&self, key: &str) -> Option<&Rec> {
        match self.find(key) {
            Found::At(i) => self.at(i).map(|(_, r)| r),
            Found::Vacant(_) => None,
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        matches!(self.find(key), Found::At(_))
    }

    /// The entry in `slot`, if there is one.
    pub fn at(&self, slot: u32) -> Option<(&str, &Rec)> {
        let s = self.slots.get(slot as usize)?.as_ref()?;
        Some((&s.key, &s.rec))
    }

    /// Slots numbered below this one may hold entries (for a walk in slot order).
    pub fn slot_end(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Rec)> {
        self.slots
            .iter()
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
    pub fn insert_new(&mut self, hash: u64, key: Box<str>, rec: Rec) -> u32 {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.by_expiry.insert((rec.expires, slot));
        self.slots[slot as usize] = Some(Slot { key, rec });
        let Entries {
            slots,
            index,
            hasher,
            ..
        } = self;
        index.insert_unique(hash, slot, |&i| hash_slot(hasher, slots, i));
        slot
    }

    /// Replaces the record in `slot` (which holds an entry) and returns the old one.
    pub fn replace(&mut self, slot: u32, rec: Rec) -> Option<Rec> {
        let s = self.slots.get_mut(slot as usize)?.as_mut()?;
        if s.rec.expires != rec.expires {
            self.by_expiry.remove(&(s.rec.expires, slot));
            self.by_expiry.insert((rec.expires, slot));
        }
        Some(std::mem::replace(&mut s.rec, rec))
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
        let hash = self.hasher.hash_one(key);
        let Entries { slots, index, .. } = self;
        let found = index.find_entry(hash, |&i| {
            slots
                .get(i as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| *s.key == *key)
        });
        let (slot, _) = found.ok()?.remove();
        self.vacate(slot).map(|(_, r)| r)
    }

    /// Removes the entry nearest to expiry, with its key.
    pub fn pop_first(&mut self) -> Option<(Box<str>, Rec)> {
        let &(_, slot) = self.by_expiry.first()?;
        let s = self.slots.get(slot as usize)?.as_ref()?;
        let hash = self.hasher.hash_one(&*s.key);
        if let Ok(e) = self.index.find_entry(hash, |&i| i == slot) {
            e.remove();
        }
        self.vacate(slot)
    }

    /// Empties `slot` (already out of the index).
    fn vacate(&mut self, slot: u32) -> Option<(Box<str>, Rec)> {
        let s = self.slots.get_mut(slot as usize)?.take()?;
        self.by_expiry.remove(&(s.rec.expires, slot));
        self.free.push(slot);
        Some((s.key, s.rec))
    }
}

fn hash_slot(hasher: &foldhash::fast::RandomState, slots: &[Option<Slot>], slot: u32) -> u64 {
    slots
        .get(slot as usize)
        .and_then(Option::as_ref)
        .map_or(0, |s| hasher.hash_one(&*s.key))
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
