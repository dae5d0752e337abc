//! HAProxy's ACLs and conditions (`acl NAME FETCH [FLAGS] VALUES`, `if|unless A B || !C { ... }`)
//! as the `when` of a `[[frontend.rule]]`, written only where proxyd's condition matches
//! exactly the requests HAProxy's does; anything else is refused with the reason.

use std::collections::HashMap;

use super::catalog::Topic;
use super::fetch::fetch;
use super::lexer::Line;
use super::report::Report;
use super::write::q;

/// Most nested `all` / `any` / `not` levels proxyd's validation takes.
const MAX_DEPTH: usize = 8;

/// A condition, as proxyd's rules can write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Every request (`TRUE`, `HTTP`), or none (`FALSE`).
    Const(bool),
    Leaf(Leaf),
    Not(Box<Cond>),
    All(Vec<Cond>),
    Any(Vec<Cond>),
}

/// One test: proxyd's inline table and what of the request it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// `path_prefix = ["/api"]`, the inside of `{ ... }`.
    pub toml: String,
    pub reads: Reads,
}

/// What a condition reads of the request: a rewrite of it before the condition would make
/// HAProxy and proxyd disagree (proxyd's conditions see the request as the client sent it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// Field names, lower case.
    pub headers: Vec<String>,
    pub path: bool,
    pub method: bool,
}

impl Reads {
    fn merge(&mut self, other: &Reads) {
        for h in &other.headers {
            if !self.headers.contains(h) {
                self.headers.push(h.clone());
            }
        }
        self.path |= other.path;
        self.method |= other.method;
    }
}

impl Cond {
    /// What the whole condition reads.
    pub fn reads(&self) -> Reads {
        let mut r = Reads::default();
        self.visit(&mut |l| r.merge(&l.reads));
        r
    }

    fn visit(&self, f: &mut dyn FnMut(&Leaf)) {
        match self {
            Cond::Const(_) => {}
            Cond::Leaf(l) => f(l),
            Cond::Not(c) => c.visit(f),
            Cond::All(v) | Cond::Any(v) => v.iter().for_each(|c| c.visit(f)),
        }
    }

    /// Constants folded away, nested lists of one kind flattened, double negations removed.
    pub fn simplified(self) -> Cond {
        match self {
            Cond::Not(c) => match c.simplified() {
                Cond::Const(b) => Cond::Const(!b),
                Cond::Not(inner) => *inner,
                other => Cond::Not(Box::new(other)),
            },
            Cond::All(v) => Cond::list(v, true),
            Cond::Any(v) => Cond::list(v, false),
            other => other,
        }
    }

    fn list(v: Vec<Cond>, all: bool) -> Cond {
        let mut out = Vec::new();
        for c in v {
            match (c.simplified(), all) {
                // The neutral element drops out; the absorbing one decides.
                (Cond::Const(b), _) if b == all => {}
                (Cond::Const(b), _) => return Cond::Const(b),
                (Cond::All(inner), true) | (Cond::Any(inner), false) => out.extend(inner),
                (c, _) => out.push(c),
            }
        }
        match out.len() {
            0 => Cond::Const(all),
            1 => out.pop().expect("one"),
            _ if all => Cond::All(out),
            _ => Cond::Any(out),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Cond::Const(_) | Cond::Leaf(_) => 0,
            Cond::Not(c) => 1 + c.depth(),
            Cond::All(v) | Cond::Any(v) => 1 + v.iter().map(Cond::depth).max().unwrap_or(0),
        }
    }

    /// The `when` value; refused when it nests deeper than proxyd takes.
    pub fn toml(&self) -> Result<String, String> {
        if self.depth() > MAX_DEPTH {
            return Err(format!(
                "the condition nests deeper than proxyd's {MAX_DEPTH} levels"
            ));
        }
        Ok(self.render())
    }

    fn render(&self) -> String {
        let list = |v: &[Cond]| v.iter().map(Cond::render).collect::<Vec<_>>().join(", ");
        match self {
            // Never rendered: a rule with a constant condition is written without `when` or
            // not at all.
            Cond::Const(_) => String::new(),
            Cond::Leaf(l) => format!("{{ {} }}", l.toml),
            Cond::Not(c) => format!("{{ not = {} }}", c.render()),
            Cond::All(v) => format!("{{ all = [{}] }}", list(v)),
            Cond::Any(v) => format!("{{ any = [{}] }}", list(v)),
        }
    }
}

