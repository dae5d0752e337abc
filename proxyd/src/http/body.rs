//! Streaming a message body from one side to the other by its framing (Content-Length,
//! chunked, until close) without ever holding a whole body.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use std::io::Write as _;

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::fields;
use super::head::Framing;
use crate::net::Io;
use crate::net::spares::{self, Spares};

/// Longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;
/// Flush what was gathered once it is this large.
const FLUSH_AT: usize = 64 * 1024;
/// A body with at least this much left once the buffered bytes are passed on goes through
/// [`Bulk`] buffers.
const BULK_AT: u64 = 64 * 1024;
/// The most one read and write of a large body moves: at best 4 of each per MiB instead of 64.
const BULK: usize = 256 * 1024;
/// The least: reads shrink to this while the receiving side is slow, so that a slow peer
/// keeps no more waiting in the proxy than the connection's own buffer would.
const BULK_MIN: usize = 16 * 1024;
/// Full-size bulk buffers a thread keeps for the next reads; more are allocated when more
/// bodies have bytes in flight at once, and freed after.
const SPARE_BULK: usize = 4;

/// Why a body could not be forwarded: the side matters for the status and for blame.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the body: {0}")]
    Read(io::Error),
    #[error("writing the body: {0}")]
    Write(io::Error),
    #[error("bad chunked framing: {0}")]
    Framing(&'static str),
}

/// Writes everything in `out` to `dst`, and empties it.
pub async fn flush<W: AsyncWrite + Unpin>(
    dst: &mut W,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(), BodyError> {
    write(dst, out, timeout).await?;
    out.clear();
    Ok(())
}

/// Writes all of `bytes` to `dst` and flushes it within `timeout`: a TLS stream may keep the
/// last records of a write until it is flushed, and the peer waits for them.
pub async fn write<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), BodyError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let written = async {
        dst.write_all(bytes).await?;
        dst.flush().await
    };
    match tokio::time::timeout(timeout, written).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(BodyError::Write(e)),
        Err(_) => Err(BodyError::Write(io::ErrorKind::TimedOut.into())),
    }
}

/// Forwards one body from `src` to `dst`, framed as it came (chunks re-framed). `out` holds
/// bytes to send first (the head), so that a head and a small body leave in one write.
/// Returns with everything flushed.
pub async fn forward<R, W>(
    src: &mut Io<R>,
    dst: &mut W,
    framing: Framing,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    forward_counted(src, dst, framing, out, timeout)
        .await
        .map(drop)
}

/// As [`forward`], and says how many bytes reached `dst` (with what `out` held first), for
/// the access log.
pub async fn forward_counted<R, W>(
    src: &mut Io<R>,
    dst: &mut W,
    framing: Framing,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> Result<u64, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    run(src, dst, framing, out, timeout, Output::Framed).await
}

/// Forwards only the content of one body from `src` to `dst`: chunk sizes and trailers are
/// checked and dropped, for a protocol that frames data itself (HTTP/2).
pub async fn forward_payload<R, W>(
    src: &mut Io<R>,
    dst: &mut W,
    framing: Framing,
    timeout: Duration,
) -> Result<u64, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    run(src, dst, framing, &mut out, timeout, Output::Payload).await
}

/// What of a body reaches the other side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The body with its HTTP/1.1 framing.
    Framed,
    /// Its content only.
    Payload,
}

async fn run<R, W>(
    src: &mut Io<R>,
    dst: &mut W,
    framing: Framing,
    out: &mut Vec<u8>,
    timeout: Duration,
    output: Output,
) -> Result<u64, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut f = Forwarder {
        src,
        dst,
        out,
        timeout,
        output,
        sent: 0,
    };
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => f.exact(n).await?,
        Framing::Chunked => f.chunked().await?,
        Framing::UntilClose => f.until_close().await?,
    }
    f.flush().await?;
    Ok(f.sent)
}

