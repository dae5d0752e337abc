//! Certificate rotation without a new generation: the master watches the files of every TLS
//! setting of the serving config, reads a changed set (or every set, when an operator asks)
//! with the checks config validation runs, refuses a broken one with its reason while the old
//! one keeps serving, and sends a good one, as the bytes it checked, to the workers that serve
//! that config.
//!
//! Watching is a poll of a few `stat`s a second ([`Fingerprint`]): no inotify, and it sees
//! renames, writes in place, symlink swaps and files added to a directory alike. A change is
//! read once the files have stood still for [`SETTLE`], so that a tool writing a certificate
//! and then its key is not refused halfway.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::time::unix_ms;
use proto::proxyd::v1 as api;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::Master;
use super::generation::Phase;
use crate::config::Config;
use crate::config::tls::{self, CertSource, Fingerprint, LoadedCert, Tls};
use crate::control::{self, pb};

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);
/// How long changed files must stay as they are before they are read.
const SETTLE: Duration = Duration::from_millis(250);
/// Files that keep changing are read anyway after this long.
const SETTLE_MAX: Duration = Duration::from_secs(5);
/// How long `ReloadCertificates` waits for the workers to put the new sets in service.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Why `ReloadCertificates` did not load every set.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CertificatesError {
    /// Each refused setting and why; the others were loaded and the refused ones keep serving
    /// their previous certificates.
    #[error("{0}")]
    Refused(String),
    #[error("the master is stopping")]
    Stopping,
}

pub(super) type CertificatesReply =
    oneshot::Sender<Result<api::ReloadCertificatesReply, CertificatesError>>;

/// Who asked for the files to be read.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    /// The poll saw them change.
    Changed,
    /// `ReloadCertificates`.
    Asked,
}

/// One TLS setting of the serving config.
#[derive(Debug)]
struct CertSet {
    name: String,
    sources: Vec<CertSource>,
    /// What the workers serve (or were sent).
    served: Vec<Arc<LoadedCert>>,
    /// The files as they were just before the last read (or refusal).
    read: Fingerprint,
    /// A change not read yet: the files as last seen, and since when they differ from `read`.
    changing: Option<(Fingerprint, Instant)>,
    last: Option<api::CertificateRotation>,
    loaded: u64,
    refused: u64,
}

impl CertSet {
    fn new(tls: &Tls) -> CertSet {
        CertSet {
            name: tls.name.clone(),
            sources: tls.sources.clone(),
            served: tls.certs.clone(),
            read: tls.fingerprint.clone(),
            changing: None,
            last: None,
            loaded: 0,
            refused: 0,
        }
    }

    /// Whether to read the files now, from what they look like at `now`.
    fn due(&mut self, now: Instant) -> bool {
        let seen = Fingerprint::of(&self.sources);
        match self.changing.take() {
            None if seen == self.read => false,
            None => {
                self.changing = Some((seen, now));
                false
            }
            Some((before, since)) => {
                if seen == before || now.duration_since(since) >= SETTLE_MAX {
                    true
                } else {
                    self.changing = Some((seen, since));
                    false
                }
            }
        }
    }

    fn status(&self) -> api::TlsCertificates {
        api::TlsCertificates {
            name: self.name.clone(),
            certificates: self.served.iter().map(|c| certificate(c)).collect(),
            last_rotation: self.last.clone(),
            rotations_loaded: self.loaded,
            rotations_refused: self.refused,
        }
    }
}

fn certificate(c: &LoadedCert) -> api::Certificate {
    api::Certificate {
        path: c.path.display().to_string(),
        names: c.names.clone(),
        serial: c.serial.clone(),
        not_before_unix: c.not_before,
        not_after_unix: c.not_after,
        key_type: format!("{:?}", c.algorithm),
    }
}

/// Whether two sets are the same files with the same bytes.
fn same(a: &[Arc<LoadedCert>], b: &[Arc<LoadedCert>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.files == y.files)
}

/// The certificates of the serving config, by TLS setting.
#[derive(Debug)]
pub(super) struct Certificates {
    /// In `Config::tls`'s order.
    sets: Vec<CertSet>,
    /// The number of the last set sent to workers.
    rotation: u64,
    next_poll: Instant,
}

impl Certificates {
    pub fn new(config: &Config) -> Certificates {
        Certificates {
            sets: config.tls.iter().map(CertSet::new).collect(),
            rotation: 0,
            next_poll: Instant::now() + POLL,
        }
    }

