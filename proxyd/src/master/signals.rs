//! The master's signals: reload on SIGUSR2 and SIGHUP, graceful stop on SIGTERM and SIGINT.

use tokio_util::sync::CancellationToken;

use super::Handle;

/// Relays SIGUSR2 and SIGHUP (reload; SIGHUP is what systemd's `Type=notify-reload` sends by
/// default) and SIGTERM/SIGINT (graceful stop) to the master.
pub fn forward_signals(handle: Handle, shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: reload");
                    handle.reload_detached();
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reload");
                    handle.reload_detached();
                }
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); shutdown.cancel(); }
            }
        }
    });
    Ok(())
}