struct Forwarder<'a, R, W> {
    src: &'a mut Io<R>,
    dst: &'a mut W,
    out: &'a mut Vec<u8>,
    timeout: Duration,
    output: Output,
    /// Bytes written to `dst`.
    sent: u64,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Forwarder<'_, R, W> {
    async fn flush(&mut self) -> Result<(), BodyError> {
        let n = self.out.len() as u64;
        flush(self.dst, self.out, self.timeout).await?;
        self.sent += n;
        Ok(())
    }

    /// Flushes what is gathered (so the peer is never kept waiting) and reads more.
    async fn more(&mut self) -> Result<usize, BodyError> {
        self.flush().await?;
        self.src.fill(self.timeout).await.map_err(BodyError::Read)
    }

    async fn more_or_eof(&mut self) -> Result<(), BodyError> {
        match self.more().await? {
            0 => Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into())),
            _ => Ok(()),
        }
    }

    fn take(&mut self, n: usize) {
        self.out.extend_from_slice(&self.src.buf[..n]);
        self.src.buf.advance(n);
    }

    /// Passes on framing bytes (a chunk's CRLF, a trailer line) when the output keeps them.
    fn take_framing(&mut self, n: usize) {
        match self.output {
            Output::Framed => self.take(n),
            Output::Payload => self.src.buf.advance(n),
        }
    }

    async fn exact(&mut self, mut left: u64) -> Result<(), BodyError> {
        loop {
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.src.buf.len());
            self.take(n);
            left -= n as u64;
            if left == 0 {
                return Ok(());
            }
            if left >= BULK_AT {
                return self.bulk(Some(left)).await;
            }
            if self.out.len() >= FLUSH_AT {
                self.flush().await?;
            }
            self.more_or_eof().await?;
        }
    }

    async fn until_close(&mut self) -> Result<(), BodyError> {
        let n = self.src.buf.len();
        self.take(n);
        self.bulk(None).await
    }

    /// Passes on the rest of a body, `left` bytes or everything until the end of the stream,
    /// with `src`'s buffer empty: straight from `src`'s stream to `dst` through [`Bulk`]
    /// buffers, in reads and writes of up to [`BULK`] bytes and without a copy into `out`.
    /// Never reads past the body, so that what follows stays in the stream for the next message.
    async fn bulk(&mut self, mut left: Option<u64>) -> Result<(), BodyError> {
        debug_assert!(self.src.buf.is_empty());
        self.flush().await?;
        let mut size = BULK;
        loop {
            let want = left.map_or(size, |l| usize::try_from(l).unwrap_or(usize::MAX).min(size));
            let (bulk, n) = match tokio::time::timeout(
                self.timeout,
                read_bulk(&mut self.src.stream, want, size == BULK),
            )
            .await
            {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => return Err(BodyError::Read(e)),
                Err(_) => return Err(BodyError::Read(io::ErrorKind::TimedOut.into())),
            };
            if n == 0 {
                return match left {
                    None => Ok(()),
                    Some(_) => Err(BodyError::Read(io::ErrorKind::UnexpectedEof.into())),
                };
            }
            let waited = write_waits(self.dst, &bulk.0[..n], self.timeout).await?;
            drop(bulk);
            self.sent += n as u64;
            // A peer that keeps the write waiting gets smaller reads, one that takes them at
            // once larger ones again.
            size = if waited {
                (size / 2).max(BULK_MIN)
            } else {
                (size * 2).min(BULK)
            };
            if let Some(l) = &mut left {
                *l -= n as u64;
                if *l == 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Length of the next CRLF-terminated line in the buffer, reading as needed.
    async fn line(&mut self) -> Result<usize, BodyError> {
        let mut searched = 0;
        loop {
            if let Some(p) = self.src.buf[searched..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let end = searched + p;
                if self.src.buf[..end]
                    .iter()
                    .any(|&b| b == b'\r' || b == b'\n')
                {
                    return Err(BodyError::Framing("bare cr or lf in a chunk line"));
                }
                return Ok(end + 2);
            }
            if self.src.buf.len() > MAX_LINE {
                return Err(BodyError::Framing("chunk line too long"));
            }
            searched = self.src.buf.len().saturating_sub(1);
            self.more_or_eof().await?;
        }
    }

    /// Re-frames a chunked body: chunk sizes are written anew without their extensions (which
    /// servers parse in different ways), trailer fields are checked and passed on.
    async fn chunked(&mut self) -> Result<(), BodyError> {
        loop {
            let len = self.line().await?;
            let size = chunk_size(&self.src.buf[..len - 2])?;
            self.src.buf.advance(len);
            if self.output == Output::Framed {
                write!(self.out, "{size:x}\r\n").map_err(|_| BodyError::Framing("chunk size"))?;
            }
            if size == 0 {
                break;
            }
            self.exact(size).await?;
            while self.src.buf.len() < 2 {
                self.more_or_eof().await?;
            }
            if &self.src.buf[..2] != b"\r\n" {
                return Err(BodyError::Framing("chunk data not followed by crlf"));
            }
            self.take_framing(2);
        }
        // Trailer fields, then the empty line that ends the message.
        let mut trailers = 0;
        loop {
            let len = self.line().await?;
            trailers += len;
            if trailers > MAX_TRAILERS {
                return Err(BodyError::Framing("trailers too large"));
            }
            if len == 2 {
                self.take_framing(len);
                return Ok(());
            }
            if !valid_trailer(&self.src.buf[..len - 2]) {
                return Err(BodyError::Framing("bad trailer field"));
            }
            self.take_framing(len);
        }
    }
}

/// Reads up to `want` bytes into a [`Bulk`] buffer (a `full` size one from the spares, else
/// one of `want` bytes) taken only once the stream has some: a body waiting for its sender
/// holds none.
async fn read_bulk<R: AsyncRead + Unpin>(
    src: &mut R,
    want: usize,
    full: bool,
) -> io::Result<(Bulk, usize)> {
    std::future::poll_fn(|cx| {
        let mut bulk = Bulk::take(want, full);
        let mut room = ReadBuf::new(&mut bulk.0[..want]);
        match Pin::new(&mut *src).poll_read(cx, &mut room) {
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                Poll::Ready(Ok((bulk, n)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Nothing was read: the buffer goes back to the spares until there is.
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Writes all of `bytes` as [`write`] does, and says whether `dst` made it wait.
async fn write_waits<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<bool, BodyError> {
    let mut written = pin!(write(dst, bytes, timeout));
    match std::future::poll_fn(|cx| Poll::Ready(written.as_mut().poll(cx))).await {
        Poll::Ready(r) => r.map(|()| false),
        Poll::Pending => written.await.map(|()| true),
    }
}

thread_local! {
    static SPARE: Spares<Box<[u8]>> = const { Spares::new(SPARE_BULK) };
}

/// A buffer holding bytes of a large body between their read and their write: a connection
/// holds one only then, never while it waits to read or is idle. Full-size ones come from and
/// go back to the thread's spares.
struct Bulk(Box<[u8]>);

impl Bulk {
    fn take(want: usize, full: bool) -> Self {
        if !full {
            // A slow peer's small reads: no full-size buffer held while it takes its time.
            return Self(vec![0; want].into_boxed_slice());
        }
        Self(spares::take(&SPARE).unwrap_or_else(|| vec![0; BULK].into_boxed_slice()))
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        if self.0.len() != BULK {
            return;
        }
        spares::give(&SPARE, std::mem::take(&mut self.0));
    }
}

/// The size of a chunk from its size line (without CRLF): hex digits, then optional
/// `;extensions` (RFC 9112 §7.1.1), which are checked and dropped.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::Framing("chunk size missing"));
    }
    let hex = &line[..digits];
    let significant = hex.iter().skip_while(|b| **b == b'0').count();
    if significant > 15 {
        return Err(BodyError::Framing("chunk size too large"));
    }
    if !valid_chunk_extensions(&line[digits..]) {
        return Err(BodyError::Framing("junk after chunk size"));
    }
    Ok(hex.iter().fold(0u64, |n, d| {
        // Every byte is a hex digit, and at most 15 of them are significant.
        n * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
    }))
}

/// `*( BWS ";" BWS name [ BWS "=" BWS value ] )` with a token name and a token or quoted
/// value: anything looser could be read as the end of the size by one server and not another.
fn valid_chunk_extensions(mut rest: &[u8]) -> bool {
    let bws = |r: &[u8]| -> usize { r.iter().take_while(|b| **b == b' ' || **b == b'\t').count() };
    let token = |r: &[u8]| -> usize { r.iter().take_while(|b| fields::is_tchar(**b)).count() };
    loop {
        rest = &rest[bws(rest)..];
        let Some(r) = rest.strip_prefix(b";") else {
            return rest.is_empty();
        };
        rest = &r[bws(r)..];
        let n = token(rest);
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        let after = &rest[bws(rest)..];
        let Some(r) = after.strip_prefix(b"=") else {
            continue;
        };
        rest = &r[bws(r)..];
        if let Some(r) = rest.strip_prefix(b"\"") {
            let Some(end) = quoted_end(r) else {
                return false;
            };
            rest = &r[end..];
        } else {
            let n = token(rest);
            if n == 0 {
                return false;
            }
            rest = &rest[n..];
        }
    }
}

/// Where a quoted string that began just before `r` ends (past its closing quote).
fn quoted_end(r: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < r.len() {
        match r[i] {
            b'"' => return Some(i + 1),
            b'\\'
                if i + 1 < r.len()
                    && (r[i + 1] == b'\t' || r[i + 1] >= 0x20)
                    && r[i + 1] != 0x7f =>
            {
                i += 2;
            }
            b'\t' | 0x20..=0x7e | 0x80..=0xff if r[i] != b'\\' => i += 1,
            _ => return None,
        }
    }
    None
}

/// A trailer line (without CRLF) is a field line: a token, a colon, and a value of visible
/// characters, spaces and tabs.
fn valid_trailer(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    colon > 0
        && line[..colon].iter().all(|b| fields::is_tchar(*b))
        && line[colon + 1..]
            .iter()
            .all(|b| *b == b'\t' || *b >= 0x20 && *b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn run(input: &[u8], framing: Framing) -> (Result<(), BodyError>, Vec<u8>, Vec<u8>) {
        // A duplex pipe fed in small pieces exercises every partial-read path.
        let (r, dst, _) = pipe(input.to_vec(), framing, 7, 5).await;
        (r.map(|_| ()), dst, Vec::new())
    }

    #[tokio::test]
    async fn length_body_stops_at_its_end() {
        let (r, dst, _) = run(b"hello worldNEXT", Framing::Length(11)).await;
        r.expect("ok");
        assert_eq!(dst, b"HEAD|hello world");
    }

    #[tokio::test]
    async fn truncated_length_body_is_an_error() {
        let (r, _, _) = run(b"hello", Framing::Length(11)).await;
        assert!(matches!(r, Err(BodyError::Read(_))), "{r:?}");
    }

    #[tokio::test]
    async fn chunked_body_is_reframed_without_extensions() {
        let body = b"5\r\nhello\r\n006;ext=1 ; q=\"a;b\"\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next");
        let (r, dst, _) = run(&input, Framing::Chunked).await;
        r.expect("ok");
        assert_eq!(
            String::from_utf8_lossy(&dst[5..]),
            "5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_payload_is_the_content_without_chunks_or_trailers() {
        let body = b"5\r\nhello\r\n006;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        // Room for all of it: the writer must not wait on bytes the body does not take.
        let (mut tx, rx) = tokio::io::duplex(1024);
        for piece in body.chunks(5) {
            tx.write_all(piece).await.expect("write");
        }
        drop(tx);
        let mut src = Io::new(rx);
        let mut dst = Vec::new();
        forward_payload(&mut src, &mut dst, Framing::Chunked, Duration::from_secs(5))
            .await
            .expect("ok");
        assert_eq!(dst, b"hello world");
        // What follows the body stays for the next message.
        while src.fill(Duration::from_secs(5)).await.expect("read") > 0 {}
        assert_eq!(&src.buf[..], b"GET /next");
    }

    #[tokio::test]
    async fn bad_chunking_is_refused() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"b\r\nhello\r\n0\r\n\r\n",
            b"5 ;a b\r\nhello\r\n0\r\n\r\n",
            b"5;\xc2\xa0a\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
            b"5\r\nhello\r\n0\r\n: empty name\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T\x00: 1\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: \x01\r\n\r\n",
            b"1000000000000000\r\n",
        ] {
            let (r, _, _) = run(bad, Framing::Chunked).await;
            assert!(r.is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn until_close_reads_everything() {
        let (r, dst, _) = run(b"all of it", Framing::UntilClose).await;
        r.expect("ok");
        assert_eq!(dst, b"HEAD|all of it");
    }

    /// Forwards `input` as a body of `framing` read in pieces of up to 40000 bytes, and returns
    /// the result, what was written, and what was left unread of the stream.
    async fn run_large(
        input: Vec<u8>,
        framing: Framing,
    ) -> (Result<u64, BodyError>, Vec<u8>, Vec<u8>) {
        pipe(input, framing, 40_000, 40_000).await
    }

    /// Forwards `input`, written in `piece`s into a duplex pipe of `capacity` bytes, as a body
    /// of `framing`; returns the result, what was written, and what was left unread.
    async fn pipe(
        input: Vec<u8>,
        framing: Framing,
        capacity: usize,
        piece: usize,
    ) -> (Result<u64, BodyError>, Vec<u8>, Vec<u8>) {
        let (mut tx, rx) = tokio::io::duplex(capacity);
        let writer = tokio::spawn(async move {
            for piece in input.chunks(piece) {
                if tx.write_all(piece).await.is_err() {
                    break;
                }
            }
        });
        let mut src = Io::new(rx);
        let mut dst = Vec::new();
        let mut out = b"HEAD|".to_vec();
        let r = forward_counted(
            &mut src,
            &mut dst,
            framing,
            &mut out,
            Duration::from_secs(5),
        )
        .await;
        let mut rest = src.buf.to_vec();
        if r.is_ok() {
            src.stream.read_to_end(&mut rest).await.expect("rest");
        }
        drop(src);
        writer.await.expect("writer");
        (r, dst, rest)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_large_body_passes_whole_and_leaves_what_follows() {
        let body = pattern(1_000_003);
        let mut input = body.clone();
        input.extend_from_slice(b"NEXT");
        let (r, dst, rest) = run_large(input, Framing::Length(body.len() as u64)).await;
        assert_eq!(r.expect("ok"), 5 + body.len() as u64);
        assert_eq!(&dst[..5], b"HEAD|");
        assert!(dst[5..] == body[..], "body changed on the way");
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn a_large_body_cut_short_is_a_read_error() {
        let (r, dst, _) = run_large(pattern(300_000), Framing::Length(300_001)).await;
        assert!(matches!(r, Err(BodyError::Read(_))), "{r:?}");
        assert_eq!(dst.len(), 5 + 300_000);
    }

    #[tokio::test]
    async fn large_chunks_are_reframed_and_checked() {
        let big = pattern(200_000);
        let mut input = format!("{:x}\r\n", big.len()).into_bytes();
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\r\n3\r\nabc\r\n0\r\n\r\nNEXT");
        let (r, dst, rest) = run_large(input.clone(), Framing::Chunked).await;
        r.expect("ok");
        assert!(
            dst[5..] == input[..input.len() - 4],
            "reframed body differs"
        );
        assert_eq!(rest, b"NEXT");
        // The CRLF after a large chunk's data is still checked.
        let bad = input.len() - 4 - b"\r\n3\r\nabc\r\n0\r\n\r\n".len();
        input[bad] = b'X';
        let (r, _, _) = run_large(input, Framing::Chunked).await;
        assert!(matches!(r, Err(BodyError::Framing(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_large_body_until_close_passes_whole() {
        let body = pattern(700_000);
        let (r, dst, _) = run_large(body.clone(), Framing::UntilClose).await;
        assert_eq!(r.expect("ok"), 5 + body.len() as u64);
        assert!(dst[5..] == body[..], "body changed on the way");
    }

    /// A writer that, like a TLS stream, keeps what it was given until it is flushed.
    #[derive(Default)]
    struct HoldsUntilFlushed {
        held: Vec<u8>,
        sent: Vec<u8>,
    }

    impl tokio::io::AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.extend_from_slice(&held);
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_forwarded_body_is_flushed_when_forward_returns() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tx.write_all(b"hello").await.expect("write");
        let mut src = Io::new(rx);
        let mut dst = HoldsUntilFlushed::default();
        let mut out = b"head;".to_vec();
        forward(
            &mut src,
            &mut dst,
            Framing::Length(5),
            &mut out,
            Duration::from_secs(1),
        )
        .await
        .expect("forward");
        assert_eq!(dst.sent, b"head;hello");
        assert!(dst.held.is_empty());
    }
}
