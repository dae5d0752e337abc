//! SOCK_SEQPACKET unix sockets driven by tokio: one message per datagram, in order, with fds beside it.
//!
//! The one fd-passing layer of the project: fdkeeper lends listeners on it (SCM_RIGHTS) and
//! proxyd's master talks to its workers on it. Built on nix; `unsafe` is left only where nix
//! hands back raw fds (received SCM_RIGHTS, accept4) and where tokio's registration needs it.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    self as sock, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD).
pub const SCM_MAX_FD: usize = 253;

/// One datagram and the fds that came with it.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The datagram did not fit the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// More fds came than the receiver takes; those beyond it were closed.
    pub fds_truncated: bool,
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET unix socket.
pub fn socket() -> io::Result<OwnedFd> {
    Ok(sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// A connected, non-blocking, close-on-exec SOCK_SEQPACKET pair.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(sock::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// Longest path a unix socket address can hold (one byte of `sun_path` stays for the NUL).
pub fn max_path_len() -> usize {
    size_of::<libc::sockaddr_un>() - std::mem::offset_of!(libc::sockaddr_un, sun_path) - 1
}

fn unix_addr(path: &Path) -> io::Result<UnixAddr> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > max_path_len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path must be 1 to {} bytes without NUL",
                max_path_len()
            ),
        ));
    }
    Ok(UnixAddr::new(path)?)
}

pub fn bind(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    Ok(sock::bind(fd.as_raw_fd(), &unix_addr(path)?)?)
}

/// connect(2) on a non-blocking socket: EAGAIN means the listener's backlog is full.
pub fn connect(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    Ok(sock::connect(fd.as_raw_fd(), &unix_addr(path)?)?)
}

pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    Ok(sock::listen(&fd, Backlog::new(backlog)?)?)
}

/// accept4 with the new connection non-blocking and close-on-exec.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = sock::accept4(
        fd.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets SO_SNDBUF and SO_RCVBUF to `bytes`: a datagram larger than the send buffer is refused.
pub fn set_buffer_sizes(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    sock::setsockopt(&fd, sockopt::SndBuf, &bytes)?;
    sock::setsockopt(&fd, sockopt::RcvBuf, &bytes)?;
    Ok(())
}

/// Sends one datagram with `fds` attached (at most [`SCM_MAX_FD`]). Never raises SIGPIPE.
pub fn send_with_fds(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {SCM_MAX_FD} fds per message"),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    Ok(sock::sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

/// Receives one datagram and up to `max_fds` fds (close-on-exec); fds beyond that are closed
/// and reported by `fds_truncated`. With `real_len`, `len` is the datagram's own length even
/// when it did not fit `buf` (MSG_TRUNC as a flag).
fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    real_len: bool,
) -> io::Result<Received> {
    // Room for every fd one message can carry: the kernel then never truncates the control
    // data (which nix would not let us read, leaking the fds that did arrive), and the cap
    // below is ours.
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if real_len {
        flags |= MsgFlags::MSG_TRUNC;
    }
    let mut iov = [IoSliceMut::new(buf)];
    let msg = sock::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut control), flags)?;
    let mut fds = Vec::new();
    let mut fds_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    // Under MSG_CTRUNC nix refuses to walk the control data; with the buffer above only a
    // control message that is not SCM_RIGHTS could cause it.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for r in raw {
                    // SAFETY: the kernel installed this fd in our table for this message;
                    // nothing else knows it, so it is owned exactly once, here.
                    let owned = unsafe { OwnedFd::from_raw_fd(r) };
                    if fds.len() < max_fds {
                        fds.push(owned);
                    } else {
                        fds_truncated = true;
                    }
                }
            }
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Registers an owned fd with tokio's reactor.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid, open fd, and the AsyncFd owns it: nothing else can
    // close or replace it while it is registered, and `into_inner` deregisters first.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

