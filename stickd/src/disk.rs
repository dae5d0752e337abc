//! The byte layout of what the store writes to sled: journal batches of table writes, checkpoint
//! chunks of whole tables, and chunks of the change log.
//!
//! Writing every entry as its own sled key cost ~10 µs of B-tree work per write (more once the
//! tree outgrows sled's cache): the store's throughput was sled's. So a batch of writes becomes one
//! sled value (a journal record) and the tables are rewritten now and then as a few large
//! checkpoint values, after which the journal before it goes.

use prost::encoding::{WireType, decode_varint, encode_key, encode_varint};

/// Appends a length-prefixed byte string.
pub fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    encode_varint(b.len() as u64, buf);
    buf.extend_from_slice(b);
}

/// Takes a length-prefixed byte string off the front of `b`.
pub fn get_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let n = decode_varint(b).map_err(|e| e.to_string())?;
    let n = usize::try_from(n).map_err(|_| "length overflows".to_owned())?;
    if b.len() < n {
        return Err(format!("{n} bytes announced, {} left", b.len()));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

/// One table write of a journal batch: table, key, encoded record or `None` for a removal. The
/// store encodes its writes in place the same way (`Pending::entry`), without the record as a
/// separate buffer first.
#[cfg(test)]
pub fn put_write(buf: &mut Vec<u8>, table: &str, key: &[u8], value: Option<&[u8]>) {
    put_bytes(buf, table.as_bytes());
    put_bytes(buf, key);
    match value {
        Some(v) => {
            buf.push(1);
            put_bytes(buf, v);
        }
        None => buf.push(0),
    }
}

/// One write of a journal batch: (table, key, value or removal).
pub type Write<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

/// Every write of a journal batch, in order.
pub fn writes(mut b: &[u8]) -> Result<Vec<Write<'_>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let table = get_bytes(&mut b)?;
        let key = get_bytes(&mut b)?;
        let (&tag, rest) = b.split_first().ok_or("write without a tag")?;
        b = rest;
        let value = match tag {
            1 => Some(get_bytes(&mut b)?),
            0 => None,
            t => return Err(format!("unknown write tag {t}")),
        };
        out.push((table, key, value));
    }
    Ok(out)
}

/// A checkpoint chunk: the table's name, then (key, record) pairs.
pub fn chunk_start(table: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 << 10);
    put_bytes(&mut buf, table.as_bytes());
    buf
}

pub fn chunk_put(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    put_bytes(buf, key);
    put_bytes(buf, value);
}

/// (key, record) pairs of a checkpoint chunk.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// A checkpoint chunk's table and pairs.
pub fn chunk(mut b: &[u8]) -> Result<(&[u8], Pairs<'_>), String> {
    let table = get_bytes(&mut b)?;
    let mut pairs = Vec::new();
    while !b.is_empty() {
        let k = get_bytes(&mut b)?;
        let v = get_bytes(&mut b)?;
        pairs.push((k, v));
    }
    Ok((table, pairs))
}

/// Appends an already encoded `Change` to the encoding of a `Batch` (its field 1, repeated), so
/// that a log chunk is a `Batch` message built without decoding anything again.
pub fn batch_push(buf: &mut Vec<u8>, change: &[u8]) {
    encode_key(1, WireType::LengthDelimited, buf);
    put_bytes(buf, change);
}

/// The big-endian `u64` at `at`, if `b` is long enough.
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Sequence number to sled key (big-endian, so that sled's order is numeric).
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Checkpoint chunk key: generation then chunk number, big-endian so that sled orders them.
pub fn chunk_key(generation: u64, n: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&generation.to_be_bytes());
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use proto::stick::v1 as pb;

    #[test]
    fn writes_round_trip() {
        let mut b = Vec::new();
        put_write(&mut b, "web", b"k1", Some(b"v1"));
        put_write(&mut b, "web", b"k2", None);
        put_write(&mut b, "ips", b"", Some(b""));
        let w = writes(&b).expect("decode");
        assert_eq!(
            w,
            vec![
                (&b"web"[..], &b"k1"[..], Some(&b"v1"[..])),
                (&b"web"[..], &b"k2"[..], None),
                (&b"ips"[..], &b""[..], Some(&b""[..])),
            ]
        );
        assert!(writes(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn log_chunk_is_a_batch() {
        let changes: Vec<pb::Change> = (1..=3)
            .map(|seq| pb::Change {
                seq,
                table: "t".into(),
                kind: None,
            })
            .collect();
        let mut buf = Vec::new();
        for c in &changes {
            batch_push(&mut buf, &c.encode_to_vec());
        }
        let b = pb::Batch::decode(&*buf).expect("batch");
        assert_eq!(b.changes, changes);
    }

    #[test]
    fn chunk_round_trip() {
        let mut b = chunk_start("web");
        chunk_put(&mut b, b"a", b"1");
        chunk_put(&mut b, b"b", b"22");
        let (t, pairs) = chunk(&b).expect("chunk");
        assert_eq!(t, b"web");
        assert_eq!(pairs, vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"22"[..])]);
    }
}
