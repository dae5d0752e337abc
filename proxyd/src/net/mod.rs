//! The connections beneath the protocols: what a client connection is carried on (plain TCP
//! or [`tls`]), a stream with its unread bytes, and the pooled connections to the servers.
//!
//! Below `http` and `tcp` and above nothing but `config` and `sys`, so that `shared` can hold
//! each server's pool without importing a protocol.

pub mod pool;
pub mod spares;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room a read asks for: HAProxy's default buffer size, which holds most request heads whole.
const READ_SIZE: usize = 16 * 1024;
/// Free space below which a buffer grows by `READ_SIZE` before a read.
const READ_MIN: usize = 4096;

/// What a client connection is carried on: a TCP stream set up by `serve`, or one wrapped by
/// TLS. The protocols (`http`, `tcp`) are generic over it, so each kind is its own instance of
/// their code: no dynamic dispatch per read or write.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    /// Ready once a read may return something (bytes, the end, an error), without a buffer
    /// to read into: a connection waiting for its next request then holds none.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ClientStream for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// A stream on the heap: a large one (TLS) moves as a pointer, and futures that pass it on
/// hold a pointer each rather than a copy of it.
impl<S: ClientStream + ?Sized> ClientStream for Box<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

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
    /// A stream with no buffer yet: the first read takes one.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Reads more into the buffer; 0 at end of stream; `TimedOut` after `timeout`.
    pub async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        self.make_room();
        match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    fn make_room(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = spares::buffer();
        }
        if self.buf.capacity() - self.buf.len() < READ_MIN {
            self.buf.reserve(READ_SIZE);
        }
    }
}

impl<S: ClientStream> Io<S> {
    /// [`Io::fill`] for a client that may stay silent for long (between requests): with no
    /// unread byte in hand the buffer goes back to the thread's spares, and a new one is taken only once the
    /// stream is readable, so that an idle connection holds no buffer (as HAProxy's hold
    /// theirs only while data is in flight).
    pub async fn fill_lazily(&mut self, timeout: Duration) -> io::Result<usize> {
        if self.buf.is_empty() {
            spares::give_buffer(&mut self.buf);
        }
        let read = std::future::poll_fn(|cx| self.poll_fill_lazily(cx));
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    fn poll_fill_lazily(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.is_empty() {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
        }
        self.make_room();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf);
        if read.is_pending() && self.buf.is_empty() {
            // Woken for less than a byte (part of a TLS record): nothing to keep it for.
            spares::give_buffer(&mut self.buf);
        }
        read
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

    /// The stream beneath once its first bytes are read again; itself while some are left.
    pub fn into_inner(self) -> Result<S, Self> {
        if self.read.is_empty() {
            Ok(self.inner)
        } else {
            Err(self)
        }
    }
}

impl<S: ClientStream> ClientStream for Rewind<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
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
            if self.read.is_empty() {
                // An empty `Bytes` split from a buffer still holds all of it.
                self.read = bytes::Bytes::new();
            }
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::stick::CountingAlloc;

    const T: Duration = Duration::from_secs(5);

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        (server, client)
    }

    /// Polls `f` once; whether it is still pending.
    async fn pending<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut f = f;
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_client_holds_no_read_buffer() {
        let (server, mut client) = pair().await;
        let mut io = Io::new(server);
        let before = CountingAlloc::thread_bytes();
        // What the connection holds: the thread's bytes, less its spares.
        let held = || CountingAlloc::thread_bytes() - spares::spare_bytes() - before;
        {
            let mut wait = std::pin::pin!(io.fill_lazily(T));
            assert!(pending(wait.as_mut()).await);
            assert!(held() < 1024, "{} bytes held while waiting", held());
            client
                .write_all(b"GET / HTTP/1.1\r\n")
                .await
                .expect("write");
            assert_eq!(wait.await.expect("read"), 16);
        }
        assert_eq!(&io.buf[..], b"GET / HTTP/1.1\r\n");
        assert!(io.buf.capacity() >= READ_SIZE);
        // Consumed: the next wait gives the buffer back to the thread's spares, and the read
        // after it takes a spare rather than allocating.
        io.buf.clear();
        {
            let mut wait = std::pin::pin!(io.fill_lazily(T));
            assert!(pending(wait.as_mut()).await);
            assert!(held() < 1024, "{} bytes held while waiting again", held());
            assert!(
                spares::spare_bytes() >= READ_SIZE as i64,
                "buffer not given back"
            );
            let total = CountingAlloc::thread_bytes();
            client.write_all(b"Host: a\r\n").await.expect("write");
            assert_eq!(wait.await.expect("read"), 9);
            assert_eq!(CountingAlloc::thread_bytes(), total, "a new buffer");
        }
        drop(client);
        while io.fill_lazily(T).await.expect("read") > 0 {}
        assert_eq!(&io.buf[..], b"Host: a\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lazy_read_times_out_and_sees_the_end() {
        let (server, client) = pair().await;
        let mut io = Io::new(server);
        let e = io
            .fill_lazily(Duration::from_millis(20))
            .await
            .expect_err("nothing came");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(client);
        assert_eq!(io.fill_lazily(T).await.expect("end"), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rewind_is_ready_with_its_bytes_and_lets_them_go() {
        let (server, mut client) = pair().await;
        let mut io = Io::new(Rewind::new(bytes::Bytes::from_static(b"PRI"), server));
        assert_eq!(io.fill_lazily(T).await.expect("rewound"), 3);
        assert!(io.stream.read.is_empty());
        client.write_all(b" *").await.expect("write");
        assert_eq!(io.fill_lazily(T).await.expect("read"), 2);
        assert_eq!(&io.buf[..], b"PRI *");
    }
}
