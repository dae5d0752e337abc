//! Listen addresses as the kernel sees them: which two binds are one socket, or collide.
//!
//! Text is never compared: `127.0.0.1:023080` and `127.0.0.1:23080` are one socket, and
//! `0.0.0.0:P` takes `127.0.0.1:P` (and a dual-stack `[::]:P` takes every IPv4 `P`) from a
//! second socket. fdkeeper's registry and proxyd's config validation both ask [`overlap`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A listen address with the one option that changes which addresses it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind {
    pub addr: SocketAddr,
    /// IPV6_V6ONLY; meaningless (so ignored) for IPv4 addresses.
    pub v6only: bool,
}

impl Bind {
    pub fn new(addr: SocketAddr, v6only: bool) -> Self {
        Self {
            addr,
            v6only: addr.is_ipv6() && v6only,
        }
    }

    /// The IP whose traffic this socket receives: an IPv4-mapped IPv6 address on a
    /// dual-stack socket is the IPv4 address it maps.
    fn effective_ip(&self) -> IpAddr {
        match self.addr.ip() {
            IpAddr::V6(v6) if !self.v6only => {
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            }
            ip => ip,
        }
    }
}

/// How two binds collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// The same socket: one listener would be served under two names.
    Same,
    /// Different sockets on one port where one takes the other's address (a wildcard): the
    /// second bind fails, or with SO_REUSEPORT silently steals part of the traffic.
    Covers,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overlap::Same => "is the same socket as",
            Overlap::Covers => "overlaps",
        })
    }
}

/// Whether binding both `a` and `b` collides, as Linux decides bind conflicts.
///
/// Port 0 asks the kernel for a free port: two such binds collide only when they are one
/// address (fdkeeper holds one socket per address, so they would share its port); otherwise
/// each gets a port of its own.
pub fn overlap(a: Bind, b: Bind) -> Option<Overlap> {
    if a.addr.port() != b.addr.port() {
        return None;
    }
    if a.addr.port() == 0 {
        return (a.addr.ip() == b.addr.ip()).then_some(Overlap::Same);
    }
    let (ia, ib) = (a.effective_ip(), b.effective_ip());
    if ia == ib {
        return Some(Overlap::Same);
    }
    let takes_all_of = |wild: IpAddr, wild_bind: &Bind, other: IpAddr| match (wild, other) {
        (IpAddr::V4(w), IpAddr::V4(_)) => w.is_unspecified(),
        (IpAddr::V6(w), IpAddr::V6(_)) => w.is_unspecified(),
        // `[::]:P` without IPV6_V6ONLY receives every IPv4 address of port P too.
        (IpAddr::V6(w), IpAddr::V4(_)) => w.is_unspecified() && !wild_bind.v6only,
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    };
    (takes_all_of(ia, &a, ib) || takes_all_of(ib, &b, ia)).then_some(Overlap::Covers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bind {
        Bind::new(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")), false)
    }
    fn b6only(s: &str) -> Bind {
        Bind::new(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")), true)
    }
    fn both_ways(x: Bind, y: Bind) -> Option<Overlap> {
        let o = overlap(x, y);
        assert_eq!(o, overlap(y, x), "{x:?} vs {y:?} is not symmetric");
        o
    }

    #[test]
    fn spellings_of_one_address_are_one_socket() {
        assert_eq!(
            both_ways(b("127.0.0.1:023080"), b("127.0.0.1:23080")),
            Some(Overlap::Same)
        );
        assert_eq!(
            both_ways(b("[::ffff:127.0.0.1]:80"), b("127.0.0.1:80")),
            Some(Overlap::Same)
        );
        assert_eq!(
            both_ways(b("[0:0::1]:443"), b("[::1]:443")),
            Some(Overlap::Same)
        );
        assert_eq!(
            both_ways(b("127.0.0.1:00"), b("127.0.0.1:0")),
            Some(Overlap::Same)
        );
    }

    #[test]
    fn wildcards_cover_their_family_and_dual_stack_covers_ipv4() {
        assert_eq!(
            both_ways(b("0.0.0.0:80"), b("127.0.0.1:80")),
            Some(Overlap::Covers)
        );
        assert_eq!(
            both_ways(b("[::]:80"), b("[::1]:80")),
            Some(Overlap::Covers)
        );
        assert_eq!(
            both_ways(b("[::]:80"), b("10.0.0.1:80")),
            Some(Overlap::Covers)
        );
        assert_eq!(
            both_ways(b("[::]:80"), b("0.0.0.0:80")),
            Some(Overlap::Covers)
        );
        assert_eq!(both_ways(b6only("[::]:80"), b("0.0.0.0:80")), None);
        assert_eq!(
            both_ways(b6only("[::]:80"), b6only("[::1]:80")),
            Some(Overlap::Covers)
        );
        // A v6only socket cannot take a mapped address: it is a plain IPv6 one then.
        assert_eq!(
            both_ways(b6only("[::ffff:127.0.0.1]:80"), b("127.0.0.1:80")),
            None
        );
    }

    #[test]
    fn distinct_addresses_and_ports_do_not_collide() {
        assert_eq!(both_ways(b("127.0.0.1:80"), b("127.0.0.2:80")), None);
        assert_eq!(both_ways(b("127.0.0.1:80"), b("127.0.0.1:81")), None);
        assert_eq!(both_ways(b("[::1]:80"), b("127.0.0.1:80")), None);
        assert_eq!(both_ways(b("0.0.0.0:80"), b("[::1]:80")), None);
        assert_eq!(both_ways(b("0.0.0.0:0"), b("127.0.0.1:0")), None);
        assert_eq!(both_ways(b("[::]:0"), b("0.0.0.0:0")), None);
    }

    /// The rules above are what the kernel does: a second bind that [`overlap`] accepts
    /// succeeds next to a listening first one, and one it refuses fails.
    #[test]
    fn agrees_with_the_kernel() {
        use socket2::{Domain, Socket, Type};
        let listen = |bind: Bind| -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(bind.addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if bind.addr.is_ipv6() {
                s.set_only_v6(bind.v6only)?;
            }
            s.bind(&bind.addr.into())?;
            s.listen(8)?;
            Ok(s)
        };
        let Ok(probe) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let port = probe.local_addr().map(|a| a.port()).unwrap_or(0);
        drop(probe);
        let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let at =
            |s: &str, v6only: bool| Bind::new(format!("{s}:{port}").parse().expect("addr"), v6only);
        let mut pairs = vec![
            (at("127.0.0.1", false), at("127.0.0.1", false)),
            (at("0.0.0.0", false), at("127.0.0.1", false)),
            (at("127.0.0.1", false), at("127.0.0.2", false)),
        ];
        if ipv6 {
            pairs.extend([
                (at("[::]", false), at("127.0.0.1", false)),
                (at("[::]", true), at("127.0.0.1", false)),
                (at("[::]", false), at("[::1]", false)),
                (at("[::1]", false), at("127.0.0.1", false)),
                (at("[::ffff:127.0.0.1]", false), at("127.0.0.1", false)),
            ]);
        }
        for (first, second) in pairs {
            let Ok(held) = listen(first) else {
                // The port was taken meanwhile: nothing to learn from this pair.
                continue;
            };
            let kernel_refuses = listen(second).is_err();
            drop(held);
            assert_eq!(
                kernel_refuses,
                overlap(first, second).is_some(),
                "{first:?} then {second:?}"
            );
        }
    }
}
