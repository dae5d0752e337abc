//! The access log of a real worker written to a file (the master's stderr): every request's
//! line is there once the worker has exited, in plain text, and json lines parse.

mod util;

use std::time::{Duration, Instant};

use util::master::{Running, command, kill, wait_for};
use util::{Client, backend, config_text, get, ok};

/// Requests per run, over this many keep-alive connections.
const REQUESTS: usize = 300;
const CONNECTIONS: usize = 10;

/// Runs proxyd with `extra_global`, sends the requests, stops it, and returns its stderr.
async fn logged(extra_global: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = backend(|_| ok("hello")).await;
    let front = util::closed_port();
    let text = config_text(dir.path(), &front.to_string(), &[b.addr], extra_global);
    let config = dir.path().join("proxyd.toml");
    std::fs::write(&config, text).expect("write config");
    let log_path = dir.path().join("stderr.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut running = Running::start(
        dir.path(),
        command(&config)
            .stderr(log_file)
            .env("RUST_LOG", "warn,proxyd::access=info"),
    );

    // Serving once a request gets through.
    wait_for(Duration::from_secs(15), || async {
        match Client::connect(front).await {
            Ok(mut c) => c
                .send(&get("/ready"), false)
                .await
                .is_ok_and(|r| r.status == 200),
            Err(_) => false,
        }
    })
    .await;

    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(front).await.expect("connect");
            for i in 0..REQUESTS / CONNECTIONS {
                let reply = client
                    .send(&get(&format!("/c{c}/r{i}?q=\"x\"")), false)
                    .await
                    .expect("reply");
                assert_eq!(reply.status, 200);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("requests within 30 s")
            .expect("task");
    }

    // SIGTERM: the master drains its worker, which writes what its log still holds.
    kill("-TERM", running.master.id());
    let t0 = Instant::now();
    while running.master.try_wait().expect("wait").is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "proxyd did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::read_to_string(&log_path).expect("read log")
}

/// The access lines among the log's lines: those of the requests sent here.
fn requests(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("/c")).collect()
}

#[tokio::test]
async fn httplog_lines_reach_the_file_all_of_them_without_colour() {
    let log = logged("").await;
    assert!(
        !log.contains('\u{1b}'),
        "an escape code in the file:\n{log}"
    );
    let lines = requests(&log);
    assert_eq!(lines.len(), REQUESTS, "lines:\n{log}");
    for c in 0..CONNECTIONS {
        for i in 0..REQUESTS / CONNECTIONS {
            let request = format!("\"GET /c{c}/r{i}?q=#22x#22 HTTP/1.1\"");
            let line = lines
                .iter()
                .find(|l| l.ends_with(&request))
                .unwrap_or_else(|| panic!("no line for {request}"));
            // ip:port [date] frontend backend/server timers status bytes - - termination ...
            let f: Vec<&str> = line.split(' ').collect();
            assert!(f[0].starts_with("127.0.0.1:"), "{line}");
            assert!(f[1].starts_with('[') && f[1].ends_with(']'), "{line}");
            assert_eq!((f[2], f[3]), ("www", "app/s0"), "{line}");
            let timers: Vec<i64> = f[4].split('/').map(|t| t.parse().expect("ms")).collect();
            assert!(
                timers.len() == 5 && timers.iter().all(|t| *t >= 0),
                "{line}"
            );
            assert_eq!(
                (f[5], f[7], f[8], f[9]),
                ("200", "-", "-", "----"),
                "{line}"
            );
        }
    }
}

#[tokio::test]
async fn json_lines_parse_with_every_field() {
    let log = logged("access_log_format = \"json\"").await;
    assert!(
        !log.contains('\u{1b}'),
        "an escape code in the file:\n{log}"
    );
    let lines = requests(&log);
    assert_eq!(lines.len(), REQUESTS, "lines:\n{log}");
    let mut targets = std::collections::BTreeSet::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("a json line");
        assert_eq!(v["frontend"], "www", "{line}");
        assert_eq!(v["backend"], "app");
        assert_eq!(v["server"], "s0");
        assert_eq!(v["status"], 200);
        assert_eq!(v["termination"], "----");
        assert_eq!(v["client_ip"], "127.0.0.1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert!(v["bytes"].as_u64().is_some_and(|b| b > 5), "{line}");
        for t in ["tq", "tw", "tc", "tr", "ta"] {
            assert!(v[t].as_i64().is_some_and(|ms| ms >= 0), "{t} in {line}");
        }
        targets.insert(v["target"].as_str().expect("target").to_owned());
    }
    assert_eq!(targets.len(), REQUESTS, "one line per request");
    assert!(targets.contains("/c0/r0?q=\"x\""));
}
