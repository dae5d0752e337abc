//! How much of its change log a node keeps: at most `log_keep` changes, at most a few times its
//! tables' size, and at most `MAX_BYTES` on disk.
//!
//! A peer that fell further behind than the log reaches gets a full snapshot, which holds at most
//! the tables' size in entries. A log several times longer than that buys nothing: replaying it
//! costs more than the snapshot would. Without this bound a busy small table (1.85 M stores into
//! 5k entries) kept `log_keep` = 1 M changes: 690 MB resident and 225 MB of sled.

/// Changes kept whatever the tables' size: a peer a few seconds behind a busy node still
/// catches up from the log.
pub const FLOOR: u64 = 16 * 1024;
/// Changes kept per entry the tables can hold.
pub const PER_ENTRY: u64 = 4;
/// Bytes of encoded changes kept (long keys make a change weigh up to some 4.5 KiB).
pub const MAX_BYTES: u64 = 64 << 20;

/// The log's bound for a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBound {
    /// Most changes kept.
    pub changes: u64,
    /// Most bytes of log chunks kept.
    pub bytes: u64,
}

impl LogBound {
    /// The bound for `log_keep` and tables that hold `entries` entries in all.
    pub fn new(log_keep: u64, entries: u64) -> LogBound {
        LogBound {
            changes: log_keep.min(FLOOR.max(entries.saturating_mul(PER_ENTRY))),
            bytes: MAX_BYTES,
        }
    }

    /// Where the kept log starts, given its chunks as (first sequence, bytes), oldest first, and
    /// the head: the start of the oldest chunk to keep. Whole chunks go, so the log holds up to
    /// one chunk more than the bound; the newest chunk always stays.
    pub fn first_kept(&self, head: u64, chunks: &[(u64, u64)]) -> Option<u64> {
        let (&(newest, _), _) = chunks.split_last()?;
        // By count: the chunk holding the first sequence within the bound stays.
        let want = head.saturating_add(1).saturating_sub(self.changes);
        let by_count = chunks
            .iter()
            .rev()
            .find(|(start, _)| *start <= want)
            .map_or(chunks[0].0, |c| c.0);
        // By bytes: the newest chunks that fit.
        let mut total = 0u64;
        let mut by_bytes = newest;
        for &(start, bytes) in chunks.iter().rev() {
            total = total.saturating_add(bytes);
            if total > self.bytes {
                break;
            }
            by_bytes = start;
        }
        Some(by_count.max(by_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_follows_the_tables_size_between_the_floor_and_log_keep() {
        assert_eq!(LogBound::new(1_000_000, 1_000).changes, FLOOR);
        assert_eq!(LogBound::new(1_000_000, 5_000).changes, 20_000);
        assert_eq!(LogBound::new(1_000_000, 100_000).changes, 400_000);
        assert_eq!(LogBound::new(1_000_000, 10_000_000).changes, 1_000_000);
        assert_eq!(LogBound::new(1000, 5_000).changes, 1000);
    }

    #[test]
    fn first_kept_takes_whole_chunks_by_count_and_by_bytes() {
        // Ten chunks of 100 changes (1..=1000), 1 KiB each.
        let chunks: Vec<(u64, u64)> = (0..10).map(|i| (i * 100 + 1, 1024)).collect();
        let b = LogBound {
            changes: 250,
            bytes: 1 << 20,
        };
        // The newest 250 (751..=1000) start inside the chunk at 701.
        assert_eq!(b.first_kept(1000, &chunks), Some(701));
        let b = LogBound {
            changes: 10_000,
            bytes: 3 * 1024 - 1,
        };
        // Two chunks fit, not three.
        assert_eq!(b.first_kept(1000, &chunks), Some(801));
        // A newest chunk bigger than the cap still stays.
        let b = LogBound {
            changes: 10_000,
            bytes: 10,
        };
        assert_eq!(b.first_kept(1000, &chunks), Some(901));
        let b = LogBound {
            changes: 10_000,
            bytes: 1 << 20,
        };
        assert_eq!(b.first_kept(1000, &chunks), Some(1));
        assert_eq!(b.first_kept(1000, &[]), None);
    }
}
