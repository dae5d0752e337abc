//! systemd's fd store: keep every held socket there, and take them back from LISTEN_FDS at start.

use std::os::fd::{BorrowedFd, OwnedFd};

use sd_notify::NotifyState;

use crate::sys;

/// One fd handed over by systemd at start, with its FDNAME.
#[derive(Debug)]
pub struct Inherited {
    pub name: String,
    pub fd: OwnedFd,
}

/// Whether a service manager listens for notifications (and so keeps an fd store).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// FDNAME may not contain ':', which every address does; '_' never occurs in an address,
/// so the mapping can be undone.
pub fn fdname(address: &str) -> String {
    address.replace(':', "_")
}

pub fn address_from_fdname(name: &str) -> String {
    name.replace('_', ":")
}

/// Pushes a held socket to systemd's fd store under its address. A failure is logged:
/// the socket is still held, it just would not survive an fdkeeper restart by itself.
pub fn store(fd: BorrowedFd<'_>, address: &str) {
    let name = fdname(address);
    match sd_notify::notify_with_fds(
        false,
        &[NotifyState::FdStore, NotifyState::FdName(&name)],
        &[fd],
    ) {
        Ok(()) => tracing::debug!(address, fdname = %name, "stored in systemd's fd store"),
        Err(e) => {
            tracing::warn!(address, error = %e, "cannot push the listener to systemd's fd store")
        }
    }
}

/// Drops an fd from systemd's fd store (one that is not a listener we can use).
pub fn remove(name: &str) {
    if let Err(e) = sd_notify::notify(
        false,
        &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
    ) {
        tracing::warn!(fdname = name, error = %e, "cannot remove an fd from systemd's fd store");
    }
}

/// Takes the fds systemd passed (LISTEN_FDS/LISTEN_FDNAMES) and unsets those variables.
/// Call before any thread starts: it changes the environment.
pub fn take_listen_fds() -> Vec<Inherited> {
    let fds = match sd_notify::listen_fds_with_names(true) {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring malformed LISTEN_FDS/LISTEN_FDNAMES");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (raw, name) in fds {
        match sys::adopt_inherited_fd(raw) {
            Ok(fd) => out.push(Inherited { name, fd }),
            Err(e) => {
                tracing::warn!(fd = raw, fdname = %name, error = %e, "inherited fd is not open")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdnames_have_no_colon_and_round_trip() {
        for a in [
            "127.0.0.1:80",
            "[::1]:443",
            "[2001:db8::1]:8080",
            "0.0.0.0:0",
        ] {
            let n = fdname(a);
            assert!(!n.contains(':'), "{n}");
            assert_eq!(address_from_fdname(&n), a);
        }
    }
}