    /// Follows a new serving config, whose certificates its generation loaded from the files
    /// as they were when the master validated it; a setting of the same name keeps its
    /// counters and its last outcome.
    pub fn follow(&mut self, config: &Config) {
        let mut old = std::mem::take(&mut self.sets);
        self.sets = config
            .tls
            .iter()
            .map(|t| {
                let mut set = CertSet::new(t);
                if let Some(before) = old.iter_mut().find(|o| o.name == set.name) {
                    set.last = before.last.take();
                    set.loaded = before.loaded;
                    set.refused = before.refused;
                }
                set
            })
            .collect();
    }

    /// What each TLS setting of the serving config is to serve now (rotated since it was
    /// loaded, maybe).
    pub fn served(&self) -> Vec<Vec<Arc<LoadedCert>>> {
        self.sets.iter().map(|s| s.served.clone()).collect()
    }

    pub fn next_timer(&self) -> Option<Instant> {
        (!self.sets.is_empty()).then_some(self.next_poll)
    }

    pub fn status(&self) -> Vec<api::TlsCertificates> {
        self.sets.iter().map(CertSet::status).collect()
    }
}

impl Master {
    /// Looks at the certificate files if it is time to, and reads the sets that changed.
    pub(super) fn poll_certificates(&mut self, now: Instant) {
        if self.certs.sets.is_empty() || self.certs.next_poll > now {
            return;
        }
        for i in 0..self.certs.sets.len() {
            if self.certs.sets[i].due(now) {
                self.read_certificates(i, Trigger::Changed);
            }
        }
        let settling = self.certs.sets.iter().any(|s| s.changing.is_some());
        self.certs.next_poll = now + if settling { SETTLE } else { POLL };
    }

    /// `ReloadCertificates`: reads every set now, and answers once the workers have the ones
    /// that changed (or after [`APPLY_WAIT`]).
    pub(super) fn reload_certificates(&mut self, reply: CertificatesReply) {
        if self.stopping {
            let _ = reply.send(Err(CertificatesError::Stopping));
            return;
        }
        let mut refused = Vec::new();
        for i in 0..self.certs.sets.len() {
            let outcome = self.read_certificates(i, Trigger::Asked);
            if outcome.outcome == api::RotationOutcome::RotationRefused as i32 {
                refused.push(format!(
                    "tls '{}': {}",
                    self.certs.sets[i].name, outcome.message
                ));
            }
        }
        let result = if refused.is_empty() {
            Ok(api::ReloadCertificatesReply {
                tls: self.certs.status(),
                generation: self.serving().map_or(0, |g| g.number),
            })
        } else {
            Err(CertificatesError::Refused(format!(
                "{}; the previous certificates keep serving",
                refused.join("; ")
            )))
        };
        let rotation = self.certs.rotation;
        let applied: Vec<watch::Receiver<u64>> = self
            .certificate_workers()
            .map(|w| w.certificates.subscribe())
            .collect();
        tokio::spawn(async move {
            let wait = all_answered(applied, rotation);
            let _ = tokio::time::timeout(APPLY_WAIT, wait).await;
            let _ = reply.send(result);
        });
    }

    /// The workers serving the current config: the ones a rotated set goes to. A generation
    /// still starting on it gets the set too (it reads it once ready), in case its worker read
    /// the files before they changed.
    fn certificate_workers(&self) -> impl Iterator<Item = &super::spawn::Worker> {
        self.generations
            .iter()
            .filter(|g| {
                Arc::ptr_eq(&g.config, &self.current)
                    && matches!(g.phase, Phase::Starting { .. } | Phase::Serving)
            })
            .filter_map(|g| g.worker())
    }

