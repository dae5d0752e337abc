//! Listening TCP sockets: binding them as a `ListenSpec` says, updating what may change, checking adopted ones.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use proto::fdlend::v1::ListenSpec;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::sys;

/// Parses a spec's address: an IP literal and a port (`127.0.0.1:80`, `[::1]:443`).
pub fn parse_address(address: &str) -> Result<SocketAddr, String> {
    address
        .trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("'{address}' is not an address like 127.0.0.1:80 or [::1]:443"))
}

/// The spec as fdkeeper holds it: canonical address, backlog resolved, v6only
/// meaningless (so false) for IPv4.
pub fn normalize(spec: &ListenSpec, addr: SocketAddr, default_backlog: u32) -> ListenSpec {
    ListenSpec {
        address: addr.to_string(),
        backlog: if spec.backlog == 0 {
            default_backlog
        } else {
            spec.backlog
        },
        v6only: addr.is_ipv6() && spec.v6only,
        ..spec.clone()
    }
}

fn backlog_arg(backlog: u32) -> i32 {
    i32::try_from(backlog).unwrap_or(i32::MAX)
}

/// Creates, binds and listens a socket for a normalized spec. Errors name the step that failed.
pub fn bind(spec: &ListenSpec, addr: SocketAddr) -> Result<OwnedFd, String> {
    let step = |what: &str, e: io::Error| format!("{what} {addr}: {e}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| step("socket for", e))?;
    // Rebinding right after a restart must not fail on connections in TIME_WAIT.
    socket
        .set_reuse_address(true)
        .map_err(|e| step("SO_REUSEADDR on", e))?;
    if spec.reuseport {
        socket
            .set_reuse_port(true)
            .map_err(|e| step("SO_REUSEPORT on", e))?;
    }
    if addr.is_ipv6() {
        socket
            .set_only_v6(spec.v6only)
            .map_err(|e| step("IPV6_V6ONLY on", e))?;
    }
    if spec.freebind {
        let r = if addr.is_ipv6() {
            socket.set_freebind_v6(true)
        } else {
            socket.set_freebind_v4(true)
        };
        r.map_err(|e| step("IP_FREEBIND on", e))?;
    }
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| step("bind", e))?;
    socket
        .listen(backlog_arg(spec.backlog))
        .map_err(|e| step("listen on", e))?;
    let fd = OwnedFd::from(socket);
    set_defer_accept(fd.as_fd(), spec.defer_accept_secs)
        .map_err(|e| step("TCP_DEFER_ACCEPT on", e))?;
    set_fastopen(fd.as_fd(), spec.fastopen_queue).map_err(|e| step("TCP_FASTOPEN on", e))?;
    Ok(fd)
}

fn set_defer_accept(fd: BorrowedFd<'_>, secs: u32) -> io::Result<()> {
    sys::set_int_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        i32::try_from(secs).unwrap_or(i32::MAX),
    )
}

fn set_fastopen(fd: BorrowedFd<'_>, queue: u32) -> io::Result<()> {
    sys::set_int_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_FASTOPEN,
        i32::try_from(queue).unwrap_or(i32::MAX),
    )
}

/// Options that are fixed once a socket is bound; a differing request is a conflict.
pub fn conflict(held: &ListenSpec, wanted: &ListenSpec) -> Option<String> {
    let mut diffs = Vec::new();
    if held.reuseport != wanted.reuseport {
        diffs.push(format!("reuseport={}", held.reuseport));
    }
    if held.v6only != wanted.v6only {
        diffs.push(format!("v6only={}", held.v6only));
    }
    if held.freebind != wanted.freebind {
        diffs.push(format!("freebind={}", held.freebind));
    }
    (!diffs.is_empty()).then(|| {
        format!(
            "{} is held with {}, which cannot change without closing the socket",
            held.address,
            diffs.join(", ")
        )
    })
}

