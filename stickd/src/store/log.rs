//! Our change log: its head, the in-memory tail, epochs, resuming from a position, and trimming.
//!
//! Every local change gets the next sequence number, peers replay the log from the position
//! they have, and it is trimmed to its bound. Each start opens a new epoch of it. The newest records are kept in memory too (the tail), so that pushers rarely read sled.

use std::sync::atomic::Ordering;

use prost::Message;
use proto::stick::v1 as pb;
use tokio::sync::watch;

use super::queue::Journal;
use super::{Inner, Store, StoreError};
use crate::disk::{seq_key, u64_at};

/// The sled tree of log chunks.
pub(super) const TREE: &str = "log_chunks";
/// Meta keys: the current epoch, the earlier ones with their heads, the head at the last flush.
pub(super) const EPOCH: &str = "epoch";
const EPOCHS: &str = "epochs";
pub(super) const HEAD: &str = "head";
/// Log records kept in memory for pushers (older ones are read from sled).
const LOG_TAIL: usize = 256 * 1024;
/// Most log records per sled value (the log is trimmed a chunk at a time).
pub(super) const LOG_CHUNK: usize = 512;
/// Earlier log epochs remembered (one per restart).
const EPOCH_HISTORY: usize = 64;

/// The newest change on disk.
pub(super) fn last_change(log: &sled::Tree) -> Result<Option<pb::Change>, StoreError> {
    let Some((_, v)) = log.last()? else {
        return Ok(None);
    };
    let mut batch = pb::Batch::decode(&*v).map_err(|e| StoreError::Corrupt {
        what: "log".into(),
        reason: e.to_string(),
    })?;
    Ok(batch.changes.pop())
}

/// The version a change carries.
pub(super) fn version_of(c: &pb::Change) -> u64 {
    match &c.kind {
        Some(pb::change::Kind::Entry(e)) => e.version,
        Some(pb::change::Kind::Cleared(c)) => c.version,
        None => 0,
    }
}

/// The log's head at start-up: its newest change's sequence, or the head recorded at the last
/// flush when the log is empty (trimmed, or never written).
pub(super) fn head(meta: &sled::Tree, last: Option<&pb::Change>) -> Result<u64, StoreError> {
    Ok(match last {
        Some(c) => c.seq,
        None => meta
            .get(HEAD)?
            .as_deref()
            .and_then(|b| u64_at(b, 0))
            .unwrap_or(0),
    })
}

/// Every start opens a new epoch of the log. The previous epoch is remembered with the head it
/// reached on disk: a peer that received more than that from it (sequences lost by a kill -9
/// and then reused) must get a snapshot; one that received less resumes. Returns the new epoch
/// and the earlier ones with their heads.
pub(super) fn new_epoch(
    meta: &sled::Tree,
    head: u64,
) -> Result<(u64, Vec<(u64, u64)>), StoreError> {
    let mut history = meta.get(EPOCHS)?.map(|v| v.to_vec()).unwrap_or_default();
    if let Some(prev) = meta.get(EPOCH)?.as_deref().and_then(|b| u64_at(b, 0)) {
        history.extend_from_slice(&prev.to_be_bytes());
        history.extend_from_slice(&head.to_be_bytes());
    }
    let keep = EPOCH_HISTORY * 16;
    if history.len() > keep {
        history.drain(..history.len() - keep);
    }
    let epoch: u64 = rand::random::<u64>() | 1;
    meta.insert(EPOCHS, history.clone())?;
    meta.insert(EPOCH, &epoch.to_be_bytes())?;
    let epochs = history
        .chunks_exact(16)
        .filter_map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
        .collect();
    Ok((epoch, epochs))
}

/// The first sequence the log holds on disk (`head + 1` when it holds none).
pub(super) fn first_seq(log: &sled::Tree, head: u64) -> Result<u64, StoreError> {
    Ok(match log.first()? {
        Some((k, _)) => u64_at(&k, 0).unwrap_or(head + 1),
        None => head + 1,
    })
}

impl Store {
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

    /// Appends a local change to the log: its record goes to `j`, which the caller hands to the
    /// queue before `publish` moves the head watchers and pushers see (the caller holds the
    /// lock throughout).
    pub(super) fn append(&self, inner: &mut Inner, change: pb::Change, j: &mut Journal) {
        inner.head += 1;
        let change = pb::Change {
            seq: inner.head,
            ..change
        };
        j.log.push(&change);
        inner.tail.push_back(change);
    }

    /// Lets the in-memory tail drop records that sled has (through `persisted`), down to its
    /// bound.
    pub(super) fn shrink_tail(&self, persisted: u64) {
        let mut inner = self.lock();
        let keep = usize::try_from(self.log_bound.changes).unwrap_or(usize::MAX);
        while inner.tail.len() > LOG_TAIL.min(keep)
            && inner.tail.front().is_some_and(|c| c.seq <= persisted)
        {
            inner.tail.pop_front();
        }
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, item, reopen};
    use super::*;

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
}
