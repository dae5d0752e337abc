//! The imported rules route as HAProxy's do: real HAProxy (/usr/sbin/haproxy) on
//! tests/fixtures/haproxy/rules/haproxy.cfg and the real proxyd (master + worker, fdkeeper in
//! process) on its import, in front of the same four backends, get the same requests; each
//! answer must be the same from both: status, Location, the backend that answered, what that
//! backend received (path and the headers the rules set or delete) and the response headers
//! the rules write.

mod util;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::master::{Running, command};
use util::{Action, PROXYD, backend};

const HAPROXY: &str = "/usr/sbin/haproxy";

/// The request fields the fixture's rules set, add or delete, as the backend saw them.
const WATCHED: &[&str] = &[
    "x-forwarded-proto",
    "x-canary",
    "x-canary-seen",
    "x-lan",
    "x-route",
    "x-debug",
    "x-internal-token",
];

/// A child process killed (by its own id) when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend that answers with its name (a field and the body's first line), then the head
/// of the request it got.
async fn echo(name: &'static str) -> SocketAddr {
    backend(move |seen| {
        let body = format!("{name}\n{}", seen.head);
        Action::Respond(
            format!(
                "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await
    .addr
}

async fn wait_listening(addr: SocketAddr, what: &str) {
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a client and the backend saw of one request.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    location: Option<String>,
    /// The backend that answered, if one did.
    backend: Option<String>,
    /// Its request line and watched fields, as it got them.
    request_line: Option<String>,
    fields: Vec<(String, String)>,
    frame_options: Option<String>,
    /// `http-response` (not the proxy's own answers: proxyd adds it there too, as reported).
    served_by: Option<String>,
}

fn fields(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

fn field(head: &str, name: &str) -> Option<String> {
    fields(head)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

async fn ask(front: SocketAddr, from: &str, raw: &str, is_head: bool) -> Outcome {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("source"))
        .expect("bind source");
    let stream = tokio::time::timeout(util::T, socket.connect(front))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut client = util::Client::over(stream);
    let r = client
        .send(raw.as_bytes(), is_head)
        .await
        .unwrap_or_else(|e| panic!("{raw:?} to {front}: {e}"));
    let backend = field(&r.head, "x-backend");
    let text = r.text();
    let seen = text.split_once('\n').map(|(_, h)| h).unwrap_or("");
    Outcome {
        status: r.status,
        location: field(&r.head, "location"),
        request_line: backend
            .as_ref()
            .and_then(|_| seen.split("\r\n").next())
            .filter(|l| !l.is_empty())
            .map(str::to_owned),
        fields: fields(seen)
            .into_iter()
            .filter(|(n, _)| WATCHED.contains(&n.as_str()))
            .collect(),
        frame_options: field(&r.head, "x-frame-options"),
        served_by: backend.as_ref().and_then(|_| field(&r.head, "x-served-by")),
        backend,
    }
}

/// The requests: (source address, method, target, host, extra fields).
#[rustfmt::skip]
const MATRIX: &[(&str, &str, &str, &str, &str)] = &[
    ("127.0.0.1", "GET", "/", "www.example.com", ""),
    ("127.0.0.1", "GET", "/api/users?id=1", "www.example.com", ""),
    ("127.0.0.1", "GET", "/", "API.Example.COM", ""),
    // hdr(host) is the whole field: a port makes it another value.
    ("127.0.0.1", "GET", "/", "api.example.com:8080", ""),
    ("127.0.0.1", "GET", "/v1/x", "www.example.com", "X-Route: client\r\n"),
    ("127.0.0.1", "GET", "/static/app.css", "www.example.com", ""),
    ("127.0.0.1", "POST", "/static/app.css", "www.example.com", "Content-Length: 0\r\n"),
    ("127.0.0.1", "HEAD", "/assets/logo.png", "www.example.com", ""),
    ("127.0.0.1", "GET", "/img/x.png?v=2", "www.example.com", ""),
    ("127.0.0.1", "GET", "/admin/", "www.example.com", ""),
    ("127.0.0.1", "GET", "/administrator", "www.example.com", ""),
    ("127.0.0.2", "GET", "/admin/", "www.example.com", ""),
    ("127.0.0.1", "GET", "/a/../etc/passwd", "www.example.com", ""),
    ("127.0.0.1", "GET", "/config.bak", "www.example.com", ""),
    ("127.0.0.1", "GET", "/config.old?x=1", "www.example.com", ""),
    ("127.0.0.1", "GET", "/config.bak.txt", "www.example.com", ""),
    ("127.0.0.1", "GET", "/x", "old.example.com", ""),
    ("127.0.0.1", "GET", "/x?q=1", "WWW.old.example.com", ""),
    ("127.0.0.1", "GET", "/", "old.example.com:80", ""),
    ("127.0.0.1", "GET", "/docs", "www.example.com", ""),
    ("127.0.0.1", "GET", "/docs/", "www.example.com", ""),
    ("127.0.0.1", "GET", "/old-docs/a?x=1", "www.example.com", ""),
    ("127.0.0.1", "GET", "/secure/page?a=b", "www.example.com:8080", ""),
    ("127.0.0.1", "POST", "/legacy/form", "www.example.com", "Content-Length: 0\r\n"),
    ("127.0.0.1", "DELETE", "/legacy/item", "www.example.com", ""),
    ("127.0.0.1", "GET", "/legacy/form", "www.example.com", ""),
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Canary: YES\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Canary: yes\r\nX-Debug: 1\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Canary: no\r\n"),
    // hdr() splits a field at its commas, but not inside quotes.
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Canary: a, yes\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Canary: \"a, yes\"\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "X-Internal-Token: s3cret\r\nX-Forwarded-Proto: https\r\n"),
    ("127.0.0.2", "PUT", "/legacy/x", "www.example.com", "Content-Length: 0\r\nX-Debug: 1\r\n"),
    // hdr_sub, hdr_end, hdr_beg: within one element, what is inside its quotes included.
    ("127.0.0.1", "GET", "/", "www.example.com", "User-Agent: Mozilla/5.0 (compatible; Googlebot/2.1)\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "User-Agent: a, \"x BOT\"\r\n"),
    ("127.0.0.1", "GET", "/", "www.example.com", "User-Agent: curl/8.0\r\n"),
    ("127.0.0.1", "GET", "/", "a.CDN.example.com", ""),
    ("127.0.0.1", "GET", "/", "a.cdn.example.com:8080", ""),
    ("127.0.0.1", "GET", "/", "a.cdn.example.com.evil", ""),
    ("127.0.0.1", "GET", "/", "IMG.example.com", ""),
    ("127.0.0.1", "GET", "/", "ximg.example.com", ""),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_and_proxyd_on_its_import_answer_alike() {
    if !Path::new(HAPROXY).exists() {
        eprintln!("skipped: {HAPROXY} is not installed (Debian's haproxy package)");
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/haproxy/rules");
    let cfg = std::fs::read_to_string(fixture.join("haproxy.cfg")).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = [
        ("10.20.1.1:8080", echo("app").await),
        ("10.20.1.2:8080", echo("api").await),
        ("10.20.1.3:8080", echo("static").await),
        ("10.20.1.4:8080", echo("legacy").await),
    ];
    let (ha_front, px_front) = (util::closed_port(), util::closed_port());

    // HAProxy on the fixture, every address replaced.
    let mut ha_cfg = cfg.replace("10.20.0.1:80", &ha_front.to_string());
    for (from, to) in &servers {
        ha_cfg = ha_cfg.replace(from, &to.to_string());
    }
    let ha_path = dir.path().join("haproxy.cfg");
    std::fs::write(&ha_path, &ha_cfg).expect("write haproxy.cfg");
    let check = Command::new(HAPROXY)
        .arg("-c")
        .arg("-f")
        .arg(&ha_path)
        .output()
        .expect("run haproxy -c");
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _haproxy = Killed(
        Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&ha_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn haproxy"),
    );

    // proxyd on the import, the same addresses mapped by the import itself.
    let out = dir.path().join("imported");
    let mut import = Command::new(PROXYD);
    import
        .current_dir(&fixture)
        .args([
            "import-haproxy",
            "--config",
            "haproxy.cfg",
            "-L",
            "lb1",
            "--out",
        ])
        .arg(&out)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--map-address")
        .arg(format!("10.20.0.1:80={px_front}"));
    for (from, to) in &servers {
        import.arg("--map-address").arg(format!("{from}={to}"));
    }
    let o = import.output().expect("run import");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let toml_path = out.join("proxyd.toml");
    let toml = std::fs::read_to_string(&toml_path).expect("proxyd.toml");
    // The in-process fdkeeper lends from its own socket.
    let lend = format!("{}/fdk/lend.sock", dir.path().display());
    let toml: String = toml
        .lines()
        .map(|l| {
            if l.starts_with("fdkeeper_socket = ") {
                format!("fdkeeper_socket = \"{lend}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&toml_path, toml).expect("write proxyd.toml");
    let _proxyd = Running::start(dir.path(), &mut command(&toml_path));
    wait_listening(ha_front, "haproxy").await;
    wait_listening(px_front, "proxyd").await;

    let mut backends_seen = std::collections::BTreeSet::new();
    let mut statuses = std::collections::BTreeSet::new();
    for (from, method, target, host, extra) in MATRIX {
        let raw = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
        let is_head = *method == "HEAD";
        let ha = ask(ha_front, from, &raw, is_head).await;
        let px = ask(px_front, from, &raw, is_head).await;
        assert_eq!(px, ha, "proxyd (left) and HAProxy (right) differ on\n{raw}");
        backends_seen.insert(ha.backend.clone());
        statuses.insert(ha.status);
    }
    eprintln!("{} requests answered alike", MATRIX.len());
    // The matrix reaches every backend and every kind of answer, or it proves little.
    assert_eq!(backends_seen.len(), 5, "{backends_seen:?}");
    assert!(
        [200, 301, 302, 307, 308, 403, 429]
            .iter()
            .all(|s| statuses.contains(s)),
        "{statuses:?}"
    );
}
