//! Choosing a server of a backend among the usable ones: smooth weighted round robin,
//! least connections, the power of two random choices, or a hash (of the client address, the
//! request path or a request field) over the weights.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::config::{Balance, UriHash};

/// A server the balancer may choose: its index in the backend, weight and active requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub weight: u32,
    pub active: u32,
}

/// What a request offers the algorithms: the client's address (`source`), and the bytes
/// `uri` and `hdr` hash (none: a request without the field, or a TCP connection).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub client: IpAddr,
    pub key: Option<&'a [u8]>,
}

impl Request<'_> {
    /// A connection that offers only its address (TCP).
    pub fn client(client: IpAddr) -> Request<'static> {
        Request { client, key: None }
    }
}

/// A backend's balancing state, shared by every connection of a worker.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(SmoothWeights),
    /// Ties rotate so that equal servers share the load.
    LeastConn {
        next: AtomicUsize,
    },
    Source,
    /// The state of a splitmix64 sequence: each draw adds a constant and mixes, lock-free.
    Random {
        state: AtomicU64,
    },
    /// `uri` and `hdr`: a hash of the request's key; round robin for a request without one,
    /// as HAProxy does.
    Hash {
        fallback: SmoothWeights,
    },
}

/// nginx's smooth weighted round robin: current weight per server index.
#[derive(Debug)]
pub struct SmoothWeights {
    current: Mutex<Vec<i64>>,
}

impl SmoothWeights {
    fn new(servers: usize) -> Self {
        SmoothWeights {
            current: Mutex::new(vec![0; servers]),
        }
    }

    fn pick(&self, candidates: &[Candidate], total: i64) -> Option<usize> {
        let mut cw = self.current.lock().unwrap_or_else(|p| p.into_inner());
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
}

impl Balancer {
    pub fn new(kind: &Balance, servers: usize) -> Self {
        match kind {
            Balance::Roundrobin => Balancer::RoundRobin(SmoothWeights::new(servers)),
            Balance::Leastconn => Balancer::LeastConn {
                next: AtomicUsize::new(0),
            },
            Balance::Source => Balancer::Source,
            // Seeded from the process's random hash keys: workers draw different sequences.
            Balance::Random => Balancer::Random {
                state: AtomicU64::new(std::collections::hash_map::RandomState::new().hash_one(0u8)),
            },
            Balance::Uri(_) | Balance::Hdr(_) => Balancer::Hash {
                fallback: SmoothWeights::new(servers),
            },
        }
    }

    /// Index of the chosen server; `None` when no candidate has a weight.
    pub fn pick(&self, candidates: &[Candidate], req: Request<'_>) -> Option<usize> {
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        if total == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin(rr) => rr.pick(candidates, total),
            Balancer::LeastConn { next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                (0..n)
                    .map(|i| &candidates[(start + i) % n])
                    .filter(|c| c.weight > 0)
                    .min_by(|a, b| load_order(a, b))
                    .map(|c| c.index)
            }
            Balancer::Source => {
                // The same address maps to the same server on every node and generation
                // while the set of usable servers is the same: a fixed hash, not a seeded one.
                let h = fnv1a(&match req.client {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a
                        .to_ipv4_mapped()
                        .map_or_else(|| a.octets().to_vec(), |v4| v4.octets().to_vec()),
                });
                by_weight(h, candidates, total)
            }
            Balancer::Random { state } => {
                let draw = || {
                    let s = state.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
                    by_weight(splitmix64(s), candidates, total)
                };
                let (a, b) = (draw()?, draw()?);
                let of = |i: usize| candidates.iter().find(|c| c.index == i);
                match (of(a), of(b)) {
                    (Some(x), Some(y)) if load_order(y, x).is_lt() => Some(b),
                    _ => Some(a),
                }
            }
            Balancer::Hash { fallback } => match req.key {
                // FNV's low bits mix poorly for keys that differ only in their last bytes
                // (`/item/1`, `/item/2`); one avalanche spreads them over `% total`.
                Some(key) => by_weight(splitmix64(fnv1a(key)), candidates, total),
                None => fallback.pick(candidates, total),
            },
        }
    }
}

