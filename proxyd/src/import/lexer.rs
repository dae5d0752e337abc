//! haproxy.cfg as lines of words, the way HAProxy splits them: comments, quotes and escapes.

use thiserror::Error;

/// One non-empty line of the file, split into words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file.
    pub no: usize,
    pub words: Vec<String>,
}

impl Line {
    /// The first word: the section keyword or the directive.
    pub fn keyword(&self) -> &str {
        self.words.first().map_or("", String::as_str)
    }

    /// The words after the keyword.
    pub fn args(&self) -> &[String] {
        self.words.get(1..).unwrap_or(&[])
    }

    /// The words joined again, for the report: a word with spaces, control characters or
    /// nothing in it is quoted, with escapes.
    pub fn text(&self) -> String {
        let shown: Vec<String> = self
            .words
            .iter()
            .map(|w| {
                if w.is_empty() || w.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    format!("{w:?}")
                } else {
                    w.clone()
                }
            })
            .collect();
        shown.join(" ")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LexError {
    #[error("{line}: unterminated quote")]
    Quote { line: usize },
    #[error("{line}: a backslash ends the line")]
    Backslash { line: usize },
}

/// Splits the file into lines of words; blank and comment-only lines are left out.
///
/// As in HAProxy: `#` starts a comment outside quotes; words are separated by spaces and tabs;
/// `"..."` keeps spaces (and takes backslash escapes), `'...'` keeps everything as written;
/// a backslash outside single quotes escapes the next character (`\ `, `\#`, `\"`, `\\`, and
/// `\t`, `\r`, `\n` for those characters). Environment variables are not expanded.
pub fn lex(text: &str) -> Result<Vec<Line>, LexError> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let words = words(raw, i + 1)?;
        if !words.is_empty() {
            lines.push(Line { no: i + 1, words });
        }
    }
    Ok(lines)
}

fn words(raw: &str, line: usize) -> Result<Vec<String>, LexError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Double,
        Single,
    }
    let mut words = Vec::new();
    let mut word = String::new();
    // A word may be empty but present (`""`): track that it started.
    let mut started = false;
    let mut quote = Quote::None;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Quote::Single, '\'') => quote = Quote::None,
            (Quote::Single, c) => word.push(c),
            (Quote::Double, '"') => quote = Quote::None,
            (_, '\\') => {
                let Some(next) = chars.next() else {
                    return Err(LexError::Backslash { line });
                };
                word.push(match next {
                    't' => '\t',
                    'r' => '\r',
                    'n' => '\n',
                    other => other,
                });
                started = true;
            }
            (Quote::Double, c) => word.push(c),
            (Quote::None, '"') => {
                quote = Quote::Double;
                started = true;
            }
            (Quote::None, '\'') => {
                quote = Quote::Single;
                started = true;
            }
            (Quote::None, '#') => break,
            (Quote::None, ' ' | '\t') => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            (Quote::None, c) => {
                word.push(c);
                started = true;
            }
        }
    }
    if quote != Quote::None {
        return Err(LexError::Quote { line });
    }
    if started {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Vec<String> {
        words(s, 1).expect("lexes")
    }

    #[test]
    fn words_comments_and_blank_lines() {
        let lines =
            lex("global\n\n  # only a comment\n    maxconn 20000   # trailing\n").expect("lexes");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].no, 4);
        assert_eq!(lines[1].words, ["maxconn", "20000"]);
        assert_eq!(lines[1].keyword(), "maxconn");
        assert_eq!(lines[1].args(), ["20000"]);
    }

    #[test]
    fn quotes_and_escapes_keep_spaces_and_hashes() {
        assert_eq!(
            one(r#"http-check send hdr Host "www example" uri /a\ b"#),
            [
                "http-check",
                "send",
                "hdr",
                "Host",
                "www example",
                "uri",
                "/a b"
            ]
        );
        assert_eq!(
            one(r"option httpchk GET /x\#y"),
            ["option", "httpchk", "GET", "/x#y"]
        );
        assert_eq!(one(r#"a '\n "x"' "#), ["a", r#"\n "x""#]);
        assert_eq!(one(r#"a "" b"#), ["a", "", "b"]);
        assert_eq!(one(r#"a "x\"y""#), ["a", "x\"y"]);
    }

    #[test]
    fn unterminated_quote_is_an_error_with_its_line() {
        assert_eq!(lex("a\nb \"c\n"), Err(LexError::Quote { line: 2 }));
        assert_eq!(lex("a \\"), Err(LexError::Backslash { line: 1 }));
    }
}
