//! Helpers for the tests of the store, and of the peer code over a real store.
//!
//! A config of two tables, a reopen that waits for sled's lock, and entries to write.

use common::SourceFile;
use proto::stick::v1 as pb;

use super::Store;
use crate::config::Config;

/// A config for node `local` with tables "web" (string keys of 8 bytes, 3 entries) and "ips"
/// (5k entries), its data in `dir/local`, plus `extra` TOML.
pub(crate) fn config(dir: &std::path::Path, local: &str, extra: &str) -> Config {
    let text = format!(
        r#"
data_dir = "{}"
socket = "{}/s.sock"
log_keep = 1000
[[peers]]
name = "a"
address = "127.0.0.1:1"
[[peers]]
name = "b"
address = "127.0.0.2:1"
[[tables]]
name = "web"
type = "string"
len = 8
size = "3"
expire = "5m"
[[tables]]
name = "ips"
type = "ip"
size = "5k"
expire = "5m"
{extra}
"#,
        dir.join(local).display(),
        dir.display()
    );
    Config::from_source(&SourceFile::from_text("t.toml", text), Some(local)).expect("config")
}

/// sled releases its directory lock from a background thread shortly after the last handle
/// goes: a reopen in the same process may need a few tries (a new process never does).
pub(crate) fn reopen(c: &Config) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(c) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

pub(crate) fn item(key: &str, server: &str) -> pb::StoreItem {
    pb::StoreItem {
        key: key.into(),
        server: server.into(),
        expires_unix_ms: 0,
    }
}

/// An entry written by "b".
pub(crate) fn entry(
    key: &str,
    server: &str,
    version: u64,
    expires: i64,
    deleted: bool,
) -> pb::Entry {
    pb::Entry {
        key: key.into(),
        server: server.into(),
        expires_unix_ms: expires,
        version,
        origin: "b".into(),
        deleted,
        expires_in_ms: 0,
    }
}
