//! Pieces every daemon of the project shares, so that they behave alike.
#![forbid(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod fuzz;
pub mod grpc;
pub mod stick_key;
pub mod units;

pub use config::{ConfigError, SourceFile};
pub use units::{Duration, Size};
