//! proxyd's operator commands against the real binary: `check` naming the file and line,
//! `status` counting connections and requests, `servers` and `set-server` on a running master.

mod util;

use std::time::Duration;

use util::master::{env, free_addr, status, wait_for};
use util::{Client, cli, config_text, get};

#[test]
fn check_reports_file_line_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    let text = config_text(dir.path(), "127.0.0.1:8080", &[free_addr()], "");
    std::fs::write(&path, &text).expect("write");
    let out = cli(&["check"], &path);
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
        let out = cli(&["check"], &path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(
            err.starts_with(&format!("{}:{line}:", path.display())),
            "line {line}: {err}"
        );
        assert!(err.contains(why), "{err}");
    }
    let out = cli(&["check"], std::path::Path::new("/nonexistent/p.toml"));
    assert_eq!(out.status.code(), Some(64));
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
    let out = cli(&["status"], &e.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("generation 1 SERVING")
            && text.contains("connections 3 requests 6")
            && text.contains("threads 1/1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_and_set_server_speak_to_the_running_master() {
    let e = env("").await;
    let run = |args: &[&str]| {
        let out = cli(args, &e.config);
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