/// A frontend's ACLs by name: each line translated once, a name given on several lines
/// matching when any of them does (as in HAProxy).
pub struct Acls {
    named: HashMap<String, Vec<AclLine>>,
}

/// One `acl` line of a name: its line number and its condition, or why it has none.
type AclLine = (usize, Result<Cond, String>);

impl Acls {
    /// Reads every `acl` line; one that cannot be translated is reported here, and again in
    /// each rule that uses it.
    pub fn new(lines: &[Line], report: &mut Report) -> Acls {
        let mut named: HashMap<String, Vec<AclLine>> = HashMap::new();
        for line in lines {
            let args = line.args();
            let Some(name) = args.first() else {
                report.add(line, Topic::AclOther, Some("no name".to_owned()));
                continue;
            };
            let cond = fetch(&args[1..]);
            if let Err(why) = &cond {
                report.add(line, Topic::AclOther, Some(why.clone()));
            }
            named.entry(name.clone()).or_default().push((line.no, cond));
        }
        Acls { named }
    }

    fn get(&self, name: &str) -> Result<Cond, String> {
        if let Some(lines) = self.named.get(name) {
            let mut any = Vec::new();
            for (no, c) in lines {
                match c {
                    Ok(c) => any.push(c.clone()),
                    Err(_) => return Err(format!("acl {name} (line {no}) is not translated")),
                }
            }
            return Ok(Cond::Any(any));
        }
        predefined(name).ok_or_else(|| format!("no acl {name}"))
    }

    /// The condition of `if|unless WORDS...`: terms joined by `||` (or `or`), each a run of
    /// ACL names, `!NAME` and `{ FETCH ... }` that must all hold.
    pub fn condition(&self, words: &[String]) -> Result<Cond, String> {
        let (negate, words) = match words.split_first() {
            Some((k, rest)) if k == "if" => (false, rest),
            Some((k, rest)) if k == "unless" => (true, rest),
            _ => return Err("a condition starts with if or unless".to_owned()),
        };
        let mut terms: Vec<Cond> = Vec::new();
        let mut term: Vec<Cond> = Vec::new();
        let mut neg = false;
        let mut i = 0;
        while i < words.len() {
            let mut w = words[i].as_str();
            i += 1;
            if w == "||" || w == "or" {
                if term.is_empty() || neg {
                    return Err(format!("'{w}' without a condition before it"));
                }
                terms.push(Cond::All(std::mem::take(&mut term)));
                continue;
            }
            while let Some(rest) = w.strip_prefix('!') {
                neg = !neg;
                w = rest;
            }
            if w.is_empty() {
                continue;
            }
            let c = if w == "{" {
                let Some(end) = words[i..].iter().position(|x| x == "}") else {
                    return Err("'{' without '}'".to_owned());
                };
                let c = fetch(&words[i..i + end])?;
                i += end + 1;
                c
            } else {
                self.get(w)?
            };
            term.push(if std::mem::take(&mut neg) {
                Cond::Not(Box::new(c))
            } else {
                c
            });
        }
        if term.is_empty() || neg {
            return Err("a condition ends without a test".to_owned());
        }
        terms.push(Cond::All(term));
        let c = Cond::Any(terms);
        Ok(if negate { Cond::Not(Box::new(c)) } else { c }.simplified())
    }
}

/// HAProxy's predefined ACLs that proxyd can express.
fn predefined(name: &str) -> Option<Cond> {
    let methods = |m: &[&str]| Cond::Leaf(method(m));
    Some(match name {
        "TRUE" => Cond::Const(true),
        "FALSE" => Cond::Const(false),
        // Rules exist only in http mode.
        "HTTP" => Cond::Const(true),
        "LOCALHOST" => Cond::Leaf(Leaf {
            toml: "src = [\"127.0.0.1/8\", \"::1\"]".to_owned(),
            reads: Reads::default(),
        }),
        "METH_GET" => methods(&["GET", "HEAD"]),
        "METH_HEAD" => methods(&["HEAD"]),
        "METH_POST" => methods(&["POST"]),
        "METH_PUT" => methods(&["PUT"]),
        "METH_DELETE" => methods(&["DELETE"]),
        "METH_OPTIONS" => methods(&["OPTIONS"]),
        "METH_CONNECT" => methods(&["CONNECT"]),
        "METH_TRACE" => methods(&["TRACE"]),
        _ => return None,
    })
}