/// Applies the options that can change on a listening socket (backlog, defer-accept,
/// fastopen) and records them in `held`.
pub fn update(fd: BorrowedFd<'_>, held: &mut ListenSpec, wanted: &ListenSpec) -> io::Result<()> {
    if held.backlog != wanted.backlog {
        // listen() again on a listening socket only changes its backlog.
        SockRef::from(&fd).listen(backlog_arg(wanted.backlog))?;
        held.backlog = wanted.backlog;
    }
    if held.defer_accept_secs != wanted.defer_accept_secs {
        set_defer_accept(fd, wanted.defer_accept_secs)?;
        held.defer_accept_secs = wanted.defer_accept_secs;
    }
    if held.fastopen_queue != wanted.fastopen_queue {
        set_fastopen(fd, wanted.fastopen_queue)?;
        held.fastopen_queue = wanted.fastopen_queue;
    }
    Ok(())
}

/// Checks that `fd` is a listening TCP socket and returns the address it is bound to.
pub fn verify_listening_tcp(fd: BorrowedFd<'_>) -> Result<SocketAddr, String> {
    let sock = SockRef::from(&fd);
    let io = |what: &str, e: io::Error| format!("cannot read {what}: {e}");
    match sock.domain().map_err(|e| io("SO_DOMAIN", e))? {
        Domain::IPV4 | Domain::IPV6 => {}
        _ => return Err("not an IPv4/IPv6 socket".to_owned()),
    }
    if sock.r#type().map_err(|e| io("SO_TYPE", e))? != Type::STREAM {
        return Err("not a stream socket".to_owned());
    }
    if sock.protocol().map_err(|e| io("SO_PROTOCOL", e))? != Some(Protocol::TCP) {
        return Err("not a TCP socket".to_owned());
    }
    if !sock.is_listener().map_err(|e| io("SO_ACCEPTCONN", e))? {
        return Err("not listening".to_owned());
    }
    sock.local_addr()
        .map_err(|e| io("the local address", e))?
        .as_socket()
        .ok_or_else(|| "bound to a non-IP address".to_owned())
}

/// The address an fd is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound to a non-IP address"))
}

/// Whether a socket of this network namespace already listens on exactly `addr`
/// (from /proc/net/tcp or tcp6). Binding with SO_REUSEPORT would then succeed and
/// split the accept queue with that socket instead of failing.
pub fn listening_in_netns(addr: &SocketAddr) -> io::Result<bool> {
    let (file, ip_hex_len) = if addr.is_ipv4() {
        ("/proc/net/tcp", 8)
    } else {
        ("/proc/net/tcp6", 32)
    };
    let text = std::fs::read_to_string(file)?;
    Ok(text.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let (Some(_), Some(local), Some(_), Some(state)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            return false;
        };
        // 0A is TCP_LISTEN.
        state == "0A" && parse_proc_addr(local, ip_hex_len).is_some_and(|a| a == *addr)
    }))
}

/// Parses "0100007F:1F90": the IP as the kernel's native-endian 32-bit words, the port big-endian.
fn parse_proc_addr(s: &str, ip_hex_len: usize) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    if ip.len() != ip_hex_len {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes.as_slice()).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes.as_slice()).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket bound to `actual` can stand for the spec address `wanted`
/// (a spec with port 0 accepts whatever port the kernel picked).
pub fn address_matches(wanted: &SocketAddr, actual: &SocketAddr) -> bool {
    wanted.ip() == actual.ip() && (wanted.port() == 0 || wanted.port() == actual.port())
}

