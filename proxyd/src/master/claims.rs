//! Releasing this master's fdkeeper claims of the generations that no longer accept, so that
//! fdkeeper closes the listeners only they used.

use std::time::Duration;

use tokio::time::Instant;

use super::{Event, Master};
use crate::control::claim_owner;

/// A claim release fdkeeper did not answer (down, restarting) is tried again after this.
const RELEASE_RETRY: Duration = Duration::from_secs(1);
/// Bound on one claim release round trip.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Master {
    /// The release to send now, with the generations it lets go of; `None` when there is
    /// nothing to release (or it is not the time).
    fn claims_to_release(&self) -> Option<(Vec<u64>, fdkeeper::ClaimRelease)> {
        if self.stopping || !self.notified_ready || self.releasing {
            return None;
        }
        let keep: Vec<u64> = self
            .generations
            .iter()
            .filter(|g| g.accepts())
            .map(|g| g.number)
            .collect();
        let gone: Vec<u64> = self
            .unreleased
            .iter()
            .copied()
            .filter(|n| !keep.contains(n))
            .collect();
        if gone.is_empty() && self.released_others {
            return None;
        }
        let claims = fdkeeper::ClaimRelease {
            owner: claim_owner(&self.config_path),
            instance: self.instance.clone(),
            below: self.next_generation,
            keep,
        };
        Some((gone, claims))
    }

    /// Tells fdkeeper which of this master's listener claims still matter, whenever a
    /// generation stopped accepting for good (drained, abandoned, failed to start): fdkeeper
    /// then closes the listeners that only such generations used.
    ///
    /// A listener is released when no Starting or Serving generation has it in its config,
    /// not when the last draining generation exits: a draining worker stops accepting at once
    /// and closes its copies, so from then on nobody would ever accept what lands in that
    /// accept queue, and clients would hang until the drain ends. Released at drain start,
    /// new connections are refused at once. What is in the queue at that moment is reset by
    /// the close (the draining generation can no longer accept it); what the draining worker
    /// accepted is its own and is served to the end. A generation that re-adds the address
    /// later binds it again; one that already holds a claim keeps the very socket: claims
    /// are per generation, and a release only names generations below the next number, so
    /// it never drops the claim of a generation started after it was computed.
    ///
    /// Nothing is released while stopping: listeners outlive a proxyd restart in fdkeeper.
    /// The next master, once its first generation serves (and so claims what it uses),
    /// releases every claim of earlier masters.
    pub(super) fn release_claims(&mut self) {
        if self.release_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.release_retry_at = None;
        let Some((gone, claims)) = self.claims_to_release() else {
            return;
        };
        self.releasing = true;
        let socket = self.current.global.fdkeeper_socket.clone();
        let events = self.ev_tx.clone();
        tokio::spawn(async move {
            let call = async {
                let mut client = fdkeeper::Client::connect(&socket)
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .release_claims(&[], claims)
                    .await
                    .map_err(|e| e.to_string())
            };
            let result = tokio::time::timeout(RELEASE_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err("fdkeeper did not answer in time".to_owned()));
            let _ = events.send(Event::Released { gone, result });
        });
    }

    /// fdkeeper answered (or not) a release of the claims of generations `gone`.
    pub(super) fn on_released(
        &mut self,
        gone: Vec<u64>,
        result: Result<fdkeeper::Released, String>,
    ) {
        self.releasing = false;
        match result {
            Ok(r) => {
                if !r.closed.is_empty() || !r.closing.is_empty() {
                    tracing::info!(
                        generations = ?gone,
                        closed = ?r.closed,
                        closing = ?r.closing,
                        "listeners no serving generation uses released in fdkeeper"
                    );
                } else {
                    tracing::debug!(generations = ?gone, "fdkeeper claims released");
                }
                for n in gone {
                    self.unreleased.remove(&n);
                }
                self.released_others = true;
            }
            Err(e) => {
                // Nothing is lost by waiting: the claims stay, and so do the listeners.
                tracing::warn!(generations = ?gone, error = %e, retry_in_ms = RELEASE_RETRY.as_millis() as u64, "cannot release listeners in fdkeeper");
                self.release_retry_at = Some(Instant::now() + RELEASE_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::super::generation::{Crashes, Generation, Phase, Process};
    use super::super::server_state::tests::config_with_state_file;
    use super::super::spawn::Binary;
    use super::*;
    use crate::config::Config;

    fn generation(config: &Arc<Config>, number: u64, phase: Phase) -> Generation {
        Generation {
            number,
            config: config.clone(),
            phase,
            process: Process::Respawn { at: Instant::now() },
            binary: Binary::new(PathBuf::from("/nonexistent")),
            crashes: Crashes::default(),
            inodes: Vec::new(),
        }
    }

    fn draining() -> Phase {
        Phase::Draining {
            since: std::time::SystemTime::now(),
            kill_at: None,
            stopped: false,
        }
    }

    fn starting() -> Phase {
        Phase::Starting {
            ready_deadline: None,
        }
    }

    #[tokio::test]
    async fn claims_of_generations_that_no_longer_accept_are_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with_state_file(&dir.path().join("state"));
        let shared = Arc::new(config_with_state_file(&dir.path().join("state")));
        let (mut m, _h) = Master::new(config, PathBuf::from("/nonexistent"));
        m.generations = vec![
            generation(&shared, 1, draining()),
            generation(&shared, 2, Phase::Serving),
            generation(&shared, 3, Phase::Abandoned),
            generation(&shared, 4, starting()),
        ];
        m.unreleased = (1..=4).collect();
        m.next_generation = 5;
        assert!(
            m.claims_to_release().is_none(),
            "nothing before a generation of this master served: its claims may not exist yet"
        );
        m.notified_ready = true;
        let (gone, claims) = m.claims_to_release().expect("a release");
        assert_eq!(gone, [1, 3], "draining and abandoned generations let go");
        assert_eq!(claims.keep, [2, 4], "serving and starting ones keep theirs");
        assert_eq!(claims.below, 5, "later generations are never named");
        assert_eq!(claims.instance, m.instance);
        assert_eq!(claims.owner, format!("proxyd {}", m.config_path.display()));
        // Once done, only a change sends another; the first one also released earlier masters.
        m.unreleased.retain(|n| !gone.contains(n));
        m.released_others = true;
        assert!(m.claims_to_release().is_none());
        m.generations[1].phase = draining();
        assert_eq!(m.claims_to_release().map(|(g, _)| g), Some(vec![2]));
        m.releasing = true;
        assert!(m.claims_to_release().is_none(), "one release at a time");
        m.releasing = false;
        m.stopping = true;
        assert!(
            m.claims_to_release().is_none(),
            "a stopping master keeps every listener for the next one"
        );
    }
}
