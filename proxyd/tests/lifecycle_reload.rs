//! Reloads of the real proxyd binary (master + workers, an in-process fdkeeper): a new
//! generation while the old one drains, a broken config or a worker that cannot start refused,
//! the settings only a restart applies, concurrent reloads, and the cap on draining generations.

mod util;

use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::proxyd::v1 as api;
use util::master::{
    alive, env, env_with, free_addr, kill, listens, reload, serving, status, wait_alone, wait_for,
};
use util::{Client, cli, get};

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
    wait_alone(&e.admin, Duration::from_secs(5)).await;
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);

    // `proxyd reload` finds the admin socket in the config.
    let out = cli(&["reload"], &e.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("generation {}", g2 + 1)));

    // SIGUSR2 reloads too.
    kill("-USR2", e.running.master.id());
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
    let out = cli(&["reload"], &e.config);
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
    let out = cli(&["reload"], &e.config);
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
    let out = cli(&["reload"], &e.config);
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
    let admin = e.admin.display().to_string();
    let out = cli(&["reload", "--admin-socket", &admin], &e.config);
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
    let out = cli(&["reload"], &e.config);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not applied"));
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
    wait_alone(&e.admin, Duration::from_secs(3)).await;
    assert_eq!(serving(&e.admin).await, Some(before));
    let mut c = Client::connect(e.front).await.expect("connect");
    assert_eq!(c.send(&get("/"), false).await.expect("reply").status, 200);
}
