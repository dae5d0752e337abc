//! The few syscalls proxyd makes that std, tokio and nix do not wrap: the worker's inherited
//! control fd and its parent-death signal, and the idle-connection peek. One of the two modules
//! of proxyd with `unsafe` (the other is the stick cache's allocator, `stick::alloc`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

/// The fd number a worker finds its control socket on.
pub const CONTROL_FD: RawFd = 3;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Arranges for the spawned worker to find `control` on [`CONTROL_FD`] and to get SIGTERM
/// when the master dies (PR_SET_PDEATHSIG), refusing to start if the master is already gone.
///
/// The parent-death signal fires when the *thread* that forked exits, so the master spawns
/// workers from its main thread only (it runs a current-thread runtime).
pub fn prepare_worker(cmd: &mut tokio::process::Command, control: RawFd) {
    let master = nix::unistd::getpid().as_raw();
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
    let flags = FdFlag::from_bits_retain(fcntl(&owned, FcntlArg::F_GETFD)?);
    fcntl(&owned, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
    let fl = OFlag::from_bits_retain(fcntl(&owned, FcntlArg::F_GETFL)?);
    fcntl(&owned, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(owned)
}

/// Whether an idle pooled connection is unusable: the server closed or reset it, or sent
/// bytes nobody asked for. A real `recv(MSG_PEEK)`, because the reactor's cached readiness
/// may not have seen a FIN that arrived since its last poll.
pub fn idle_connection_broken(fd: BorrowedFd<'_>) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    // MSG_PEEK leaves the socket's data in place.
    match recv(
        fd.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(Errno::EAGAIN | Errno::EINTR) => false,
        Ok(_) | Err(_) => true,
    }
}
