//! One `defaults`, `frontend`, `backend` or `listen` section read into what proxyd can use;
//! every line it cannot use goes to the report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use common::Duration;

use super::address::{self, AddressMap};
use super::bind::BindDef;
use super::catalog::Topic;
use super::lexer::Line;
use super::params::{Param, balance, cookie, server_param, timeout};
use super::report::Report;
use super::sections::{Kind, Section};
use super::stick::{StickDef, TableDef};

/// A value and the line that wrote it (in the proxy or in its defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub line: usize,
}

pub(super) fn at<T>(value: T, line: &Line) -> Option<At<T>> {
    Some(At {
        value,
        line: line.no,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Http,
    Tcp,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

/// The timeouts proxyd has, by HAProxy's name.
pub const TIMEOUTS: &[(&str, &str)] = &[
    ("connect", "timeout_connect"),
    ("client", "timeout_client"),
    ("server", "timeout_server"),
    ("http-request", "timeout_http_request"),
    ("http-keep-alive", "timeout_http_keep_alive"),
    ("queue", "timeout_queue"),
    ("check", "timeout_check"),
    ("tunnel", "timeout_tunnel"),
];

/// What a proxy inherits from its `defaults` section.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub mode: Option<At<Mode>>,
    pub maxconn: Option<At<u64>>,
    pub retries: Option<At<u32>>,
    pub redispatch: Option<At<bool>>,
    /// `option forwardfor`: its `except` network; `None` inside: without one.
    pub forwardfor: Option<At<Option<Option<String>>>>,
    pub forwarded: Option<At<bool>>,
    /// By proxyd's key (`timeout_connect`).
    pub timeouts: BTreeMap<&'static str, At<Duration>>,
    /// `balance`, as proxyd's TOML value.
    pub balance: Option<At<Balance>>,
    /// `cookie NAME ...`: the backend's `cookie = {...}` as a TOML inline table.
    pub cookie: Option<At<String>>,
    /// `option httplog`: HAProxy's fields, proxyd's `access_log_format = "httplog"`.
    pub httplog: Option<At<bool>>,
    /// `option httpchk`: method and path.
    pub httpchk: Option<At<(String, String)>>,
    /// The Host header of the check (`option httpchk ... VERSION`, `http-check send hdr`).
    pub check_host: Option<At<String>>,
    pub expect_status: Option<At<u16>>,
    /// `default-server` lines, applied before each server's own parameters.
    pub default_server: Vec<Line>,
    pub default_backend: Option<At<String>>,
}

/// proxyd's `balance` of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    /// The TOML value: `"roundrobin"`, `{ type = "uri", whole = true }`, ...
    pub toml: String,
    /// `uri` and `hdr` hash an HTTP request: a tcp frontend cannot use them.
    pub http: bool,
}

impl Balance {
    pub fn plain(name: &str) -> Balance {
        Balance {
            toml: format!("\"{name}\""),
            http: false,
        }
    }
}

/// Where a server is: an address, or a name proxyd resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddress {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddress::Ip(a) => write!(f, "{a}"),
            ServerAddress::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerDef {
    pub name: String,
    pub address: ServerAddress,
    pub line: usize,
    pub check: bool,
    pub weight: Option<u32>,
    pub maxconn: Option<u32>,
    pub inter: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    /// Its value in the backend's persistence cookie.
    pub cookie: Option<String>,
    /// The `resolvers` section of a server named by DNS.
    pub resolvers: Option<String>,
    pub resolve_prefer: Option<String>,
    pub pool_purge_delay: Option<At<Duration>>,
}

/// A frontend, backend or listen section as proxyd can use it.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub kind: Kind,
    pub name: String,
    pub header: Line,
    pub settings: Settings,
    pub binds: Vec<BindDef>,
    pub backlog: Option<u32>,
    pub servers: Vec<ServerDef>,
    pub table: Option<TableDef>,
    pub stick: StickDef,
    /// `option forwardfor` written in this frontend section itself.
    pub forwardfor_here: Option<Line>,
    /// `stats enable` (or another `stats` line): a stats page.
    pub stats: Option<Line>,
    /// `acl` lines of a frontend or listen section, in order.
    pub acls: Vec<Line>,
    /// Its `http-request`, `redirect`, `use_backend`, `http-response` and `http-after-response`
    /// lines, in order: [`super::rules`] translates them once the backends are known.
    pub rules: Vec<Line>,
}

/// What reading a proxy needs besides its lines.
pub struct Context<'a> {
    pub report: &'a mut Report,
    pub maps: &'a [AddressMap],
    pub crt_base: Option<&'a Path>,
    /// `ssl-min-ver` of `ssl-default-bind-options`.
    pub default_min_version: Option<String>,
}

