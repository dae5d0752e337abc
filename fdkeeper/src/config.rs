//! fdkeeper's TOML configuration: loaded, then validated, or refused with file:line:reason.

use std::path::{Path, PathBuf};

use common::config::Spanned;
use common::{ConfigError, SourceFile};
use serde::Deserialize;

use crate::pattern::BindPattern;
use crate::sys;

pub const DEFAULT_BACKLOG: u32 = 4096;
pub const DEFAULT_MAX_LISTENERS: u32 = 256;
/// A hard ceiling: every held listener is an fd and ~80 bytes of each Listing, which
/// must fit one datagram (the default socket buffer is ~208 KiB).
const MAX_MAX_LISTENERS: u32 = 1024;

/// A uid/gid written as a number or a name.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Principal {
    Id(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    socket: Spanned<PathBuf>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<Principal>>,
    admin: Spanned<PathBuf>,
    #[serde(default)]
    allowed_uids: Vec<Spanned<Principal>>,
    #[serde(default)]
    allowed_gids: Vec<Spanned<Principal>>,
    allowed_binds: Spanned<Vec<Spanned<String>>>,
    default_backlog: Option<Spanned<u32>>,
    max_listeners: Option<Spanned<u32>>,
}

/// A validated configuration; only [`Config::load`] and [`Config::from_source`] make one.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) socket: PathBuf,
    pub(crate) socket_mode: u32,
    pub(crate) socket_group: Option<u32>,
    pub(crate) admin: PathBuf,
    pub(crate) allowed_uids: Vec<u32>,
    pub(crate) allowed_gids: Vec<u32>,
    pub(crate) allowed_binds: Vec<BindPattern>,
    pub(crate) default_backlog: u32,
    pub(crate) max_listeners: u32,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&SourceFile::read(path)?)
    }

    /// Parses and validates config text (tests, `check`).
    pub fn from_source(src: &SourceFile) -> Result<Self, ConfigError> {
        let raw: Raw = src.parse()?;
        validate(src, raw)
    }

    /// The lending socket (SOCK_SEQPACKET).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The admin gRPC socket.
    pub fn admin(&self) -> &Path {
        &self.admin
    }

    /// Whether a peer with these credentials may borrow and deposit.
    pub fn allows_peer(&self, uid: u32, gid: u32) -> bool {
        self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid)
    }

    /// Whether fdkeeper may bind `addr`.
    pub fn allows_bind(&self, addr: &std::net::SocketAddr) -> bool {
        self.allowed_binds.iter().any(|p| p.matches(addr))
    }
}

