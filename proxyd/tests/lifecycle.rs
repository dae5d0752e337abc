//! The real proxyd binary (master + workers) with an in-process fdkeeper on a temp dir:
//! reload, drain, broken config, respawn after kill -9, stop, master death.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
use tokio_util::sync::CancellationToken;
use util::{Client, backend, config_text, get, ok, start_fdkeeper};

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
    admin: PathBuf,
    front: std::net::SocketAddr,
    master: Child,
    fdk_stop: CancellationToken,
    servers: Vec<std::net::SocketAddr>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        self.fdk_stop.cancel();
    }
}

fn free_addr() -> std::net::SocketAddr {
    util::closed_port()
}

async fn env(extra_global: &str) -> Env {
    env_with(extra_global, |_| Stdio::inherit()).await
}

/// Like [`env`], the master's stderr (its log) going where `stderr` says, given the temp dir.
async fn env_with(extra_global: &str, stderr: impl FnOnce(&Path) -> Stdio) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let fdk_stop = start_fdkeeper(dir.path());
    let b1 = backend(|_| ok("one")).await;
    let b2 = backend(|_| ok("two")).await;
    let front = free_addr();
    let servers = vec![b1.addr, b2.addr];
    let text = config_text(dir.path(), &front.to_string(), &servers, extra_global);
    let config = dir.path().join("proxyd.toml");
    std::fs::write(&config, text).expect("write config");
    let master = Command::new(PROXYD)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(stderr(dir.path()))
        // A log file without colour codes between a field's name and its value.
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("spawn proxyd");
    let admin = dir.path().join("proxyd/admin.sock");
    let env = Env {
        dir,
        config,
        admin,
        front,
        master,
        fdk_stop,
        servers,
    };
    wait_for(Duration::from_secs(10), || async {
        serving(&env.admin).await.is_some()
    })
    .await;
    env
}