/// Reads a `defaults` section: the settings it hands down.
pub fn defaults(section: &Section, cx: &mut Context<'_>) -> Settings {
    let mut p = Proxy::new(section, Settings::default());
    for line in &section.body {
        p.directive(line, cx);
    }
    p.settings
}

/// Reads a frontend, backend or listen section on top of its defaults.
pub fn proxy(section: &Section, inherited: &Settings, cx: &mut Context<'_>) -> Proxy {
    let mut p = Proxy::new(section, inherited.clone());
    if section.kind == Kind::Backend {
        p.settings.default_backend = None;
    }
    for line in &section.body {
        p.directive(line, cx);
    }
    p
}

impl Proxy {
    fn new(section: &Section, settings: Settings) -> Self {
        Proxy {
            kind: section.kind.clone(),
            name: section.name().unwrap_or_default().to_owned(),
            header: section.header.clone(),
            settings,
            binds: Vec::new(),
            backlog: None,
            servers: Vec::new(),
            table: None,
            stick: StickDef::default(),
            forwardfor_here: None,
            stats: None,
            acls: Vec::new(),
            rules: Vec::new(),
        }
    }

    fn is(&self, kinds: &[Kind]) -> bool {
        kinds.contains(&self.kind)
    }

    fn directive(&mut self, line: &Line, cx: &mut Context<'_>) {
        let args = line.args();
        let arg = |i: usize| args.get(i).map_or("", String::as_str);
        let binds = self.is(&[Kind::Frontend, Kind::Listen]);
        let front = self.is(&[Kind::Frontend, Kind::Listen, Kind::Defaults]);
        let back = self.is(&[Kind::Backend, Kind::Listen, Kind::Defaults]);
        let proxy_back = self.is(&[Kind::Backend, Kind::Listen]);
        let s = &mut self.settings;
        match line.keyword() {
            "mode" => match arg(0) {
                "http" => s.mode = at(Mode::Http, line),
                "tcp" => s.mode = at(Mode::Tcp, line),
                other => cx
                    .report
                    .add(line, Topic::Unknown, Some(format!("mode {other}"))),
            },
            "bind" if binds => self.bind(line, cx),
            "backlog" => match arg(0).parse() {
                Ok(n) => self.backlog = Some(n),
                Err(_) => cx.report.add(line, Topic::Unknown, None),
            },
            "timeout" => timeout(s, line, arg(0), arg(1), cx.report),
            "contimeout" => timeout(s, line, "connect", arg(0), cx.report),
            "clitimeout" => timeout(s, line, "client", arg(0), cx.report),
            "srvtimeout" => timeout(s, line, "server", arg(0), cx.report),
            "maxconn" if self.kind == Kind::Backend => cx.report.add(line, Topic::Fullconn, None),
            "fullconn" => cx.report.add(line, Topic::Fullconn, None),
            "maxconn" => match arg(0).parse::<u64>() {
                Ok(n) => s.maxconn = at(n, line),
                Err(_) => cx.report.add(line, Topic::Unknown, None),
            },
            "retries" => match arg(0).parse::<u32>() {
                Ok(n) if n <= 10 => s.retries = at(n, line),
                Ok(_) => {
                    s.retries = at(10, line);
                    cx.report.add(line, Topic::RetriesMax, None);
                }
                Err(_) => cx.report.add(line, Topic::Unknown, None),
            },
            "redispatch" => s.redispatch = at(true, line),
            "option" => self.option(line, true, cx),
            "no" if arg(0) == "option" => self.option(line, false, cx),
            "log" if arg(0) == "global" => {}
            "log" => cx.report.add(line, Topic::LogProxy, None),
            "log-format" | "log-format-sd" | "error-log-format" => {
                cx.report.add(line, Topic::LogFormat, None)
            }
            "balance" if back => s.balance = at(balance(args, line, cx.report), line),
            "hash-type" | "hash-balance-factor" => {
                cx.report.add(line, Topic::OtherProxy, None);
            }
            "http-check" => self.http_check(line, cx.report),
            "tcp-check" => cx.report.add(line, Topic::OtherCheck, None),
            "default_backend" if front => {
                s.default_backend = at(arg(0).to_owned(), line);
            }
            "server" if proxy_back => self.server(line, cx),
            "default-server" => s.default_server.push(line.clone()),
            "stick-table" if proxy_back => self.stick_table(line, cx.report),
            "stick" if proxy_back => self.stick(line, cx.report),
            "acl" if binds => self.acls.push(line.clone()),
            "use_backend"
            | "http-request"
            | "redirect"
            | "http-response"
            | "http-after-response"
                if binds =>
            {
                self.rules.push(line.clone())
            }
            "use-server" => cx.report.add(line, Topic::UseServer, None),
            "acl" | "use_backend" => cx.report.add(
                line,
                Topic::AclOther,
                Some("outside a frontend: proxyd's rules belong to frontends".to_owned()),
            ),
            "http-request" | "http-response" | "http-after-response" | "redirect" => cx.report.add(
                line,
                Topic::HttpRulesOther,
                Some("outside a frontend: proxyd's rules belong to frontends".to_owned()),
            ),
            k if k.starts_with("req") || k.starts_with("rsp") => cx.report.add(
                line,
                Topic::HttpRulesOther,
                Some(format!("{k}: removed in HAProxy 2.1")),
            ),
            "tcp-request" | "tcp-response" => cx.report.add(line, Topic::TcpRules, None),
            "cookie" if back => s.cookie = cookie(args, line, cx.report).and_then(|c| at(c, line)),
            "cookie" | "appsession" => cx.report.add(line, Topic::CookieOther, None),
            "stats" => {
                self.stats.get_or_insert_with(|| line.clone());
                cx.report.add(line, Topic::StatsPage, None);
            }
            "http-reuse" => cx.report.add(line, Topic::HttpReuse, None),
            "errorfile" | "errorfiles" | "errorloc" | "errorloc302" | "errorloc303"
            | "http-error" => cx.report.add(line, Topic::Errors, None),
            "compression"
            | "capture"
            | "monitor-uri"
            | "monitor"
            | "monitor-net"
            | "description"
            | "id"
            | "unique-id-format"
            | "unique-id-header"
            | "email-alert"
            | "persist"
            | "rate-limit"
            | "dispatch"
            | "source"
            | "server-template"
            | "http-send-name-header"
            | "ignore-persist"
            | "force-persist"
            | "max-keep-alive-queue"
            | "load-server-state-from-file"
            | "server-state-file-name"
            | "enabled"
            | "disabled"
            | "filter"
            | "declare"
            | "http-restrict-req-hdr-names"
            | "max-session-srv-conns" => cx.report.add(line, Topic::OtherProxy, None),
            _ => cx.report.add(line, Topic::Unknown, None),
        }
    }

