//! One ACL test (`FETCH [-i] [-m METHOD] VALUES`) as one of proxyd's conditions, matching the
//! requests HAProxy's matches: paths as sets, prefixes or regexes, header fields split at
//! commas as `hdr()` splits them, methods, source addresses, TLS.

use super::acl::{Cond, Leaf, Reads, method, strings};
use super::write::q;

/// How an ACL's values are compared (`-m`, or the fetch's own default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    Str,
    Beg,
    End,
    Sub,
    Reg,
    Found,
}

impl Match {
    fn parse(s: &str) -> Option<Match> {
        Some(match s {
            "str" => Match::Str,
            "beg" => Match::Beg,
            "end" => Match::End,
            "sub" => Match::Sub,
            "reg" => Match::Reg,
            "found" => Match::Found,
            _ => return None,
        })
    }
}

/// `FETCH [FLAGS] VALUES...` (an `acl` line after its name, or the inside of `{ }`).
pub(super) fn fetch(words: &[String]) -> Result<Cond, String> {
    let Some((fetch, rest)) = words.split_first() else {
        return Err("no fetch".to_owned());
    };
    let mut icase = false;
    let mut how = None;
    let mut i = 0;
    while i < rest.len() && rest[i].starts_with('-') {
        match rest[i].as_str() {
            "-i" => icase = true,
            "-n" => {}
            "--" => {
                i += 1;
                break;
            }
            "-m" => {
                let m = rest.get(i + 1).map_or("", String::as_str);
                how = Some(Match::parse(m).ok_or_else(|| format!("-m {m}"))?);
                i += 1;
            }
            "-f" => return Err("patterns from a file (-f)".to_owned()),
            f => return Err(format!("flag {f}")),
        }
        i += 1;
    }
    let values: Vec<&str> = rest[i..].iter().map(String::as_str).collect();
    let (base, arg) = match fetch.split_once('(') {
        Some((b, a)) => match a.strip_suffix(')') {
            Some(a) => (b, Some(a)),
            None => return Err(format!("fetch {fetch}")),
        },
        None => (fetch.as_str(), None),
    };
    let refuse = || Err(format!("fetch {fetch}"));
    // The fetch's own match method, then `-m`, which may only say the same or replace `str`.
    let (kind, default) = match (base, arg) {
        ("path", None) => ("path", Match::Str),
        ("path_beg", None) => ("path", Match::Beg),
        ("path_end", None) => ("path", Match::End),
        ("path_sub", None) => ("path", Match::Sub),
        ("path_reg", None) => ("path", Match::Reg),
        ("hdr" | "req.hdr", Some(_)) => ("hdr", Match::Str),
        ("hdr_beg", Some(_)) => ("hdr", Match::Beg),
        ("hdr_end", Some(_)) => ("hdr", Match::End),
        ("hdr_sub", Some(_)) => ("hdr", Match::Sub),
        ("req.fhdr", Some(_)) => ("fhdr", Match::Str),
        ("method", None) => ("method", Match::Str),
        ("src", None) => ("src", Match::Str),
        ("ssl_fc", None) => ("ssl_fc", Match::Str),
        _ => return refuse(),
    };
    let how = match (how, default) {
        (None, d) => d,
        (Some(m), Match::Str) => m,
        (Some(m), d) if m == d => m,
        (Some(_), _) => return Err(format!("-m on {fetch}")),
    };
    if how != Match::Found && values.is_empty() && kind != "ssl_fc" {
        return Err(format!("{fetch} without a value"));
    }
    match kind {
        "path" => path(how, icase, &values),
        "hdr" | "fhdr" => header(arg.unwrap_or(""), kind == "hdr", how, icase, &values),
        "method" if how == Match::Str && !icase => {
            if values
                .iter()
                .all(|v| !v.is_empty() && v.bytes().all(crate::rules::is_tchar))
            {
                Ok(Cond::Leaf(method(&values)))
            } else {
                Err("a method that is not a token".to_owned())
            }
        }
        "src" if how == Match::Str => {
            for &v in &values {
                let (ip, prefix) = v.split_once('/').unwrap_or((v, ""));
                let ok = match ip.parse::<std::net::IpAddr>() {
                    Ok(a) => {
                        let max = if a.is_ipv4() { 32 } else { 128 };
                        prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)
                    }
                    Err(_) => false,
                };
                if !ok {
                    return Err(format!("src {v} (an address or ip/prefix)"));
                }
            }
            Ok(Cond::Leaf(Leaf {
                toml: format!("src = {}", strings(values.iter().copied())),
                reads: Reads::default(),
            }))
        }
        "ssl_fc" if values.is_empty() && !icase => Ok(Cond::Leaf(Leaf {
            toml: "tls = true".to_owned(),
            reads: Reads::default(),
        })),
        _ => Err(format!("{fetch} with these flags or values")),
    }
}

