//! Plain types the master and the serving code share, with their only encodings on the wire.

use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// A server's administrative state (HAProxy's `set server ... state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminState {
    /// Takes new sessions.
    #[default]
    Ready,
    /// Keeps its stuck sessions, takes no new one.
    Drain,
    /// Takes nothing.
    Maint,
}

/// A state name that is none of `ready`, `drain`, `maint`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown state '{0}' (ready, drain or maint)")]
pub struct UnknownAdminState(pub String);

impl AdminState {
    /// The name operators type and `proxyd.v1.ServerState.admin_state` carries.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// `proxyd.control.v1.ServerAdmin.state`: 0 ready, 1 drain, 2 maint.
    pub fn to_wire(self) -> u32 {
        match self {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        }
    }

    /// The inverse of [`AdminState::to_wire`]; a number from a newer master that this worker
    /// does not know takes the server out of service rather than into it.
    pub fn from_wire(n: u32) -> AdminState {
        match n {
            0 => AdminState::Ready,
            1 => AdminState::Drain,
            _ => AdminState::Maint,
        }
    }
}

impl FromStr for AdminState {
    type Err = UnknownAdminState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            other => Err(UnknownAdminState(other.to_owned())),
        }
    }
}

impl std::fmt::Display for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An [`AdminState`] that request tasks read while the control task writes it.
#[derive(Debug, Default)]
pub struct AtomicAdminState(AtomicU8);

impl AtomicAdminState {
    pub fn new(state: AdminState) -> Self {
        Self(AtomicU8::new(Self::encode(state)))
    }

    pub fn load(&self) -> AdminState {
        match self.0.load(Ordering::Relaxed) {
            0 => AdminState::Ready,
            1 => AdminState::Drain,
            _ => AdminState::Maint,
        }
    }

    pub fn store(&self, state: AdminState) {
        self.0.store(Self::encode(state), Ordering::Relaxed);
    }

    fn encode(state: AdminState) -> u8 {
        match state {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        }
    }
}

/// A worker's connection and request counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub active_connections: u64,
    /// `active_connections` by serving thread (index = thread); empty before the worker
    /// accepts.
    pub thread_connections: Vec<u64>,
    pub requests_total: u64,
    pub requests_in_flight: u64,
    pub tunnels_active: u64,
    pub access_log_dropped: u64,
}

/// How long a TLS session-ticket key seals new tickets before the master makes the next one.
/// Workers keep the previous key to open tickets for as long again, so every ticket resumes for
/// at least this long: the lifetime tickets announce.
pub const TICKET_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);

/// A TLS session-ticket key: made by the master, the same in every generation, so that a client
/// resumes its session across reloads. (Its `Debug` shows the name, never the secret.)
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    /// Put in front of every ticket it seals, to find the key that opens it.
    pub name: [u8; 16],
    /// A ChaCha20-Poly1305 key.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name: String = self.name.iter().map(|b| format!("{b:02x}")).collect();
        f.debug_struct("TicketKey").field("name", &name).finish()
    }
}
