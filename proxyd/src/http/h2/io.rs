//! An HTTP/2 stream's bodies as byte streams: the request body read as HTTP/1.1 framing for
//! the server, the response body written as DATA frames within the client's flow control.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one write asks the client's flow control for: larger writes go in parts.
const MAX_RESERVE: usize = 64 * 1024;

/// How the server gets the request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// As sent: the request says its length.
    Plain,
    /// In chunks, for a body of unknown length (HTTP/2 does not require a length).
    Chunked,
}

/// The request body of a stream, read as the bytes the server's HTTP/1.1 framing expects.
/// Each DATA frame's bytes are given back to the client's window as soon as they are read, so
/// the client sends no more than one window ahead of the server.
pub struct RecvBody {
    recv: RecvStream,
    framing: Framing,
    /// Bytes ready to be read, in order.
    pending: VecDeque<Bytes>,
    ended: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream, framing: Framing) -> Self {
        Self {
            recv,
            framing,
            pending: VecDeque::new(),
            ended: false,
        }
    }

    fn queue(&mut self, data: Bytes) {
        match self.framing {
            Framing::Plain => self.pending.push_back(data),
            Framing::Chunked => {
                self.pending
                    .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                self.pending.push_back(data);
                self.pending.push_back(Bytes::from_static(b"\r\n"));
            }
        }
    }
}

impl AsyncRead for RecvBody {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(front) = this.pending.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    this.pending.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window is given back whatever happens next: a failed release only
                    // means the stream is gone, which the next read reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    // An empty DATA frame carries nothing; as a chunk it would end the body.
                    if !data.is_empty() {
                        this.queue(data);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => {
                    this.ended = true;
                    if this.framing == Framing::Chunked {
                        this.pending.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
            }
        }
    }
}

/// The response body of a stream: each write waits for flow-control capacity and sends that
/// much as DATA, so a slow client holds back the server instead of filling memory.
pub struct SendBody {
    send: SendStream<Bytes>,
}

impl SendBody {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Self { send }
    }

    /// Ends the stream after the last write.
    pub fn finish(mut self) -> Result<(), h2::Error> {
        self.send.send_data(Bytes::new(), true)
    }

    /// Gives up on the stream: the client sees it reset, never a truncated body as complete.
    pub fn abort(mut self) {
        self.send.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

impl AsyncWrite for SendBody {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.get_mut().send;
        loop {
            let capacity = send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io::Error::other)?;
                return Poll::Ready(Ok(n));
            }
            send.reserve_capacity(buf.len().min(MAX_RESERVE));
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    /// DATA frames leave with the connection's next write, which the connection's task drives.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
