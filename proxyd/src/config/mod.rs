//! proxyd.toml: serde structs, defaults, and the validation that every loaded config goes through.
//!
//! The layout follows HAProxy (global, frontends, backends with servers) so that new load
//! balancing features add keys to these tables instead of inventing new ones.
//!
//! - this file: the validated config, the only kind the rest of proxyd sees, and its loading
//!   (errors name the file, line and column, through `common::SourceFile`);
//! - `raw`: the file as written, the serde schema that refuses unknown keys;
//! - `validate`: from the raw file to a [`Config`], with defaults, or the first error at its line;
//! - [`tls`]: the settings of the binds that terminate TLS, with their certificates loaded;
//! - `rules`: a frontend's `[[frontend.rule]]`s, checked and compiled into [`crate::rules`].

pub mod access_log;
mod backend;
mod raw;
mod rules;
pub use rules::is_proxys_field;
#[cfg(test)]
mod tests;
pub mod tls;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use common::{ConfigError, SourceFile};
use serde::Deserialize;

use raw::RawConfig;

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
    /// The TLS settings the binds refer to by index: every `[[tls]]`, then each bind's own.
    pub tls: Vec<tls::Tls>,
    /// The `[[resolvers]]` that backends refer to by index.
    pub resolvers: Vec<Resolvers>,
    /// What is worth saying about a valid config (a certificate about to expire): `check`
    /// prints these, the master logs them; each reads `file:line:column: reason` like an error.
    pub warnings: Vec<ConfigError>,
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
    /// Serving threads of a worker: each runs its own event loop on its own copy of every
    /// listener, and keeps the connections it accepts.
    pub threads: usize,
    pub worker_ready_timeout: StdDuration,
    /// Where the master keeps the servers' admin states (SetServer) across its restarts,
    /// like HAProxy's `server-state-file`; none: they last as long as the master.
    pub server_state_file: Option<PathBuf>,
    /// Where each request's line goes, and in which format.
    pub access_log: access_log::AccessLog,
    /// How often servers named by DNS are resolved again, unless their backend says otherwise.
    pub resolve_interval: StdDuration,
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
    /// Idle connections kept per server at most, whatever the demand.
    pub pool_max_idle: usize,
    /// How often each server's pool closes some of the idle connections that recent demand
    /// did not need (HAProxy's `pool-purge-delay`).
    pub pool_purge_delay: StdDuration,
    /// How long a request waits for a server slot (`maxconn`) before a 503.
    pub timeout_queue: StdDuration,
    /// A health check's connect + answer.
    pub timeout_check: StdDuration,
    /// From the accept of a TLS connection to the end of its handshake: a client that connects
    /// and says nothing holds a `maxconn` slot no longer than this.
    pub timeout_tls_handshake: StdDuration,
    /// How long a tunnel (a WebSocket after its 101) stays open with nothing moving either way
    /// (HAProxy's `timeout tunnel`).
    pub timeout_tunnel: StdDuration,
    /// Streams an HTTP/2 client may have open at once on one connection (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub h2_max_concurrent_streams: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Tcp,
}

/// How a backend chooses a server for a request that no cookie or stick rule sends elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's): weights spread evenly, not in bursts.
    Roundrobin,
    /// Fewest active connections relative to weight.
    Leastconn,
    /// A hash of the client address over the weights.
    Source,
    /// Two servers drawn at random by weight; the less loaded (relative to weight) of them
    /// (HAProxy's `random(2)`: the power of two choices).
    Random,
    /// A hash of the request's path over the weights (HAProxy's `balance uri`).
    Uri(UriHash),
    /// A hash of a request field's value over the weights; round robin for a request without
    /// the field (HAProxy's `balance hdr(NAME)`).
    Hdr(String),
}

/// Which part of the request target `balance = "uri"` hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UriHash {
    /// The query string too, not only the path.
    pub whole: bool,
    /// Only the first `depth` directories of the path; 0: all of it.
    pub depth: u32,
}

/// Cookie persistence by a cookie naming the server (HAProxy's `cookie NAME insert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    /// proxyd sets the cookie on responses of a client without a valid one; otherwise it only
    /// reads the one the servers set (HAProxy's passive mode).
    pub insert: bool,
    /// The cookie is removed from requests before they reach the server.
    pub indirect: bool,
    /// A response that sets the cookie gets `Cache-Control: private`, so that no shared cache
    /// hands one client's server to others.
    pub nocache: bool,
    /// What follows `NAME=VALUE` in the `Set-Cookie` field: `; Path=/` and the attributes
    /// configured (Domain, Max-Age, HttpOnly, Secure), written once here.
    pub attributes: String,
}

