//! The proxyd binary: master (default), `check`, `reload`, and the hidden `worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{exit_status, parse_args};
use proxyd::config::DEFAULT_PATH;

#[derive(Parser)]
#[command(
    version,
    about = "HTTP/1.1 load balancer: a master supervising worker generations"
)]
struct Cli {
    /// Config file.
    #[arg(long, short, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the config: exit 0, or 64 with file:line:column: reason.
    Check,
    /// Ask the running master (on the config's admin socket) to reload.
    Reload {
        /// Admin socket to use instead of the one named in the config.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Show the running master's generations, workers and last reload.
    Status {
        /// Admin socket to use instead of the one named in the config.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Run as a worker (started by the master only).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        control_fd: i32,
    },
}

fn main() -> ExitCode {
    common::daemon::init_tracing("info");
    let cli: Cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return exit_status(code),
    };
    exit_status(match cli.command {
        None => proxyd::cli::master(&cli.config),
        Some(Cmd::Check) => proxyd::cli::check(&cli.config),
        Some(Cmd::Reload { admin_socket }) => proxyd::cli::reload(&cli.config, admin_socket),
        Some(Cmd::Status { admin_socket }) => proxyd::cli::status(&cli.config, admin_socket),
        Some(Cmd::Worker { control_fd }) => proxyd::worker::main(control_fd),
    })
}
