//! The real proxyd binary's processes (master + workers, an in-process fdkeeper): respawn after
//! kill -9, stop on SIGTERM, workers gone with their master, sd_notify, and a worker's two
//! serving threads.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use util::master::{
    Running, alive, command, env, free_addr, kill, reload, serving, status, wait_for,
};
use util::{Client, backend, config_text, get, ok};

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
    kill("-TERM", e.running.master.id());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = e.running.master.try_wait().expect("wait") {
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
    kill("-9", e.running.master.id());
    let _ = e.running.master.wait();
    wait_for(Duration::from_secs(5), || async { !alive(pid) }).await;
    let _ = &e.servers;
    let _ = e.dir.path();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
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
    let mut running = Running::start(
        dir.path(),
        command(&config).env("NOTIFY_SOCKET", &notify_path),
    );
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
    kill("-TERM", running.master.id());
    let stopping = next();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(running.master.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_threads_serve_count_once_and_drain() {
    let e = env("threads = 2\ndrain_timeout = \"10s\"").await;
    let (g1, pid1, _) = serving(&e.admin).await.expect("serving");
    // Connections opened at once, as a client opening its pool does: they are spread over
    // both threads, and each request is counted once in the sums the worker reports.
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
    // All 16 are open (idle, maybe parked): each stays counted on the thread it was given,
    // and a connection goes to the thread holding fewer, so both hold some.
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
    let st = status(&e.admin).await.expect("status");
    let w = st
        .generations
        .iter()
        .find(|g| g.generation == g1)
        .and_then(|g| g.worker.as_ref())
        .expect("the serving worker");
    assert_eq!(w.thread_connections.len(), 2, "{w:?}");
    assert!(
        w.thread_connections.iter().all(|&n| n >= 1),
        "a thread serves none of the connections: {w:?}"
    );
    assert_eq!(
        w.thread_connections.iter().sum::<u64>(),
        CONNS as u64,
        "{w:?}"
    );
    // A reload drains both threads: every keep-alive connection is answered until a response
    // says Connection: close (the first one after the worker heard of the drain, which the
    // master sends as it answers the reload), and the old worker exits once they are all
    // closed.
    let res = reload(&e.admin).await.expect("reload ok");
    assert!(res.ok);
    assert_eq!(res.generation, g1 + 1);
    for c in &mut clients {
        let mut answered = 0;
        loop {
            let r = c
                .send(&get("/"), false)
                .await
                .expect("old connection served");
            assert_eq!(r.status, 200);
            if r.closes() {
                break;
            }
            answered += 1;
            assert!(answered < 100, "no Connection: close after the drain");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(c.closed().await);
    }
    wait_for(Duration::from_secs(5), || async { !alive(pid1) }).await;
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);
}
