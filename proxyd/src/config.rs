//! proxyd.toml: serde structs, defaults, and the validation that every loaded config goes through.
//!
//! The layout follows HAProxy (global, frontends, backends with servers) so that the full load
//! balancer (issue 4) adds keys to these tables instead of inventing new ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use common::config::Spanned;
use common::{ConfigError, Duration, SourceFile};
use serde::Deserialize;

/// Where `proxyd` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/proxyd/proxyd.toml";

/// Largest config the master will pass to a worker in one control datagram.
pub const MAX_CONFIG_BYTES: usize = 192 * 1024;

/// A config that passed `validate()`; the only kind the rest of proxyd ever sees.
#[derive(Clone, Debug)]
pub struct Config {
    /// The exact file text, handed to workers so they run what the master validated.
    pub source: SourceFile,
    pub global: Global,
    pub defaults: Defaults,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug)]
pub struct Global {
    pub admin_socket: PathBuf,
    pub fdkeeper_socket: PathBuf,
    pub drain_timeout: StdDuration,
    pub max_draining: usize,
    pub threads: usize,
    pub worker_ready_timeout: StdDuration,
}

/// Timeouts shared by every frontend and backend (HAProxy's `defaults` section).
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Connecting to a server.
    pub timeout_connect: StdDuration,
    /// Waiting for the client while it sends a request.
    pub timeout_client: StdDuration,
    /// Waiting for the server while it answers.
    pub timeout_server: StdDuration,
    /// From the first byte of a request to the end of its head.
    pub timeout_http_request: StdDuration,
    /// How long an idle keep-alive client connection waits for its next request.
    pub timeout_http_keep_alive: StdDuration,
    /// How long an idle pooled server connection is kept.
    pub timeout_pool_idle: StdDuration,
    /// Idle connections kept per server.
    pub pool_max_idle: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    Roundrobin,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    /// Addresses as written (the key under which fdkeeper holds the socket).
    pub bind: Vec<String>,
    /// 0: fdkeeper's default.
    pub backlog: u32,
    pub mode: Mode,
    /// Index into `Config::backends`.
    pub default_backend: usize,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    global: Spanned<RawGlobal>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    frontend: Vec<Spanned<RawFrontend>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    admin_socket: Option<Spanned<PathBuf>>,
    fdkeeper_socket: Option<Spanned<PathBuf>>,
    drain_timeout: Option<Duration>,
    max_draining: Option<Spanned<u64>>,
    threads: Option<Spanned<u64>>,
    worker_ready_timeout: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout_connect: Option<Duration>,
    timeout_client: Option<Duration>,
    timeout_server: Option<Duration>,
    timeout_http_request: Option<Duration>,
    timeout_http_keep_alive: Option<Duration>,
    timeout_pool_idle: Option<Duration>,
    pool_max_idle: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    name: Spanned<String>,
    bind: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    backlog: u32,
    mode: Option<Mode>,
    default_backend: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    balance: Option<Balance>,
    #[serde(default)]
    server: Vec<Spanned<RawServer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    address: Spanned<String>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_source(SourceFile::read(path)?)
    }

    /// Parses and validates text (the worker's copy of what the master validated; tests).
    pub fn from_source(source: SourceFile) -> Result<Config, ConfigError> {
        if source.text.len() > MAX_CONFIG_BYTES {
            return Err(source.error(format!(
                "file is larger than {} KiB",
                MAX_CONFIG_BYTES / 1024
            )));
        }
        let raw: RawConfig = source.parse()?;
        validate(source, raw)
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }
}