/// Reads a listening socket's spec back from its options (for fds inherited from systemd).
/// TCP_DEFER_ACCEPT reads back rounded up to the kernel's retransmission steps.
pub fn read_spec(fd: BorrowedFd<'_>, address: &SocketAddr) -> io::Result<ListenSpec> {
    let sock = SockRef::from(&fd);
    let queue = sys::listen_queue(fd)?;
    let v6 = address.is_ipv6();
    let freebind = if v6 {
        sock.freebind_v6()?
    } else {
        sock.freebind_v4()?
    };
    let non_negative = |v: i32| u32::try_from(v).unwrap_or(0);
    Ok(ListenSpec {
        address: address.to_string(),
        backlog: queue.backlog,
        reuseport: sock.reuse_port()?,
        v6only: v6 && sock.only_v6()?,
        defer_accept_secs: non_negative(sys::get_int_opt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
        )?),
        fastopen_queue: non_negative(sys::get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN)?),
        freebind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: &str) -> ListenSpec {
        ListenSpec {
            address: addr.to_owned(),
            ..ListenSpec::default()
        }
    }

    #[test]
    fn bind_update_and_read_back() {
        let addr = parse_address("127.0.0.1:0").expect("addr");
        let mut held = normalize(
            &ListenSpec {
                reuseport: true,
                v6only: true,
                fastopen_queue: 16,
                ..spec("127.0.0.1:0")
            },
            addr,
            128,
        );
        assert_eq!(held.backlog, 128);
        assert!(!held.v6only, "v6only means nothing for IPv4");
        let fd = bind(&held, addr).expect("bind");
        let actual = verify_listening_tcp(fd.as_fd()).expect("listening tcp");
        assert!(address_matches(&addr, &actual));
        assert_ne!(actual.port(), 0);

        let back = read_spec(fd.as_fd(), &actual).expect("read back");
        assert!(back.reuseport);
        assert_eq!(back.backlog, 128);
        assert_eq!(back.fastopen_queue, 16);

        let wanted = ListenSpec {
            backlog: 64,
            fastopen_queue: 0,
            defer_accept_secs: 1,
            ..held.clone()
        };
        update(fd.as_fd(), &mut held, &wanted).expect("update");
        assert_eq!(held, wanted);
        let back = read_spec(fd.as_fd(), &actual).expect("read back");
        assert_eq!(back.backlog, 64);
        assert_eq!(back.fastopen_queue, 0);
        assert_eq!(back.defer_accept_secs, 1);

        let other = ListenSpec {
            reuseport: false,
            ..held.clone()
        };
        let msg = conflict(&held, &other).expect("conflict");
        assert!(msg.contains("reuseport=true"), "{msg}");
        assert!(conflict(&held, &held).is_none());
    }

    #[test]
    fn finds_listeners_of_the_namespace() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = v4.local_addr().expect("addr");
        assert_eq!(listening_in_netns(&a).ok(), Some(true));
        drop(v4);
        assert_eq!(listening_in_netns(&a).ok(), Some(false));
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            let a = v6.local_addr().expect("addr");
            assert_eq!(listening_in_netns(&a).ok(), Some(true));
        }
        assert_eq!(
            parse_proc_addr("0100007F:1F90", 8),
            Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            "little-endian hosts print 127.0.0.1 so"
        );
    }

    #[test]
    fn non_listening_sockets_are_refused() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(verify_listening_tcp(udp.as_fd()).is_err());
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.bind(&SockAddr::from(parse_address("127.0.0.1:0").expect("addr")))
            .expect("bind");
        let err = verify_listening_tcp(s.as_fd()).expect_err("bound but not listening");
        assert!(err.contains("not listening"), "{err}");
    }

    #[test]
    fn port_zero_matches_any_port_of_the_same_ip() {
        let want = parse_address("127.0.0.1:0").expect("addr");
        assert!(address_matches(
            &want,
            &parse_address("127.0.0.1:4000").expect("addr")
        ));
        assert!(!address_matches(
            &want,
            &parse_address("127.0.0.2:4000").expect("addr")
        ));
        let want = parse_address("127.0.0.1:80").expect("addr");
        assert!(!address_matches(
            &want,
            &parse_address("127.0.0.1:81").expect("addr")
        ));
        assert!(parse_address("localhost:80").is_err());
    }
}
