//! One `defaults`, `frontend`, `backend` or `listen` section read into what proxyd can use;
//! every line it cannot use goes to the report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use common::{Duration, Size};

use super::address::{self, AddressMap};
use super::catalog::Topic;
use super::lexer::Line;
use super::params::{
    BIND_VALUE_PARAMS, Param, balance, cert_path, cookie, cookie_of, redirects_to_https,
    server_param, timeout,
};
use super::report::Report;
use super::sections::{Kind, Section};

/// A value and the line that wrote it (in the proxy or in its defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub line: usize,
}

fn at<T>(value: T, line: &Line) -> Option<At<T>> {
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

/// A `bind` address and its TLS.
#[derive(Clone, Debug)]
pub struct BindDef {
    pub address: SocketAddr,
    pub tls: Option<TlsDef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsDef {
    pub certs: Vec<String>,
    pub alpn: Option<Vec<String>>,
    pub min_version: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ServerDef {
    pub name: String,
    pub address: SocketAddr,
    pub line: usize,
    pub check: bool,
    pub weight: Option<u32>,
    pub maxconn: Option<u32>,
    pub inter: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    /// Its value in the backend's persistence cookie.
    pub cookie: Option<String>,
}

/// `stick-table`.
#[derive(Clone, Debug)]
pub struct TableDef {
    pub line: Line,
    /// `ip`, `ipv6`, `integer` or `string`.
    pub kind: String,
    pub len: Option<u32>,
    pub size: Size,
    pub expire: Option<Duration>,
    pub peers: Option<String>,
}

/// What a stick rule keys on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    Cookie(String),
    Src,
}

impl Fetch {
    pub fn text(&self) -> String {
        match self {
            Fetch::Cookie(c) => format!("req.cook({c})"),
            Fetch::Src => "src".to_owned(),
        }
    }
}

/// A stick rule as written: its fetch, its table and its line.
#[derive(Clone, Debug)]
pub struct Rule<T> {
    pub fetch: T,
    pub table: Option<String>,
    pub line: Line,
}

#[derive(Clone, Debug, Default)]
pub struct StickDef {
    pub on: Option<Rule<Fetch>>,
    pub matches: Option<Rule<Fetch>>,
    pub store_request: Option<Rule<Fetch>>,
    /// The response cookie's name.
    pub store_response: Option<Rule<String>>,
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
    /// `redirect scheme https` of plain requests: the plain binds redirect.
    pub redirect_https: bool,
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
            redirect_https: false,
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
            "acl" | "use_backend" | "use-server" => cx.report.add(line, Topic::Acl, None),
            "http-request" | "redirect" if binds && redirects_to_https(line) => {
                self.redirect_https = true;
                cx.report.add(line, Topic::RedirectHttps, None);
            }
            "http-request" | "http-response" | "http-after-response" | "redirect" => {
                cx.report.add(line, Topic::HttpRules, None)
            }
            k if k.starts_with("req") || k.starts_with("rsp") => {
                cx.report.add(line, Topic::HttpRules, None)
            }
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

    fn option(&mut self, line: &Line, on: bool, cx: &mut Context<'_>) {
        // `option X ...` or `no option X ...`.
        let words: &[String] = if on { line.args() } else { &line.args()[1..] };
        let name = words.first().map_or("", String::as_str);
        let rest = words.get(1..).unwrap_or(&[]);
        let s = &mut self.settings;
        match name {
            "redispatch" => s.redispatch = at(on, line),
            "httplog" if on && rest.is_empty() => s.httplog = at(true, line),
            "httplog" | "tcplog" | "httpslog" | "clf" => {
                cx.report.add(line, Topic::LogFormat, None)
            }
            "dontlognull" | "http-keep-alive" | "tcp-check" => {}
            "forwardfor" if !on => s.forwardfor = at(None, line),
            "forwardfor" => {
                let mut except = None;
                let mut i = 0;
                while i < rest.len() {
                    match rest[i].as_str() {
                        "except" => {
                            except = rest.get(i + 1).cloned();
                            i += 1;
                        }
                        _ => cx.report.add(line, Topic::ForwardforParam, None),
                    }
                    i += 1;
                }
                s.forwardfor = at(Some(except), line);
                if self.kind == Kind::Frontend {
                    self.forwardfor_here = Some(line.clone());
                }
            }
            "forwarded" => {
                s.forwarded = at(on, line);
                if !rest.is_empty() {
                    cx.report.add(line, Topic::ForwardedParam, None);
                }
            }
            "http-server-close" | "httpclose" | "forceclose" => {
                cx.report.add(line, Topic::HttpServerClose, None);
            }
            "httpchk" if on => {
                let (method, path) = match rest {
                    [] => ("OPTIONS", "/"),
                    [uri] => ("OPTIONS", uri.as_str()),
                    [m, uri, ..] => (m.as_str(), uri.as_str()),
                };
                if rest.len() > 2 {
                    cx.report.add(line, Topic::HttpchkVersion, None);
                }
                s.httpchk = at((method.to_owned(), path.to_owned()), line);
            }
            "ssl-hello-chk" | "mysql-check" | "pgsql-check" | "redis-check" | "smtpchk"
            | "ldap-check" | "spop-check" | "external-check" => {
                cx.report.add(line, Topic::OtherCheck, None)
            }
            _ => cx
                .report
                .add(line, Topic::OtherProxy, Some(format!("option {name}"))),
        }
    }

    fn http_check(&mut self, line: &Line, report: &mut Report) {
        let args: Vec<&str> = line.args().iter().map(String::as_str).collect();
        match args.as_slice() {
            ["expect", "status", code] => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => self.settings.expect_status = at(c, line),
                _ => report.add(line, Topic::HttpCheckOther, None),
            },
            ["send", rest @ ..] => {
                let mut method = None;
                let mut path = None;
                let mut other = false;
                for pair in rest.chunks(2) {
                    match pair {
                        ["meth", m] => method = Some(m.to_string()),
                        ["uri", u] => path = Some(u.to_string()),
                        _ => other = true,
                    }
                }
                if other {
                    report.add(line, Topic::HttpCheckOther, None);
                }
                let (m0, p0) = self
                    .settings
                    .httpchk
                    .as_ref()
                    .map_or(("OPTIONS".to_owned(), "/".to_owned()), |c| c.value.clone());
                self.settings.httpchk = at((method.unwrap_or(m0), path.unwrap_or(p0)), line);
            }
            _ => report.add(line, Topic::HttpCheckOther, None),
        }
    }

    fn bind(&mut self, line: &Line, cx: &mut Context<'_>) {
        let args = line.args();
        let Some(addrs) = args.first() else {
            cx.report.add(line, Topic::BindUnsupported, None);
            return;
        };
        let mut tls = TlsDef {
            min_version: cx.default_min_version.clone(),
            ..TlsDef::default()
        };
        let mut ssl = false;
        let mut i = 1;
        while i < args.len() {
            let value = args.get(i + 1).cloned().unwrap_or_default();
            match args[i].as_str() {
                "ssl" => ssl = true,
                "crt" => {
                    tls.certs.push(cert_path(cx.crt_base, &value));
                    i += 1;
                }
                "alpn" => {
                    tls.alpn = Some(value.split(',').map(str::to_owned).collect());
                    i += 1;
                }
                "ssl-min-ver" => {
                    match value.as_str() {
                        "TLSv1.2" => tls.min_version = Some("1.2".to_owned()),
                        "TLSv1.3" => tls.min_version = Some("1.3".to_owned()),
                        _ => cx.report.add(
                            line,
                            Topic::BindParam,
                            Some(format!("ssl-min-ver {value}")),
                        ),
                    }
                    i += 1;
                }
                "backlog" => {
                    match value.parse() {
                        Ok(n) => self.backlog = Some(n),
                        Err(_) => cx.report.add(line, Topic::BindParam, None),
                    }
                    i += 1;
                }
                p if BIND_VALUE_PARAMS.contains(&p) => {
                    cx.report
                        .add(line, Topic::BindParam, Some(format!("{p} {value}")));
                    i += 1;
                }
                p => cx.report.add(line, Topic::BindParam, Some(p.to_owned())),
            }
            i += 1;
        }
        let tls = match (ssl, tls.certs.is_empty()) {
            (true, false) => Some(tls),
            (false, _) => None,
            (true, true) => {
                cx.report
                    .add(line, Topic::BindParam, Some("ssl without crt".to_owned()));
                return;
            }
        };
        for a in addrs.split(',') {
            match address::parse_with_port(a) {
                Ok(addr) => self.binds.push(BindDef {
                    address: address::map(cx.maps, addr),
                    tls: tls.clone(),
                }),
                Err(e) => cx
                    .report
                    .add(line, Topic::BindUnsupported, Some(e.to_string())),
            }
        }
    }

    fn server(&mut self, line: &Line, cx: &mut Context<'_>) {
        let args = line.args();
        let name = args.first().cloned().unwrap_or_default();
        let addr = match args.get(1).map(|a| address::parse_with_port(a)) {
            Some(Ok(a)) => address::map(cx.maps, a),
            Some(Err(e)) => {
                cx.report
                    .add(line, Topic::ServerAddress, Some(e.to_string()));
                return;
            }
            None => {
                cx.report.add(line, Topic::ServerAddress, None);
                return;
            }
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

    fn stick_table(&mut self, line: &Line, report: &mut Report) {
        let args = line.args();
        let mut t = TableDef {
            line: line.clone(),
            kind: String::new(),
            len: None,
            size: Size(0),
            expire: None,
            peers: None,
        };
        let mut i = 0;
        while i < args.len() {
            let value = args.get(i + 1).map_or("", String::as_str);
            let mut step = 2;
            match args[i].as_str() {
                "type" => t.kind = value.to_owned(),
                "len" => t.len = value.parse().ok(),
                "size" => t.size = value.parse().unwrap_or(Size(0)),
                "expire" => t.expire = value.parse().ok(),
                "peers" => t.peers = Some(value.to_owned()),
                "nopurge" | "recv-only" => {
                    report.add(line, Topic::StickTableParam, Some(args[i].clone()));
                    step = 1;
                }
                other => report.add(
                    line,
                    Topic::StickTableParam,
                    Some(format!("{other} {value}")),
                ),
            }
            i += step;
        }
        if !matches!(t.kind.as_str(), "ip" | "ipv6" | "integer" | "string") || t.size.0 == 0 {
            report.add(
                line,
                Topic::StickTableParam,
                Some(format!("type {}", t.kind)),
            );
            return;
        }
        if t.expire.is_none() {
            report.add(line, Topic::StickTableNoExpire, None);
        }
        self.table = Some(t);
    }

    fn stick(&mut self, line: &Line, report: &mut Report) {
        let args = line.args();
        let (what, fetch) = (
            args.first().map_or("", String::as_str),
            args.get(1).map_or("", String::as_str),
        );
        let mut table = None;
        let rest = args.get(2..).unwrap_or(&[]);
        match rest {
            [] => {}
            [t, name] if t == "table" => table = Some(name.clone()),
            _ => {
                report.add(line, Topic::StickOther, Some("a condition".to_owned()));
                return;
            }
        }
        let request_fetch = || match fetch {
            "src" => Some(Fetch::Src),
            f => cookie_of(f, "req.cook")
                .or_else(|| cookie_of(f, "cookie"))
                .map(Fetch::Cookie),
        };
        let slot_taken = |report: &mut Report, taken: bool| {
            if taken {
                report.add(line, Topic::StickOther, Some("a second rule".to_owned()));
            }
            taken
        };
        let rule = |fetch| Rule {
            fetch,
            table: table.clone(),
            line: line.clone(),
        };
        match what {
            "on" | "match" | "store-request" => {
                let Some(f) = request_fetch() else {
                    report.add(line, Topic::StickOther, Some(format!("fetch {fetch}")));
                    return;
                };
                let slot = match what {
                    "on" => &mut self.stick.on,
                    "match" => &mut self.stick.matches,
                    _ => &mut self.stick.store_request,
                };
                if !slot_taken(report, slot.is_some()) {
                    *slot = Some(rule(f));
                }
            }
            "store-response" => {
                let Some(c) =
                    cookie_of(fetch, "res.cook").or_else(|| cookie_of(fetch, "set-cookie"))
                else {
                    report.add(line, Topic::StickOther, Some(format!("fetch {fetch}")));
                    return;
                };
                if !slot_taken(report, self.stick.store_response.is_some()) {
                    self.stick.store_response = Some(Rule {
                        fetch: c,
                        table,
                        line: line.clone(),
                    });
                }
            }
            _ => report.add(line, Topic::StickOther, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::lexer::lex;
    use crate::import::sections::split;

    fn read(text: &str) -> (Vec<Proxy>, Report) {
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
    fn backup_and_disabled_servers_are_left_out_and_reported() {
        let (p, r) = read(
            "backend b\n default-server inter 3s\n server a 10.0.0.1:80\n server b 10.0.0.2:80 backup\n\
             server c app.local:80\n server d 10.0.0.4:80 disabled send-proxy\n",
        );
        let names: Vec<_> = p[0].servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(
            p[0].servers[0].inter.map(|d| d.to_string()).as_deref(),
            Some("3s")
        );
        let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(
            topics,
            [
                (Some(4), Topic::ServerBackup),
                (Some(5), Topic::ServerAddress),
                (Some(6), Topic::ServerDisabled),
                (Some(6), Topic::ServerParam),
            ]
        );
    }

    #[test]
    fn tls_binds_take_crt_base_alpn_and_min_version() {
        let (p, r) = read(
            "frontend f\n bind :443,:8443 ssl crt site.pem crt /x/y.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3 accept-proxy\n bind 10.0.0.1:80\n",
        );
        let f = &p[0];
        assert_eq!(f.binds.len(), 3);
        let tls = f.binds[0].tls.as_ref().expect("tls");
        assert_eq!(tls.certs, ["/etc/ssl/private/site.pem", "/x/y.pem"]);
        assert_eq!(
            tls.alpn.as_deref(),
            Some(&["h2".to_owned(), "http/1.1".to_owned()][..])
        );
        assert_eq!(tls.min_version.as_deref(), Some("1.3"));
        assert!(f.binds[2].tls.is_none());
        let e = r.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].detail.as_deref(), Some("accept-proxy"));
    }

    #[test]
    fn stick_rules_and_tables() {
        let (p, r) = read(
            "backend b\n stick-table type string len 32 size 5k expire 5m peers mypeers\n\
             stick on req.cook(PHPSESSID)\n stick store-response res.cook(PHPSESSID)\n\
             stick match hdr(x)\n stick on src if { src 1.2.3.4 }\n",
        );
        let b = &p[0];
        let t = b.table.as_ref().expect("table");
        assert_eq!(
            (t.kind.as_str(), t.len, t.size.0),
            ("string", Some(32), 5120)
        );
        assert_eq!(t.peers.as_deref(), Some("mypeers"));
        assert_eq!(
            b.stick.on.as_ref().map(|r| r.fetch.clone()),
            Some(Fetch::Cookie("PHPSESSID".into()))
        );
        assert_eq!(
            b.stick.store_response.as_ref().map(|r| r.fetch.as_str()),
            Some("PHPSESSID")
        );
        let lines: Vec<_> = r.entries().iter().map(|e| e.line).collect();
        assert_eq!(lines, [Some(5), Some(6)]);
    }

    #[test]
    fn options_and_checks() {
        let (p, r) = read(
            "backend b\n option httpchk GET /index.php\n http-check expect status 204\n\
             option forwardfor except 127.0.0.0/8\n option http-server-close\n no option redispatch\n\
             timeout server 0\n timeout server-fin 1s\n",
        );
        let s = &p[0].settings;
        assert_eq!(
            s.httpchk.as_ref().map(|c| c.value.clone()),
            Some(("GET".to_owned(), "/index.php".to_owned()))
        );
        assert_eq!(s.expect_status.as_ref().map(|c| c.value), Some(204));
        assert_eq!(
            s.forwardfor.as_ref().map(|f| f.value.clone()),
            Some(Some(Some("127.0.0.0/8".to_owned())))
        );
        assert_eq!(s.redispatch.as_ref().map(|r| r.value), Some(false));
        assert!(s.timeouts.is_empty());
        let topics: Vec<_> = r.entries().iter().map(|e| e.topic).collect();
        assert_eq!(
            topics,
            [
                Topic::HttpServerClose,
                Topic::TimeoutZero,
                Topic::TimeoutOther
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
