//! The signals the daemons act on, installed one way: stop on SIGTERM/SIGINT, reload on SIGUSR2/SIGHUP.

use std::future::poll_fn;
use std::io;
use std::task::Poll;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::daemon::notify;

/// A signal a daemon handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    Hangup,
    User2,
}

impl Signal {
    fn kind(self) -> SignalKind {
        match self {
            Signal::Terminate => SignalKind::terminate(),
            Signal::Interrupt => SignalKind::interrupt(),
            Signal::Hangup => SignalKind::hangup(),
            Signal::User2 => SignalKind::user_defined2(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
            Signal::User2 => "SIGUSR2",
        }
    }

    /// SIGTERM and SIGINT: the process is asked to stop.
    pub fn is_stop(self) -> bool {
        matches!(self, Signal::Terminate | Signal::Interrupt)
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Handlers for a set of signals, installed at once: from then on those signals no longer
/// take their default action (SIGTERM no longer kills) but wait for [`Signals::recv`].
#[derive(Debug)]
pub struct Signals {
    handlers: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers; needs a tokio runtime.
    pub fn new(signals: &[Signal]) -> io::Result<Self> {
        let handlers = signals
            .iter()
            .map(|&s| Ok((s, signal(s.kind())?)))
            .collect::<io::Result<_>>()?;
        Ok(Self { handlers })
    }

    /// The next signal received (cancel-safe: one not returned stays pending).
    pub async fn recv(&mut self) -> Signal {
        poll_fn(|cx| {
            for (s, handler) in &mut self.handlers {
                if handler.poll_recv(cx).is_ready() {
                    return Poll::Ready(*s);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Spawns the task that stops a daemon at its first SIGTERM or SIGINT: it logs the signal,
/// tells systemd (STOPPING=1) and cancels `shutdown`. The handlers are in place when this returns.
pub fn stop_on_signal(shutdown: CancellationToken) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut signals = Signals::new(&[Signal::Terminate, Signal::Interrupt])?;
    Ok(tokio::spawn(async move {
        let s = signals.recv().await;
        tracing::info!("{s}: stopping");
        notify::stopping("stopping");
        shutdown.cancel();
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_sent_to_the_process_is_received_as_its_kind() {
        let mut signals = Signals::new(&[Signal::Hangup, Signal::User2]).expect("install");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR2).expect("raise");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), signals.recv())
            .await
            .expect("received");
        assert_eq!(got, Signal::User2);
        assert_eq!(got.to_string(), "SIGUSR2");
        assert!(!got.is_stop() && Signal::Interrupt.is_stop());
    }
}
