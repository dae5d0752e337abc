//! A frontend's `http-request`, `redirect`, `use_backend`, `http-response` and
//! `http-after-response` lines as `[[frontend.rule]]`s, in the order HAProxy runs them:
//! every `http-request` rule, then `redirect`, then `use_backend`, whatever order they are
//! written in.
//!
//! A rule is written only if proxyd does with it exactly what HAProxy does. Two things make a
//! rule that translates on its own unsafe to write: an earlier rule left out that could have
//! stopped the request (a `deny`, a `use_backend`: written alone, the later rule would act on
//! requests HAProxy never lets reach it), and a condition on something an earlier rule
//! rewrote (proxyd's conditions see the request as the client sent it, HAProxy's as
//! rewritten so far). Both are reported and left out, with the line that caused it.

use super::acl::{Acls, Cond, Reads};
use super::actions::{Refused, redirect, request_action, response};
use super::catalog::Topic;
use super::lexer::Line;
use super::proxies::Proxy;
use super::report::Report;
use super::write::q;

/// One `[[frontend.rule]]` to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOut {
    pub line: usize,
    /// The haproxy.cfg line, as written.
    pub text: String,
    /// The rule's keys, one a line (`when = ...`, `use_backend = "api"`).
    pub toml: String,
}

/// When HAProxy runs a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Request,
    Redirect,
    UseBackend,
}

/// What a rule left out may have stopped: every later rule, or the later `http-request`
/// rules only (`allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stops {
    Everything,
    HttpRequest,
}

/// What a rule (written or left out) does to what later conditions read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Effect {
    Nothing,
    Stops(Stops),
    /// Rewrites this header (lower case).
    Header(String),
    Path,
    Method,
}

/// Why a rule is left out, and what that does to the rules after it.
struct Refusal {
    topic: Topic,
    detail: String,
    effect: Effect,
}

fn refuse(topic: Topic, detail: impl Into<String>, effect: Effect) -> Refusal {
    Refusal {
        topic,
        detail: detail.into(),
        effect,
    }
}

/// What the request rules written so far rewrite.
#[derive(Default)]
struct Rewrites {
    /// Header (lower case) and the line that rewrites it.
    headers: Vec<(String, usize)>,
    path: Option<usize>,
    method: Option<usize>,
}

impl Rewrites {
    fn add(&mut self, effect: &Effect, line: usize) {
        match effect {
            Effect::Header(h) => self.headers.push((h.clone(), line)),
            Effect::Path => self.path = self.path.or(Some(line)),
            Effect::Method => self.method = self.method.or(Some(line)),
            Effect::Nothing | Effect::Stops(_) => {}
        }
    }

    /// The first rewrite a condition reading `reads` would see, said for the report.
    fn seen_by(&self, reads: &Reads) -> Option<String> {
        if let Some((h, l)) = self.headers.iter().find(|(h, _)| reads.headers.contains(h)) {
            return Some(format!("header {h} is rewritten at line {l}"));
        }
        if let (true, Some(l)) = (reads.path, self.path) {
            return Some(format!("the path is rewritten at line {l}"));
        }
        if let (true, Some(l)) = (reads.method, self.method) {
            return Some(format!("the method is rewritten at line {l}"));
        }
        None
    }
}

/// The frontend's rules as written here, response rules first (they do not route: placed
/// before any rule that ends evaluation, they apply to every answer).
pub fn translate(p: &Proxy, http: bool, backends: &[&str], report: &mut Report) -> Vec<RuleOut> {
    if !http {
        for line in p.acls.iter().chain(&p.rules) {
            let topic = if line.keyword() == "acl" {
                Topic::AclOther
            } else {
                Topic::HttpRulesOther
            };
            report.add(line, topic, Some("the frontend is in tcp mode".to_owned()));
        }
        return Vec::new();
    }
    let acls = Acls::new(&p.acls, report);
    let mut out = Vec::new();
    for line in p
        .rules
        .iter()
        .filter(|l| matches!(l.keyword(), "http-response" | "http-after-response"))
    {
        match response(line) {
            Ok(toml) => {
                if line.keyword() == "http-response" {
                    report.add(line, Topic::HttpResponse, None);
                }
                out.push(RuleOut {
                    line: line.no,
                    text: line.text(),
                    toml,
                });
            }
            Err(why) => report.add(line, Topic::HttpResponseOther, Some(why)),
        }
    }
    let mut request: Vec<(Phase, &Line)> = p
        .rules
        .iter()
        .filter_map(|l| {
            let phase = match l.keyword() {
                "http-request" => Phase::Request,
                "redirect" => Phase::Redirect,
                "use_backend" => Phase::UseBackend,
                _ => return None,
            };
            Some((phase, l))
        })
        .collect();
    // Stable: each phase keeps the order its lines are written in.
    request.sort_by_key(|(phase, _)| *phase);
    let mut stopped: Option<(usize, Stops)> = None;
    let mut rewrites = Rewrites::default();
    for (phase, line) in request {
        if let Some((at, scope)) = stopped
            && (scope == Stops::Everything || phase == Phase::Request)
        {
            report.add(
                line,
                Topic::RuleAfterUntranslated,
                Some(format!("line {at} is not translated")),
            );
            continue;
        }
        match one(phase, line, &acls, backends, &rewrites) {
            Ok((toml, effect)) => {
                rewrites.add(&effect, line.no);
                if let Some(toml) = toml {
                    let words: Vec<&str> = line.words.iter().map(String::as_str).collect();
                    if let ["http-request", "redirect", "scheme", ..] | ["redirect", "scheme", ..] =
                        words.as_slice()
                    {
                        report.add(line, Topic::RedirectScheme, None);
                    }
                    out.push(RuleOut {
                        line: line.no,
                        text: line.text(),
                        toml,
                    });
                }
            }
            Err(r) => {
                report.add(line, r.topic, Some(r.detail));
                match r.effect {
                    Effect::Stops(s) => {
                        // An `allow` after an earlier stop does not narrow it.
                        if stopped.is_none_or(|(_, was)| was == Stops::HttpRequest) {
                            stopped = Some((line.no, s));
                        }
                    }
                    e => rewrites.add(&e, line.no),
                }
            }
        }
    }
    out
}

