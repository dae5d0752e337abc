//! A TLS server connection on rustls's unbuffered API: the ciphertext and plaintext in flight
//! live in buffers of ours, given back whenever they are empty and the connection waits for its
//! client, so that an idle TLS connection holds rustls's keys and state only (its buffered API
//! keeps a 4 KiB read buffer in every connection for as long as it lives).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::net::spares;

/// Room a read of ciphertext asks for: a whole record of the largest size and its header.
const READ_SIZE: usize = 16 * 1024 + 512;
/// Free room below which the ciphertext buffer grows by `READ_SIZE` before a read.
const READ_MIN: usize = 4096;
/// Most ciphertext in hand not yet processed: rustls takes handshake messages of up to 64 KiB,
/// which may span records; anything longer is refused rather than buffered.
const MAX_INCOMING: usize = 0xffff + READ_SIZE;
/// Most plaintext one write encrypts: one record's worth, so that what waits to be sent stays
/// about one buffer.
const MAX_WRITE: usize = 16 * 1024;
/// Room first offered to a handshake message or alert.
const ENCODE_ROOM: usize = 512;
/// What a record adds to its plaintext, at most (header, explicit nonce, tag, inner type).
const RECORD_OVERHEAD: usize = 64;

/// What rustls is to send at its next chance to send application data.
#[derive(Clone, Copy)]
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where [`TlsStream::process`] stopped.
enum Stop {
    /// The handshake needs more ciphertext.
    Handshaking,
    /// The handshake is over and what was in hand is processed; how much of `Out::Data` was
    /// encrypted.
    Traffic(usize),
    /// Both sides sent close_notify.
    Closed,
}

/// A TLS server stream over TCP.
pub struct TlsStream {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not processed yet: part of a record at most, between reads.
    incoming: BytesMut,
    /// Plaintext decrypted and not read yet.
    plain: BytesMut,
    /// Ciphertext to send, of which `sent` bytes are.
    outgoing: BytesMut,
    sent: usize,
    /// The client ended its side: close_notify, or the end of the stream (`clean`: the former).
    read_closed: Option<bool>,
    /// close_notify is queued.
    write_closed: bool,
    /// Every read and write fails once rustls did (its alert queued in `outgoing`).
    failed: Option<rustls::Error>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .field("incoming", &self.incoming.len())
            .field("plain", &self.plain.len())
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    pub fn new(io: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            io,
            conn: UnbufferedServerConnection::new(config)?,
            incoming: BytesMut::new(),
            plain: BytesMut::new(),
            outgoing: BytesMut::new(),
            sent: 0,
            read_closed: None,
            write_closed: false,
            failed: None,
        })
    }

    /// The state rustls shares between its connection kinds: ALPN, version, handshake kind.
    pub fn session(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Runs the handshake until it is over and its last flight is sent.
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.process(Out::Nothing) {
                Ok(Stop::Traffic(_)) => return self.poll_send(cx),
                Ok(Stop::Handshaking) => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Ok(Stop::Closed) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Err(e) => {
                    // The alert first, as far as the socket takes it at once.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// Runs rustls over the ciphertext in hand: its handshake messages and alerts are encoded
    /// into `outgoing`, application data decrypted into `plain`, and `out` encrypted once
    /// rustls may send application data.
    fn process(&mut self, out: Out<'_>) -> io::Result<Stop> {
        if let Some(e) = &self.failed {
            return Err(tls_error(e.clone()));
        }
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            let next: Result<Option<Stop>, rustls::Error> = match state {
                Err(e) => Err(e),
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut next = Ok(None);
                    while let Some(record) = r.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                if self.plain.capacity() == 0 {
                                    self.plain = spares::buffer();
                                }
                                self.plain.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                next = Err(e);
                                break;
                            }
                        }
                    }
                    next
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    write_out(&mut self.outgoing, ENCODE_ROOM, |buf| Ok(e.encode(buf)?))
                        .map(|()| None)
                }
                // Encoded into `outgoing`, which goes out in order before anything after it.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::Handshaking)),
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = Some(true);
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.read_closed = Some(true);
                    Ok(Some(Stop::Closed))
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => match out {
                    Out::Nothing => Ok(Some(Stop::Traffic(0))),
                    Out::Data(data) => {
                        let room = data.len() + RECORD_OVERHEAD * (data.len() / 16384 + 1);
                        write_out(&mut self.outgoing, room, |buf| Ok(w.encrypt(data, buf)?))
                            .map(|()| Some(Stop::Traffic(data.len())))
                    }
                    Out::CloseNotify => write_out(&mut self.outgoing, RECORD_OVERHEAD, |buf| {
                        Ok(w.queue_close_notify(buf)?)
                    })
                    .map(|()| Some(Stop::Traffic(0))),
                },
                // Early data is never accepted (none is configured), and no other state is
                // known.
                Ok(_) => Err(rustls::Error::General("unexpected tls state".into())),
            };
            self.incoming.advance(discard);
            match next {
                Ok(None) => {}
                Ok(Some(stop)) => return Ok(stop),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Keeps `e` for every later call and encodes the alerts rustls queued for it.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.failed = Some(e.clone());
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if write_out(&mut self.outgoing, ENCODE_ROOM, |buf| Ok(enc.encode(buf)?))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => break,
            }
        }
        tls_error(e)
    }

    /// Reads more ciphertext; 0 at the end of the stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tls message too large",
            )));
        }
        if self.incoming.capacity() == 0 {
            self.incoming = spares::buffer();
        }
        if self.incoming.capacity() - self.incoming.len() < READ_MIN {
            self.incoming.reserve(READ_SIZE);
        }
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.incoming);
        if read.is_pending() && self.incoming.is_empty() {
            // Nothing came: nothing to keep the buffer for while waiting.
            spares::give_buffer(&mut self.incoming);
        }
        read
    }

    /// Sends what ciphertext is pending.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Gives the buffers that hold nothing back to the thread's spares.
    fn release(&mut self) {
        if self.sent >= self.outgoing.len() {
            spares::give_buffer(&mut self.outgoing);
            self.sent = 0;
        }
        if self.plain.is_empty() {
            spares::give_buffer(&mut self.plain);
        }
        if self.incoming.is_empty() {
            spares::give_buffer(&mut self.incoming);
        }
    }
}

