//! The stickd binary: parse arguments, then `check` or run the daemon (see [`stickd::cli`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{EXIT_CONFIG, exit_status, parse_args};

// Tables of millions of entries hold a few small strings each, and a resync or a sweep makes and
// frees them by the million: mimalloc's per-thread size classes do that for less CPU and less
// fragmentation than glibc's malloc, whose frees and consolidations were a quarter of a resync.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stick tables in sled, replicated to every peer over gRPC.
///
/// Exit codes: 0 ok; 64 bad configuration or usage; 65 the data_dir is damaged (the message
/// names it: start once with --recover-from-peers, or restore it); 1 anything else.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name among the configured peers (default: the hostname); `table` commands
    /// ignore it.
    #[arg(short = 'L', long = "local-peer", global = true, value_name = "NAME")]
    local_peer: Option<String>,
    /// The same as `stickd check`.
    #[arg(long)]
    check: bool,
    /// If the data_dir is damaged, move it aside (beside it, with a timestamp; logged) and start
    /// empty: the peers' full snapshots refill it. Refused without peers (64). A data_dir that
    /// opens fine is kept.
    #[arg(long)]
    recover_from_peers: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Only validate the config (and the local peer name): exit 0, or 64 with file:line: reason.
    Check,
    /// The stick tables of the running stickd (over its local socket), as HAProxy's runtime
    /// API shows and changes them: exit 0, 64 for a bad config, 1 when stickd refuses.
    Table {
        #[command(subcommand)]
        op: TableCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TableCmd {
    /// Every table's summary, or one table's entries (`show table NAME [key K]`).
    Show {
        table: Option<String>,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Sticks KEY to SERVER (`set table NAME key K data.server_key NAME`); replicates.
    Set {
        table: String,
        key: String,
        server: String,
    },
    /// Deletes one key (`clear table NAME key K`); replicates.
    Delete { table: String, key: String },
    /// Deletes every entry of a table (`clear table NAME`); replicates.
    Clear { table: String },
}

fn main() -> ExitCode {
    common::daemon::init_tracing("info");
    let args: Args = match parse_args() {
        Ok(a) => a,
        Err(code) => return exit_status(code),
    };
    let Some(path) = args.config else {
        eprintln!("stickd: --config FILE is required (see --help)");
        return exit_status(EXIT_CONFIG);
    };
    let local_peer = args.local_peer.as_deref();
    use stickd::ops::TableOp;
    exit_status(match args.command {
        Some(Command::Table { op }) => {
            let op = match op {
                TableCmd::Show { table, key } => TableOp::Show { table, key },
                TableCmd::Set { table, key, server } => TableOp::Set { table, key, server },
                TableCmd::Delete { table, key } => TableOp::Delete { table, key },
                TableCmd::Clear { table } => TableOp::Clear { table },
            };
            stickd::ops::table(&path, op)
        }
        Some(Command::Check) => stickd::cli::check(&path, local_peer),
        None if args.check => stickd::cli::check(&path, local_peer),
        None => stickd::cli::daemon(&path, local_peer, args.recover_from_peers),
    })
}
