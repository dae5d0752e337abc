//! HAProxy's `resolvers` sections and its servers named by DNS: proxyd's `[[resolvers]]`, and
//! each backend's `resolvers` and `resolve_interval`, with what differs reported.

use std::net::SocketAddr;

use common::Duration;

use super::address::{self, AddressMap};
use super::catalog::Topic;
use super::lexer::Line;
use super::proxies::{ServerAddress, ServerDef};
use super::report::Report;
use super::sections::Section;

/// HAProxy re-resolves every `timeout resolve`, 1s unless set.
const HAPROXY_RESOLVE: std::time::Duration = std::time::Duration::from_secs(1);

/// A `resolvers` section as read.
#[derive(Clone, Debug)]
pub struct ResolversDef {
    pub name: String,
    pub header: Line,
    pub nameservers: Vec<SocketAddr>,
    /// `timeout retry`: how long a nameserver's answer is waited for.
    pub retry: Option<Duration>,
    /// `timeout resolve`: how often names are resolved again.
    pub resolve: Option<Duration>,
}

/// A `[[resolvers]]` to write.
#[derive(Clone, Debug)]
pub struct ResolversOut {
    pub name: String,
    pub line: usize,
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Option<Duration>,
}

/// Reads a `resolvers` section.
pub fn section(s: &Section, maps: &[AddressMap], report: &mut Report) -> ResolversDef {
    let mut def = ResolversDef {
        name: s.name().unwrap_or_default().to_owned(),
        header: s.header.clone(),
        nameservers: Vec::new(),
        retry: None,
        resolve: None,
    };
    for line in &s.body {
        let words: Vec<&str> = line.words.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["nameserver", _, addr] => match address::parse_with_port(addr) {
                Ok(a) => def.nameservers.push(address::map(maps, a)),
                Err(e) => report.add(line, Topic::ResolversOther, Some(e.to_string())),
            },
            ["timeout", which @ ("resolve" | "retry"), t] => match t.parse::<Duration>() {
                // proxyd's shortest: 100ms between rounds, 10ms for an answer.
                Ok(d) if d.0 >= std::time::Duration::from_millis(100) => {
                    if *which == "resolve" {
                        def.resolve = Some(d);
                    } else {
                        def.retry = Some(d);
                    }
                }
                _ => report.add(line, Topic::ResolversOther, Some(format!("timeout {t}"))),
            },
            _ => report.add(line, Topic::ResolversOther, None),
        }
    }
    def
}

/// A backend's `resolvers` and `resolve_interval` for its servers named by DNS: the section
/// of its first such server; a server that differs is reported.
pub fn backend(
    servers: &[ServerDef],
    lines: &dyn Fn(usize) -> Line,
    defs: &[ResolversDef],
    report: &mut Report,
) -> Option<(ResolversOut, Duration)> {
    let named: Vec<&ServerDef> = servers
        .iter()
        .filter(|s| matches!(s.address, ServerAddress::Name { .. }))
        .collect();
    let first = named.first()?;
    let chosen = first.resolvers.as_ref().and_then(|r| {
        defs.iter()
            .find(|d| &d.name == r && !d.nameservers.is_empty())
    });
    for s in &named {
        let line = lines(s.line);
        let approximate =
            |report: &mut Report, why: String| report.add(&line, Topic::ServerNameOther, Some(why));
        match (&s.resolvers, chosen) {
            (None, _) => approximate(report, "no resolvers".to_owned()),
            (Some(r), Some(c)) if *r == c.name => {}
            (Some(r), _)
                if !defs
                    .iter()
                    .any(|d| &d.name == r && !d.nameservers.is_empty()) =>
            {
                approximate(report, format!("resolvers '{r}' has no nameserver"))
            }
            (Some(r), c) => approximate(
                report,
                format!(
                    "resolvers '{r}': the backend's servers resolve through {}",
                    c.map_or("the system's resolver".to_owned(), |c| format!(
                        "'{}'",
                        c.name
                    ))
                ),
            ),
        }
        if s.resolvers.is_some() && s.resolve_prefer.as_deref() != Some("ipv4") {
            approximate(report, "no resolve-prefer ipv4".to_owned());
        }
    }
    let c = chosen?;
    Some((
        ResolversOut {
            name: c.name.clone(),
            line: c.header.no,
            nameservers: c.nameservers.clone(),
            timeout: c.retry,
        },
        c.resolve.unwrap_or(Duration(HAPROXY_RESOLVE)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::proxies::tests::read;

    #[test]
    fn a_backends_named_servers_resolve_through_its_first_servers_section() {
        let resolvers = "resolvers dns\n nameserver ns1 10.0.0.53:53\n timeout resolve 5s\n\
                         timeout retry 2s\n hold valid 10s\n";
        let mut report = Report::new("t.cfg".into());
        let sections =
            crate::import::sections::split(crate::import::lexer::lex(resolvers).expect("lex"));
        let def = section(&sections.sections[0], &[], &mut report);
        assert_eq!(
            def.nameservers,
            ["10.0.0.53:53".parse::<SocketAddr>().expect("addr")]
        );
        let topics: Vec<_> = report.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(topics, [(Some(5), Topic::ResolversOther)]);

        let (p, mut r) = read(
            "backend b\n server a app.internal:80 resolvers dns resolve-prefer ipv4\n\
             server c 10.0.0.3:80\n server d db.internal:80\n server e e.internal:80 resolvers dns\n",
        );
        assert_eq!(
            p[0].servers[0].address,
            ServerAddress::Name {
                host: "app.internal".into(),
                port: 80
            }
        );
        let line = |no| Line {
            no,
            words: Vec::new(),
        };
        let (out, every) = backend(&p[0].servers, &line, &[def], &mut r).expect("resolvers");
        assert_eq!((out.name.as_str(), out.line), ("dns", 1));
        assert_eq!(out.timeout.map(|d| d.to_string()).as_deref(), Some("2s"));
        assert_eq!(every.to_string(), "5s");
        let topics: Vec<_> = r.entries().iter().map(|e| (e.line, e.topic)).collect();
        assert_eq!(
            topics,
            [
                (Some(4), Topic::ServerNameOther),
                (Some(5), Topic::ServerNameOther)
            ]
        );
    }
}
