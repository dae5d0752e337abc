//! `proxyd import-haproxy`: a haproxy.cfg becomes fdkeeper.toml, stickd.toml, proxyd.toml and
//! systemd drop-ins, with a report of every line translated only approximately or not at all.
//!
//! - [`lexer`]: haproxy.cfg's lines as words (quotes, escapes, comments);
//! - [`sections`]: lines grouped by section, wherever a section keyword is indented;
//! - [`global`] and [`proxies`]: each section read into what proxyd can use, every other line
//!   reported ([`bind`]: binds and TLS; [`options`]: `option` and `http-check`; [`stick`]:
//!   stick tables and rules; [`resolvers`]: DNS); [`params`]: the words after a directive
//!   (server and bind parameters, fetches);
//! - [`acl`], [`fetch`], [`rules`] and [`actions`]: ACLs, conditions and a frontend's rules as
//!   `[[frontend.rule]]`s, written only where proxyd does exactly what HAProxy does;
//! - [`assemble`]: which proxies survive, the one value of each setting proxyd keeps for all,
//!   the stick tables and their peers;
//! - [`write`]: the files, each value with the haproxy.cfg line it comes from;
//! - [`catalog`]: what each HAProxy directive becomes and why, the source of the report's
//!   reasons and of docs/coming-from-haproxy.md;
//! - [`report`]: the report itself.
//!
//! The proxyd.toml written is validated here as `proxyd check` would (certificates aside:
//! they live on the HAProxy host); a config this module writes and proxyd refuses is a bug.

mod acl;
mod actions;
pub mod address;
mod assemble;
mod bind;
pub mod catalog;
mod fetch;
mod global;
mod lexer;
mod options;
mod params;
mod proxies;
pub mod report;
mod resolvers;
mod rules;
mod sections;
mod stick;
mod write;

use std::path::{Path, PathBuf};

use common::SourceFile;
use thiserror::Error;

use crate::config::{CertificateSource, Config};
pub use address::AddressMap;
pub use report::Report;

/// What the command line asks.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The local peer (`-L`); default: `localpeer` of haproxy.cfg, else the hostname.
    pub local: Option<String>,
    pub maps: Vec<AddressMap>,
    /// Sockets and stickd's data under this directory instead of /run and /var/lib.
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{source}")]
    Lex {
        path: String,
        source: lexer::LexError,
    },
    #[error("no frontend could be translated: proxyd would have nothing to serve")]
    NothingToServe,
    #[error("a stick-table names peers section '{0}', which is not defined")]
    NoPeers(String),
    #[error(
        "local peer '{local}' is not in peers section '{section}' (line {line}: {known}); pass -L NAME"
    )]
    LocalPeer {
        local: String,
        section: String,
        line: usize,
        known: String,
    },
    #[error("cannot read the hostname for the local peer name: {0}; pass -L NAME")]
    Hostname(String),
    #[error("the written proxyd.toml is refused: {0}")]
    Refused(common::ConfigError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files of one import (paths relative to the output directory) and its report.
#[derive(Debug)]
pub struct Imported {
    pub files: Vec<(String, String)>,
    pub report: Report,
}

/// The name of the report among the files written.
pub const REPORT_FILE: &str = "import-report.txt";

/// Translates haproxy.cfg's text; `name` is how the report and the comments call the file.
pub fn translate(name: &str, text: &str, opts: &Options) -> Result<Imported, ImportError> {
    let lines = lexer::lex(text).map_err(|source| ImportError::Lex {
        path: name.to_owned(),
        source,
    })?;
    let mut report = Report::new(name.to_owned());
    report.lines = text.lines().count();
    let sections = sections::split(lines);
    let source = Path::new(name)
        .file_name()
        .map_or_else(|| name.to_owned(), |f| f.to_string_lossy().into_owned());
    let plan = assemble::assemble(sections, opts, source, &mut report)?;
    let proxyd = plan.proxyd();
    Config::from_source_with(
        SourceFile::from_text("proxyd.toml", proxyd.clone()),
        CertificateSource::Master,
    )
    .map_err(ImportError::Refused)?;
    let mut files = vec![
        ("fdkeeper.toml".to_owned(), plan.fdkeeper()),
        ("stickd.toml".to_owned(), plan.stickd()),
        ("proxyd.toml".to_owned(), proxyd),
    ];
    files.extend(plan.dropins());
    files.push((REPORT_FILE.to_owned(), report.to_string()));
    Ok(Imported { files, report })
}

/// Reads `config`, translates it and writes every file under `out`.
pub fn import(config: &Path, out: &Path, opts: &Options) -> Result<Imported, ImportError> {
    let text = std::fs::read_to_string(config).map_err(|source| ImportError::Read {
        path: config.to_owned(),
        source,
    })?;
    let imported = translate(&config.display().to_string(), &text, opts)?;
    for (name, content) in &imported.files {
        let path = out.join(name);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, content)
        };
        write().map_err(|source| ImportError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::catalog::Topic;
    use super::*;

    fn opts(local: &str) -> Options {
        Options {
            local: Some(local.to_owned()),
            ..Options::default()
        }
    }

    fn file<'a>(i: &'a Imported, name: &str) -> &'a str {
        &i.files.iter().find(|(n, _)| n == name).expect(name).1
    }

    const TWO_BACKENDS: &str = "\
defaults base
    mode http
    timeout server 5s
