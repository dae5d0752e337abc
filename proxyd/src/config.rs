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
    /// stickd's local socket; required when a backend has a stick rule.
    pub stickd_socket: Option<PathBuf>,
    /// Prometheus `/metrics` listener of the master (bound by it, not lent by fdkeeper).
    pub metrics: Option<SocketAddr>,
    pub fdkeeper_socket: PathBuf,
    pub drain_timeout: StdDuration,
    pub max_draining: usize,
    pub threads: usize,
    pub worker_ready_timeout: StdDuration,
    /// Where the master keeps the servers' admin states (SetServer) across its restarts,
    /// like HAProxy's `server-state-file`; none: they last as long as the master.
    pub server_state_file: Option<PathBuf>,
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
    /// How long a request waits for a server slot (`maxconn`) before a 503.
    pub timeout_queue: StdDuration,
    /// A health check's connect + answer.
    pub timeout_check: StdDuration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Smooth weighted round robin (nginx's): weights spread evenly, not in bursts.
    Roundrobin,
    /// Fewest active connections relative to weight.
    Leastconn,
    /// A hash of the client address over the weights.
    Source,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    /// Listen addresses; fdkeeper holds one socket per address (in its canonical form), and
    /// no two binds of a config overlap.
    pub bind: Vec<SocketAddr>,
    /// 0: fdkeeper's default.
    pub backlog: u32,
    pub mode: Mode,
    /// Index into `Config::backends`.
    pub default_backend: usize,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub maxconn: usize,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<Server>,
    /// Health check parameters (used by servers with `check = true`).
    pub check: Check,
    pub stick: Option<Stick>,
    /// Another server may be chosen when the stuck one is unusable or on the last retry.
    pub redispatch: bool,
    /// Connection attempts after the first failed one.
    pub retries: u32,
    /// Add `X-Forwarded-For` with the client address (HTTP).
    pub forwardfor: Option<ForwardFor>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// Requests (HTTP) or connections (TCP) at once; 0: no limit.
    pub maxconn: u32,
    /// Health-checked (else always up).
    pub check: bool,
    pub inter: StdDuration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.0 request whose answer must have `expect_status`.
    Http {
        method: String,
        path: String,
        expect_status: u16,
    },
}

#[derive(Clone, Debug)]
pub struct Check {
    pub kind: CheckKind,
}

/// What a stick rule keys on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickOn {
    /// `req.cook(NAME)`: a request cookie.
    Cookie(String),
    /// `src`: the client address.
    Src,
}

#[derive(Clone, Debug)]
pub struct Stick {
    /// The stickd table (by default the backend's name, as in HAProxy).
    pub table: String,
    pub on: StickOn,
    /// `res.cook(NAME)`: store the value of this response cookie.
    pub store_response: Option<String>,
}

/// `option forwardfor [except NET]`.
#[derive(Clone, Debug)]
pub struct ForwardFor {
    pub except: Option<Cidr>,
}

