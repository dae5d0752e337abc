//! The stickd binary: parse arguments, load the config, bind, run, map errors to exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use tokio_util::sync::CancellationToken;

// Tables of millions of entries hold a few small strings each, and a resync or a sweep makes and
// frees them by the million: mimalloc's per-thread size classes do that for less CPU and less
// fragmentation than glibc's malloc, whose frees and consolidations were a quarter of a resync.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The data_dir is damaged (sysexits' EX_DATAERR): restarting cannot help, so systemd's unit
/// lists it in RestartPreventExitStatus.
const EXIT_DATA_DIR: i32 = 65;

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
    /// This node's name among the configured peers (default: the hostname).
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
}

fn main() {
    common::daemon::init_tracing("info");
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let Some(path) = args.config else {
        eprintln!("stickd: --config FILE is required (see --help)");
        std::process::exit(EXIT_CONFIG);
    };
    let mut config = match stickd::Config::load(&path, args.local_peer.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stickd: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if args.check || matches!(args.command, Some(Command::Check)) {
        println!("{}: ok", path.display());
        std::process::exit(EXIT_OK);
    }
    if args.recover_from_peers {
        if config.peers.is_empty() {
            eprintln!(
                "stickd: --recover-from-peers: {} configures no peer besides '{}': there is nobody to recover from",
                path.display(),
                config.local
            );
            std::process::exit(EXIT_CONFIG);
        }
        config.recover_from_peers = true;
    }
    std::process::exit(match serve(config) {
        Ok(()) => EXIT_OK,
        Err(e) => match e.downcast_ref::<stickd::Error>() {
            Some(e @ stickd::Error::DataDir(d)) => {
                eprintln!("stickd: {e}");
                match d {
                    stickd::datadir::DataDirError::Damaged { .. } => EXIT_DATA_DIR,
                    _ => EXIT_FAILURE,
                }
            }
            _ => {
                eprintln!("stickd: {e:#}");
                EXIT_FAILURE
            }
        },
    });
}

fn serve(config: stickd::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listeners = stickd::Listeners::bind(&config).map_err(|e| {
            anyhow::anyhow!(
                "cannot bind {} or {}: {e}",
                config.socket.display(),
                config.listen
            )
        })?;
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received: shutting down");
            signals.cancel();
        });
        stickd::run(config, listeners, shutdown).await?;
        Ok(())
    })
}
