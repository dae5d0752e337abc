//! Backend features through the real proxyd binary (master + workers, an in-process fdkeeper):
//! cookie-insert persistence across reloads and a server going down, uri and hdr hashing kept
//! across generations, and a server named by DNS that moves without a reload (a nameserver on
//! loopback whose answer the test changes).

mod util;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::test_nameserver::nameserver;
use proto::proxyd::v1 as api;
use util::master::{Env, admin, reload, start, wait_alone};
use util::{Action, Client, Reply, Seen, backend, backend_at, cli, config_text_with, ok};

/// Starts proxyd on the config `text` gives for its temp dir and frontend address.
async fn launch(text: impl FnOnce(&Path, SocketAddr) -> String) -> Env {
    start(text, |_| Stdio::inherit()).await
}

/// Rewrites the config and reloads; once the new generation serves, waits for the old one to
/// be gone, so that no later connection reaches it. A refused config is the error.
async fn reload_with(e: &Env, text: &str) -> Result<(), String> {
    std::fs::write(&e.config, text).expect("write config");
    let r = reload(&e.admin).await.map_err(|e| e.message().to_owned())?;
    if !r.ok {
        return Err(r.message);
    }
    wait_alone(&e.admin, Duration::from_secs(10)).await;
    Ok(())
}

/// A reload onto the same config.
async fn reload_again(e: &Env) {
    let text = std::fs::read_to_string(&e.config).expect("config");
    reload_with(e, &text).await.expect("reload");
}

/// `GET path` with more `fields` (each ending in CRLF) on a new connection.
async fn get(e: &Env, path: &str, fields: &str) -> Reply {
    let mut c = Client::connect(e.front).await.expect("connect");
    let raw = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{fields}\r\n");
    c.send(raw.as_bytes(), false).await.expect("reply")
}

/// A backend named `name` that answers `name|<the Cookie field it got, or ->`, and its health
/// check with 200 while `up` holds, else 503.
async fn named(name: &'static str, up: Arc<AtomicBool>) -> util::Backend {
    backend(move |s: &Seen| {
        if s.head.starts_with("GET /health") {
            return if up.load(Ordering::SeqCst) {
                ok("up")
            } else {
                Action::Respond(b"HTTP/1.1 503 Down\r\nContent-Length: 0\r\n\r\n".to_vec())
            };
        }
        let cookie = s
            .head
            .lines()
            .find_map(|l| l.strip_prefix("Cookie: "))
            .unwrap_or("-");
        ok(&format!("{name}|{cookie}"))
    })
    .await
}

/// The server that answered (the body up to '|').
fn server_of(r: &Reply) -> String {
    r.text().split('|').next().unwrap_or_default().to_owned()
}

/// The value the response sets for SRV, with its attributes.
fn set_srv(r: &Reply) -> Option<String> {
    r.head
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: SRV="))
        .map(str::to_owned)
}

