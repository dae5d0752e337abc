//! Durability: the queue handed to sled, checkpoints, flushes, and the tables read back at start.
//!
//! `persist` writes the queue as a journal value, log chunks and meta keys, in that order; a
//! checkpoint rewrites whole tables now and then so that the journal can go; `close` marks a
//! clean stop, which spares the next start from asking the peers for lost writes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use proto::stick::v1 as pb;

use super::tables::Loading;
use super::{Store, StoreError, log};
use crate::disk::u64_at;
use common::time::now_ms;

/// Queued sled writes past which writers wait for sled (see `Store::backpressure`).
const PENDING_HIGH_WATER: usize = 100_000;
/// Entries per checkpoint value (and per hold of the store's lock while writing one). sled
/// copies a value some ten times whatever its size (node splits and consolidations), so the size
/// matters little: measured from 128 to 4096 entries alike per entry; values small enough to
/// keep sled's nodes out of its blob files (under 128 KiB) only moved the copying to sled's
/// writer threads, and cost more end to end; 16384 cost more.
const CHECKPOINT_CHUNK: usize = 4096;
/// Journal cost (see `journal_cost`) that calls for a checkpoint, at least (else: the last
/// checkpoint's size). sled keeps the journal in memory until a checkpoint removes it, so this is
/// what a small table's journal may hold resident: a few times its checkpoint, not tens of MiB.
const CHECKPOINT_AFTER: u64 = 1 << 20;
/// What sled holds in memory per value beyond the value's bytes (its leaf entry, key and
/// allocation): a persist every 20 ms under a light load writes values of one or two writes,
/// whose bytes alone undercount the journal's memory by some four times (measured: ~480 bytes
/// resident per journal value of ~120 bytes).
const SLED_VALUE_OVERHEAD: u64 = 384;

/// How much a journal value of `len` bytes counts towards the next checkpoint.
fn journal_cost(len: usize) -> u64 {
    len as u64 + SLED_VALUE_OVERHEAD
}

/// A (key, encoded record) pair as sled holds it.
type RawRecord = (Vec<u8>, Vec<u8>);

/// The writer's bookkeeping (under `persist_lock`).
#[derive(Default)]
pub(super) struct Disk {
    /// Key of the next journal value.
    journal_next: u64,
    /// Journal written since the last checkpoint: bytes plus sled's overhead per value (see
    /// `journal_cost`).
    journal_bytes: u64,
    /// Generation and size of the last checkpoint.
    generation: u64,
    checkpoint_bytes: u64,
    /// Tables on disk that are no longer configured: carried from checkpoint to checkpoint
    /// untouched, so that a table put back in the config finds its entries again.
    orphans: Vec<(String, Vec<RawRecord>)>,
}

/// Opens sled in `dir`, tuned for the store.
pub(super) fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        // We flush ourselves on a timer (see `flush`), so the window is ours to state.
        .flush_every_ms(None)
        // Reads are served from memory; sled's cache only needs to help writes and start-up.
        .cache_capacity(64 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
}

/// The meta record of a table's clear.
pub(super) fn clear_record(c: &pb::TableCleared) -> (Vec<u8>, Vec<u8>) {
    let mut v = c.version.to_be_bytes().to_vec();
    v.extend_from_slice(c.origin.as_bytes());
    (format!("cleared/{}", c.table).into_bytes(), v)
}

/// Reads every configured table's last clear.
pub(super) fn load_clears(meta: &sled::Tree, loading: &mut Loading) -> Result<(), StoreError> {
    let names: Vec<String> = loading.tables.keys().cloned().collect();
    for name in names {
        if let Some(c) = meta.get(format!("cleared/{name}"))? {
            let version = u64_at(&c, 0).unwrap_or(0);
            let origin = String::from_utf8_lossy(c.get(8..).unwrap_or_default()).into();
            loading.cleared(&name, version, origin);
        }
    }
    Ok(())
}

