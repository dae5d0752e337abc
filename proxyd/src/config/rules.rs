//! A frontend's `[[frontend.rule]]` tables: their schema as written and their validation into
//! compiled [`Rules`], each refusal at the line and column of what is wrong.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use common::config::Spanned;
use common::{ConfigError, SourceFile};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::{Cidr, Mode};
use crate::rules::{
    Action, CidrSet, Condition, EditOp, HeaderEdit, HostPattern, HostTable, PrefixSet, Redirect,
    RedirectTo, Reply, RequestEdit, Rule, Rules, ValueTest,
};

/// Most nested `all` / `any` / `not` levels: deeper is a mistake, and evaluation recurses.
const MAX_DEPTH: usize = 8;

/// One `[[frontend.rule]]`: an optional `when` and exactly one action.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    when: Option<Spanned<RawWhen>>,
    use_backend: Option<Spanned<String>>,
    redirect: Option<Spanned<RawRedirect>>,
    deny: Option<Spanned<RawReply>>,
    #[serde(rename = "return")]
    reply: Option<Spanned<RawReply>>,
    set_header: Option<Spanned<RawHeader>>,
    add_header: Option<Spanned<RawHeader>>,
    del_header: Option<Spanned<String>>,
    set_path: Option<Spanned<String>>,
    set_response_header: Option<Spanned<RawHeader>>,
    add_response_header: Option<Spanned<RawHeader>>,
    del_response_header: Option<Spanned<String>>,
}

/// A condition: every key given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    host: Option<Spanned<Strings>>,
    path: Option<Spanned<Strings>>,
    path_prefix: Option<Spanned<Strings>>,
    path_regex: Option<Spanned<String>>,
    method: Option<Spanned<Strings>>,
    header: Option<Spanned<RawTest>>,
    cookie: Option<Spanned<RawTest>>,
    query: Option<Spanned<RawTest>>,
    src: Option<Spanned<Strings>>,
    tls: Option<bool>,
    all: Option<Spanned<Vec<Spanned<RawWhen>>>>,
    any: Option<Spanned<Vec<Spanned<RawWhen>>>>,
    not: Option<Box<Spanned<RawWhen>>>,
}

/// `{ name = "X" }` (present), with `equals` or `regex`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    equals: Option<Spanned<String>>,
    regex: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    location: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    scheme: Option<Spanned<String>>,
    status: Option<Spanned<u16>>,
    drop_query: Option<bool>,
}

/// `deny` and `return`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReply {
    status: Option<Spanned<u16>>,
    content_type: Option<Spanned<String>>,
    body: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: Spanned<String>,
    value: Spanned<String>,
}

