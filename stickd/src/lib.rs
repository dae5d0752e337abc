//! stickd: stick tables in sled, replicated to every peer over gRPC, inspectable with grpcurl.
#![forbid(unsafe_code)]

pub mod config;
pub mod hlc;
pub mod store;

pub use config::Config;