/// One request rule: its keys (none when its condition never holds) and what it rewrites.
fn one(
    phase: Phase,
    line: &Line,
    acls: &Acls,
    backends: &[&str],
    rewrites: &Rewrites,
) -> Result<(Option<String>, Effect), Refusal> {
    let words = line.args();
    let split = words
        .iter()
        .position(|w| w == "if" || w == "unless")
        .unwrap_or(words.len());
    let (action, cond) = words.split_at(split);
    // What leaving this rule out does to the rules after it.
    let effect = match phase {
        Phase::Redirect | Phase::UseBackend => Effect::Stops(Stops::Everything),
        Phase::Request => request_effect(action),
    };
    let act = match phase {
        Phase::UseBackend => use_backend(action, backends),
        Phase::Redirect => redirect(action).map(|r| format!("redirect = {r}")),
        Phase::Request => request_action(action),
    }
    .map_err(|(topic, why)| refuse(topic, why, effect.clone()))?;
    let when = if cond.is_empty() {
        Cond::Const(true)
    } else {
        acls.condition(cond)
            .map_err(|why| refuse(Topic::AclOther, why, effect.clone()))?
    };
    if let Some(why) = rewrites.seen_by(&when.reads()) {
        return Err(refuse(Topic::RuleReadsRewrite, why, effect));
    }
    // A rule that was written does what HAProxy's does: only its rewrites matter later.
    let written = match &effect {
        Effect::Stops(_) => Effect::Nothing,
        e => e.clone(),
    };
    let toml = match when {
        Cond::Const(false) => return Ok((None, written)),
        Cond::Const(true) => act,
        c => format!(
            "when = {}\n{act}",
            c.toml()
                .map_err(|why| refuse(Topic::AclOther, why, effect.clone()))?
        ),
    };
    Ok((Some(toml), written))
}

/// What an `http-request` action does to the rules after it, written or not.
fn request_effect(action: &[String]) -> Effect {
    let arg = |i: usize| action.get(i).map_or("", String::as_str);
    // `set-var(txn.x)`: the action without its argument.
    let name = arg(0).split_once('(').map_or(arg(0), |(a, _)| a);
    match name {
        "set-header" | "add-header" | "del-header" | "replace-header" | "replace-value" => {
            Effect::Header(arg(1).to_ascii_lowercase())
        }
        "set-path" | "set-pathq" | "replace-path" | "replace-pathq" | "set-uri" | "replace-uri"
        | "normalize-uri" | "set-query" => Effect::Path,
        "set-method" => Effect::Method,
        "allow" => Effect::Stops(Stops::HttpRequest),
        // Actions that neither answer nor change what a translated condition reads.
        "set-var"
        | "set-var-fmt"
        | "unset-var"
        | "capture"
        | "track-sc0"
        | "track-sc1"
        | "track-sc2"
        | "sc-inc-gpc"
        | "sc-inc-gpc0"
        | "sc-inc-gpc1"
        | "sc-set-gpt"
        | "sc-set-gpt0"
        | "set-log-level"
        | "set-tos"
        | "set-mark"
        | "set-nice"
        | "set-timeout"
        | "disable-l7-retry"
        | "strict-mode"
        | "set-priority-class"
        | "set-priority-offset"
        | "early-hint"
        | "do-resolve"
        | "wait-for-body"
        | "wait-for-handshake"
        | "send-spoe-group"
        | "set-bandwidth-limit" => Effect::Nothing,
        // deny, redirect, tarpit, auth, return, reject, lua actions...: may end the request.
        _ => Effect::Stops(Stops::Everything),
    }
}