async fn status(admin: &Path) -> Option<api::StatusReply> {
    let ch = common::grpc::connect_unix(admin).await.ok()?;
    let mut c = api::admin_client::AdminClient::new(ch);
    c.status(api::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// (generation, pid, restarts) of the serving generation.
async fn serving(admin: &Path) -> Option<(u64, u32, u32)> {
    let s = status(admin).await?;
    s.generations
        .iter()
        .filter(|g| g.state == api::GenerationState::Serving as i32)
        .max_by_key(|g| g.generation)
        .and_then(|g| g.worker.as_ref().map(|w| (g.generation, w.pid, w.restarts)))
}

async fn reload(admin: &Path) -> Result<api::ReloadResult, tonic::Status> {
    let ch = common::grpc::connect_unix(admin)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = api::admin_client::AdminClient::new(ch);
    c.reload(api::ReloadRequest {})
        .await
        .map(|r| r.into_inner().result.unwrap_or_default())
}

async fn wait_for<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` still holds a listening TCP socket, i.e. has not closed its listener copies
/// on drain (a worker drains when it handles the master's message, a moment after the next
/// generation is reported serving).
fn listens(pid: u32) -> bool {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(&*l.to_string_lossy()))
            })
        })
        .unwrap_or(false)
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_a_new_generation_and_drains_the_old_one() {
    let e = env("drain_timeout = \"10s\"").await;
    let (g1, pid1, _) = serving(&e.admin).await.expect("serving");
    let mut c = Client::connect(e.front).await.expect("connect");
    let r = c.send(&get("/"), false).await.expect("reply");
    assert_eq!(r.status, 200);
    assert!(!r.closes());

    let res = reload(&e.admin).await.expect("reload ok");
    assert!(res.ok);
    assert_eq!(res.generation, g1 + 1);
    let (g2, pid2, _) = serving(&e.admin).await.expect("serving");
    assert_eq!(g2, g1 + 1);
    assert_ne!(pid1, pid2);
    let st = status(&e.admin).await.expect("status");
    let old = st
        .generations
        .iter()
        .find(|g| g.generation == g1)
        .expect("old generation listed");
    assert_eq!(old.state, api::GenerationState::Draining as i32);
    let new = st
        .generations
        .iter()
        .find(|g| g.generation == g2)
        .expect("new");
    assert_eq!(
        old.listener_inodes, new.listener_inodes,
        "same kernel socket"
    );

    // The idle keep-alive connection of the old worker is still open; its next request is
    // answered, with Connection: close, and only then is it closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c
        .send(&get("/"), false)
        .await
        .expect("old connection still served");
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert!(c.closed().await);
    // With no connection left the old worker exits long before its drain deadline.
    wait_for(Duration::from_secs(5), || async { !alive(pid1) }).await;
    wait_for(Duration::from_secs(5), || async {
        status(&e.admin)
            .await
            .is_some_and(|s| s.generations.len() == 1)
    })
    .await;
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);

    // `proxyd reload` finds the admin socket in the config.
    let out = Command::new(PROXYD)
        .args(["reload", "--config"])
        .arg(&e.config)
        .output()
        .expect("proxyd reload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("generation {}", g2 + 1)));

    // SIGUSR2 reloads too.
    kill("-USR2", e.master.id());
    wait_for(Duration::from_secs(10), || async {
        serving(&e.admin).await.is_some_and(|(g, _, _)| g == g2 + 2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_config_is_refused_and_the_old_generation_keeps_serving() {
    let e = env("").await;
    let (g1, pid1, _) = serving(&e.admin).await.expect("serving");
    let good = std::fs::read_to_string(&e.config).expect("read");
    std::fs::write(
        &e.config,
        good.replace("default_backend = \"app\"", "default_backend = \"nope\""),
    )
    .expect("write");
    let err = reload(&e.admin).await.expect_err("must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let want = format!("{}:9:", e.config.display());
    assert!(
        err.message().starts_with(&want),
        "{} (want {want})",
        err.message()
    );
    assert!(err.message().contains("nope"));

    // The file parses; validation refuses it: a configuration error, 64 as for `check`.
    let out = proxyd_reload(&e.config);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&want));

    assert_eq!(serving(&e.admin).await, Some((g1, pid1, 0)));
    let st = status(&e.admin).await.expect("status");
    let last = st.last_reload.expect("last reload recorded");
    assert!(!last.ok && last.message.contains("nope"));
    assert_eq!(st.reloads_failed, 2);
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);

    // A second frontend on the serving socket, spelled with a leading zero: the master refuses
    // it (fdkeeper would lend the one socket to both frontends), naming both lines.
    let padded = format!("{}:0{}", e.front.ip(), e.front.port());
    std::fs::write(
        &e.config,
        good.replace(
            "[[backend]]",
            &format!("[[frontend]]\nname = \"api\"\nbind = [\"{padded}\"]\ndefault_backend = \"app\"\n\n[[backend]]"),
        ),
    )
    .expect("write");
    let out = proxyd_reload(&e.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:13:9: bind '{padded}' of frontend 'api' is the same socket as '{}' of frontend 'www' at {}:8:9", e.config.display(), e.front, e.config.display())),
        "{stderr}"
    );
    assert_eq!(serving(&e.admin).await, Some((g1, pid1, 0)));
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);

    // A worker that cannot start (its backend list is fine, its listener is not lendable)
    // fails the reload and leaves the running generation alone.
    std::fs::write(&e.config, good.replace(&e.front.to_string(), "10.9.9.9:80")).expect("write");
    let err = reload(&e.admin).await.expect_err("worker cannot borrow");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("borrow"), "{}", err.message());
    assert_eq!(serving(&e.admin).await, Some((g1, pid1, 0)));
    // A valid config whose worker fails is no configuration error: 1.
    let out = proxyd_reload(&e.config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(serving(&e.admin).await, Some((g1, pid1, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_settings_only_a_restart_applies() {
    let metrics = free_addr();
    let e = env_with(&format!("metrics = \"{metrics}\""), |dir| {
        Stdio::from(std::fs::File::create(dir.join("master.log")).expect("log"))
    })
    .await;
    let (g1, _, _) = serving(&e.admin).await.expect("serving");
    let good = std::fs::read_to_string(&e.config).expect("read");
    let moved = e.dir.path().join("proxyd/moved.sock");
    let other = free_addr();
    std::fs::write(
        &e.config,
        good.replace(&e.admin.display().to_string(), &moved.display().to_string())
            .replace(&metrics.to_string(), &other.to_string()),
    )
    .expect("write");

    // The operator's command, pointed at the running master's socket (the config names another).
    let out = Command::new(PROXYD)
        .args(["reload", "--config"])
        .arg(&e.config)
        .arg("--admin-socket")
        .arg(&e.admin)
        .output()
        .expect("proxyd reload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = [
        format!(
            "not applied until proxyd restarts: admin_socket (running {}, configured {})",
            e.admin.display(),
            moved.display()
        ),
        format!(
            "not applied until proxyd restarts: metrics (running {metrics}, configured {other})"
        ),
    ];
    for w in &want {
        assert!(stdout.contains(w.as_str()), "{stdout}\nwant: {w}");
    }

    // The gRPC answer, again: compared with what the master started with, not the last reload.
    let res = reload(&e.admin).await.expect("reload ok");
    assert_eq!(res.generation, g1 + 2);
    let got: Vec<(String, String, String)> = res
        .restart_only
        .iter()
        .map(|r| (r.setting.clone(), r.running.clone(), r.configured.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "admin_socket".to_owned(),
                e.admin.display().to_string(),
                moved.display().to_string()
            ),
            ("metrics".to_owned(), metrics.to_string(), other.to_string()),
        ]
    );
    let last = status(&e.admin)
        .await
        .expect("status")
        .last_reload
        .expect("last");
    assert_eq!(last.restart_only.len(), 2);
    assert!(!moved.exists(), "the master bound the new admin socket");
    assert!(
        std::net::TcpStream::connect(metrics).is_ok(),
        "the master no longer serves metrics where it started"
    );

    // The log names each setting with both values.
    let log = std::fs::read_to_string(e.dir.path().join("master.log")).expect("log");
    let line = log
        .lines()
        .find(|l| {
            l.contains("only a restart of the master applies it") && l.contains("setting=metrics")
        })
        .unwrap_or_else(|| panic!("no warning about metrics in:\n{log}"));
    assert!(
        line.contains(&format!("running={metrics}"))
            && line.contains(&format!("configured={other}")),
        "{line}"
    );
    assert!(log.contains("setting=admin_socket"), "{log}");

    // Back to the start's values: nothing waits for a restart any more.
    std::fs::write(&e.config, &good).expect("write");
    let res = reload(&e.admin).await.expect("reload ok");
    assert!(res.restart_only.is_empty(), "{:?}", res.restart_only);
    let out = proxyd_reload(&e.config);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not applied"));
}

/// `proxyd reload --config FILE`, run to its end.
fn proxyd_reload(config: &Path) -> std::process::Output {
    Command::new(PROXYD)
        .args(["reload", "--config"])
        .arg(config)
        .output()
        .expect("proxyd reload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_respawned_and_no_connection_is_refused() {
    let e = env("").await;
    let refused = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (refused, other, done, stop, front) = (
            refused.clone(),
            other.clone(),
            done.clone(),
            stop.clone(),
            e.front,
        );
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match Client::connect(front).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(mut c) => match c.send(&get("/"), false).await {
                        Ok(r) if r.status == 200 => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
        }));
    }
    let mut respawn_ms = Vec::new();
    for round in 1..=3u32 {
        let (g, pid, _) = serving(&e.admin).await.expect("serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        kill("-9", pid);
        wait_for(Duration::from_secs(2), || async {
            serving(&e.admin)
                .await
                .is_some_and(|(g2, p2, restarts)| g2 == g && p2 != pid && restarts == round)
        })
        .await;
        respawn_ms.push(t0.elapsed().as_millis());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    for l in load {
        l.await.expect("load task");
    }
    eprintln!(
        "respawn (kill to new pid in status) ms: {respawn_ms:?}; requests ok {}, other failures {}",
        done.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed)
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "no connection may be refused"
    );
    assert!(done.load(Ordering::Relaxed) > 50);
    // Only requests in flight on a killed worker may fail: at most one per client per kill.
    assert!(other.load(Ordering::Relaxed) <= 4 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_stops_everything() {
    let mut e = env("drain_timeout = \"5s\"").await;
    let (_, pid, _) = serving(&e.admin).await.expect("serving");
    kill("-TERM", e.master.id());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = e.master.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "master did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(!alive(pid));
    assert!(!e.admin.exists(), "admin socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_exit_when_the_master_dies() {
    let mut e = env("drain_timeout = \"5s\"").await;
    let (_, pid, _) = serving(&e.admin).await.expect("serving");
    kill("-9", e.master.id());
    let _ = e.master.wait();
    wait_for(Duration::from_secs(5), || async { !alive(pid) }).await;
    let _ = &e.servers;
    let _ = e.dir.path();
}

#[test]
fn check_reports_file_line_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    let text = config_text(dir.path(), "127.0.0.1:8080", &[free_addr()], "");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(PROXYD)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cases = [
        (
            text.replace("name = \"www\"", "name = \"www\"\nbogus = 1"),
            8,
            "bogus",
        ),
        (
            text.replace("127.0.0.1:8080", "localhost:8080"),
            8,
            "bad bind address",
        ),
        (
            format!(
                "{text}[[backend]]\nname = \"app\"\n[[backend.server]]\nname = \"x\"\naddress = \"127.0.0.1:1\"\n"
            ),
            17,
            "duplicate backend",
        ),
        (text.replace("fdkeeper_socket", "#"), 1, "fdkeeper_socket"),
        (
            text.replace(
                "[[backend]]",
                "[[frontend]]\nname = \"api\"\nbind = [\"0.0.0.0:08080\"]\ndefault_backend = \"app\"\n[[backend]]",
            ),
            13,
            "bind '0.0.0.0:08080' of frontend 'api' overlaps '127.0.0.1:8080' of frontend 'www' at ",
        ),
    ];
    for (bad, line, why) in cases {
        std::fs::write(&path, &bad).expect("write");
        let out = Command::new(PROXYD)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(
            err.starts_with(&format!("{}:{line}:", path.display())),
            "line {line}: {err}"
        );
        assert!(err.contains(why), "{err}");
    }
    let out = Command::new(PROXYD)
        .args(["check", "--config", "/nonexistent/p.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_are_serialized() {
    // Also runs the workers on a multi-thread runtime.
    let e = env("threads = 2").await;
    let (g1, _, _) = serving(&e.admin).await.expect("serving");
    let mut calls = Vec::new();
    for _ in 0..5 {
        let admin = e.admin.clone();
        calls.push(tokio::spawn(async move { reload(&admin).await }));
    }
    let mut gens = Vec::new();
    for c in calls {
        let r = c.await.expect("task").expect("reload ok");
        assert!(r.ok);
        gens.push(r.generation);
    }
    gens.sort_unstable();
    assert_eq!(
        gens,
        (g1 + 1..=g1 + 5).collect::<Vec<_>>(),
        "each reload got its own generation"
    );
    assert_eq!(serving(&e.admin).await.map(|s| s.0), Some(g1 + 5));
    let st = status(&e.admin).await.expect("status");
    assert_eq!(
        st.generations
            .iter()
            .filter(|g| g.state == api::GenerationState::Serving as i32)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oldest_draining_generation_is_stopped_beyond_max_draining() {
    let e = env("drain_timeout = \"30s\"\nmax_draining = 1").await;
    let (_, pid1, _) = serving(&e.admin).await.expect("serving");
    // An idle keep-alive connection keeps a draining worker alive until its deadline.
    let mut c1 = Client::connect(e.front).await.expect("connect");
    c1.send(&get("/"), false).await.expect("reply");
    reload(&e.admin).await.expect("reload");
    let (_, pid2, _) = serving(&e.admin).await.expect("serving");
    // c2 must reach generation 2, not the last accepts of generation 1.
    wait_for(Duration::from_secs(5), || async { !listens(pid1) }).await;
    let mut c2 = Client::connect(e.front).await.expect("connect");
    c2.send(&get("/"), false).await.expect("reply");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid1), "gen 1 drains while its client is idle");
    reload(&e.admin).await.expect("reload");
    // Two draining now, one allowed: the oldest is stopped, the other keeps draining.
    wait_for(Duration::from_secs(5), || async { !alive(pid1) }).await;
    assert!(c1.closed().await);
    assert!(alive(pid2));
    let r = c2
        .send(&get("/"), false)
        .await
        .expect("gen 2 still answers its client");
    assert!(r.closes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fdk_stop = start_fdkeeper(dir.path());
    let b = backend(|_| ok("one")).await;
    let front = free_addr();
    let config = dir.path().join("proxyd.toml");
    std::fs::write(
        &config,
        config_text(dir.path(), &front.to_string(), &[b.addr], ""),
    )
    .expect("write");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut master = Command::new(PROXYD)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");
    let next = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=generation 1, pid"),
        "{ready}"
    );
    let admin = dir.path().join("proxyd/admin.sock");
    reload(&admin).await.expect("reload");
    let reloading = next();
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = next();
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=generation 2"),
        "{ready}"
    );
    kill("-TERM", master.id());
    let stopping = next();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(master.wait().expect("wait").success());
    fdk_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_not_ready_in_time_fails_the_reload_and_is_killed() {
    let e = env("").await;
    let before = serving(&e.admin).await.expect("serving");
    let good = std::fs::read_to_string(&e.config).expect("read");
    // The new worker waits for an fdkeeper that never comes.
    let stuck = good
        .replace("/fdk/lend.sock", "/nowhere/lend.sock")
        .replace("[global]\n", "[global]\nworker_ready_timeout = \"300ms\"\n");
    std::fs::write(&e.config, stuck).expect("write");
    let t0 = Instant::now();
    let err = reload(&e.admin).await.expect_err("not ready in time");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(
        err.message().contains("not ready within 300ms"),
        "{}",
        err.message()
    );
    wait_for(Duration::from_secs(3), || async {
        status(&e.admin)
            .await
            .is_some_and(|s| s.generations.len() == 1)
    })
    .await;
    assert_eq!(serving(&e.admin).await, Some(before));
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_connections_and_requests() {
    let e = env("").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(e.front).await.expect("connect");
        c.send(&get("/"), false).await.expect("reply");
        c.send(&get("/"), false).await.expect("reply");
        clients.push(c);
    }
    wait_for(Duration::from_secs(3), || async {
        status(&e.admin).await.is_some_and(|s| {
            s.generations.iter().any(|g| {
                g.worker.as_ref().is_some_and(|w| {
                    w.active_connections == 3 && w.requests_total == 6 && w.requests_in_flight == 0
                })
            })
        })
    })
    .await;
    let out = Command::new(PROXYD)
        .args(["status", "--config"])
        .arg(&e.config)
        .output()
        .expect("proxyd status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("generation 1 SERVING") && text.contains("connections 3 requests 6"),
        "{text}"
    );
}

/// The names of a process's threads, from /proc.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// How many times thread `name` of `pid` went to sleep, from /proc: a serving thread sleeps
/// between the requests of its connections, an idle one not at all.
fn sleeps(pid: u32, name: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for t in tasks.flatten() {
        if std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.trim() == name) {
            let status = std::fs::read_to_string(t.path().join("status")).expect("status");
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("voluntary_ctxt_switches");
        }
    }
    panic!("no thread {name} in {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_threads_serve_count_once_and_drain() {
    let e = env("threads = 2\ndrain_timeout = \"10s\"").await;
    let (g1, pid1, _) = serving(&e.admin).await.expect("serving");
    // The worker's second serving thread runs beside its main one.
    assert!(
        thread_names(pid1).iter().any(|n| n == "serve-1"),
        "{:?}",
        thread_names(pid1)
    );
    // Connections opened at once, as a client opening its pool does: they are spread over
    // both threads, and each request is counted once in the sums the worker reports.
    let slept = sleeps(pid1, "serve-1");
    const CONNS: usize = 16;
    const REQUESTS: usize = 5;
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let front = e.front;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(front).await.expect("connect");
            for _ in 0..REQUESTS {
                let r = c.send(&get("/"), false).await.expect("reply");
                assert_eq!(r.status, 200);
                assert!(!r.closes());
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client"));
    }
    assert!(
        sleeps(pid1, "serve-1") >= slept + REQUESTS as u64,
        "the second thread served no connection"
    );
    let total = (CONNS * REQUESTS) as u64;
    wait_for(Duration::from_secs(3), || async {
        status(&e.admin).await.is_some_and(|s| {
            s.generations.iter().any(|g| {
                g.worker.as_ref().is_some_and(|w| {
                    w.active_connections == CONNS as u64
                        && w.requests_total == total
                        && w.requests_in_flight == 0
                })
            })
        })
    })
    .await;
    // A reload drains both threads: every keep-alive connection's next request is answered
    // with Connection: close, and the old worker exits once they are all closed.
    let res = reload(&e.admin).await.expect("reload ok");
    assert!(res.ok);
    assert_eq!(res.generation, g1 + 1);
    for c in &mut clients {
        let r = c
            .send(&get("/"), false)
            .await
            .expect("old connection served");
        assert_eq!(r.status, 200);
        assert!(r.closes());
        assert!(c.closed().await);
    }
    wait_for(Duration::from_secs(5), || async { !alive(pid1) }).await;
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_and_set_server_speak_to_the_running_master() {
    let e = env("").await;
    let run = |args: &[&str]| {
        let out = Command::new(PROXYD)
            .args(args)
            .arg("--config")
            .arg(&e.config)
            .output()
            .expect("run proxyd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["servers"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("# generation "), "{out}");
    assert!(
        lines[1].starts_with("# be_name srv_name srv_addr health admin_state weight"),
        "{out}"
    );
    assert!(lines[2].contains(" ready "), "{out}");
    let (backend, server) = {
        let mut f = lines[2].split(' ');
        (
            f.next().unwrap_or("").to_owned(),
            f.next().unwrap_or("").to_owned(),
        )
    };
    let (code, out, err) = run(&[
        "set-server",
        &backend,
        &server,
        "--state",
        "maint",
        "--weight",
        "7",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("{backend} {server} ")) && out.contains(" maint 7 "),
        "{out}"
    );
    let (_, out, _) = run(&["servers", "--backend", &backend]);
    assert!(out.contains(" maint 7 "), "{out}");
    // An unknown server is the operator's mistake: 64, with the reason.
    let (code, _, err) = run(&["set-server", &backend, "nope", "--state", "ready"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("nope"), "{err}");
}
