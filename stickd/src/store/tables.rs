//! One stick table in memory: its entries, the LWW merge, eviction, and loading at start-up.
//!
//! Nothing here touches sled: every write is queued for the writer (see `queue`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::stick_key::{self, KeyError};
use proto::stick::v1 as pb;

use super::error::StoreError;
use super::queue::{Journal, Pending};
use crate::config::TableDef;
use crate::entries::{Entries, Found};
use crate::limits::MAX_SERVER_LEN;
use crate::record::{Names, Rec};

pub(super) struct Table {
    pub def: TableDef,
    pub name: Arc<str>,
    pending: Arc<Pending>,
    pub entries: Entries,
    pub live: u64,
    pub cleared_version: u64,
    pub cleared_origin: String,
}

/// What merging a peer's entry did: nothing, or applied it (with the event for watchers).
pub(super) enum Merged {
    Ignored,
    Applied(Option<pb::Entry>),
}

/// What the merges of one batch of a peer's entries share.
pub(super) struct Merging<'a> {
    pub now: i64,
    /// Whether anyone watches: the events for watchers are built only then.
    pub watched: bool,
    /// The batch's table writes, handed to the queue by the caller (see `Table::merge`).
    pub journal: Journal,
    /// Counts the entries evicted to make room.
    pub evicted: &'a AtomicU64,
}

impl Table {
    pub fn new(def: &TableDef, pending: Arc<Pending>) -> Table {
        Table {
            def: def.clone(),
            name: Arc::from(def.name.as_str()),
            pending,
            entries: Entries::new(),
            live: 0,
            cleared_version: 0,
            cleared_origin: String::new(),
        }
    }

    /// The table's expire in milliseconds.
    pub fn expire_ms(&self) -> i64 {
        i64::try_from(self.def.expire.as_millis()).unwrap_or(i64::MAX)
    }

    /// Checks a key against the table's type and returns its canonical text.
    pub fn key(&self, key: &str) -> Result<String, StoreError> {
        stick_key::canonical(self.def.key, key)
            .map(std::borrow::Cow::into_owned)
            .map_err(|e| self.key_error(e))
    }

    /// [`Table::key`] of a key we own: a string key is checked and kept, not copied.
    fn key_owned(&self, key: String) -> Result<String, StoreError> {
        stick_key::canonical_owned(self.def.key, key).map_err(|e| self.key_error(e))
    }

    fn key_error(&self, source: KeyError) -> StoreError {
        StoreError::Key {
            table: self.def.name.clone(),
            source,
        }
    }

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
    pub fn remove_first(&mut self) -> bool {
        let Some((key, old)) = self.entries.pop_first() else {
            return false;
        };
        if !old.deleted {
            self.live -= 1;
        }
        self.pending.entry(&self.name, &key, None);
        true
    }

    pub fn remove(&mut self, key: &str) -> Option<Rec> {
        let old = self.unset(key);
        if old.is_some() {
            self.pending.entry(&self.name, key, None);
        }
        old
    }

    /// A local write (a store, a touch, a tombstone), with one lookup of its key. The write for
    /// sled goes to `j`; an eviction hands `j` to the queue first, so that the queue keeps the
    /// order of the changes (as in `merge`).
    pub fn put(&mut self, key: String, rec: Rec, j: &mut Journal, evicted: &AtomicU64) {
        match self.entries.find(&key) {
            Found::At(slot) => {
                j.entry(&self.name, &key, Some(&rec));
                self.replace_at(slot, rec);
            }
            Found::Vacant(hash) => {
                if self.entries.len() as u64 >= self.def.size {
                    self.pending.append(j);
                    self.make_room(evicted);
                }
                j.entry(&self.name, &key, Some(&rec));
                self.insert_at(hash, key.into_boxed_str(), rec);
            }
        }
    }

    /// Replaces the record in `slot`, keeping the live count right.
    fn replace_at(&mut self, slot: u32, rec: Rec) {
        if !rec.deleted {
            self.live += 1;
        }
        if let Some(old) = self.entries.replace(slot, rec)
            && !old.deleted
        {
            self.live -= 1;
        }
    }

    /// Inserts a key the table does not hold (`hash` from `Entries::find`), keeping the live
    /// count right.
    fn insert_at(&mut self, hash: u32, key: Box<str>, rec: Rec) {
        if !rec.deleted {
            self.live += 1;
        }
        self.entries.insert_new(hash, key, rec);
    }

