//! cargo xtask: test, e2e, demo, bench, soak, and the demo backend the e2e scenarios spawn.
#![forbid(unsafe_code)]

mod backend;
mod bench;
mod cluster;
mod configs;
mod demo;
mod e2e;
mod harness;
mod load;
mod soak;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks: tests, end-to-end scenarios, demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every test: `cargo test --workspace`, then the e2e scenarios; one closing line.
    Test,
    /// End-to-end scenarios against the real release binaries.
    E2e {
        /// Run only the scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Use the release binaries already in target/release instead of building them.
        #[arg(long)]
        no_build: bool,
    },
    /// Load-balancer nodes on 127.0.0.1-N in front of two demo backends, until Ctrl-C.
    Demo {
        /// Use the release binaries already in target/release instead of building them.
        #[arg(long)]
        no_build: bool,
        /// How many nodes (1 to 3), on 127.0.0.1, .2, .3.
        #[arg(long, default_value_t = 3)]
        nodes: u8,
    },
    /// Demo HTTP backend (like the seed's PHP app) that answers with its name.
    Backend {
        /// Address to listen on, e.g. 127.0.0.2:9001.
        #[arg(long)]
        listen: SocketAddr,
        /// Server name put in every answer.
        #[arg(long)]
        name: String,
        /// Delay before each response, e.g. "5ms", to keep requests in flight.
        #[arg(long, default_value = "0ms")]
        delay: common::Duration,
    },
    /// Every `fuzz_*` test of the workspace from a release build, each for N seconds.
    Fuzz {
        /// Time per fuzz target.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Replay one run: the seed a failing target printed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Endurance run: mixed traffic on a 3-node cluster for N minutes under seeded random reloads,
    /// kill -9s and stickd partitions; non-zero if a promise broke. Writes OUT/report.md.
    Soak {
        /// How long the traffic runs.
        #[arg(long)]
        minutes: f64,
        /// Replay the event schedule of an earlier run (printed at its start).
        #[arg(long)]
        seed: Option<u64>,
        /// Use the release binaries already in target/release instead of building them.
        #[arg(long)]
        no_build: bool,
        /// Directory for report.md (relative to the workspace root).
        #[arg(long, default_value = "target/soak")]
        out: std::path::PathBuf,
    },
    /// Benchmarks against HAProxy and nginx; writes docs/benchmarks.md and docs/benchmarks.png.
    Bench {
        /// A one-minute run: one round and short loads.
        #[arg(long)]
        quick: bool,
        /// Install HAProxy, nginx, wrk and the plot's font with apt-get if missing (root only).
        #[arg(long)]
        install: bool,
        /// Run only the sections whose id contains this (http, tls, reload, kill, peers, stickd, cache).
        #[arg(long)]
        only: Option<String>,
        /// Use the release binaries already in target/release instead of building them.
        #[arg(long)]
        no_build: bool,
        /// Directory for benchmarks.md and benchmarks.png.
        #[arg(long, default_value = "docs")]
        out: std::path::PathBuf,
        /// What the http and tls sections proxy to: Debian's nginx, or xtask's demo backend.
        #[arg(long, value_enum, default_value_t)]
        backends: bench::BackendKind,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Backend {
            listen,
            name,
            delay,
        } => {
            runtime(1)?.block_on(backend::run(backend::BackendConfig {
                listen,
                name,
                delay: delay.into(),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::E2e { filter, no_build } => {
            harness::become_subreaper();
            let totals = runtime(2)?.block_on(async {
                kill_all_on_interrupt()?;
                let result = e2e::run(filter.as_deref(), !no_build).await;
                harness::kill_all();
                result
            })?;
            println!("{}", totals.line());
            Ok(exit_for(totals.failed == 0))
        }
        Cmd::Test => {
            let unit = cargo_test()?;
            harness::become_subreaper();
            let e2e = runtime(2)?.block_on(async {
                kill_all_on_interrupt()?;
                let result = e2e::run(None, true).await;
                harness::kill_all();
                result
            });
            let mut totals = match e2e {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("e2e could not run: {e:#}");
                    e2e::Totals {
                        failed: 1,
                        ..Default::default()
                    }
                }
            };
            println!(
                "cargo test: {} passed, {} failed, {} ignored{}; e2e: {}",
                unit.passed,
                unit.failed,
                unit.skipped,
                if unit.ok { "" } else { " (cargo test failed)" },
                totals.line()
            );
            totals.passed += unit.passed;
            totals.failed += unit.failed + usize::from(!unit.ok && unit.failed == 0);
            totals.skipped += unit.skipped;
            println!("{}", totals.line());
            Ok(exit_for(totals.failed == 0))
        }
        Cmd::Fuzz { seconds, seed } => fuzz(seconds, seed),
        Cmd::Demo { no_build, nodes } => {
            harness::become_subreaper();
            runtime(2)?.block_on(demo::run(!no_build, nodes))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Soak {
            minutes,
            seed,
            no_build,
            out,
        } => {
            harness::become_subreaper();
            let options = soak::Options {
                minutes,
                seed,
                build: !no_build,
                out: harness::workspace_root().join(out),
            };
            let ok = runtime(2)?.block_on(async {
                kill_all_on_interrupt()?;
                let result = soak::run(options).await;
                harness::kill_all();
                result
            })?;
            Ok(exit_for(ok))
        }
        Cmd::Bench {
            quick,
            install,
            only,
            no_build,
            out,
            backends,
        } => {
            bench_in_release(no_build)?;
            harness::become_subreaper();
            let out_dir = if out.is_absolute() {
                out
            } else {
                harness::workspace_root().join(out)
            };
            let options = bench::Options {
                quick,
                install,
                only,
                build: !no_build,
                out_dir,
                backends,
            };
            let result = runtime(2)?.block_on(async {
                kill_all_on_interrupt()?;
                let result = bench::run(options).await;
                harness::kill_all();
                result
            });
            result?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the bench from xtask's release build: its load clients (gRPC writers and watchers, HTTP
/// clients) share the two cores with the daemons they measure, and a debug build of them spent
/// about as much CPU as the three stickd of the replication run together. Builds it unless
/// `no_build`, then replaces this process with it (with `--no-build`: everything is built by
/// then). Returns an error if that fails, and `Ok` where this already is the release build or
/// there is none, in which case the bench goes on here and says so.
fn bench_in_release(no_build: bool) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    if !no_build {
        harness::build_release_with_xtask()?;
    }
    let exe = harness::release_bin("xtask");
    if !exe.exists() {
        eprintln!(
            "note: {} is not built: the bench's load clients run from this debug build",
            exe.display()
        );
        return Ok(());
    }
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !no_build {
        args.push("--no-build".into());
    }
    let err = Command::new(&exe).args(&args).exec();
    Err(err).with_context(|| format!("cannot run {}", exe.display()))
}

fn exit_for(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// On Ctrl-C or SIGTERM, kill every process the harness started, then exit 130: the processes
/// sit in their own process groups, so the terminal's SIGINT does not reach them.
fn kill_all_on_interrupt() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("interrupted: stopping every process the e2e started");
        harness::kill_all();
        harness::remove_temp_dirs();
        std::process::exit(130);
    });
    Ok(())
}

/// Runs the workspace's fuzz targets (tests named `fuzz_*`, see `common::fuzz`) from a release
/// build, one at a time so that each has a core to itself beside the test harness.
fn fuzz(seconds: f64, seed: Option<u64>) -> Result<ExitCode> {
    anyhow::ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be a positive number"
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(harness::workspace_root())
        .args([
            "test",
            "--release",
            "--workspace",
            "--no-fail-fast",
            "fuzz_",
        ])
        .args(["--", "--test-threads=1", "--nocapture"])
        .env("FUZZ_SECONDS", seconds.to_string());
    if let Some(seed) = seed {
        cmd.env("FUZZ_SEED", seed.to_string());
    }
    let status = cmd.status().context("cannot run cargo test")?;
    Ok(exit_for(status.success()))
}

/// What `cargo test --workspace` reported.
#[derive(Debug, Default)]
struct UnitTotals {
    passed: usize,
    failed: usize,
    skipped: usize,
    ok: bool,
}

/// Runs `cargo test --workspace --no-fail-fast` (every test binary, even after a failure), echoing its output and adding up its `test result:` lines.
fn cargo_test() -> Result<UnitTotals> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(harness::workspace_root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let mut totals = UnitTotals::default();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some((p, f, i)) = parse_test_result(&line) {
                totals.passed += p;
                totals.failed += f;
                totals.skipped += i;
            }
        }
    }
    totals.ok = child.wait()?.success();
    Ok(totals)
}

/// Reads "test result: ok. 3 passed; 0 failed; 1 ignored; ..." into (passed, failed, ignored).
fn parse_test_result(line: &str) -> Option<(usize, usize, usize)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |what: &str| -> Option<usize> {
        rest.split(';').find_map(|part| {
            let part = part.trim();
            let part = part.rsplit_once(". ").map_or(part, |(_, p)| p);
            part.strip_suffix(what)?.trim().parse().ok()
        })
    };
    Some((
        count("passed")?,
        count("failed")?,
        count("ignored").unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn parses_cargo_test_result_lines() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.05s"
            ),
            Some((12, 0, 1))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured"),
            Some((4, 1, 0))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
