//! `proxyd import-haproxy` on every haproxy.cfg under tests/fixtures/haproxy: the files and the
//! report are the reviewed ones, and every file written passes its daemon's own check.
//!
//! A fixture is a directory with `haproxy.cfg` and one `NAME.args` per import (the arguments,
//! one a line); `NAME/` holds what that import writes. `UPDATE_EXPECTED=1 cargo test -p proxyd
//! --test import` writes them (and docs/coming-from-haproxy.md's table) anew, for review.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use proxyd::import::catalog::Topic;

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/haproxy")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_EXPECTED").is_some()
}

/// One import of a fixture: its directory, the expected output's name and the arguments.
struct Case {
    dir: PathBuf,
    name: String,
    args: Vec<String>,
}

impl Case {
    fn expected(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    fn local(&self) -> &str {
        let i = self
            .args
            .iter()
            .position(|a| a == "-L")
            .expect("-L in args");
        &self.args[i + 1]
    }
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("haproxy.cfg").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut args: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("fixture")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "args"))
            .collect();
        args.sort();
        for a in args {
            out.push(Case {
                dir: dir.clone(),
                name: a.file_stem().expect("stem").to_string_lossy().into_owned(),
                args: std::fs::read_to_string(&a)
                    .expect("args")
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            });
        }
    }
    assert!(out.len() >= 5, "fixtures missing");
    out
}

/// Runs the import in the fixture's directory (the report names `haproxy.cfg` as given).
fn import(dir: &Path, args: &[String], out: &Path, extra: &[&str]) -> Output {
    Command::new(PROXYD)
        .current_dir(dir)
        .args(["import-haproxy", "--config", "haproxy.cfg", "--out"])
        .arg(out)
        .args(args)
        .args(extra)
        .output()
        .expect("run proxyd")
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).expect("under root").to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn every_fixture_imports_to_its_reviewed_files_and_report() {
    for case in cases() {
        let out = tempfile::tempdir().expect("tempdir");
        let o = import(&case.dir, &case.args, out.path(), &[]);
        assert!(
            o.status.success(),
            "{}/{}: {}",
            case.dir.display(),
            case.name,
            String::from_utf8_lossy(&o.stderr)
        );
        let report = std::fs::read_to_string(out.path().join("import-report.txt")).expect("report");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            report,
            "stdout is the report"
        );
        let expected = case.expected();
        if updating() {
            let _ = std::fs::remove_dir_all(&expected);
            for f in files(out.path()) {
                let to = expected.join(&f);
                std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
                std::fs::copy(out.path().join(&f), to).expect("copy");
            }
            continue;
        }
        assert_eq!(
            files(out.path()),
            files(&expected),
            "{}: the files written",
            expected.display()
        );
        for f in files(&expected) {
            let got = std::fs::read_to_string(out.path().join(&f)).expect("written");
            let want = std::fs::read_to_string(expected.join(&f)).expect("expected");
            assert_eq!(
                got,
                want,
                "{} differs from the reviewed output (UPDATE_EXPECTED=1 to write it anew)",
                expected.join(&f).display()
            );
        }
    }
}

