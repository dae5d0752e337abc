//! `option` and `http-check` lines of a proxy: logging, forwarding, checks, connection modes.

use super::catalog::Topic;
use super::lexer::Line;
use super::proxies::{Context, Proxy, Settings, at};
use super::report::Report;
use super::sections::Kind;

impl Proxy {
    pub(super) fn option(&mut self, line: &Line, on: bool, cx: &mut Context<'_>) {
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
                match rest {
                    [_, _, version] => check_version(s, version, line, cx.report),
                    [_, _, _, more @ ..] => cx.report.add(
                        line,
                        Topic::HttpCheckOther,
                        Some(format!("{} more words", more.len())),
                    ),
                    _ => {}
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

    pub(super) fn http_check(&mut self, line: &Line, report: &mut Report) {
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
                let mut rest: &[&str] = rest;
                loop {
                    rest = match rest {
                        ["meth", m, more @ ..] => {
                            method = Some(m.to_string());
                            more
                        }
                        ["uri", u, more @ ..] => {
                            path = Some(u.to_string());
                            more
                        }
                        // proxyd's check is HTTP/1.0 with Host, whatever version is asked.
                        ["ver", _, more @ ..] => more,
                        ["hdr", name, value, more @ ..] if name.eq_ignore_ascii_case("host") => {
                            set_host(&mut self.settings, value, line, report);
                            more
                        }
                        [] => break,
                        _ => {
                            other = true;
                            break;
                        }
                    };
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
}

/// `HTTP/1.1\r\nHost:\ NAME` after `option httpchk METHOD URI`: the Host header, which
/// proxyd's check sends (`host`); any other header is reported.
fn check_version(s: &mut Settings, version: &str, line: &Line, report: &mut Report) {
    for header in version.split("\r\n").skip(1).filter(|h| !h.is_empty()) {
        match header.split_once(':') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("host") => {
                set_host(s, value.trim(), line, report)
            }
            _ => report.add(
                line,
                Topic::HttpCheckOther,
                Some(format!("header {header}")),
            ),
        }
    }
}

fn set_host(s: &mut Settings, host: &str, line: &Line, report: &mut Report) {
    // What proxyd's `host` takes: a host[:port].
    if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"\\/?#@".contains(&b))
    {
        s.check_host = at(host.to_owned(), line);
    } else {
        report.add(line, Topic::HttpCheckOther, Some(format!("Host {host}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::proxies::tests::read;

    #[test]
    fn a_check_host_from_the_version_or_http_check_send() {
        let (p, r) = read(
            "backend a\n option httpchk HEAD /health HTTP/1.1\\r\\nHost:\\ www.example.com\n\
             backend b\n option httpchk GET /\n http-check send meth HEAD hdr Host b.example.com ver HTTP/1.1\n\
             backend c\n option httpchk GET / HTTP/1.1\\r\\nX-Check:\\ 1\n",
        );
        let host = |i: usize| p[i].settings.check_host.as_ref().map(|h| h.value.clone());
        assert_eq!(host(0).as_deref(), Some("www.example.com"));
        assert_eq!(host(1).as_deref(), Some("b.example.com"));
        assert_eq!(
            p[1].settings.httpchk.as_ref().map(|c| c.value.0.as_str()),
            Some("HEAD")
        );
        assert_eq!(host(2), None);
        let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(topics, [(Some(7), Topic::HttpCheckOther)]);
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
}
