//! Stick tables and stick rules of a backend (`stick-table`, `stick on|match|store-request|
//! store-response`) read, then chosen into stickd's `[[tables]]` and proxyd's `[backend.stick]`.

use std::collections::HashMap;

use common::{Duration, Size};

use super::catalog::Topic;
use super::lexer::Line;
use super::params::cookie_of;
use super::proxies::Proxy;
use super::report::Report;
use super::sections::Kind;
use super::write::{StickOut, TableOut};

/// Entries of a table written without `expire` live this long.
const DEFAULT_EXPIRE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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

impl Proxy {
    pub(super) fn stick_table(&mut self, line: &Line, report: &mut Report) {
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

    pub(super) fn stick(&mut self, line: &Line, report: &mut Report) {
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

/// Each translated backend's stick rule (table, key, response cookie) and the tables they use.
pub fn tables(
    proxies: &[Proxy],
    backends: &[&Proxy],
    report: &mut Report,
) -> (Vec<TableOut>, HashMap<String, StickOut>) {
    let mut tables: Vec<TableOut> = Vec::new();
    let mut sticks = HashMap::new();
    for b in backends {
        let st = &b.stick;
        let on = match (&st.on, &st.matches, &st.store_request) {
            (Some(on), m, r) => {
                for extra in [m, r].into_iter().flatten() {
                    report.add(
                        &extra.line,
                        Topic::StickOther,
                        Some("a second rule".to_owned()),
                    );
                }
                Some(on.clone())
            }
            (None, Some(m), Some(r)) if m.fetch == r.fetch && m.table == r.table => Some(m.clone()),
            (None, Some(m), r) => {
                report.add(&m.line, Topic::StickMatchOnly, None);
                if let Some(r) = r {
                    report.add(&r.line, Topic::StickOther, Some("another fetch".to_owned()));
                }
                Some(m.clone())
            }
            (None, None, Some(r)) => {
                report.add(&r.line, Topic::StickMatchOnly, None);
                Some(r.clone())
            }
            (None, None, None) => st.store_response.as_ref().map(|r| {
                report.add(
                    &r.line,
                    Topic::StickMatchOnly,
                    Some(format!("on = req.cook({})", r.fetch)),
                );
                Rule {
                    fetch: Fetch::Cookie(r.fetch.clone()),
                    table: r.table.clone(),
                    line: r.line.clone(),
                }
            }),
        };
        let Some(on) = on else { continue };
        let table = on.table.clone().unwrap_or_else(|| b.name.clone());
        let Some(def) = proxies
            .iter()
            .find(|p| p.name == table && matches!(p.kind, Kind::Backend | Kind::Listen))
            .and_then(|p| p.table.as_ref())
        else {
            report.add(
                &on.line,
                Topic::StickOther,
                Some(format!("no stick-table in '{table}'")),
            );
            continue;
        };
        let fits = match on.fetch {
            Fetch::Cookie(_) => def.kind == "string",
            Fetch::Src => def.kind == "ip" || def.kind == "ipv6",
        };
        if !fits {
            report.add(
                &on.line,
                Topic::StickOther,
                Some(format!(
                    "a table of type {} for {}",
                    def.kind,
                    on.fetch.text()
                )),
            );
            continue;
        }
        let store_response = match &st.store_response {
            Some(r) if r.table.as_ref().unwrap_or(&b.name) == &table && def.kind == "string" => {
                Some(r.fetch.clone())
            }
            Some(r) => {
                report.add(&r.line, Topic::StickOther, Some("another table".to_owned()));
                None
            }
            None => None,
        };
        sticks.insert(
            b.name.clone(),
            StickOut {
                table: table.clone(),
                on: on.fetch.text(),
                store_response,
            },
        );
        if !tables.iter().any(|t| t.name == table) {
            tables.push(TableOut {
                name: table,
                kind: def.kind.clone(),
                len: def.len.filter(|_| def.kind == "string"),
                size: def.size,
                expire: def.expire.unwrap_or(Duration(DEFAULT_EXPIRE)),
                line: def.line.no,
                text: def.line.text(),
                peers: def.peers.clone(),
            });
        }
    }
    for p in proxies {
        if let Some(t) = &p.table
            && !tables.iter().any(|w| w.line == t.line.no)
        {
            report.add(&t.line, Topic::StickTableUnused, None);
        }
    }
    (tables, sticks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::proxies::tests::read;

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
}
