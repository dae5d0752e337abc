//! What replication writes to and reads from the tables.
//!
//! A peer's changes and snapshot chunks merge by LWW; a peer is sent snapshots of the tables,
//! and the writes of its own that it lost.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::stick::v1 as pb;

use super::queue::Journal;
use super::tables::{self, Merged, Merging};
use super::{Event, Inner, Store, StoreError};
use common::time::now_ms;

/// After a snapshot chunk that is not the last, checkpoints wait this long for the next one.
const SNAPSHOT_QUIET_MS: i64 = 2000;

/// A meta record that comes with a batch of a peer's changes and must reach the disk after
/// their data, never before (sled recovers a prefix of its writes): the peer's position in its
/// log, which a crash must never leave ahead of the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub key: String,
    pub value: Vec<u8>,
}

/// One table of a snapshot in the making (see `Store::snapshot_keys`).
pub struct SnapshotTable {
    pub name: String,
    pub cleared_version: u64,
    pub cleared_origin: String,
    /// Where the table's entries are, nearest expiry first (see `Store::snapshot_entries`).
    pub slots: Vec<u32>,
}

impl Store {
    /// Applies changes received from a peer, then queues `mark` (its position), in this order
    /// so that a crash never leaves the position ahead of the data.
    pub fn apply_remote(
        &self,
        changes: Vec<pb::Change>,
        skip_tables: &[String],
        mark: Option<Mark>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let mut m = Merging {
            now: now_ms(),
            // Under the lock, as `watch` subscribes under it: no watcher can slip in between.
            watched: self.events.receiver_count() > 0,
            journal: Journal::default(),
            evicted: &self.counters.evicted,
        };
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
                    match tables::merge(tables, names, &c.table, e, &mut m) {
                        Ok(Merged::Applied(e)) => {
                            applied += 1;
                            let Some(e) = e else { continue };
                            match events.last_mut() {
                                Some(Event::Changes { table, entries, .. })
                                    if **table == *c.table =>
                                {
                                    entries.push(e);
                                }
                                _ => events.push(Event::Changes {
                                    table: Arc::from(c.table.as_str()),
                                    entries: vec![e],
                                    writer: None,
                                }),
                            }
                        }
                        // A key that does not fit our definition: the handshake should have
                        // caught it; skip the entry rather than the whole stream.
                        Ok(Merged::Ignored) => ignored += 1,
                        Err(e) if e.is_bad_key() => ignored += 1,
                        Err(e) => {
                            self.pending.append(&mut m.journal);
                            return Err(e);
                        }
                    }
                }
                Some(pb::change::Kind::Cleared(cl)) => {
                    self.pending.append(&mut m.journal);
                    inner.hlc.observe(cl.version);
                    self.apply_clear(&mut inner, &cl);
                    events.push(Event::Cleared(cl));
                }
                None => {}
            }
        }
        self.pending.append(&mut m.journal);
        self.count_remote(applied, ignored);
        if let Some(mark) = mark {
            self.pending.meta(mark.key.into_bytes(), mark.value);
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
    /// `mark` (the position a last chunk completes) is queued after the chunk's writes.
    pub fn apply_snapshot(
        &self,
        chunk: pb::SnapshotChunk,
        mark: Option<Mark>,
    ) -> Result<(), StoreError> {
        let pb::SnapshotChunk {
            table,
            entries,
            cleared_version,
            cleared_origin,
            last,
            through_seq: _,
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
            self.apply_clear(&mut inner, &cl);
            events.push(Event::Cleared(cl));
        }
        if let Some(max) = entries.iter().map(|e| e.version).max() {
            inner.hlc.observe(max);
        }
        let mut m = Merging {
            now,
            watched,
            // About what the chunk's writes take, so that the buffer grows once.
            journal: Journal::with_capacity(entries.len() * 64),
            evicted: &self.counters.evicted,
        };
        let mut changed = Vec::new();
        let (mut applied, mut ignored) = (0, 0);
        let Inner { tables, names, .. } = &mut *inner;
        for e in entries {
            match tables::merge(tables, names, &table, e, &mut m) {
                Ok(Merged::Applied(e)) => {
                    applied += 1;
                    changed.extend(e);
                }
                Ok(Merged::Ignored) => ignored += 1,
                Err(e) if e.is_bad_key() => ignored += 1,
                Err(e) => {
                    self.pending.append(&mut m.journal);
                    return Err(e);
                }
            }
        }
        self.pending.append(&mut m.journal);
        self.count_remote(applied, ignored);
        if let Some(mark) = mark {
            self.pending.meta(mark.key.into_bytes(), mark.value);
        }
        if last {
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
                writer: None,
            });
        }
        for ev in events {
            self.publish(&inner, ev);
        }
        Ok(())
    }

    /// The start of a snapshot of `tables`: the slots of their entries and the log head they
    /// correspond to. `snapshot_entries` then copies them a chunk at a time, so that the store's
    /// lock is held for one chunk, never for a whole table. An entry stays in its slot for as
    /// long as it is there (see [`crate::entries::Entries`]); a key written after this point is
    /// in the log after the head, which follows the snapshot, and one written meanwhile may
    /// arrive twice (or a slot emptied and reused may send another key than planned), which LWW
    /// makes harmless.
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, item};
    use super::*;

    #[test]
    fn lww_converges_in_any_order_and_touch_keeps_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Store::open(&config(dir.path(), "a", "")).expect("open a");
        let b = Store::open(&config(dir.path(), "b", "")).expect("open b");
        let ea = a.store("web", &[item("k", "s1")]).expect("a");
        let eb = b.store("web", &[item("k", "s2")]).expect("b");
        let ca = a.read_log(1, 10).expect("log a");
        let cb = b.read_log(1, 10).expect("log b");
        a.apply_remote(cb, &[], None).expect("apply");
        b.apply_remote(ca, &[], None).expect("apply");
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
    }
}
