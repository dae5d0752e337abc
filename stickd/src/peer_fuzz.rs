//! Fuzz target: arbitrary bytes decoded as the stick.v1 peer messages and applied the way a real
//! peer's stream is, against a real store: no panic, and no table ever holds more than its size.

use prost::Message;
use proto::stick::v1 as pb;

use crate::config::Config;
use crate::peer::{Positions, apply_batch, mismatches};
use crate::store::Store;

fn store(dir: &std::path::Path) -> Store {
    let text = format!(
        r#"
data_dir = "{}"
socket = "{}/s.sock"
[[peers]]
name = "a"
address = "127.0.0.1:1"
[[peers]]
name = "b"
address = "127.0.0.2:1"
[[tables]]
name = "t"
type = "string"
len = 8
size = "16"
expire = "5m"
[[tables]]
name = "ips"
type = "ip"
size = "4"
expire = "5m"
"#,
        dir.join("data").display(),
        dir.display()
    );
    let c = Config::from_source(&common::SourceFile::from_text("f.toml", text), Some("a"))
        .expect("config");
    Store::open(&c).expect("open")
}

/// Valid messages of every kind, as the seeds.
fn seeds() -> Vec<Vec<u8>> {
    let now = common::time::now_ms();
    let entry = |key: &str, deleted| pb::Entry {
        key: key.into(),
        server: "app1".into(),
        expires_unix_ms: now + 60_000,
        version: ((now as u64) << 16) + 1,
        origin: "b".into(),
        deleted,
        expires_in_ms: 60_000,
    };
    let change = |seq, table: &str, key: &str| pb::Change {
        seq,
        table: table.into(),
        kind: Some(pb::change::Kind::Entry(entry(key, false))),
    };
    let msgs = [
        pb::peer_message::Msg::Batch(pb::Batch {
            changes: vec![
                change(1, "t", "k1"),
                change(2, "ips", "10.0.0.1"),
                pb::Change {
                    seq: 3,
                    table: "t".into(),
                    kind: Some(pb::change::Kind::Cleared(pb::TableCleared {
                        table: "t".into(),
                        version: 5,
                        origin: "b".into(),
                    })),
                },
            ],
        }),
        pb::peer_message::Msg::Snapshot(pb::SnapshotChunk {
            table: "t".into(),
            entries: vec![entry("a", false), entry("b", true), entry("c", false)],
            cleared_version: 3,
            cleared_origin: "b".into(),
            last: true,
            through_seq: 9,
            table_entries: 3,
        }),
        pb::peer_message::Msg::Hello(pb::Hello {
            from: "b".into(),
            to: "a".into(),
            tables: vec![pb::TableDef {
                name: "t".into(),
                r#type: "string".into(),
                len: 8,
                size: 16,
                expire_ms: 300_000,
            }],
            log_epoch: 1,
            head_seq: 9,
            first_seq: 1,
        }),
        pb::peer_message::Msg::Heartbeat(pb::Heartbeat { unix_ms: now }),
    ];
    msgs.into_iter()
        .map(|m| pb::PeerMessage { msg: Some(m) }.encode_to_vec())
        .collect()
}

/// What the receiving side does with one message (see `peer::receive`).
fn apply(
    store: &Store,
    positions: &Positions,
    position: &mut u64,
    msg: pb::peer_message::Msg,
    defs: &[crate::config::TableDef],
) {
    match msg {
        pb::peer_message::Msg::Batch(b) => {
            let first = b.changes.first().map_or(0, |c| c.seq);
            let r = match apply_batch(store, positions, "b", 1, *position, b.changes.clone(), &[]) {
                // A stream resuming right before this batch takes it.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => apply_batch(
                    store,
                    positions,
                    "b",
                    1,
                    first.saturating_sub(1),
                    b.changes,
                    &[],
                ),
                r => r,
            };
            if let Ok(Some(p)) = r {
                assert!(p >= first.saturating_sub(1), "position went back");
                *position = p;
            }
        }
        pb::peer_message::Msg::Snapshot(c) => {
            let _ = positions.apply_snapshot(store, "b", 1, c);
        }
        pb::peer_message::Msg::Hello(h) => {
            let m = mismatches(defs, &h.tables, &h.from);
            assert!(m.len() <= defs.len() + h.tables.len());
        }
        pb::peer_message::Msg::Heartbeat(_) => {}
    }
}

#[test]
fn fuzz_peer_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let defs = store.table_defs();
    let positions = Positions::load(&store).expect("positions");
    let seeds = seeds();
    let seed_refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let mut position = 0u64;
    let mut inputs = 0u64;
    common::fuzz::run("stickd_peer_messages", &seed_refs, |input| {
        if let Ok(m) = pb::PeerMessage::decode(input)
            && let Some(msg) = m.msg
        {
            apply(&store, &positions, &mut position, msg, &defs);
        }
        // The same bytes as the inner messages a stream carries.
        if let Ok(b) = pb::Batch::decode(input) {
            apply(
                &store,
                &positions,
                &mut position,
                pb::peer_message::Msg::Batch(b),
                &defs,
            );
        }
        if let Ok(c) = pb::SnapshotChunk::decode(input) {
            apply(
                &store,
                &positions,
                &mut position,
                pb::peer_message::Msg::Snapshot(c),
                &defs,
            );
        }
        if let Ok(c) = pb::Change::decode(input) {
            let b = pb::Batch { changes: vec![c] };
            apply(
                &store,
                &positions,
                &mut position,
                pb::peer_message::Msg::Batch(b),
                &defs,
            );
        }
        inputs += 1;
        // Now and then through sled too: the journal must take whatever was applied.
        if inputs.is_multiple_of(64) {
            store.persist().expect("persist");
            store.sweep().expect("sweep");
        }
        for t in store.tables_info() {
            assert!(
                t.used + t.tombstones <= t.size,
                "table {} holds {} + {} entries, size {}",
                t.name,
                t.used,
                t.tombstones,
                t.size
            );
        }
    });
    store.persist().expect("persist");
    // The seeds at least went all the way into the tables.
    let applied = store
        .counters
        .remote_applied
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(applied > 0, "nothing was ever applied");
    println!("{inputs} inputs, {applied} entries applied");
}