fn use_backend(action: &[String], backends: &[&str]) -> Result<String, Refused> {
    let name = match action {
        [name] => name,
        _ => return Err((Topic::UseBackendOther, "one backend name".to_owned())),
    };
    if name.contains('%') {
        return Err((
            Topic::UseBackendOther,
            "a backend named by an expression".to_owned(),
        ));
    }
    if !backends.contains(&name.as_str()) {
        return Err((
            Topic::UseBackendOther,
            format!("backend '{name}' is not translated"),
        ));
    }
    Ok(format!("use_backend = {}", q(name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::proxies::tests::read;

    fn rules(text: &str) -> (Vec<RuleOut>, Report) {
        let (p, mut r) = read(text);
        let out = translate(&p[0], true, &["api", "app", "static"], &mut r);
        (out, r)
    }

    fn reported(r: &Report) -> Vec<(usize, Topic)> {
        r.entries()
            .iter()
            .map(|e| (e.line.unwrap_or(0), e.topic))
            .collect()
    }

    #[test]
    fn http_request_then_redirect_then_use_backend_whatever_the_order_written() {
        let (out, r) = rules(
            "frontend f\n\
             acl api path_beg /api/\n\
             use_backend api if api\n\
             redirect prefix https://new.example.com code 301 drop-query if { path_beg /old/ }\n\
             http-request deny deny_status 429 if { hdr(x-bad) -m found }\n\
             http-request set-header X-Via haproxy\n\
             http-request redirect scheme https unless { ssl_fc }\n\
             http-response del-header Server\n\
             use_backend static\n",
        );
        assert_eq!(
            reported(&r),
            [(7, Topic::RedirectScheme), (8, Topic::HttpResponse)]
        );
        let lines: Vec<_> = out.iter().map(|o| o.line).collect();
        assert_eq!(lines, [8, 5, 6, 7, 4, 3, 9]);
        assert_eq!(out[0].toml, "del_response_header = \"Server\"");
        assert_eq!(
            out[1].toml,
            "when = { header = { name = \"x-bad\" } }\ndeny = { status = 429 }"
        );
        assert_eq!(
            out[3].toml,
            "when = { not = { tls = true } }\nredirect = { scheme = \"https\", status = 302 }"
        );
        assert_eq!(
            out[4].toml,
            "when = { path_prefix = [\"/old/\"] }\nredirect = { prefix = \"https://new.example.com\", status = 301, drop_query = true }"
        );
        assert_eq!(out[6].toml, "use_backend = \"static\"");
    }

    #[test]
    fn a_rule_after_one_left_out_that_could_stop_the_request_is_left_out() {
        let (out, r) = rules(
            "frontend f\n\
             http-request set-var(txn.x) str(1)\n\
             http-request allow if { src 10.0.0.0/8 }\n\
             http-request deny if { path /admin }\n\
             use_backend api if { path_beg /api/ }\n\
             use_backend nope if { path_beg /nope/ }\n\
             use_backend static if { path_beg /static/ }\n",
        );
        assert_eq!(
            reported(&r),
            [
                (2, Topic::HttpRulesOther),
                (3, Topic::HttpRulesOther),
                (4, Topic::RuleAfterUntranslated),
                (6, Topic::UseBackendOther),
                (7, Topic::RuleAfterUntranslated),
            ]
        );
        let lines: Vec<_> = out.iter().map(|o| o.line).collect();
        assert_eq!(lines, [5]);
    }

    #[test]
    fn a_condition_on_what_an_earlier_rule_rewrote_is_left_out() {
        let (out, r) = rules(
            "frontend f\n\
             http-request set-header X-Env prod\n\
             http-request set-path /v2%[path] if { path_beg /v1/ }\n\
             use_backend api if { req.hdr(x-env) prod }\n\
             use_backend static if { path_beg /static/ }\n\
             use_backend app if { method GET }\n",
        );
        assert_eq!(
            reported(&r),
            [
                (3, Topic::HttpRulesOther),
                (4, Topic::RuleReadsRewrite),
                (5, Topic::RuleAfterUntranslated),
                (6, Topic::RuleAfterUntranslated),
            ]
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn values_and_fields_proxyd_cannot_write_are_refused() {
        let (out, r) = rules(
            "frontend f\n\
             http-request set-header X-Client %[src]\n\
             http-request set-header Host example.com\n\
             http-request del-header Connection\n\
             http-request add-header X-Ok \"a b\"\n\
             http-after-response set-header Strict-Transport-Security max-age=1\n\
             http-response set-header X-A b if { status 200 }\n\
             redirect prefix https://x.example.com/\n",
        );
        assert_eq!(
            reported(&r),
            [
                (2, Topic::HttpRulesOther),
                (3, Topic::HttpRulesOther),
                (4, Topic::HttpRulesOther),
                (7, Topic::HttpResponseOther),
                (8, Topic::HttpRulesOther),
            ]
        );
        let lines: Vec<_> = out.iter().map(|o| o.line).collect();
        assert_eq!(lines, [6, 5]);
        assert_eq!(
            out[1].toml,
            "add_header = { name = \"X-Ok\", value = \"a b\" }"
        );
    }

    #[test]
    fn a_tcp_frontends_rules_are_reported() {
        let (p, mut r) = read("frontend f\n acl a src 1.2.3.4\n use_backend api if a\n");
        assert!(translate(&p[0], false, &["api"], &mut r).is_empty());
        assert_eq!(
            reported(&r),
            [(2, Topic::AclOther), (3, Topic::HttpRulesOther)]
        );
    }
}