/// An address block such as `127.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim().parse().ok()?
        };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
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
    stickd_socket: Option<Spanned<PathBuf>>,
    metrics: Option<Spanned<String>>,
    fdkeeper_socket: Option<Spanned<PathBuf>>,
    drain_timeout: Option<Duration>,
    max_draining: Option<Spanned<u64>>,
    threads: Option<Spanned<u64>>,
    worker_ready_timeout: Option<Spanned<Duration>>,
    server_state_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout_connect: Option<Spanned<Duration>>,
    timeout_client: Option<Spanned<Duration>>,
    timeout_server: Option<Spanned<Duration>>,
    timeout_http_request: Option<Spanned<Duration>>,
    timeout_http_keep_alive: Option<Duration>,
    timeout_pool_idle: Option<Duration>,
    pool_max_idle: Option<u64>,
    timeout_queue: Option<Spanned<Duration>>,
    timeout_check: Option<Spanned<Duration>>,
    /// Defaults for every frontend and backend (HAProxy's `defaults` section).
    maxconn: Option<Spanned<u64>>,
    retries: Option<Spanned<u32>>,
    redispatch: Option<bool>,
    forwardfor: Option<bool>,
    forwardfor_except: Option<Spanned<String>>,
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
    maxconn: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    balance: Option<Balance>,
    #[serde(default)]
    server: Vec<Spanned<RawServer>>,
    check: Option<Spanned<RawCheck>>,
    stick: Option<Spanned<RawStick>>,
    redispatch: Option<bool>,
    retries: Option<Spanned<u32>>,
    forwardfor: Option<bool>,
    forwardfor_except: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    maxconn: Option<u32>,
    #[serde(default)]
    check: bool,
    inter: Option<Spanned<Duration>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<u16>>,
    inter: Option<Spanned<Duration>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStick {
    table: Option<Spanned<String>>,
    on: Spanned<String>,
    store_response: Option<Spanned<String>>,
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
    let stickd_socket = match g.stickd_socket {
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            return Err(src.error_at(p.span(), "stickd_socket must not be empty"));
        }
        p => p.map(Spanned::into_inner),
    };
    let metrics_span = g.metrics.as_ref().map(Spanned::span);
    let metrics = match g.metrics {
        None => None,
        Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|_| {
            src.error_at(
                m.span(),
                format!("bad metrics address '{}' (expected ip:port)", m.get_ref()),
            )
        })?),
    };
    let server_state_file = match g.server_state_file {
        Some(p) if p.get_ref().as_os_str().is_empty() => {
            return Err(src.error_at(p.span(), "server_state_file must not be empty"));
        }
        p => p.map(Spanned::into_inner),
    };
    let global = Global {
        admin_socket,
        stickd_socket,
        metrics,
        server_state_file,
        fdkeeper_socket,
        drain_timeout: g.drain_timeout.map_or(StdDuration::from_secs(30), |d| d.0),
        max_draining,
        threads,
        worker_ready_timeout,
    };

    let d = raw.defaults;
    let secs = StdDuration::from_secs;
    // Zero would time every exchange out at once; an unlimited timeout lets one stuck peer
    // hold a connection and its slot for ever, so neither is offered.
    let positive = |t: Option<Spanned<Duration>>, name: &str, default: StdDuration| match t {
        None => Ok(default),
        Some(t) if t.get_ref().0.is_zero() => {
            Err(src.error_at(t.span(), format!("{name} must be greater than 0")))
        }
        Some(t) => Ok(t.into_inner().0),
    };
    let defaults = Defaults {
        timeout_connect: positive(d.timeout_connect, "timeout_connect", secs(5))?,
        timeout_client: positive(d.timeout_client, "timeout_client", secs(60))?,
        timeout_server: positive(d.timeout_server, "timeout_server", secs(60))?,
        timeout_http_request: positive(d.timeout_http_request, "timeout_http_request", secs(10))?,
        timeout_http_keep_alive: d.timeout_http_keep_alive.map_or(secs(60), |d| d.0),
        timeout_pool_idle: d.timeout_pool_idle.map_or(secs(30), |d| d.0),
        pool_max_idle: d.pool_max_idle.map_or(64, |n| n as usize),
        timeout_queue: positive(d.timeout_queue, "timeout_queue", secs(5))?,
        timeout_check: positive(d.timeout_check, "timeout_check", secs(2))?,
    };
    let default_maxconn = match &d.maxconn {
        None => 10_000,
        Some(m) => checked_maxconn(&src, m)?,
    };
    let default_retries = match &d.retries {
        None => 3,
        Some(r) => checked_retries(&src, r)?,
    };
    let default_forwardfor = forwardfor(&src, d.forwardfor, d.forwardfor_except)?;

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
        let check_span = b.check.as_ref().map(Spanned::span);
        let (check, inter, rise, fall) = match b.check {
            None => (
                Check {
                    kind: CheckKind::Tcp,
                },
                None,
                None,
                None,
            ),
            Some(c) => {
                let c = c.into_inner();
                let kind = match c.kind.as_ref().map(|k| k.get_ref().as_str()) {
                    None | Some("tcp")
                        if c.path.is_none() && c.method.is_none() && c.expect_status.is_none() =>
                    {
                        CheckKind::Tcp
                    }
                    None | Some("http") => {
                        let method = c
                            .method
                            .map_or_else(|| "GET".to_owned(), Spanned::into_inner);
                        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                            return Err(src.error_at(
                                check_span.clone().unwrap_or_default(),
                                format!("bad check method '{method}' in backend '{name}'"),
                            ));
                        }
                        let path = match c.path {
                            None => "/".to_owned(),
                            Some(p)
                                if p.get_ref().starts_with('/')
                                    && !p.get_ref().bytes().any(|b| {
                                        b.is_ascii_whitespace() || b.is_ascii_control()
                                    }) =>
                            {
                                p.into_inner()
                            }
                            Some(p) => {
                                return Err(src.error_at(
                                    p.span(),
                                    format!(
                                        "bad check path '{}' (must start with '/', no spaces)",
                                        p.get_ref()
                                    ),
                                ));
                            }
                        };
                        let expect_status = match c.expect_status {
                            None => 200,
                            Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref(),
                            Some(s) => {
                                return Err(src.error_at(
                                    s.span(),
                                    "expect_status must be between 100 and 599",
                                ));
                            }
                        };
                        CheckKind::Http {
                            method,
                            path,
                            expect_status,
                        }
                    }
                    Some("tcp") => {
                        return Err(src.error_at(
                            check_span.clone().unwrap_or_default(),
                            "a tcp check takes no method, path or expect_status",
                        ));
                    }
                    Some(other) => {
                        let span = c.kind.as_ref().map(Spanned::span).unwrap_or_default();
                        return Err(src.error_at(
                            span,
                            format!("unknown check type '{other}' (tcp or http)"),
                        ));
                    }
                };
                (Check { kind }, c.inter, c.rise, c.fall)
            }
        };
        let b_inter = checked_inter(&src, inter.as_ref())?.unwrap_or(StdDuration::from_secs(2));
        let b_rise = checked_count(&src, rise.as_ref(), "rise")?.unwrap_or(2);
        let b_fall = checked_count(&src, fall.as_ref(), "fall")?.unwrap_or(3);
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
            let weight = match s.weight {
                None => 1,
                Some(w) if *w.get_ref() <= 256 => *w.get_ref(),
                Some(w) => return Err(src.error_at(w.span(), "weight must be between 0 and 256")),
            };
            servers.push(Server {
                name: sname,
                address,
                weight,
                maxconn: s.maxconn.unwrap_or(0),
                check: s.check,
                inter: checked_inter(&src, s.inter.as_ref())?.unwrap_or(b_inter),
                rise: checked_count(&src, s.rise.as_ref(), "rise")?.unwrap_or(b_rise),
                fall: checked_count(&src, s.fall.as_ref(), "fall")?.unwrap_or(b_fall),
            });
        }
        let stick = match b.stick {
            None => None,
            Some(st) => {
                let st = st.into_inner();
                let table = match st.table {
                    None => name.clone(),
                    Some(t) => checked_name(&src, &t, "table")?,
                };
                let on = match parse_fetch(st.on.get_ref(), "req.cook") {
                    Some(c) => StickOn::Cookie(c),
                    None if st.on.get_ref().trim() == "src" => StickOn::Src,
                    None => {
                        return Err(src.error_at(
                            st.on.span(),
                            format!(
                                "unsupported stick on '{}' (req.cook(NAME) or src)",
                                st.on.get_ref()
                            ),
                        ));
                    }
                };
                let store_response = match st.store_response {
                    None => None,
                    Some(r) => match parse_fetch(r.get_ref(), "res.cook") {
                        Some(c) => Some(c),
                        None => {
                            return Err(src.error_at(
                                r.span(),
                                format!(
                                    "unsupported store_response '{}' (res.cook(NAME))",
                                    r.get_ref()
                                ),
                            ));
                        }
                    },
                };
                Some(Stick {
                    table,
                    on,
                    store_response,
                })
            }
        };
        let retries = match &b.retries {
            None => default_retries,
            Some(r) => checked_retries(&src, r)?,
        };
        let forwardfor = if b.forwardfor.is_some() || b.forwardfor_except.is_some() {
            forwardfor(&src, b.forwardfor, b.forwardfor_except)?
        } else {
            default_forwardfor.clone()
        };
        backends.push(Backend {
            name,
            balance: b.balance.unwrap_or(Balance::Roundrobin),
            servers,
            check,
            stick,
            redispatch: b.redispatch.or(d.redispatch).unwrap_or(false),
            retries,
            forwardfor,
        });
    }

    let mut frontends: Vec<Frontend> = Vec::with_capacity(raw.frontend.len());
    // Every listen address so far, parsed, with whose it is and where it was written: binds
    // are compared as the kernel sees them, never as text.
    let mut taken: Vec<Taken> = Vec::new();
    // The master binds metrics itself: on port 0 it gets a port of its own.
    if let (Some(addr), Some(span)) = (metrics.filter(|m| m.port() != 0), metrics_span) {
        taken.push(Taken {
            addr,
            text: addr.to_string(),
            owner: "[global] metrics".to_owned(),
            at: src.line_col(span.start),
        });
    }
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
        for text in f.bind.into_inner() {
            let Ok(addr) = text.get_ref().parse::<SocketAddr>() else {
                return Err(src.error_at(
                    text.span(),
                    format!(
                        "bad bind address '{}' (expected ip:port, [ipv6]:port)",
                        text.get_ref()
                    ),
                ));
            };
            let here = Taken {
                addr,
                text: text.get_ref().clone(),
                owner: format!("frontend '{name}'"),
                at: src.line_col(text.span().start),
            };
            check_overlap(&src, &taken, &here, text.span())?;
            taken.push(here);
            bind.push(addr);
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
        let mode = f.mode.unwrap_or(Mode::Http);
        let maxconn = match &f.maxconn {
            None => default_maxconn,
            Some(m) => checked_maxconn(&src, m)?,
        };
        if mode == Mode::Tcp {
            let be = &backends[default_backend];
            let stick_on_cookie = be
                .stick
                .as_ref()
                .is_some_and(|s| s.on != StickOn::Src || s.store_response.is_some());
            if stick_on_cookie {
                return Err(src.error_at(db.span(), format!("tcp frontend '{name}' uses backend '{}' whose stick rule needs http (only `src` works in tcp mode)", be.name)));
            }
        }
        frontends.push(Frontend {
            name,
            bind,
            backlog: f.backlog,
            mode,
            default_backend,
            maxconn,
        });
    }
    if frontends.is_empty() {
        return Err(src.error("no [[frontend]] defined"));
    }
    if global.stickd_socket.is_none()
        && let Some(b) = backends.iter().find(|b| b.stick.is_some())
    {
        return Err(src.error_at(
            global_span,
            format!(
                "backend '{}' has a stick rule: [global] needs stickd_socket",
                b.name
            ),
        ));
    }

    Ok(Config {
        source: src,
        global,
        defaults,
        frontends,
        backends,
    })
}

