//! Where the access log goes and how its lines read: `access_log`, `access_log_format` and the
//! `syslog_*` keys of `[global]`.

use std::path::PathBuf;

use common::config::Spanned;
use common::{ConfigError, SourceFile};
use serde::Deserialize;

/// The access log of a config: one line per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLog {
    pub to: LogTarget,
    pub format: LogFormat,
}

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// The worker's stderr (the journal under systemd).
    Stderr,
    /// A syslog daemon's datagram socket (journald's or rsyslog's `/dev/log`).
    Syslog(Syslog),
    Off,
}

/// The line of each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// HAProxy's `option httplog` fields, in its order, so that its tools read it.
    Httplog,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syslog {
    pub socket: PathBuf,
    pub format: SyslogFormat,
    /// The facility's number (local0 is 16).
    pub facility: u8,
}

/// The syslog header each message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    /// BSD syslog: `<PRI>Mmm dd hh:mm:ss proxyd[PID]: `, which journald parses fully.
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOST proxyd PID - - `, which rsyslog parses.
    Rfc5424,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawTarget {
    Stderr,
    Syslog,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Facility {
    User,
    Daemon,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// The access log keys of `[global]` as written.
pub(super) struct RawAccessLog {
    pub(super) to: Option<Spanned<RawTarget>>,
    pub(super) format: Option<LogFormat>,
    pub(super) syslog_socket: Option<Spanned<PathBuf>>,
    pub(super) syslog_format: Option<Spanned<SyslogFormat>>,
    pub(super) syslog_facility: Option<Spanned<Facility>>,
}

/// Checks the keys together: a `syslog_*` key without `access_log = "syslog"` would be a
/// setting that silently does nothing, so it is refused at its line.
pub(super) fn validate(src: &SourceFile, raw: RawAccessLog) -> Result<AccessLog, ConfigError> {
    let target = raw.to.as_ref().map_or(RawTarget::Stderr, |t| *t.get_ref());
    let format = raw.format.unwrap_or(LogFormat::Httplog);
    if target != RawTarget::Syslog {
        let stray = [
            raw.syslog_socket
                .as_ref()
                .map(|s| ("syslog_socket", s.span())),
            raw.syslog_format
                .as_ref()
                .map(|s| ("syslog_format", s.span())),
            raw.syslog_facility
                .as_ref()
                .map(|s| ("syslog_facility", s.span())),
        ];
        if let Some((name, span)) = stray.into_iter().flatten().next() {
            return Err(src.error_at(
                span,
                format!("{name} is set but access_log is not \"syslog\""),
            ));
        }
    }
    let to = match target {
        RawTarget::Stderr => LogTarget::Stderr,
        RawTarget::Off => LogTarget::Off,
        RawTarget::Syslog => {
            let socket = match raw.syslog_socket {
                None => PathBuf::from("/dev/log"),
                Some(p) if p.get_ref().is_absolute() => p.into_inner(),
                Some(p) => {
                    return Err(src.error_at(
                        p.span(),
                        format!(
                            "syslog_socket must be an absolute path, not '{}'",
                            p.get_ref().display()
                        ),
                    ));
                }
            };
            LogTarget::Syslog(Syslog {
                socket,
                format: raw
                    .syslog_format
                    .map_or(SyslogFormat::Rfc3164, Spanned::into_inner),
                facility: raw
                    .syslog_facility
                    .map_or(Facility::Local0, Spanned::into_inner)
                    .code(),
            })
        }
    };
    Ok(AccessLog { to, format })
}
