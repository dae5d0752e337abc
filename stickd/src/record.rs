//! One entry's record, its encoding on disk, and the names that records share.
//!
//! A record holds the server, the expiry, the version, the origin and whether it is a tombstone.
//! The key is not part of the record: a table's entries keep it beside it in memory, and sled
//! keeps it beside the record's encoding on disk.

use std::collections::HashSet;
use std::sync::Arc;

use proto::stick::v1 as pb;

/// One entry in memory. Server and origin names are shared by every entry that names them
/// (see [`Names`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rec {
    pub server: Arc<str>,
    pub expires: i64,
    pub version: u64,
    pub origin: Arc<str>,
    pub deleted: bool,
}

impl Rec {
    pub fn to_pb(&self, key: &str, now: i64) -> pb::Entry {
        pb::Entry {
            key: key.to_owned(),
            server: self.server.to_string(),
            expires_unix_ms: self.expires,
            version: self.version,
            origin: self.origin.to_string(),
            deleted: self.deleted,
            expires_in_ms: self.expires - now,
        }
    }

    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18 + self.origin.len() + self.server.len());
        self.encode_into(&mut v);
        v
    }

    pub fn encoded_len(&self) -> usize {
        18 + self.origin.len().min(255) + self.server.len()
    }

    pub fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.expires.to_be_bytes());
        v.push(u8::from(self.deleted));
        // Origin names are at most 64 bytes (config), so one length byte is enough.
        v.push(self.origin.len().min(255) as u8);
        v.extend_from_slice(&self.origin.as_bytes()[..self.origin.len().min(255)]);
        v.extend_from_slice(self.server.as_bytes());
    }

    pub fn decode(b: &[u8], names: &mut Names) -> Result<Rec, String> {
        if b.len() < 18 {
            return Err(format!("{} bytes, expected at least 18", b.len()));
        }
        let version = u64::from_be_bytes(b[0..8].try_into().map_err(|_| "version")?);
        let expires = i64::from_be_bytes(b[8..16].try_into().map_err(|_| "expiry")?);
        let deleted = b[16] != 0;
        let olen = usize::from(b[17]);
        let origin = b.get(18..18 + olen).ok_or("origin runs past the record")?;
        let server = &b[18 + olen..];
        Ok(Rec {
            server: names.get(std::str::from_utf8(server).map_err(|e| e.to_string())?),
            expires,
            version,
            origin: names.get(std::str::from_utf8(origin).map_err(|e| e.to_string())?),
            deleted,
        })
    }
}

/// Names that millions of entries share (their server's and their origin's): one allocation
/// per name instead of one per entry, and no allocation to store or merge an entry whose names
/// are known.
#[derive(Default)]
pub(crate) struct Names {
    set: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

/// Most names remembered: they come from clients and peers, and random ones must not grow the
/// set for ever. Past this, names no entry holds any more are forgotten; if every one is still
/// held, a new name gets an allocation of its own (correct, only bigger).
const MAX_NAMES: usize = 4096;

impl Names {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.set.get(name) {
            return n.clone();
        }
        if self.set.len() >= MAX_NAMES {
            self.set.retain(|n| Arc::strong_count(n) > 1);
        }
        let n: Arc<str> = Arc::from(name);
        if self.set.len() < MAX_NAMES {
            self.set.insert(n.clone());
        }
        n
    }
}