/// One SOCK_SEQPACKET connection (or socketpair end) on tokio: datagrams in and out, with
/// fds beside them.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    /// Wraps a seqpacket (or datagram) socket, making it non-blocking; needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connects to a seqpacket listener, waiting briefly while its backlog is full.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let mut wait = Duration::from_millis(1);
        for _ in 0..10 {
            let fd = socket()?;
            match connect(fd.as_fd(), path) {
                Ok(()) => return Self::new(fd),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("the backlog of {} stayed full", path.display()),
        ))
    }

    /// Gives the fd back (to move it to another runtime).
    pub fn into_inner(self) -> OwnedFd {
        self.fd.into_inner()
    }

    /// Sends one datagram with `fds` attached.
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| send_with_fds(inner.get_ref().as_fd(), data, fds)) {
                Ok(Ok(n)) if n == data.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes of a datagram", data.len()),
                    ));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one datagram into `buf` with at most `max_fds` fds. End of file reads as
    /// `len == 0` with no fds.
    pub async fn recv(&self, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_with_fds(inner.get_ref().as_fd(), buf, max_fds, false))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one datagram without fds (any that come are closed); `Ok(None)` at end of
    /// stream. A datagram larger than `max_len` is an error, never silently truncated.
    pub async fn recv_message(&self, max_len: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Allocated only once a datagram waits: callers poll this in select loops.
            let mut buf = vec![0u8; max_len];
            let r = guard.try_io(|inner| recv_with_fds(inner.get_ref().as_fd(), &mut buf, 0, true));
            match r {
                Ok(Ok(got)) if got.len == 0 => return Ok(None),
                Ok(Ok(got)) if got.len > buf.len() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("datagram of {} bytes is too large", got.len),
                    ));
                }
                Ok(Ok(got)) => {
                    buf.truncate(got.len);
                    return Ok(Some(buf));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// The listening side: accepts connections (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Acceptor {
    fd: AsyncFd<OwnedFd>,
}

impl Acceptor {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| accept(inner.get_ref().as_fd())) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn seqpacket_keeps_message_boundaries_and_reports_eof() {
        let (a, b) = pair().expect("socketpair");
        for fd in [&a, &b] {
            set_buffer_sizes(fd.as_fd(), 512 * 1024).expect("buffers");
        }
        let (a, b) = (SeqPacket::new(a).expect("a"), SeqPacket::new(b).expect("b"));
        a.send(b"one", &[]).await.expect("send");
        a.send(&vec![7u8; 100_000], &[]).await.expect("send big");
        assert_eq!(
            b.recv_message(256 * 1024).await.expect("recv").as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(
            b.recv_message(256 * 1024)
                .await
                .expect("recv")
                .map(|v| v.len()),
            Some(100_000)
        );
        drop(a);
        assert_eq!(b.recv_message(256 * 1024).await.expect("eof"), None);
    }

    #[tokio::test]
    async fn a_message_larger_than_asked_for_is_an_error() {
        let (a, b) = pair().expect("socketpair");
        let (a, b) = (SeqPacket::new(a).expect("a"), SeqPacket::new(b).expect("b"));
        a.send(&[1u8; 100], &[]).await.expect("send");
        let e = b.recv_message(10).await.expect_err("too large");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("100 bytes"), "{e}");
    }

    #[tokio::test]
    async fn fds_travel_and_those_beyond_the_cap_are_closed() {
        let (a, b) = pair().expect("socketpair");
        let (a, b) = (SeqPacket::new(a).expect("a"), SeqPacket::new(b).expect("b"));
        let files: Vec<std::fs::File> = (0..5)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        a.send(b"x", &borrowed).await.expect("send");
        let mut buf = [0u8; 16];
        let got = b.recv(&mut buf, 3).await.expect("recv");
        assert_eq!((got.len, got.fds.len()), (1, 3));
        assert!(got.fds_truncated && !got.truncated);
        // Received fds are close-on-exec.
        for fd in &got.fds {
            let flags = fcntl(fd, FcntlArg::F_GETFD).expect("fcntl");
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        a.send(b"yy", &borrowed[..2]).await.expect("send");
        let got = b.recv(&mut buf, 3).await.expect("recv");
        assert_eq!((got.len, got.fds.len()), (2, 2));
        assert!(!got.fds_truncated);
        drop(a);
        let got = b.recv(&mut buf, 3).await.expect("eof");
        assert!(got.len == 0 && got.fds.is_empty());
    }

    #[test]
    fn paths_too_long_or_empty_are_refused_before_the_syscall() {
        let fd = socket().expect("socket");
        let long = "x".repeat(max_path_len() + 1);
        for p in ["", long.as_str()] {
            let e = bind(fd.as_fd(), Path::new(p)).expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p:?}");
        }
        assert_eq!(max_path_len(), 107);
    }
}
