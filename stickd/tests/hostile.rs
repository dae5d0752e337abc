//! Hostile input against real stickd processes: a damaged data_dir, out-of-bounds values and
//! sizes, a second process claiming a connected peer's name, peers without the shared secret.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use proto::stick::v1 as pb;
use proto::stick::v1::peer_client::PeerClient;
use support::{Cluster, TABLES};
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(10);

/// A raw replication stream to `addr` that sends one message (and `secret`, if any) and returns
/// the server's answer to it.
async fn replicate_once(
    addr: std::net::SocketAddr,
    first: pb::peer_message::Msg,
    secret: Option<&[u8]>,
) -> Result<pb::PeerReply, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PeerClient::new(ch).max_encoding_message_size(usize::MAX);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PeerMessage { msg: Some(first) }).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(s) = secret {
        req.metadata_mut().insert_bin(
            "x-stickd-peer-secret-bin",
            tonic::metadata::MetadataValue::from_bytes(s),
        );
    }
    let mut replies = client.replicate(req).await?.into_inner();
    let first = replies.message().await?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::unknown("stream ended without a reply"))
}

fn hello(from: &str, to: &str) -> pb::peer_message::Msg {
    pb::peer_message::Msg::Hello(pb::Hello {
        from: from.into(),
        to: to.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_past_the_table_expire_is_clamped() {
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let mut client = c.nodes[0].client().await;
    let r = client
        .store(pb::StoreRequest {
            table: "web".into(),
            items: vec![pb::StoreItem {
                key: "forever".into(),
                server: "app1".into(),
                expires_unix_ms: i64::MAX,
            }],
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let left = r.entries[0].expires_in_ms;
    // The table's expire is 5m.
    assert!((1..=300_000).contains(&left), "expires in {left} ms");
    let r = client
        .set(pb::SetRequest {
            table: "web".into(),
            key: "forever2".into(),
            server: "app1".into(),
            expires_unix_ms: i64::MAX - 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.entry.unwrap().expires_in_ms <= 300_000);
    // A shorter expiry is the client's to choose.
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 10_000;
    let r = client
        .store(pb::StoreRequest {
            table: "web".into(),
            items: vec![pb::StoreItem {
                key: "soon".into(),
                server: "app1".into(),
                expires_unix_ms: soon,
            }],
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.entries[0].expires_unix_ms, soon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_long_keys_are_refused_naming_the_problem() {
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let mut client = c.nodes[0].client().await;
    for (key, what) in [
        ("a\0b", "a NUL at byte 1"),
        ("ab\nc", "a newline at byte 2"),
    ] {
        let e = client
            .store(pb::StoreRequest {
                table: "web".into(),
                items: vec![pb::StoreItem {
                    key: key.into(),
                    server: "app1".into(),
                    expires_unix_ms: 0,
                }],
                omit_entries: false,
                watcher: 0,
                batch: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{}", e.message());
        let e = client
            .lookup(pb::LookupRequest {
                table: "web".into(),
                keys: vec![key.into()],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // An ip key padded with a megabyte of spaces is refused before it is parsed.
    let padded = format!("{}10.0.0.1", " ".repeat(1 << 20));
    let e = client
        .store(pb::StoreRequest {
            table: "ips".into(),
            items: vec![pb::StoreItem {
                key: padded,
                server: "app1".into(),
                expires_unix_ms: 0,
            }],
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("longer than"), "{}", e.message());
    assert!(c.nodes[0].table("web").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_mb_request_is_refused_on_both_ports() {
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let n = &c.nodes[0];
    let big: Vec<pb::StoreItem> = (0..15_000)
        .map(|i| pb::StoreItem {
            key: format!("{i:04000}"),
            server: "app1".into(),
            expires_unix_ms: 0,
        })
        .collect();
    let mut client = n.client().await.max_encoding_message_size(usize::MAX);
    let e = client
        .store(pb::StoreRequest {
            table: "web".into(),
            items: big,
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // The peer port: a batch of 60 MB as the first message.
    let changes: Vec<pb::Change> = (0..15_000u64)
        .map(|i| pb::Change {
            seq: i + 1,
            table: "web".into(),
            kind: Some(pb::change::Kind::Entry(pb::Entry {
                key: format!("{i:04000}"),
                ..Default::default()
            })),
        })
        .collect();
    let e = replicate_once(
        n.addr,
        pb::peer_message::Msg::Batch(pb::Batch { changes }),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Still serving.
    n.store("web", &[("after", "app1")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_for_a_connected_peer_is_refused() {
    let c = Cluster::start(2, |_| TABLES.to_owned());
    c.connected().await;
    let e = replicate_once(c.nodes[0].addr, hello("node2", "node1"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("already connected"), "{}", e.message());
    let log = c.nodes[0].log();
    let line = log
        .lines()
        .find(|l| l.contains("refused a second stream"))
        .unwrap_or_else(|| panic!("not logged:\n{log}"));
    // Both addresses: the impostor's (this test) and the real node2's stream.
    let addr = |field: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(field))
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no {field} in {line}"))
    };
    assert_ne!(addr("client.addr="), addr("connected.addr="), "{line}");
    // The real stream was not disturbed.
    c.nodes[1].store("web", &[("still", "app2")]).await;
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_need_the_shared_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let extra = format!("peer_secret_file = \"{}\"\n{TABLES}", secret.display());
    let c = Cluster::start(2, |_| extra.clone());
    c.connected().await;
    c.nodes[0].store("web", &[("k", "app1")]).await;
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 1);
    // node1 is not connected to itself: without or with a wrong secret, refused before anything.
    for given in [None, Some(&b"correct horse battery stapl"[..])] {
        let e = replicate_once(c.nodes[1].addr, hello("node1", "node2"), given)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    assert!(
        c.nodes[1]
            .log()
            .contains("refused a peer without the shared secret")
    );
    // A world-readable secret file is a config error naming its line.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_stickd"))
        .args(["check", "--config"])
        .arg(&c.nodes[0].config)
        .args(["-L", "node1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("stickd.toml:4:") && err.contains("chmod o="),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_dir_exits_65_and_recovers_from_the_peers() {
    let mut c = Cluster::start(2, |_| TABLES.to_owned());
    c.connected().await;
    // Enough for sled's `db` to span several segments: a small one survives a cut as a prefix.
    for b in 0..40 {
        let pairs: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("k{b}-{i}"), "app1".to_owned()))
            .collect();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, s)| (&**k, &**s)).collect();
        c.nodes[b % 2].store("web", &refs).await;
    }
    c.converge("web", CONVERGE).await;
    assert_eq!(c.nodes[1].stop().code(), Some(0));
    let data = c.nodes[1].dir.join("data");
    let db = data.join("db");
    damage(&db);
    // Not `output()`: a stickd that opened the damaged directory would serve for ever.
    let errfile = c.nodes[1].dir.join("damaged.err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stickd"))
        .arg("--config")
        .arg(&c.nodes[1].config)
        .args(["-L", "node2"])
        .stderr(std::fs::File::create(&errfile).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("stickd opened the damaged data_dir and serves");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert_eq!(status.code(), Some(65), "{err}");
    assert!(err.contains(&data.display().to_string()), "{err}");
    assert!(err.contains("--recover-from-peers"), "{err}");
    assert!(!err.contains("thread '"), "a panic was printed: {err}");
    c.nodes[1].start_with(&["--recover-from-peers"]);
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 40_000);
    assert!(c.nodes[1].log().contains("damaged data_dir moved aside"));
}

/// Half of sled's `db` cut off and bytes of its `conf` flipped. The cut alone is not always
/// damage to sled: here (a node that received its entries, with a snapshot file) sled recovers
/// the prefix before the cut, as after a crash, and the peers resend the rest; `conf` has a
/// checksum, so sled refuses it ("Read corrupted data at file offset None"). The cut that makes
/// sled panic is in `datadir`'s unit tests.
fn damage(db: &std::path::Path) {
    let mut b = std::fs::read(db).unwrap();
    b.truncate(b.len() / 2);
    std::fs::write(db, b).unwrap();
    let conf = db.with_file_name("conf");
    let mut b = std::fs::read(&conf).unwrap();
    for x in &mut b[8..20] {
        *x ^= 0x5a;
    }
    std::fs::write(&conf, b).unwrap();
}

#[test]
fn recover_from_peers_without_peers_is_refused() {
    let c = Cluster::start(1, |_| TABLES.to_owned());
    let out = Command::new(env!("CARGO_BIN_EXE_stickd"))
        .arg("--config")
        .arg(&c.nodes[0].config)
        .args(["-L", "node1", "--recover-from-peers"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("nobody to recover from"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_small_table_keeps_a_short_log_and_a_lagging_peer_converges() {
    const SMALL: &str = r#"
[[tables]]
name = "web"
type = "string"
len = 32
size = "500"
expire = "5m"
"#;
    let mut c = Cluster::start(2, |_| SMALL.to_owned());
    c.connected().await;
    c.nodes[1].kill9();
    // 40k stores into 500 entries: the log's bound is its floor, 16384 changes (+ a chunk).
    for batch in 0..40 {
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("k{}", (batch * 1000 + i) % 700))
            .collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "app1")).collect();
        c.nodes[0].store("web", &pairs).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.nodes[0]
            .client()
            .await
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.head_seq + 1 - s.log_first_seq <= 16_384 + 512 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log not trimmed: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.nodes[1].start();
    let (t, _) = c.converge("web", CONVERGE).await;
    assert_eq!(t.len(), 500);
    let p = c.nodes[0].peers().await;
    assert!(p.peers[0].snapshots_sent >= 1, "{p:?}");
}

/// Memory and disk of a writer after 500k stores (or `STORES`) into a 5k table (a measurement,
/// not a check: `STICKD_BIN=target/release/stickd cargo test -p stickd --test hostile --
/// --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement of a few minutes"]
async fn measure_500k_stores_into_a_5k_table() {
    const SMALL: &str = r#"
[[tables]]
name = "web"
type = "string"
len = 32
size = "5k"
expire = "5m"
"#;
    let mut c = Cluster::start(1, |_| SMALL.to_owned());
    if let Ok(bin) = std::env::var("STICKD_BIN") {
        c.nodes[0].kill9();
        c.nodes[0].start_bin(std::path::Path::new(&bin));
    }
    let n = &c.nodes[0];
    let mut client = n.client().await;
    let batches: u32 = std::env::var("STORES")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map_or(500, |s| s / 1000);
    let started = std::time::Instant::now();
    for batch in 0..batches {
        let items = (0..1000u32)
            .map(|i| pb::StoreItem {
                key: format!("session-{:08}", (batch * 1000 + i) % 20_000),
                server: format!("app{}", i % 4),
                expires_unix_ms: 0,
            })
            .collect();
        client
            .store(pb::StoreRequest {
                table: "web".into(),
                items,
                omit_entries: false,
                watcher: 0,
                batch: 0,
            })
            .await
            .unwrap();
    }
    let took = started.elapsed();
    // Two trims and flushes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = n.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .to_owned();
    let du = Command::new("du")
        .args(["-sk"])
        .arg(n.dir.join("data"))
        .output()
        .unwrap();
    let s = client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    println!(
        "{}k stores in {took:?}; {rss}; data_dir {} KiB; log {} changes (first {} head {})",
        batches,
        String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("?"),
        s.head_seq + 1 - s.log_first_seq,
        s.log_first_seq,
        s.head_seq
    );
}
