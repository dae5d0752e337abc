//! The few syscalls that need `unsafe`: SOCK_SEQPACKET unix sockets, SCM_RIGHTS, peer credentials, TCP_INFO.
#![allow(unsafe_code)]

use std::io;
use std::mem::{MaybeUninit, size_of, size_of_val, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Most fds one message may carry. The kernel's own cap (SCM_MAX_FD) is 253; a lower
/// cap keeps the control buffer small and the per-message work bounded.
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// Credentials of the process at the other end of a unix socket, as of its connect().
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// One datagram and the fds that came with it.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The datagram did not fit the buffer (MSG_TRUNC).
    pub truncated: bool,
    /// Some fds did not fit the control buffer and were dropped by the kernel (MSG_CTRUNC).
    pub fds_truncated: bool,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET unix socket.
pub fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is fresh and owned by nobody else.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket() and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path must be 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Longest path a unix socket address can hold.
pub fn max_unix_path_len() -> usize {
    // SAFETY: plain old data.
    let addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_path.len() - 1
}

pub fn bind_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes that outlives the call.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    })?;
    Ok(())
}

/// connect(2) on a non-blocking socket: EAGAIN means the listener's backlog is full.
pub fn connect_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: as in bind_unix.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    })?;
    Ok(())
}

pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
}

/// accept4 with the new connection non-blocking and close-on-exec.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed: we do not want the peer address.
    let new = cvt(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    })?;
    // SAFETY: accept4 returned a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred is a valid ucred buffer of `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Room for `n` fds in one SCM_RIGHTS control message, as u64 words so it is aligned for cmsghdr.
fn control_buffer(n: usize) -> Vec<u64> {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) } as usize;
    vec![0u64; bytes.div_ceil(8).max(1)]
}

/// The kernel's limit of fds in one SCM_RIGHTS message.
const SCM_MAX_FD: usize = 253;

/// Sends one datagram with `fds` attached (at most the kernel's 253; fdkeeper itself
/// accepts only [`MAX_FDS_PER_MESSAGE`]). Never raises SIGPIPE.
pub fn send_with_fds(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {SCM_MAX_FD} fds per message"),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let mut control = control_buffer(fds.len());
    if !fds.is_empty() {
        let payload = size_of_val(fds);
        msg.msg_control = control.as_mut_ptr().cast::<libc::c_void>();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload as u32) } as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header
        // and its data fit; BorrowedFd is repr(transparent) over RawFd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the control message"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, f) in fds.iter().enumerate() {
                data_ptr.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at iov and control, both alive for the call.
    cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) })
}

/// Receives one datagram and up to `max_fds` fds (close-on-exec). Fds beyond that are
/// reported by `fds_truncated`; the kernel closes them.
pub fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    let mut control = control_buffer(max_fds);
    // SAFETY: plain old data.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast::<libc::c_void>();
    msg.msg_controllen = (control.len() * size_of::<u64>()) as _;
    // SAFETY: msg points at live buffers of the sizes it states.
    let len =
        cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
    // cmsghdrs; every SCM_RIGHTS fd it delivered is now ours and is owned exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let n = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..n {
                    let raw = data_ptr.add(i).read_unaligned();
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

pub fn set_int_opt(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: value is a live c_int for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast::<libc::c_void>(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

pub fn get_int_opt(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value is a live c_int buffer of `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast::<libc::c_void>(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// What TCP_INFO tells about a LISTEN socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenQueue {
    /// Connections waiting to be accepted (tcpi_unacked for a LISTEN socket).
    pub queued: u32,
    /// The effective backlog (tcpi_sacked for a LISTEN socket).
    pub backlog: u32,
}

pub fn listen_queue(fd: BorrowedFd<'_>) -> io::Result<ListenQueue> {
    // SAFETY: tcp_info is plain old data.
    let mut info: libc::tcp_info = unsafe { zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info is a live buffer of `len` bytes; the kernel copies at most that.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast::<libc::c_void>(),
            &mut len,
        )
    })?;
    Ok(ListenQueue {
        queued: info.tcpi_unacked,
        backlog: info.tcpi_sacked,
    })
}

/// The inode of an fd: two fds with the same inode are the same kernel socket.
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is a stat buffer the kernel fills on success.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so st is initialized.
    Ok(unsafe { st.assume_init() }.st_ino)
}

/// Looks a user name up through NSS (so LDAP/sssd users work too).
pub fn uid_by_name(name: &str) -> io::Result<Option<u32>> {
    Ok(nix::unistd::User::from_name(name)?.map(|u| u.uid.as_raw()))
}

/// Looks a group name up through NSS.
pub fn gid_by_name(name: &str) -> io::Result<Option<u32>> {
    Ok(nix::unistd::Group::from_name(name)?.map(|g| g.gid.as_raw()))
}

/// Takes ownership of an fd number inherited from systemd (LISTEN_FDS), after checking it is open.
pub fn adopt_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads flags; it fails with EBADF on a closed fd.
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: systemd passed this fd to us and nothing else in the process owns it:
    // it is taken exactly once, at start-up, from LISTEN_FDS.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Registers an owned fd with tokio's reactor.
pub fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid, open fd, and the AsyncFd owns it: nothing else can
    // close or replace it while it is registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(io::Error::from)
}