/// Where a server is: an address, or a DNS name resolved at start and every
/// `resolve_interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(SocketAddr),
    Name {
        host: String,
        port: u16,
        /// Where the name is written, for the error when it cannot be resolved.
        span: std::ops::Range<usize>,
    },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(a) => a.fmt(f),
            Address::Name { host, port, .. } => write!(f, "{host}:{port}"),
        }
    }
}

/// A `[[resolvers]]` section: the nameservers that resolve the server names of the backends
/// that use it (HAProxy's `resolvers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolvers {
    pub name: String,
    pub nameservers: Vec<SocketAddr>,
    /// One query's wait for an answer, before the next nameserver is asked.
    pub timeout: StdDuration,
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    /// Where it listens; fdkeeper holds one socket per address (in its canonical form), and
    /// no two binds of a config overlap.
    pub bind: Vec<Bind>,
    /// 0: fdkeeper's default.
    pub backlog: u32,
    pub mode: Mode,
    /// Index into `Config::backends`.
    pub default_backend: usize,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub maxconn: usize,
    /// The L7 rules, compiled once per generation (empty: everything to `default_backend`).
    pub rules: std::sync::Arc<crate::rules::Rules>,
}

/// One listen address of a frontend and how its connections are carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub address: SocketAddr,
    /// Index into `Config::tls`: the bind terminates TLS with those settings.
    pub tls: Option<usize>,
    /// Plain HTTP answered with a redirect to https (HAProxy's `redirect scheme https`).
    pub redirect_https: Option<RedirectHttps>,
    /// A plain bind also takes HTTP/2 from clients that start with its preface (h2c with prior
    /// knowledge); HTTP/1.x goes on as before.
    pub h2c: bool,
}

/// A bind's redirect of every request to the same URL in https.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectHttps {
    /// The port the new URL names; none: the port of the request's host, if it has one.
    pub port: Option<u16>,
}

/// One bind of the config: which frontend, which of its binds (the default: the first of the
/// first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BindRef {
    pub frontend: usize,
    pub bind: usize,
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
    /// Set `Forwarded` (RFC 7239: `for`, `proto`, `host`), HAProxy's `option forwarded`.
    pub forwarded: bool,
    /// Persistence by a cookie naming the server; a valid cookie wins over the stick rule.
    pub cookie: Option<Cookie>,
    /// Index into `Config::resolvers` for the servers named by DNS; none: the system's resolver.
    pub resolvers: Option<usize>,
    /// How often servers named by DNS are resolved again.
    pub resolve_interval: StdDuration,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: Address,
    /// The value of the backend's persistence cookie that names this server (default: its
    /// name): a name, not an index, so that it means the same server after a reload and on
    /// every node.
    pub cookie: String,
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
    /// The `Host` of an HTTP check; none: the server's address as written.
    pub host: Option<String>,
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

/// Where a config's certificates come from when it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateSource {
    /// Read from the files the config names, and checked.
    Files,
    /// Left out (every TLS setting has no certificate yet): a worker gets the sets its master
    /// checked and serves, so that a worker respawned after a refused rotation does not trip
    /// over the broken files.
    Master,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_source(SourceFile::read(path)?)
    }

    /// Parses and validates text, with the certificates read from their files (tests).
    pub fn from_source(source: SourceFile) -> Result<Config, ConfigError> {
        Self::from_source_with(source, CertificateSource::Files)
    }

    /// Parses and validates text (the worker's copy of what the master validated).
    pub fn from_source_with(
        source: SourceFile,
        certificates: CertificateSource,
    ) -> Result<Config, ConfigError> {
        if source.text.len() > MAX_CONFIG_BYTES {
            return Err(source.error(format!(
                "file is larger than {} KiB",
                MAX_CONFIG_BYTES / 1024
            )));
        }
        let raw: RawConfig = source.parse()?;
        validate::validate(source, raw, certificates)
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Every bind of every frontend, in config order.
    pub fn binds(&self) -> impl Iterator<Item = (BindRef, &Bind)> {
        self.frontends.iter().enumerate().flat_map(|(f, fe)| {
            fe.bind.iter().enumerate().map(move |(b, bind)| {
                (
                    BindRef {
                        frontend: f,
                        bind: b,
                    },
                    bind,
                )
            })
        })
    }

    pub fn bind(&self, at: BindRef) -> &Bind {
        &self.frontends[at.frontend].bind[at.bind]
    }
}
