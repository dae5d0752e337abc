//! Choosing a server of a backend among the usable ones: smooth weighted round robin,
//! least connections, or a hash of the client address.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// A server the balancer may choose: its index in the backend, weight and active requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub weight: u32,
    pub active: u32,
}

/// A backend's balancing state, shared by every connection of a worker.
#[derive(Debug)]
pub enum Balancer {
    /// nginx's smooth weighted round robin: current weight per server index.
    RoundRobin {
        current: Mutex<Vec<i64>>,
    },
    /// Ties rotate so that equal servers share the load.
    LeastConn {
        next: AtomicUsize,
    },
    Source,
}

impl Balancer {
    pub fn new(kind: Balance, servers: usize) -> Self {
        match kind {
            Balance::Roundrobin => Balancer::RoundRobin {
                current: Mutex::new(vec![0; servers]),
            },
            Balance::Leastconn => Balancer::LeastConn {
                next: AtomicUsize::new(0),
            },
            Balance::Source => Balancer::Source,
        }
    }

    /// Index of the chosen server; `None` when no candidate has a weight.
    pub fn pick(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize> {
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        if total == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin { current } => {
                let mut cw = current.lock().unwrap_or_else(|p| p.into_inner());
                let mut best: Option<usize> = None;
                for c in candidates.iter().filter(|c| c.weight > 0) {
                    if c.index >= cw.len() {
                        cw.resize(c.index + 1, 0);
                    }
                    cw[c.index] += i64::from(c.weight);
                    if best.is_none_or(|b| cw[c.index] > cw[b]) {
                        best = Some(c.index);
                    }
                }
                let b = best?;
                cw[b] -= total;
                Some(b)
            }
            Balancer::LeastConn { next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                // active / weight compared without division: a * wb < b * wa.
                (0..n)
                    .map(|i| &candidates[(start + i) % n])
                    .filter(|c| c.weight > 0)
                    .min_by(|a, b| {
                        (u64::from(a.active) * u64::from(b.weight))
                            .cmp(&(u64::from(b.active) * u64::from(a.weight)))
                    })
                    .map(|c| c.index)
            }
            Balancer::Source => {
                // The same address maps to the same server on every node and generation
                // while the set of usable servers is the same: a fixed hash, not a seeded one.
                let mut h = fnv1a(&match client {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a
                        .to_ipv4_mapped()
                        .map_or_else(|| a.octets().to_vec(), |v4| v4.octets().to_vec()),
                }) % total as u64;
                for c in candidates {
                    let w = u64::from(c.weight);
                    if h < w {
                        return Some(c.index);
                    }
                    h -= w;
                }
                None
            }
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn c(index: usize, weight: u32, active: u32) -> Candidate {
        Candidate {
            index,
            weight,
            active,
        }
    }

    #[test]
    fn round_robin_cycles_over_every_server() {
        let b = Balancer::new(Balance::Roundrobin, 3);
        let all = [c(0, 1, 0), c(1, 1, 0), c(2, 1, 0)];
        let picks: Vec<usize> = (0..6).filter_map(|_| b.pick(&all, LOCAL)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weights_interleave() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a, never five a in a row.
        let b = Balancer::new(Balance::Roundrobin, 3);
        let all = [c(0, 5, 0), c(1, 1, 0), c(2, 1, 0)];
        let picks: Vec<usize> = (0..7).filter_map(|_| b.pick(&all, LOCAL)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        // A server that is down is skipped; weight 0 is never chosen.
        let some = [c(0, 0, 0), c(2, 1, 0)];
        assert_eq!(b.pick(&some, LOCAL), Some(2));
        assert_eq!(b.pick(&[c(0, 0, 0)], LOCAL), None);
        assert_eq!(b.pick(&[], LOCAL), None);
    }

    #[test]
    fn leastconn_prefers_the_least_loaded_relative_to_weight() {
        let b = Balancer::new(Balance::Leastconn, 3);
        let all = [c(0, 1, 5), c(1, 1, 2), c(2, 2, 3)];
        // 3/2 < 2/1 < 5/1
        assert_eq!(b.pick(&all, LOCAL), Some(2));
        let tie = [c(0, 1, 1), c(1, 1, 1)];
        let picks: Vec<usize> = (0..4).filter_map(|_| b.pick(&tie, LOCAL)).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn source_is_stable_and_spreads() {
        let b = Balancer::new(Balance::Source, 2);
        let all = [c(0, 1, 0), c(1, 1, 0)];
        let mut seen = [0; 2];
        for i in 0..200u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, i, 1));
            let first = b.pick(&all, ip).expect("a server");
            assert_eq!(b.pick(&all, ip), Some(first));
            seen[first] += 1;
        }
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }
}
