//! stickd.toml: storage, sockets, peers and table definitions, validated before anything is bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::Spanned;
use common::{ConfigError, SourceFile};
use serde::Deserialize;

pub use crate::auth::PeerSecret;
use crate::limits::MAX_KEY_LEN;
pub use common::stick_key::KeyType;

/// The file as written. Only [`Config`] (validated) leaves this module.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    data_dir: PathBuf,
    /// Local gRPC unix socket (proxyd and operators).
    socket: PathBuf,
    /// Peer gRPC listen address; defaults to the local peer's own `address`.
    listen: Option<Spanned<String>>,
    /// How often sled flushes to disk (the durability window); default 500ms.
    flush_interval: Option<Spanned<common::Duration>>,
    /// How many of our own changes the log keeps at most for incremental catch-up.
    log_keep: Option<Spanned<u64>>,
    /// Default 1s.
    heartbeat: Option<Spanned<common::Duration>>,
    /// A file holding a secret every peer shares: sent with each replication stream and
    /// required of every incoming one (for peers that do not use mTLS).
    peer_secret_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    tables: Vec<RawTable>,
    tls: Option<Tls>,
}

const DEFAULT_FLUSH: Duration = Duration::from_millis(500);
const DEFAULT_LOG_KEEP: u64 = 1_000_000;
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    len: Option<Spanned<u32>>,
    size: Spanned<common::Size>,
    expire: Spanned<common::Duration>,
}

/// mTLS between peers: our certificate and key, and the CA that signs every peer's certificate.
/// Client certificates are required.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// One stick table's definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableDef {
    pub name: String,
    pub key: KeyType,
    /// Maximum number of entries (tombstones included); the nearest to expiry go first.
    pub size: u64,
    pub expire: Duration,
}

impl TableDef {
    /// The definition as HAProxy would write it, for mismatch reports.
    pub fn describe(&self) -> String {
        let len = match self.key {
            KeyType::String { len } => format!(" len {len}"),
            _ => String::new(),
        };
        format!(
            "type {}{len} size {} expire {}",
            self.key.name(),
            self.size,
            common::Duration(self.expire)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// `host:port` as written (resolved at connect time).
    pub address: String,
}

/// A validated configuration, with the local peer's name resolved.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub local: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: SocketAddr,
    pub flush_interval: Duration,
    pub log_keep: u64,
    pub heartbeat: Duration,
    /// Every other peer (the local one excluded).
    pub peers: Vec<Peer>,
    pub tables: Vec<TableDef>,
    pub tls: Option<Tls>,
    /// The shared secret of `peer_secret_file`, if set.
    pub peer_secret: Option<PeerSecret>,
    /// Set by `--recover-from-peers`, not by the file: a damaged data_dir is moved aside and
    /// refilled from the peers (see `datadir`).
    pub recover_from_peers: bool,
}

impl Config {
    /// Reads and validates `path`; `local` overrides the hostname as the local peer's name.
    pub fn load(path: &Path, local: Option<&str>) -> Result<Config, ConfigError> {
        let src = SourceFile::read(path)?;
        Self::from_source(&src, local)
    }

    /// Only the local socket of the config at `path`, for the operator's commands that speak to
    /// the running stickd: they need no local peer name, so none is resolved or checked.
    pub fn local_socket(path: &Path) -> Result<PathBuf, ConfigError> {
        let src = SourceFile::read(path)?;
        let raw: Raw = src.parse()?;
        if raw.socket.as_os_str().is_empty() {
            return Err(src.error("socket must not be empty"));
        }
        Ok(raw.socket)
    }

    /// Parses and validates a config already read (tests, xtask).
    pub fn from_source(src: &SourceFile, local: Option<&str>) -> Result<Config, ConfigError> {
        let raw: Raw = src.parse()?;
        let local = match local {
            Some(l) => l.to_owned(),
            None => hostname().map_err(|e| {
                src.error(format!(
                    "cannot read the hostname for the local peer name: {e}"
                ))
            })?,
        };
        validate(src, raw, local)
    }

    pub fn table(&self, name: &str) -> Option<&TableDef> {
        self.tables.iter().find(|t| t.name == name)
    }
}

fn hostname() -> std::io::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(h.trim().to_owned())
}

