//! Where replication stands with each peer, kept across restarts.
//!
//! `received`: how far the peer's log has been applied here, which it resumes from. `acked`:
//! how far it has acknowledged ours, shown by ShowPeers.
//!
//! Both live in the store's meta tree. A received position is queued with the data it covers
//! and reaches the disk after it (see `store::Mark`): a crash may lose a position, never leave
//! one ahead of its data.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use proto::stick::v1 as pb;

use crate::disk::u64_at;
use crate::store::{Mark, Store, StoreError};

/// Meta key prefixes.
const RECEIVED: &str = "recv/";
const ACKED: &str = "acked/";

/// Per peer: (epoch, sequence) of its log applied here.
pub struct Positions {
    received: Mutex<HashMap<String, (u64, u64)>>,
}

impl Positions {
    /// The received positions the store holds.
    pub fn load(store: &Store) -> Result<Positions, StoreError> {
        let received = store
            .meta_scan(RECEIVED)?
            .into_iter()
            .map(|(peer, v)| {
                (
                    peer,
                    (u64_at(&v, 0).unwrap_or(0), u64_at(&v, 8).unwrap_or(0)),
                )
            })
            .collect();
        Ok(Positions {
            received: Mutex::new(received),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last (epoch, sequence) of `peer`'s log applied here ((0, 0) when nothing was).
    pub fn received(&self, peer: &str) -> (u64, u64) {
        self.lock().get(peer).copied().unwrap_or((0, 0))
    }

    /// The record of `peer`'s position, for the store to write after the data it covers.
    fn mark(peer: &str, epoch: u64, seq: u64) -> Mark {
        let mut value = epoch.to_be_bytes().to_vec();
        value.extend_from_slice(&seq.to_be_bytes());
        Mark {
            key: format!("{RECEIVED}{peer}"),
            value,
        }
    }

    /// Applies changes received from `peer`'s log of `epoch`, then records `through` as its
    /// position.
    pub fn apply_remote(
        &self,
        store: &Store,
        peer: &str,
        epoch: u64,
        changes: Vec<pb::Change>,
        skip_tables: &[String],
        through: u64,
    ) -> Result<(), StoreError> {
        let mark = Self::mark(peer, epoch, through);
        store.apply_remote(changes, skip_tables, Some(mark))?;
        self.lock().insert(peer.to_owned(), (epoch, through));
        Ok(())
    }

    /// Applies one chunk of `peer`'s snapshot. The position moves only with the last chunk: an
    /// interrupted snapshot starts over.
    pub fn apply_snapshot(
        &self,
        store: &Store,
        peer: &str,
        epoch: u64,
        chunk: pb::SnapshotChunk,
    ) -> Result<(), StoreError> {
        let through = chunk.last.then_some(chunk.through_seq);
        let mark = through.map(|seq| Self::mark(peer, epoch, seq));
        store.apply_snapshot(chunk, mark)?;
        if let Some(seq) = through {
            self.lock().insert(peer.to_owned(), (epoch, seq));
        }
        Ok(())
    }

    /// The position `peer` last acknowledged in our log, as persisted (0 when unknown).
    pub fn acked(store: &Store, peer: &str) -> u64 {
        store
            .meta_get(&format!("{ACKED}{peer}"))
            .ok()
            .flatten()
            .and_then(|v| u64_at(&v, 0))
            .unwrap_or(0)
    }

    /// Persists the position `peer` acknowledged in our log (for ShowPeers after a restart).
    pub fn set_acked(store: &Store, peer: &str, seq: u64) -> Result<(), StoreError> {
        store.meta_put(&format!("{ACKED}{peer}"), &seq.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::Event;
    use crate::store::testing::{config, entry, item, reopen};
    use common::time::now_ms;

    #[test]
    fn snapshot_chunks_merge_by_lww_evict_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        let now = now_ms();
        let far = now + 600_000;
        {
            let s = Store::open(&c).expect("open");
            let positions = Positions::load(&s).expect("positions");
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
            positions.apply_snapshot(&s, "b", 42, chunk).expect("apply");
            assert_eq!(positions.received("b"), (42, 9));
            // A batch moves the position too, even one without changes; an unknown peer has none.
            positions
                .apply_remote(&s, "c", 7, Vec::new(), &[], 3)
                .expect("apply");
            assert_eq!(positions.received("c"), (7, 3));
            assert_eq!(positions.received("d"), (0, 0));
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
        let positions = Positions::load(&s).expect("positions");
        assert_eq!(positions.received("b"), (42, 9));
        assert_eq!(positions.received("c"), (7, 3));
    }
}