/// Reads the last checkpoint, then the journal written since, into the tables; records of
/// tables no longer configured are kept aside (see `Disk::orphans`). Removes what an
/// interrupted checkpoint left behind.
pub(super) fn load_tables(
    checkpoint: &sled::Tree,
    journal: &sled::Tree,
    meta: &sled::Tree,
    loading: &mut Loading,
) -> Result<Disk, StoreError> {
    let mut disk = Disk::default();
    let corrupt = |what: String| move |reason: String| StoreError::Corrupt { what, reason };
    let mut orphans: HashMap<String, HashMap<Vec<u8>, Vec<u8>>> = HashMap::new();
    if let Some(c) = meta.get("checkpoint")? {
        disk.generation = u64_at(&c, 0).unwrap_or(0);
        disk.journal_next = u64_at(&c, 8).unwrap_or(0);
    }
    for kv in checkpoint.iter() {
        let (k, v) = kv?;
        if u64_at(&k, 0) != Some(disk.generation) {
            // Left by a checkpoint that did not finish, or by one that was superseded.
            checkpoint.remove(k)?;
            continue;
        }
        disk.checkpoint_bytes += v.len() as u64;
        let (table, pairs) = crate::disk::chunk(&v).map_err(corrupt("checkpoint".into()))?;
        let name = String::from_utf8_lossy(table).into_owned();
        match loading.table(&name) {
            Some(mut t) => {
                for (k, v) in pairs {
                    t.load(k, Some(v))?;
                }
            }
            None => orphans
                .entry(name)
                .or_default()
                .extend(pairs.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec()))),
        }
    }
    for kv in journal.iter() {
        let (k, v) = kv?;
        let id = u64_at(&k, 0).unwrap_or(0);
        if id < disk.journal_next {
            // Already in the checkpoint (its removal was cut short).
            journal.remove(k)?;
            continue;
        }
        disk.journal_next = id + 1;
        disk.journal_bytes += journal_cost(v.len());
        let writes = crate::disk::writes(&v).map_err(corrupt(format!("journal {id}")))?;
        for (table, key, value) in writes {
            let name = String::from_utf8_lossy(table);
            match loading.table(&name) {
                Some(mut t) => t.load(key, value)?,
                None => {
                    let o = orphans.entry(name.into_owned()).or_default();
                    match value {
                        Some(v) => o.insert(key.to_vec(), v.to_vec()),
                        None => o.remove(key),
                    };
                }
            }
        }
    }
    disk.orphans = orphans
        .into_iter()
        .map(|(name, recs)| (name, recs.into_iter().collect()))
        .collect();
    Ok(disk)
}

/// Whether this start may have lost writes of our own, newest on disk `own_max`: after an
/// unclean stop, peers may hold newer ones of ours that we lost, and we ask them back (see
/// `Store::recover_since`). Marks the store as not cleanly stopped until `close`.
pub(super) fn recover_since(meta: &sled::Tree, own_max: u64) -> Result<Option<u64>, StoreError> {
    let had_epoch = meta.get(log::EPOCH)?.is_some();
    let clean = meta.get("clean")?.is_some_and(|v| *v == [1u8]);
    let recover_since = match (had_epoch, clean) {
        (false, _) => Some(0),
        (true, false) => Some(own_max),
        (true, true) => None,
    };
    meta.insert("clean", &[0u8])?;
    Ok(recover_since)
}

impl Store {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.persist_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the queued writes to sled and lets the in-memory log tail shrink: the table writes
    /// as one journal value, the log records as chunks, then the meta keys (positions last, so
    /// that they never get ahead of the data: sled recovers a prefix of its writes). Writes a
    /// checkpoint when the journal has grown past the last one. Returns how many writes went.
    pub fn persist(&self) -> Result<usize, StoreError> {
        let mut disk = self.disk();
        // Read the head first: every record up to it is already queued (append queues before
        // publishing the head), so after this batch sled has the log through it.
        let head = self.head();
        let queue = self.pending.take();
        let n = queue.writes + queue.log.len() + queue.meta.len();
        if n == 0 {
            return Ok(0);
        }
        let journal = queue.journal;
        let meta = queue.meta;
        if !journal.is_empty() {
            disk.journal_bytes += journal_cost(journal.len());
            self.journal
                .insert(disk.journal_next.to_be_bytes(), journal)?;
            disk.journal_next += 1;
        }
        for (first, chunk) in queue.log.chunks(log::LOG_CHUNK) {
            self.log.insert(crate::disk::seq_key(first), chunk)?;
        }
        for (k, v) in meta {
            self.meta.insert(k, v)?;
        }
        self.persisted_seq.fetch_max(head, Ordering::Relaxed);
        self.shrink_tail(self.persisted_seq.load(Ordering::Relaxed));
        // Not while a snapshot arrives: its writes are in the journal already (as durable as
        // any), and a checkpoint then would copy the table while it fills, then again after.
        if disk.journal_bytes > CHECKPOINT_AFTER.max(disk.checkpoint_bytes)
            && self.snapshot_until.load(Ordering::Relaxed) < now_ms()
        {
            self.write_checkpoint(&mut disk)?;
        }
        Ok(n)
    }

    /// Writes a checkpoint now (see `write_checkpoint`).
    pub(super) fn checkpoint_now(&self) -> Result<(), StoreError> {
        self.write_checkpoint(&mut self.disk())
    }

