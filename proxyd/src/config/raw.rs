//! The config file as written: the serde schema, every table with `deny_unknown_fields` and
//! spans kept for the errors; `validate` turns it into a `Config`.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use common::Duration;
use common::config::Spanned;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::{Balance, Mode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) global: Spanned<RawGlobal>,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) frontend: Vec<Spanned<RawFrontend>>,
    #[serde(default)]
    pub(super) backend: Vec<Spanned<RawBackend>>,
    /// Named TLS settings that binds refer to by name.
    #[serde(default)]
    pub(super) tls: Vec<Spanned<RawTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobal {
    pub(super) admin_socket: Option<Spanned<PathBuf>>,
    pub(super) stickd_socket: Option<Spanned<PathBuf>>,
    pub(super) metrics: Option<Spanned<String>>,
    pub(super) fdkeeper_socket: Option<Spanned<PathBuf>>,
    pub(super) drain_timeout: Option<Duration>,
    pub(super) max_draining: Option<Spanned<u64>>,
    pub(super) threads: Option<Spanned<u64>>,
    pub(super) worker_ready_timeout: Option<Spanned<Duration>>,
    pub(super) server_state_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) timeout_connect: Option<Spanned<Duration>>,
    pub(super) timeout_client: Option<Spanned<Duration>>,
    pub(super) timeout_server: Option<Spanned<Duration>>,
    pub(super) timeout_http_request: Option<Spanned<Duration>>,
    pub(super) timeout_http_keep_alive: Option<Duration>,
    pub(super) timeout_pool_idle: Option<Duration>,
    pub(super) pool_max_idle: Option<u64>,
    pub(super) timeout_queue: Option<Spanned<Duration>>,
    pub(super) timeout_check: Option<Spanned<Duration>>,
    pub(super) timeout_tls_handshake: Option<Spanned<Duration>>,
    pub(super) timeout_tunnel: Option<Spanned<Duration>>,
    pub(super) h2_max_concurrent_streams: Option<Spanned<u64>>,
    /// Defaults for every frontend and backend (HAProxy's `defaults` section).
    pub(super) maxconn: Option<Spanned<u64>>,
    pub(super) retries: Option<Spanned<u32>>,
    pub(super) redispatch: Option<bool>,
    pub(super) forwardfor: Option<bool>,
    pub(super) forwardfor_except: Option<Spanned<String>>,
    pub(super) forwarded: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrontend {
    pub(super) name: Spanned<String>,
    pub(super) bind: Spanned<Vec<Spanned<Shorthand<RawBind>>>>,
    #[serde(default)]
    pub(super) backlog: u32,
    pub(super) mode: Option<Mode>,
    pub(super) default_backend: Option<Spanned<String>>,
    pub(super) maxconn: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: Spanned<String>,
    pub(super) balance: Option<Balance>,
    #[serde(default)]
    pub(super) server: Vec<Spanned<RawServer>>,
    pub(super) check: Option<Spanned<RawCheck>>,
    pub(super) stick: Option<Spanned<RawStick>>,
    pub(super) redispatch: Option<bool>,
    pub(super) retries: Option<Spanned<u32>>,
    pub(super) forwardfor: Option<bool>,
    pub(super) forwardfor_except: Option<Spanned<String>>,
    pub(super) forwarded: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) weight: Option<Spanned<u32>>,
    pub(super) maxconn: Option<u32>,
    #[serde(default)]
    pub(super) check: bool,
    pub(super) inter: Option<Spanned<Duration>>,
    pub(super) rise: Option<Spanned<u32>>,
    pub(super) fall: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<String>>,
    pub(super) method: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) expect_status: Option<Spanned<u16>>,
    pub(super) inter: Option<Spanned<Duration>>,
    pub(super) rise: Option<Spanned<u32>>,
    pub(super) fall: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStick {
    pub(super) table: Option<Spanned<String>>,
    pub(super) on: Spanned<String>,
    pub(super) store_response: Option<Spanned<String>>,
}

/// A value written as a string or as a table: `"127.0.0.1:80"` or `{ address = "...", ... }`.
///
/// Deserialized by hand rather than as an untagged enum, so that a table keeps its own errors
/// (an unknown key is named, not "data did not match any variant").
#[derive(Debug)]
pub(super) enum Shorthand<T> {
    Text(String),
    Table(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shorthand<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Shorthand<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a table")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Shorthand::Text(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Shorthand::Table)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A bind written as a table: its address and what it does besides plain HTTP or TCP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBind {
    pub(super) address: Spanned<String>,
    /// The name of a `[[tls]]`, or TLS settings of this bind alone.
    pub(super) tls: Option<Spanned<Shorthand<RawTls>>>,
    /// Answer every request with a redirect to the same URL in https (plain binds only).
    pub(super) redirect_https: Option<Spanned<bool>>,
    /// The port the redirect names (default: the port of the request's host, if any).
    pub(super) redirect_port: Option<Spanned<u16>>,
    /// HTTP/2 without TLS from clients that know the bind speaks it (prior knowledge).
    pub(super) h2c: Option<Spanned<bool>>,
}

/// TLS settings: a `[[tls]]` (with a name) or a bind's own (without).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) name: Option<Spanned<String>>,
    /// PEM files (chain and key, or the key beside in `FILE.key`), directories of them, or
    /// `{ cert = "...", key = "..." }` pairs; the first certificate is the default.
    pub(super) certs: Spanned<Vec<Spanned<Shorthand<RawCertPair>>>>,
    /// Protocols offered through ALPN, in order of preference.
    pub(super) alpn: Option<Spanned<Vec<Spanned<String>>>>,
    /// `"1.2"` or `"1.3"`.
    pub(super) min_version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertPair {
    pub(super) cert: Spanned<PathBuf>,
    pub(super) key: Spanned<PathBuf>,
}
