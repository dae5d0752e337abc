//! The sweep: drops expired entries a bounded number of buckets at a time, so that no lock is
//! held for a walk of a whole table, whether stickd is up or not.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::table::SHARDS;
use common::time::coarse_now_ms;

use super::StickCache;

/// Buckets a sweep step visits (over all tables), each shard locked only for its part.
pub const SWEEP_BUCKETS: usize = 4096;
/// Pause between sweep steps: 1M entries (2M buckets) are swept in about 10 s.
const SWEEP_EVERY: Duration = Duration::from_millis(20);

impl StickCache {
    /// One sweep step: visits up to `budget` buckets from where the last step stopped (all
    /// tables, shard after shard, each locked only for its part) and drops expired entries.
    /// Returns how many went. A shard that grew meanwhile may have moved some entries past
    /// or before the cursor: they are found by the next pass (or by the lookup that hits them).
    pub fn sweep_step(&self, budget: usize) -> usize {
        let now = coarse_now_ms();
        let mut at = self.sweep_at.lock().unwrap_or_else(|p| p.into_inner());
        let (mut t, mut s, mut b) = *at;
        let mut left = budget;
        let mut removed = 0;
        // Bounded even when every table is empty: one visit of each shard at most.
        let mut shards_seen = 0;
        while left > 0 && !self.tables.is_empty() && shards_seen <= self.tables.len() * SHARDS {
            if t >= self.tables.len() {
                t = 0;
            }
            let mut shard = self.tables[t].shard_at(s);
            let end = shard.entries.num_buckets().min(b + left);
            for i in b..end {
                if let Ok(o) = shard.entries.get_bucket_entry(i)
                    && o.get().expires_ms <= now
                {
                    o.remove();
                    removed += 1;
                }
            }
            left -= end.saturating_sub(b).max(1);
            if end >= shard.entries.num_buckets() {
                b = 0;
                s += 1;
                shards_seen += 1;
                if s == SHARDS {
                    s = 0;
                    t += 1;
                }
            } else {
                b = end;
            }
        }
        *at = (t, s, b);
        removed
    }
}

/// Drops expired entries a bounded step at a time, whether stickd is up or not.
pub(super) async fn sweep_loop(cache: Arc<StickCache>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        cache.sweep_step(SWEEP_BUCKETS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stick::testing::{cache, entry, session_key};

    #[test]
    fn the_sweep_goes_a_bounded_step_at_a_time() {
        let c = cache();
        let now = coarse_now_ms();
        // 20 000 expired entries (slipped past a lookup's check: expired after the apply)
        // and 100 live ones.
        let batch = (0..20_000)
            .map(|i| entry(&session_key(i), "app1", now + 60_000))
            .chain((20_000..20_100).map(|i| entry(&session_key(i), "app2", now + 600_000)))
            .collect();
        c.apply(0, batch);
        for i in 0..20_000 {
            c.with_slot(0, &session_key(i), |e| e.expires_ms = now - 1);
        }
        let buckets: usize = (0..SHARDS)
            .map(|s| c.tables[0].shard_at(s).entries.num_buckets())
            .sum();
        let mut steps = 0;
        let mut removed = 0;
        while c.held(0) > 100 {
            let r = c.sweep_step(1000);
            // A step never visits more than its budget of buckets, so never removes more.
            assert!(r <= 1000, "a step removed {r}");
            removed += r;
            steps += 1;
            assert!(
                steps <= buckets / 1000 + SHARDS + 1,
                "the sweep does not advance"
            );
        }
        assert_eq!(removed, 20_000);
        // The first steps cannot have done it all at once.
        assert!(steps >= 20_000 / 1000, "{steps} steps");
        assert_eq!(c.len(0), 100);
        for i in 20_000..20_100 {
            assert_eq!(c.lookup(0, &session_key(i)).as_deref(), Some("app2"));
        }
        // Empty and idle tables cost a bounded step too.
        let idle = cache();
        assert_eq!(idle.sweep_step(SWEEP_BUCKETS), 0);
    }
}
