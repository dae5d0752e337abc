//! The proxyd binary: master (default), `check`, `reload`, and the hidden `worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{EXIT_CONFIG, EXIT_OK};
use proxyd::config::{Config, DEFAULT_PATH};

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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return code(if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK });
        }
    };
    code(match cli.command {
        None => proxyd::cli::master(&cli.config),
        Some(Cmd::Check) => match Config::load(&cli.config) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                EXIT_OK
            }
            Err(e) => {
                eprintln!("{e}");
                EXIT_CONFIG
            }
        },
        Some(Cmd::Reload { admin_socket }) => proxyd::cli::reload(&cli.config, admin_socket),
        Some(Cmd::Status { admin_socket }) => proxyd::cli::status(&cli.config, admin_socket),
        Some(Cmd::Worker { control_fd }) => proxyd::worker::main(control_fd),
    })
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}