/// A listen address of the config and where it was written.
struct Taken {
    addr: SocketAddr,
    text: String,
    owner: String,
    at: (usize, usize),
}

/// Refuses `here` when it is the same socket as an earlier bind (fdkeeper would lend one socket
/// to two frontends) or overlaps one (`0.0.0.0:P` and `127.0.0.1:P`, or a dual-stack `[::]:P`
/// and any IPv4 `P`: one of them would fail to bind). proxyd binds IPv6 without IPV6_V6ONLY.
fn check_overlap(
    src: &SourceFile,
    taken: &[Taken],
    here: &Taken,
    span: std::ops::Range<usize>,
) -> Result<(), ConfigError> {
    let bind = |a: SocketAddr| fdkeeper::address::Bind::new(a, false);
    for t in taken {
        if let Some(o) = fdkeeper::address::overlap(bind(t.addr), bind(here.addr)) {
            return Err(src.error_at(
                span,
                format!(
                    "bind '{}' of {} {o} '{}' of {} at {}:{}:{}",
                    here.text,
                    here.owner,
                    t.text,
                    t.owner,
                    src.path.display(),
                    t.at.0,
                    t.at.1
                ),
            ));
        }
    }
    Ok(())
}

/// `req.cook(NAME)` -> `NAME`.
fn parse_fetch(s: &str, fetch: &str) -> Option<String> {
    let inner = s
        .trim()
        .strip_prefix(fetch)?
        .strip_prefix('(')?
        .strip_suffix(')')?
        .trim();
    let ok = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    ok.then(|| inner.to_owned())
}