/// One string or a list of them: `host = "a"` or `host = ["a", "b"]`.
#[derive(Debug)]
enum Strings {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Strings::One(s.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<Spanned<String>>()? {
                    v.push(s);
                }
                Ok(Strings::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Each string with where it is written (a single string: where the key's value is).
fn items(s: &Spanned<Strings>) -> Vec<(Range<usize>, &str)> {
    match s.get_ref() {
        Strings::One(t) => vec![(s.span(), t.as_str())],
        Strings::Many(v) => v.iter().map(|x| (x.span(), x.get_ref().as_str())).collect(),
    }
}

/// Fields whose rewriting would change how a message is framed or how the connection is
/// kept: the proxy writes those itself.
const RESERVED_FIELDS: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Whether a rule may not set or remove field `name` of a request (`request`) or a response:
/// the proxy writes it itself.
pub fn is_proxys_field(name: &str, request: bool) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED_FIELDS.contains(&lower.as_str()) || (request && lower == "host")
}

/// What validating one frontend's rules needs.
pub(super) struct RuleCheck<'a> {
    pub(super) src: &'a SourceFile,
    pub(super) frontend: &'a str,
    pub(super) mode: Mode,
    pub(super) backends: &'a HashMap<String, usize>,
}

impl RuleCheck<'_> {
    fn err(&self, span: Range<usize>, reason: impl Into<String>) -> ConfigError {
        self.src.error_at(span, reason)
    }

    pub(super) fn rules(&self, raw: Vec<Spanned<RawRule>>) -> Result<Rules, ConfigError> {
        if let (Some(first), Mode::Tcp) = (raw.first(), self.mode) {
            return Err(self.err(
                first.span(),
                format!(
                    "rules need http: frontend '{}' is in tcp mode",
                    self.frontend
                ),
            ));
        }
        let rules = raw
            .into_iter()
            .map(|r| self.rule(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rules::new(rules))
    }

    fn rule(&self, raw: Spanned<RawRule>) -> Result<Rule, ConfigError> {
        let span = raw.span();
        let r = raw.into_inner();
        let mut given: Vec<(&str, Range<usize>)> = Vec::new();
        let mut note = |key, s: Option<Range<usize>>| {
            if let Some(s) = s {
                given.push((key, s));
            }
        };
        note("use_backend", r.use_backend.as_ref().map(Spanned::span));
        note("redirect", r.redirect.as_ref().map(Spanned::span));
        note("deny", r.deny.as_ref().map(Spanned::span));
        note("return", r.reply.as_ref().map(Spanned::span));
        note("set_header", r.set_header.as_ref().map(Spanned::span));
        note("add_header", r.add_header.as_ref().map(Spanned::span));
        note("del_header", r.del_header.as_ref().map(Spanned::span));
        note("set_path", r.set_path.as_ref().map(Spanned::span));
        note(
            "set_response_header",
            r.set_response_header.as_ref().map(Spanned::span),
        );
        note(
            "add_response_header",
            r.add_response_header.as_ref().map(Spanned::span),
        );
        note(
            "del_response_header",
            r.del_response_header.as_ref().map(Spanned::span),
        );
        match given.as_slice() {
            [] => {
                return Err(self.err(
                    span,
                    "a rule needs one action: use_backend, redirect, deny, return, \
                     set_header, add_header, del_header, set_path, set_response_header, \
                     add_response_header or del_response_header",
                ));
            }
            [_] => {}
            [(a, _), (b, second), ..] => {
                return Err(self.err(
                    second.clone(),
                    format!("a rule has one action: {a} and {b} are both given"),
                ));
            }
        }
        let when = match r.when {
            None => None,
            Some(w) => Some(self.condition(w, 0)?),
        };
        let action = if let Some(b) = r.use_backend {
            match self.backends.get(b.get_ref()) {
                Some(&i) => Action::UseBackend(i),
                None => {
                    return Err(self.err(
                        b.span(),
                        format!("unknown backend '{}' in use_backend", b.get_ref()),
                    ));
                }
            }
        } else if let Some(rd) = r.redirect {
            Action::Redirect(self.redirect(rd)?)
        } else if let Some(d) = r.deny {
            Action::Reply(self.reply(d, true)?)
        } else if let Some(d) = r.reply {
            Action::Reply(self.reply(d, false)?)
        } else if let Some(h) = r.set_header {
            Action::Request(RequestEdit::Header(self.header(EditOp::Set, h, true)?))
        } else if let Some(h) = r.add_header {
            Action::Request(RequestEdit::Header(self.header(EditOp::Add, h, true)?))
        } else if let Some(n) = r.del_header {
            Action::Request(RequestEdit::Header(self.del(n, true)?))
        } else if let Some(p) = r.set_path {
            if !p.get_ref().starts_with('/') || !p.get_ref().bytes().all(path_byte) {
                return Err(self.err(
                    p.span(),
                    format!(
                        "bad set_path '{}' (starts with '/', no space, '?' or '#')",
                        p.get_ref()
                    ),
                ));
            }
            Action::Request(RequestEdit::SetPath(p.into_inner().into()))
        } else if let Some(h) = r.set_response_header {
            Action::Response(self.header(EditOp::Set, h, false)?)
        } else if let Some(h) = r.add_response_header {
            Action::Response(self.header(EditOp::Add, h, false)?)
        } else if let Some(n) = r.del_response_header {
            Action::Response(self.del(n, false)?)
        } else {
            unreachable!("one action was counted above")
        };
        Ok(Rule { when, action })
    }

    fn condition(&self, raw: Spanned<RawWhen>, depth: usize) -> Result<Condition, ConfigError> {
        let span = raw.span();
        if depth > MAX_DEPTH {
            return Err(self.err(
                span,
                format!("conditions nest at most {MAX_DEPTH} levels deep"),
            ));
        }
        let w = raw.into_inner();
        let mut all: Vec<Condition> = Vec::new();
        if let Some(h) = &w.host {
            let mut table = HostTable::default();
            for (s, text) in items(h) {
                let lower = text.to_ascii_lowercase();
                let Some(p) = HostPattern::parse(&lower) else {
                    return Err(self.err(
                        s,
                        format!("bad host pattern '{text}' (a name, '*.name' or '.name'; no port)"),
                    ));
                };
                table.insert(p, 0);
            }
            all.push(Condition::Host(table));
        }
        if let Some(p) = &w.path {
            let mut set = std::collections::HashSet::with_hasher(Default::default());
            for (s, text) in items(p) {
                self.check_path(s, text, "path")?;
                set.insert(text.into());
            }
            all.push(Condition::Path(set));
        }
        if let Some(p) = &w.path_prefix {
            let list = items(p);
            for (s, text) in &list {
                self.check_path(s.clone(), text, "path_prefix")?;
            }
            all.push(Condition::PathPrefix(PrefixSet::new(
                list.iter().map(|(_, t)| *t),
            )));
        }
        if let Some(r) = &w.path_regex {
            let re = regex::Regex::new(r.get_ref())
                .map_err(|e| self.err(r.span(), bad_regex(r.get_ref(), &e)))?;
            all.push(Condition::PathRegex(re));
        }
        if let Some(m) = &w.method {
            let mut methods = Vec::new();
            for (s, text) in items(m) {
                if text.is_empty() || !text.bytes().all(crate::rules::is_tchar) {
                    return Err(self.err(s, format!("bad method '{text}' (a token such as GET)")));
                }
                methods.push(text.into());
            }
            all.push(Condition::Method(methods));
        }
        if let Some(t) = w.header {
            let (name, test) = self.test(t, "header")?;
            all.push(Condition::Header { name, test });
        }
        if let Some(t) = w.cookie {
            let (name, test) = self.test(t, "cookie")?;
            all.push(Condition::Cookie { name, test });
        }
        if let Some(t) = w.query {
            let (name, test) = self.test(t, "query")?;
            all.push(Condition::Query { name, test });
        }
        if let Some(n) = &w.src {
            let mut blocks = Vec::new();
            for (s, text) in items(n) {
                let Some(c) = Cidr::parse(text) else {
                    return Err(self.err(
                        s,
                        format!("bad src '{text}' (an address or ip/prefix, v4 or v6)"),
                    ));
                };
                blocks.push((c.addr, c.prefix));
            }
            all.push(Condition::Src(CidrSet::new(blocks)));
        }
        if let Some(t) = w.tls {
            all.push(Condition::Tls(t));
        }
        for (key, list) in [("all", w.all), ("any", w.any)] {
            let Some(list) = list else { continue };
            let list_span = list.span();
            let inner = list
                .into_inner()
                .into_iter()
                .map(|c| self.condition(c, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            if inner.is_empty() {
                return Err(self.err(list_span, format!("{key} needs at least one condition")));
            }
            all.push(if key == "all" {
                Condition::All(inner)
            } else {
                Condition::Any(inner)
            });
        }
        if let Some(n) = w.not {
            all.push(Condition::Not(Box::new(self.condition(*n, depth + 1)?)));
        }
        match all.len() {
            0 => Err(self.err(
                span,
                "an empty condition (host, path, path_prefix, path_regex, method, header, \
                 cookie, query, src, tls, all, any or not)",
            )),
            1 => Ok(all.pop().expect("one")),
            _ => Ok(Condition::All(all)),
        }
    }

    fn check_path(&self, s: Range<usize>, text: &str, key: &str) -> Result<(), ConfigError> {
        if text.starts_with('/') && text.bytes().all(path_byte) {
            Ok(())
        } else {
            Err(self.err(
                s,
                format!("bad {key} '{text}' (starts with '/', no space, '?' or '#')"),
            ))
        }
    }

    fn test(&self, t: Spanned<RawTest>, what: &str) -> Result<(Box<str>, ValueTest), ConfigError> {
        let span = t.span();
        let t = t.into_inner();
        let name = t.name.get_ref();
        let name_ok = !name.is_empty()
            && match what {
                "header" => name.bytes().all(crate::rules::is_tchar),
                // Cookie and query names: what they can be on the wire, no separators.
                _ => name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"=;&?#\"".contains(&b)),
            };
        if !name_ok {
            return Err(self.err(t.name.span(), format!("bad {what} name '{name}'")));
        }
        let test = match (t.equals, t.regex) {
            (None, None) => ValueTest::Present,
            (Some(e), None) => {
                if e.get_ref().bytes().any(|b| b.is_ascii_control()) {
                    return Err(self.err(e.span(), format!("a {what} value has no control byte")));
                }
                ValueTest::Equals(e.into_inner().into())
            }
            (None, Some(r)) => ValueTest::Regex(
                regex::bytes::Regex::new(r.get_ref())
                    .map_err(|e| self.err(r.span(), bad_regex(r.get_ref(), &e)))?,
            ),
            (Some(_), Some(_)) => {
                return Err(self.err(span, format!("a {what} test has equals or regex, not both")));
            }
        };
        Ok((name.as_str().into(), test))
    }

    fn field_name(&self, n: &Spanned<String>, request: bool) -> Result<(), ConfigError> {
        let name = n.get_ref();
        if name.is_empty() || !name.bytes().all(crate::rules::is_tchar) {
            return Err(self.err(
                n.span(),
                format!("bad header name '{name}' (a token: letters, digits, !#$%&'*+-.^_`|~)"),
            ));
        }
        if is_proxys_field(name, request) {
            return Err(self.err(
                n.span(),
                format!("header '{name}' is the proxy's to write: a rule cannot change it"),
            ));
        }
        Ok(())
    }

    fn header(
        &self,
        op: EditOp,
        h: Spanned<RawHeader>,
        request: bool,
    ) -> Result<HeaderEdit, ConfigError> {
        let h = h.into_inner();
        self.field_name(&h.name, request)?;
        let value = h.value.get_ref();
        if value
            .bytes()
            .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
            || value.trim_matches([' ', '\t']) != value
        {
            return Err(self.err(
                h.value.span(),
                "bad header value (no control byte, no leading or trailing space)",
            ));
        }
        Ok(HeaderEdit {
            op,
            name: h.name.into_inner().into(),
            value: h.value.into_inner().into(),
        })
    }

    fn del(&self, n: Spanned<String>, request: bool) -> Result<HeaderEdit, ConfigError> {
        self.field_name(&n, request)?;
        Ok(HeaderEdit {
            op: EditOp::Del,
            name: n.into_inner().into(),
            value: "".into(),
        })
    }

    fn redirect(&self, raw: Spanned<RawRedirect>) -> Result<Redirect, ConfigError> {
        let span = raw.span();
        let r = raw.into_inner();
        let to = match (r.location, r.prefix, r.scheme) {
            (Some(l), None, None) => {
                self.check_url(&l, "location")?;
                RedirectTo::Location(l.into_inner().into())
            }
            (None, Some(p), None) => {
                self.check_url(&p, "prefix")?;
                RedirectTo::Prefix(p.into_inner().into())
            }
            (None, None, Some(s)) => {
                let t = s.get_ref();
                let ok = t.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
                    && t.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b)
                    });
                if !ok {
                    return Err(self.err(s.span(), format!("bad scheme '{t}' (such as https)")));
                }
                RedirectTo::Scheme(s.into_inner().into())
            }
            _ => {
                return Err(self.err(span, "a redirect has one of location, prefix or scheme"));
            }
        };
        let status = match r.status {
            None => 302,
            Some(s) if [301, 302, 303, 307, 308].contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                return Err(self.err(
                    s.span(),
                    format!(
                        "bad redirect status {} (301, 302, 303, 307 or 308)",
                        s.get_ref()
                    ),
                ));
            }
        };
        Ok(Redirect {
            to,
            status,
            drop_query: r.drop_query.unwrap_or(false),
        })
    }

    fn check_url(&self, u: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
        let t = u.get_ref();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.err(
                u.span(),
                format!("bad redirect {key} '{t}' (printable ASCII, no space)"),
            ));
        }
        Ok(())
    }

    fn reply(&self, raw: Spanned<RawReply>, deny: bool) -> Result<Reply, ConfigError> {
        let r = raw.into_inner();
        let status = match r.status {
            None if deny => 403,
            None => 200,
            Some(s) => {
                let n = *s.get_ref();
                let ok = if deny {
                    (400..=599).contains(&n)
                } else {
                    (200..=599).contains(&n)
                };
                if !ok {
                    let range = if deny { "400 to 599" } else { "200 to 599" };
                    let what = if deny { "deny" } else { "return" };
                    return Err(self.err(s.span(), format!("bad {what} status {n} ({range})")));
                }
                n
            }
        };
        let content_type = match r.content_type {
            None => "text/plain".into(),
            Some(c) => {
                let t = c.get_ref();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                    return Err(self.err(c.span(), format!("bad content_type '{t}'")));
                }
                c.into_inner().into()
            }
        };
        let body = match r.body {
            Some(b) => b.into_inner().into(),
            // "403 forbidden", like the proxy's own errors.
            None if deny => {
                let reason = http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("denied")
                    .to_ascii_lowercase();
                format!("{status} {reason}\n").into()
            }
            None => "".into(),
        };
        Ok(Reply {
            status,
            content_type,
            body,
            denied: deny,
        })
    }
}

/// What a path in a rule may hold: printable ASCII but the separators of a target's parts.
fn path_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'?' && b != b'#'
}

fn bad_regex(text: &str, e: &regex::Error) -> String {
    let why = e.to_string();
    let last = why.lines().last().unwrap_or("").trim();
    format!("bad regex '{text}': {last}")
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