/// What a path in a rule's `path` and `path_prefix` may hold (proxyd's own check).
fn plain_path(p: &str) -> bool {
    p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
}

fn path(how: Match, icase: bool, values: &[&str]) -> Result<Cond, String> {
    let reads = Reads {
        path: true,
        ..Reads::default()
    };
    let leaf = |toml: String| {
        Ok(Cond::Leaf(Leaf {
            toml,
            reads: reads.clone(),
        }))
    };
    if values
        .iter()
        .any(|v| !v.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err("a path value with a space or a byte outside ASCII".to_owned());
    }
    match how {
        Match::Str if !icase && values.iter().all(|v| plain_path(v)) => {
            return leaf(format!("path = {}", strings(values.iter().copied())));
        }
        Match::Beg if !icase && values.iter().all(|v| plain_path(v)) => {
            return leaf(format!("path_prefix = {}", strings(values.iter().copied())));
        }
        Match::Found => return Err("path -m found".to_owned()),
        _ => {}
    }
    let alternatives: Vec<String> = if how == Match::Reg {
        if icase {
            return Err("-i on a regex".to_owned());
        }
        values
            .iter()
            .map(|v| portable_regex(v).map(|r| format!("(?:{r})")))
            .collect::<Result<_, _>>()?
    } else {
        values.iter().map(|v| regex::escape(v)).collect()
    };
    let body = alternatives.join("|");
    let re = match how {
        Match::Str => format!("^(?:{body})$"),
        Match::Beg => format!("^(?:{body})"),
        Match::End => format!("(?:{body})$"),
        _ => body,
    };
    // ASCII case folding, as HAProxy's: the path is ASCII.
    let re = if icase { format!("(?i-u){re}") } else { re };
    regex::Regex::new(&re).map_err(|e| format!("regex: {e}"))?;
    leaf(format!("path_regex = {}", q(&re)))
}

/// A regex HAProxy (PCRE) and proxyd (Rust's regex) read alike: literals, `.`, classes,
/// groups, alternations and quantifiers; `\d`, `\w` and `\s` become their ASCII classes.
/// Lookarounds, backreferences, inline flags and other escapes are refused.
fn portable_regex(re: &str) -> Result<String, String> {
    let refuse = || {
        Err(format!(
            "regex '{re}' (only the syntax PCRE and proxyd share)"
        ))
    };
    // Inline flags and lookarounds; `{,n}` (a literal to PCRE); class set operations and
    // nested classes (Rust's, literals to PCRE).
    let differ = ["(?", "{,", "&&", "--", "~~"];
    if differ.iter().any(|d| re.contains(d)) || !re.bytes().all(|b| b.is_ascii_graphic()) {
        return refuse();
    }
    let mut out = String::new();
    let mut chars = re.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        if c != '\\' {
            match c {
                '[' if in_class && chars.peek() != Some(&':') => return refuse(),
                '[' if !in_class => in_class = true,
                ']' if in_class && !out.ends_with('[') && !out.ends_with("[^") => in_class = false,
                _ => {}
            }
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str("[0-9]"),
            Some('w') => out.push_str("[0-9A-Za-z_]"),
            Some('s') => out.push_str("[\\t\\n\\x0B\\x0C\\r ]"),
            Some(p) if p.is_ascii_punctuation() => {
                out.push('\\');
                out.push(p);
            }
            _ => return refuse(),
        }
    }
    // `\d` inside `[...]` would become a class in a class: refused rather than rewritten.
    if re.contains('[') && ["\\d", "\\w", "\\s"].iter().any(|e| re.contains(e)) {
        return refuse();
    }
    match regex::Regex::new(&out) {
        Ok(_) => Ok(out),
        Err(_) => refuse(),
    }
}

/// One element of a comma-separated field, as HAProxy's `hdr()` splits it: commas inside
/// double quotes (with backslash escapes) do not split.
const ELEMENT_CHAR: &str = r#"(?:[^,"]|"(?:[^"\\]|\\.)*")"#;

