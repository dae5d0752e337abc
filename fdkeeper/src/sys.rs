//! The syscalls around held listeners that std and nix do not wrap safely: integer socket
//! options, TCP_INFO, fds inherited from systemd; plus peer credentials and user lookups.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{getsockopt, sockopt};

/// Credentials of the process at the other end of a unix socket, as of its connect().
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let cred = getsockopt(&fd, sockopt::PeerCredentials)?;
    Ok(PeerCred {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
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
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
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