#[tokio::test]
async fn cookie_insert_keeps_each_client_on_its_server_across_reloads_and_moves_it_when_down() {
    let up: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let mut addrs = Vec::new();
    for (i, name) in ["s0", "s1", "s2"].into_iter().enumerate() {
        addrs.push(named(name, up[i].clone()).await.addr);
    }
    let m = launch(|dir, front| {
        config_text_with(
            dir,
            &front.to_string(),
            "",
            "cookie = { name = \"SRV\", indirect = true, nocache = true, httponly = true }\n\
             check = { type = \"http\", path = \"/health\", inter = \"50ms\", rise = 1, fall = 1 }",
            &[
                ("s0", addrs[0].to_string(), "check = true"),
                ("s1", addrs[1].to_string(), "check = true"),
                ("s2", addrs[2].to_string(), "check = true"),
            ],
        )
    })
    .await;

    // Six new clients: each response sets SRV naming the server that answered, uncacheable.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let r = get(&m, "/", "").await;
        assert_eq!(r.status, 200);
        let server = server_of(&r);
        assert_eq!(
            set_srv(&r).as_deref(),
            Some(format!("{server}; Path=/; HttpOnly").as_str()),
            "{}",
            r.head
        );
        assert!(r.head.contains("Cache-Control: private"), "{}", r.head);
        clients.push(server);
    }
    let mut distinct = clients.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        ["s0", "s1", "s2"],
        "round robin spreads new clients"
    );

    // With its cookie a client stays; the server never sees SRV (indirect), the other cookie
    // goes through, and a client whose cookie is right gets no Set-Cookie.
    let keeps = async |m: &Env| {
        for server in &clients {
            for _ in 0..3 {
                let r = get(m, "/", &format!("Cookie: a=1; SRV={server}\r\n")).await;
                assert_eq!(r.text(), format!("{server}|a=1"));
                assert_eq!(set_srv(&r), None, "{}", r.head);
                assert!(!r.head.contains("Cache-Control"), "{}", r.head);
            }
        }
    };
    keeps(&m).await;
    for _ in 0..2 {
        reload_again(&m).await;
        keeps(&m).await;
    }

    // The first client's server goes down: its next request goes elsewhere and the response
    // names the new server, which the client then keeps.
    let gone = clients[0].clone();
    let i: usize = gone[1..].parse().expect("index");
    up[i].store(false, Ordering::SeqCst);
    let t0 = Instant::now();
    let moved = loop {
        let r = get(&m, "/", &format!("Cookie: SRV={gone}\r\n")).await;
        assert_eq!(r.status, 200, "{}", r.head);
        if server_of(&r) != gone {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{gone} was not taken out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new = server_of(&moved);
    assert_eq!(
        set_srv(&moved).as_deref(),
        Some(format!("{new}; Path=/; HttpOnly").as_str())
    );
    for _ in 0..3 {
        let r = get(&m, "/", &format!("Cookie: SRV={new}\r\n")).await;
        assert_eq!(r.text(), format!("{new}|-"));
        assert_eq!(set_srv(&r), None);
    }
    // A cookie naming no server of the backend is balanced and set anew.
    let r = get(&m, "/", "Cookie: SRV=elsewhere\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        set_srv(&r).map(|v| v.split(';').next().unwrap_or_default().to_owned()),
        Some(server_of(&r))
    );
}

#[tokio::test]
async fn uri_and_hdr_hashes_keep_each_key_on_one_server_across_generations() {
    let mut addrs = Vec::new();
    for name in ["s0", "s1", "s2"] {
        addrs.push(named(name, Arc::new(AtomicBool::new(true))).await.addr);
    }
    let text = |dir: &Path, front: SocketAddr, balance: &str| {
        config_text_with(
            dir,
            &front.to_string(),
            "",
            &format!("balance = {balance}"),
            &[
                ("s0", addrs[0].to_string(), ""),
                ("s1", addrs[1].to_string(), ""),
                ("s2", addrs[2].to_string(), ""),
            ],
        )
    };
    let m = launch(|d, f| text(d, f, "\"uri\"")).await;
    let (dir, front) = (m.dir.path().to_owned(), m.front);

    // Every path on one server, whatever its query; the paths spread over the servers.
    let by_path = async |m: &Env| {
        let mut map = Vec::new();
        for i in 0..24 {
            let first = server_of(&get(m, &format!("/item/{i}"), "").await);
            for q in 0..2 {
                let again = get(m, &format!("/item/{i}?q={q}"), "").await;
                assert_eq!(server_of(&again), first, "/item/{i}");
            }
            map.push(first);
        }
        map
    };
    let before = by_path(&m).await;
    let mut used = before.clone();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 3, "{before:?}");
    reload_again(&m).await;
    assert_eq!(
        by_path(&m).await,
        before,
        "a new generation maps paths alike"
    );

    // depth = 1: only the first directory counts.
    reload_with(&m, &text(&dir, front, "{ type = \"uri\", depth = 1 }"))
        .await
        .expect("reload");
    for dirname in ["a", "b", "c", "d"] {
        let first = server_of(&get(&m, &format!("/{dirname}/x"), "").await);
        for leaf in ["y", "z/w"] {
            let again = get(&m, &format!("/{dirname}/{leaf}"), "").await;
            assert_eq!(server_of(&again), first, "/{dirname}/{leaf}");
        }
    }

    // hdr(X-User): each user on one server; without the field, round robin.
    reload_with(&m, &text(&dir, front, "\"hdr(X-User)\""))
        .await
        .expect("reload");
    let mut users = Vec::new();
    for u in 0..24 {
        let first = server_of(&get(&m, "/", &format!("X-User: user{u}\r\n")).await);
        for path in ["/a", "/b?c"] {
            let again = get(&m, path, &format!("X-User: user{u}\r\n")).await;
            assert_eq!(server_of(&again), first, "user{u}");
        }
        users.push(first);
    }
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 3);
    let mut rr = Vec::new();
    for _ in 0..3 {
        rr.push(server_of(&get(&m, "/", "").await));
    }
    rr.sort();
    assert_eq!(rr, ["s0", "s1", "s2"], "no field: round robin");
}

