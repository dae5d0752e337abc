//! proxyd: an HTTP/1.1 load balancer run as a master supervising generations of workers.
//!
//! - [`master`]: validates the config, spawns each worker as a fresh exec of the binary path
//!   resolved at start (so a reload after an upgrade on disk runs the new file), and reloads by
//!   starting generation N+1, waiting for its `Ready`, then draining N. Crashed workers are
//!   respawned at once (backoff only for crash loops). Watches the certificate files and sends
//!   a changed set, once checked, to the serving workers (no new generation), and hands every
//!   generation the same TLS session-ticket keys. Owns all state in one task: no locks.
//! - [`control`] + [`sys`]: the master/worker channel, one prost message per `SOCK_SEQPACKET`
//!   datagram on a socketpair found on fd 3 by the worker; parent-death signal for workers.
//! - [`worker`]: borrows its frontends' listeners from fdkeeper (the same kernel sockets every
//!   generation shares, so nothing queued is lost), serves, reports `Stats`, drains on demand.
//! - [`serve`] over [`http`] and [`tcp`] over [`shared`] and [`net`]: the serving half, usable
//!   on its own with any bound listeners. `serve` accepts, runs the TLS handshake on a TLS bind
//!   and hands each connection to its frontend's protocol; the protocols take the client as a
//!   generic [`net::ClientStream`] (plain TCP or TLS, each its own instance of their code) and
//!   use the worker's [`shared`] state (backends, slots, counters); nothing below `serve`
//!   imports it. [`net`] holds what sits under the protocols: the buffered stream, the TLS
//!   server side (`net::tls`: rustls settings, SNI with its swappable certificates, session
//!   tickets sealed with the master's keys, the handshake) and each server's pool.
//!   Draining stops accepting at once and answers the next request of each keep-alive
//!   connection with `Connection: close`; an idle connection is never closed early, since the
//!   client may be sending on it (the reload race HAProxy and nginx lose).
//! - [`model`]: the plain types the master and the serving code share (a server's admin
//!   state, a worker's counters), at the bottom of the crate's module graph.
//! - [`balance`], [`health`], [`stick`]: the load balancer proper: smooth weighted
//!   round robin, leastconn and source; tcp/http health checks with rise/fall; the stick
//!   cache fed by stickd's Watch stream (the request path never waits on stickd).
//! - [`admin`]: the `proxyd.v1.Admin` service (Status, Reload, ShowServers, SetServer,
//!   ReloadCertificates) with reflection and health, on a unix socket.
//! - [`config`]: `proxyd.toml`; only validated configs leave the module, with their
//!   certificates loaded and checked (`config::tls`).
//! - [`import`]: `proxyd import-haproxy`, a haproxy.cfg turned into the three daemons' files
//!   with a report of what did not translate exactly; it uses `config` to validate what it
//!   writes and nothing else of the crate.
//!
//! Imports point down only. The serving half, top to bottom:
//!
//! ```text
//! worker -> serve -> http, tcp -> shared -> balance, stick, net -> config, model, sys
//! ```
//!
//! (`http` and `tcp` also use `net`, `stick` and `config` directly; `health` sits beside them,
//! on `shared`.) The master's side is `cli -> admin, metrics -> master -> control -> sys`, with
//! `config` and `model` shared by both halves. Nothing imports `worker`, `master` or `serve`
//! from below; the one exception is a test of `config` that checks the addresses
//! `worker::listen_specs` asks fdkeeper for.
//!
//! `unsafe` is denied crate-wide and allowed in two modules only, each call with a `SAFETY`
//! comment: [`sys`], for the syscalls std and tokio do not wrap (seqpacket sockets, the
//! worker's inherited fd and parent-death signal, the peek at an idle pooled connection, the
//! coarse clock), and `stick::alloc`, for
//! the stick cache's allocators (an allocator is an unsafe trait; huge-page mappings and the
//! prefetch of a lookup's bucket are raw syscalls and intrinsics).
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod health;
pub mod http;
pub mod import;
pub mod master;
pub mod metrics;
pub mod model;
pub mod net;
pub mod serve;
pub mod shared;
pub mod stick;
pub mod sys;
pub mod tcp;
pub mod worker;

pub use config::Config;
