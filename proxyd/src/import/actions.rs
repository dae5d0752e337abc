//! The actions of a frontend's rules, each as the keys of one `[[frontend.rule]]`: redirects,
//! `deny`, and header edits of requests and responses with values written out.

use super::catalog::Topic;
use super::lexer::Line;
use super::write::q;

/// Why an action is not written: the report's topic and detail.
pub(super) type Refused = (Topic, String);

/// `location|prefix|scheme VALUE [code N] [drop-query]` as proxyd's `redirect` table.
pub(super) fn redirect(action: &[String]) -> Result<String, Refused> {
    let other = |why: String| (Topic::HttpRulesOther, why);
    let (kind, value, rest) = match action {
        [k, v, rest @ ..] => (k.as_str(), v.as_str(), rest),
        _ => return Err(other("a redirect without its target".to_owned())),
    };
    if value.contains('%') {
        return Err(other("a log-format value".to_owned()));
    }
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(other(format!("redirect {kind} '{value}'")));
    }
    let mut status = 302;
    let mut drop_query = false;
    let mut i = 0;
    while i < rest.len() {
        match (rest[i].as_str(), rest.get(i + 1).map(String::as_str)) {
            ("code", Some(c @ ("301" | "302" | "303" | "307" | "308"))) => {
                status = c.parse().expect("a code");
                i += 1;
            }
            ("drop-query", _) => drop_query = true,
            (o, _) => return Err(other(format!("redirect option {o}"))),
        }
        i += 1;
    }
    let to = match kind {
        "location" => format!("location = {}", q(value)),
        // HAProxy writes the prefix, then the path: a prefix ending in '/' (but "/" itself,
        // which HAProxy leaves out) gives "//" where proxyd gives one '/'.
        "prefix" if value == "/" || !value.ends_with('/') => format!("prefix = {}", q(value)),
        "prefix" => {
            return Err(other(
                "a prefix that ends in '/': HAProxy's Location then has '//'".to_owned(),
            ));
        }
        "scheme"
            if value.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
                && value.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b)
                }) =>
        {
            format!("scheme = {}", q(value))
        }
        _ => return Err(other(format!("redirect {kind} {value}"))),
    };
    let drop = if drop_query && kind != "location" {
        ", drop_query = true"
    } else {
        ""
    };
    Ok(format!("{{ {to}, status = {status}{drop} }}"))
}

pub(super) fn request_action(action: &[String]) -> Result<String, Refused> {
    let other = |why: String| (Topic::HttpRulesOther, why);
    let words: Vec<&str> = action.iter().map(String::as_str).collect();
    match *words.as_slice() {
        ["redirect", ..] => redirect(&action[1..]).map(|r| format!("redirect = {r}")),
        ["deny"] => Ok("deny = { status = 403 }".to_owned()),
        ["deny", "deny_status" | "status", code] => match code.parse::<u16>() {
            Ok(c) if (400..=599).contains(&c) => Ok(format!("deny = {{ status = {c} }}")),
            _ => Err(other(format!("deny status {code}"))),
        },
        ["deny", ..] => Err(other("deny with a body or headers".to_owned())),
        [op @ ("set-header" | "add-header"), name, value] => {
            field(name, true)?;
            literal(value)?;
            let key = if op == "set-header" {
                "set_header"
            } else {
                "add_header"
            };
            Ok(format!(
                "{key} = {{ name = {}, value = {} }}",
                q(name),
                q(value)
            ))
        }
        ["del-header", name] => {
            field(name, true)?;
            Ok(format!("del_header = {}", q(name)))
        }
        [a, ..] => Err(other(format!("http-request {a}"))),
        [] => Err(other("no action".to_owned())),
    }
}

/// `http-response|http-after-response set-header|add-header|del-header` without condition.
pub(super) fn response(line: &Line) -> Result<String, String> {
    let words: Vec<&str> = line.args().iter().map(String::as_str).collect();
    if words.iter().any(|w| *w == "if" || *w == "unless") {
        return Err("a condition (proxyd's response rules have none)".to_owned());
    }
    let checked = |name: &str, value: Option<&str>| -> Result<(), String> {
        field(name, false).map_err(|e| e.1)?;
        value.map_or(Ok(()), |v| literal(v).map_err(|e| e.1))
    };
    match *words.as_slice() {
        [op @ ("set-header" | "add-header"), name, value] => {
            checked(name, Some(value))?;
            let key = if op == "set-header" {
                "set_response_header"
            } else {
                "add_response_header"
            };
            Ok(format!(
                "{key} = {{ name = {}, value = {} }}",
                q(name),
                q(value)
            ))
        }
        ["del-header", name] => {
            checked(name, None)?;
            Ok(format!("del_response_header = {}", q(name)))
        }
        [a, ..] => Err(format!("{} {a}", line.keyword())),
        [] => Err("no action".to_owned()),
    }
}

fn field(name: &str, request: bool) -> Result<(), Refused> {
    if name.is_empty() || !name.bytes().all(crate::rules::is_tchar) {
        return Err((Topic::HttpRulesOther, format!("header name '{name}'")));
    }
    if crate::config::is_proxys_field(name, request) {
        return Err((
            Topic::HttpRulesOther,
            format!("header {name}: proxyd writes it itself"),
        ));
    }
    Ok(())
}

/// A header value HAProxy reads as it is written: no `%` (a log-format expression), nothing
/// proxyd refuses (control bytes, blanks around it).
fn literal(value: &str) -> Result<(), Refused> {
    if value.contains('%') {
        return Err((Topic::HttpRulesOther, "a log-format value".to_owned()));
    }
    if value
        .bytes()
        .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
        || value.trim_matches([' ', '\t']) != value
    {
        return Err((
            Topic::HttpRulesOther,
            "a value with control bytes or blanks around it".to_owned(),
        ));
    }
    Ok(())
}