fn validate(src: SourceFile, raw: RawConfig) -> Result<Config, ConfigError> {
    let global_span = raw.global.span();
    let g = raw.global.into_inner();
    let admin_socket = required_path(&src, g.admin_socket, global_span.clone(), "admin_socket")?;
    let fdkeeper_socket = required_path(
        &src,
        g.fdkeeper_socket,
        global_span.clone(),
        "fdkeeper_socket",
    )?;
    let max_draining = match g.max_draining {
        None => 4,
        Some(v) if *v.get_ref() >= 1 && *v.get_ref() <= 64 => *v.get_ref() as usize,
        Some(v) => return Err(src.error_at(v.span(), "max_draining must be between 1 and 64")),
    };
    let threads = match g.threads {
        None => 1,
        Some(v) if *v.get_ref() >= 1 && *v.get_ref() <= 256 => *v.get_ref() as usize,
        Some(v) => return Err(src.error_at(v.span(), "threads must be between 1 and 256")),
    };
    let worker_ready_timeout = match g.worker_ready_timeout {
        None => StdDuration::from_secs(10),
        Some(v) if v.get_ref().0 >= StdDuration::from_millis(100) => v.get_ref().0,
        Some(v) => {
            return Err(src.error_at(v.span(), "worker_ready_timeout must be at least 100ms"));
        }
    };
    let global = Global {
        admin_socket,
        fdkeeper_socket,
        drain_timeout: g.drain_timeout.map_or(StdDuration::from_secs(30), |d| d.0),
        max_draining,
        threads,
        worker_ready_timeout,
    };

    let d = raw.defaults;
    let secs = StdDuration::from_secs;
    let defaults = Defaults {
        timeout_connect: d.timeout_connect.map_or(secs(5), |d| d.0),
        timeout_client: d.timeout_client.map_or(secs(60), |d| d.0),
        timeout_server: d.timeout_server.map_or(secs(60), |d| d.0),
        timeout_http_request: d.timeout_http_request.map_or(secs(10), |d| d.0),
        timeout_http_keep_alive: d.timeout_http_keep_alive.map_or(secs(60), |d| d.0),
        timeout_pool_idle: d.timeout_pool_idle.map_or(secs(30), |d| d.0),
        pool_max_idle: d.pool_max_idle.map_or(64, |n| n as usize),
    };

    let mut backends = Vec::with_capacity(raw.backend.len());
    let mut backend_names: HashMap<String, usize> = HashMap::new();
    for b in raw.backend {
        let b_span = b.span();
        let b = b.into_inner();
        let name = checked_name(&src, &b.name, "backend")?;
        if backend_names.insert(name.clone(), backends.len()).is_some() {
            return Err(src.error_at(b.name.span(), format!("duplicate backend name '{name}'")));
        }
        if b.server.is_empty() {
            return Err(src.error_at(b_span, format!("backend '{name}' has no server")));
        }
        let mut servers: Vec<Server> = Vec::with_capacity(b.server.len());
        for s in b.server {
            let s = s.into_inner();
            let sname = checked_name(&src, &s.name, "server")?;
            if servers.iter().any(|x| x.name == sname) {
                return Err(src.error_at(
                    s.name.span(),
                    format!("duplicate server name '{sname}' in backend '{name}'"),
                ));
            }
            let address = s.address.get_ref().parse::<SocketAddr>().map_err(|_| {
                src.error_at(
                    s.address.span(),
                    format!(
                        "bad server address '{}' (expected ip:port)",
                        s.address.get_ref()
                    ),
                )
            })?;
            if address.port() == 0 {
                return Err(src.error_at(s.address.span(), "server port must not be 0"));
            }
            servers.push(Server {
                name: sname,
                address,
            });
        }
        backends.push(Backend {
            name,
            balance: b.balance.unwrap_or(Balance::Roundrobin),
            servers,
        });
    }

    let mut frontends: Vec<Frontend> = Vec::with_capacity(raw.frontend.len());
    let mut all_binds: HashMap<String, String> = HashMap::new();
    for f in raw.frontend {
        let f_span = f.span();
        let f = f.into_inner();
        let name = checked_name(&src, &f.name, "frontend")?;
        if frontends.iter().any(|x| x.name == name) {
            return Err(src.error_at(f.name.span(), format!("duplicate frontend name '{name}'")));
        }
        if f.bind.get_ref().is_empty() {
            return Err(src.error_at(f.bind.span(), format!("frontend '{name}' binds nothing")));
        }
        let mut bind = Vec::new();
        for addr in f.bind.into_inner() {
            if addr.get_ref().parse::<SocketAddr>().is_err() {
                return Err(src.error_at(
                    addr.span(),
                    format!(
                        "bad bind address '{}' (expected ip:port, [ipv6]:port)",
                        addr.get_ref()
                    ),
                ));
            }
            if let Some(other) = all_binds.insert(addr.get_ref().clone(), name.clone()) {
                return Err(src.error_at(
                    addr.span(),
                    format!(
                        "address '{}' is already bound by frontend '{other}'",
                        addr.get_ref()
                    ),
                ));
            }
            bind.push(addr.into_inner());
        }
        let Some(db) = f.default_backend else {
            return Err(src.error_at(f_span, format!("frontend '{name}' has no default_backend")));
        };
        let Some(&default_backend) = backend_names.get(db.get_ref()) else {
            return Err(src.error_at(
                db.span(),
                format!("unknown backend '{}' in default_backend", db.get_ref()),
            ));
        };
        frontends.push(Frontend {
            name,
            bind,
            backlog: f.backlog,
            mode: f.mode.unwrap_or(Mode::Http),
            default_backend,
        });
    }
    if frontends.is_empty() {
        return Err(src.error("no [[frontend]] defined"));
    }

    Ok(Config {
        source: src,
        global,
        defaults,
        frontends,
        backends,
    })
}

