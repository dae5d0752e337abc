//! `allowed_binds` patterns: which addresses fdkeeper may bind for its borrowers.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One allowed-bind pattern: `*`, an IP, or a CIDR, each with an optional `:port` or
/// `:low-high` (IPv6 in brackets: `[::1]:443`, `[2001:db8::/32]:80-89`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindPattern {
    host: Host,
    ports: Option<(u16, u16)>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Any,
    Net { ip: IpAddr, prefix: u8 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("empty bind pattern")]
    Empty,
    #[error("'{0}' is not an IP address, a CIDR or '*'")]
    BadHost(String),
    #[error("prefix length /{prefix} is too long for {ip}")]
    BadPrefix { ip: IpAddr, prefix: String },
    #[error("'{0}' is not a port (1-65535, or 0 for any free port) or a range 'low-high'")]
    BadPort(String),
    #[error("missing ']' in '{0}'")]
    Bracket(String),
}

impl FromStr for BindPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, PatternError> {
        let text = s.trim();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let end = rest
                .find(']')
                .ok_or_else(|| PatternError::Bracket(text.to_owned()))?;
            let after = &rest[end + 1..];
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| PatternError::BadPort(p.to_owned()))?,
                ),
            };
            (&rest[..end], port)
        } else if text.matches(':').count() > 1 {
            // A bare IPv6 address or network: no port can follow without brackets.
            (text, None)
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            }
        };
        Ok(Self {
            host: parse_host(host)?,
            ports: port.map(parse_ports).transpose()?,
            text: text.to_owned(),
        })
    }
}

fn parse_host(s: &str) -> Result<Host, PatternError> {
    if s == "*" {
        return Ok(Host::Any);
    }
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip = IpAddr::from_str(ip).map_err(|_| PatternError::BadHost(s.to_owned()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                return Err(PatternError::BadPrefix {
                    ip,
                    prefix: p.to_owned(),
                });
            }
        },
    };
    Ok(Host::Net { ip, prefix })
}

fn parse_ports(s: &str) -> Result<(u16, u16), PatternError> {
    let bad = || PatternError::BadPort(s.to_owned());
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (lo, hi),
        None => (s, s),
    };
    let lo = lo.trim().parse::<u16>().map_err(|_| bad())?;
    let hi = hi.trim().parse::<u16>().map_err(|_| bad())?;
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn mask_bits(bits: u32, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (!0u128) << (bits - u32::from(prefix))
    }
}

impl BindPattern {
    /// Whether binding `addr` is allowed by this pattern. Port 0 ("any free port")
    /// matches only patterns without a port or whose range includes 0.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        if let Some((lo, hi)) = self.ports
            && !(lo..=hi).contains(&addr.port())
        {
            return false;
        }
        match (&self.host, addr.ip()) {
            (Host::Any, _) => true,
            (
                Host::Net {
                    ip: IpAddr::V4(net),
                    prefix,
                },
                IpAddr::V4(a),
            ) => {
                let m = mask_bits(32, *prefix);
                (u128::from(net.to_bits()) & m) == (u128::from(a.to_bits()) & m)
            }
            (
                Host::Net {
                    ip: IpAddr::V6(net),
                    prefix,
                },
                IpAddr::V6(a),
            ) => {
                let m = mask_bits(128, *prefix);
                (net.to_bits() & m) == (a.to_bits() & m)
            }
            _ => false,
        }
    }
}

impl fmt::Display for BindPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> BindPattern {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn star_matches_everything() {
        assert!(p("*").matches(&a("0.0.0.0:80")));
        assert!(p("*").matches(&a("[::1]:0")));
        assert!(p("*:443").matches(&a("[::]:443")));
        assert!(!p("*:443").matches(&a("[::]:444")));
    }

    #[test]
    fn cidr_and_ports() {
        let lo = p("127.0.0.0/8");
        assert!(lo.matches(&a("127.0.0.2:80")));
        assert!(lo.matches(&a("127.255.0.1:0")));
        assert!(!lo.matches(&a("128.0.0.1:80")));
        assert!(!lo.matches(&a("[::1]:80")));
        let r = p("10.1.2.3:8000-8099");
        assert!(r.matches(&a("10.1.2.3:8000")));
        assert!(r.matches(&a("10.1.2.3:8099")));
        assert!(!r.matches(&a("10.1.2.3:8100")));
        assert!(!r.matches(&a("10.1.2.4:8000")));
        assert!(!r.matches(&a("10.1.2.3:0")), "port 0 is outside 8000-8099");
        assert!(p("0.0.0.0/0").matches(&a("1.2.3.4:5")));
    }

    #[test]
    fn ipv6_forms() {
        assert!(p("[::1]:443").matches(&a("[::1]:443")));
        assert!(!p("[::1]:443").matches(&a("[::1]:80")));
        assert!(p("::1").matches(&a("[::1]:80")));
        assert!(p("[2001:db8::/32]:80-89").matches(&a("[2001:db8:1::5]:85")));
        assert!(!p("[2001:db8::/32]:80-89").matches(&a("[2001:db9::5]:85")));
        assert!(p("2001:db8::/32").matches(&a("[2001:db8::1]:1")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!("".parse::<BindPattern>(), Err(PatternError::Empty));
        assert!(matches!(
            "localhost:80".parse::<BindPattern>(),
            Err(PatternError::BadHost(_))
        ));
        assert!(matches!(
            "127.0.0.1/33".parse::<BindPattern>(),
            Err(PatternError::BadPrefix { .. })
        ));
        assert!(matches!(
            "127.0.0.1:99999".parse::<BindPattern>(),
            Err(PatternError::BadPort(_))
        ));
        assert!(matches!(
            "127.0.0.1:90-80".parse::<BindPattern>(),
            Err(PatternError::BadPort(_))
        ));
        assert!(matches!(
            "[::1:80".parse::<BindPattern>(),
            Err(PatternError::Bracket(_))
        ));
        assert!(matches!(
            "[::1]80".parse::<BindPattern>(),
            Err(PatternError::BadPort(_))
        ));
    }
}