    /// Rewrites every table as a new checkpoint generation, then drops the old one and the
    /// journal it needed. The copy is fuzzy (the lock is taken per chunk, not for the whole
    /// copy) and still exact after a restart: a key written while it runs has its write in the
    /// journal from `journal_next` on, which the start-up replays over the checkpoint in order.
    fn write_checkpoint(&self, disk: &mut Disk) -> Result<(), StoreError> {
        let generation = disk.generation + 1;
        let journal_from = disk.journal_next;
        let names: Vec<Arc<str>> = self
            .lock()
            .tables
            .values()
            .map(|t| t.name.clone())
            .collect();
        let mut n = 0u32;
        let mut bytes = 0u64;
        let mut value = Vec::new();
        for name in names {
            // In slot order: an entry that moves to another slot meanwhile was removed and
            // written again, and both are in the journal that the start-up replays over this.
            let mut slot = 0;
            loop {
                let mut chunk = crate::disk::chunk_start(&name);
                let mut entries = 0;
                {
                    let inner = self.lock();
                    let Some(t) = inner.tables.get(&*name) else {
                        break;
                    };
                    let end = t.entries.slot_end();
                    if slot >= end {
                        break;
                    }
                    while slot < end && entries < CHECKPOINT_CHUNK {
                        if let Some((k, r)) = t.entries.at(slot) {
                            value.clear();
                            r.encode_into(&mut value);
                            crate::disk::chunk_put(&mut chunk, k.as_bytes(), &value);
                            entries += 1;
                        }
                        slot += 1;
                    }
                }
                if entries == 0 {
                    continue;
                }
                bytes += chunk.len() as u64;
                self.checkpoint
                    .insert(crate::disk::chunk_key(generation, n), chunk)?;
                n += 1;
            }
        }
        for (name, recs) in &disk.orphans {
            for part in recs.chunks(CHECKPOINT_CHUNK) {
                let mut chunk = crate::disk::chunk_start(name);
                for (k, v) in part {
                    crate::disk::chunk_put(&mut chunk, k, v);
                }
                bytes += chunk.len() as u64;
                self.checkpoint
                    .insert(crate::disk::chunk_key(generation, n), chunk)?;
                n += 1;
            }
        }
        let mut mark = generation.to_be_bytes().to_vec();
        mark.extend_from_slice(&journal_from.to_be_bytes());
        self.meta.insert("checkpoint", mark)?;
        for k in self
            .checkpoint
            .scan_prefix(disk.generation.to_be_bytes())
            .keys()
        {
            self.checkpoint.remove(k?)?;
        }
        for k in self.journal.range(..journal_from.to_be_bytes()).keys() {
            self.journal.remove(k?)?;
        }
        tracing::debug!(generation, chunks = n, bytes, "checkpoint written");
        disk.generation = generation;
        disk.checkpoint_bytes = bytes;
        disk.journal_bytes = 0;
        Ok(())
    }

    /// Called by writers after a write (off the async workers): when sled falls behind, the
    /// writer persists the queue itself, which slows writes down to what sled can take and
    /// keeps the durability window and the queue's memory bounded.
    pub fn backpressure(&self) {
        if self.pending.len() > PENDING_HIGH_WATER
            && let Err(e) = self.persist()
        {
            tracing::error!(error = %e, "writing to sled failed");
        }
    }

