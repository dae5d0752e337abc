//! Helpers shared by fdkeeper's integration tests: an in-process fdkeeper on a temp dir.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::SourceFile;
use fdkeeper::{Config, ListenSpec};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Keeper {
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub config_path: PathBuf,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

/// The uid this test runs as (owner of a file it just made).
pub fn my_uid(dir: &Path) -> u32 {
    std::fs::metadata(dir).map(|m| m.uid()).unwrap_or(0)
}

/// Config text for a keeper in `dir`, allowing this test's uid and 127.0.0.0/8.
pub fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        "socket = \"{}/run/lend.sock\"\nadmin = \"{}/run/admin.sock\"\nallowed_uids = [{}]\nallowed_binds = [\"127.0.0.0/8\"]\n{extra}",
        dir.display(),
        dir.display(),
        my_uid(dir)
    )
}

impl Keeper {
    /// Starts fdkeeper in-process on `dir` with the default test config plus `extra`.
    pub fn start(dir: &Path, extra: &str) -> Keeper {
        Self::start_with(dir, &config_text(dir, extra))
    }

    pub fn start_with(dir: &Path, text: &str) -> Keeper {
        let config_path = dir.join("fdkeeper.toml");
        std::fs::write(&config_path, text).expect("write config");
        let config = Config::from_source(&SourceFile::from_text(&config_path, text))
            .expect("valid test config");
        let sockets = fdkeeper::bind_sockets(&config).expect("bind");
        let shutdown = CancellationToken::new();
        let socket = config.socket().to_owned();
        let admin = config.admin().to_owned();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            fdkeeper::run(config, sockets, token).await.expect("run");
        });
        Keeper {
            socket,
            admin,
            config_path,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Stops it and waits until it is gone (its held sockets close with it).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("fdkeeper stops within 5 s")
                .expect("run task");
        }
    }

    pub async fn client(&self) -> fdkeeper::Client {
        fdkeeper::Client::connect(&self.socket)
            .await
            .expect("connect to fdkeeper")
    }
}

pub fn spec(address: &str) -> ListenSpec {
    ListenSpec {
        address: address.to_owned(),
        ..ListenSpec::default()
    }
}
