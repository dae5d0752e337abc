//! Reads for clients and operators: Lookup, Show, the tables' summary, and Watch.
//!
//! Show is HAProxy's `show table`; Watch sends the current content, then every change.

use std::sync::Arc;

use proto::stick::v1 as pb;
use tokio::sync::broadcast;

use super::tables::Table;
use super::{Event, Store, StoreError};
use crate::record::Rec;
use common::time::now_ms;

impl Store {
    /// Current content of `tables` (all when empty) and a subscription that starts right after it.
    pub fn watch(
        &self,
        tables: &[String],
    ) -> Result<(Vec<pb::EntryBatch>, broadcast::Receiver<Arc<Event>>), StoreError> {
        let inner = self.lock();
        for t in tables {
            if !inner.tables.contains_key(t) {
                return Err(StoreError::UnknownTable(t.clone()));
            }
        }
        let now = now_ms();
        let mut out = Vec::new();
        let mut names: Vec<&String> = inner.tables.keys().collect();
        names.sort();
        for name in names {
            if !tables.is_empty() && !tables.contains(name) {
                continue;
            }
            let t = &inner.tables[name];
            let entries: Vec<_> = t
                .entries
                .iter()
                .filter(|(_, r)| r.expires > now)
                .map(|(k, r)| r.to_pb(k, now))
                .collect();
            for part in entries.chunks(1024) {
                out.push(pb::EntryBatch {
                    table: name.clone(),
                    entries: part.to_vec(),
                });
            }
        }
        Ok((out, self.events.subscribe()))
    }

    /// Live entries for `keys`.
    pub fn lookup(&self, table: &str, keys: &[String]) -> Result<Vec<pb::Entry>, StoreError> {
        let inner = self.lock();
        let t = inner
            .tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        let now = now_ms();
        let mut out = Vec::new();
        for k in keys {
            let key = t.key(k)?;
            if let Some(r) = t
                .entries
                .get(&key)
                .filter(|r| !r.deleted && r.expires > now)
            {
                out.push(r.to_pb(&key, now));
            }
        }
        Ok(out)
    }

    /// HAProxy's `show table`: header and entries sorted by key, filtered, paged.
    pub fn show(&self, req: &pb::ShowRequest) -> Result<pb::ShowReply, StoreError> {
        let now = now_ms();
        let page = if req.page_size == 0 {
            1000
        } else {
            req.page_size as usize
        };
        // Under the lock, the matching entries are only pointed at, and the page's (and one
        // more, which says whether a next page exists) picked out in linear time; only those
        // are copied, and sorted outside it. A page of a big table then costs a pass over it,
        // not a copy and a sort of all that follows the page token.
        let (info, mut found) = {
            let inner = self.lock();
            let t = inner
                .tables
                .get(&req.table)
                .ok_or_else(|| StoreError::UnknownTable(req.table.clone()))?;
            let key = if req.key.is_empty() {
                None
            } else {
                Some(t.key(&req.key)?)
            };
            let wanted = |k: &str, r: &Rec| {
                r.expires > now
                    && (req.include_deleted || !r.deleted)
                    && (req.server.is_empty() || *r.server == *req.server)
                    && (req.page_token.is_empty() || k > req.page_token.as_str())
            };
            let mut refs: Vec<(&str, &Rec)> = Vec::new();
            // The one key asked for is checked like the others (expiry, server, page token).
            match &key {
                Some(k) => refs.extend(
                    t.entries
                        .get(k)
                        .map(|r| (k.as_str(), r))
                        .filter(|(k, r)| wanted(k, r)),
                ),
                None => refs.extend(t.entries.iter().filter(|(k, r)| wanted(k, r))),
            }
            if refs.len() > page + 1 {
                refs.select_nth_unstable_by(page, |a, b| a.0.cmp(b.0));
                refs.truncate(page + 1);
            }
            let found: Vec<(String, Rec)> = refs
                .into_iter()
                .map(|(k, r)| (k.to_owned(), r.clone()))
                .collect();
            (t.info(), found)
        };
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > page;
        found.truncate(page);
        let entries: Vec<_> = found.iter().map(|(k, r)| r.to_pb(k, now)).collect();
        Ok(pb::ShowReply {
            table: Some(info),
            next_page_token: if more {
                entries.last().map(|e| e.key.clone()).unwrap_or_default()
            } else {
                String::new()
            },
            entries,
        })
    }

    pub fn tables_info(&self) -> Vec<pb::TableInfo> {
        let inner = self.lock();
        let mut v: Vec<_> = inner.tables.values().map(Table::info).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, item};
    use super::*;

    /// Pages of a filtered Show: every matching key once, in key order, and a token only where
    /// more follow.
    #[test]
    fn show_pages_through_a_filtered_table_in_key_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = config(dir.path(), "a", "");
        let s = Store::open(&c).expect("open");
        let items: Vec<_> = (0..1500u32)
            .map(|i| {
                let ip = format!("10.{}.{}.{}", i % 7, (i * 37) % 256, i % 251);
                item(&ip, if i % 3 == 0 { "app1" } else { "app2" })
            })
            .collect();
        s.store("ips", &items).expect("store");
        let mut want: Vec<String> = s
            .lookup(
                "ips",
                &items.iter().map(|i| i.key.clone()).collect::<Vec<_>>(),
            )
            .expect("lookup")
            .into_iter()
            .filter(|e| e.server == "app1")
            .map(|e| e.key)
            .collect();
        want.sort();
        want.dedup();
        let mut got = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let reply = s
                .show(&pb::ShowRequest {
                    table: "ips".into(),
                    server: "app1".into(),
                    page_size: 64,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .expect("show");
            pages += 1;
            assert!(reply.entries.len() <= 64);
            assert!(reply.entries.iter().all(|e| e.server == "app1"));
            got.extend(reply.entries.into_iter().map(|e| e.key));
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
            assert!(pages < 100, "paging does not end");
        }
        assert_eq!(got, want);
        assert_eq!(pages, want.len().div_ceil(64));
        let one = s
            .show(&pb::ShowRequest {
                table: "ips".into(),
                key: want[3].clone(),
                server: "app2".into(),
                ..Default::default()
            })
            .expect("show");
        assert!(one.entries.is_empty(), "the key's server is app1");
    }
}
