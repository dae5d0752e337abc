//! `cargo xtask bench`: proxyd, stickd and the stick cache measured beside HAProxy and nginx in one
//! run on one machine, written as a markdown report (docs/benchmarks.md) and a PNG plot.
//!
//! Every section runs the real release binaries on loopback, bounded in time. Targets that are
//! compared run alternately, round after round, so that a noisy neighbour hits all of them; the
//! report gives medians and the spread (min..max) of the rounds, and ratios against HAProxy.

mod backends;
mod cache;
mod http;
mod kill;
mod logs;
mod peers;
mod plot;
mod reload;
mod report;
mod rules;
pub mod stats;
mod stickd;
mod tls;
pub mod tools;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub use report::{Plot, PlotBar, Report, Section, Table};

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// A one-minute run: one round, short loads (figures are rougher).
    pub quick: bool,
    /// Install what is missing (HAProxy, nginx, wrk, a font for the plot) with apt-get; root only.
    pub install: bool,
    /// Run only the sections whose id contains this.
    pub only: Option<String>,
    /// Build the release binaries first.
    pub build: bool,
    /// Where the report goes (`docs/benchmarks.md` and `docs/benchmarks.png` by default).
    pub out_dir: PathBuf,
    /// What the http and tls sections' targets proxy to.
    pub backends: BackendKind,
}

/// The backends of the http and tls sections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Two Debian nginx instances: a server nobody here wrote.
    #[default]
    Nginx,
    /// xtask's own demo backend (`cargo xtask backend`).
    Demo,
}

/// What every section gets.
pub struct Ctx {
    pub opts: Options,
    pub tools: tools::Tools,
}

impl Ctx {
    /// Rounds of alternating runs: 1 in quick mode, else `full`.
    pub fn rounds(&self, full: usize) -> usize {
        if self.opts.quick { 1 } else { full }
    }

    /// `quick` in quick mode, else `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.opts.quick { quick } else { full }
    }
}

/// One benchmark section: an id for `--only`, and what measures it.
struct Entry {
    id: &'static str,
    title: &'static str,
    run: fn(&Ctx) -> futures_boxed::BoxFuture<'_, Result<Section>>,
}

mod futures_boxed {
    //! The one boxed-future alias the section table needs (no `futures` dependency for it).
    use std::future::Future;
    use std::pin::Pin;
    pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;
}

const SECTIONS: &[Entry] = &[
    Entry {
        id: "http",
        title: "HTTP proxying: direct, proxyd, HAProxy, nginx",
        run: |c| Box::pin(http::run(c)),
    },
    Entry {
        id: "tls",
        title: "TLS: handshakes, keep-alive, HTTP/2, idle connections",
        run: |c| Box::pin(tls::run(c)),
    },
    Entry {
        id: "reload",
        title: "Reload storms under load",
        run: |c| Box::pin(reload::run(c)),
    },
    Entry {
        id: "kill",
        title: "A worker killed with SIGKILL under load",
        run: |c| Box::pin(kill::run(c)),
    },
    Entry {
        id: "peers",
        title: "Replication across three nodes: stickd against HAProxy peers",
        run: |c| Box::pin(peers::run(c)),
    },
    Entry {
        id: "stickd",
        title: "stickd: writes, replication lag, resync, size per entry",
        run: |c| Box::pin(stickd::run(c)),
    },
    Entry {
        id: "cache",
        title: "proxyd's stick cache: lookup time, memory per entry",
        run: |c| Box::pin(cache::run(c)),
    },
    Entry {
        id: "rules",
        title: "proxyd's L7 rules: cost per request",
        run: |c| Box::pin(rules::run(c)),
    },
];

/// Runs the selected sections, prints them and writes them into the report (keeping the sections
/// of the file this run did not measure); fails if any section failed.
pub async fn run(opts: Options) -> Result<()> {
    let selected: Vec<&Entry> = SECTIONS
        .iter()
        .filter(|e| opts.only.as_deref().is_none_or(|o| e.id.contains(o)))
        .collect();
    if selected.is_empty() {
        let ids: Vec<&str> = SECTIONS.iter().map(|e| e.id).collect();
        bail!("--only matches no section; sections: {}", ids.join(", "));
    }
    let tools = tools::Tools::find(opts.install)?;
    if opts.build {
        crate::harness::build_release()?;
    }
    let ctx = Ctx { opts, tools };
    let mut report = Report::new(&ctx)?;
    let mut failed = Vec::new();
    for entry in selected {
        eprintln!("== bench {}: {}", entry.id, entry.title);
        let t = Instant::now();
        let mut section = match (entry.run)(&ctx).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench {} failed: {e:#}", entry.id);
                failed.push(entry.id);
                Section::failed(entry.title, &format!("{e:#}"))
            }
        };
        crate::harness::kill_all();
        eprintln!("   ({} in {:.0?})", entry.id, t.elapsed());
        if section.id.is_empty() {
            section.id = entry.id.to_owned();
        }
        section.run = Report::run_line(&ctx, t.elapsed());
        report.push(section);
    }
    let markdown = report.markdown();
    println!("{markdown}");
    let order: Vec<(&str, &str)> = SECTIONS.iter().map(|e| (e.id, e.title)).collect();
    report
        .write(&ctx.opts.out_dir, &order)
        .with_context(|| format!("cannot write the report to {}", ctx.opts.out_dir.display()))?;
    if !failed.is_empty() {
        bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}

/// A time over a `proxyd_bench_json` bench's batches: median, least and most.
#[derive(Debug, serde::Deserialize)]
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

impl Figure {
    fn cell(&self) -> String {
        format!("{:.0} ({:.0}..{:.0})", self.median, self.min, self.max)
    }
}

/// Runs `cargo bench -p proxyd --bench NAME -- --json ARGS` and parses the last JSON line it
/// prints; a failed run ends with the tail of its stderr.
async fn proxyd_bench_json<T: serde::de::DeserializeOwned>(
    name: &str,
    args: &[String],
) -> Result<T> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = tokio::process::Command::new(&cargo)
        .current_dir(crate::harness::workspace_root())
        .args([
            "bench", "-q", "-p", "proxyd", "--bench", name, "--", "--json",
        ])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run cargo bench")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        bail!(
            "cargo bench -p proxyd --bench {name} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("the {name} bench printed no JSON line"))?;
    serde_json::from_str(line)
        .with_context(|| format!("cannot parse the {name} bench's output: {line}"))
}
