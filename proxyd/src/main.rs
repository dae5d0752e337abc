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
    /// List the servers of the running proxyd with their health, state and weight (HAProxy's
    /// `show servers state`).
    Servers {
        /// Only this backend.
        #[arg(long)]
        backend: Option<String>,
        /// Admin socket to use instead of the one named in the config.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Set a server's admin state or weight on the running proxyd (HAProxy's `set server`);
    /// kept across reloads.
    SetServer {
        backend: String,
        server: String,
        /// ready, drain or maint.
        #[arg(long)]
        state: Option<String>,
        /// 0 to 256.
        #[arg(long)]
        weight: Option<u32>,
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
        Some(Cmd::Servers {
            backend,
            admin_socket,
        }) => proxyd::cli::servers(&cli.config, admin_socket, backend),
        Some(Cmd::SetServer {
            backend,
            server,
            state,
            weight,
            admin_socket,
        }) => proxyd::cli::set_server(
            &cli.config,
            admin_socket,
            proto::proxyd::v1::SetServerRequest {
                backend,
                server,
                state: state.unwrap_or_default(),
                weight,
            },
        ),
        Some(Cmd::Worker { control_fd }) => proxyd::worker::main(control_fd),
    })
}
