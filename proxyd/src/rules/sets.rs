//! The lookup structures rules are compiled into, so that a request never walks a list of
//! strings: host names in hash maps (exact, `*.` wildcard, `.` suffix), path prefixes in a
//! sorted prefix-free array, address blocks as sorted disjoint ranges.

use std::collections::HashMap;
use std::net::IpAddr;

// Host names come from clients: a hash seeded at random per process, as in the stick cache.
use foldhash::fast::RandomState;

/// Host patterns, each with the rules (by position) it belongs to.
///
/// `api.example.com` is one exact lookup; `*.example.com` matches one more label
/// (`a.example.com`, not `a.b.example.com`) with one lookup of what follows the first dot;
/// `.example.com` matches any name under it (not `example.com` itself) with one lookup per
/// label. The kinds a table does not hold cost nothing.
#[derive(Clone, Debug, Default)]
pub struct HostTable {
    exact: HashMap<Box<str>, Vec<u32>, RandomState>,
    wildcard: HashMap<Box<str>, Vec<u32>, RandomState>,
    suffix: HashMap<Box<str>, Vec<u32>, RandomState>,
}

/// A host pattern as validation accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPattern<'a> {
    Exact(&'a str),
    /// `*.NAME`: NAME is kept.
    Wildcard(&'a str),
    /// `.NAME`: NAME is kept.
    Suffix(&'a str),
}

impl<'a> HostPattern<'a> {
    /// Parses a pattern already lower-cased: labels of letters, digits, `-` and `_`, or an IP
    /// literal; `None` when it is none of the three forms.
    pub fn parse(s: &'a str) -> Option<HostPattern<'a>> {
        let (kind, name): (fn(&'a str) -> HostPattern<'a>, &str) =
            if let Some(n) = s.strip_prefix("*.") {
                (HostPattern::Wildcard, n)
            } else if let Some(n) = s.strip_prefix('.') {
                (HostPattern::Suffix, n)
            } else {
                (HostPattern::Exact, s)
            };
        let exact = name.len() == s.len();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        let literal = |n: &str| {
            n.parse::<std::net::Ipv4Addr>().is_ok()
                || n.strip_prefix('[')
                    .and_then(|r| r.strip_suffix(']'))
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        };
        let ok = name.len() <= 253 && (name.split('.').all(label_ok) || (exact && literal(name)));
        ok.then(|| kind(name))
    }
}

impl HostTable {
    pub fn insert(&mut self, pattern: HostPattern<'_>, rule: u32) {
        let (map, key) = match pattern {
            HostPattern::Exact(k) => (&mut self.exact, k),
            HostPattern::Wildcard(k) => (&mut self.wildcard, k),
            HostPattern::Suffix(k) => (&mut self.suffix, k),
        };
        let rules = map.entry(key.into()).or_default();
        if rules.last() != Some(&rule) {
            rules.push(rule);
        }
    }

    /// Adds every pattern of `other` as belonging to `rule`.
    pub fn merge(&mut self, other: &HostTable, rule: u32) {
        for k in other.exact.keys() {
            self.insert(HostPattern::Exact(k), rule);
        }
        for k in other.wildcard.keys() {
            self.insert(HostPattern::Wildcard(k), rule);
        }
        for k in other.suffix.keys() {
            self.insert(HostPattern::Suffix(k), rule);
        }
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + self.suffix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `found` with the rules of every pattern `host` (lower-case, without port) matches.
    pub fn lookup<'s>(&'s self, host: &str, mut found: impl FnMut(&'s [u32])) {
        if let Some(r) = self.exact.get(host) {
            found(r);
        }
        if !self.wildcard.is_empty()
            && let Some((_, rest)) = host.split_once('.')
            && let Some(r) = self.wildcard.get(rest)
        {
            found(r);
        }
        if !self.suffix.is_empty() {
            for (i, _) in host.match_indices('.') {
                if let Some(r) = self.suffix.get(&host[i + 1..]) {
                    found(r);
                }
            }
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        let mut any = false;
        self.lookup(host, |_| any = true);
        any
    }
}

/// Path prefixes, sorted and prefix-free (a prefix that another one starts with is dropped:
/// the shorter matches whatever the longer does), so that the only candidate for a path is
/// the greatest prefix not above it: one binary search.
#[derive(Clone, Debug, Default)]
pub struct PrefixSet {
    sorted: Vec<Box<[u8]>>,
}

impl PrefixSet {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> PrefixSet {
        let mut all: Vec<&[u8]> = prefixes.into_iter().map(str::as_bytes).collect();
        all.sort_unstable();
        all.dedup();
        let mut sorted: Vec<Box<[u8]>> = Vec::with_capacity(all.len());
        for p in all {
            // Sorted order puts a prefix right before every string that starts with it.
            if sorted.last().is_some_and(|last| p.starts_with(last)) {
                continue;
            }
            sorted.push(p.into());
        }
        PrefixSet { sorted }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    pub fn matches(&self, path: &str) -> bool {
        let path = path.as_bytes();
        match self.sorted.binary_search_by(|p| (**p).cmp(path)) {
            Ok(_) => true,
            // Any prefix q of `path` in the set is the greatest element not above it: an
            // element between q and `path` would start with q, which the set rules out.
            Err(i) => i > 0 && path.starts_with(&self.sorted[i - 1]),
        }
    }
}

/// Address blocks (IPv4 and IPv6) as sorted, merged ranges: one binary search per address.
/// An IPv4-mapped IPv6 address is looked up as the IPv4 address it is.
#[derive(Clone, Debug, Default)]
pub struct CidrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CidrSet {
    /// From `(network, prefix length)` pairs, lengths already checked against the family.
    pub fn new(blocks: impl IntoIterator<Item = (IpAddr, u8)>) -> CidrSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (addr, prefix) in blocks {
            match canonical(addr) {
                IpAddr::V4(a) => {
                    let host_bits = 32 - u32::from(prefix.min(32));
                    let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                    let start = u32::from(a) & mask;
                    v4.push((start, start | !mask));
                }
                IpAddr::V6(a) => {
                    let host_bits = 128 - u32::from(prefix.min(128));
                    let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                    let start = u128::from(a) & mask;
                    v6.push((start, start | !mask));
                }
            }
        }
        CidrSet {
            v4: merged(v4),
            v6: merged(v6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(a) => within(&self.v4, u32::from(a)),
            IpAddr::V6(a) => within(&self.v6, u128::from(a)),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn merged<T: Ord + Copy>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn within<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && x <= ranges[i - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> HostTable {
        let mut t = HostTable::default();
        for (i, p) in patterns.iter().enumerate() {
            t.insert(HostPattern::parse(p).expect("valid pattern"), i as u32);
        }
        t
    }

    #[test]
    fn host_patterns_exact_wildcard_and_suffix() {
        let t = table(&["api.example.com", "*.example.com", ".example.org"]);
        let hits = |h: &str| {
            let mut v = Vec::new();
            t.lookup(h, |r| v.extend_from_slice(r));
            v.sort_unstable();
            v
        };
        assert_eq!(hits("api.example.com"), vec![0, 1]);
        assert_eq!(hits("www.example.com"), vec![1]);
        assert_eq!(hits("a.b.example.com"), Vec::<u32>::new());
        assert_eq!(hits("example.com"), Vec::<u32>::new());
        assert_eq!(hits("a.example.org"), vec![2]);
        assert_eq!(hits("a.b.example.org"), vec![2]);
        assert_eq!(hits("example.org"), Vec::<u32>::new());
        assert_eq!(hits("xexample.org"), Vec::<u32>::new());
        for bad in [
            "", "*", "*.", ".", "a..b", "A.com", "a b", "*.*.com", "a.*.com", "a:80",
        ] {
            assert_eq!(HostPattern::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            HostPattern::parse("[::1]"),
            Some(HostPattern::Exact("[::1]"))
        );
        assert_eq!(
            HostPattern::parse("10.0.0.1"),
            Some(HostPattern::Exact("10.0.0.1"))
        );
    }

    #[test]
    fn prefixes_are_one_binary_search() {
        let s = PrefixSet::new(["/api/", "/api/v1/", "/static", "/a", "/ab", "/b/c"]);
        // "/api/", "/api/v1/" and "/ab" are covered by "/a".
        assert_eq!(s.len(), 3);
        for p in [
            "/api/",
            "/api/x",
            "/api/v1/y",
            "/static.css",
            "/a",
            "/ac",
            "/ab",
            "/b/c/d",
        ] {
            assert!(s.matches(p), "{p}");
        }
        for p in ["/", "/b", "/b/", "/c", "", "/stati", "/ZZ"] {
            assert!(!s.matches(p), "{p}");
        }
        assert!(!PrefixSet::new([]).matches("/"));
        assert!(PrefixSet::new(["/"]).matches("/anything"));
    }

    #[test]
    fn address_blocks_v4_v6_and_mapped() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let s = CidrSet::new([
            (ip("10.0.0.0"), 8),
            (ip("10.1.0.0"), 16),
            (ip("192.168.1.7"), 32),
            (ip("2001:db8::"), 32),
            (ip("0.0.0.0"), 0),
        ]);
        assert!(s.contains(ip("1.2.3.4")));
        let s = CidrSet::new([
            (ip("10.0.0.0"), 8),
            (ip("192.168.1.7"), 32),
            (ip("2001:db8::"), 32),
        ]);
        assert!(s.contains(ip("10.255.255.255")));
        assert!(s.contains(ip("::ffff:10.2.3.4")));
        assert!(s.contains(ip("192.168.1.7")));
        assert!(!s.contains(ip("192.168.1.8")));
        assert!(!s.contains(ip("11.0.0.0")));
        assert!(s.contains(ip("2001:db8:ffff::1")));
        assert!(!s.contains(ip("2001:db9::1")));
        assert!(!s.contains(ip("::1")));
        let all6 = CidrSet::new([(ip("::"), 0)]);
        assert!(all6.contains(ip("::1")) && !all6.contains(ip("127.0.0.1")));
    }
}
