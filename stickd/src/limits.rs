//! The sizes stickd accepts from clients and peers, and the message bounds derived from them.
//!
//! proxyd stores a key (a cookie value, a source address) only if it fits its table's `len`,
//! which it reads from stickd, so the longest key anyone legitimately sends is the largest `len`
//! a config may set. Every message bound below follows from these sizes and from the most items
//! one message carries, so a 60 MB request is refused by gRPC before it is ever decoded.

/// Longest string key, and the largest `len` a string table may have.
pub const MAX_KEY_LEN: usize = 4096;
/// Longest key text of ip, ipv6 and integer tables (the key's canonical form is common's).
pub use common::stick_key::MAX_TYPED_KEY_LEN;
/// Longest server name (it is stored with a one-byte length elsewhere in the mesh).
pub const MAX_SERVER_LEN: usize = 255;
/// Longest peer name (the config's limit).
pub const MAX_PEER_NAME: usize = 64;
/// Longest table name (the config's limit).
pub const MAX_TABLE_NAME: usize = 128;
/// Most changes (or snapshot entries) in one message a peer sends.
pub const MAX_BATCH: usize = 4096;
/// An upper bound on one encoded `Change` of valid fields: the strings plus their tags and
/// lengths, two varints of at most 10 bytes, a bool, and the message framing (a test encodes
/// the largest one and checks it against this).
pub const MAX_CHANGE_BYTES: usize =
    MAX_KEY_LEN + MAX_SERVER_LEN + MAX_PEER_NAME + MAX_TABLE_NAME + 96;
/// Largest gRPC request either server decodes: a full batch of the largest changes (about
/// 19 MB). A peer's batches and snapshot chunks carry at most `MAX_BATCH` of them, proxyd's Store
/// calls 1000 items of a key and a server each.
pub const MAX_REQUEST: usize = MAX_BATCH * MAX_CHANGE_BYTES;
/// Largest message either server sends (Show pages and Watch snapshot batches of long keys).
pub const MAX_REPLY: usize = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use proto::stick::v1 as pb;

    fn longest_change() -> pb::Change {
        pb::Change {
            seq: u64::MAX,
            table: "t".repeat(MAX_TABLE_NAME),
            kind: Some(pb::change::Kind::Entry(pb::Entry {
                key: "k".repeat(MAX_KEY_LEN),
                server: "s".repeat(MAX_SERVER_LEN),
                expires_unix_ms: i64::MIN,
                version: u64::MAX,
                origin: "o".repeat(MAX_PEER_NAME),
                deleted: true,
                expires_in_ms: i64::MIN,
            })),
        }
    }

    #[test]
    fn the_largest_batch_fits_the_request_bound() {
        let c = longest_change();
        // As it travels inside a Batch: a tag and a length prefix around it.
        let framed = c.encoded_len() + prost::length_delimiter_len(c.encoded_len()) + 1;
        assert!(framed <= MAX_CHANGE_BYTES, "{framed} > {MAX_CHANGE_BYTES}");
        let batch = pb::PeerMessage {
            msg: Some(pb::peer_message::Msg::Batch(pb::Batch {
                changes: vec![c; MAX_BATCH],
            })),
        };
        assert!(batch.encoded_len() <= MAX_REQUEST);
        const { assert!(MAX_REQUEST < 60 << 20) };
    }
}
