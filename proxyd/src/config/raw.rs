//! The config file as written: the serde schema, every table with `deny_unknown_fields` and
//! spans kept for the errors; `validate` turns it into a `Config`.

use std::path::PathBuf;

use common::Duration;
use common::config::Spanned;
use serde::Deserialize;

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
    /// Defaults for every frontend and backend (HAProxy's `defaults` section).
    pub(super) maxconn: Option<Spanned<u64>>,
    pub(super) retries: Option<Spanned<u32>>,
    pub(super) redispatch: Option<bool>,
    pub(super) forwardfor: Option<bool>,
    pub(super) forwardfor_except: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrontend {
    pub(super) name: Spanned<String>,
    pub(super) bind: Spanned<Vec<Spanned<String>>>,
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
