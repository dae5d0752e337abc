//! The persistence queue: the store's writes waiting for sled, encoded in the order made.
//!
//! Keeping sled off the hot path makes a write cost a few map operations instead of several sled
//! inserts; `Store::persist` hands the queue to sled every few milliseconds, so the durability
//! window grows by that much only.

use std::sync::{Mutex, MutexGuard};

use proto::stick::v1 as pb;

use crate::record::Rec;

/// Writes to sled waiting for the writer (`persist`), in order.
#[derive(Default)]
pub(super) struct Pending {
    queue: Mutex<Queue>,
}

/// Writes made under one hold of the store's lock, handed to the queue at once (see
/// `Pending::append`): table writes encoded as a journal value (see `disk::writes`), and how
/// many, and the log records of local changes.
#[derive(Default)]
pub(super) struct Journal {
    pub buf: Vec<u8>,
    pub writes: usize,
    pub log: LogRecords,
}

impl Journal {
    /// A journal whose buffer holds about `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Journal {
        Journal {
            buf: Vec::with_capacity(bytes),
            ..Journal::default()
        }
    }

    /// A table entry written (`Some`) or gone (`None`), encoded in place (no buffer per write).
    pub fn entry(&mut self, table: &str, key: &str, rec: Option<&Rec>) {
        self.writes += 1;
        let buf = &mut self.buf;
        crate::disk::put_bytes(buf, table.as_bytes());
        crate::disk::put_bytes(buf, key.as_bytes());
        match rec {
            Some(r) => {
                buf.push(1);
                prost::encoding::encode_varint(r.encoded_len() as u64, buf);
                r.encode_into(buf);
            }
            None => buf.push(0),
        }
    }

    fn is_empty(&self) -> bool {
        self.writes == 0 && self.log.seqs.is_empty()
    }
}

/// Records of our change log, encoded back to back in one buffer as the entries of a
/// `pb::Batch` (see `disk::batch_push`), so that a log chunk is a slice of it: no buffer per
/// record, and no copy into a chunk before sled copies it again.
#[derive(Default)]
pub(super) struct LogRecords {
    buf: Vec<u8>,
    /// Each record's sequence and where its encoding ends in `buf`, in sequence order.
    seqs: Vec<(u64, usize)>,
}

impl LogRecords {
    pub fn push(&mut self, change: &pb::Change) {
        prost::encoding::message::encode(1, change, &mut self.buf);
        self.seqs.push((change.seq, self.buf.len()));
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Moves `other`'s records after these.
    fn append(&mut self, other: &mut LogRecords) {
        if self.seqs.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.seqs
            .extend(other.seqs.drain(..).map(|(seq, end)| (seq, base + end)));
        other.buf.clear();
    }

    /// The records as sled values: runs of at most `per_chunk` records, each with the sequence
    /// of its first.
    pub fn chunks(&self, per_chunk: usize) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.seqs.chunks(per_chunk.max(1)).map(move |run| {
            let first = run.first().map_or(0, |&(seq, _)| seq);
            let end = run.last().map_or(start, |&(_, end)| end);
            let bytes = self.buf.get(start..end).unwrap_or_default();
            start = end;
            (first, bytes)
        })
    }
}

/// The queued writes, by kind (`persist` writes them in this order: table writes, log, meta).
#[derive(Default)]
pub(super) struct Queue {
    /// Table writes encoded in place as the next journal value (no allocation per write).
    pub journal: Vec<u8>,
    pub writes: usize,
    /// Records of our change log, in sequence order.
    pub log: LogRecords,
    /// Keys of the meta tree (positions, clears), in order.
    pub meta: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table entry written (`Some`) or gone (`None`).
    pub fn entry(&self, table: &str, key: &str, rec: Option<&Rec>) {
        let mut q = self.lock();
        q.writes += 1;
        let mut j = Journal {
            buf: std::mem::take(&mut q.journal),
            ..Journal::default()
        };
        j.entry(table, key, rec);
        q.journal = j.buf;
    }

    /// Queues the writes and log records of `j` after those already queued, and empties it
    /// (one lock for a whole batch of writes made under the store's lock).
    pub fn append(&self, j: &mut Journal) {
        if j.is_empty() {
            return;
        }
        let mut q = self.lock();
        q.writes += j.writes;
        if q.journal.is_empty() {
            std::mem::swap(&mut q.journal, &mut j.buf);
        } else {
            q.journal.extend_from_slice(&j.buf);
        }
        q.log.append(&mut j.log);
        j.buf.clear();
        j.writes = 0;
    }

    pub fn meta(&self, key: Vec<u8>, value: Vec<u8>) {
        self.lock().meta.push((key, value));
    }

    pub fn len(&self) -> usize {
        let q = self.lock();
        q.writes + q.log.len() + q.meta.len()
    }

    pub fn take(&self) -> Queue {
        std::mem::take(&mut *self.lock())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn change(seq: u64) -> pb::Change {
        pb::Change {
            seq,
            table: "web".into(),
            kind: Some(pb::change::Kind::Entry(pb::Entry {
                key: format!("k{seq}"),
                server: "s".into(),
                ..Default::default()
            })),
        }
    }

    /// Records appended over several batches come out as `pb::Batch` chunks, split where asked,
    /// each keyed by its first sequence and holding exactly its records.
    #[test]
    fn log_records_make_batch_chunks() {
        let pending = Pending::default();
        for batch in [1..4u64, 4..5, 5..8] {
            let mut j = Journal::default();
            for seq in batch {
                j.log.push(&change(seq));
            }
            pending.append(&mut j);
            assert!(j.is_empty(), "append empties the journal");
        }
        assert_eq!(pending.len(), 7);
        let q = pending.take();
        let chunks: Vec<(u64, Vec<u64>)> = q
            .log
            .chunks(3)
            .map(|(first, bytes)| {
                let b = pb::Batch::decode(bytes).expect("a chunk is a Batch");
                (first, b.changes.iter().map(|c| c.seq).collect())
            })
            .collect();
        assert_eq!(
            chunks,
            [(1, vec![1, 2, 3]), (4, vec![4, 5, 6]), (7, vec![7])]
        );
        let all = pb::Batch::decode(q.log.chunks(100).next().expect("one chunk").1).expect("batch");
        assert_eq!(all.changes, (1..8).map(change).collect::<Vec<_>>());
        assert_eq!(pending.len(), 0);
    }
}
