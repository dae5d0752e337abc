//! What fdkeeper holds: one listening socket per address, and the request handlers' shared steps.
//!
//! The handlers live beside this file: [`acquire`](Registry::acquire) binds or lends,
//! [`deposit`](Registry::deposit) takes sockets back after a restart, [`claims`] keeps who may
//! close what and runs releases, [`peers`] remembers the borrowers.

mod acquire;
mod claims;
mod deposit;
mod peers;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::SystemTime;

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{Instance, Lent, ListenSpec, Listing, Response, response};

use crate::address::{self, Bind};
use crate::config::Config;
use crate::listener;
use crate::sys;
use crate::systemd;

pub use claims::{ClaimKey, MAX_CLAIMS};
pub use peers::Peer;

/// How fdkeeper came to hold a socket (shown by the admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Bound,
    SystemdFdstore,
    Deposit,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Bound => "bound",
            Origin::SystemdFdstore => "systemd-fdstore",
            Origin::Deposit => "deposit",
        }
    }
}

#[derive(Debug)]
pub struct Held {
    pub spec: ListenSpec,
    pub fd: OwnedFd,
    pub local_addr: SocketAddr,
    pub inode: u64,
    pub origin: Origin,
    pub held_since: SystemTime,
    pub times_lent: u64,
    /// Connection id -> time of the last lend (or deposit) by it.
    pub lends: BTreeMap<u64, SystemTime>,
    /// Who keeps it open; the last one released closes it (see [`Registry::release`]).
    pub claims: BTreeSet<ClaimKey>,
    /// Borrowed or deposited without a claim at least once: nobody may close it.
    pub pinned: bool,
    /// No claim left, but a connected borrower still holds a copy: closed when it lets go.
    pub closing: bool,
}

#[derive(Debug)]
pub struct Registry {
    pub config: Arc<Config>,
    pub instance: Instance,
    pub held: BTreeMap<String, Held>,
    pub peers: HashMap<u64, Peer>,
    /// Push newly held sockets to systemd's fd store.
    fdstore: bool,
}

/// A request handler's failure, sent back as `Error`.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

