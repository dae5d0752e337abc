//! A frontend's L7 rules, compiled once per generation (by config validation) and evaluated per
//! request: conditions on host, path, method, fields, cookies, query, source and TLS; actions
//! that choose a backend, answer locally (redirect, deny, return) or rewrite the request or the
//! response. Pure: the protocols give a [`Request`] view and apply the [`Route`] they get back.
//!
//! Rules run in order; header and path rewrites do not stop evaluation, the first matching
//! terminal rule (`use_backend`, `redirect`, `deny`, `return`) does. Conditions see the request
//! as the client sent it; rewrites are applied once evaluation ends. A run of consecutive rules
//! whose condition is only a host is merged into one [`HostTable`]: a thousand `host → backend`
//! rules cost one hash lookup, not a thousand.

pub mod sets;

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use foldhash::fast::RandomState;

pub use sets::{CidrSet, HostPattern, HostTable, PrefixSet};

/// RFC 9110's `tchar`: what a token (method, field name, coding) is made of. Here, at the
/// bottom of the crate, because config validation checks rules' field names with it.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What the rules need to know of a request. Field names are compared ignoring case.
pub trait Request {
    fn method(&self) -> &str;
    /// The target in origin form: path, then `?` and the query if any.
    fn target(&self) -> &str;
    /// The `Host` field as sent (port included), if any.
    fn host(&self) -> Option<&str>;
    /// Whether any field called `name` has a value that passes `test`.
    fn any_field(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool;
    fn cookie(&self, name: &str) -> Option<&str>;
    fn src(&self) -> IpAddr;
    fn tls(&self) -> bool;
}

/// A condition, as compiled.
#[derive(Clone, Debug)]
pub enum Condition {
    Host(HostTable),
    Path(HashSet<Box<str>, RandomState>),
    PathPrefix(PrefixSet),
    PathRegex(regex::Regex),
    Method(Vec<Box<str>>),
    Header { name: Box<str>, test: ValueTest },
    Cookie { name: Box<str>, test: ValueTest },
    Query { name: Box<str>, test: ValueTest },
    Src(CidrSet),
    Tls(bool),
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
}

/// What a field, cookie or query parameter must be.
#[derive(Clone, Debug)]
pub enum ValueTest {
    Present,
    Equals(Box<str>),
    Regex(regex::bytes::Regex),
}

impl ValueTest {
    fn passes(&self, v: &[u8]) -> bool {
        match self {
            ValueTest::Present => true,
            ValueTest::Equals(e) => v == e.as_bytes(),
            ValueTest::Regex(r) => r.is_match(v),
        }
    }
}

/// One rule: an optional condition (none: every request) and its one action.
#[derive(Clone, Debug)]
pub struct Rule {
    pub when: Option<Condition>,
    pub action: Action,
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Index into `Config::backends`.
    UseBackend(usize),
    Redirect(Redirect),
    /// `deny` and `return`: the proxy answers itself.
    Reply(Reply),
    Request(RequestEdit),
    Response(HeaderEdit),
}

impl Action {
    fn is_terminal(&self) -> bool {
        matches!(
            self,
            Action::UseBackend(_) | Action::Redirect(_) | Action::Reply(_)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub to: RedirectTo,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// Leave the request's query off a `prefix` or `scheme` redirect.
    pub drop_query: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedirectTo {
    /// This URL, as written.
    Location(Box<str>),
    /// This, then the request's path (and query).
    Prefix(Box<str>),
    /// `SCHEME://HOST` with the request's host, then its path (and query).
    Scheme(Box<str>),
}

impl Redirect {
    /// The `Location` for a request; `None` when a scheme redirect meets a request without host.
    pub fn location(&self, req: &dyn Request) -> Option<String> {
        let target = req.target();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) if !self.drop_query => (p, Some(q)),
            Some((p, _)) => (p, None),
            None => (target, None),
        };
        let path = if path.starts_with('/') { path } else { "/" };
        let mut out = match &self.to {
            RedirectTo::Location(l) => return Some(l.to_string()),
            RedirectTo::Prefix(p) => format!("{}{path}", p.trim_end_matches('/')),
            RedirectTo::Scheme(s) => format!("{s}://{}{path}", req.host()?),
        };
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// The proxy's own answer (`deny`, `return`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: Box<str>,
    pub body: Box<str>,
    /// Counted as a denied request (`deny`), not as one answered by design (`return`).
    pub denied: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestEdit {
    Header(HeaderEdit),
    /// The path is replaced; the query stays.
    SetPath(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEdit {
    pub op: EditOp,
    /// A token, as written.
    pub name: Box<str>,
    /// Empty for `Del`.
    pub value: Box<str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditOp {
    /// Replaces every field of that name.
    Set,
    Add,
    Del,
}

/// How the rules are walked: one rule, or a run of host-only rules behind one table.
#[derive(Clone, Debug)]
enum Step {
    Rule(u32),
    Hosts { table: HostTable },
}

/// A frontend's rules, compiled.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    steps: Vec<Step>,
    /// Response edits of the rules without condition: what the proxy's answers get even to a
    /// request it could not parse (an HSTS header on a 400).
    always_response: Vec<HeaderEdit>,
    /// Whether any condition reads the host (the host is normalised only then).
    uses_host: bool,
}

/// What the rules decided for one request.
#[derive(Debug, Default)]
pub struct Route<'r> {
    pub decision: Decision<'r>,
    /// In rule order.
    pub request: Vec<&'r RequestEdit>,
    /// In rule order: applied to whatever the client gets, the server's answer or the proxy's.
    pub response: Vec<&'r HeaderEdit>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Decision<'r> {
    /// No terminal rule matched: the frontend's `default_backend`.
    #[default]
    Default,
    Backend(usize),
    Redirect(&'r Redirect),
    Reply(&'r Reply),
}

/// Consecutive host-only rules from this many on share one table.
const MIN_HOST_RUN: usize = 2;

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Rules {
        let mut steps = Vec::new();
        let mut i = 0;
        while i < rules.len() {
            let run = rules[i..]
                .iter()
                .take_while(|r| matches!(r.when, Some(Condition::Host(_))))
                .count();
            if run >= MIN_HOST_RUN {
                let mut table = HostTable::default();
                for (k, r) in rules[i..i + run].iter().enumerate() {
                    if let Some(Condition::Host(t)) = &r.when {
                        table.merge(t, (i + k) as u32);
                    }
                }
                steps.push(Step::Hosts { table });
                i += run;
            } else {
                steps.push(Step::Rule(i as u32));
                i += 1;
            }
        }
        let always_response = rules
            .iter()
            .filter(|r| r.when.is_none())
            .filter_map(|r| match &r.action {
                Action::Response(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let uses_host = rules
            .iter()
            .any(|r| r.when.as_ref().is_some_and(Condition::reads_host));
        Rules {
            rules,
            steps,
            always_response,
            uses_host,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The response edits every answer gets, even to a request that was never parsed.
    pub fn always_response(&self) -> &[HeaderEdit] {
        &self.always_response
    }

    /// Evaluates the rules for one request.
    pub fn route(&self, req: &dyn Request) -> Route<'_> {
        let mut route = Route::default();
        if self.rules.is_empty() {
            return route;
        }
        let facts = Facts::of(req, self.uses_host);
        for step in &self.steps {
            let done = match step {
                Step::Rule(i) => {
                    let rule = &self.rules[*i as usize];
                    let hit = rule.when.as_ref().is_none_or(|c| c.matches(req, &facts));
                    hit && self.apply(*i, &mut route)
                }
                Step::Hosts { table } => {
                    let Some(host) = facts.host.as_deref() else {
                        continue;
                    };
                    // Usually one pattern matches: its rules are in order already.
                    let mut lists: [&[u32]; 2] = [&[], &[]];
                    let mut more: Vec<u32> = Vec::new();
                    let mut n = 0;
                    table.lookup(host, |r| {
                        if n < 2 {
                            lists[n] = r;
                        } else {
                            more.extend_from_slice(r);
                        }
                        n += 1;
                    });
                    if n <= 1 {
                        lists[0].iter().any(|i| self.apply(*i, &mut route))
                    } else {
                        more.extend_from_slice(lists[0]);
                        more.extend_from_slice(lists[1]);
                        more.sort_unstable();
                        more.dedup();
                        more.iter().any(|i| self.apply(*i, &mut route))
                    }
                }
            };
            if done {
                break;
            }
        }
        route
    }

    /// Takes rule `i`'s action (its condition matched); true when it ends evaluation.
    fn apply<'r>(&'r self, i: u32, route: &mut Route<'r>) -> bool {
        let action = &self.rules[i as usize].action;
        match action {
            Action::UseBackend(b) => route.decision = Decision::Backend(*b),
            Action::Redirect(r) => route.decision = Decision::Redirect(r),
            Action::Reply(r) => route.decision = Decision::Reply(r),
            Action::Request(e) => route.request.push(e),
            Action::Response(e) => route.response.push(e),
        }
        action.is_terminal()
    }
}

/// What several conditions read, worked out once per request.
struct Facts<'a> {
    /// Lower case, without port or trailing dot.
    host: Option<Cow<'a, str>>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Facts<'a> {
    fn of(req: &'a dyn Request, with_host: bool) -> Facts<'a> {
        let (path, query) = match req.target().split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.target(), None),
        };
        Facts {
            host: if with_host {
                req.host().map(host_key)
            } else {
                None
            },
            path,
            query,
        }
    }
}

/// A `Host` value as host patterns are written: lower case, port and trailing dot removed.
pub fn host_key(host: &str) -> Cow<'_, str> {
    let name = match host.strip_prefix('[') {
        Some(_) => host.find(']').map_or(host, |i| &host[..=i]),
        None => host.split_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

impl Condition {
    fn reads_host(&self) -> bool {
        match self {
            Condition::Host(_) => true,
            Condition::All(v) | Condition::Any(v) => v.iter().any(Condition::reads_host),
            Condition::Not(c) => c.reads_host(),
            _ => false,
        }
    }

    fn matches(&self, req: &dyn Request, f: &Facts<'_>) -> bool {
        match self {
            Condition::Host(t) => f.host.as_deref().is_some_and(|h| t.matches(h)),
            Condition::Path(set) => set.contains(f.path),
            Condition::PathPrefix(set) => set.matches(f.path),
            Condition::PathRegex(r) => r.is_match(f.path),
            Condition::Method(m) => {
                let method = req.method();
                m.iter().any(|x| **x == *method)
            }
            Condition::Header { name, test } => req.any_field(name, &mut |v| test.passes(v)),
            Condition::Cookie { name, test } => {
                req.cookie(name).is_some_and(|v| test.passes(v.as_bytes()))
            }
            Condition::Query { name, test } => f.query.is_some_and(|q| {
                q.split('&').any(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    k == &**name && test.passes(v.as_bytes())
                })
            }),
            Condition::Src(set) => set.contains(req.src()),
            Condition::Tls(want) => req.tls() == *want,
            Condition::All(v) => v.iter().all(|c| c.matches(req, f)),
            Condition::Any(v) => v.iter().any(|c| c.matches(req, f)),
            Condition::Not(c) => !c.matches(req, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the rules see it, without a parser.
    struct Fake {
        method: &'static str,
        target: &'static str,
        host: Option<&'static str>,
        fields: Vec<(&'static str, &'static str)>,
        cookies: Vec<(&'static str, &'static str)>,
        src: IpAddr,
        tls: bool,
    }

    impl Fake {
        fn get(host: &'static str, target: &'static str) -> Fake {
            Fake {
                method: "GET",
                target,
                host: Some(host),
                fields: Vec::new(),
                cookies: Vec::new(),
                src: "127.0.0.1".parse().expect("ip"),
                tls: false,
            }
        }
    }

    impl Request for Fake {
        fn method(&self) -> &str {
            self.method
        }
        fn target(&self) -> &str {
            self.target
        }
        fn host(&self) -> Option<&str> {
            self.host
        }
        fn any_field(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            self.fields
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && test(v.as_bytes()))
        }
        fn cookie(&self, name: &str) -> Option<&str> {
            self.cookies
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
        }
        fn src(&self) -> IpAddr {
            self.src
        }
        fn tls(&self) -> bool {
            self.tls
        }
    }

    fn hosts(patterns: &[&str]) -> Condition {
        let mut t = HostTable::default();
        for p in patterns {
            t.insert(HostPattern::parse(p).expect("pattern"), 0);
        }
        Condition::Host(t)
    }

    fn rule(when: Option<Condition>, action: Action) -> Rule {
        Rule { when, action }
    }

    fn header(op: EditOp, name: &str, value: &str) -> HeaderEdit {
        HeaderEdit {
            op,
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn first_terminal_match_wins_and_edits_do_not_stop() {
        let rules = Rules::new(vec![
            rule(
                None,
                Action::Response(header(
                    EditOp::Add,
                    "Strict-Transport-Security",
                    "max-age=1",
                )),
            ),
            rule(
                Some(Condition::PathPrefix(PrefixSet::new(["/api/"]))),
                Action::Request(RequestEdit::Header(header(EditOp::Set, "X-Api", "1"))),
            ),
            rule(
                Some(Condition::PathPrefix(PrefixSet::new(["/api/"]))),
                Action::UseBackend(1),
            ),
            rule(None, Action::UseBackend(2)),
            rule(None, Action::UseBackend(3)),
        ]);
        let r = rules.route(&Fake::get("x", "/api/v1?q=1"));
        assert_eq!(r.decision, Decision::Backend(1));
        assert_eq!(r.request.len(), 1);
        assert_eq!(r.response.len(), 1);
        let r = rules.route(&Fake::get("x", "/other"));
        assert_eq!(r.decision, Decision::Backend(2));
        assert!(r.request.is_empty());
        assert_eq!(rules.always_response().len(), 1);
        assert_eq!(
            Rules::default().route(&Fake::get("x", "/")).decision,
            Decision::Default
        );
    }

    #[test]
    fn a_run_of_host_rules_is_one_table_with_rule_order_kept() {
        let mut rules: Vec<Rule> = (0..1000)
            .map(|i| {
                let mut t = HostTable::default();
                let name = format!("h{i}.example.com");
                t.insert(HostPattern::Exact(&name), 0);
                rule(Some(Condition::Host(t)), Action::UseBackend(i))
            })
            .collect();
        // A wildcard rule after them, and an edit for one host before its backend rule.
        rules.insert(
            0,
            rule(
                Some(hosts(&["h7.example.com"])),
                Action::Request(RequestEdit::SetPath("/seven".into())),
            ),
        );
        rules.push(rule(
            Some(hosts(&["*.example.com"])),
            Action::UseBackend(5000),
        ));
        let rules = Rules::new(rules);
        assert_eq!(rules.steps.len(), 1, "one table for the whole run");
        let r = rules.route(&Fake::get("H7.Example.COM:8080", "/"));
        assert_eq!(r.decision, Decision::Backend(7));
        assert_eq!(r.request, vec![&RequestEdit::SetPath("/seven".into())]);
        assert_eq!(
            rules.route(&Fake::get("h999.example.com.", "/")).decision,
            Decision::Backend(999)
        );
        assert_eq!(
            rules.route(&Fake::get("zz.example.com", "/")).decision,
            Decision::Backend(5000)
        );
        assert_eq!(
            rules.route(&Fake::get("example.com", "/")).decision,
            Decision::Default
        );
        let mut no_host = Fake::get("x", "/");
        no_host.host = None;
        assert_eq!(rules.route(&no_host).decision, Decision::Default);
    }

    #[test]
    fn every_condition_kind() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let mut req = Fake::get("shop.example.com", "/cart/add?item=42&gift");
        req.method = "POST";
        req.fields = vec![("X-Canary", "yes"), ("User-Agent", "curl/8.0")];
        req.cookies = vec![("beta", "1")];
        req.src = ip("::ffff:10.1.2.3");
        let yes = |c: Condition| assert!(c.matches(&req, &Facts::of(&req, true)), "{c:?}");
        let no = |c: Condition| assert!(!c.matches(&req, &Facts::of(&req, true)), "{c:?}");
        yes(hosts(&[".example.com"]));
        no(hosts(&["example.com"]));
        yes(Condition::Path(["/cart/add".into()].into_iter().collect()));
        no(Condition::Path(["/cart".into()].into_iter().collect()));
        yes(Condition::PathRegex(
            regex::Regex::new("^/cart/[a-z]+$").expect("re"),
        ));
        yes(Condition::Method(vec!["GET".into(), "POST".into()]));
        no(Condition::Method(vec!["post".into()]));
        let re = |s: &str| regex::bytes::Regex::new(s).expect("re");
        let h = |name: &str, test| Condition::Header {
            name: name.into(),
            test,
        };
        yes(h("x-canary", ValueTest::Present));
        yes(h("X-Canary", ValueTest::Equals("yes".into())));
        no(h("X-Canary", ValueTest::Equals("Yes".into())));
        yes(h("user-agent", ValueTest::Regex(re("^curl/"))));
        no(h("X-Missing", ValueTest::Present));
        let c = |name: &str, test| Condition::Cookie {
            name: name.into(),
            test,
        };
        yes(c("beta", ValueTest::Equals("1".into())));
        no(c("beta", ValueTest::Equals("2".into())));
        no(c("alpha", ValueTest::Present));
        let q = |name: &str, test| Condition::Query {
            name: name.into(),
            test,
        };
        yes(q("item", ValueTest::Equals("42".into())));
        yes(q("gift", ValueTest::Present));
        no(q("ite", ValueTest::Present));
        yes(Condition::Src(CidrSet::new([(ip("10.0.0.0"), 8)])));
        no(Condition::Src(CidrSet::new([(ip("fd00::"), 8)])));
        yes(Condition::Tls(false));
        no(Condition::Tls(true));
        yes(Condition::All(vec![
            Condition::Tls(false),
            hosts(&["*.example.com"]),
        ]));
        no(Condition::All(vec![
            Condition::Tls(true),
            hosts(&["*.example.com"]),
        ]));
        yes(Condition::Any(vec![
            Condition::Tls(true),
            hosts(&["*.example.com"]),
        ]));
        yes(Condition::Not(Box::new(Condition::Tls(true))));
    }

    #[test]
    fn redirect_locations() {
        let req = Fake::get("old.example.com:8080", "/a/b?x=1");
        let r = |to, drop_query| Redirect {
            to,
            status: 301,
            drop_query,
        };
        assert_eq!(
            r(RedirectTo::Location("https://n/".into()), false).location(&req),
            Some("https://n/".into())
        );
        assert_eq!(
            r(RedirectTo::Prefix("https://new.example.com/".into()), false).location(&req),
            Some("https://new.example.com/a/b?x=1".into())
        );
        assert_eq!(
            r(RedirectTo::Scheme("https".into()), true).location(&req),
            Some("https://old.example.com:8080/a/b".into())
        );
        let mut none = Fake::get("x", "/");
        none.host = None;
        assert_eq!(
            r(RedirectTo::Scheme("https".into()), true).location(&none),
            None
        );
    }

    #[test]
    fn host_keys() {
        assert_eq!(host_key("Example.COM:80"), "example.com");
        assert_eq!(host_key("example.com."), "example.com");
        assert_eq!(host_key("[::1]:8080"), "[::1]");
        assert!(matches!(host_key("a.b"), Cow::Borrowed(_)));
    }
}