fn validate(src: &SourceFile, raw: Raw) -> Result<Config, ConfigError> {
    let socket = unix_path(src, &raw.socket, "socket")?;
    let admin = unix_path(src, &raw.admin, "admin")?;
    if same_file(&socket, &admin) {
        let (line, col) = src.line_col(raw.socket.span().start);
        return Err(src.error_at(
            raw.admin.span(),
            format!(
                "admin '{}' is the same file as socket '{}' at {}:{line}:{col}",
                admin.display(),
                socket.display(),
                src.path.display()
            ),
        ));
    }

    let socket_mode = match &raw.socket_mode {
        None => 0o600,
        Some(m) => {
            let text = m.get_ref().trim();
            let mode = u32::from_str_radix(text.strip_prefix("0o").unwrap_or(text), 8)
                .ok()
                .filter(|&v| v <= 0o777)
                .ok_or_else(|| {
                    src.error_at(
                        m.span(),
                        format!(
                            "socket_mode '{text}' is not an octal mode like \"0600\" or \"0660\""
                        ),
                    )
                })?;
            if mode & 0o600 != 0o600 {
                return Err(src.error_at(
                    m.span(),
                    "socket_mode must give the owner read and write (0600 at least)",
                ));
            }
            mode
        }
    };

    let socket_group = raw
        .socket_group
        .as_ref()
        .map(|g| resolve(src, g, Kind::Group))
        .transpose()?;

    let allowed_uids = raw
        .allowed_uids
        .iter()
        .map(|u| resolve(src, u, Kind::User))
        .collect::<Result<Vec<_>, _>>()?;
    let allowed_gids = raw
        .allowed_gids
        .iter()
        .map(|g| resolve(src, g, Kind::Group))
        .collect::<Result<Vec<_>, _>>()?;
    if allowed_uids.is_empty() && allowed_gids.is_empty() {
        return Err(src.error(
            "allowed_uids and allowed_gids are both empty: nobody could borrow a listener",
        ));
    }

    if raw.allowed_binds.get_ref().is_empty() {
        return Err(src.error_at(
            raw.allowed_binds.span(),
            "allowed_binds is empty: fdkeeper could bind nothing",
        ));
    }
    let allowed_binds = raw
        .allowed_binds
        .get_ref()
        .iter()
        .map(|p| {
            p.get_ref().parse::<BindPattern>().map_err(|e| {
                src.error_at(
                    p.span(),
                    format!("allowed_binds entry '{}': {e}", p.get_ref()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let default_backlog = match &raw.default_backlog {
        None => DEFAULT_BACKLOG,
        Some(b) if (1..=65535).contains(b.get_ref()) => *b.get_ref(),
        Some(b) => {
            return Err(src.error_at(b.span(), "default_backlog must be 1 to 65535"));
        }
    };
    let max_listeners = match &raw.max_listeners {
        None => DEFAULT_MAX_LISTENERS,
        Some(m) if (1..=MAX_MAX_LISTENERS).contains(m.get_ref()) => *m.get_ref(),
        Some(m) => {
            return Err(src.error_at(
                m.span(),
                format!("max_listeners must be 1 to {MAX_MAX_LISTENERS}"),
            ));
        }
    };

    Ok(Config {
        socket,
        socket_mode,
        socket_group,
        admin,
        allowed_uids,
        allowed_gids,
        allowed_binds,
        default_backlog,
        max_listeners,
    })
}

fn unix_path(src: &SourceFile, p: &Spanned<PathBuf>, key: &str) -> Result<PathBuf, ConfigError> {
    let path = p.get_ref();
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(src.error_at(p.span(), format!("{key} must not be empty")));
    }
    if len > common::seqpacket::max_path_len() {
        return Err(src.error_at(
            p.span(),
            format!(
                "{key} is {len} bytes long; a unix socket path holds at most {}",
                common::seqpacket::max_path_len()
            ),
        ));
    }
    if path.file_name().is_none() {
        return Err(src.error_at(p.span(), format!("{key} must name a file")));
    }
    Ok(path.clone())
}

/// Whether two socket paths name one file: compared by their directory as it resolves on
/// this host (symlinks, `..`, `./`) and their file name, never as text.
fn same_file(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| -> PathBuf {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match (std::fs::canonicalize(dir), p.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            // A directory that does not exist yet is compared as written, component-wise.
            _ => p.components().collect(),
        }
    };
    resolved(a) == resolved(b)
}

#[derive(Clone, Copy)]
enum Kind {
    User,
    Group,
}

fn resolve(src: &SourceFile, p: &Spanned<Principal>, kind: Kind) -> Result<u32, ConfigError> {
    type Lookup = fn(&str) -> std::io::Result<Option<u32>>;
    let (what, lookup): (&str, Lookup) = match kind {
        Kind::User => ("user", sys::uid_by_name),
        Kind::Group => ("group", sys::gid_by_name),
    };
    match p.get_ref() {
        Principal::Id(id) => Ok(*id),
        Principal::Name(name) => {
            // A number written as a string is an id too ("65534").
            if let Ok(id) = name.parse::<u32>() {
                return Ok(id);
            }
            match lookup(name) {
                Ok(Some(id)) => Ok(id),
                Ok(None) => Err(src.error_at(p.span(), format!("no {what} named '{name}'"))),
                Err(e) => {
                    Err(src.error_at(p.span(), format!("cannot look up {what} '{name}': {e}")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
socket = "/run/fdkeeper/lend.sock"
socket_mode = "0660"
socket_group = "root"
admin = "/run/fdkeeper/admin.sock"
allowed_uids = [0, "root", "65534"]
allowed_gids = ["root"]
allowed_binds = ["127.0.0.0/8", "[::1]:443", "*:8000-8099"]
default_backlog = 1024
max_listeners = 32
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_source(&SourceFile::from_text("/etc/fdkeeper.toml", text))
    }

    #[test]
    fn good_config_loads() {
        let c = load(GOOD).expect("valid");
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.socket_group, Some(0));
        assert_eq!(c.allowed_uids, vec![0, 0, 65534]);
        assert_eq!(c.allowed_gids, vec![0]);
        assert_eq!(c.default_backlog, 1024);
        assert_eq!(c.max_listeners, 32);
        assert!(c.allows_bind(&"127.0.0.9:1".parse().expect("addr")));
        assert!(c.allows_bind(&"0.0.0.0:8050".parse().expect("addr")));
        assert!(!c.allows_bind(&"0.0.0.0:80".parse().expect("addr")));
        assert!(c.allows_peer(65534, 65534));
        assert!(c.allows_peer(1000, 0));
        assert!(!c.allows_peer(1000, 1000));
    }

    #[test]
    fn defaults() {
        let c = load(
            "socket = \"/a/s\"\nadmin = \"/a/b\"\nallowed_uids = [0]\nallowed_binds = [\"*\"]\n",
        )
        .expect("valid");
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.default_backlog, DEFAULT_BACKLOG);
        assert_eq!(c.max_listeners, DEFAULT_MAX_LISTENERS);
        assert_eq!(c.socket_group, None);
    }

    fn err(text: &str) -> String {
        load(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn errors_name_file_and_line() {
        let base = "socket = \"/a/s\"\nadmin = \"/a/b\"\nallowed_uids = [0]\n";
        let e = err(&format!("{base}allowed_binds = [\"*\"]\nbogus = 1\n"));
        assert!(e.starts_with("/etc/fdkeeper.toml:5:"), "{e}");
        assert!(e.contains("bogus"), "{e}");

        let e = err(&format!(
            "{base}allowed_binds = [\"*\", \"localhost:80\"]\n"
        ));
        assert!(e.starts_with("/etc/fdkeeper.toml:4:"), "{e}");
        assert!(e.contains("localhost:80"), "{e}");

        let e = err(&format!("{base}allowed_binds = []\n"));
        assert!(e.starts_with("/etc/fdkeeper.toml:4:"), "{e}");

        let e = err(&format!(
            "{base}allowed_binds = [\"*\"]\nsocket_mode = \"0999\"\n"
        ));
        assert!(e.starts_with("/etc/fdkeeper.toml:5:"), "{e}");
        let e = err(&format!(
            "{base}allowed_binds = [\"*\"]\nsocket_mode = \"0066\"\n"
        ));
        assert!(e.contains("owner"), "{e}");

        let e = err(&format!(
            "{base}allowed_binds = [\"*\"]\nallowed_gids = [\"no-such-group-xyz\"]\n"
        ));
        assert!(e.starts_with("/etc/fdkeeper.toml:5:"), "{e}");
        assert!(e.contains("no-such-group-xyz"), "{e}");

        let e = err(&format!(
            "{base}allowed_binds = [\"*\"]\ndefault_backlog = 0\n"
        ));
        assert!(e.starts_with("/etc/fdkeeper.toml:5:"), "{e}");

        let long = "x".repeat(200);
        let e = err(&format!(
            "socket = \"/{long}\"\nadmin = \"/a/b\"\nallowed_uids = [0]\nallowed_binds = [\"*\"]\n"
        ));
        assert!(e.starts_with("/etc/fdkeeper.toml:1:"), "{e}");

        let e = err("socket = \"/a/s\"\nadmin = \"/a/b\"\nallowed_binds = [\"*\"]\n");
        assert!(e.contains("nobody could borrow"), "{e}");

        let e = err(
            "socket = \"/tmp/./lend.sock\"\nadmin = \"/tmp/../tmp/lend.sock\"\nallowed_uids = [0]\nallowed_binds = [\"*\"]\n",
        );
        assert!(e.starts_with("/etc/fdkeeper.toml:2:9: "), "{e}");
        assert!(
            e.contains("same file as socket '/tmp/./lend.sock' at /etc/fdkeeper.toml:1:10"),
            "{e}"
        );

        let e = err("socket = \"/a/s\"\nallowed_uids = [0]\nallowed_binds = [\"*\"]\n");
        assert!(e.contains("admin"), "{e}");
    }
}
