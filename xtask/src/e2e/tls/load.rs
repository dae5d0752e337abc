//! TLS and HTTP/2 load from real clients: h2load runs one after another (a "round" each) and a
//! curl loop, until told to stop, with what each kind of client must never see counted.
//!
//! h2load opens no new connection after a GOAWAY: the requests it had not started yet on that
//! connection it counts as failed, and so are the streams it had queued (up to `-m`) but not
//! yet written when the GOAWAY came, though they never left h2load (the h2c relay shows it).
//! So the HTTP/2 rounds use one connection each (`-c 1`) and a round may lose at most its `-m`
//! queued streams, and only when it was cut short; it must send something (else its connection
//! or handshake failed). The HTTP/1.1 clients reconnect after `Connection: close`, so every
//! request of theirs must succeed. (h2load's `--rps` mode does not reconnect after a
//! `Connection: close`, so no HTTP/1.1 client here uses it.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::clients::{self, H2loadCounts};

/// How long one h2load round may take before it counts as broken (and is killed).
const ROUND_TIMEOUT: Duration = Duration::from_secs(20);
/// Bad rounds whose output a scenario prints.
const SAMPLES: usize = 3;

/// What a client of the load must see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// HTTP/1.1 keep-alive, reconnecting by itself after `Connection: close`: every request
    /// sent and succeeded.
    KeepAlive,
    /// A new connection, and so a new handshake, for every request: every one succeeded.
    HandshakePerRequest,
    /// One HTTP/2 connection per round with `streams` at once (`-m`): some streams sent, and
    /// those that failed no more than were queued when a GOAWAY cut the round short.
    Multiplexed { streams: u64 },
}

impl Expect {
    /// Whether every request must succeed (the client reconnects whenever it must).
    fn all_succeed(self) -> bool {
        matches!(self, Expect::KeepAlive | Expect::HandshakePerRequest)
    }
}

/// One kind of client of the load.
#[derive(Clone, Debug)]
pub enum Client {
    /// `h2load ARGS [--connect-to=ADDR] URL` again and again.
    H2load {
        label: String,
        args: Vec<String>,
        expect: Expect,
        url: String,
        connect_to: Option<SocketAddr>,
    },
    /// `curl --http2` again and again, a new process and so a new full handshake each time,
    /// verifying the certificate against `ca`; each must get a 200 over HTTP/2.
    Curl {
        label: String,
        ca: PathBuf,
        name: String,
        addr: SocketAddr,
        pause: Duration,
    },
}

/// The totals of one client kind.
#[derive(Clone, Debug)]
pub struct Totals {
    pub label: String,
    pub expect: Expect,
    pub rounds: u64,
    pub counts: H2loadCounts,
    /// Rounds that sent no request at all.
    pub empty_rounds: u64,
    /// Streams h2load counted as sent and failed that it had only queued when a GOAWAY came.
    pub queued_at_goaway: u64,
    /// h2load runs that exited with an error, timed out or printed no summary; curl runs that
    /// failed or got something else than a 200 over HTTP/2.
    pub broken: u64,
    /// The output of the first bad rounds.
    pub samples: Vec<String>,
}

impl Totals {
    fn new(label: &str, expect: Expect) -> Totals {
        Totals {
            label: label.to_owned(),
            expect,
            rounds: 0,
            counts: H2loadCounts::default(),
            empty_rounds: 0,
            queued_at_goaway: 0,
            broken: 0,
            samples: Vec::new(),
        }
    }

    /// Streams or requests that were sent and did not succeed, but for those only queued when
    /// a GOAWAY came.
    pub fn failed_sent(&self) -> u64 {
        self.counts
            .started
            .saturating_sub(self.counts.succeeded)
            .saturating_sub(self.queued_at_goaway)
    }

    /// Requests h2load never sent because a GOAWAY came first.
    pub fn not_sent(&self) -> u64 {
        self.counts.total.saturating_sub(self.counts.started)
    }

    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "{} rounds, {} sent, {} succeeded, {} failed after being sent, {} non-2xx, {} timeouts",
            self.rounds,
            c.started,
            c.succeeded,
            self.failed_sent(),
            c.status_other,
            c.timeout
        );
        if let Expect::Multiplexed { .. } = self.expect {
            s.push_str(&format!(
                ", {} queued in h2load when a GOAWAY came, {} not started after it (h2load opens no new connection), {} rounds that sent nothing",
                self.queued_at_goaway,
                self.not_sent(),
                self.empty_rounds
            ));
        } else {
            s.push_str(&format!(", {} errored", c.errored));
        }
        if self.broken > 0 {
            s.push_str(&format!(", {} broken runs", self.broken));
        }
        s
    }

    /// What went wrong, if anything.
    pub fn problems(&self) -> Option<String> {
        let c = &self.counts;
        let bad = self.failed_sent() > 0
            || c.status_other > 0
            || c.timeout > 0
            || self.broken > 0
            || self.empty_rounds > 0
            || (self.expect.all_succeed() && (c.failed > 0 || c.errored > 0))
            || self.rounds == 0;
        bad.then(|| format!("{}: {}", self.label, self.summary()))
    }
}

/// The running load.
pub struct Load {
    stop: CancellationToken,
    succeeded: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Totals>>,
}

