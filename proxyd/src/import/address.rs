//! Addresses as haproxy.cfg writes them (`*:80`, `:::443`, `ipv4@1.2.3.4:80`) and the
//! `--map-address OLD=NEW` rewrites for a try-out on other addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("'{0}' is not an IP address")]
    NotIp(String),
    #[error("'{0}' has no port")]
    NoPort(String),
    #[error("'{0}' is not a single port")]
    BadPort(String),
    #[error("'{0}' is not a TCP address (unix@, abns@, fd@ and paths are not)")]
    NotTcp(String),
    #[error("--map-address '{0}' is not OLD=NEW (each an IP, IP:PORT or *:PORT)")]
    BadMap(String),
}

/// An address of haproxy.cfg: `*` and an empty host are every IPv4 address, as in HAProxy.
pub fn parse(text: &str) -> Result<(IpAddr, Option<u16>), AddressError> {
    let t = text
        .strip_prefix("ipv4@")
        .or_else(|| text.strip_prefix("ipv6@"))
        .or_else(|| text.strip_prefix("tcp@"))
        .or_else(|| text.strip_prefix("tcp4@"))
        .or_else(|| text.strip_prefix("tcp6@"))
        .unwrap_or(text);
    if t.contains('@') || t.starts_with('/') {
        return Err(AddressError::NotTcp(text.to_owned()));
    }
    // `[::1]:80`, `:::80` (IPv6 then port after the last colon), `1.2.3.4:80`, `1.2.3.4`.
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| AddressError::NotIp(text.to_owned()))?;
        (h, after.strip_prefix(':'))
    } else if t.matches(':').count() == 1 {
        let (h, p) = t.split_once(':').unwrap_or((t, ""));
        (h, Some(p))
    } else if t.matches(':').count() > 1 {
        // A bare IPv6 address ends with its port after the last colon, as HAProxy reads it.
        match t.rsplit_once(':') {
            Some((h, p)) if IpAddr::from_str(h).is_ok() || h == ":" => (h, Some(p)),
            _ => (t, None),
        }
    } else {
        (t, None)
    };
    let ip = match host {
        "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ":" | "::" => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        h => h
            .parse::<IpAddr>()
            .map_err(|_| AddressError::NotIp(text.to_owned()))?,
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| AddressError::BadPort(text.to_owned()))?,
        ),
    };
    Ok((ip, port))
}

/// An address with its port required (binds, servers, peers).
pub fn parse_with_port(text: &str) -> Result<SocketAddr, AddressError> {
    match parse(text)? {
        (ip, Some(port)) => Ok(SocketAddr::new(ip, port)),
        (_, None) => Err(AddressError::NoPort(text.to_owned())),
    }
}

/// `NAME:PORT` with a DNS name (not an address): a server proxyd resolves.
pub fn host_name(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let name = host.strip_suffix('.').unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    ok.then(|| (host.to_ascii_lowercase(), port))
}

/// `--map-address OLD=NEW`: an address (or every port of an IP) of haproxy.cfg becomes another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressMap {
    from: (IpAddr, Option<u16>),
    to: (IpAddr, Option<u16>),
}

impl FromStr for AddressMap {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let bad = || AddressError::BadMap(s.to_owned());
        let (old, new) = s.split_once('=').ok_or_else(bad)?;
        let from = parse(old.trim()).map_err(|_| bad())?;
        let to = parse(new.trim()).map_err(|_| bad())?;
        Ok(AddressMap { from, to })
    }
}

/// Rewrites `addr` by the first map that matches its IP (and its port, if the map names one).
pub fn map(maps: &[AddressMap], addr: SocketAddr) -> SocketAddr {
    for m in maps {
        let (ip, port) = m.from;
        if ip == addr.ip() && port.is_none_or(|p| p == addr.port()) {
            return SocketAddr::new(m.to.0, m.to.1.unwrap_or(addr.port()));
        }
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn haproxy_address_forms() {
        assert_eq!(parse_with_port("*:80"), Ok(sa("0.0.0.0:80")));
        assert_eq!(parse_with_port(":80"), Ok(sa("0.0.0.0:80")));
        assert_eq!(parse_with_port("ipv4@10.0.0.1:443"), Ok(sa("10.0.0.1:443")));
        assert_eq!(parse_with_port(":::443"), Ok(sa("[::]:443")));
        assert_eq!(parse_with_port("[::1]:80"), Ok(sa("[::1]:80")));
        assert_eq!(
            parse_with_port("2001:db8::1:80"),
            Ok(sa("[2001:db8::1]:80"))
        );
        assert_eq!(
            parse_with_port("192.168.1.1"),
            Err(AddressError::NoPort("192.168.1.1".into()))
        );
        assert!(matches!(parse("app.local:80"), Err(AddressError::NotIp(_))));
        assert!(matches!(
            parse("unix@/run/x.sock"),
            Err(AddressError::NotTcp(_))
        ));
        assert!(matches!(parse("/run/x.sock"), Err(AddressError::NotTcp(_))));
        assert!(matches!(
            parse("1.2.3.4:80-90"),
            Err(AddressError::BadPort(_))
        ));
    }

    #[test]
    fn maps_rewrite_by_ip_or_by_address() {
        let maps: Vec<AddressMap> = ["192.168.100.59=127.0.0.1", "*:80=127.0.0.1:8080"]
            .iter()
            .map(|m| m.parse().expect("map"))
            .collect();
        assert_eq!(
            map(&maps, sa("192.168.100.59:12138")),
            sa("127.0.0.1:12138")
        );
        assert_eq!(map(&maps, sa("0.0.0.0:80")), sa("127.0.0.1:8080"));
        assert_eq!(map(&maps, sa("0.0.0.0:81")), sa("0.0.0.0:81"));
        assert!("nothing".parse::<AddressMap>().is_err());
        assert!("a=b".parse::<AddressMap>().is_err());
    }
}
