//! Choosing a server of a backend for each request.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// A backend's balancing state, shared by every connection of a worker.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin { next: AtomicUsize },
}

impl Balancer {
    pub fn new(kind: Balance) -> Self {
        match kind {
            Balance::Roundrobin => Balancer::RoundRobin {
                next: AtomicUsize::new(0),
            },
        }
    }

    /// Index of the server to use among `servers` (> 0) servers.
    pub fn pick(&self, servers: usize) -> usize {
        match self {
            Balancer::RoundRobin { next } => next.fetch_add(1, Ordering::Relaxed) % servers.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_over_every_server() {
        let b = Balancer::new(Balance::Roundrobin);
        let picks: Vec<usize> = (0..6).map(|_| b.pick(3)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