fn checked_maxconn(src: &SourceFile, m: &Spanned<u64>) -> Result<usize, ConfigError> {
    match *m.get_ref() {
        n @ 1..=1_000_000 => Ok(n as usize),
        _ => Err(src.error_at(m.span(), "maxconn must be between 1 and 1000000")),
    }
}

fn checked_retries(src: &SourceFile, r: &Spanned<u32>) -> Result<u32, ConfigError> {
    match *r.get_ref() {
        n @ 0..=10 => Ok(n),
        _ => Err(src.error_at(r.span(), "retries must be between 0 and 10")),
    }
}

fn checked_inter(
    src: &SourceFile,
    d: Option<&Spanned<Duration>>,
) -> Result<Option<StdDuration>, ConfigError> {
    match d {
        None => Ok(None),
        Some(d) if d.get_ref().0 >= StdDuration::from_millis(10) => Ok(Some(d.get_ref().0)),
        Some(d) => Err(src.error_at(d.span(), "inter must be at least 10ms")),
    }
}

fn checked_count(
    src: &SourceFile,
    n: Option<&Spanned<u32>>,
    what: &str,
) -> Result<Option<u32>, ConfigError> {
    match n {
        None => Ok(None),
        Some(n) if (1..=100).contains(n.get_ref()) => Ok(Some(*n.get_ref())),
        Some(n) => Err(src.error_at(n.span(), format!("{what} must be between 1 and 100"))),
    }
}

