//! cargo xtask: test, e2e, demo, bench, and the demo backend the e2e scenarios spawn.
#![forbid(unsafe_code)]

mod backend;
mod harness;
mod load;

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

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
    /// Demo HTTP backend (like the seed's PHP app) that answers with its name.
    Backend {
        /// Address to listen on, e.g. 127.0.0.2:8081.
        #[arg(long)]
        listen: SocketAddr,
        /// Server name put in every answer.
        #[arg(long)]
        name: String,
        /// Delay before each response, e.g. "5ms", to keep requests in flight.
        #[arg(long, default_value = "0ms")]
        delay: common::Duration,
    },
    /// Benchmarks (issue 6).
    Bench,
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Backend {
            listen,
            name,
            delay,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(backend::run(backend::BackendConfig {
                listen,
                name,
                delay: delay.into(),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench => bail!("cargo xtask bench is not implemented yet, see issue 6"),
    }
}
