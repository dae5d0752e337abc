//! Pieces every daemon of the project shares, so that they behave alike.
//!
//! `unsafe` lives in [`seqpacket`] only, where nix hands back raw fds.
#![deny(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod fuzz;
pub mod grpc;
pub mod seqpacket;
pub mod signals;
pub mod stick_key;
#[cfg(feature = "test-nameserver")]
pub mod test_nameserver;
pub mod time;
pub mod units;

pub use config::{ConfigError, SourceFile};
pub use units::{Duration, Size};
