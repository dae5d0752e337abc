//! What fdkeeper holds: one listening socket per address, who borrowed it, and the request handlers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{
    Acquire, Acquired, Deposit, Deposited, Instance, Lent, ListenSpec, Listing, Rejected, Release,
    Released, Response, response,
};

use crate::config::Config;
use crate::listener;
use crate::sys::{self, MAX_FDS_PER_MESSAGE, PeerCred};
use crate::systemd;

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
    /// Connection id -> time of the last lend to it.
    pub lends: BTreeMap<u64, SystemTime>,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub cred: PeerCred,
    pub name: String,
    pub connected: bool,
    closed_at: Option<Instant>,
}

/// Disconnected borrowers kept for the admin view; older ones are forgotten.
const KEEP_DISCONNECTED: usize = 64;

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

pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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

    pub fn connected(&mut self, conn: u64, cred: PeerCred) {
        self.peers.insert(
            conn,
            Peer {
                cred,
                name: String::new(),
                connected: true,
                closed_at: None,
            },
        );
    }

    pub fn disconnected(&mut self, conn: u64) {
        if let Some(p) = self.peers.get_mut(&conn) {
            p.connected = false;
            p.closed_at = Some(Instant::now());
        }
        // A peer that never borrowed is of no interest once gone.
        let borrowed = self.held.values().any(|h| h.lends.contains_key(&conn));
        if !borrowed {
            self.peers.remove(&conn);
        }
        let mut gone: Vec<(Instant, u64)> = self
            .peers
            .iter()
            .filter_map(|(id, p)| p.closed_at.map(|t| (t, *id)))
            .collect();
        if gone.len() > KEEP_DISCONNECTED {
            gone.sort();
            for (_, id) in &gone[..gone.len() - KEEP_DISCONNECTED] {
                self.peers.remove(id);
                for h in self.held.values_mut() {
                    h.lends.remove(id);
                }
            }
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
            },
        );
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
        let mut wanted = Vec::with_capacity(req.listeners.len());
        let mut new_keys = Vec::new();
        for spec in &req.listeners {
            let addr = listener::parse_address(&spec.address)
                .map_err(|m| fail(Code::InvalidArgument, m))?;
            if !self.config.allows_bind(&addr) {
                return Err(fail(
                    Code::AddressNotAllowed,
                    format!("{addr} is not in allowed_binds"),
                ));
            }
            let spec = listener::normalize(spec, addr, self.config.default_backlog);
            match self.held.get(&spec.address) {
                Some(h) => {
                    if let Some(m) = listener::conflict(&h.spec, &spec) {
                        return Err(fail(Code::OptionsConflict, m));
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
            if let Some(h) = self.held.get_mut(key) {
                h.times_lent += 1;
                h.lends.insert(conn, now);
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

    pub fn release(&mut self, conn: u64, req: Release) -> Released {
        for a in &req.addresses {
            let key = listener::parse_address(a).map_or_else(|_| a.clone(), |s| s.to_string());
            if let Some(h) = self.held.get_mut(&key) {
                h.lends.remove(&conn);
            }
        }
        Released {
            instance: Some(self.instance.clone()),
        }
    }

    pub fn list(&self) -> Listing {
        Listing {
            listeners: self.held.values().map(|h| self.lent(h)).collect(),
            instance: Some(self.instance.clone()),
        }
    }

    pub fn deposit(&mut self, req: Deposit, fds: Vec<OwnedFd>) -> Result<Deposited, Failure> {
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
            // TCP_DEFER_ACCEPT reads back rounded up; keep the depositor's exact value.
            if held_spec.defer_accept_secs != 0 && spec.defer_accept_secs != 0 {
                held_spec.defer_accept_secs = spec.defer_accept_secs;
            }
            match self.insert(key.clone(), held_spec, fd, actual, Origin::Deposit) {
                Ok(()) => out.adopted.push(key),
                Err(f) => out.rejected.push(reject(f.message)),
            }
        }
        Ok(out)
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
                .deposit(d, fds)
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
            Kind::Release(r) => Ok((response::Kind::Released(self.release(conn, r)), Vec::new())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use common::SourceFile;

    fn registry() -> Registry {
        let text = "socket = \"/x/s\"\nadmin = \"/x/a\"\nallowed_uids = [0]\nallowed_binds = [\"127.0.0.0/8\"]\n";
        let config = Config::from_source(&SourceFile::from_text("t.toml", text)).expect("config");
        Registry::new(Arc::new(config), false)
    }

    fn cred(pid: i32) -> PeerCred {
        PeerCred {
            pid,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn borrowers_are_remembered_but_bounded() {
        let mut reg = registry();
        let acquire = |name: &str| Acquire {
            listeners: vec![ListenSpec {
                address: "127.0.0.1:0".into(),
                ..ListenSpec::default()
            }],
            borrower: name.into(),
        };
        // A peer that never borrowed is forgotten at once.
        reg.connected(1, cred(1));
        reg.disconnected(1);
        assert!(reg.peers.is_empty());

        for conn in 10..210u64 {
            reg.connected(conn, cred(conn as i32));
            reg.acquire(conn, acquire(&format!("w{conn}")))
                .map_err(|f| f.message)
                .expect("acquire");
            reg.disconnected(conn);
        }
        reg.connected(500, cred(500));
        reg.acquire(500, acquire("live"))
            .map_err(|f| f.message)
            .expect("acquire");

        let held = reg.held.get("127.0.0.1:0").expect("held");
        assert_eq!(held.times_lent, 201);
        assert_eq!(reg.peers.len(), KEEP_DISCONNECTED + 1);
        assert_eq!(held.lends.len(), KEEP_DISCONNECTED + 1);
        assert!(reg.peers[&500].connected);
        assert_eq!(reg.peers[&500].name, "live");
        // The newest disconnected ones are the ones kept.
        assert!(reg.peers.contains_key(&209));
        assert!(!reg.peers.contains_key(&10));
    }
}
