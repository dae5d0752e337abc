//! Local writes (Store, Touch, Delete, Clear) and the expiry sweep.
//!
//! Every local write is logged for the peers; the sweep is not: expiry is absolute, so every
//! node sweeps the same entries by itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::stick::v1 as pb;

use super::queue::Journal;
use super::tables::check_server;
use super::{Event, Inner, Store, StoreError, Writer, durable};
use crate::record::Rec;
use common::time::now_ms;

/// About what one store's journal write takes (table, key, record), so that a batch's buffer
/// grows once.
const JOURNAL_BYTES_PER_STORE: usize = 96;

/// Where a store's entries go besides the log: back to its caller as well as to the watchers,
/// or to the watchers only, the caller's own stream excepted if it names one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    Returned,
    Unreturned(Option<Writer>),
}

impl Store {
    /// One local write (a store or a tombstone): makes room for a new key, keeps the record and
    /// logs it for the peers, both into `j` (which the caller hands to the queue before it
    /// publishes). Callers count and publish once per call of theirs.
    fn write_local(
        &self,
        inner: &mut Inner,
        table: &str,
        key: String,
        rec: Rec,
        now: i64,
        j: &mut Journal,
    ) -> Result<pb::Entry, StoreError> {
        let entry = rec.to_pb(&key, now);
        let t = inner
            .tables
            .get_mut(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        t.put(key, rec, j, &self.counters.evicted);
        self.append(
            inner,
            pb::Change {
                seq: 0,
                table: table.to_owned(),
                kind: Some(pb::change::Kind::Entry(entry.clone())),
            },
            j,
        );
        Ok(entry)
    }

    /// Stores (key, server) pairs with new versions; returns the entries as stored.
    pub fn store(
        &self,
        table: &str,
        items: &[pb::StoreItem],
    ) -> Result<Vec<pb::Entry>, StoreError> {
        self.store_items(table, items, Stored::Returned)
    }

    /// [`Store::store`] for a writer that keeps what it stores: the entries go to the watchers
    /// without a copy for the caller, and `writer`'s own stream, if it names one, is told where
    /// they were applied instead. Returns how many were stored.
    pub fn store_unreturned(
        &self,
        table: &str,
        items: &[pb::StoreItem],
        writer: Option<Writer>,
    ) -> Result<usize, StoreError> {
        self.store_items(table, items, Stored::Unreturned(writer))
            .map(|_| items.len())
    }

    fn store_items(
        &self,
        table: &str,
        items: &[pb::StoreItem],
        stored: Stored,
    ) -> Result<Vec<pb::Entry>, StoreError> {
        if items.is_empty() {
            return Err(StoreError::Empty("no items"));
        }
        let mut inner = self.lock();
        let t = inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        // Validate the whole batch first: a bad item refuses the batch, nothing half-applied.
        let mut keyed = Vec::with_capacity(items.len());
        for it in items {
            let key = t.key(&it.key)?;
            check_server(&t.def, &key, &it.server)?;
            keyed.push(key);
        }
        let expire = t.expire_ms();
        let now = now_ms();
        let mut out = Vec::with_capacity(items.len());
        let mut j = Journal::with_capacity(items.len() * JOURNAL_BYTES_PER_STORE);
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
            match self.write_local(&mut inner, table, key, rec, now, &mut j) {
                Ok(e) => out.push(e),
                Err(e) => {
                    self.pending.append(&mut j);
                    return Err(e);
                }
            }
        }
        self.pending.append(&mut j);
        self.counters
            .local_writes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        // Checked under the lock, under which `watch` subscribes.
        let watched = self.events.receiver_count() > 0;
        let (entries, returned, writer) = match stored {
            Stored::Returned if watched => (out.clone(), out, None),
            Stored::Returned => (Vec::new(), out, None),
            Stored::Unreturned(writer) if watched => (out, Vec::new(), writer),
            Stored::Unreturned(writer) => (Vec::new(), Vec::new(), writer),
        };
        self.publish(
            &inner,
            Event::Changes {
                table: Arc::from(table),
                entries,
                writer,
            },
        );
        Ok(returned)
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
            .map(|k| t.key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_ms();
        let expires = now.saturating_add(t.expire_ms());
        let mut changed = Vec::new();
        let mut j = Journal::default();
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
            t.put(key, rec, &mut j, &self.counters.evicted);
            self.append(
                &mut inner,
                pb::Change {
                    seq: 0,
                    table: table.to_owned(),
                    kind: Some(pb::change::Kind::Entry(entry.clone())),
                },
                &mut j,
            );
            changed.push(entry);
        }
        self.pending.append(&mut j);
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
                    writer: None,
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
        let key = t.key(key)?;
        let now = now_ms();
        let expire = t.expire_ms();
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
        let mut j = Journal::default();
        let written = self.write_local(&mut inner, table, key, rec, now, &mut j);
        self.pending.append(&mut j);
        let entry = written?;
        self.counters.local_writes.fetch_add(1, Ordering::Relaxed);
        self.publish(
            &inner,
            Event::Changes {
                table: Arc::from(table),
                entries: vec![entry],
                writer: None,
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
        let removed = self.apply_clear(&mut inner, &cleared);
        let mut j = Journal::default();
        self.append(
            &mut inner,
            pb::Change {
                seq: 0,
                table: table.to_owned(),
                kind: Some(pb::change::Kind::Cleared(cleared.clone())),
            },
            &mut j,
        );
        self.pending.append(&mut j);
        self.counters.local_writes.fetch_add(1, Ordering::Relaxed);
        self.publish(&inner, Event::Cleared(cleared));
        Ok((removed, version))
    }

    /// Removes every entry at or below the clear's version; returns how many live ones went.
    pub(super) fn apply_clear(&self, inner: &mut Inner, c: &pb::TableCleared) -> u64 {
        let Some(t) = inner.tables.get_mut(&c.table) else {
            return 0;
        };
        if (c.version, c.origin.as_str()) <= (t.cleared_version, t.cleared_origin.as_str()) {
            return 0;
        }
        let doomed: Vec<String> = t
            .entries
            .iter()
            .filter(|(_, r)| r.version <= c.version)
            .map(|(k, _)| k.to_owned())
            .collect();
        let mut removed = 0;
        for k in doomed {
            if t.remove(&k).is_some_and(|r| !r.deleted) {
                removed += 1;
            }
        }
        t.cleared_version = c.version;
        t.cleared_origin.clone_from(&c.origin);
        let (key, value) = durable::clear_record(c);
        self.pending.meta(key, value);
        removed
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
}

#[cfg(test)]
mod tests {
    use common::stick_key::KeyError;

    use super::super::testing::{config, item};
    use super::*;

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
            Err(StoreError::Key {
                source: KeyError::TooLong { .. },
                ..
            })
        ));
        assert!(matches!(
            s.store("ips", &[item("10.0.0.300", "s")]),
            Err(StoreError::Key {
                source: KeyError::Bad { .. },
                ..
            })
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
    fn delete_and_clear_beat_older_values() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Store::open(&config(dir.path(), "a", "")).expect("open a");
        let b = Store::open(&config(dir.path(), "b", "")).expect("open b");
        b.store("web", &[item("old", "s")]).expect("b");
        let old = b.read_log(1, 10).expect("log");
        // a has seen the value, then deletes it; a late duplicate must not resurrect it.
        a.apply_remote(old.clone(), &[], None).expect("value");
        assert_eq!(a.lookup("web", &["old".into()]).expect("a").len(), 1);
        a.delete("web", "old").expect("delete");
        a.apply_remote(old.clone(), &[], None)
            .expect("late old value");
        assert!(a.lookup("web", &["old".into()]).expect("a").is_empty());
        a.store("web", &[item("x", "s")]).expect("a");
        a.clear("web").expect("clear");
        let log = a.read_log(1, 10).expect("log");
        b.apply_remote(log.clone(), &[], None).expect("apply");
        assert!(
            b.lookup("web", &["old".into(), "x".into()])
                .expect("b")
                .is_empty()
        );
    }
}
