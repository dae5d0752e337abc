//! What the stick rules ask of the cache: the tables a config's rules use and the kind of key
//! each takes, the check of those tables against stickd's, and the key of a client address.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::stick::v1 as pb;

use super::StickCache;
use crate::config::{Config, StickOn};

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("stick table '{table}': {reason}")]
    Table { table: String, reason: String },
}

/// What a table's keys are, from the rules that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A cookie value: needs a `string` table.
    Text,
    /// A client address: needs an `ip` or `ipv6` table.
    Address,
}

impl StickCache {
    /// The tables the config's stick rules use; `None` without any rule.
    pub fn for_config(config: &Config) -> Option<Arc<StickCache>> {
        let mut tables: Vec<(String, KeyKind)> = Vec::new();
        for s in config.backends.iter().filter_map(|b| b.stick.as_ref()) {
            let kind = match s.on {
                StickOn::Cookie(_) => KeyKind::Text,
                StickOn::Src => KeyKind::Address,
            };
            if !tables.iter().any(|(n, _)| *n == s.table) {
                tables.push((s.table.clone(), kind));
            }
        }
        (!tables.is_empty()).then(|| Arc::new(StickCache::new(tables)))
    }

    /// The key of a client address in table `t` (its canonical form in stickd).
    pub fn address_key(&self, t: usize, ip: std::net::IpAddr) -> Option<String> {
        common::stick_key::address_key(self.tables[t].key_type(), ip)
    }

    /// Learns the tables' types, expiry and key length from stickd's ListTables; names the
    /// first table that stickd lacks or has with a type the rules cannot use.
    pub fn check_tables(&self, have: &[pb::TableInfo]) -> Result<(), StickError> {
        for t in &self.tables {
            let Some(info) = have.iter().find(|i| i.name == t.name) else {
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: "not defined in stickd".into(),
                });
            };
            let ok = match t.kind {
                KeyKind::Text => info.r#type == "string",
                KeyKind::Address => info.r#type == "ip" || info.r#type == "ipv6",
            };
            if !ok {
                let want = match t.kind {
                    KeyKind::Text => "string (for a cookie)",
                    KeyKind::Address => "ip or ipv6 (for src)",
                };
                return Err(StickError::Table {
                    table: t.name.clone(),
                    reason: format!("type {} in stickd, {want} needed", info.r#type),
                });
            }
            t.expire_ms.store(info.expire_ms, Ordering::Relaxed);
            t.max_len.store(
                if info.r#type == "string" {
                    u64::from(info.len)
                } else {
                    0
                },
                Ordering::Relaxed,
            );
            t.ipv6.store(info.r#type == "ipv6", Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_types_are_checked() {
        let c = StickCache::new(vec![
            ("t".into(), KeyKind::Text),
            ("ips".into(), KeyKind::Address),
        ]);
        let info = |name: &str, ty: &str| pb::TableInfo {
            name: name.into(),
            r#type: ty.into(),
            len: 32,
            expire_ms: 1000,
            ..Default::default()
        };
        let e = c
            .check_tables(&[info("t", "string")])
            .expect_err("ips missing");
        assert!(e.to_string().contains("'ips'"), "{e}");
        let e = c
            .check_tables(&[info("t", "integer"), info("ips", "ip")])
            .expect_err("wrong type");
        assert!(
            e.to_string().contains("'t'") && e.to_string().contains("integer"),
            "{e}"
        );
        c.check_tables(&[info("t", "string"), info("ips", "ipv6")])
            .expect("compatible");
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(c.address_key(1, ip).as_deref(), Some("::ffff:10.0.0.1"));
    }
}