pub(super) fn method(m: &[&str]) -> Leaf {
    Leaf {
        toml: format!("method = {}", strings(m.iter().copied())),
        reads: Reads {
            method: true,
            ..Reads::default()
        },
    }
}

pub(super) fn strings<'a>(v: impl Iterator<Item = &'a str>) -> String {
    format!("[{}]", v.map(q).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::import::lexer::lex;

    pub(in crate::import) fn acls(text: &str) -> (Acls, Report) {
        let mut report = Report::new("t.cfg".into());
        let lines = lex(text).expect("lexes");
        let a = Acls::new(&lines, &mut report);
        (a, report)
    }

    pub(in crate::import) fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    pub(in crate::import) fn when(a: &Acls, cond: &str) -> Result<String, String> {
        a.condition(&words(cond))?.toml()
    }

    #[test]
    fn names_juxtaposition_or_and_negation() {
        let (a, r) = acls(
            "acl api path_beg /api/ /v1/\nacl get method GET HEAD\nacl get method OPTIONS\n\
             acl admin src 10.0.0.0/8 ::1\nacl tls ssl_fc\n",
        );
        assert!(r.is_empty(), "{r}");
        assert_eq!(
            when(&a, "if api get").as_deref(),
            Ok(
                "{ all = [{ path_prefix = [\"/api/\", \"/v1/\"] }, { any = [{ method = [\"GET\", \"HEAD\"] }, \
                 { method = [\"OPTIONS\"] }] }] }"
            )
        );
        assert_eq!(
            when(&a, "unless api || !admin tls").as_deref(),
            Ok(
                "{ not = { any = [{ path_prefix = [\"/api/\", \"/v1/\"] }, { all = [{ not = { src = \
                 [\"10.0.0.0/8\", \"::1\"] } }, { tls = true }] }] } }"
            )
        );
        assert_eq!(
            when(&a, "if ! api or { path /x } TRUE").as_deref(),
            Ok(
                "{ any = [{ not = { path_prefix = [\"/api/\", \"/v1/\"] } }, { path = [\"/x\"] }] }"
            )
        );
        assert_eq!(
            a.condition(&words("if api FALSE || FALSE")),
            Ok(Cond::Const(false))
        );
        assert_eq!(
            a.condition(&words("unless !{ ssl_fc }"))
                .and_then(|c| c.toml())
                .as_deref(),
            Ok("{ tls = true }")
        );
        assert_eq!(
            when(&a, "if METH_GET LOCALHOST").as_deref(),
            Ok(
                "{ all = [{ method = [\"GET\", \"HEAD\"] }, { src = [\"127.0.0.1/8\", \"::1\"] }] }"
            )
        );
    }

    #[test]
    fn what_proxyd_cannot_match_exactly_is_refused() {
        let (a, r) = acls(
            "acl d hdr_dom(host) -i example.com\nacl f path -f /etc/haproxy/paths\n\
             acl c req.cook(SID) -m found\nacl m method -i get\nacl re path_reg (?i)^/a\n\
             acl ok path /ok\nacl re2 path_reg '^/a\\b'\nacl hv hdr(x) a,b\nacl o hdr(x,1) a\n",
        );
        let lines: Vec<_> = r.entries().iter().map(|e| e.line).collect();
        assert_eq!(
            lines,
            [
                Some(1),
                Some(2),
                Some(3),
                Some(4),
                Some(5),
                Some(7),
                Some(8),
                Some(9)
            ]
        );
        for c in [
            "if d",
            "if ok || d",
            "unless f",
            "if c",
            "if m",
            "if re",
            "if nope",
            "if ok ||",
            "if { path /a",
            "if re2 ok",
            "if hv",
            "if o",
        ] {
            assert!(a.condition(&words(c)).is_err(), "{c}");
        }
        // Nine levels of not/any/all are more than proxyd validates.
        let mut c = Cond::Leaf(Leaf {
            toml: "tls = true".into(),
            reads: Reads::default(),
        });
        for _ in 0..9 {
            c = Cond::Not(Box::new(Cond::Any(vec![c.clone(), c])));
        }
        assert!(c.toml().is_err());
    }
}