fn validate(src: &SourceFile, raw: Raw, local: String) -> Result<Config, ConfigError> {
    if raw.data_dir.as_os_str().is_empty() {
        return Err(src.error("data_dir must not be empty"));
    }
    if raw.socket.as_os_str().is_empty() {
        return Err(src.error("socket must not be empty"));
    }
    let flush_interval = match &raw.flush_interval {
        Some(f) if f.get_ref().0.is_zero() => {
            return Err(src.error_at(f.span(), "flush_interval must be above zero"));
        }
        Some(f) => f.get_ref().0,
        None => DEFAULT_FLUSH,
    };
    let heartbeat = match &raw.heartbeat {
        Some(h) if h.get_ref().0.is_zero() => {
            return Err(src.error_at(h.span(), "heartbeat must be above zero"));
        }
        Some(h) => h.get_ref().0,
        None => DEFAULT_HEARTBEAT,
    };
    let log_keep = match &raw.log_keep {
        Some(k) if *k.get_ref() < 1000 => {
            return Err(src.error_at(k.span(), "log_keep must be at least 1000"));
        }
        Some(k) => *k.get_ref(),
        None => DEFAULT_LOG_KEEP,
    };
    let peer_secret = match &raw.peer_secret_file {
        Some(f) => Some(
            PeerSecret::read(f.get_ref())
                .map_err(|e| src.error_at(f.span(), format!("peer_secret_file: {e}")))?,
        ),
        None => None,
    };
    let mut names = HashSet::new();
    let mut peers = Vec::new();
    let mut own_address = None;
    for p in raw.peers {
        let name = p.name.get_ref().trim();
        if name.is_empty() || name.len() > 64 {
            return Err(src.error_at(p.name.span(), "peer name must be 1 to 64 characters"));
        }
        if !names.insert(name.to_owned()) {
            return Err(src.error_at(p.name.span(), format!("peer '{name}' is defined twice")));
        }
        let address = p.address.get_ref().trim();
        if address
            .rsplit_once(':')
            .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(src.error_at(
                p.address.span(),
                format!("peer address '{address}' is not host:port"),
            ));
        }
        if name == local {
            own_address = Some((address.to_owned(), p.address.span()));
        } else {
            peers.push(Peer {
                name: name.to_owned(),
                address: address.to_owned(),
            });
        }
    }
    let Some((own_address, own_span)) = own_address else {
        let known: Vec<_> = names.into_iter().collect();
        return Err(src.error(format!(
            "local peer '{local}' is not among the configured peers ({}); pass -L NAME",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    let listen = match &raw.listen {
        Some(l) => l
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|e| src.error_at(l.span(), format!("listen '{}': {e}", l.get_ref())))?,
        None => own_address.parse::<SocketAddr>().map_err(|e| {
            src.error_at(
                own_span,
                format!("local peer address '{own_address}' is not an IP:port ({e}); set listen"),
            )
        })?,
    };
    let mut tables = Vec::new();
    let mut table_names = HashSet::new();
    for t in raw.tables {
        let name = t.name.get_ref().trim().to_owned();
        if name.is_empty() || name.len() > 128 {
            return Err(src.error_at(t.name.span(), "table name must be 1 to 128 characters"));
        }
        if !table_names.insert(name.clone()) {
            return Err(src.error_at(t.name.span(), format!("table '{name}' is defined twice")));
        }
        let key = match (t.kind.get_ref().as_str(), &t.len) {
            ("string", Some(len)) if (1..=MAX_KEY_LEN).contains(&(*len.get_ref() as usize)) => {
                KeyType::String {
                    len: *len.get_ref(),
                }
            }
            ("string", Some(len)) => {
                return Err(src.error_at(
                    len.span(),
                    format!("len must be between 1 and {MAX_KEY_LEN}"),
                ));
            }
            ("string", None) => KeyType::String { len: 32 },
            (_, Some(len)) => {
                return Err(src.error_at(len.span(), "len applies to string tables only"));
            }
            ("ip", None) => KeyType::Ip,
            ("ipv6", None) => KeyType::Ipv6,
            ("integer", None) => KeyType::Integer,
            (other, None) => {
                return Err(src.error_at(
                    t.kind.span(),
                    format!("unknown table type '{other}' (expected ip, ipv6, integer or string)"),
                ));
            }
        };
        let size = t.size.get_ref().0;
        if size == 0 {
            return Err(src.error_at(t.size.span(), "size must be above zero"));
        }
        // Entries are numbered with 32 bits in memory (see entries.rs).
        if size > u64::from(u32::MAX) {
            return Err(src.error_at(
                t.size.span(),
                format!(
                    "size {size} is above the most entries a table holds ({})",
                    u32::MAX
                ),
            ));
        }
        let expire = t.expire.get_ref().0;
        if expire < Duration::from_millis(1) {
            return Err(src.error_at(t.expire.span(), "expire must be at least 1ms"));
        }
        tables.push(TableDef {
            name,
            key,
            size,
            expire,
        });
    }
    if let Some(tls) = &raw.tls {
        for (what, p) in [("cert", &tls.cert), ("key", &tls.key), ("ca", &tls.ca)] {
            if !p.is_file() {
                return Err(src.error(format!(
                    "tls.{what} '{}' is not a readable file",
                    p.display()
                )));
            }
        }
    }
    Ok(Config {
        path: src.path.clone(),
        local,
        data_dir: raw.data_dir,
        socket: raw.socket,
        listen,
        flush_interval,
        log_keep,
        heartbeat,
        peers,
        tables,
        tls: raw.tls,
        peer_secret,
        recover_from_peers: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "/tmp/x"
socket = "/tmp/x.sock"

[[peers]]
name = "a"
address = "127.0.0.1:10000"

[[peers]]
name = "b"
address = "127.0.0.2:10000"

[[tables]]
name = "web"
type = "string"
len = 32
size = "5k"
expire = "5m"
"#;

    fn load(text: &str, local: &str) -> Result<Config, ConfigError> {
        Config::from_source(&SourceFile::from_text("s.toml", text), Some(local))
    }

    #[test]
    fn good_config_resolves_local_peer_and_listen() {
        let c = load(GOOD, "a").expect("valid");
        assert_eq!(c.local, "a");
        assert_eq!(c.listen, "127.0.0.1:10000".parse().expect("addr"));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].name, "b");
        assert_eq!(c.tables[0].size, 5120);
        assert_eq!(c.tables[0].key, KeyType::String { len: 32 });
        assert_eq!(c.tables[0].expire, Duration::from_secs(300));
    }

    #[test]
    fn unknown_local_peer_is_refused() {
        let err = load(GOOD, "zz").expect_err("zz is not a peer");
        assert!(err.to_string().contains("local peer 'zz'"), "{err}");
    }

    #[test]
    fn bad_type_names_its_line() {
        let text = GOOD
            .replace("\"string\"", "\"float\"")
            .replace("len = 32\n", "");
        let err = load(&text, "a").expect_err("bad type");
        assert_eq!(err.at.map(|a| a.0), Some(15), "{err}");
        assert!(err.reason.contains("float"), "{err}");
    }

    #[test]
    fn len_on_ip_table_is_refused() {
        let err = load(&GOOD.replace("\"string\"", "\"ip\""), "a").expect_err("len on ip");
        assert!(err.reason.contains("len applies"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = load(&format!("{GOOD}\nbogus = 1\n"), "a").expect_err("unknown key");
        assert!(err.reason.contains("bogus"), "{err}");
    }

    #[test]
    fn size_past_32_bits_is_refused() {
        let err = load(&GOOD.replace("size = \"5k\"", "size = \"5g\""), "a").expect_err("5g");
        assert!(err.reason.contains("most entries"), "{err}");
    }

    #[test]
    fn zero_durations_name_their_line() {
        for key in ["flush_interval", "heartbeat"] {
            let text = GOOD.replace(
                "socket = \"/tmp/x.sock\"\n",
                &format!("socket = \"/tmp/x.sock\"\n{key} = \"0s\"\n"),
            );
            let err = load(&text, "a").expect_err("zero");
            assert_eq!(err.at, Some((4, 1 + key.len() + 3)), "{err}");
            assert!(err.to_string().starts_with("s.toml:4:"), "{err}");
            assert!(err.reason.contains(key), "{err}");
        }
        let err = load(
            &GOOD.replace(
                "socket = \"/tmp/x.sock\"\n",
                "socket = \"/tmp/x.sock\"\nlog_keep = 10\n",
            ),
            "a",
        )
        .expect_err("small log_keep");
        assert_eq!(err.at.map(|a| a.0), Some(4), "{err}");
    }

    #[test]
    fn duplicate_peer_is_refused() {
        let text = GOOD.replace("name = \"b\"", "name = \"a\"");
        let err = load(&text, "a").expect_err("duplicate");
        assert!(err.reason.contains("twice"), "{err}");
    }
}