#[tokio::test]
async fn a_server_named_by_dns_moves_to_its_new_address_without_a_reload_or_a_failed_request() {
    let old_ip = Ipv4Addr::new(127, 0, 0, 2);
    let new_ip = Ipv4Addr::new(127, 0, 0, 3);
    let old = backend_at(SocketAddr::new(old_ip.into(), 0), |_| ok("old")).await;
    let port = old.addr.port();
    let _new = backend_at(SocketAddr::new(new_ip.into(), port), |_| ok("new")).await;
    let dns = nameserver("app.test.", old_ip).await.expect("nameserver");
    let text = |dir: &Path, front: SocketAddr, host: &str| {
        config_text_with(
            dir,
            &front.to_string(),
            &format!(
                "[[resolvers]]\nname = \"dns\"\nnameservers = [\"{}\"]\ntimeout = \"200ms\"",
                dns.addr
            ),
            "resolvers = \"dns\"\nresolve_interval = \"200ms\"",
            &[("app", format!("{host}:{port}"), "")],
        )
    };

    // `proxyd check` resolves too: a name without an address is refused at its line.
    let scratch = tempfile::tempdir().expect("tempdir");
    let bad = text(scratch.path(), util::closed_port(), "nope.test");
    let path = scratch.path().join("proxyd.toml");
    std::fs::write(&path, &bad).expect("write");
    let out = cli(&["check"], &path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = bad
        .lines()
        .position(|l| l.contains("nope.test"))
        .map_or(0, |i| i + 1);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "proxyd.toml:{line}:11: cannot resolve server name 'nope.test'"
        )),
        "{stderr}"
    );

    let m = launch(|d, f| text(d, f, "app.test")).await;
    assert_eq!(get(&m, "/", "").await.text(), "old");

    // Clients on keep-alive connections go on sending while the name moves: every request is
    // answered, and the answers come from the new address within a few resolve intervals.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failed, front) = (stop.clone(), failed.clone(), m.front);
        load.push(tokio::spawn(async move {
            let mut answers: Vec<String> = Vec::new();
            let mut c = Client::connect(front).await.expect("connect");
            let t0 = Instant::now();
            // Bounded in count and time whatever happens.
            while !stop.load(Ordering::SeqCst)
                && answers.len() < 20_000
                && t0.elapsed() < Duration::from_secs(20)
            {
                match c.send(&util::get("/"), false).await {
                    Ok(r) if r.status == 200 => answers.push(r.text()),
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        c = Client::connect(front).await.expect("reconnect");
                    }
                }
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queries_before = dns.queries.load(Ordering::SeqCst);
    *dns.answer.lock().unwrap_or_else(|p| p.into_inner()) = new_ip;
    let moved_at = Instant::now();
    let took = loop {
        if get(&m, "/", "").await.text() == "new" {
            break moved_at.elapsed();
        }
        assert!(
            moved_at.elapsed() < Duration::from_secs(5),
            "the server did not move"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for l in load {
        let answers = l.await.expect("load task");
        total += answers.len();
        // Once a connection sees the new address it never goes back.
        let first_new = answers.iter().position(|a| a == "new").expect("moved");
        assert!(answers[first_new..].iter().all(|a| a == "new"));
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "of {total} requests");
    assert!(dns.queries.load(Ordering::SeqCst) > queries_before);
    // 200ms rounds: well within a second on an idle machine; 3s leaves room for a loaded one.
    assert!(took < Duration::from_secs(3), "moved after {took:?}");
    let servers = admin(&m.admin)
        .await
        .expect("admin")
        .show_servers(api::ShowServersRequest::default())
        .await
        .expect("servers")
        .into_inner()
        .servers;
    let s = &servers[0];
    assert_eq!(s.address, format!("{new_ip}:{port}"));
    println!("moved after {took:?}; {total} requests, none failed");

    // A reload onto a name that does not resolve is refused, and the running one serves on.
    let refused = reload_with(&m, &text(m.dir.path(), m.front, "nope.test"))
        .await
        .expect_err("refused");
    assert!(
        refused.contains(&format!(":{line}:11: cannot resolve server name 'nope.test' through resolvers 'dns': no such name")),
        "{refused}"
    );
    assert_eq!(get(&m, "/", "").await.text(), "new");
}