    /// Reads set `i` again; sends it to the workers if it is good and new.
    fn read_certificates(&mut self, i: usize, trigger: Trigger) -> api::CertificateRotation {
        let now = common::time::now_ms().div_euclid(1000);
        let set = &mut self.certs.sets[i];
        let (fingerprint, result) = tls::reload(&set.sources, &tls::provider(), now);
        set.read = fingerprint;
        set.changing = None;
        let why = match trigger {
            Trigger::Changed => "files changed",
            Trigger::Asked => "asked",
        };
        let sent = result.map_err(|e| e.to_string()).and_then(|certs| {
            if same(&certs, &set.served) {
                return Ok(None);
            }
            let rotation = self.certs.rotation + 1;
            let parts = control::certificate_parts(
                u32::try_from(i).unwrap_or(u32::MAX),
                &set.name,
                rotation,
                &certs,
            )
            .map_err(|e| e.to_string())?;
            Ok(Some((certs, rotation, parts)))
        });
        let (outcome, message) = match sent {
            Err(e) => {
                set.refused += 1;
                tracing::error!(tls = %set.name, reason = why, error = %e, "certificates refused, the previous ones keep serving");
                (api::RotationOutcome::RotationRefused, e)
            }
            Ok(None) => {
                tracing::debug!(tls = %set.name, reason = why, "certificates unchanged");
                (
                    api::RotationOutcome::RotationUnchanged,
                    "the files hold the certificates already served".to_owned(),
                )
            }
            Ok(Some((certs, rotation, parts))) => {
                set.loaded += 1;
                set.served = certs;
                self.certs.rotation = rotation;
                let summary: Vec<String> = set
                    .served
                    .iter()
                    .map(|c| {
                        format!(
                            "{} (serial {}, until {})",
                            c.names.first().map_or("no name", String::as_str),
                            c.serial,
                            tls::date(c.not_after)
                        )
                    })
                    .collect();
                let message = format!(
                    "loaded {} certificates: {}",
                    set.served.len(),
                    summary.join(", ")
                );
                tracing::info!(tls = %set.name, reason = why, rotation, "{message}");
                // What `proxyd check` warns of, the log says on a rotation.
                for c in &set.served {
                    if c.not_after - now < tls::EXPIRY_WARNING_SECS {
                        tracing::warn!(tls = %set.name, path = %c.path.display(), "the certificate expires on {}", tls::date(c.not_after));
                    }
                    if c.not_before > now {
                        tracing::warn!(tls = %set.name, path = %c.path.display(), "the certificate is not valid before {}", tls::date(c.not_before));
                    }
                }
                for w in self.certificate_workers() {
                    for part in &parts {
                        w.send(part.clone());
                    }
                }
                (api::RotationOutcome::RotationLoaded, message)
            }
        };
        let record = api::CertificateRotation {
            outcome: outcome as i32,
            message,
            at_unix_ms: unix_ms(SystemTime::now()),
        };
        self.certs.sets[i].last = Some(record.clone());
        record
    }

    /// A worker's answer to a set it was sent.
    pub(super) fn on_certificates_applied(&mut self, idx: usize, applied: pb::CertificatesApplied) {
        let g = &self.generations[idx];
        let Some(w) = g.worker() else { return };
        if !applied.error.is_empty() {
            // The worker checks the bytes the master checked: only its clock can differ.
            tracing::error!(generation = g.number, pid = w.pid, rotation = applied.rotation, error = %applied.error, "a worker refused rotated certificates");
        }
        w.certificates.send_if_modified(|r| {
            let newer = applied.rotation > *r;
            if newer {
                *r = applied.rotation;
            }
            newer
        });
    }
}

/// Waits until every worker has answered for rotation `rotation` (or is gone).
async fn all_answered(applied: Vec<watch::Receiver<u64>>, rotation: u64) {
    for mut rx in applied {
        let _ = rx.wait_for(|r| *r >= rotation).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_are_read_once_they_stand_still_or_after_settle_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("site.pem");
        std::fs::write(&file, "one").expect("write");
        let sources = vec![CertSource::Path(file.clone())];
        let mut set = CertSet {
            name: "site".to_owned(),
            read: Fingerprint::of(&sources),
            sources,
            served: Vec::new(),
            changing: None,
            last: None,
            loaded: 0,
            refused: 0,
        };
        let t0 = Instant::now();
        assert!(!set.due(t0), "nothing changed");
        std::fs::write(&file, "two!").expect("write");
        assert!(!set.due(t0), "changed: wait for it to stand still");
        assert!(set.due(t0 + SETTLE), "stood still");

        // A file that keeps changing is read after SETTLE_MAX.
        set.changing = None;
        std::fs::write(&file, "three").expect("write");
        assert!(!set.due(t0));
        for (i, text) in ["4", "55", "666"].into_iter().enumerate() {
            std::fs::write(&file, text).expect("write");
            let at = t0 + SETTLE * u32::try_from(i + 1).expect("small");
            assert!(!set.due(at), "still changing");
        }
        std::fs::write(&file, "7777").expect("write");
        assert!(set.due(t0 + SETTLE_MAX));
    }
}