fn header(
    name: &str,
    split: bool,
    how: Match,
    icase: bool,
    values: &[&str],
) -> Result<Cond, String> {
    if name.is_empty() || !name.bytes().all(crate::rules::is_tchar) {
        return Err(format!("header name '{name}' (one name, no occurrence)"));
    }
    let reads = Reads {
        headers: vec![name.to_ascii_lowercase()],
        ..Reads::default()
    };
    let leaf = |toml: String| {
        Ok(Cond::Leaf(Leaf {
            toml,
            reads: reads.clone(),
        }))
    };
    if how == Match::Found {
        return leaf(format!("header = {{ name = {} }}", q(name)));
    }
    if how == Match::Reg {
        return Err("a regex on a header".to_owned());
    }
    if values.iter().any(|v| {
        !v.bytes()
            .all(|b| (b.is_ascii_graphic() || b == b' ') && !b",\"\\".contains(&b))
    }) {
        return Err(
            "a header value with a comma, quote, backslash or byte outside ASCII".to_owned(),
        );
    }
    let alt = values
        .iter()
        .map(|v| regex::escape(v))
        .collect::<Vec<_>>()
        .join("|");
    // Bytes, not Unicode (a field may hold any byte), and ASCII case folding as HAProxy's -i.
    let flags = if icase { "(?i-u)" } else { "(?-u)" };
    let v = format!("(?:{alt})");
    let re = if split {
        // Any number of whole elements and their commas, then the one that matches, its
        // surrounding blanks trimmed as HAProxy trims them.
        let e = ELEMENT_CHAR;
        let before = format!("^(?:{e}*,)*[ \\t]*");
        match how {
            Match::Str => format!("{flags}{before}{v}[ \\t]*(?:,|$)"),
            Match::Beg => format!("{flags}{before}{v}"),
            Match::End => format!("{flags}{before}{e}*?{v}[ \\t]*(?:,|$)"),
            // Inside the element, possibly inside a quoted string of it.
            _ => format!("{flags}{before}{e}*(?:\"(?:[^\"\\\\]|\\\\.)*)?{v}"),
        }
    } else {
        match how {
            Match::Str => format!("{flags}^{v}$"),
            Match::Beg => format!("{flags}^{v}"),
            Match::End => format!("{flags}{v}$"),
            _ => format!("{flags}{v}"),
        }
    };
    regex::bytes::Regex::new(&re).map_err(|e| format!("regex: {e}"))?;
    leaf(format!(
        "header = {{ name = {}, regex = {} }}",
        q(name),
        q(&re)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::acl::tests::{acls, when, words};

    #[test]
    fn paths_as_sets_prefixes_or_exact_regexes() {
        let (a, _) = acls("");
        let one = |c: &str| when(&a, &format!("if {{ {c} }}"));
        assert_eq!(
            one("path -i /A").as_deref(),
            Ok("{ path_regex = \"(?i-u)^(?:/A)$\" }")
        );
        assert_eq!(
            one("path_end .php .cgi").as_deref(),
            Ok("{ path_regex = '(?:\\.php|\\.cgi)$' }")
        );
        assert_eq!(
            one("path_sub /x/").as_deref(),
            Ok("{ path_regex = \"/x/\" }")
        );
        assert_eq!(
            one("path -m beg /s").as_deref(),
            Ok("{ path_prefix = [\"/s\"] }")
        );
        assert_eq!(
            one("path_beg img").as_deref(),
            Ok("{ path_regex = \"^(?:img)\" }")
        );
        assert_eq!(
            one("path_reg ^/u/\\d+$").as_deref(),
            Ok("{ path_regex = \"(?:^/u/[0-9]+$)\" }")
        );
    }

    #[test]
    fn headers_split_at_commas_as_haproxy_does() {
        let (a, _) = acls("acl h hdr(host) -i www.example.com\nacl x req.hdr(X-Env) -m found\n");
        let c = a.condition(&words("if h")).expect("translates");
        let Cond::Leaf(l) = &c else { panic!("{c:?}") };
        assert_eq!(l.reads.headers, ["host"]);
        let re = c.toml().expect("toml");
        assert!(re.contains("name = \"host\""), "{re}");
        // The regex itself, against what HAProxy would and would not match.
        let pattern: String = toml::from_str::<toml::Value>(&format!("w = {re}")).expect("toml")["w"]
            ["header"]["regex"]
            .as_str()
            .expect("regex")
            .to_owned();
        let r = regex::bytes::Regex::new(&pattern).expect("regex");
        for yes in [
            "www.example.com",
            "WWW.Example.COM",
            " www.example.com ",
            "a, www.example.com",
            "\"x,y\", www.example.com",
        ] {
            assert!(r.is_match(yes.as_bytes()), "{yes}");
        }
        for no in [
            "www.example.com:80",
            "www.example.com.",
            "xwww.example.com",
            "\"a, www.example.com\"",
            "www.example.co",
        ] {
            assert!(!r.is_match(no.as_bytes()), "{no}");
        }
        assert_eq!(
            when(&a, "if x").as_deref(),
            Ok("{ header = { name = \"X-Env\" } }")
        );
    }
}
