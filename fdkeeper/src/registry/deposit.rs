//! Deposit: a borrower hands listeners back to a restarted fdkeeper, which adopts what checks out.

use std::os::fd::{AsFd, OwnedFd};
use std::time::SystemTime;

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{Deposit, Deposited, Rejected};

use super::{Failure, Origin, Registry, fail};
use crate::address::Bind;
use crate::listener;
use crate::sys;

impl Registry {
    pub fn deposit(
        &mut self,
        conn: u64,
        req: Deposit,
        fds: Vec<OwnedFd>,
    ) -> Result<Deposited, Failure> {
        let claim = self.claim_key(conn, req.claim.as_ref())?;
        let now = SystemTime::now();
        if fds.len() != req.listeners.len() {
            return Err(fail(
                Code::InvalidArgument,
                format!(
                    "deposit lists {} listeners but carries {} fds",
                    req.listeners.len(),
                    fds.len()
                ),
            ));
        }
        let mut out = Deposited {
            instance: Some(self.instance.clone()),
            ..Deposited::default()
        };
        for (spec, fd) in req.listeners.into_iter().zip(fds) {
            let reject = |reason: String| Rejected {
                address: spec.address.clone(),
                reason,
            };
            // Every refused fd is closed when it goes out of scope here.
            let addr = match listener::parse_address(&spec.address) {
                Ok(a) => a,
                Err(m) => {
                    out.rejected.push(reject(m));
                    continue;
                }
            };
            if !self.config.allows_bind(&addr) {
                out.rejected
                    .push(reject(format!("{addr} is not in allowed_binds")));
                continue;
            }
            let actual = match listener::verify_listening_tcp(fd.as_fd()) {
                Ok(a) => a,
                Err(m) => {
                    out.rejected.push(reject(m));
                    continue;
                }
            };
            if !listener::address_matches(&addr, &actual) {
                out.rejected
                    .push(reject(format!("bound to {actual}, not {addr}")));
                continue;
            }
            let key = addr.to_string();
            if self.held.contains_key(&key) {
                // The depositor holds a copy of it and uses it: its claim stands again.
                if claim.is_some() {
                    self.hold(&key, conn, claim.as_ref(), now);
                }
                out.already_held.push(key);
                continue;
            }
            if self.held.len() >= self.config.max_listeners as usize {
                out.rejected.push(reject(format!(
                    "fdkeeper already holds max_listeners ({})",
                    self.config.max_listeners
                )));
                continue;
            }
            // The socket's own options are the truth; the depositor's spec is a hint.
            let mut held_spec = match listener::read_spec(fd.as_fd(), &addr) {
                Ok(s) => s,
                Err(e) => {
                    out.rejected
                        .push(reject(format!("cannot read its options: {e}")));
                    continue;
                }
            };
            // One socket is held under one name: a second name for it, or another socket
            // that collides with a held one, is refused rather than lent twice.
            let same = sys::inode(fd.as_fd())
                .ok()
                .and_then(|ino| self.held.iter().find(|(_, h)| h.inode == ino));
            if let Some((other, _)) = same {
                out.rejected.push(reject(format!(
                    "this socket is held as {other}; it has one name"
                )));
                continue;
            }
            if let Err(f) =
                self.refuse_overlap_with_held(&spec.address, Bind::new(actual, held_spec.v6only))
            {
                out.rejected.push(reject(f.message));
                continue;
            }
            // TCP_DEFER_ACCEPT reads back rounded up; keep the depositor's exact value.
            if held_spec.defer_accept_secs != 0 && spec.defer_accept_secs != 0 {
                held_spec.defer_accept_secs = spec.defer_accept_secs;
            }
            match self.insert(key.clone(), held_spec, fd, actual, Origin::Deposit) {
                Ok(()) => {
                    self.hold(&key, conn, claim.as_ref(), now);
                    out.adopted.push(key);
                }
                Err(f) => out.rejected.push(reject(f.message)),
            }
        }
        Ok(out)
    }
}
