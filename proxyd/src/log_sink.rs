//! Where access log lines go without holding up the event loop: appended to a bounded buffer,
//! written in batches by a thread of its own to stderr or a syslog socket, dropped and counted
//! when the destination cannot keep up.
//!
//! A thread, not a task: with one runtime thread a task would still make the write(2) on the
//! event loop. A byte buffer behind a mutex, not a channel of lines: the request path then
//! costs a copy and an uncontended lock, and it wakes the writer only when the buffer stops
//! being empty or passes half full, so a busy worker makes a few wake-ups and writes a second
//! instead of one of each per request. When the buffer is full, lines are dropped rather than
//! waited for: a stuck journal must not stop the traffic it logs.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::access_log::{AccessLog, LogTarget, Syslog, SyslogFormat};

/// Bytes of lines waiting for the writer: a second of a busy worker's log.
pub const BUFFER_BYTES: usize = 1 << 20;
/// How long the writer gathers lines after the first before it writes them.
const GATHER: Duration = Duration::from_millis(50);
/// Least time between two warnings about dropped lines.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where a batch of lines goes.
pub trait Destination: Send + 'static {
    /// Writes every line of `batch` (each ends in `\n`).
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()>;
}

/// The access log sink of a worker; the writer thread starts with the first line.
pub struct LogSink {
    target: LogTarget,
    inner: Arc<Inner>,
    /// Says when the writer thread has ended (none: the log is off).
    writer: OnceLock<Option<Mutex<std::sync::mpsc::Receiver<()>>>>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pending: Mutex<Vec<u8>>,
    /// The writer waits here for lines, and `flush` for the writer.
    wake: Condvar,
    written: Condvar,
    capacity: usize,
    closing: AtomicBool,
    dropped: AtomicU64,
    /// Batches taken by the writer and written (or failed): `flush` waits for it to move.
    batches: AtomicU64,
}

impl LogSink {
    pub fn new(config: &AccessLog) -> Self {
        Self::with_capacity(config.to.clone(), BUFFER_BYTES)
    }

    fn with_capacity(target: LogTarget, capacity: usize) -> Self {
        Self {
            target,
            inner: Arc::new(Inner {
                pending: Mutex::new(Vec::new()),
                wake: Condvar::new(),
                written: Condvar::new(),
                capacity,
                closing: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
                batches: AtomicU64::new(0),
            }),
            writer: OnceLock::new(),
        }
    }

    /// A sink writing to `dest` (tests: a destination that can be made to stall).
    pub fn to(dest: impl Destination, capacity: usize) -> Self {
        let sink = Self::with_capacity(LogTarget::Stderr, capacity);
        let _ = sink
            .writer
            .set(Some(Mutex::new(spawn(sink.inner.clone(), Box::new(dest)))));
        sink
    }

    pub fn is_on(&self) -> bool {
        self.target != LogTarget::Off
    }

    /// Lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Queues one line (ending in `\n`), or drops it if the buffer is full. Never blocks on
    /// the destination.
    pub fn push(&self, line: &[u8]) {
        if !self.is_on() {
            return;
        }
        self.writer.get_or_init(|| self.start());
        let inner = &*self.inner;
        let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        if before + line.len() > inner.capacity {
            drop(pending);
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line);
        let half = inner.capacity / 2;
        let wake = before == 0 || (before < half && pending.len() >= half);
        drop(pending);
        if wake {
            inner.wake.notify_one();
        }
    }

    fn start(&self) -> Option<Mutex<std::sync::mpsc::Receiver<()>>> {
        let dest: Box<dyn Destination> = match &self.target {
            LogTarget::Off => return None,
            LogTarget::Stderr => Box::new(Stderr),
            LogTarget::Syslog(s) => Box::new(SyslogSocket::new(s.clone())),
        };
        Some(Mutex::new(spawn(self.inner.clone(), dest)))
    }

    /// Writes what is buffered and stops the writer, waiting at most `within` (a stuck
    /// destination must not hold the worker's exit).
    pub fn close(&self, within: Duration) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.wake.notify_one();
        if let Some(Some(done)) = self.writer.get() {
            let _ = done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(within);
        }
    }

    /// Waits until what was pushed before the call is written, at most `within`.
    pub fn flush(&self, within: Duration) {
        let inner = &*self.inner;
        let deadline = Instant::now() + within;
        let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() && self.writer.get().is_none() {
            return;
        }
        // Two batches: the one in the writer's hands now, and ours.
        let target = inner.batches.load(Ordering::Relaxed) + 2;
        inner.wake.notify_one();
        while inner.batches.load(Ordering::Relaxed) < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            inner.wake.notify_one();
            pending = inner
                .written
                .wait_timeout(pending, left.min(GATHER))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn spawn(inner: Arc<Inner>, dest: Box<dyn Destination>) -> std::sync::mpsc::Receiver<()> {
    let (done_tx, done) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            writer(&inner, dest);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the access log writer: lines are dropped");
    }
    done
}

