//! Acquire: bind what is new, check what is held, and lend dups of every listener asked for.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::SystemTime;

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{Acquire, Acquired, ListenSpec};

use super::{Failure, MAX_CLAIMS, Origin, Registry, fail};
use crate::address::{self, Bind};
use crate::limits::MAX_FDS_PER_MESSAGE;
use crate::listener;

impl Registry {
    pub fn acquire(
        &mut self,
        conn: u64,
        req: Acquire,
    ) -> Result<(Acquired, Vec<OwnedFd>), Failure> {
        if req.listeners.is_empty() {
            return Err(fail(Code::InvalidArgument, "acquire lists no listeners"));
        }
        if req.listeners.len() > MAX_FDS_PER_MESSAGE {
            return Err(fail(
                Code::InvalidArgument,
                format!(
                    "acquire lists {} listeners; at most {MAX_FDS_PER_MESSAGE} per request",
                    req.listeners.len()
                ),
            ));
        }
        // Check everything before binding anything, so a refused request changes nothing.
        let claim = self.claim_key(conn, req.claim.as_ref())?;
        let mut wanted = Vec::with_capacity(req.listeners.len());
        let mut new_keys = Vec::new();
        for (i, asked) in req.listeners.iter().enumerate() {
            let addr = listener::parse_address(&asked.address)
                .map_err(|m| fail(Code::InvalidArgument, m))?;
            if !self.config.allows_bind(&addr) {
                return Err(fail(
                    Code::AddressNotAllowed,
                    format!("{addr} is not in allowed_binds"),
                ));
            }
            let spec = listener::normalize(asked, addr, self.config.default_backlog);
            let bind = Bind::new(addr, spec.v6only);
            // One socket lent twice in one answer would be served as two listeners (two
            // frontends sharing one accept queue); two overlapping ones cannot both be bound.
            let earlier = wanted.iter().enumerate().find_map(
                |(j, (a, s)): (usize, &(SocketAddr, ListenSpec))| {
                    address::overlap(Bind::new(*a, s.v6only), bind).map(|o| (j, o))
                },
            );
            if let Some((j, o)) = earlier {
                return Err(fail(
                    Code::InvalidArgument,
                    format!(
                        "listener {} ('{}') {o} listener {} ('{}') of the same request",
                        i + 1,
                        asked.address,
                        j + 1,
                        req.listeners[j].address
                    ),
                ));
            }
            if !self.held.contains_key(&spec.address) {
                self.refuse_overlap_with_held(&asked.address, bind)?;
            }
            match self.held.get(&spec.address) {
                Some(h) => {
                    if let Some(m) = listener::conflict(&h.spec, &spec) {
                        return Err(fail(Code::OptionsConflict, m));
                    }
                    if claim.as_ref().is_some_and(|c| !h.claims.contains(c))
                        && h.claims.len() >= MAX_CLAIMS
                    {
                        return Err(fail(
                            Code::InvalidArgument,
                            format!("{} already carries {MAX_CLAIMS} claims", spec.address),
                        ));
                    }
                }
                None if !new_keys.contains(&spec.address) => new_keys.push(spec.address.clone()),
                None => {}
            }
            wanted.push((addr, spec));
        }
        let limit = self.config.max_listeners as usize;
        if self.held.len() + new_keys.len() > limit {
            return Err(fail(
                Code::InvalidArgument,
                format!("fdkeeper would hold more than max_listeners ({limit}) listeners"),
            ));
        }

        let mut keys = Vec::with_capacity(wanted.len());
        for (addr, spec) in wanted {
            let key = spec.address.clone();
            if let Some(h) = self.held.get_mut(&key) {
                if let Some(m) = listener::conflict(&h.spec, &spec) {
                    // Two specs for one address in the same request.
                    return Err(fail(Code::OptionsConflict, m));
                }
                listener::update(h.fd.as_fd(), &mut h.spec, &spec)
                    .map_err(|e| fail(Code::Internal, format!("cannot update {key}: {e}")))?;
            } else {
                // Right after an fdkeeper restart a borrower may still hold this address
                // without having deposited it: with SO_REUSEPORT a bind would succeed and
                // split the queue, so refuse (retriably) as a plain bind would.
                if spec.reuseport
                    && addr.port() != 0
                    && listener::listening_in_netns(&addr).unwrap_or(false)
                {
                    return Err(fail(
                        Code::BindFailed,
                        format!(
                            "{addr} already has a listening socket that fdkeeper does not hold \
                             (a borrower that has not deposited it yet?); not adding a second \
                             one to its SO_REUSEPORT group"
                        ),
                    ));
                }
                let fd = listener::bind(&spec, addr).map_err(|m| fail(Code::BindFailed, m))?;
                let local = listener::local_addr(fd.as_fd())
                    .map_err(|e| fail(Code::Internal, format!("getsockname of {key}: {e}")))?;
                self.insert(key.clone(), spec, fd, local, Origin::Bound)?;
            }
            keys.push(key);
        }

        // Count the lends only once every listener of the request is ready.
        let mut fds = Vec::with_capacity(keys.len());
        for key in &keys {
            let dup = self
                .held
                .get(key)
                .ok_or_else(|| fail(Code::Internal, format!("{key} vanished")))?
                .fd
                .try_clone()
                .map_err(|e| fail(Code::Internal, format!("dup of {key}: {e}")))?;
            fds.push(dup);
        }
        let now = SystemTime::now();
        let mut lent = Vec::with_capacity(keys.len());
        for key in &keys {
            self.hold(key, conn, claim.as_ref(), now);
            if let Some(h) = self.held.get_mut(key) {
                h.times_lent += 1;
            }
            if let Some(h) = self.held.get(key) {
                lent.push(self.lent(h));
            }
        }
        if let Some(p) = self.peers.get_mut(&conn) {
            p.name = req.borrower;
        }
        Ok((
            Acquired {
                listeners: lent,
                instance: Some(self.instance.clone()),
            },
            fds,
        ))
    }
}
