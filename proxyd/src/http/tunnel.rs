//! A switched connection (a WebSocket after its 101): bytes both ways, each side's end passed
//! on as a half-close, until both ends are done or nothing moves for `timeout_tunnel`. A
//! WebSocket cut by a drain's deadline gets a close frame (1001, going away) each way, put
//! between two frames of each direction.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::net::{ClientStream, Io};

/// Bytes read at once in each direction.
const CHUNK: usize = 16 * 1024;

/// When bytes last moved, either way, in milliseconds since the tunnel opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// How a tunnel ends besides its sides closing.
pub struct Ending<'a> {
    /// Nothing moved either way for this long.
    pub idle: Duration,
    /// Fired at a drain's deadline.
    pub closing: &'a CancellationToken,
    /// The tunnel carries WebSocket frames, so it can say goodbye with a close frame.
    pub websocket: bool,
}

/// Runs the tunnel between `client` and `srv`, starting with the bytes each side sent ahead
/// (already read with the heads). Ends with an error on a failed side or `TimedOut` when idle.
pub async fn run<C: ClientStream>(
    client: &mut Io<C>,
    srv: &mut Io<TcpStream>,
    ending: Ending<'_>,
) -> io::Result<()> {
    let idle = ending.idle;
    if !srv.buf.is_empty() {
        client.stream.write_all(&srv.buf).await?;
        client.stream.flush().await?;
        srv.buf.clear();
    }
    if !client.buf.is_empty() {
        srv.stream.write_all(&client.buf).await?;
        client.buf.clear();
    }
    let activity = Activity {
        opened: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (client_read, client_write) = tokio::io::split(&mut client.stream);
    let (srv_read, srv_write) = srv.stream.split();
    // Frames a client sends are masked, a server's are not (RFC 6455 §5.1).
    let (to_server, to_client) = match ending.websocket {
        true => (
            Some(Goodbye::new(ending.closing, true)),
            Some(Goodbye::new(ending.closing, false)),
        ),
        false => (None, None),
    };
    let both = async {
        tokio::try_join!(
            pipe(client_read, srv_write, &activity, to_server),
            pipe(srv_read, client_write, &activity, to_client),
        )
    };
    let quiet = async {
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = both => r.map(|_| ()),
        () = quiet => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// A WebSocket direction's close frame, sent when `closing` fires.
struct Goodbye<'a> {
    closing: &'a CancellationToken,
    frame: Vec<u8>,
    frames: Frames,
}

impl<'a> Goodbye<'a> {
    fn new(closing: &'a CancellationToken, masked: bool) -> Self {
        // Status 1001: going away.
        let status = [0x03, 0xe9];
        let frame = if masked {
            // Any key reads back right; servers do not check how it was chosen.
            let key = (common::time::now_ms() as u32).to_be_bytes();
            vec![
                0x88,
                0x82,
                key[0],
                key[1],
                key[2],
                key[3],
                status[0] ^ key[0],
                status[1] ^ key[1],
            ]
        } else {
            vec![0x88, 0x02, status[0], status[1]]
        };
        Self {
            closing,
            frame,
            frames: Frames::default(),
        }
    }
}

/// Where one direction's bytes stand in WebSocket framing (RFC 6455 §5.2), so that a close
/// frame goes in between two frames only.
#[derive(Default)]
struct Frames {
    /// The current frame's header bytes seen so far (at most 2 + 8 + 4).
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(len) = self.payload_len() {
                self.payload_left = len;
                self.have = 0;
            }
        }
    }

    /// The payload length, once the whole header is in.
    fn payload_len(&self) -> Option<u64> {
        if self.have < 2 {
            return None;
        }
        let masked = self.head[1] & 0x80 != 0;
        let len7 = self.head[1] & 0x7f;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if self.have < 2 + ext + if masked { 4 } else { 0 } {
            return None;
        }
        let h = &self.head;
        Some(match ext {
            0 => u64::from(len7),
            2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            _ => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        })
    }
}

/// Copies one direction until its end, which it passes on as a half-close, or until a drain's
/// deadline, which a WebSocket direction answers with its close frame.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    activity: &Activity,
    mut goodbye: Option<Goodbye<'_>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let closing = async {
            match &goodbye {
                Some(g) => g.closing.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            () = closing => {
                if let Some(g) = &goodbye
                    && g.frames.at_boundary()
                {
                    let _ = to.write_all(&g.frame).await;
                    let _ = to.flush().await;
                }
                let _ = to.shutdown().await;
                return Ok(());
            }
        };
        if let Some(g) = &mut goodbye {
            g.frames.advance(&buf[..n]);
        }
        if n == 0 {
            // The other side may still talk: only our writing to it ends.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        // Over TLS the last records of a write wait in the stream until a flush.
        to.flush().await?;
        activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries_are_found_across_any_split() {
        // A masked text frame of 5, an unmasked one of 300 (16-bit length), a ping of 0.
        let mut stream = vec![0x81, 0x85, 1, 2, 3, 4];
        stream.extend_from_slice(b"hello");
        stream.extend_from_slice(&[0x82, 126, 0x01, 0x2c]);
        stream.extend_from_slice(&[7u8; 300]);
        stream.extend_from_slice(&[0x89, 0x00]);
        let ends = [11, 11 + 304, stream.len()];
        for split in 1..=stream.len() {
            let mut f = Frames::default();
            let mut at = 0;
            for piece in stream.chunks(split) {
                f.advance(piece);
                at += piece.len();
                assert_eq!(f.at_boundary(), ends.contains(&at), "split {split} at {at}");
            }
        }
    }
}
