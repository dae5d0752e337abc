//! What the fdkeeper binary's commands do, kept out of main.rs: the daemon, `check`, `list`, `acquire`.

use std::path::Path;

use common::daemon::{EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use tokio_util::sync::CancellationToken;

use crate::{Client, Config, ListenSpec};

/// `fdkeeper check --config FILE`: exit 0, or 64 with file:line: reason.
pub fn check(path: &Path) -> i32 {
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

/// `fdkeeper --config FILE`: validate, bind, serve until SIGTERM or SIGINT.
pub fn daemon(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    // Before any thread exists: this reads and unsets LISTEN_FDS.
    let inherited = crate::systemd::take_listen_fds();
    let mut sockets = match crate::bind_sockets(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind");
            return EXIT_FAILURE;
        }
    };
    sockets.inherited = inherited;
    let rt = match common::daemon::runtime(2) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return EXIT_FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        // Held sockets outlive a stop: in borrowers and in systemd's fd store.
        let signals = match common::signals::stop_on_signal(shutdown.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return EXIT_FAILURE;
            }
        };
        let result = crate::run(config, sockets, shutdown).await;
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

/// Runs an operator command on a small runtime.
fn with_runtime(fut: impl Future<Output = i32>) -> i32 {
    match common::daemon::runtime(1) {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("fdkeeper: cannot start the runtime: {e}");
            EXIT_FAILURE
        }
    }
}

/// `fdkeeper list --socket PATH`: prints the listeners a running fdkeeper holds.
pub fn list(socket: &Path) -> i32 {
    with_runtime(async {
        let mut client = match Client::connect(socket).await {
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
    })
}

/// `fdkeeper acquire`: borrows listeners and prints address, local address and inode of each.
pub fn acquire(socket: &Path, backlog: Option<u32>, borrower: &str, addresses: Vec<String>) -> i32 {
    let specs: Vec<ListenSpec> = addresses
        .into_iter()
        .map(|address| ListenSpec {
            address,
            backlog: backlog.unwrap_or(0),
            ..ListenSpec::default()
        })
        .collect();
    with_runtime(async {
        let mut client = match Client::connect(socket).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fdkeeper: {e}");
                return EXIT_FAILURE;
            }
        };
        match client.acquire(borrower, &specs).await {
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
    })
}