/// Less loaded first: active / weight compared without division (a * wb < b * wa).
fn load_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    (u64::from(a.active) * u64::from(b.weight)).cmp(&(u64::from(b.active) * u64::from(a.weight)))
}

/// The candidate that owns point `h % total` when each takes as many points as its weight,
/// in index order: a fixed map, the same on every node and in every generation while the
/// usable servers and their weights are the same.
fn by_weight(h: u64, candidates: &[Candidate], total: i64) -> Option<usize> {
    let mut h = h % total as u64;
    for c in candidates {
        let w = u64::from(c.weight);
        if h < w {
            return Some(c.index);
        }
        h -= w;
    }
    None
}

/// The part of a request target that `balance = "uri"` hashes: the path (of an absolute form
/// too, so that HTTP/1.1 and HTTP/2 requests for one resource hash alike), cut after `depth`
/// directories, with the query string if `whole`.
pub fn uri_key(target: &str, how: UriHash) -> &str {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if let Some(rest) = t.strip_prefix(scheme) {
            t = rest.find('/').map_or("/", |p| &rest[p..]);
        }
    }
    let query = t.find('?').unwrap_or(t.len());
    if how.depth > 0
        && let Some((cut, _)) = t[..query].match_indices('/').nth(how.depth as usize)
    {
        return &t[..cut];
    }
    if how.whole { t } else { &t[..query] }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const R: Request<'static> = Request {
        client: LOCAL,
        key: None,
    };

    fn keyed(key: &[u8]) -> Request<'_> {
        Request {
            client: LOCAL,
            key: Some(key),
        }
    }

    /// How many of `n` picks went to each server index.
    fn counts(
        b: &Balancer,
        all: &[Candidate],
        n: usize,
        req: impl Fn(usize) -> Vec<u8>,
    ) -> Vec<usize> {
        let mut seen = vec![0; all.iter().map(|c| c.index + 1).max().unwrap_or(0)];
        for i in 0..n {
            let key = req(i);
            seen[b.pick(all, keyed(&key)).expect("a server")] += 1;
        }
        seen
    }

    fn c(index: usize, weight: u32, active: u32) -> Candidate {
        Candidate {
            index,
            weight,
            active,
        }
    }

    #[test]
    fn round_robin_cycles_over_every_server() {
        let b = Balancer::new(&Balance::Roundrobin, 3);
        let all = [c(0, 1, 0), c(1, 1, 0), c(2, 1, 0)];
        let picks: Vec<usize> = (0..6).filter_map(|_| b.pick(&all, R)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weights_interleave() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a, never five a in a row.
        let b = Balancer::new(&Balance::Roundrobin, 3);
        let all = [c(0, 5, 0), c(1, 1, 0), c(2, 1, 0)];
        let picks: Vec<usize> = (0..7).filter_map(|_| b.pick(&all, R)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        // A server that is down is skipped; weight 0 is never chosen.
        let some = [c(0, 0, 0), c(2, 1, 0)];
        assert_eq!(b.pick(&some, R), Some(2));
        assert_eq!(b.pick(&[c(0, 0, 0)], R), None);
        assert_eq!(b.pick(&[], R), None);
    }

    #[test]
    fn leastconn_prefers_the_least_loaded_relative_to_weight() {
        let b = Balancer::new(&Balance::Leastconn, 3);
        let all = [c(0, 1, 5), c(1, 1, 2), c(2, 2, 3)];
        // 3/2 < 2/1 < 5/1
        assert_eq!(b.pick(&all, R), Some(2));
        let tie = [c(0, 1, 1), c(1, 1, 1)];
        let picks: Vec<usize> = (0..4).filter_map(|_| b.pick(&tie, R)).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn source_is_stable_and_spreads() {
        let b = Balancer::new(&Balance::Source, 2);
        let all = [c(0, 1, 0), c(1, 1, 0)];
        let mut seen = [0; 2];
        for i in 0..200u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, i, 1));
            let first = b.pick(&all, Request::client(ip)).expect("a server");
            assert_eq!(b.pick(&all, Request::client(ip)), Some(first));
            seen[first] += 1;
        }
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn random_follows_the_weights_and_never_picks_the_unusable() {
        let b = Balancer::new(&Balance::Random, 4);
        // Index 2 is down (not a candidate); index 3 has weight 0.
        let all = [c(0, 1, 0), c(1, 3, 0), c(3, 0, 0)];
        let seen = counts(&b, &all, 4000, |_| Vec::new());
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Equal loads: the first draw wins, so the split follows the weights, 1:3.
        assert!((800..1200).contains(&seen[0]), "{seen:?}");
        assert!((2800..3200).contains(&seen[1]), "{seen:?}");
    }

    #[test]
    fn random_prefers_the_less_loaded_of_its_two_draws() {
        let b = Balancer::new(&Balance::Random, 2);
        // Two draws over two equal servers differ half of the time; then the idle one wins.
        let all = [c(0, 1, 10), c(1, 1, 0)];
        let seen = counts(&b, &all, 4000, |_| Vec::new());
        // Server 0 only when both draws were 0: about a quarter.
        assert!((800..1200).contains(&seen[0]), "{seen:?}");
        // Load is relative to weight: 10 on weight 20 is lighter than 1 on weight 1.
        let all = [c(0, 20, 10), c(1, 1, 1)];
        let seen = counts(&b, &all, 2000, |_| Vec::new());
        assert!(seen[1] < 10, "{seen:?}");
        assert_eq!(b.pick(&[c(0, 0, 0)], R), None);
    }

    #[test]
    fn hashing_is_stable_follows_weights_and_falls_back_without_a_key() {
        let uri = Balancer::new(&Balance::Uri(UriHash::default()), 3);
        let all = [c(0, 1, 0), c(1, 2, 0), c(2, 1, 0)];
        for i in 0..100 {
            let key = format!("/item/{i}");
            let first = uri.pick(&all, keyed(key.as_bytes()));
            for _ in 0..3 {
                assert_eq!(uri.pick(&all, keyed(key.as_bytes())), first, "{key}");
            }
        }
        let seen = counts(&uri, &all, 4000, |i| format!("/item/{i}").into_bytes());
        assert!((800..1200).contains(&seen[0]), "{seen:?}");
        assert!((1800..2200).contains(&seen[1]), "{seen:?}");
        assert!((800..1200).contains(&seen[2]), "{seen:?}");
        // A server that goes down gets no key (HAProxy's default map-based hash: the keys
        // of the others may move too, as with `source`).
        let without_last = [c(0, 1, 0), c(1, 2, 0)];
        let seen = counts(&uri, &without_last, 400, |i| {
            format!("/item/{i}").into_bytes()
        });
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0] > 80 && seen[1] > 200, "{seen:?}");
        // No key (a request without the field): round robin.
        let hdr = Balancer::new(&Balance::Hdr("X-User".into()), 2);
        let two = [c(0, 1, 0), c(1, 1, 0)];
        let picks: Vec<usize> = (0..4).filter_map(|_| hdr.pick(&two, R)).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(hdr.pick(&[c(0, 0, 0)], keyed(b"alice")), None);
    }

    #[test]
    fn uri_keys() {
        let plain = UriHash::default();
        let whole = UriHash {
            whole: true,
            depth: 0,
        };
        let depth2 = UriHash {
            whole: false,
            depth: 2,
        };
        assert_eq!(uri_key("/a/b/c?x=1", plain), "/a/b/c");
        assert_eq!(uri_key("/a/b/c?x=1", whole), "/a/b/c?x=1");
        assert_eq!(uri_key("/a/b/c?x=1", depth2), "/a/b");
        assert_eq!(uri_key("/a?x=/b/c/d", depth2), "/a");
        assert_eq!(uri_key("http://example.com/a/b?q", plain), "/a/b");
        assert_eq!(uri_key("https://example.com", plain), "/");
        assert_eq!(uri_key("*", plain), "*");
    }
}
