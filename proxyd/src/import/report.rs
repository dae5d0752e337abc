//! The import's report: every line translated only approximately or not at all, with why and
//! what to do instead.

use std::fmt;

use super::catalog::{Fate, Topic};
use super::lexer::Line;

/// One reported line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line in haproxy.cfg; none for what the file lacks (no `user`, say).
    pub line: Option<usize>,
    /// The directive as written (words joined).
    pub directive: String,
    pub topic: Topic,
    /// What this line adds to the topic's reason (the value kept, the server left out).
    pub detail: Option<String>,
}

impl Entry {
    pub fn fate(&self) -> Fate {
        self.topic.info().fate
    }
}

/// The report of one import.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The haproxy.cfg as named on the command line.
    pub file: String,
    entries: Vec<Entry>,
    /// Lines read, for the summary.
    pub lines: usize,
}

impl Report {
    pub fn new(file: String) -> Self {
        Report {
            file,
            ..Report::default()
        }
    }

    /// Reports `line` under `topic`; a topic that translates exactly is never reported.
    pub fn add(&mut self, line: &Line, topic: Topic, detail: Option<String>) {
        self.push(Some(line.no), line.text(), topic, detail);
    }

    /// Reports what the file lacks rather than a line of it.
    pub fn note(&mut self, what: &str, topic: Topic, detail: Option<String>) {
        self.push(None, what.to_owned(), topic, detail);
    }

    fn push(
        &mut self,
        line: Option<usize>,
        directive: String,
        topic: Topic,
        detail: Option<String>,
    ) {
        debug_assert!(
            topic.info().fate != Fate::Translated,
            "{topic:?} translates exactly"
        );
        let e = Entry {
            line,
            directive,
            topic,
            detail,
        };
        if !self.entries.contains(&e) {
            self.entries.push(e);
        }
    }

    /// Entries by line (notes without a line first), each once.
    pub fn entries(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.iter().collect();
        v.sort_by_key(|e| e.line);
        v
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn count(&self, fate: Fate) -> usize {
        self.entries.iter().filter(|e| e.fate() == fate).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} lines read; {} approximate, {} not translated",
            self.file,
            self.lines,
            self.count(Fate::Approximate),
            self.count(Fate::NotTranslated)
        )?;
        for e in self.entries() {
            let info = e.topic.info();
            match e.line {
                Some(n) => write!(f, "{}:{n}: ", self.file)?,
                None => write!(f, "{}: ", self.file)?,
            }
            writeln!(f, "{}: `{}`", info.fate.as_str(), e.directive)?;
            match &e.detail {
                Some(d) => writeln!(f, "    why: {} ({d})", info.why)?,
                None => writeln!(f, "    why: {}", info.why)?,
            }
            writeln!(f, "    instead: {}", info.instead)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_by_line_once_with_why_and_instead() {
        let mut r = Report::new("h.cfg".into());
        r.lines = 9;
        let l = |no: usize, w: &[&str]| Line {
            no,
            words: w.iter().map(|s| s.to_string()).collect(),
        };
        r.add(&l(7, &["acl", "a", "path", "/x"]), Topic::AclOther, None);
        r.add(
            &l(3, &["option", "http-server-close"]),
            Topic::HttpServerClose,
            None,
        );
        r.add(&l(7, &["acl", "a", "path", "/x"]), Topic::AclOther, None);
        r.note("global", Topic::NoUser, None);
        let text = r.to_string();
        assert!(
            text.starts_with("h.cfg: 9 lines read; 2 approximate, 1 not translated\n"),
            "{text}"
        );
        let at: Vec<_> = r.entries().iter().map(|e| e.line).collect();
        assert_eq!(at, [None, Some(3), Some(7)]);
        assert!(text.contains("h.cfg:7: not translated: `acl a path /x`\n    why: "));
        assert!(text.contains("    instead: "));
    }
}
