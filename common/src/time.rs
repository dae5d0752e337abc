//! Clocks the daemons read: unix milliseconds (precise or coarse) and a thread's CPU time.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

/// Milliseconds since the unix epoch at `t` (0 before it, `i64::MAX` past the year 292 million).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the unix epoch at `t`, as [`unix_ms`] does milliseconds.
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Unix time in ms from `CLOCK_REALTIME_COARSE`: the time of the last tick, read without
/// touching the TSC (the stick cache reads it on every lookup).
pub fn coarse_unix_ms() -> io::Result<i64> {
    let ts = clock_gettime(ClockId::CLOCK_REALTIME_COARSE)?;
    // time_t and c_long are i64 here but i32 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(ts.tv_sec()) * 1000 + i64::from(ts.tv_nsec()) / 1_000_000)
}

/// Unix milliseconds now from the coarse clock (a few ns instead of tens on a lookup path; a few
/// ms of resolution are nothing against an expiry of seconds or minutes), or from the precise
/// one where the coarse clock is missing.
pub fn coarse_now_ms() -> i64 {
    coarse_unix_ms().unwrap_or_else(|_| now_ms())
}

/// CPU time the calling thread has used, in ns: for benchmarks on a shared machine, where
/// wall time counts the time spent waiting for a CPU.
pub fn thread_cpu_ns() -> io::Result<u64> {
    let ts = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_clocks_agree_within_a_tick() {
        let precise = now_ms();
        let coarse = coarse_now_ms();
        // The coarse clock lags by at most a tick (4 ms at HZ=250); allow for a slow machine.
        assert!((precise - coarse).abs() < 1_000, "{precise} vs {coarse}");
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_234)), 1_234);
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_millis(1_234)), 1);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_ns().expect("clock");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns().expect("clock") > before);
    }
}
