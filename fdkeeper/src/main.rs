//! The fdkeeper binary: the daemon, `check`, and the `list`/`acquire` operator commands.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{EXIT_CONFIG, exit_status, parse_args};
use fdkeeper::cli;

#[derive(Parser)]
#[command(
    version,
    about = "Holds listening sockets and lends them to proxyd workers"
)]
struct Cli {
    /// Run the daemon with this config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0, or 64 with file:line: reason.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the listeners a running fdkeeper holds.
    List {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Borrow listeners and print address, local address and inode of each.
    Acquire {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        #[arg(long)]
        backlog: Option<u32>,
        #[arg(long, default_value = "fdkeeper acquire")]
        borrower: String,
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args: Cli = match parse_args() {
        Ok(a) => a,
        Err(code) => return exit_status(code),
    };
    common::daemon::init_tracing("info");
    exit_status(match (args.command, args.config) {
        (Some(Command::Check { config }), _) => cli::check(&config),
        (Some(Command::List { socket }), _) => cli::list(&socket),
        (
            Some(Command::Acquire {
                socket,
                backlog,
                borrower,
                addresses,
            }),
            _,
        ) => cli::acquire(&socket, backlog, &borrower, addresses),
        (None, Some(config)) => cli::daemon(&config),
        (None, None) => {
            eprintln!("fdkeeper: --config FILE is required (see --help)");
            EXIT_CONFIG
        }
    })
}