defaults slow
    mode http
    timeout server 90s
    retries 5
frontend a from base
    bind 10.0.0.1:80
    default_backend one
frontend b
    bind 10.0.0.2:80
    default_backend two
backend one from base
    server s1 10.1.0.1:80
backend two
    server s2 10.1.0.2:80
";

    #[test]
    fn one_value_per_timeout_is_kept_and_the_others_reported() {
        let i = translate("h.cfg", TWO_BACKENDS, &opts("n1")).expect("translates");
        let proxyd = file(&i, "proxyd.toml");
        assert!(
            proxyd.contains("timeout_server = \"5s\"  # h.cfg:3"),
            "{proxyd}"
        );
        // The last defaults section, unless a proxy names another with `from`.
        let two = &proxyd[proxyd.find("name = \"two\"").expect("two")..];
        assert!(two.contains("retries = 5"), "{proxyd}");
        let e = i.report.entries();
        assert_eq!(e.len(), 2, "{}", i.report);
        assert_eq!((e[0].line, e[0].topic), (None, Topic::NoUser));
        assert_eq!((e[1].line, e[1].topic), (Some(6), Topic::TimeoutPerProxy));
        assert_eq!(e[1].detail.as_deref(), Some("kept 5s from line 3"));
        assert!(!proxyd[..proxyd.find("[[frontend]]").expect("frontend")].contains("retries"));
    }

    #[test]
    fn maps_run_dir_and_localpeer_shape_the_files() {
        let text = "global\n    localpeer b\npeers p\n    peer a 192.168.0.1:1024\n    peer b 192.168.0.2:1024\n\
                    frontend f\n    mode http\n    bind *:80\n    default_backend k\n\
                    backend k\n    mode http\n    stick-table type ip size 1k expire 1m peers p\n    stick on src\n\
                    server s 192.168.0.9:80\n";
        let o = Options {
            local: None,
            maps: ["192.168.0.2=127.0.0.2", "*:80=127.0.0.2:8080"]
                .iter()
                .map(|m| m.parse().expect("map"))
                .collect(),
            run_dir: Some("/tmp/try".into()),
        };
        let i = translate("h.cfg", text, &o).expect("translates");
        let stickd = file(&i, "stickd.toml");
        assert!(stickd.contains("address = \"127.0.0.2:1024\""), "{stickd}");
        assert!(
            stickd.contains("address = \"192.168.0.1:1024\""),
            "{stickd}"
        );
        assert!(
            stickd.contains("socket = \"/tmp/try/stickd/stickd.sock\""),
            "{stickd}"
        );
        let proxyd = file(&i, "proxyd.toml");
        assert!(proxyd.contains("bind = [\"127.0.0.2:8080\"]"), "{proxyd}");
        assert!(proxyd.contains("on = \"src\""), "{proxyd}");
        let dropin = file(&i, "stickd.service.d/haproxy.conf");
        assert!(dropin.contains("STICKD_OPTS=-L b\""), "{dropin}");
        assert!(file(&i, "fdkeeper.toml").contains("allowed_binds = [\"127.0.0.2:8080\"]"));
    }

    #[test]
    fn a_lone_nodes_peer_address_is_mapped_too() {
        let text = "frontend f\n    bind :80\n    default_backend k\nbackend k\n    server s 10.0.0.1:80\n";
        let o = Options {
            maps: vec!["127.0.0.1:10000=127.0.0.1:20001".parse().expect("map")],
            ..opts("a")
        };
        let stickd = file(
            &translate("h.cfg", text, &o).expect("translates"),
            "stickd.toml",
        )
        .to_owned();
        assert!(stickd.contains("address = \"127.0.0.1:20001\""), "{stickd}");
    }

    #[test]
    fn what_cannot_be_translated_at_all_is_an_error() {
        let no_frontend = "backend k\n    server s 10.0.0.1:80\n";
        assert!(matches!(
            translate("h.cfg", no_frontend, &opts("a")),
            Err(ImportError::NothingToServe)
        ));
        let unknown_peers = "frontend f\n    bind :80\n    default_backend k\n\
                             backend k\n    stick-table type ip size 1k expire 1m peers nope\n    stick on src\n\
                             server s 10.0.0.1:80\n";
        let e = translate("h.cfg", unknown_peers, &opts("a")).expect_err("no such peers");
        assert!(
            matches!(e, ImportError::NoPeers(ref p) if p == "nope"),
            "{e}"
        );
        let e = translate("h.cfg", "global\n  log \"x\n", &opts("a")).expect_err("lex");
        assert_eq!(e.to_string(), "h.cfg:2: unterminated quote");
    }

    #[test]
    fn a_tcp_frontend_keeps_its_mode_and_a_http_backend_is_reported() {
        let text = "frontend f\n    bind :5432\n    default_backend k\nbackend k\n    mode http\n    server s 10.0.0.1:5432\n";
        let i = translate("h.cfg", text, &opts("a")).expect("translates");
        assert!(file(&i, "proxyd.toml").contains("mode = \"tcp\""));
        let topics: Vec<_> = i.report.entries().iter().map(|e| e.topic).collect();
        assert!(topics.contains(&Topic::BackendMode), "{}", i.report);
    }
}