impl Load {
    /// Starts every client against `target`; each runs until [`Load::finish`] or `max_time`.
    /// Bad rounds' output goes to `log_dir/load-bad-rounds.log` too.
    pub fn start(clients: &[Client], log_dir: &Path, max_time: Duration) -> Load {
        let stop = CancellationToken::new();
        let succeeded = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_time;
        let log = log_dir.join("load-bad-rounds.log");
        let tasks = clients
            .iter()
            .map(|c| {
                let run = Runner {
                    stop: stop.clone(),
                    succeeded: Arc::clone(&succeeded),
                    deadline,
                    log: log.clone(),
                };
                tokio::spawn(run.client(c.clone()))
            })
            .collect();
        Load {
            stop,
            succeeded,
            tasks,
        }
    }

    /// Requests that succeeded so far, over every finished round.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests succeeded, or fails after `timeout`.
    pub async fn wait_flowing(&self, n: u64, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while self.succeeded() < n {
            anyhow::ensure!(
                t.elapsed() < timeout,
                "only {} requests succeeded in {timeout:?}",
                self.succeeded()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Lets every client finish its round and returns the totals, in the order given.
    pub async fn finish(self) -> Vec<Totals> {
        self.stop.cancel();
        let mut out = Vec::new();
        for t in self.tasks {
            match t.await {
                Ok(totals) => out.push(totals),
                Err(e) => {
                    let mut broken = Totals::new("a client task", Expect::KeepAlive);
                    broken.broken = 1;
                    broken.samples.push(format!("panicked: {e}"));
                    out.push(broken);
                }
            }
        }
        out
    }
}

/// What every client task shares.
struct Runner {
    stop: CancellationToken,
    succeeded: Arc<AtomicU64>,
    deadline: Instant,
    log: PathBuf,
}

impl Runner {
    fn more(&self) -> bool {
        !self.stop.is_cancelled() && Instant::now() < self.deadline
    }

    fn bad_round(&self, totals: &mut Totals, what: String) {
        use std::io::Write;
        if totals.samples.len() < SAMPLES {
            totals.samples.push(what.clone());
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = writeln!(f, "== {}\n{what}", totals.label);
        }
    }

    async fn client(self, client: Client) -> Totals {
        match client {
            Client::H2load {
                label,
                args,
                expect,
                url,
                connect_to,
            } => self.h2load(&label, &args, expect, &url, connect_to).await,
            Client::Curl {
                label,
                ca,
                name,
                addr,
                pause,
            } => self.curl(&label, &ca, &name, addr, pause).await,
        }
    }

    async fn h2load(
        &self,
        label: &str,
        args: &[String],
        expect: Expect,
        url: &str,
        connect_to: Option<SocketAddr>,
    ) -> Totals {
        let mut totals = Totals::new(label, expect);
        while self.more() {
            let mut cmd = Command::new("h2load");
            cmd.args(args);
            if let Some(addr) = connect_to {
                cmd.arg(format!("--connect-to={addr}"));
            }
            cmd.arg(url);
            let out = clients::output(&mut cmd, ROUND_TIMEOUT).await;
            totals.rounds += 1;
            let (text, ok_exit) = match &out {
                Ok(o) => (
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    o.status.success(),
                ),
                Err(e) => (format!("{e:#}"), false),
            };
            let Some(c) = H2loadCounts::parse(&text).filter(|_| ok_exit) else {
                totals.broken += 1;
                self.bad_round(&mut totals, summary_lines(&text));
                continue;
            };
            totals.counts.add(&c);
            self.succeeded.fetch_add(c.succeeded, Ordering::Relaxed);
            let empty = c.started == 0;
            totals.empty_rounds += u64::from(empty);
            let mut lost = c.started.saturating_sub(c.succeeded);
            if let Expect::Multiplexed { streams } = expect {
                let cut_short = c.total > c.started;
                if cut_short && lost <= streams {
                    totals.queued_at_goaway += lost;
                    lost = 0;
                }
            }
            let bad = empty
                || lost > 0
                || c.status_other > 0
                || c.timeout > 0
                || (expect.all_succeed() && (c.failed > 0 || c.errored > 0));
            if bad {
                self.bad_round(&mut totals, summary_lines(&text));
            }
        }
        totals
    }

    async fn curl(
        &self,
        label: &str,
        ca: &Path,
        name: &str,
        addr: SocketAddr,
        pause: Duration,
    ) -> Totals {
        let mut totals = Totals::new(label, Expect::HandshakePerRequest);
        while self.more() {
            totals.rounds += 1;
            totals.counts.total += 1;
            totals.counts.started += 1;
            match clients::curl_tls(ca, name, addr, &["--http2"]).await {
                Ok(r) if r.code == 200 && r.version == "2" => {
                    totals.counts.succeeded += 1;
                    totals.counts.status_2xx += 1;
                    self.succeeded.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => {
                    totals.counts.status_other += u64::from(r.code != 200);
                    totals.broken += 1;
                    self.bad_round(&mut totals, format!("curl got {r:?}"));
                }
                Err(e) => {
                    totals.broken += 1;
                    totals.counts.errored += 1;
                    self.bad_round(&mut totals, format!("{e:#}"));
                }
            }
            tokio::time::sleep(pause).await;
        }
        totals
    }
}

/// The lines of an h2load output worth reading in a report: errors and the summary.
fn summary_lines(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !l.starts_with("progress:")
                && !l.starts_with("spawning thread")
                && !l.starts_with("starting benchmark")
                && !l.trim().is_empty()
        })
        .take(12)
        .collect::<Vec<_>>()
        .join(" | ")
}
