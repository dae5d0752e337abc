//! Data directories of older versions, read once and rewritten in today's layout.
//!
//! Tables were kept as one sled tree per table (a key per entry), the log as one key per
//! change.

use super::tables::Loading;
use super::{Store, StoreError, log};
use crate::disk::{seq_key, u64_at};

/// Before checkpoints, every entry was a key of its table's own tree: reads those of the
/// configured tables. Returns the trees read, which go once a checkpoint holds their entries
/// (see [`drop_table_trees`]).
pub(super) fn load_table_trees(
    db: &sled::Db,
    loading: &mut Loading,
) -> Result<Vec<String>, StoreError> {
    let mut legacy = Vec::new();
    let names: Vec<String> = loading.tables.keys().cloned().collect();
    let trees = db.tree_names();
    for name in names {
        let old = format!("table/{name}");
        if !trees.iter().any(|n| **n == *old.as_bytes()) {
            continue;
        }
        if let Some(mut t) = loading.table(&name) {
            for kv in db.open_tree(&old)?.iter() {
                let (k, v) = kv?;
                t.load(&k, Some(&v))?;
            }
        }
        legacy.push(old);
    }
    Ok(legacy)
}

/// Writes a checkpoint of the tables read from per-table trees, then drops those trees.
pub(super) fn drop_table_trees(store: &Store, legacy: Vec<String>) -> Result<(), StoreError> {
    if legacy.is_empty() {
        return Ok(());
    }
    // The entries now live in a checkpoint: the per-key trees can go.
    store.checkpoint_now()?;
    for name in legacy {
        store.db.drop_tree(name)?;
    }
    Ok(())
}

/// The log before chunks: one record per key, rewritten as chunks once.
pub(super) fn rewrite_old_log(db: &sled::Db, log: &sled::Tree) -> Result<(), StoreError> {
    if !db.tree_names().iter().any(|n| **n == *b"log") {
        return Ok(());
    }
    let old = db.open_tree("log")?;
    let mut buf = Vec::new();
    let mut first = None;
    let mut n = 0;
    for kv in old.iter() {
        let (k, v) = kv?;
        first.get_or_insert(u64_at(&k, 0).unwrap_or(0));
        crate::disk::batch_push(&mut buf, &v);
        n += 1;
        if n == log::LOG_CHUNK {
            log.insert(seq_key(first.take().unwrap_or(0)), std::mem::take(&mut buf))?;
            n = 0;
        }
    }
    if let Some(f) = first {
        log.insert(seq_key(f), buf)?;
    }
    db.drop_tree("log")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;
    use proto::stick::v1 as pb;

    use super::super::testing::{config, reopen};
    use super::*;
    use crate::record::Rec;
    use common::time::now_ms;

    #[test]
    fn per_key_trees_of_older_versions_are_read_and_moved() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        {
            let db = sled::open(&c.data_dir).expect("sled");
            let rec = Rec {
                server: "app1".into(),
                expires: now_ms() + 60_000,
                version: 7 << 16,
                origin: Arc::from("a"),
                deleted: false,
            };
            db.open_tree("table/ips")
                .expect("tree")
                .insert("10.0.0.9", rec.encode())
                .expect("insert");
            let change = pb::Change {
                seq: 1,
                table: "ips".into(),
                kind: Some(pb::change::Kind::Entry(rec.to_pb("10.0.0.9", now_ms()))),
            };
            db.open_tree("log")
                .expect("tree")
                .insert(seq_key(1), change.encode_to_vec())
                .expect("insert");
            db.flush().expect("flush");
        }
        let s = reopen(&c);
        assert_eq!(s.head(), 1);
        assert_eq!(s.read_log(1, 5).expect("log").len(), 1);
        assert_eq!(
            s.lookup("ips", &["10.0.0.9".into()]).expect("l")[0].server,
            "app1"
        );
        let names = s.db.tree_names();
        assert!(!names.iter().any(|n| **n == *b"table/ips" || **n == *b"log"));
        drop(s);
        assert_eq!(reopen(&c).tables_info()[0].used, 1);
    }
}
