//! What the stick cache's unit tests share: a cache with one text table, entries as stickd
//! sends them, session-id-like keys, and a way to reach an entry's fields.

use std::sync::atomic::Ordering;

use proto::stick::v1 as pb;

use super::table::Slot;
use super::{KeyKind, StickCache};

pub(super) fn cache() -> StickCache {
    let c = StickCache::new(vec![("t".into(), KeyKind::Text)]);
    c.tables[0].expire_ms.store(60_000, Ordering::Relaxed);
    c
}

impl StickCache {
    pub(super) fn with_slot(&self, t: usize, key: &str, f: impl FnOnce(&mut Slot)) {
        let table = &self.tables[t];
        let hash = table.hash(key);
        let mut shard = table.shard(hash);
        f(shard
            .entries
            .find_mut(hash, |e| e.key.is(key))
            .expect("cached"));
    }
}

pub(super) fn entry(key: &str, server: &str, expires_unix_ms: i64) -> pb::Entry {
    pb::Entry {
        key: key.into(),
        server: server.into(),
        expires_unix_ms,
        version: 3,
        ..Default::default()
    }
}

/// A 26-character PHPSESSID-like key (PHP's default: 26 characters of 0-9a-v).
pub(super) fn session_key(n: u64) -> String {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..26)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdefghijklmnopqrstuv"[(x % 32) as usize])
        })
        .collect()
}
