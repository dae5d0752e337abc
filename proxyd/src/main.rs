//! The proxyd binary: master (default), `check`, `reload`, `status`, `servers`, `set-server`,
//! `import-haproxy`, and the hidden `worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{exit_status, parse_args};
use proxyd::config::DEFAULT_PATH;

#[derive(Parser)]
#[command(
    version,
    about = "HTTP load balancer: a master supervising worker generations"
)]
struct Cli {
    /// Config file (haproxy.cfg for import-haproxy).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
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
    /// Translate a haproxy.cfg into fdkeeper.toml, stickd.toml and proxyd.toml, reporting
    /// every line it translates only approximately or not at all.
    ImportHaproxy(proxyd::cli::ImportArgs),
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
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    exit_status(match cli.command {
        None => proxyd::cli::master(&config),
        Some(Cmd::Check) => proxyd::cli::check(&config),
        Some(Cmd::Reload { admin_socket }) => proxyd::cli::reload(&config, admin_socket),
        Some(Cmd::Status { admin_socket }) => proxyd::cli::status(&config, admin_socket),
        Some(Cmd::Servers {
            backend,
            admin_socket,
        }) => proxyd::cli::servers(&config, admin_socket, backend),
        Some(Cmd::SetServer {
            backend,
            server,
            state,
            weight,
            admin_socket,
        }) => proxyd::cli::set_server(
            &config,
            admin_socket,
            proto::proxyd::v1::SetServerRequest {
                backend,
                server,
                state: state.unwrap_or_default(),
                weight,
            },
        ),
        Some(Cmd::ImportHaproxy(args)) => proxyd::cli::import_haproxy(cli.config.as_deref(), &args),
        Some(Cmd::Worker { control_fd }) => proxyd::worker::main(control_fd),
    })
}
