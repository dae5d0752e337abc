//! The master's signals: reload on SIGUSR2 and SIGHUP, graceful stop on SIGTERM and SIGINT.

use common::signals::{Signal, Signals};
use tokio_util::sync::CancellationToken;

use super::Handle;

/// Relays SIGUSR2 and SIGHUP (reload; SIGHUP is what systemd's `Type=notify-reload` sends by
/// default) and SIGTERM/SIGINT (graceful stop) to the master.
pub fn forward_signals(handle: Handle, shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new(&[
        Signal::User2,
        Signal::Hangup,
        Signal::Terminate,
        Signal::Interrupt,
    ])?;
    tokio::spawn(async move {
        loop {
            let s = signals.recv().await;
            if s.is_stop() {
                tracing::info!("{s}: stopping");
                shutdown.cancel();
            } else {
                tracing::info!("{s}: reload");
                handle.reload_detached();
            }
        }
    });
    Ok(())
}
