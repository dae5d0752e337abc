//! The few syscalls std and tokio do not wrap: SOCK_SEQPACKET socketpairs, the worker's
//! inherited control fd and its parent-death signal, the coarse clock. One of the two modules
//! of proxyd with `unsafe` (the other is the stick cache's allocator, `stick::alloc`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The fd number a worker finds its control socket on.
pub const CONTROL_FD: RawFd = 3;

/// Largest control datagram (a Start message carries the whole config).
pub const MAX_DATAGRAM: usize = 256 * 1024;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A connected, non-blocking, close-on-exec `SOCK_SEQPACKET` pair.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The Start datagram carries the config: make room for it on both ends.
    for fd in [&pair.0, &pair.1] {
        set_buf(fd, libc::SO_SNDBUF)?;
        set_buf(fd, libc::SO_RCVBUF)?;
    }
    Ok(pair)
}

fn set_buf(fd: &OwnedFd, opt: libc::c_int) -> io::Result<()> {
    let v: libc::c_int = MAX_DATAGRAM as libc::c_int * 2;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Arranges for the spawned worker to find `control` on [`CONTROL_FD`] and to get SIGTERM
/// when the master dies (PR_SET_PDEATHSIG), refusing to start if the master is already gone.
///
/// The parent-death signal fires when the *thread* that forked exits, so the master spawns
/// workers from its main thread only (it runs a current-thread runtime).
pub fn prepare_worker(cmd: &mut tokio::process::Command, control: RawFd) {
    // SAFETY: getpid has no preconditions.
    let master = unsafe { libc::getpid() };
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls from here on: we are between fork and exec.
        // SAFETY: plain syscalls on integers; no allocation, no locks.
        unsafe {
            if control == CONTROL_FD {
                let flags = cvt(libc::fcntl(control, libc::F_GETFD))?;
                cvt(libc::fcntl(
                    control,
                    libc::F_SETFD,
                    flags & !libc::FD_CLOEXEC,
                ))?;
            } else {
                // dup2 leaves the copy without FD_CLOEXEC, so it survives exec.
                cvt(libc::dup2(control, CONTROL_FD))?;
            }
            cvt(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
            ))?;
            if libc::getppid() != master {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe syscalls (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Takes ownership of the control socket a worker inherited, after checking that it is one.
pub fn take_control_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut ty: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: pointers to a live c_int and its size; an invalid fd is reported as EBADF.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &raw mut len,
        )
    })?;
    if ty != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a SOCK_SEQPACKET socket"),
        ));
    }
    // SAFETY: the fd is open (getsockopt succeeded) and this process owns it: it was
    // inherited for exactly this purpose and nothing else refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))?;
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
    }
    Ok(owned)
}

/// Whether an idle pooled connection is unusable: the server closed or reset it, or sent
/// bytes nobody asked for. A real `recv(MSG_PEEK)`, because the reactor's cached readiness
/// may not have seen a FIN that arrived since its last poll.
pub fn idle_connection_broken(fd: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: one writable byte, and MSG_PEEK leaves the socket's data in place.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted;
    }
    true
}

/// An async `SOCK_SEQPACKET` socket: one message per datagram, in order.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    /// Wraps a non-blocking seqpacket fd; must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the OwnedFd is moved into the AsyncFd, which neither replaces nor closes
        // it while registered; `into_inner` deregisters before giving it back.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Gives the fd back (to move it to another runtime).
    pub fn into_inner(self) -> OwnedFd {
        self.fd.into_inner()
    }

    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: `data` is a live slice of `data.len()` bytes.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    /// Receives one datagram; `Ok(None)` at end of stream. A datagram larger than
    /// [`MAX_DATAGRAM`] is an error, never silently truncated.
    pub async fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Allocated only once a datagram waits: callers poll this in select loops.
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let r = guard.try_io(|fd| {
                // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) if n > buf.len() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("control datagram of {n} bytes is too large"),
                    ));
                }
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// CPU time the calling thread has used, in ns: for benchmarks on a shared machine, where
/// wall time counts the time spent waiting for a CPU.
pub fn thread_cpu_ns() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) })?;
    Ok(u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Unix time in ms from `CLOCK_REALTIME_COARSE`: the time of the last tick, read without
/// touching the TSC (the stick cache reads it on every lookup).
pub fn coarse_unix_ms() -> io::Result<i64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) })?;
    // time_t and c_long are i64 here but i32 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(ts.tv_sec) * 1000 + i64::from(ts.tv_nsec) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn seqpacket_keeps_message_boundaries_and_reports_eof() {
        let (a, b) = seqpacket_pair().expect("socketpair");
        let (a, b) = (SeqPacket::new(a).expect("a"), SeqPacket::new(b).expect("b"));
        a.send(b"one").await.expect("send");
        a.send(&vec![7u8; 100_000]).await.expect("send big");
        assert_eq!(b.recv().await.expect("recv").as_deref(), Some(&b"one"[..]));
        assert_eq!(
            b.recv().await.expect("recv").map(|v| v.len()),
            Some(100_000)
        );
        drop(a);
        assert_eq!(b.recv().await.expect("eof"), None);
    }
}