fn fail(code: Code, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl Registry {
    pub fn new(config: Arc<Config>, fdstore: bool) -> Self {
        Self {
            config,
            instance: Instance {
                id: format!("{:016x}", rand::random::<u64>()),
                pid: std::process::id(),
            },
            held: BTreeMap::new(),
            peers: HashMap::new(),
            fdstore,
        }
    }

    fn lent(&self, h: &Held) -> Lent {
        Lent {
            spec: Some(h.spec.clone()),
            local_address: h.local_addr.to_string(),
            inode: h.inode,
        }
    }

    /// Adds a socket fdkeeper now holds, and keeps a copy in systemd's fd store.
    fn insert(
        &mut self,
        key: String,
        spec: ListenSpec,
        fd: OwnedFd,
        local_addr: SocketAddr,
        origin: Origin,
    ) -> Result<(), Failure> {
        let inode = sys::inode(fd.as_fd())
            .map_err(|e| fail(Code::Internal, format!("fstat of {key}: {e}")))?;
        if self.fdstore && origin != Origin::SystemdFdstore {
            systemd::store(fd.as_fd(), &key);
        }
        tracing::info!(address = %key, local = %local_addr, inode, origin = origin.as_str(), "holding listener");
        self.held.insert(
            key,
            Held {
                spec,
                fd,
                local_addr,
                inode,
                origin,
                held_since: SystemTime::now(),
                times_lent: 0,
                lends: BTreeMap::new(),
                claims: BTreeSet::new(),
                pinned: false,
                closing: false,
            },
        );
        Ok(())
    }

    /// Records that `conn` holds `key` (lent or deposited), under `claim` or pinned.
    fn hold(&mut self, key: &str, conn: u64, claim: Option<&ClaimKey>, at: SystemTime) {
        if let Some(h) = self.held.get_mut(key) {
            h.lends.insert(conn, at);
            match claim {
                Some(c) => {
                    h.claims.insert(c.clone());
                }
                None => h.pinned = true,
            }
            if h.closing {
                tracing::info!(address = %key, "claimed again before its close: kept");
                h.closing = false;
            }
        }
    }

    /// Stops holding `key`: fdkeeper's copy is closed (and systemd's fd store copy dropped).
    fn close(&mut self, key: &str, why: &str) {
        if let Some(h) = self.held.remove(key) {
            if self.fdstore {
                systemd::remove(&systemd::fdname(key));
            }
            let queued = sys::listen_queue(h.fd.as_fd()).map_or(0, |q| q.queued);
            tracing::info!(
                address = %key,
                local = %h.local_addr,
                inode = h.inode,
                unaccepted = queued,
                reason = why,
                "closed listener"
            );
        }
    }

    /// Refuses a new bind that collides with a socket held under another address: the same
    /// socket under a second name (`127.0.0.1:0` that the kernel put on port P, asked for as
    /// `127.0.0.1:P`), or a wildcard and a specific address of one port.
    fn refuse_overlap_with_held(&self, asked: &str, bind: Bind) -> Result<(), Failure> {
        for (key, h) in &self.held {
            if let Some(o) = address::overlap(bind, Bind::new(h.local_addr, h.spec.v6only)) {
                let how = match o {
                    address::Overlap::Same => format!("ask for it as {key}"),
                    address::Overlap::Covers => "the two cannot listen side by side".to_owned(),
                };
                return Err(fail(
                    Code::InvalidArgument,
                    format!(
                        "'{asked}' {o} {key} (listening on {}), which fdkeeper holds: {how}",
                        h.local_addr
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Adopts a socket inherited from systemd's fd store under its FDNAME.
    pub fn adopt_inherited(&mut self, name: &str, fd: OwnedFd) -> Result<(), String> {
        let key = systemd::address_from_fdname(name);
        let addr = listener::parse_address(&key)?;
        let actual = listener::verify_listening_tcp(fd.as_fd())?;
        if !listener::address_matches(&addr, &actual) {
            return Err(format!("bound to {actual}, not {addr}"));
        }
        let spec = listener::read_spec(fd.as_fd(), &addr)
            .map_err(|e| format!("cannot read its options: {e}"))?;
        let key = addr.to_string();
        if self.held.contains_key(&key) {
            return Err("a second fd for the same address".to_owned());
        }
        self.insert(key, spec, fd, actual, Origin::SystemdFdstore)
            .map_err(|f| f.message)
    }

    pub fn list(&self) -> Listing {
        Listing {
            listeners: self.held.values().map(|h| self.lent(h)).collect(),
            instance: Some(self.instance.clone()),
        }
    }

    /// Handles one decoded request; the fds that came with it are consumed (adopted or closed).
    pub fn handle(
        &mut self,
        conn: u64,
        kind: proto::fdlend::v1::request::Kind,
        fds: Vec<OwnedFd>,
    ) -> (response::Kind, Vec<OwnedFd>) {
        use proto::fdlend::v1::request::Kind;
        let result = match kind {
            Kind::Deposit(d) => self
                .deposit(conn, d, fds)
                .map(|d| (response::Kind::Deposited(d), Vec::new())),
            // Only a Deposit may carry fds; any others are closed right here.
            _ if !fds.is_empty() => {
                drop(fds);
                Err(fail(
                    Code::InvalidArgument,
                    "only Deposit may carry fds; they were closed",
                ))
            }
            Kind::Acquire(a) => self
                .acquire(conn, a)
                .map(|(a, fds)| (response::Kind::Acquired(a), fds)),
            Kind::Release(r) => self
                .release(conn, r)
                .map(|r| (response::Kind::Released(r), Vec::new())),
            Kind::List(_) => Ok((response::Kind::Listing(self.list()), Vec::new())),
        };
        match result {
            Ok(ok) => ok,
            Err(f) => (error_kind(f.code, f.message), Vec::new()),
        }
    }
}

pub fn error_kind(code: Code, message: impl Into<String>) -> response::Kind {
    response::Kind::Error(proto::fdlend::v1::Error {
        code: code as i32,
        message: message.into(),
    })
}

pub fn response(id: u64, kind: response::Kind) -> Response {
    Response {
        id,
        kind: Some(kind),
    }
}