    /// Records a clean stop (everything flushed), so that the next start asks nothing back.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.flush().await?;
        self.meta.insert("clean", &[1u8])?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Writes everything to disk; returns the bytes flushed.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        self.persist()?;
        self.meta.insert(log::HEAD, &self.head().to_be_bytes())?;
        Ok(self.db.flush_async().await?)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// A small record of the meta tree, as last handed to sled.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    /// The meta records whose key starts with `prefix`: (the rest of the key, value).
    pub fn meta_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(prefix) {
            let (k, v) = kv?;
            let rest = k.get(prefix.len()..).unwrap_or_default();
            out.push((String::from_utf8_lossy(rest).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Writes a meta record at once, outside the queue: for records that cover no data, whose
    /// order with the data does not matter (see `Mark` for those whose order does).
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, item, reopen};
    use super::*;

    #[test]
    fn a_light_load_checkpoints_before_its_journal_holds_thousands_of_values() {
        // One write per persist, as a persist every 20 ms makes of a light load. sled keeps the
        // journal in memory until a checkpoint removes it: counted by bytes alone, ten thousand
        // such values (some 400 KB) would all stay, at some 480 bytes of memory each.
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(&config(dir.path(), "a", "")).expect("open");
        let mut most = 0;
        for i in 0..10_000u32 {
            let key = format!("10.3.{}.{}", (i / 256) % 16, i % 256);
            s.store("ips", &[item(&key, "s")]).expect("store");
            s.persist().expect("persist");
            if i % 64 == 0 {
                most = most.max(s.journal.len());
            }
        }
        // At most CHECKPOINT_AFTER's worth of values at their overhead each (2731).
        assert!((1..=3000).contains(&most), "{most} journal values");
    }

    /// CPU time in ns that the scheduler accounts to `/proc/.../schedstat` (finer than
    /// getrusage's ticks).
    fn cpu_ns(schedstat: &std::path::Path) -> u64 {
        std::fs::read_to_string(schedstat)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time of this thread, and of the whole process (sled's threads too).
    fn cpu_now() -> (u64, u64) {
        let thread = cpu_ns("/proc/thread-self/schedstat".as_ref());
        let process = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| cpu_ns(&t.path().join("schedstat")))
            .sum();
        (thread, process)
    }

    /// What persistence costs per stored entry in proxyd's shape of load: new 32-byte session
    /// keys in batches of 70, a persist every 840 entries (20 ms at 42k a second), a flush every
    /// 25 persists (500 ms), until the table holds 650k. Prints CPU per entry, split by where it
    /// went. A measurement, not a check; run it in release mode and alone on the machine:
    /// `cargo test --release -p stickd --lib -- --ignored --nocapture persistence_cost`.
    #[test]
    #[ignore = "a measurement: run it alone, in release mode"]
    fn persistence_cost_per_entry_of_a_growing_table() {
        const ENTRIES: usize = 650_000;
        const BATCH: usize = 70;
        const PER_PERSIST: usize = 840;
        const PER_FLUSH: usize = PER_PERSIST * 25;
        let dir = tempfile::tempdir().expect("tmp");
        let table = "[[tables]]\nname = \"sessions\"\ntype = \"string\"\nlen = 32\n\
                     size = \"1m\"\nexpire = \"5m\"\n";
        let s = Store::open(&config(dir.path(), "a", table)).expect("open");
        let (mut store, mut persist, mut checkpoint, mut flush) = (0, 0, 0, 0);
        let mut checkpoints = 0;
        let (thread_start, start) = cpu_now();
        let mut mark = thread_start;
        let mut items = Vec::with_capacity(BATCH);
        for n in (0..ENTRIES).step_by(BATCH) {
            items.clear();
            items.extend((n..n + BATCH).map(|i| {
                // Spread over the key space as session ids are, not in order.
                let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                item(&format!("{h:016x}{i:016x}"), ["app1", "app2"][i % 2])
            }));
            s.store_unreturned("sessions", &items, None).expect("store");
            if !(n + BATCH).is_multiple_of(PER_PERSIST) {
                continue;
            }
            let before = cpu_now().0;
            store += before - mark;
            let generation = s.disk().generation;
            s.persist().expect("persist");
            let after = cpu_now().0;
            if s.disk().generation == generation {
                persist += after - before;
            } else {
                checkpoint += after - before;
                checkpoints += 1;
            }
            if (n + BATCH).is_multiple_of(PER_FLUSH) {
                s.db.flush().expect("flush");
                flush += cpu_now().0 - after;
            }
            mark = cpu_now().0;
        }
        let (thread, end) = cpu_now();
        store += thread - mark;
        let per = |ns: u64| ns as f64 / 1e3 / ENTRIES as f64;
        println!(
            "µs per entry: {:.3} = store (and making keys) {:.3} + persist {:.3} + {checkpoints} checkpoints {:.3} \
             + flush {:.3} + sled's threads {:.3}",
            per(end - start),
            per(store),
            per(persist),
            per(checkpoint),
            per(flush),
            per((end - start).saturating_sub(thread - thread_start)),
        );
    }

    #[test]
    fn journal_and_checkpoint_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        {
            let s = Store::open(&c).expect("open");
            for i in 0..300 {
                s.store(
                    "ips",
                    &[item(&format!("10.1.{}.{}", i / 256, i % 256), "old")],
                )
                .expect("store");
            }
            s.persist().expect("persist");
            s.write_checkpoint(&mut s.disk()).expect("checkpoint");
            // After the checkpoint: a replacement, a delete and new keys, in the journal only.
            s.store("ips", &[item("10.1.0.1", "new")]).expect("store");
            s.delete("ips", "10.1.0.2").expect("delete");
            s.store("ips", &[item("10.2.0.1", "x")]).expect("store");
            s.sweep().expect("sweep");
            s.persist().expect("persist");
        }
        let s = reopen(&c);
        let got = |k: &str| {
            s.lookup("ips", &[k.into()])
                .expect("lookup")
                .pop()
                .map(|e| e.server)
        };
        assert_eq!(got("10.1.0.1").as_deref(), Some("new"));
        assert_eq!(got("10.1.0.2"), None);
        assert_eq!(got("10.1.0.3").as_deref(), Some("old"));
        assert_eq!(got("10.2.0.1").as_deref(), Some("x"));
        assert_eq!(s.tables_info()[0].used, 300);
        assert_eq!(s.head(), 303);
        assert_eq!(s.read_log(303, 1).expect("log")[0].seq, 303);
    }
}