/// Builds stickd and fdkeeper beside this proxyd (they are other crates' binaries).
fn sibling_binaries() -> (PathBuf, PathBuf) {
    let dir = Path::new(PROXYD).parent().expect("target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--quiet", "-p", "stickd", "-p", "fdkeeper"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(st.success(), "cargo build -p stickd -p fdkeeper");
    (dir.join("stickd"), dir.join("fdkeeper"))
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').next() == Some(name))
}

fn check(cmd: &mut Command, what: &str) {
    let o = cmd.output().expect("run check");
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `proxyd.toml` with each server named by DNS at `localhost`, resolved by the system.
fn local_names(toml: &str) -> String {
    toml.lines()
        .filter(|l| !l.starts_with("resolvers = "))
        .map(|l| {
            let named = l
                .strip_prefix("address = \"")
                .and_then(|a| a.strip_suffix('"'))
                .filter(|a| a.parse::<std::net::SocketAddr>().is_err())
                .and_then(|a| a.rsplit_once(':'));
            match named {
                Some((_, port)) => format!("address = \"localhost:{port}\"\n"),
                None => format!("{l}\n"),
            }
        })
        .collect()
}

#[test]
fn every_file_written_passes_its_daemons_check() {
    let (stickd, fdkeeper) = sibling_binaries();
    for case in cases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = import(&case.dir, &case.args, dir.path(), &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let path = |f: &str| dir.path().join(f);
        // proxyd check loads every certificate: the fixtures name theirs relative to
        // proxyd.toml, and a fresh one stands in for the HAProxy host's.
        let proxyd_toml = std::fs::read_to_string(path("proxyd.toml")).expect("proxyd.toml");
        if proxyd_toml.contains("certs/site.pem") {
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = rcgen::CertificateParams::new(vec!["www.example.com".to_owned()])
                .expect("params")
                .self_signed(&key)
                .expect("cert");
            std::fs::create_dir_all(path("certs")).expect("mkdir");
            std::fs::write(
                path("certs/site.pem"),
                format!("{}{}", cert.pem(), key.serialize_pem()),
            )
            .expect("write cert");
        }
        let label = format!("{}/{}", case.dir.display(), case.name);
        // proxyd check resolves every server name: the HAProxy host's names do not resolve
        // here, so `localhost` (through the system's resolver) stands in for them.
        let names_here = local_names(&proxyd_toml);
        if names_here != proxyd_toml {
            eprintln!("{label}: server names checked as localhost");
            std::fs::write(path("proxyd.toml"), names_here).expect("write");
        }
        check(
            Command::new(PROXYD)
                .args(["check", "--config"])
                .arg(path("proxyd.toml")),
            &format!("proxyd check of {label}"),
        );
        check(
            Command::new(&stickd)
                .args(["check", "--config"])
                .arg(path("stickd.toml"))
                .args(["-L", case.local()]),
            &format!("stickd check of {label}"),
        );
        // fdkeeper resolves the user names it lends to: one this machine lacks is checked as
        // root instead, and said.
        let mut fd = std::fs::read_to_string(path("fdkeeper.toml")).expect("fdkeeper.toml");
        if fd.contains("allowed_uids = [\"haproxy\"]") && !user_exists("haproxy") {
            eprintln!("{label}: no user haproxy here: fdkeeper.toml checked with root instead");
            fd = fd.replace("allowed_uids = [\"haproxy\"]", "allowed_uids = [\"root\"]");
            std::fs::write(path("fdkeeper.toml"), fd).expect("write");
        }
        check(
            Command::new(&fdkeeper)
                .args(["check", "--config"])
                .arg(path("fdkeeper.toml")),
            &format!("fdkeeper check of {label}"),
        );
    }
}

#[test]
fn every_node_of_a_cluster_gets_the_same_tables_and_peers() {
    let seed = fixtures().join("seed-001-peers");
    let stickd: Vec<String> = (1..=3)
        .map(|n| {
            std::fs::read_to_string(seed.join(format!("haproxy{n}/stickd.toml"))).expect("stickd")
        })
        .collect();
    assert_eq!(stickd[0], stickd[1]);
    assert_eq!(stickd[0], stickd[2]);
    for n in 1..=3 {
        let dropin =
            std::fs::read_to_string(seed.join(format!("haproxy{n}/stickd.service.d/haproxy.conf")))
                .expect("drop-in");
        assert!(
            dropin.contains(&format!("STICKD_OPTS=-L haproxy{n}\"")),
            "{dropin}"
        );
    }
}

#[test]
fn a_local_peer_outside_the_peers_section_is_refused_with_64() {
    let out = tempfile::tempdir().expect("tempdir");
    let o = import(
        &fixtures().join("seed-001-peers"),
        &["-L".to_owned(), "haproxy9".to_owned()],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("local peer 'haproxy9' is not in peers section 'mypeers'")
            && err.contains("haproxy1, haproxy2, haproxy3"),
        "{err}"
    );
}

#[test]
fn strict_exits_64_only_when_something_is_reported() {
    let out = tempfile::tempdir().expect("tempdir");
    let args = ["-L".to_owned(), "lb1".to_owned()];
    let o = import(
        &fixtures().join("seed-000-seamless-reload"),
        &args,
        out.path(),
        &["--strict"],
    );
    assert_eq!(
        o.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let clean = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        clean.path().join("haproxy.cfg"),
        "global\n    user root\ndefaults\n    mode http\n    timeout client 5s\n\
         frontend f\n    bind 127.0.0.1:8080\n    default_backend b\n\
         backend b\n    server s 127.0.0.1:9000 check\n",
    )
    .expect("write");
    let o = import(
        clean.path(),
        &args,
        &clean.path().join("out"),
        &["--strict"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 approximate, 0 not translated"));
}

#[test]
fn a_file_that_does_not_lex_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("haproxy.cfg"), "global\n    log \"x\n").expect("write");
    let o = import(
        dir.path(),
        &["-L".into(), "a".into()],
        &dir.path().join("out"),
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("haproxy.cfg:2: unterminated quote"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

const TABLE_START: &str = "<!-- directive table: generated from proxyd/src/import/catalog.rs -->\n";
const TABLE_END: &str = "<!-- end of the directive table -->\n";

#[test]
fn the_docs_directive_table_is_the_imports_own() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/coming-from-haproxy.md");
    let text = std::fs::read_to_string(&doc).expect("docs/coming-from-haproxy.md");
    let start = text.find(TABLE_START).expect("table start marker") + TABLE_START.len();
    let end = text.find(TABLE_END).expect("table end marker");
    let table = Topic::markdown_table();
    if updating() {
        let new = format!("{}{table}{}", &text[..start], &text[end..]);
        std::fs::write(&doc, new).expect("write doc");
        return;
    }
    assert_eq!(
        &text[start..end],
        table,
        "docs/coming-from-haproxy.md's table is stale (UPDATE_EXPECTED=1 to write it anew)"
    );
}