fn forwardfor(
    src: &SourceFile,
    on: Option<bool>,
    except: Option<Spanned<String>>,
) -> Result<Option<ForwardFor>, ConfigError> {
    let except = match except {
        None => None,
        Some(e) => match Cidr::parse(e.get_ref()) {
            Some(c) => Some(c),
            None => {
                return Err(src.error_at(
                    e.span(),
                    format!(
                        "bad forwardfor_except '{}' (expected ip/prefix)",
                        e.get_ref()
                    ),
                ));
            }
        },
    };
    Ok(match on {
        Some(true) => Some(ForwardFor { except }),
        Some(false) => None,
        None if except.is_some() => Some(ForwardFor { except }),
        None => None,
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
    fn a_zero_timeout_is_refused_at_its_line() {
        for key in ["timeout_server", "timeout_connect", "timeout_http_request"] {
            let text = format!("{GOOD}\n[defaults]\n{key} = \"0s\"\n");
            let (line, reason) = err_line(&text);
            let at = text.lines().position(|l| l.starts_with(key)).map(|i| i + 1);
            assert_eq!(Some(line), at, "{key}");
            assert!(
                reason.contains(key) && reason.contains("greater than 0"),
                "{reason}"
            );
        }
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

    #[test]
    fn the_seed_translation_loads() {
        let text = include_str!("../../examples/proxyd-seed.toml");
        let c = load(text).expect("the seed example is valid");
        let d = &c.defaults;
        assert_eq!(d.timeout_queue, StdDuration::from_secs(3));
        assert_eq!(d.timeout_server, StdDuration::from_secs(2));
        assert_eq!(c.frontends[0].maxconn, 18000);
        let b = &c.backends[0];
        assert!(b.redispatch);
        assert_eq!(b.retries, 3);
        let ff = b.forwardfor.as_ref().expect("forwardfor");
        let except = ff.except.expect("except");
        assert!(except.contains("127.0.0.2".parse().expect("ip")));
        assert!(!except.contains("10.0.0.1".parse().expect("ip")));
        assert_eq!(
            b.check.kind,
            CheckKind::Http {
                method: "GET".into(),
                path: "/index.php".into(),
                expect_status: 200
            }
        );
        let st = b.stick.as_ref().expect("stick");
        assert_eq!(st.table, "dynamic_group");
        assert_eq!(st.on, StickOn::Cookie("PHPSESSID".into()));
        assert_eq!(st.store_response.as_deref(), Some("PHPSESSID"));
        let s = &b.servers[0];
        assert!(s.check);
        assert_eq!((s.rise, s.fall, s.maxconn, s.weight), (1, 3, 3000, 1));
        assert_eq!(s.inter, StdDuration::from_secs(2));
    }

    #[test]
    fn load_balancer_keys_are_validated_at_their_line() {
        let with = |extra: &str| {
            GOOD.replace(
                "[[backend.server]]\nname = \"app1\"",
                &format!("{extra}\n[[backend.server]]\nname = \"app1\""),
            )
        };
        let (line, reason) = err_line(&with("[backend.stick]\non = \"req.hdr(x)\""));
        assert_eq!(line, 15);
        assert!(reason.contains("req.hdr(x)"), "{reason}");
        let (line, reason) = err_line(&with("[backend.stick]\non = \"src\""));
        assert_eq!(line, 2);
        assert!(reason.contains("stickd_socket"), "{reason}");
        let (line, reason) = err_line(&with("[backend.check]\ntype = \"icmp\""));
        assert_eq!(line, 15);
        assert!(reason.contains("icmp"), "{reason}");
        let (line, reason) = err_line(&with("[backend.check]\nexpect_status = 700"));
        assert_eq!(line, 15);
        assert!(reason.contains("expect_status"), "{reason}");
        let (line, reason) = err_line(&GOOD.replace(
            "address = \"127.0.0.1:9001\"",
            "address = \"127.0.0.1:9001\"\nweight = 300",
        ));
        assert_eq!(line, 17);
        assert!(reason.contains("weight"), "{reason}");
        let (line, reason) = err_line(&GOOD.replace("drain_timeout = \"5s\"", "drain_timeout = \"5s\"\nstickd_socket = \"/s\"\n[defaults]\nforwardfor_except = \"10.0.0.0/40\""));
        assert_eq!(line, 8);
        assert!(reason.contains("forwardfor_except"), "{reason}");
        let tcp = GOOD
            .replace(
                "drain_timeout = \"5s\"",
                "drain_timeout = \"5s\"\nstickd_socket = \"/s\"",
            )
            .replace(
                "default_backend = \"app\"",
                "mode = \"tcp\"\ndefault_backend = \"app\"",
            );
        let (_, reason) = err_line(&format!("{}\n", with_stick(&tcp, "req.cook(S)")));
        assert!(reason.contains("tcp"), "{reason}");
        let ok = load(&with_stick(&tcp, "src")).expect("stick on src in tcp mode");
        assert_eq!(ok.frontends[0].mode, Mode::Tcp);
        assert_eq!(
            ok.backends[0].stick.as_ref().map(|s| s.table.as_str()),
            Some("app")
        );
    }

    /// GOOD with a second frontend `api` binding `api_bind`, and `www` binding `www_bind`.
    fn two_frontends(www_bind: &str, api_bind: &str) -> String {
        GOOD.replace("\"127.0.0.1:8080\"", www_bind).replace(
            "[[backend]]",
            &format!(
                "[[frontend]]\nname = \"api\"\nbind = [{api_bind}]\ndefault_backend = \"app\"\n\n[[backend]]"
            ),
        )
    }

    #[test]
    fn binds_are_compared_as_sockets_not_as_text() {
        // www's bind is at 9:9; api's is at 14:9.
        let refused = [
            (
                "\"127.0.0.1:23080\"",
                "\"127.0.0.1:023080\"",
                "is the same socket as",
            ),
            ("\"0.0.0.0:23080\"", "\"127.0.0.1:23080\"", "overlaps"),
            ("\"127.0.0.1:23080\"", "\"0.0.0.0:23080\"", "overlaps"),
            ("\"[::]:23080\"", "\"127.0.0.1:23080\"", "overlaps"),
            ("\"[::]:23080\"", "\"[::1]:23080\"", "overlaps"),
            (
                "\"[::ffff:127.0.0.1]:23080\"",
                "\"127.0.0.1:23080\"",
                "is the same socket as",
            ),
            ("\"[::1]:443\"", "\"[0::1]:0443\"", "is the same socket as"),
            // Port 0 is one kernel-chosen port per address in fdkeeper: shared, so refused.
            (
                "\"127.0.0.1:0\"",
                "\"127.0.0.1:00\"",
                "is the same socket as",
            ),
        ];
        for (www, api, why) in refused {
            let e = load(&two_frontends(www, api)).expect_err(&format!("{www} and {api}"));
            let text = e.to_string();
            assert!(text.starts_with("p.toml:14:9: "), "{www} {api}: {text}");
            assert!(text.contains(why), "{www} {api}: {text}");
            assert!(text.contains("frontend 'www' at p.toml:9:9"), "{text}");
            assert!(text.contains(&api.replace('"', "'")), "{text}");
        }
        // Within one frontend too: the socket would be accepted on twice.
        let e = load(&GOOD.replace(
            "\"127.0.0.1:8080\"",
            "\"127.0.0.1:8080\", \"127.0.0.1:08080\"",
        ))
        .expect_err("one frontend, one socket twice");
        assert!(e.to_string().starts_with("p.toml:9:27: "), "{e}");
        assert!(e.reason.contains("frontend 'www' is the same socket as '127.0.0.1:8080' of frontend 'www' at p.toml:9:9"), "{e}");

        let fine = [
            ("\"127.0.0.1:23080\"", "\"127.0.0.2:23080\""),
            ("\"127.0.0.1:23080\"", "\"127.0.0.1:23081\""),
            ("\"[::1]:23080\"", "\"127.0.0.1:23080\""),
            ("\"0.0.0.0:23080\"", "\"[::1]:23080\""),
            ("\"127.0.0.1:0\"", "\"0.0.0.0:0\""),
        ];
        for (www, api) in fine {
            let c = load(&two_frontends(www, api)).unwrap_or_else(|e| panic!("{www} {api}: {e}"));
            assert_eq!(c.frontends.len(), 2);
        }
        // What fdkeeper is asked for is the canonical address, not the text.
        let c = load(&two_frontends("\"127.0.0.1:023080\"", "\"[0::1]:0443\"")).expect("valid");
        let specs: Vec<String> = crate::worker::listen_specs(&c)
            .into_iter()
            .map(|(_, s)| s.address)
            .collect();
        assert_eq!(specs, ["127.0.0.1:23080", "[::1]:443"]);
    }

    #[test]
    fn the_metrics_listener_must_not_overlap_a_frontend() {
        let with_metrics = |m: &str, bind: &str| {
            GOOD.replace(
                "drain_timeout = \"5s\"",
                &format!("drain_timeout = \"5s\"\nmetrics = \"{m}\""),
            )
            .replace("127.0.0.1:8080", bind)
        };
        let e = load(&with_metrics("0.0.0.0:9100", "127.0.0.1:09100")).expect_err("overlap");
        assert!(e.to_string().starts_with("p.toml:10:9: "), "{e}");
        assert!(
            e.reason
                .contains("overlaps '0.0.0.0:9100' of [global] metrics at p.toml:6:11"),
            "{e}"
        );
        load(&with_metrics("127.0.0.1:0", "127.0.0.1:0"))
            .expect("metrics on port 0 gets its own port");
        load(&with_metrics("127.0.0.1:9100", "127.0.0.1:8080")).expect("distinct ports");
    }

    fn with_stick(text: &str, on: &str) -> String {
        text.replace(
            "[[backend.server]]\nname = \"app1\"",
            &format!("[backend.stick]\non = \"{on}\"\n[[backend.server]]\nname = \"app1\""),
        )
    }
}