    fn server(&mut self, line: &Line, cx: &mut Context<'_>) {
        let args = line.args();
        let name = args.first().cloned().unwrap_or_default();
        let text = args.get(1).map_or("", String::as_str);
        let addr = match address::parse_with_port(text) {
            Ok(a) => ServerAddress::Ip(address::map(cx.maps, a)),
            Err(e) => match address::host_name(text) {
                Some((host, port)) => ServerAddress::Name { host, port },
                None => {
                    cx.report
                        .add(line, Topic::ServerAddress, Some(e.to_string()));
                    return;
                }
            },
        };
        let mut srv = ServerDef {
            name,
            address: addr,
            line: line.no,
            check: false,
            weight: None,
            maxconn: None,
            inter: None,
            rise: None,
            fall: None,
            cookie: None,
            resolvers: None,
            resolve_prefer: None,
            pool_purge_delay: None,
        };
        // The backend's default-server lines first, then the server's own words.
        let mut sources: Vec<(&Line, &[String])> = self
            .settings
            .default_server
            .iter()
            .map(|l| (l, l.args()))
            .collect();
        sources.push((line, &args[2..]));
        let mut left_out = false;
        for (from, words) in sources {
            let mut i = 0;
            while i < words.len() {
                let value = words.get(i + 1).map_or("", String::as_str);
                let taken = server_param(&mut srv, &words[i], value, from, cx.report);
                left_out |= taken == Param::LeftOut;
                i += if taken == Param::WithValue { 2 } else { 1 };
            }
        }
        if !left_out {
            self.servers.push(srv);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::import::lexer::lex;
    use crate::import::sections::split;

    pub(in crate::import) fn read(text: &str) -> (Vec<Proxy>, Report) {
        let mut report = Report::new("t.cfg".into());
        let mut cx = Context {
            report: &mut report,
            maps: &[],
            crt_base: Some(Path::new("/etc/ssl/private")),
            default_min_version: None,
        };
        let mut defaults = Settings::default();
        let mut out = Vec::new();
        for s in split(lex(text).expect("lexes")).sections {
            match s.kind {
                Kind::Defaults => defaults = super::defaults(&s, &mut cx),
                _ => out.push(proxy(&s, &defaults, &mut cx)),
            }
        }
        (out, report)
    }

    #[test]
    fn a_backend_inherits_its_defaults_and_overrides_them() {
        let (p, r) = read(
            "defaults\n mode http\n timeout connect 1s\n option redispatch\n\
             backend b\n timeout connect 3s\n balance leastconn\n\
             server a 10.0.0.1:80 check rise 1 maxconn 30 weight 2 inter 500ms\n",
        );
        assert!(r.is_empty(), "{r}");
        let b = &p[0];
        assert_eq!(b.settings.mode.as_ref().map(|m| m.value), Some(Mode::Http));
        assert_eq!(b.settings.timeouts["timeout_connect"].line, 6);
        assert_eq!(b.settings.redispatch.as_ref().map(|r| r.line), Some(4));
        let s = &b.servers[0];
        assert!(s.check);
        assert_eq!((s.rise, s.maxconn, s.weight), (Some(1), Some(30), Some(2)));
        assert_eq!(s.inter.map(|d| d.to_string()).as_deref(), Some("500ms"));
    }

    #[test]
    fn backup_disabled_and_portless_servers_are_left_out_and_reported() {
        let (p, r) = read(
            "backend b\n default-server inter 3s\n server a 10.0.0.1:80\n server b 10.0.0.2:80 backup\n\
             server c App.Local:80\n server d 10.0.0.4:80 disabled send-proxy\n server e app.local\n",
        );
        let names: Vec<_> = p[0].servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(
            p[0].servers[0].inter.map(|d| d.to_string()).as_deref(),
            Some("3s")
        );
        assert_eq!(p[0].servers[1].address.to_string(), "app.local:80");
        let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(
            topics,
            [
                (Some(4), Topic::ServerBackup),
                (Some(6), Topic::ServerDisabled),
                (Some(6), Topic::ServerParam),
                (Some(7), Topic::ServerAddress),
            ]
        );
    }

    #[test]
    fn balance_algorithms_proxyd_has_and_the_rest() {
        let (p, r) = read(
            "backend a\n balance uri whole depth 2\nbackend b\n balance hdr(Host)\n\
             backend c\n balance random\nbackend d\n balance uri len 10\nbackend e\n balance url_param id\n",
        );
        let toml: Vec<_> = p
            .iter()
            .map(|b| b.settings.balance.as_ref().map(|b| b.value.toml.clone()))
            .collect();
        assert_eq!(
            toml,
            [
                Some("{ type = \"uri\", whole = true, depth = 2 }".to_owned()),
                Some("\"hdr(Host)\"".to_owned()),
                Some("\"random\"".to_owned()),
                Some("\"uri\"".to_owned()),
                Some("\"roundrobin\"".to_owned()),
            ]
        );
        assert!(p[0].settings.balance.as_ref().is_some_and(|b| b.value.http));
        let lines: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(
            lines,
            [
                (Some(8), Topic::BalanceOther),
                (Some(10), Topic::BalanceOther)
            ]
        );
    }

    #[test]
    fn insert_cookies_and_server_values_translate_rewrite_does_not() {
        let (p, r) = read(
            "defaults\n cookie SRV insert indirect nocache httponly domain example.com maxlife 1h\n\
             backend a\n server w1 10.0.0.1:80 cookie w1\nbackend b\n cookie JSESSIONID prefix\n\
             server w2 10.0.0.2:80\nbackend c\n cookie SRV\n server w3 10.0.0.3:80\n",
        );
        assert_eq!(
            p[0].settings.cookie.as_ref().map(|c| c.value.as_str()),
            Some(
                "{ name = \"SRV\", indirect = true, nocache = true, httponly = true, \
                 domain = \"example.com\", max_age = \"1h\", insert = true }"
            )
        );
        assert_eq!(p[0].servers[0].cookie.as_deref(), Some("w1"));
        assert!(p[1].settings.cookie.is_none());
        assert_eq!(
            p[2].settings.cookie.as_ref().map(|c| c.value.as_str()),
            Some("{ name = \"SRV\", insert = false }")
        );
        let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(
            topics,
            [
                (Some(2), Topic::CookieMaxlife),
                (Some(6), Topic::CookieOther)
            ]
        );
    }

    #[test]
    fn option_httplog_is_translated_other_formats_are_not() {
        let (p, r) = read("frontend f\n option httplog\n option tcplog\n log 10.0.0.1 local0\n");
        assert_eq!(p[0].settings.httplog.as_ref().map(|h| h.line), Some(2));
        let topics: Vec<_> = r.entries().iter().map(|e| e.topic).collect();
        assert_eq!(topics, [Topic::LogFormat, Topic::LogProxy]);
    }
}
