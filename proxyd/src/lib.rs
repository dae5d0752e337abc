//! proxyd: an HTTP/1.1 load balancer run as a master supervising generations of workers.
//!
//! The master ([`master`]) validates the config, spawns each worker as a fresh exec of the
//! binary, and reloads by starting generation N+1 and draining N. A worker ([`worker`]) borrows
//! its listeners from fdkeeper and proxies with [`proxy`] and [`http`].
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod http;
pub mod master;
pub mod proxy;
pub mod sys;
pub mod worker;

pub use config::Config;
