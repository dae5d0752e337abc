//! Three real stickd processes on 127.0.0.1-3: replication, resync, convergence, operator commands.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use proto::stick::v1 as pb;
use support::{Cluster, TABLES};

const CONVERGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_stores_spread_over_three_nodes_show_the_same_everywhere() {
    let c = Cluster::start(3, |_| TABLES.to_owned());
    c.connected().await;
    for i in 0..15 {
        let node = &c.nodes[i % 3];
        let key = format!("session{i:02}");
        let server = format!("app{}", i % 2 + 1);
        node.store("web", &[(&key, &server)]).await;
    }
    let (table, took) = c.converge("web", CONVERGE).await;
    println!("15 keys agreed on 3 nodes {took:?} after the last store");
    assert_eq!(table.len(), 15);
    assert_eq!(table["session03"], "app2");
    // Origins are kept: the entry written on node2 says so on node3.
    let show = c.nodes[2]
        .grpcurl(
            "stick.v1.Stick/Show",
            r#"{"table":"web","key":"session01"}"#,
        )
        .unwrap();
    assert_eq!(show["entries"][0]["origin"], "node2");
    assert_eq!(show["table"]["used"], "15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_writes_catches_up_from_the_log() {
    let mut c = Cluster::start(3, |_| TABLES.to_owned());
    c.connected().await;
    c.nodes[0].store("web", &[("before", "app1")]).await;
    c.converge("web", CONVERGE).await;
    c.nodes[2].kill9();
    for batch in 0..50 {
        let node = &c.nodes[batch % 2];
        let keys: Vec<String> = (0..100).map(|i| format!("k{batch}-{i}")).collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "app2")).collect();
        node.store("web", &pairs).await;
    }
    c.nodes[2].start();
    let (table, took) = c.converge("web", CONVERGE).await;
    println!("resynced 5000 writes in {took:?}");
    assert_eq!(table.len(), 5001);
    // Incremental: nobody sent node3 a snapshot.
    for n in &c.nodes[..2] {
        let p = n.peers().await;
        let to3 = p.peers.iter().find(|p| p.name == "node3").unwrap();
        assert_eq!(to3.snapshots_sent, 0, "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_behind_a_trimmed_log_gets_a_snapshot() {
    let mut c = Cluster::start(2, |_| format!("log_keep = 1000\n{TABLES}"));
    c.connected().await;
    c.nodes[1].kill9();
    for batch in 0..30 {
        let keys: Vec<String> = (0..100).map(|i| format!("k{batch}-{i}")).collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "app1")).collect();
        c.nodes[0].store("web", &pairs).await;
    }
    // Trimming runs every 2 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.nodes[0]
            .client()
            .await
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.log_first_seq > 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log never trimmed: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[1].start();
    let (table, _) = c.converge("web", CONVERGE).await;
    assert_eq!(table.len(), 3000);
    let p = c.nodes[0].peers().await;
    assert!(p.peers[0].snapshots_sent >= 1, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_restarts_with_its_entries() {
    let mut c = Cluster::start(3, |_| TABLES.to_owned());
    c.connected().await;
    c.nodes[0].store("ips", &[("10.0.0.1", "app1")]).await;
    c.nodes[1].store("ips", &[("10.0.0.2", "app2")]).await;
    c.converge("ips", CONVERGE).await;
    // Past the durability window (flush every 500 ms), then kill -9 everyone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in &mut c.nodes {
        n.kill9();
    }
    for n in &mut c.nodes {
        n.start();
    }
    for n in &c.nodes {
        let t = n.table("ips").await;
        assert_eq!(t.len(), 2, "{} lost entries: {t:?}", n.name);
        assert_eq!(t["10.0.0.2"], "app2");
    }
    // And a clean stop exits 0.
    for n in &mut c.nodes {
        assert!(n.stop().success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_key_converge_to_one_value() {
    let c = Cluster::start(3, |_| TABLES.to_owned());
    c.connected().await;
    for round in 0..20 {
        let key = format!("hot{round}");
        let (a, b) = (c.nodes[0].client().await, c.nodes[1].client().await);
        let req = |server: &str| pb::StoreRequest {
            table: "web".into(),
            items: vec![pb::StoreItem {
                key: key.clone(),
                server: server.into(),
                expires_unix_ms: 0,
            }],
            omit_entries: false,
            watcher: 0,
            batch: 0,
        };
        let (mut a, mut b) = (a, b);
        let (ra, rb) = tokio::join!(a.store(req("appA")), b.store(req("appB")));
        ra.unwrap();
        rb.unwrap();
    }
    let (table, _) = c.converge("web", CONVERGE).await;
    assert_eq!(table.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_clear_replicate_as_tombstones() {
    let c = Cluster::start(3, |_| TABLES.to_owned());
    c.connected().await;
    c.nodes[0]
        .store("web", &[("a", "app1"), ("b", "app1"), ("c", "app2")])
        .await;
    c.converge("web", CONVERGE).await;
    let r = c.nodes[1]
        .grpcurl("stick.v1.Stick/Delete", r#"{"table":"web","key":"b"}"#)
        .unwrap();
    assert_eq!(r["existed"], true);
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "c"]);
    let tomb = c.nodes[2]
        .grpcurl(
            "stick.v1.Stick/Show",
            r#"{"table":"web","key":"b","include_deleted":true}"#,
        )
        .unwrap();
    assert_eq!(tomb["entries"][0]["deleted"], true);
    assert_eq!(tomb["entries"][0]["origin"], "node2");
    let r = c.nodes[2]
        .grpcurl("stick.v1.Stick/Clear", r#"{"table":"web"}"#)
        .unwrap();
    assert_eq!(r["removed"], "2");
    let (t, _) = c.converge("web", CONVERGE).await;
    assert!(t.is_empty());
    for n in &c.nodes {
        assert!(
            n.table("web").await.is_empty(),
            "{} still has entries",
            n.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_expiry_disappears_everywhere() {
    let c = Cluster::start(3, |_| {
        "[[tables]]\nname = \"short\"\ntype = \"integer\"\nsize = \"1k\"\nexpire = \"1s\"\n"
            .to_owned()
    });
    c.connected().await;
    c.nodes[0]
        .store("short", &[("42", "app1"), ("-7", "app2")])
        .await;
    let (t, _) = c.converge("short", CONVERGE).await;
    assert_eq!(t.len(), 2);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for n in &c.nodes {
        assert!(
            n.table("short").await.is_empty(),
            "{} kept expired entries",
            n.name
        );
        let s = n
            .client()
            .await
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.tables[0].used, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_status_naming_the_problem() {
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let n = &c.nodes[0];
    n.client().await;
    let e = n
        .grpcurl(
            "stick.v1.Stick/Set",
            r#"{"table":"nope","key":"k","server":"s"}"#,
        )
        .unwrap_err();
    assert!(
        e.contains("NotFound") && e.contains("unknown table 'nope'"),
        "{e}"
    );
    let long = "x".repeat(33);
    let e = n
        .grpcurl(
            "stick.v1.Stick/Set",
            &format!(r#"{{"table":"web","key":"{long}","server":"s"}}"#),
        )
        .unwrap_err();
    assert!(
        e.contains("InvalidArgument") && e.contains("longer than the table's len 32"),
        "{e}"
    );
    let e = n
        .grpcurl(
            "stick.v1.Stick/Set",
            r#"{"table":"ips","key":"not-an-ip","server":"s"}"#,
        )
        .unwrap_err();
    assert!(
        e.contains("InvalidArgument") && e.contains("not an IPv4 address"),
        "{e}"
    );
    let e = n
        .grpcurl(
            "stick.v1.Stick/Set",
            r#"{"table":"ips","key":"10.1.1.1","server":""}"#,
        )
        .unwrap_err();
    assert!(e.contains("server name must not be empty"), "{e}");
    // The operator surface, through the real grpcurl.
    n.grpcurl(
        "stick.v1.Stick/Set",
        r#"{"table":"ips","key":"10.1.1.1","server":"app1"}"#,
    )
    .unwrap();
    n.grpcurl(
        "stick.v1.Stick/Set",
        r#"{"table":"ips","key":"10.1.1.2","server":"app2"}"#,
    )
    .unwrap();
    let by_server = n
        .grpcurl("stick.v1.Stick/Show", r#"{"table":"ips","server":"app2"}"#)
        .unwrap();
    assert_eq!(by_server["entries"].as_array().unwrap().len(), 1);
    assert_eq!(by_server["table"]["type"], "ip");
    assert_eq!(by_server["table"]["used"], "2");
    let page = n
        .grpcurl("stick.v1.Stick/Show", r#"{"table":"ips","page_size":1}"#)
        .unwrap();
    assert_eq!(page["nextPageToken"], "10.1.1.1");
    let tables = n.grpcurl("stick.v1.Stick/ListTables", "{}").unwrap();
    assert_eq!(tables["tables"].as_array().unwrap().len(), 2);
    let stats = n.grpcurl("stick.v1.Stick/Stats", "{}").unwrap();
    assert_eq!(stats["localWrites"], "2");
    let health = n.grpcurl("grpc.health.v1.Health/Check", "{}").unwrap();
    assert_eq!(health["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_a_snapshot_then_local_and_remote_changes() {
    let c = Cluster::start(2, |_| TABLES.to_owned());
    c.connected().await;
    c.nodes[0].store("web", &[("old", "app1")]).await;
    c.converge("web", CONVERGE).await;
    let mut w = c.nodes[0]
        .client()
        .await
        .watch(pb::WatchRequest {
            tables: vec!["web".into()],
        })
        .await
        .unwrap()
        .into_inner();
    use pb::watch_event::Event;
    let mut snap = Vec::new();
    loop {
        match w.message().await.unwrap().unwrap().event.unwrap() {
            Event::Snapshot(b) => snap.extend(b.entries),
            Event::SnapshotEnd(end) => {
                assert_eq!(end.entries, 1);
                break;
            }
            other => panic!("unexpected before the end of the snapshot: {other:?}"),
        }
    }
    assert_eq!(snap[0].key, "old");
    c.nodes[0].store("web", &[("local", "app1")]).await;
    c.nodes[1].store("web", &[("remote", "app2")]).await;
    c.nodes[0].store("ips", &[("10.0.0.1", "app1")]).await;
    c.nodes[1]
        .client()
        .await
        .clear(pb::ClearRequest {
            table: "web".into(),
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .expect("a change within 5 s")
            .unwrap()
            .unwrap();
        match ev.event.unwrap() {
            Event::Changes(b) => {
                assert_eq!(b.table, "web");
                seen.extend(
                    b.entries
                        .into_iter()
                        .map(|e| format!("{}@{}", e.key, e.origin)),
                );
            }
            Event::Cleared(cl) => seen.push(format!("clear@{}", cl.origin)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["local@node1", "remote@node2", "clear@node2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_names_its_stream_is_told_where_its_stores_went_and_others_get_them() {
    use pb::watch_event::Event;
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let mut client = c.nodes[0].client().await;
    // Two watchers: each stream's id comes with the end of its snapshot.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut w = client
            .watch(pb::WatchRequest {
                tables: vec!["web".into()],
            })
            .await
            .unwrap()
            .into_inner();
        let id = loop {
            match w.message().await.unwrap().unwrap().event.unwrap() {
                Event::SnapshotEnd(end) => break end.watcher,
                Event::Snapshot(_) => {}
                other => panic!("unexpected before the end of the snapshot: {other:?}"),
            }
        };
        streams.push((w, id));
    }
    let (mine, theirs) = (streams[0].1, streams[1].1);
    assert!(
        mine != 0 && theirs != 0 && mine != theirs,
        "{mine} {theirs}"
    );
    let store = |key: &str, watcher: u64| pb::StoreRequest {
        table: "web".into(),
        items: vec![pb::StoreItem {
            key: key.into(),
            server: "app1".into(),
            expires_unix_ms: 0,
        }],
        omit_entries: true,
        watcher,
        batch: 7,
    };
    client.store(store("named", mine)).await.unwrap();
    client.store(store("unnamed", 0)).await.unwrap();
    let mut next = async |i: usize| {
        tokio::time::timeout(Duration::from_secs(5), streams[i].0.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap()
            .event
            .unwrap()
    };
    let keys = |e: Event| match e {
        Event::Changes(b) => b.entries.into_iter().map(|e| e.key).collect::<Vec<_>>(),
        other => panic!("unexpected {other:?}"),
    };
    // The writer's stream: the marker where its entries would be, then the other store.
    match next(0).await {
        Event::Applied(a) => assert_eq!((a.table.as_str(), a.batch), ("web", 7)),
        other => panic!("expected the marker, got {other:?}"),
    }
    assert_eq!(keys(next(0).await), ["unnamed"]);
    // Any other stream: both stores' entries.
    assert_eq!(keys(next(1).await), ["named"]);
    assert_eq!(keys(next(1).await), ["unnamed"]);
    // The writer's marker comes even for a table its stream does not watch.
    let mut other_table = store("10.0.0.9", mine);
    other_table.table = "ips".into();
    other_table.batch = 8;
    client.store(other_table).await.unwrap();
    match next(0).await {
        Event::Applied(a) => assert_eq!((a.table.as_str(), a.batch), ("ips", 8)),
        other => panic!("expected the marker, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_is_refused_and_table_mismatch_is_reported_not_replicated() {
    // node2 defines "ips" differently; node3 is not in node1's and node2's configs.
    let c = Cluster::start(3, |i| match i {
        2 => TABLES.replace("size = \"5k\"", "size = \"10k\""),
        _ => TABLES.to_owned(),
    });
    // Make node1 and node2 forget node3: rewrite their configs without it and restart them.
    let mut c = c;
    for i in 0..2 {
        let text = std::fs::read_to_string(&c.nodes[i].config).unwrap();
        let cut = text.find("[[peers]]\nname = \"node3\"").unwrap();
        std::fs::write(&c.nodes[i].config, &text[..cut]).unwrap();
        c.nodes[i].kill9();
        c.nodes[i].start();
    }
    c.nodes[0].client().await;
    c.nodes[1].client().await;
    // node3 is refused by both, with a status saying why.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = c.nodes[2].peers().await;
        let refused = p.peers.iter().filter(|p| p.state == "refused").count();
        if refused == 2 {
            assert!(
                p.peers[0].last_error.contains("unknown peer 'node3'"),
                "{p:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node3 not refused: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.nodes[0].log().contains("refused an unknown peer"));
    // The mismatched table shows in ShowPeers, on both sides, and is not replicated.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = c.nodes[0].peers().await;
        let to2 = p.peers.iter().find(|p| p.name == "node2").unwrap();
        if to2.state == "connected" && !to2.mismatches.is_empty() {
            assert_eq!(to2.mismatches.len(), 1, "{to2:?}");
            assert_eq!(to2.mismatches[0].table, "ips");
            assert_eq!(
                to2.mismatches[0].reason,
                "type ip size 5120 expire 5m here, type ip size 10240 expire 5m on node2"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no mismatch reported: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[0].store("ips", &[("10.9.9.9", "app1")]).await;
    c.nodes[0].store("web", &[("replicated", "app1")]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.nodes[1].table("web").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "web never reached node2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.nodes[1].table("ips").await.is_empty(),
        "a mismatched table was replicated"
    );
    assert!(c.nodes[1].log().contains("table definitions differ"));
}

#[test]
fn bad_config_exits_64_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        "data_dir = \"/tmp/x\"\nsocket = \"/tmp/x.sock\"\n[[peers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[tables]]\nname = \"t\"\ntype = \"float\"\nsize = 1\nexpire = \"1m\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stickd"))
        .arg("--config")
        .arg(&cfg)
        .args(["-L", "a"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s.toml:8:8: unknown table type 'float'"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stickd"))
        .arg("--config")
        .arg(&cfg)
        .args(["-L", "zz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("local peer 'zz'"));
}

/// A CA and one certificate per node (IP SANs for 127.0.0.1-3, the node's name as a DNS SAN),
/// made with the openssl CLI.
fn make_certs(dir: &std::path::Path, nodes: &[&str]) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl on PATH");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=stickd-test-ca",
    ]);
    for n in nodes {
        // The peer's name as a DNS SAN: stickd binds the name a peer claims to its certificate.
        std::fs::write(
            dir.join("ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3,DNS:localhost,DNS:{n}\n"
            ),
        )
        .unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{n}.key"),
            "-out",
            &format!("{n}.csr"),
            "-subj",
            &format!("/CN={n}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{n}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{n}.pem"),
            "-days",
            "1",
            "-extfile",
            "ext",
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_replicate_over_mtls_and_refuse_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &["node1", "node2"]);
    let dir = certs.path().to_owned();
    let c = Cluster::start(2, move |i| {
        format!(
            "{TABLES}\n[tls]\ncert = \"{d}/node{i}.pem\"\nkey = \"{d}/node{i}.key\"\nca = \"{d}/ca.pem\"\n",
            d = dir.display()
        )
    });
    c.connected().await;
    c.nodes[0].store("web", &[("over-tls", "app1")]).await;
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t["over-tls"], "app1");
    // A plaintext client on the peer port gets nowhere.
    let out = std::process::Command::new("grpcurl")
        .args([
            "-plaintext",
            "-max-time",
            "3",
            &c.nodes[0].addr.to_string(),
            "list",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plaintext list on an mTLS port succeeded"
    );
    // Nor does a TLS client without a certificate.
    let out = std::process::Command::new("grpcurl")
        .args([
            "-cacert",
            &support::path_str(&certs.path().join("ca.pem")),
            "-max-time",
            "3",
            &c.nodes[0].addr.to_string(),
            "list",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a client without a certificate was let in"
    );
    // With one signed by the CA, reflection answers.
    let d = certs.path();
    let out = std::process::Command::new("grpcurl")
        .args([
            "-cacert",
            &support::path_str(&d.join("ca.pem")),
            "-cert",
            &support::path_str(&d.join("node2.pem")),
            "-key",
            &support::path_str(&d.join("node2.key")),
            "-max-time",
            "3",
            &c.nodes[0].addr.to_string(),
            "list",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stick.v1.Peer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_names_another_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), &["node1", "node2"]);
    let dir = certs.path().to_owned();
    // node3 presents node2's certificate (valid, signed by the CA) but says it is node3.
    let c = Cluster::start(3, move |i| {
        let cert = if i == 3 { 2 } else { i };
        format!(
            "{TABLES}\n[tls]\ncert = \"{d}/node{cert}.pem\"\nkey = \"{d}/node{cert}.key\"\nca = \"{d}/ca.pem\"\n",
            d = dir.display()
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = c.nodes[2].peers().await;
        let to1 = p.peers.iter().find(|p| p.name == "node1").unwrap();
        if to1.state == "refused" {
            assert!(to1.last_error.contains("does not name 'node3'"), "{to1:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node3 was not refused: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log1 = c.nodes[0].log();
    assert!(
        log1.lines()
            .any(|l| l.contains("certificate does not name the peer") && l.contains("from=node3")),
        "{log1}"
    );
    // The honest pair still replicates.
    c.nodes[0].store("web", &[("honest", "app1")]).await;
    let deadline = std::time::Instant::now() + CONVERGE;
    while !c.nodes[1].table("web").await.contains_key("honest") {
        assert!(std::time::Instant::now() < deadline, "node2 never got it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_lost_by_a_kill9_come_back_from_the_peers() {
    // node1 never flushes on its own here, so a kill -9 loses what it wrote since it started.
    let mut c = Cluster::start(2, |i| {
        let flush = if i == 1 {
            "flush_interval = \"60s\"\n"
        } else {
            ""
        };
        format!("{flush}{TABLES}")
    });
    c.connected().await;
    let keys: Vec<String> = (0..200).map(|i| format!("lost{i}")).collect();
    let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "app1")).collect();
    c.nodes[0].store("web", &pairs).await;
    c.converge("web", CONVERGE).await;
    c.nodes[0].kill9();
    c.nodes[0].start();
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 200);
    assert_eq!(c.nodes[0].table("web").await.len(), 200);
    // They were lost (never flushed) and came back from node2, not from node1's disk.
    let log2 = c.nodes[1].log();
    assert!(
        log2.lines().any(
            |l| l.contains("peer lost writes of its own: sending them back")
                && l.contains("peer=node1")
                && l.contains("entries=200")
        ),
        "{log2}"
    );
    // Writes after the restart replicate too (node1's log started a new epoch).
    c.nodes[0].store("web", &[("after", "app2")]).await;
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t["after"], "app2");
}

/// `stickd table ...` with the node's config, as an operator runs it: without `-L`, although
/// the node's name is not this machine's hostname, since only the socket is read.
fn table_cmd(node: &support::Node, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stickd"))
        .arg("--config")
        .arg(&node.config)
        .arg("table")
        .args(args)
        .output()
        .expect("run stickd table");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_subcommands_show_set_delete_and_clear_on_the_running_node() {
    let c = Cluster::start(2, |_| TABLES.to_owned());
    c.connected().await;
    let n = &c.nodes[0];
    let (code, out, err) = table_cmd(n, &["set", "web", "sess-1", "app1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("key=sess-1 use=0 exp="), "{out}");
    assert!(out.contains(" server_key=app1 "), "{out}");
    table_cmd(n, &["set", "web", "sess-2", "app2"]);
    // Replicated like any store.
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 2);
    let (code, out, _) = table_cmd(&c.nodes[1], &["show", "web"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("# table: web, type: string"), "{out}");
    assert!(lines[0].contains("used:2"), "{out}");
    assert!(
        lines[1].starts_with("key=sess-1 ") && lines[1].contains("server_key=app1"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("key=sess-2 ") && lines[2].contains("server_key=app2"),
        "{out}"
    );
    let (_, out, _) = table_cmd(n, &["show", "web", "--key", "sess-2"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (_, out, _) = table_cmd(n, &["show"]);
    assert!(
        out.lines().any(|l| l.starts_with("# table: web, ")),
        "{out}"
    );
    let (code, out, _) = table_cmd(n, &["delete", "web", "sess-1"]);
    assert_eq!((code, out.trim()), (Some(0), "deleted"));
    let (code, out, _) = table_cmd(n, &["clear", "web"]);
    assert_eq!((code, out.trim()), (Some(0), "cleared 1 entries"));
    let (t, _) = c.converge("web", CONVERGE).await;
    assert!(t.is_empty());
    // What stickd refuses is printed with its reason, exit 1.
    let (code, _, err) = table_cmd(n, &["set", "nope", "k", "app1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nope"), "{err}");
}
