//! A switched connection (a WebSocket after its 101): bytes both ways, each side's end passed
//! on as a half-close, until both ends are done or nothing moves for `timeout_tunnel`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

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

/// Runs the tunnel between `client` and `srv`, starting with the bytes each side sent ahead
/// (already read with the heads). Ends with an error on a failed side or `TimedOut` when idle.
pub async fn run<C: ClientStream>(
    client: &mut Io<C>,
    srv: &mut Io<TcpStream>,
    idle: Duration,
) -> io::Result<()> {
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
    let both = async {
        tokio::try_join!(
            pipe(client_read, srv_write, &activity),
            pipe(srv_read, client_write, &activity),
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

/// Copies one direction until its end, which it passes on as a half-close.
async fn pipe<R, W>(mut from: R, mut to: W, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
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
