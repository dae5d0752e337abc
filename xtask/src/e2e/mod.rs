//! `cargo xtask e2e`: whole-system scenarios against the real release binaries, one temp dir
//! each, with a closing `N passed, M failed` line.
//!
//! A scenario is a plain async fn taking its [`Env`]; to add a group of them, write a module
//! with a `scenarios()` function returning [`Scenario`]s and append it in [`all`].

pub mod lb;
mod proxy;
mod smuggling;
mod stickd;
mod systemd;
mod tls;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::harness::{self, Env};
use crate::load::LoadReport;

/// What a scenario concluded, when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    Pass,
    /// Could not run here (e.g. needs root); the reason is printed.
    Skip(String),
}

pub type ScenarioFuture = Pin<Box<dyn Future<Output = Result<Outcome>> + Send>>;

/// One named scenario.
pub struct Scenario {
    pub name: &'static str,
    /// One line: what it proves.
    pub about: &'static str,
    pub run: fn(Env) -> ScenarioFuture,
    /// Past this the scenario fails (and everything it started is killed).
    pub timeout: Duration,
}

impl Scenario {
    pub fn new(
        name: &'static str,
        about: &'static str,
        timeout_s: u64,
        run: fn(Env) -> ScenarioFuture,
    ) -> Self {
        Self {
            name,
            about,
            run,
            timeout: Duration::from_secs(timeout_s),
        }
    }
}

/// Every scenario, in run order.
pub fn all() -> Vec<Scenario> {
    let mut all = proxy::scenarios();
    all.extend(stickd::scenarios());
    all.extend(lb::scenarios());
    all.extend(smuggling::scenarios());
    all.extend(tls::scenarios());
    all
}

/// Prints one measured figure of the running scenario.
pub fn figure(label: &str, value: impl std::fmt::Display) {
    println!("    {label}: {value}");
}

/// A duration as milliseconds with one decimal, for figures.
fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// Prints a finished load's summary and its first failures.
fn print_load(report: &LoadReport) {
    figure("load", report.summary());
    for s in &report.samples {
        figure("failure", s);
    }
}

/// Fails naming the count, the kinds and the first failure when any request failed.
fn ensure_no_failures(report: &LoadReport) -> Result<()> {
    anyhow::ensure!(
        report.failures.total() == 0,
        "{} failed requests ({}); first: {:?}",
        report.failures.total(),
        report.failures,
        report.samples.first()
    );
    Ok(())
}

/// Totals of one e2e run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Totals {
    /// The closing line: `N passed, M failed` (plus `, K skipped` when some were).
    pub fn line(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            s.push_str(&format!(", {} skipped", self.skipped));
        }
        s
    }
}

/// Builds the release binaries and runs every scenario whose name contains `filter`.
/// Prints each scenario's figures and verdict, but not the closing line (the caller does).
pub async fn run(filter: Option<&str>, build: bool) -> Result<Totals> {
    harness::require_grpcurl()?;
    if build {
        println!("building release binaries...");
        tokio::task::spawn_blocking(harness::build_release).await??;
    }
    let mut totals = Totals::default();
    let selected: Vec<Scenario> = all()
        .into_iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .collect();
    if selected.is_empty() && !systemd::any_selected(filter) {
        anyhow::bail!("no scenario matches {:?}", filter.unwrap_or_default());
    }
    for s in selected {
        println!("== {}: {}", s.name, s.about);
        let started = Instant::now();
        let env = Env::new(s.name)?;
        let keep = env.keep_dir();
        let logs = env.logs_dir();
        let timeout = s.timeout;
        let task = tokio::spawn(tokio::time::timeout(timeout, (s.run)(env)));
        let result = match task.await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(anyhow::anyhow!("timed out after {timeout:?}")),
            Err(e) if e.is_panic() => Err(anyhow::anyhow!("panicked: {e}")),
            Err(e) => Err(anyhow::anyhow!("aborted: {e}")),
        };
        // Whatever the scenario left running (it should have dropped everything) dies here.
        harness::kill_all();
        let took = started.elapsed();
        match result {
            Ok(Outcome::Pass) => {
                totals.passed += 1;
                println!("  PASS {} ({:.1}s)", s.name, took.as_secs_f64());
            }
            Ok(Outcome::Skip(why)) => {
                totals.skipped += 1;
                println!("  SKIP {} ({why})", s.name);
            }
            Err(e) => {
                totals.failed += 1;
                println!("  FAIL {} ({:.1}s): {e:#}", s.name, took.as_secs_f64());
                println!("{}", harness::log_tails(&logs, 40));
            }
        }
        drop(keep);
    }
    // The systemd checks share one booted container, so they run as a group after the rest.
    let units = systemd::run(filter).await?;
    totals.passed += units.passed;
    totals.failed += units.failed;
    totals.skipped += units.skipped;
    Ok(totals)
}