    /// Evicts the entries nearest to expiry until one more fits.
    pub fn make_room(&mut self, evicted: &AtomicU64) {
        while self.entries.len() as u64 >= self.def.size && self.remove_first() {
            evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Merges one entry from a peer by LWW on (version, origin); the same write with a later
    /// expiry (a touch) replaces it. The caller has checked the table's clear and the expiry.
    /// The write for sled goes to `m.journal`, which the caller hands to the queue; an eviction
    /// hands it over first, so that the queue keeps the order of the changes.
    fn merge(&mut self, key: String, e: &pb::Entry, rec: Rec, m: &mut Merging<'_>) -> Merged {
        let (now, watched) = (m.now, m.watched);
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
                    return Merged::Ignored;
                };
                match (rec.version, &*rec.origin).cmp(&(old.version, &*old.origin)) {
                    std::cmp::Ordering::Less => return Merged::Ignored,
                    // The same write, touched: the later expiry wins.
                    std::cmp::Ordering::Equal if rec.expires <= old.expires => {
                        return Merged::Ignored;
                    }
                    _ => {}
                }
                m.journal.entry(&self.name, k, Some(&rec));
                self.replace_at(slot, rec);
            }
            Found::Vacant(hash) if (self.entries.len() as u64) < self.def.size => {
                m.journal.entry(&self.name, &key, Some(&rec));
                let event = event(&key);
                self.insert_at(hash, key.into_boxed_str(), rec);
                return Merged::Applied(event);
            }
            Found::Vacant(_) => {
                // The evictions go to the queue after the writes before them.
                self.pending.append(&mut m.journal);
                self.make_room(m.evicted);
                m.journal.entry(&self.name, &key, Some(&rec));
                self.set(&key, rec);
            }
        }
        Merged::Applied(event(&key))
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

    pub fn info(&self) -> pb::TableInfo {
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

/// Merges one entry from a peer by LWW into `table`, if we have it. The entry is taken by value
/// so that its key moves into the table instead of being copied (its server and origin are
/// shared names); the event for watchers is built only when someone watches. Table writes go to
/// `m.journal` (see `Table::merge`).
pub(super) fn merge(
    tables: &mut HashMap<String, Table>,
    names: &mut Names,
    table: &str,
    mut e: pb::Entry,
    m: &mut Merging<'_>,
) -> Result<Merged, StoreError> {
    let Some(t) = tables.get_mut(table) else {
        return Ok(Merged::Ignored);
    };
    if e.version <= t.cleared_version || e.expires_unix_ms <= m.now {
        return Ok(Merged::Ignored);
    }
    let key = t.key_owned(std::mem::take(&mut e.key))?;
    // The origin already bounded the expiry by the table's expire; twice that leaves room
    // for clocks that disagree, and still no peer can send an entry that never expires.
    e.expires_unix_ms = e
        .expires_unix_ms
        .min(m.now.saturating_add(t.expire_ms().saturating_mul(2)));
    let rec = Rec {
        server: names.get(&e.server),
        expires: e.expires_unix_ms,
        version: e.version,
        origin: names.get(&e.origin),
        deleted: e.deleted,
    };
    Ok(t.merge(key, &e, rec, m))
}

/// Refuses an empty or over-long server name.
pub(super) fn check_server(def: &TableDef, key: &str, server: &str) -> Result<(), StoreError> {
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

/// The configured tables as start-up fills them from disk (expired records left out), and the
/// highest version read, which the clock must start above.
pub(super) struct Loading {
    pub tables: HashMap<String, Table>,
    pub names: Names,
    pub max_version: u64,
    now: i64,
}

/// Loads the records of one table (see [`Loading::table`]).
pub(super) struct Loader<'a> {
    table: &'a mut Table,
    names: &'a mut Names,
    max_version: &'a mut u64,
    now: i64,
}

impl Loading {
    pub fn new(defs: &[TableDef], pending: &Arc<Pending>, now: i64) -> Loading {
        Loading {
            tables: defs
                .iter()
                .map(|d| (d.name.clone(), Table::new(d, pending.clone())))
                .collect(),
            names: Names::default(),
            max_version: 0,
            now,
        }
    }

    /// Table `name`'s last clear, as recorded on disk.
    pub fn cleared(&mut self, name: &str, version: u64, origin: String) {
        if let Some(t) = self.tables.get_mut(name) {
            t.cleared_version = version;
            t.cleared_origin = origin;
            self.max_version = self.max_version.max(version);
        }
    }

    /// Where the records of table `name` go; `None` when it is not configured.
    pub fn table(&mut self, name: &str) -> Option<Loader<'_>> {
        Some(Loader {
            table: self.tables.get_mut(name)?,
            names: &mut self.names,
            max_version: &mut self.max_version,
            now: self.now,
        })
    }

    /// The newest version `local` wrote that the tables hold (entries and clears).
    pub fn own_max(&self, local: &str) -> u64 {
        self.tables
            .values()
            .flat_map(|t| {
                let cleared = (t.cleared_origin == local).then_some(t.cleared_version);
                t.entries
                    .iter()
                    .filter(|(_, r)| *r.origin == *local)
                    .map(|(_, r)| r.version)
                    .chain(cleared)
            })
            .max()
            .unwrap_or(0)
    }
}

impl Loader<'_> {
    /// One record (or its removal, `None`) read from disk, in the order written.
    pub fn load(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        let version = self.table.load(key, value, self.now, self.names)?;
        *self.max_version = (*self.max_version).max(version);
        Ok(())
    }
}
