//! What fdkeeper holds: one listening socket per address, who borrowed it, and the request handlers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{
    Acquire, Acquired, Claim, ClaimRelease, Deposit, Deposited, Instance, Lent, ListenSpec,
    Listing, Rejected, Release, Released, Response, response,
};

use crate::address::{self, Bind};
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
    /// Connection id -> time of the last lend (or deposit) by it.
    pub lends: BTreeMap<u64, SystemTime>,
    /// Who keeps it open; the last one released closes it (see [`Registry::release`]).
    pub claims: BTreeSet<ClaimKey>,
    /// Borrowed or deposited without a claim at least once: nobody may close it.
    pub pinned: bool,
    /// No claim left, but a connected borrower still holds a copy: closed when it lets go.
    pub closing: bool,
}

/// A claim as fdkeeper keeps it: the peer's uid (SO_PEERCRED) is part of the key, so that
/// a peer can only drop claims made under its own uid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimKey {
    pub uid: u32,
    pub owner: String,
    pub instance: String,
    pub generation: u64,
}

impl std::fmt::Display for ClaimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uid {}: {} instance {} gen {}",
            self.uid, self.owner, self.instance, self.generation
        )
    }
}

/// Claims one socket may carry: a borrower that never releases cannot grow it without bound.
pub const MAX_CLAIMS: usize = 1024;
/// Longest owner or instance string in a claim.
const MAX_CLAIM_TEXT: usize = 512;

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
        let let_go: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.closing && h.lends.contains_key(&conn) && !self.lent_to_connected(h))
            .map(|(k, _)| k.clone())
            .collect();
        for key in let_go {
            self.close(&key, "released, and its last connected borrower let go");
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
                claims: BTreeSet::new(),
                pinned: false,
                closing: false,
            },
        );
        Ok(())
    }

    /// The claim `conn` asks for, keyed by its uid; `None` without one.
    fn claim_key(&self, conn: u64, claim: Option<&Claim>) -> Result<Option<ClaimKey>, Failure> {
        let Some(c) = claim else { return Ok(None) };
        if c.owner.is_empty() {
            return Err(fail(Code::InvalidArgument, "a claim needs an owner"));
        }
        if c.owner.len() > MAX_CLAIM_TEXT || c.instance.len() > MAX_CLAIM_TEXT {
            return Err(fail(
                Code::InvalidArgument,
                format!("claim owner and instance are limited to {MAX_CLAIM_TEXT} bytes"),
            ));
        }
        let uid = self.uid_of(conn)?;
        Ok(Some(ClaimKey {
            uid,
            owner: c.owner.clone(),
            instance: c.instance.clone(),
            generation: c.generation,
        }))
    }

    fn uid_of(&self, conn: u64) -> Result<u32, Failure> {
        self.peers.get(&conn).map(|p| p.cred.uid).ok_or_else(|| {
            fail(
                Code::Internal,
                format!("connection {conn} is not registered"),
            )
        })
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

    /// Whether a borrower that is still connected holds a copy of `h`.
    fn lent_to_connected(&self, h: &Held) -> bool {
        h.lends
            .keys()
            .any(|c| self.peers.get(c).is_some_and(|p| p.connected))
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

    /// Without claims: `conn` no longer borrows the listed addresses (the sockets stay).
    /// With claims: drops the matching claims of `conn`'s uid and closes what no claim keeps
    /// (see `Release` in fdlend.proto). Unknown addresses are reported, not refused, so that
    /// a release can be repeated.
    pub fn release(&mut self, conn: u64, req: Release) -> Result<Released, Failure> {
        let mut out = Released {
            instance: Some(self.instance.clone()),
            ..Released::default()
        };
        let mut keys = Vec::with_capacity(req.addresses.len());
        for a in &req.addresses {
            let key = listener::parse_address(a)
                .map_err(|m| fail(Code::InvalidArgument, m))?
                .to_string();
            if self.held.contains_key(&key) {
                keys.push(key);
            } else {
                out.not_held.push(key);
            }
        }
        for key in &keys {
            if let Some(h) = self.held.get_mut(key) {
                h.lends.remove(&conn);
            }
        }
        let Some(rel) = req.claims else {
            return Ok(out);
        };
        if rel.owner.is_empty() {
            return Err(fail(
                Code::InvalidArgument,
                "a claim release needs an owner",
            ));
        }
        let uid = self.uid_of(conn)?;
        if req.addresses.is_empty() {
            keys = self.held.keys().cloned().collect();
        }
        let mut orphans = Vec::new();
        for key in &keys {
            let Some(h) = self.held.get_mut(key) else {
                continue;
            };
            let before = h.claims.len();
            h.claims.retain(|c| !released(c, uid, &rel));
            let dropped = before - h.claims.len();
            if dropped > 0 {
                tracing::info!(address = %key, dropped, left = h.claims.len(), owner = %rel.owner, "claims released");
                if h.claims.is_empty() && !h.pinned {
                    orphans.push(key.clone());
                }
            }
        }
        for key in orphans {
            let busy = self
                .held
                .get(&key)
                .is_some_and(|h| self.lent_to_connected(h));
            if busy {
                // Closing our copy would not close the socket while a borrower holds one,
                // and the admin view would lose a socket that still accepts: wait for it.
                if let Some(h) = self.held.get_mut(&key) {
                    h.closing = true;
                }
                tracing::info!(address = %key, "no claim left; closing once its connected borrowers let go");
                out.closing.push(key);
            } else {
                self.close(&key, "its last claim was released");
                out.closed.push(key);
            }
        }
        Ok(out)
    }

    pub fn list(&self) -> Listing {
        Listing {
            listeners: self.held.values().map(|h| self.lent(h)).collect(),
            instance: Some(self.instance.clone()),
        }
    }

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

/// Whether `release` (asked by a peer of `uid`) drops claim `c`.
fn released(c: &ClaimKey, uid: u32, rel: &ClaimRelease) -> bool {
    c.uid == uid
        && c.owner == rel.owner
        && (c.instance != rel.instance
            || (c.generation < rel.below && !rel.keep.contains(&c.generation)))
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
            claim: None,
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

    fn cred_uid(pid: i32, uid: u32) -> PeerCred {
        PeerCred { pid, uid, gid: uid }
    }

    fn claim(owner: &str, instance: &str, generation: u64) -> Option<Claim> {
        Some(Claim {
            owner: owner.into(),
            instance: instance.into(),
            generation,
        })
    }

    fn acquire_as(reg: &mut Registry, conn: u64, addr: &str, c: Option<Claim>) -> Vec<OwnedFd> {
        let req = Acquire {
            listeners: vec![ListenSpec {
                address: addr.into(),
                ..ListenSpec::default()
            }],
            borrower: format!("conn {conn}"),
            claim: c,
        };
        reg.acquire(conn, req)
            .map_err(|f| f.message)
            .expect("acquire")
            .1
    }

    fn release_as(
        reg: &mut Registry,
        conn: u64,
        addrs: &[&str],
        owner: &str,
        instance: &str,
        below: u64,
        keep: &[u64],
    ) -> Result<Released, Failure> {
        reg.release(
            conn,
            Release {
                addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
                claims: Some(ClaimRelease {
                    owner: owner.into(),
                    instance: instance.into(),
                    below,
                    keep: keep.to_vec(),
                }),
            },
        )
    }

    /// The address a held socket's kernel picked, to connect to it.
    fn bound(reg: &Registry, key: &str) -> SocketAddr {
        reg.held.get(key).expect("held").local_addr
    }

    fn refused(addr: SocketAddr) -> bool {
        matches!(
            std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    }

    #[test]
    fn release_closes_a_socket_once_its_last_claim_is_dropped() {
        let mut reg = registry();
        reg.connected(1, cred_uid(1, 1000));
        // gen 1 and gen 2 of one service share A; only gen 1 has B.
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.1:0",
            claim("svc", "m1", 1),
        ));
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.2:0",
            claim("svc", "m1", 1),
        ));
        reg.disconnected(1);
        reg.connected(2, cred_uid(2, 1000));
        drop(acquire_as(
            &mut reg,
            2,
            "127.0.0.1:0",
            claim("svc", "m1", 2),
        ));
        let a = bound(&reg, "127.0.0.1:0");
        let b = bound(&reg, "127.0.0.2:0");
        // A queued, never accepted connection on B: the close resets it.
        let queued = std::net::TcpStream::connect(b).expect("B listens");

        reg.connected(9, cred_uid(9, 1000));
        let r = release_as(&mut reg, 9, &[], "svc", "m1", 3, &[2]).map_err(|f| f.message);
        let r = r.expect("release");
        assert_eq!(r.closed, ["127.0.0.2:0"], "{r:?}");
        assert!(r.closing.is_empty() && r.not_held.is_empty(), "{r:?}");
        assert!(!reg.held.contains_key("127.0.0.2:0"));
        assert!(refused(b), "B still accepts after its release");
        let mut buf = [0u8; 1];
        let reset = std::io::Read::read(&mut &queued, &mut buf);
        assert!(
            matches!(&reset, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "a queued connection on a closed listener is reset: {reset:?}"
        );
        // gen 2 keeps A.
        let h = reg.held.get("127.0.0.1:0").expect("A held");
        assert_eq!(h.claims.len(), 1);
        assert_eq!(h.claims.first().map(|c| c.generation), Some(2));
        assert!(std::net::TcpStream::connect(a).is_ok());
        // Repeating the release changes nothing (and an unknown address is no error).
        let r = release_as(&mut reg, 9, &["127.0.0.2:0"], "svc", "m1", 3, &[2])
            .map_err(|f| f.message)
            .expect("again");
        assert_eq!(r.not_held, ["127.0.0.2:0"]);
        assert!(r.closed.is_empty() && r.closing.is_empty(), "{r:?}");
        let e = release_as(&mut reg, 9, &["localhost:80"], "svc", "m1", 3, &[2])
            .expect_err("a bad address is refused");
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn claims_of_another_uid_another_owner_or_a_pin_keep_a_socket() {
        let mut reg = registry();
        reg.connected(1, cred_uid(1, 1000));
        reg.connected(2, cred_uid(2, 2000));
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.1:0",
            claim("svc", "m1", 1),
        ));
        // Another uid, same claim text: a claim of its own.
        drop(acquire_as(
            &mut reg,
            2,
            "127.0.0.1:0",
            claim("svc", "m1", 1),
        ));
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.2:0",
            claim("svc", "m1", 1),
        ));
        // Another service claims B too.
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.2:0",
            claim("other", "x", 7),
        ));
        // C is borrowed once without a claim (an older client): pinned.
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.3:0",
            claim("svc", "m1", 1),
        ));
        drop(acquire_as(&mut reg, 2, "127.0.0.3:0", None));
        reg.disconnected(1);
        reg.disconnected(2);

        reg.connected(3, cred_uid(3, 1000));
        let r = release_as(&mut reg, 3, &[], "svc", "m1", 10, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert!(r.closed.is_empty() && r.closing.is_empty(), "{r:?}");
        assert_eq!(reg.held.len(), 3);
        let uids: Vec<u32> = reg.held["127.0.0.1:0"]
            .claims
            .iter()
            .map(|c| c.uid)
            .collect();
        assert_eq!(uids, [2000], "uid 1000 cannot drop uid 2000's claim");
        let owners: Vec<&str> = reg.held["127.0.0.2:0"]
            .claims
            .iter()
            .map(|c| c.owner.as_str())
            .collect();
        assert_eq!(owners, ["other"]);
        assert!(reg.held["127.0.0.3:0"].claims.is_empty() && reg.held["127.0.0.3:0"].pinned);

        // uid 2000 drops its own claim: A goes.
        reg.connected(4, cred_uid(4, 2000));
        let r = release_as(&mut reg, 4, &["127.0.0.1:0"], "svc", "m1", 10, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert_eq!(r.closed, ["127.0.0.1:0"]);
        // An empty owner is refused.
        let e = release_as(&mut reg, 4, &[], "", "m1", 10, &[]).expect_err("no owner");
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn a_deposit_without_a_claim_pins_and_other_instances_are_released() {
        let mut reg = registry();
        // A socket another client hands over without a claim stays whatever proxyd releases.
        let other = std::net::TcpListener::bind("127.0.0.4:0").expect("bind");
        let addr = other.local_addr().expect("addr").to_string();
        reg.connected(1, cred_uid(1, 1000));
        let fd = OwnedFd::from(other);
        let d = reg
            .deposit(
                1,
                Deposit {
                    listeners: vec![ListenSpec {
                        address: addr.clone(),
                        ..ListenSpec::default()
                    }],
                    claim: None,
                },
                vec![fd],
            )
            .map_err(|f| f.message)
            .expect("deposit");
        assert_eq!(d.adopted, [addr.as_str()]);
        drop(acquire_as(&mut reg, 1, &addr, claim("svc", "m1", 1)));
        // A claim of an earlier run of the service (a master restart): instance m0.
        drop(acquire_as(
            &mut reg,
            1,
            "127.0.0.1:0",
            claim("svc", "m0", 9),
        ));
        reg.disconnected(1);
        reg.connected(2, cred_uid(2, 1000));
        let r = release_as(&mut reg, 2, &[], "svc", "m1", 1, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert_eq!(r.closed, ["127.0.0.1:0"], "m0's claims all go: {r:?}");
        assert!(
            reg.held.contains_key(&addr),
            "the deposited socket is pinned"
        );
        assert_eq!(reg.held[&addr].claims.len(), 1, "gen 1 >= below stays");
    }

    #[test]
    fn a_socket_still_lent_closes_when_its_borrower_lets_go_unless_claimed_again() {
        let mut reg = registry();
        reg.connected(1, cred_uid(1, 1000));
        let copy = acquire_as(&mut reg, 1, "127.0.0.1:0", claim("svc", "m1", 1));
        let a = bound(&reg, "127.0.0.1:0");
        reg.connected(2, cred_uid(2, 1000));
        let r = release_as(&mut reg, 2, &[], "svc", "m1", 2, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert_eq!(r.closing, ["127.0.0.1:0"], "conn 1 still holds it: {r:?}");
        assert!(reg.held["127.0.0.1:0"].closing);
        // Another borrower's disconnect is not the one it waits for.
        reg.disconnected(2);
        assert!(reg.held.contains_key("127.0.0.1:0"));
        reg.disconnected(1);
        assert!(
            !reg.held.contains_key("127.0.0.1:0"),
            "closed once conn 1 let go"
        );
        drop(copy);
        assert!(refused(a));

        // Claimed again (a later generation re-adds it) while closing: it stays.
        reg.connected(3, cred_uid(3, 1000));
        let first = acquire_as(&mut reg, 3, "127.0.0.1:0", claim("svc", "m1", 3));
        let a = bound(&reg, "127.0.0.1:0");
        reg.connected(4, cred_uid(4, 1000));
        let r = release_as(&mut reg, 4, &[], "svc", "m1", 4, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert_eq!(r.closing, ["127.0.0.1:0"]);
        reg.connected(5, cred_uid(5, 1000));
        let second = acquire_as(&mut reg, 5, "127.0.0.1:0", claim("svc", "m1", 5));
        reg.disconnected(3);
        drop(first);
        assert!(!reg.held["127.0.0.1:0"].closing);
        assert!(std::net::TcpStream::connect(a).is_ok(), "still listening");
        drop(second);
        // A release computed before gen 5 borrowed (below 5) cannot drop gen 5's claim.
        let r = release_as(&mut reg, 4, &[], "svc", "m1", 5, &[])
            .map_err(|f| f.message)
            .expect("release");
        assert!(r.closed.is_empty() && r.closing.is_empty(), "{r:?}");
    }
}
