//! Claims on held sockets, keyed by the claimant's uid, and releases that close what no claim keeps.

use proto::fdlend::v1::error::Code;
use proto::fdlend::v1::{Claim, ClaimRelease, Release, Released};

use super::{Failure, Registry, fail};
use crate::listener;

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

impl Registry {
    /// The claim `conn` asks for, keyed by its uid; `None` without one.
    pub(super) fn claim_key(
        &self,
        conn: u64,
        claim: Option<&Claim>,
    ) -> Result<Option<ClaimKey>, Failure> {
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
}

/// Whether `release` (asked by a peer of `uid`) drops claim `c`.
fn released(c: &ClaimKey, uid: u32, rel: &ClaimRelease) -> bool {
    c.uid == uid
        && c.owner == rel.owner
        && (c.instance != rel.instance
            || (c.generation < rel.below && !rel.keep.contains(&c.generation)))
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use proto::fdlend::v1::{Deposit, ListenSpec};

    use super::*;
    use crate::registry::testing::{
        acquire_as, bound, claim, cred_uid, refused, registry, release_as,
    };

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
