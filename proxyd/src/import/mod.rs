//! `proxyd import-haproxy`: a haproxy.cfg becomes fdkeeper.toml, stickd.toml, proxyd.toml and
//! systemd drop-ins, with a report of every line translated only approximately or not at all.
//!
//! - [`lexer`]: haproxy.cfg's lines as words (quotes, escapes, comments);
//! - [`sections`]: lines grouped by section, wherever a section keyword is indented;
//! - [`global`] and [`proxies`]: each section read into what proxyd can use, every other line
//!   reported; [`params`]: the words after a directive (server and bind parameters, fetches);
//! - [`assemble`]: which proxies survive, the one value of each setting proxyd keeps for all,
//!   the stick tables and their peers;
//! - [`write`]: the files, each value with the haproxy.cfg line it comes from;
//! - [`catalog`]: what each HAProxy directive becomes and why, the source of the report's
//!   reasons and of docs/coming-from-haproxy.md;
//! - [`report`]: the report itself.
//!
//! The proxyd.toml written is validated here as `proxyd check` would (certificates aside:
//! they live on the HAProxy host); a config this module writes and proxyd refuses is a bug.

pub mod address;
mod assemble;
pub mod catalog;
mod global;
mod lexer;
mod params;
mod proxies;
pub mod report;
mod sections;
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