/// The writer thread: waits for lines, lets a batch gather, writes it, warns about drops.
fn writer(inner: &Inner, mut dest: Box<dyn Destination>) {
    let mut batch = Vec::new();
    let mut warned_at: Option<Instant> = None;
    let mut warned_dropped = 0;
    loop {
        {
            let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.is_empty() && !inner.closing.load(Ordering::Relaxed) {
                // Counts as a batch, so that a flush of nothing returns.
                inner.batches.fetch_add(1, Ordering::Relaxed);
                inner.written.notify_all();
                pending = inner.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            if !inner.closing.load(Ordering::Relaxed) && pending.len() < inner.capacity / 2 {
                pending = inner
                    .wake
                    .wait_timeout(pending, GATHER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut *pending, &mut batch);
        }
        if !batch.is_empty()
            && let Err(e) = dest.write_batch(&batch)
        {
            // Said once per failing batch at most; stderr itself may be what failed.
            tracing::debug!(error = %e, "access log write failed");
        }
        batch.clear();
        inner.batches.fetch_add(1, Ordering::Relaxed);
        inner.written.notify_all();
        let dropped = inner.dropped.load(Ordering::Relaxed);
        if dropped > warned_dropped && warned_at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                dropped = dropped - warned_dropped,
                total = dropped,
                "access log lines dropped: the log destination is slower than the traffic"
            );
            warned_dropped = dropped;
            warned_at = Some(Instant::now());
        }
        if inner.closing.load(Ordering::Relaxed)
            && inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            return;
        }
    }
}

struct Stderr;

impl Destination for Stderr {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        io::stderr().lock().write_all(batch)
    }
}

/// A syslog daemon's datagram socket: one message per line, reconnected when the daemon
/// restarts.
struct SyslogSocket {
    config: Syslog,
    socket: Option<UnixDatagram>,
    /// `HOST proxyd PID` (RFC 5424) or `proxyd[PID]` (RFC 3164), made once.
    tag: String,
    message: Vec<u8>,
}

impl SyslogSocket {
    fn new(config: Syslog) -> Self {
        let pid = std::process::id();
        let tag = match config.format {
            SyslogFormat::Rfc3164 => format!("proxyd[{pid}]: "),
            SyslogFormat::Rfc5424 => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .ok()
                    .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
                    .unwrap_or_else(|| "-".into());
                format!("{host} proxyd {pid} - - ")
            }
        };
        Self {
            config,
            socket: None,
            tag,
            message: Vec::with_capacity(1024),
        }
    }

    fn connect(path: &PathBuf) -> io::Result<UnixDatagram> {
        let s = UnixDatagram::unbound()?;
        s.connect(path)?;
        Ok(s)
    }
}

impl Destination for SyslogSocket {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        // Severity info (6).
        let pri = u32::from(self.config.facility) * 8 + 6;
        let now = SystemTime::now();
        for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            self.message.clear();
            let _ = write!(self.message, "<{pri}>");
            if self.config.format == SyslogFormat::Rfc5424 {
                // Version 1 and the time in UTC; RFC 3164 messages carry none: the receiver
                // stamps them, which spares a local time zone here.
                let _ = write!(self.message, "1 {} ", Rfc3339(now));
            }
            self.message.extend_from_slice(self.tag.as_bytes());
            self.message.extend_from_slice(line);
            let sent = match &self.socket {
                Some(s) => s.send(&self.message),
                None => Err(io::ErrorKind::NotConnected.into()),
            };
            if sent.is_err() {
                // The daemon may have restarted: one new connection, then give up on the line.
                self.socket = None;
                let s = Self::connect(&self.config.socket)?;
                s.send(&self.message)?;
                self.socket = Some(s);
            }
        }
        Ok(())
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A wall-clock time broken down in UTC, to the millisecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub milli: u32,
}

impl Utc {
    pub fn of(t: SystemTime) -> Utc {
        let ms = common::time::unix_ms(t);
        let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
        let (year, month, day) = civil(days);
        let s = (in_day / 1000) as u32;
        Utc {
            year,
            month,
            day,
            hour: s / 3600,
            minute: s / 60 % 60,
            second: s % 60,
            milli: (in_day % 1000) as u32,
        }
    }
}

