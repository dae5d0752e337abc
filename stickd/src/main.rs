//! The stickd binary: parse arguments, load the config, bind, run, map errors to exit codes.

use std::path::PathBuf;

use clap::Parser;
use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use tokio_util::sync::CancellationToken;

// Tables of millions of entries hold a few small strings each, and a resync or a sweep makes and
// frees them by the million: mimalloc's per-thread size classes do that for less CPU and less
// fragmentation than glibc's malloc, whose frees and consolidations were a quarter of a resync.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stick tables in sled, replicated to every peer over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(short, long)]
    config: PathBuf,
    /// This node's name among the configured peers (default: the hostname).
    #[arg(short = 'L', long = "local-peer")]
    local_peer: Option<String>,
    /// Only validate the config (and the local peer name): exit 0, or 64 with file:line: reason.
    #[arg(long)]
    check: bool,
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
    let config = match stickd::Config::load(&args.config, args.local_peer.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stickd: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        std::process::exit(EXIT_OK);
    }
    std::process::exit(match serve(config) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("stickd: {e:#}");
            EXIT_FAILURE
        }
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
