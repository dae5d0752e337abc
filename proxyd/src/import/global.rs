//! The `global` section and the `peers` sections: process settings, the lending socket, the
//! users, and the nodes that share the stick tables.

use std::net::SocketAddr;
use std::path::PathBuf;

use common::Duration;

use super::address::{self, AddressMap};
use super::catalog::Topic;
use super::lexer::Line;
use super::report::Report;
use super::sections::Section;

/// What `global` says that the import uses.
#[derive(Clone, Debug, Default)]
pub struct Global {
    pub maxconn: Option<(u64, Line)>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub nbthread: Option<u64>,
    pub hard_stop_after: Option<Duration>,
    /// A `stats socket` with `expose-fd listeners`: HAProxy's seamless reload.
    pub expose_fd: bool,
    pub localpeer: Option<String>,
    pub crt_base: Option<PathBuf>,
    /// `ssl-min-ver` of `ssl-default-bind-options`, as proxyd writes it.
    pub min_version: Option<String>,
    /// The access log's `[global]` keys from the first `log` line: key, TOML value, line.
    pub log: Vec<(&'static str, String, usize)>,
}

/// Facilities proxyd's syslog offers.
const FACILITIES: &[&str] = &[
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7", "daemon",
    "user",
];

/// `log TARGET [len N] [format F] FACILITY [LEVEL [MINLEVEL]]` as proxyd's syslog keys; a
/// network target gets the local socket, which the syslog daemon can forward.
fn log(line: &Line, g: &mut Global, report: &mut Report) {
    let args = line.args();
    if !g.log.is_empty() {
        report.add(
            line,
            Topic::LogRemote,
            Some("a second log: proxyd logs to one".to_owned()),
        );
        return;
    }
    let target = args.first().map_or("", String::as_str);
    let Some(f) = args.iter().position(|a| FACILITIES.contains(&a.as_str())) else {
        report.add(
            line,
            Topic::LogRemote,
            Some("a facility proxyd lacks".to_owned()),
        );
        return;
    };
    let socket = match target.strip_prefix("unix@").unwrap_or(target) {
        p if p.starts_with('/') => p.to_owned(),
        "stdout" | "stderr" => {
            report.add(
                line,
                Topic::LogRemote,
                Some("proxyd logs on stderr".to_owned()),
            );
            return;
        }
        other => {
            report.add(
                line,
                Topic::LogRemote,
                Some(format!("/dev/log instead of {other}")),
            );
            "/dev/log".to_owned()
        }
    };
    let level = args.get(f + 1).map_or("info", String::as_str);
    if !matches!(level, "info" | "debug") {
        report.add(
            line,
            Topic::LogRemote,
            Some(format!("level {level}: every request is logged at info")),
        );
    }
    g.log = vec![
        ("access_log", "\"syslog\"".to_owned(), line.no),
        ("syslog_socket", super::write::q(&socket), line.no),
        ("syslog_facility", super::write::q(&args[f]), line.no),
    ];
}

/// Reads `global`; every line it does not use goes to the report.
pub fn global(section: &Section, g: &mut Global, report: &mut Report) {
    for line in &section.body {
        let args = line.args();
        let arg = |i: usize| args.get(i).map_or("", String::as_str);
        match line.keyword() {
            "maxconn" => match arg(0).parse::<u64>() {
                Ok(n) => {
                    g.maxconn = Some((n, line.clone()));
                    report.add(line, Topic::GlobalMaxconn, None);
                }
                Err(_) => report.add(line, Topic::Unknown, None),
            },
            "user" | "uid" => g.user = Some(arg(0).to_owned()),
            "group" | "gid" => g.group = Some(arg(0).to_owned()),
            "nbthread" => match arg(0).parse::<u64>() {
                Ok(n) if (1..=256).contains(&n) => g.nbthread = Some(n),
                _ => report.add(line, Topic::Unknown, None),
            },
            "nbproc" => report.add(line, Topic::Nbproc, None),
            "hard-stop-after" => match arg(0).parse::<Duration>() {
                Ok(d) => g.hard_stop_after = Some(d),
                Err(e) => report.add(line, Topic::Unknown, Some(e.to_string())),
            },
            "stats" if arg(0) == "socket" => {
                let words = &args[1..];
                let expose = words
                    .windows(2)
                    .any(|w| w[0] == "expose-fd" && w[1] == "listeners");
                g.expose_fd |= expose;
                let detail = expose.then(|| {
                    "`expose-fd listeners` becomes fdkeeper's lending socket, the rest does not"
                        .to_owned()
                });
                report.add(line, Topic::StatsSocket, detail);
            }
            "stats" => report.add(line, Topic::StatsSocket, None),
            "master-worker" => {}
            "log" => log(line, g, report),
            "log-send-hostname" | "log-tag" => report.add(line, Topic::LogRemote, None),
            "chroot" => report.add(line, Topic::Chroot, None),
            "daemon" | "pidfile" => report.add(line, Topic::Daemon, None),
            "crt-base" => g.crt_base = Some(PathBuf::from(arg(0))),
            // Only `ca-file` would use it, and client certificates are not translated.
            "ca-base" => {}
            "ssl-default-bind-options" => {
                if let Some(i) = args.iter().position(|a| a == "ssl-min-ver") {
                    match arg(i + 1) {
                        "TLSv1.3" => g.min_version = Some("1.3".to_owned()),
                        _ => g.min_version = Some("1.2".to_owned()),
                    }
                }
                report.add(line, Topic::SslDefaults, None);
            }
            k if k.starts_with("ssl-default-") || k == "ssl-dh-param-file" => {
                report.add(line, Topic::SslDefaults, None)
            }
            k if k.starts_with("tune.") => report.add(line, Topic::Tune, None),
            "localpeer" => g.localpeer = Some(arg(0).to_owned()),
            "spread-checks"
            | "ulimit-n"
            | "cpu-map"
            | "lua-load"
            | "lua-prepend-path"
            | "server-state-file"
            | "server-state-base"
            | "setenv"
            | "presetenv"
            | "resetenv"
            | "unsetenv"
            | "description"
            | "node"
            | "quiet"
            | "zero-warning"
            | "maxsslconn"
            | "maxconnrate"
            | "maxsessrate"
            | "maxsslrate"
            | "maxpipes"
            | "maxcomprate"
            | "maxcompcpuusage"
            | "noepoll"
            | "nosplice"
            | "nogetaddrinfo"
            | "noreuseport"
            | "busy-polling"
            | "set-dumpable"
            | "strict-limits"
            | "h1-case-adjust"
            | "h1-case-adjust-file"
            | "insecure-fork-wanted"
            | "external-check"
            | "expose-experimental-directives"
            | "pp2-never-send-local"
            | "stats-file"
            | "thread-groups"
            | "numa-cpu-mapping"
            | "profiling.tasks"
            | "unix-bind"
            | "httpclient.resolvers.disabled"
            | "grace"
            | "close-spread-time" => report.add(line, Topic::OtherGlobal, None),
            _ => report.add(line, Topic::Unknown, None),
        }
    }
}

/// One `peers` section.
#[derive(Clone, Debug)]
pub struct PeersDef {
    pub name: String,
    pub header: Line,
    /// Each peer, its address (mapped) and its line.
    pub peers: Vec<(String, SocketAddr, Line)>,
}

/// Reads a `peers` section: `peer NAME ADDR:PORT`, or the newer `bind` + `server NAME [ADDR]`.
pub fn peers(section: &Section, maps: &[AddressMap], report: &mut Report) -> PeersDef {
    let mut def = PeersDef {
        name: section.name().unwrap_or_default().to_owned(),
        header: section.header.clone(),
        peers: Vec::new(),
    };
    let mut bind: Option<SocketAddr> = None;
    let mut local_server: Option<(String, Line)> = None;
    for line in &section.body {
        let args = line.args();
        let name = args.first().cloned().unwrap_or_default();
        match (line.keyword(), args.get(1)) {
            ("peer" | "server", Some(addr)) => match address::parse_with_port(addr) {
                Ok(a) => def.peers.push((name, address::map(maps, a), line.clone())),
                Err(e) => report.add(line, Topic::PeersOther, Some(e.to_string())),
            },
            ("server", None) => local_server = Some((name, line.clone())),
            ("bind", Some(_)) | ("bind", None) => {
                match args.first().map(|a| address::parse_with_port(a)) {
                    Some(Ok(a)) => bind = Some(address::map(maps, a)),
                    _ => report.add(line, Topic::PeersOther, None),
                }
            }
            _ => report.add(line, Topic::PeersOther, None),
        }
    }
    if let Some((name, line)) = local_server {
        match bind {
            Some(a) => def.peers.push((name, a, line)),
            None => report.add(&line, Topic::PeersOther, Some("no bind address".to_owned())),
        }
    }
    def
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::lexer::lex;
    use crate::import::sections::split;

    #[test]
    fn global_settings_and_the_lending_socket() {
        let text = "global\n maxconn 20000\n user haproxy\n group haproxy\n nbthread 4\n\
                    hard-stop-after 30s\n stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners\n\
                    crt-base /etc/ssl\n ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets\n bogus 1\n";
        let s = split(lex(text).expect("lexes"));
        let mut g = Global::default();
        let mut r = Report::new("g.cfg".into());
        global(&s.sections[0], &mut g, &mut r);
        assert_eq!(g.maxconn.as_ref().map(|m| m.0), Some(20000));
        assert_eq!(g.user.as_deref(), Some("haproxy"));
        assert_eq!(g.nbthread, Some(4));
        assert_eq!(
            g.hard_stop_after.map(|d| d.to_string()).as_deref(),
            Some("30s")
        );
        assert!(g.expose_fd);
        assert_eq!(g.min_version.as_deref(), Some("1.2"));
        let topics: Vec<_> = r.entries().iter().map(|e| e.topic).collect();
        assert_eq!(
            topics,
            [
                Topic::GlobalMaxconn,
                Topic::StatsSocket,
                Topic::SslDefaults,
                Topic::Unknown
            ]
        );
    }

    #[test]
    fn peers_old_and_new_syntax_with_maps() {
        let maps: Vec<AddressMap> = vec!["192.168.100.59=127.0.0.1".parse().expect("map")];
        let text = "peers a\n peer haproxy1 192.168.100.59:12138\n peer haproxy2 192.168.100.54:12138\n\
                    peers b\n bind 10.0.0.1:1024\n server me\n server other 10.0.0.2:1024\n";
        let s = split(lex(text).expect("lexes"));
        let mut r = Report::new("p.cfg".into());
        let a = peers(&s.sections[0], &maps, &mut r);
        let b = peers(&s.sections[1], &maps, &mut r);
        assert!(r.is_empty(), "{r}");
        assert_eq!(a.peers[0].1, "127.0.0.1:12138".parse().expect("addr"));
        assert_eq!(a.peers[1].1, "192.168.100.54:12138".parse().expect("addr"));
        let names: Vec<_> = b
            .peers
            .iter()
            .map(|p| (p.0.as_str(), p.1.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                ("other", "10.0.0.2:1024".to_owned()),
                ("me", "10.0.0.1:1024".to_owned())
            ]
        );
    }

    #[test]
    fn log_to_a_unix_socket_is_syslog_a_network_address_goes_through_dev_log() {
        let read = |text: &str| {
            let s = split(lex(text).expect("lexes"));
            let mut g = Global::default();
            let mut r = Report::new("g.cfg".into());
            global(&s.sections[0], &mut g, &mut r);
            let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
            (g.log, topics)
        };
        let (log, topics) = read("global\n log /run/log.sock local3\n log 10.0.0.1 local0\n");
        assert_eq!(
            log,
            [
                ("access_log", "\"syslog\"".to_owned(), 2),
                ("syslog_socket", "\"/run/log.sock\"".to_owned(), 2),
                ("syslog_facility", "\"local3\"".to_owned(), 2),
            ]
        );
        assert_eq!(topics, [(Some(3), Topic::LogRemote)]);
        let (log, topics) = read("global\n log 127.0.0.1:514 local2 notice\n");
        assert_eq!(log[1].1, "\"/dev/log\"");
        assert_eq!(log[2].1, "\"local2\"");
        assert_eq!(
            topics,
            [(Some(2), Topic::LogRemote), (Some(2), Topic::LogRemote)]
        );
    }
}