fn required_path(
    src: &SourceFile,
    v: Option<Spanned<PathBuf>>,
    section: std::ops::Range<usize>,
    key: &str,
) -> Result<PathBuf, ConfigError> {
    match v {
        None => Err(src.error_at(section, format!("[global] needs {key}"))),
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            Err(src.error_at(p.span(), format!("{key} must not be empty")))
        }
        Some(p) => Ok(p.into_inner()),
    }
}

/// Names appear in logs, metrics and admin output: keep them to a safe alphabet.
fn checked_name(src: &SourceFile, n: &Spanned<String>, what: &str) -> Result<String, ConfigError> {
    let s = n.get_ref();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.clone())
    } else {
        Err(src.error_at(
            n.span(),
            format!("bad {what} name '{s}' (1-64 of a-z, A-Z, 0-9, '-', '_', '.')"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"
drain_timeout = "5s"

[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"

[[backend]]
name = "app"
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"
[[backend.server]]
name = "app2"
address = "127.0.0.1:9002"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_source(SourceFile::from_text("p.toml", text))
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = load(GOOD).expect("valid");
        assert_eq!(c.global.drain_timeout, StdDuration::from_secs(5));
        assert_eq!(c.global.max_draining, 4);
        assert_eq!(c.global.threads, 1);
        assert_eq!(c.frontends[0].default_backend, 0);
        assert_eq!(c.backends[0].servers.len(), 2);
        assert_eq!(c.backends[0].balance, Balance::Roundrobin);
    }

    fn err_line(text: &str) -> (usize, String) {
        let e = load(text).expect_err("must be refused");
        (e.at.map_or(0, |a| a.0), e.reason)
    }

    #[test]
    fn unknown_backend_is_refused_at_its_line() {
        let (line, reason) =
            err_line(&GOOD.replace("default_backend = \"app\"", "default_backend = \"nope\""));
        assert_eq!(line, 10);
        assert!(reason.contains("nope"), "{reason}");
    }

    #[test]
    fn duplicate_server_and_bad_address() {
        let (line, reason) = err_line(&GOOD.replace("name = \"app2\"", "name = \"app1\""));
        assert_eq!(line, 18);
        assert!(reason.contains("duplicate server"), "{reason}");
        let (line, reason) = err_line(&GOOD.replace("127.0.0.1:9002", "localhost"));
        assert_eq!(line, 19);
        assert!(reason.contains("bad server address"), "{reason}");
    }

    #[test]
    fn unknown_key_and_missing_server() {
        let (line, reason) = err_line(&GOOD.replace("drain_timeout", "drain_timout"));
        assert_eq!(line, 5);
        assert!(reason.contains("drain_timout"), "{reason}");
        let text = GOOD.split("[[backend.server]]").next().unwrap_or_default();
        let (line, reason) = err_line(text);
        assert_eq!(line, 12);
        assert!(reason.contains("no server"), "{reason}");
    }
}
