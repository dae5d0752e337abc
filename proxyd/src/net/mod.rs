//! The connections beneath the protocols: what a client connection is carried on (plain TCP
//! or [`tls`]), a stream with its unread bytes, and the pooled connections to the servers.
//!
//! Below `http` and `tcp` and above nothing but `config` and `sys`, so that `shared` can hold
//! each server's pool without importing a protocol.

pub mod pool;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a client connection is carried on: a TCP stream set up by `serve`, or one wrapped by
/// TLS. The protocols (`http`, `tcp`) are generic over it, so each kind is its own instance of
/// their code: no dynamic dispatch per read or write.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin {}

impl<T: AsyncRead + AsyncWrite + Unpin> ClientStream for T {}

/// What the protocols know of a client connection besides its bytes: who, and where it came in.
#[derive(Clone, Copy, Debug)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// The bind it was accepted on.
    pub at: crate::config::BindRef,
    /// It came in over TLS (the scheme of its requests is https).
    pub tls: bool,
}

/// A stream with the bytes read from it but not consumed yet.
#[derive(Debug)]
pub struct Io<S> {
    pub stream: S,
    pub buf: BytesMut,
}

impl<S: AsyncRead + Unpin> Io<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Reads more into the buffer; 0 at end of stream; `TimedOut` after `timeout`.
    pub async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// A stream whose first bytes were read already (to tell its protocol) and are read again
/// before the rest.
#[derive(Debug)]
pub struct Rewind<S> {
    read: bytes::Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(read: bytes::Bytes, inner: S) -> Self {
        Self { read, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