/// Why rustls wrote nothing into the room it was given.
enum Short {
    /// The room was too small: this much is needed.
    Needs(usize),
    Failed(String),
}

impl From<EncodeError> for Short {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(s) => Self::Needs(s.required_size),
            e => Self::Failed(e.to_string()),
        }
    }
}

impl From<EncryptError> for Short {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(s) => Self::Needs(s.required_size),
            e => Self::Failed(e.to_string()),
        }
    }
}

/// Lets rustls `write` (encode or encrypt) into the free end of `outgoing`: `room` bytes
/// first, then what it asks for.
fn write_out(
    outgoing: &mut BytesMut,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Short>,
) -> Result<(), rustls::Error> {
    if outgoing.capacity() == 0 {
        *outgoing = spares::buffer();
    }
    let start = outgoing.len();
    loop {
        outgoing.resize(start + room, 0);
        match write(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(Short::Needs(n)) if n > room => room = n,
            Err(Short::Needs(_)) => {
                outgoing.truncate(start);
                return Err(rustls::Error::General("tls record does not fit".into()));
            }
            Err(Short::Failed(e)) => {
                outgoing.truncate(start);
                return Err(rustls::Error::General(e));
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            match this.read_closed {
                Some(true) => return Poll::Ready(Ok(())),
                Some(false) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
                None => {}
            }
            if let Err(e) = this.process(Out::Nothing) {
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            if !this.plain.is_empty() || this.read_closed.is_some() {
                continue;
            }
            // What rustls owes the client unasked (a key update) goes now if the socket takes
            // it, else before the next write.
            if this.sent < this.outgoing.len()
                && let Poll::Ready(Err(e)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(e));
            }
            if ready!(this.poll_receive(cx))? == 0 {
                this.read_closed = Some(false);
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // One batch of ciphertext waits here at most: the last one goes out first.
        ready!(this.poll_send(cx))?;
        let data = &buf[..buf.len().min(MAX_WRITE)];
        let n = match this.process(Out::Data(data))? {
            Stop::Traffic(n) => n,
            Stop::Handshaking => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Stop::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        // Sent now as far as the socket takes it; the rest before the next write or at flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed && this.failed.is_none() {
            this.write_closed = true;
            if let Err(e) = this.process(Out::CloseNotify) {
                tracing::debug!(error = %e, "no close_notify");
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl crate::net::ClientStream for TlsStream {
    /// Between requests: the buffers that hold nothing are given back, and the socket is
    /// watched (what rustls has in hand is a part of a record at most).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.plain.is_empty() || self.read_closed.is_some() || self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.release();
        self.io.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::tls::{provider, testing};
    use crate::net::Io;

    const T: std::time::Duration = std::time::Duration::from_secs(5);

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let (cert, key) = testing::pem(&["a.test"]);
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("server config");
        (Arc::new(server), testing::any_certificate_client())
    }

    /// Polls `f` once; whether it is still pending.
    async fn pending<F: Future>(mut f: Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_between_requests_holds_no_buffer() {
        let (server, client) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut tls = Box::new(TlsStream::new(tcp, server).expect("connection"));
            tls.handshake().await.expect("handshake");
            let mut io = Io::new(tls);
            // A request of several records, then an answer larger than one.
            while io.buf.len() < 40_000 {
                assert!(io.fill_lazily(T).await.expect("read") > 0, "early end");
            }
            assert!(io.buf.iter().all(|b| *b == b'q'));
            io.buf.clear();
            io.stream.write_all(&[b'a'; 50_000]).await.expect("write");
            io.stream.flush().await.expect("flush");
            {
                let mut wait = std::pin::pin!(io.fill_lazily(T));
                assert!(pending(wait.as_mut()).await);
            }
            let s = &io.stream;
            assert_eq!(
                (
                    s.incoming.capacity(),
                    s.plain.capacity(),
                    s.outgoing.capacity()
                ),
                (0, 0, 0),
                "buffers held between requests"
            );
            assert_eq!(io.buf.capacity(), 0);
            // The client closes with close_notify: a clean end.
            assert_eq!(io.fill_lazily(T).await.expect("clean end"), 0);
            io.stream.shutdown().await.expect("shutdown");
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("a.test").expect("name");
        let mut c = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .expect("client handshake");
        c.write_all(&[b'q'; 40_000]).await.expect("request");
        let mut answer = vec![0u8; 50_000];
        c.read_exact(&mut answer).await.expect("answer");
        assert!(answer.iter().all(|b| *b == b'a'));
        c.shutdown().await.expect("close_notify");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .await
            .expect("server's close_notify");
        assert!(rest.is_empty());
        served.await.expect("server side");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_is_not_tls_fails_the_handshake() {
        let (server, _) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let served = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut tls = TlsStream::new(tcp, server).expect("connection");
            tls.handshake().await.expect_err("not tls")
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let e = served.await.expect("server side");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
