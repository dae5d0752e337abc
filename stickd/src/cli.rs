//! What the stickd binary does, kept out of main.rs: `check`, the daemon and its exit codes.

use std::path::Path;

use common::daemon::{EXIT_CONFIG, EXIT_DATA, EXIT_FAILURE, EXIT_OK};
use tokio_util::sync::CancellationToken;

use crate::datadir::DataDirError;
use crate::{Config, Error, Listeners};

/// Loads and validates the config (with the local peer name); a refusal is printed and
/// comes back as exit code 64.
fn load(path: &Path, local_peer: Option<&str>) -> Result<Config, i32> {
    Config::load(path, local_peer).map_err(|e| {
        eprintln!("stickd: {e}");
        EXIT_CONFIG
    })
}

/// `stickd check` (or `--check`): exit 0, or 64 with file:line: reason.
pub fn check(path: &Path, local_peer: Option<&str>) -> i32 {
    match load(path, local_peer) {
        Ok(_) => {
            println!("{}: ok", path.display());
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `stickd --config FILE`: validate, bind, serve until SIGTERM or SIGINT, flush.
///
/// Exit codes: 0 ok; 64 bad configuration or usage; 65 the data_dir is damaged (the message
/// names it: start once with `--recover-from-peers`, or restore it), which systemd's unit lists
/// in RestartPreventExitStatus since restarting cannot help; 1 anything else.
pub fn daemon(path: &Path, local_peer: Option<&str>, recover_from_peers: bool) -> i32 {
    let mut config = match load(path, local_peer) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if recover_from_peers {
        if config.peers.is_empty() {
            eprintln!(
                "stickd: --recover-from-peers: {} configures no peer besides '{}': there is nobody to recover from",
                path.display(),
                config.local
            );
            return EXIT_CONFIG;
        }
        config.recover_from_peers = true;
    }
    match serve(config) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("stickd: {e}");
            exit_code(&e)
        }
    }
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot bind {socket} or {listen}: {source}")]
    Bind {
        socket: String,
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Run(#[from] Error),
}

fn exit_code(e: &ServeError) -> i32 {
    match e {
        ServeError::Run(Error::DataDir(DataDirError::Damaged { .. })) => EXIT_DATA,
        _ => EXIT_FAILURE,
    }
}

fn serve(config: Config) -> Result<(), ServeError> {
    let runtime = common::daemon::runtime(0).map_err(ServeError::Runtime)?;
    runtime.block_on(async move {
        let listeners = Listeners::bind(&config).map_err(|source| ServeError::Bind {
            socket: config.socket.display().to_string(),
            listen: config.listen,
            source,
        })?;
        let shutdown = CancellationToken::new();
        // Without handlers stickd still serves; SIGTERM then ends it without a flush.
        if let Err(e) = common::signals::stop_on_signal(shutdown.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
        }
        crate::run(config, listeners, shutdown).await?;
        Ok(())
    })
}
