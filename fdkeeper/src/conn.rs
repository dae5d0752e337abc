//! One SOCK_SEQPACKET connection driven by tokio: datagrams in and out, with fds beside them.
//!
//! Public so that tests and tools can speak the raw protocol (malformed requests included).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sys;
pub use crate::sys::Received;

/// Largest response a client reads: a Listing of max_listeners entries stays well below.
pub const MAX_DATAGRAM: usize = 256 * 1024;

/// Largest request fdkeeper reads. A request holds at most 64 specs of a few dozen bytes;
/// a small buffer keeps each borrower connection cheap.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug)]
pub struct Conn {
    fd: AsyncFd<OwnedFd>,
}

impl Conn {
    /// Wraps a seqpacket (or datagram) socket, making it non-blocking; needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        Ok(Self {
            fd: sys::register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connects to a seqpacket listener, waiting briefly while its backlog is full.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let mut wait = Duration::from_millis(1);
        for _ in 0..10 {
            let fd = sys::seqpacket_socket()?;
            match sys::connect_unix(fd.as_fd(), path) {
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
            "the lending socket's backlog stayed full",
        ))
    }

    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| sys::send_with_fds(inner.get_ref().as_fd(), data, fds)) {
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

    /// Receives one datagram. End of file reads as `len == 0` with no fds.
    pub async fn recv(&self, buf: &mut [u8], max_fds: usize) -> io::Result<sys::Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| sys::recv_with_fds(inner.get_ref().as_fd(), buf, max_fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsFd for Conn {
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
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        Ok(Self {
            fd: sys::register(fd, Interest::READABLE)?,
        })
    }

    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| sys::accept(inner.get_ref().as_fd())) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}
