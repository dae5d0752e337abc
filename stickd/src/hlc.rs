//! A hybrid logical clock: versions that follow wall time but never go backwards or repeat.
//!
//! A version is `(unix_ms << 16) | counter`: comparable as a plain `u64`, close to wall time for
//! operators, and still ordered when clocks disagree, because every version a node sees from a
//! peer pushes its own clock past it.

/// The clock of one node. Not thread-safe on its own: the store keeps it under its lock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A new version, strictly above every version issued or observed so far.
    pub fn now(&mut self, wall_ms: i64) -> u64 {
        let physical = u64::try_from(wall_ms).unwrap_or(0) << 16;
        self.last = if physical > self.last {
            physical
        } else {
            self.last + 1
        };
        self.last
    }

    /// Takes a peer's version into account so that our next one is above it.
    pub fn observe(&mut self, version: u64) {
        self.last = self.last.max(version);
    }
}

/// The wall-clock milliseconds of a version.
pub fn unix_ms(version: u64) -> u64 {
    version >> 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_even_when_the_clock_stalls_or_goes_back() {
        let mut c = Hlc::default();
        let a = c.now(1000);
        let b = c.now(1000);
        let d = c.now(900);
        assert!(a < b && b < d);
        assert_eq!(unix_ms(a), 1000);
        c.observe(5000 << 16);
        assert!(c.now(1001) > 5000 << 16);
    }
}
