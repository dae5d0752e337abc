//! The fdkeeper binary: the daemon, `check`, and the `list`/`acquire` operator commands.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use fdkeeper::{Client, Config, ListenSpec};
use tokio_util::sync::CancellationToken;

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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK };
            let _ = e.print();
            return exit(code);
        }
    };
    common::daemon::init_tracing("info");
    let code = match (cli.command, cli.config) {
        (Some(Command::Check { config }), _) => check(&config),
        (Some(Command::List { socket }), _) => with_runtime(list(socket)),
        (
            Some(Command::Acquire {
                socket,
                backlog,
                borrower,
                addresses,
            }),
            _,
        ) => with_runtime(acquire(socket, backlog, borrower, addresses)),
        (None, Some(config)) => daemon(&config),
        (None, None) => {
            eprintln!("fdkeeper: --config FILE is required (see --help)");
            EXIT_CONFIG
        }
    };
    exit(code)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn check(path: &Path) -> i32 {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_CONFIG
        }
    }
}

fn with_runtime(fut: impl Future<Output = i32>) -> i32 {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("fdkeeper: cannot start the runtime: {e}");
            EXIT_FAILURE
        }
    }
}

fn daemon(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    // Before any thread exists: this reads and unsets LISTEN_FDS.
    let inherited = fdkeeper::systemd::take_listen_fds();
    let mut sockets = match fdkeeper::bind_sockets(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind");
            return EXIT_FAILURE;
        }
    };
    sockets.inherited = inherited;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = match on_signals(shutdown.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return EXIT_FAILURE;
            }
        };
        let result = fdkeeper::run(config, sockets, shutdown).await;
        signals.abort();
        match result {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!(error = %e, "fdkeeper failed");
                EXIT_FAILURE
            }
        }
    })
}

/// SIGTERM/SIGINT: tell systemd we are stopping and exit. Held sockets stay alive in
/// borrowers and in systemd's fd store.
fn on_signals(shutdown: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: exiting"),
            _ = int.recv() => tracing::info!("SIGINT: exiting"),
        }
        common::daemon::notify::stopping("exiting");
        shutdown.cancel();
    }))
}

async fn list(socket: PathBuf) -> i32 {
    let mut client = match Client::connect(&socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fdkeeper: {e}");
            return EXIT_FAILURE;
        }
    };
    match client.list().await {
        Ok(listing) => {
            if let Some(i) = &listing.instance {
                println!("# fdkeeper instance {} pid {}", i.id, i.pid);
            }
            for l in listing.listeners {
                let s = l.spec.unwrap_or_default();
                println!(
                    "{} {} inode={} backlog={} reuseport={} v6only={} defer_accept={} fastopen={} freebind={}",
                    s.address,
                    l.local_address,
                    l.inode,
                    s.backlog,
                    s.reuseport,
                    s.v6only,
                    s.defer_accept_secs,
                    s.fastopen_queue,
                    s.freebind
                );
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fdkeeper: {e}");
            EXIT_FAILURE
        }
    }
}

async fn acquire(
    socket: PathBuf,
    backlog: Option<u32>,
    borrower: String,
    addresses: Vec<String>,
) -> i32 {
    let specs: Vec<ListenSpec> = addresses
        .into_iter()
        .map(|address| ListenSpec {
            address,
            backlog: backlog.unwrap_or(0),
            ..ListenSpec::default()
        })
        .collect();
    let mut client = match Client::connect(&socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fdkeeper: {e}");
            return EXIT_FAILURE;
        }
    };
    match client.acquire(&borrower, &specs).await {
        Ok(lent) => {
            for l in lent {
                println!("{} {} inode={}", l.spec.address, l.local_addr, l.inode);
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fdkeeper: {e}");
            EXIT_FAILURE
        }
    }
}
