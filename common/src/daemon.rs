//! Process plumbing shared by the daemons: arguments, exit codes, runtime, tracing, sd_notify, unix sockets.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Exit codes of every binary, sysexits-style (DESIGN.md): 0 ok, 64 bad configuration or
/// usage (EX_USAGE), 65 damaged data (EX_DATAERR: stickd's data_dir), 1 anything else.
pub const EXIT_OK: i32 = 0;
pub const EXIT_CONFIG: i32 = 64;
pub const EXIT_DATA: i32 = 65;
pub const EXIT_FAILURE: i32 = 1;

/// Parses the command line; on `--help` or `--version` (exit 0) or a usage error (exit 64)
/// clap's text is printed and the exit code comes back instead.
pub fn parse_args<A: clap::Parser>() -> Result<A, i32> {
    A::try_parse().map_err(|e| {
        let code = if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK };
        // Nothing better to do if stderr is gone.
        drop(e.print());
        code
    })
}

/// The process exit status for one of the codes above (anything out of range is 1).
pub fn exit_status(code: i32) -> std::process::ExitCode {
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// A tokio runtime with every driver: `threads == 1` runs everything on the calling thread,
/// more gives that many worker threads, 0 one per CPU.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder.enable_all().build()
}

/// Logs to stderr (journald picks it up under systemd); `RUST_LOG` overrides `default`. Colours
/// only on a terminal: in a file or the journal escape codes are noise that every reader must
/// strip.
pub fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Under systemd the journal adds its own timestamps.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false);
    let result = if under_journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) is harmless.
    drop(result);
}

/// sd_notify messages. Every call is a no-op outside systemd (no `NOTIFY_SOCKET`).
pub mod notify {
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// RELOADING=1 with MONOTONIC_USEC, which systemd 253+ requires beside it.
    pub fn reloading(status: &str) {
        let now = NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0));
        send(&[NotifyState::Reloading, now, NotifyState::Status(status)]);
    }

    pub fn stopping(status: &str) {
        send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }
}

/// Binds a unix stream socket at `path` with `mode`, replacing a stale socket file
/// left by a dead process (but never a regular file).
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    remove_stale_socket(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Removes `path` if it is a socket nobody listens on; refuses to remove anything else.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}