/// RFC 3339 in UTC with milliseconds: `2009-02-06T12:14:14.655Z`.
pub struct Rfc3339(pub SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = Utc::of(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            u.year, u.month, u.day, u.hour, u.minute, u.second, u.milli
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A destination that hands each batch over, and stalls until let go.
    struct Stalling {
        got: mpsc::Sender<Vec<u8>>,
        go: Gate,
    }

    impl Destination for Stalling {
        fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
            let (lock, cv) = &*self.go;
            let mut go = lock.lock().expect("lock");
            while !*go {
                go = cv.wait(go).expect("wait");
            }
            let _ = self.got.send(batch.to_vec());
            Ok(())
        }
    }

    /// Set to true to let a [`Stalling`] destination write.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    fn stalling(capacity: usize) -> (LogSink, mpsc::Receiver<Vec<u8>>, Gate) {
        let go = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let sink = LogSink::to(
            Stalling {
                got: tx,
                go: go.clone(),
            },
            capacity,
        );
        (sink, rx, go)
    }

    #[test]
    fn a_stuck_destination_drops_lines_instead_of_blocking() {
        let (sink, rx, go) = stalling(1000);
        let line = [b'x'; 99];
        let mut line = line.to_vec();
        line.push(b'\n');
        // 10 000 lines while the destination writes nothing: every push returns, at most
        // two buffers' worth are kept (the one the writer holds, and the pending one).
        for _ in 0..10_000 {
            sink.push(&line);
        }
        let dropped = sink.dropped();
        assert!(dropped >= 10_000 - 20, "dropped {dropped}");
        assert!(dropped < 10_000, "the buffer kept nothing");
        // Let go: what was kept is written whole, line by line.
        {
            let (lock, cv) = &*go;
            *lock.lock().expect("lock") = true;
            cv.notify_all();
        }
        sink.close(Duration::from_secs(10));
        let written: Vec<u8> = rx.try_iter().flatten().collect();
        assert_eq!(written.len() as u64, (10_000 - dropped) * 100);
        assert!(written.chunks(100).all(|l| l == line.as_slice()));
    }

    #[test]
    fn flush_writes_what_was_pushed_in_order() {
        let (sink, rx, go) = stalling(1 << 20);
        *go.0.lock().expect("lock") = true;
        for i in 0..1000 {
            sink.push(format!("line {i}\n").as_bytes());
        }
        sink.flush(Duration::from_secs(10));
        let written: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(written).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(
            lines
                .iter()
                .enumerate()
                .all(|(i, l)| *l == format!("line {i}"))
        );
        assert_eq!(sink.dropped(), 0);
        sink.close(Duration::from_secs(10));
    }

    #[test]
    fn syslog_messages_carry_their_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).expect("bind");
        for (format, prefix) in [
            (
                SyslogFormat::Rfc3164,
                format!("<134>proxyd[{}]: ", std::process::id()),
            ),
            (SyslogFormat::Rfc5424, "<134>1 ".to_owned()),
        ] {
            let mut dest = SyslogSocket::new(Syslog {
                socket: path.clone(),
                format,
                facility: 16,
            });
            dest.write_batch(b"one\ntwo\n").expect("sent");
            let mut buf = [0u8; 512];
            for want in ["one", "two"] {
                let n = server.recv(&mut buf).expect("recv");
                let msg = std::str::from_utf8(&buf[..n]).expect("utf-8");
                assert!(msg.starts_with(&prefix), "{msg}");
                assert!(
                    msg.ends_with(&format!(" {want}")) || msg.ends_with(&format!(": {want}")),
                    "{msg}"
                );
                if format == SyslogFormat::Rfc5424 {
                    let f: Vec<&str> = msg.splitn(8, ' ').collect();
                    assert_eq!(f.len(), 8, "{msg}");
                    assert!(f[1].ends_with('Z') && f[1].len() == 24, "{msg}");
                    assert_eq!(f[3], "proxyd");
                    assert_eq!(f[4], std::process::id().to_string());
                    assert_eq!((f[5], f[6], f[7]), ("-", "-", want));
                }
            }
        }
    }

    #[test]
    fn utc_dates() {
        let at = |ms: u64| Utc::of(std::time::UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(
            at(1_233_922_454_655),
            Utc {
                year: 2009,
                month: 2,
                day: 6,
                hour: 12,
                minute: 14,
                second: 14,
                milli: 655
            }
        );
        assert_eq!(at(951_782_400_000).day, 29, "2000-02-29 exists");
        assert_eq!((at(951_868_800_000).month, at(951_868_800_000).day), (3, 1));
        assert_eq!(
            Rfc3339(std::time::UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
