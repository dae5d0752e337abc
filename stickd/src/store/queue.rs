//! The persistence queue: the store's writes waiting for sled, encoded in the order made.
//!
//! Keeping sled off the hot path makes a write cost a few map operations instead of several sled
//! inserts; `Store::persist` hands the queue to sled every few milliseconds, so the durability
//! window grows by that much only.

use std::sync::{Mutex, MutexGuard};

use crate::record::Rec;

/// Writes to sled waiting for the writer (`persist`), in order.
#[derive(Default)]
pub(super) struct Pending {
    queue: Mutex<Queue>,
}

/// Table writes encoded as a journal value (see `disk::writes`), and how many.
#[derive(Default)]
pub(super) struct Journal {
    pub buf: Vec<u8>,
    pub writes: usize,
}

impl Journal {
    /// A journal whose buffer holds about `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Journal {
        Journal {
            buf: Vec::with_capacity(bytes),
            writes: 0,
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
}

/// The queued writes, by kind (`persist` writes them in this order: table writes, log, meta).
#[derive(Default)]
pub(super) struct Queue {
    /// Table writes encoded in place as the next journal value (no allocation per write).
    pub journal: Vec<u8>,
    pub writes: usize,
    /// Records of our change log (encoded `pb::Change`s), in sequence order.
    pub log: Vec<(u64, Vec<u8>)>,
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
            writes: 0,
        };
        j.entry(table, key, rec);
        q.journal = j.buf;
    }

    /// Queues the writes of `j` after those already queued, and empties it (one lock for a
    /// whole batch of writes made under the store's lock).
    pub fn append(&self, j: &mut Journal) {
        if j.writes == 0 {
            return;
        }
        let mut q = self.lock();
        q.writes += j.writes;
        if q.journal.is_empty() {
            std::mem::swap(&mut q.journal, &mut j.buf);
        } else {
            q.journal.extend_from_slice(&j.buf);
        }
        j.buf.clear();
        j.writes = 0;
    }

    pub fn log(&self, seq: u64, change: Vec<u8>) {
        self.lock().log.push((seq, change));
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
