//! haproxy.cfg's lines grouped into sections (global, defaults, proxies, peers and the rest).

use super::lexer::Line;

/// What a section is; the ones the import does not translate keep their keyword.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
    Peers,
    /// Another section HAProxy knows (resolvers, userlist, ...), by its keyword.
    Other(String),
}

/// Keywords that open a section HAProxy knows, besides the six translated ones.
pub const OTHER_SECTIONS: &[&str] = &[
    "resolvers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
    "log-forward",
    "crt-store",
    "traces",
    "acme",
];

/// One section: its header line and the lines up to the next header.
#[derive(Clone, Debug)]
pub struct Section {
    pub kind: Kind,
    /// The header line (`backend app`).
    pub header: Line,
    pub body: Vec<Line>,
}

impl Section {
    /// The section's name (the word after the keyword), if any.
    pub fn name(&self) -> Option<&str> {
        self.header.args().first().map(String::as_str)
    }
}

/// Sections in file order, and the lines before the first one (which HAProxy refuses).
pub struct Sections {
    pub sections: Vec<Section>,
    pub orphans: Vec<Line>,
}

/// Groups lines into sections. A section keyword opens a section wherever it is indented (a
/// `peers` block written indented under `global` is a section of its own, as HAProxy reads it).
pub fn split(lines: Vec<Line>) -> Sections {
    let mut sections: Vec<Section> = Vec::new();
    let mut orphans = Vec::new();
    for line in lines {
        let kind = match line.keyword() {
            "global" => Some(Kind::Global),
            "defaults" => Some(Kind::Defaults),
            "frontend" => Some(Kind::Frontend),
            "backend" => Some(Kind::Backend),
            "listen" => Some(Kind::Listen),
            "peers" => Some(Kind::Peers),
            k if OTHER_SECTIONS.contains(&k) => Some(Kind::Other(k.to_owned())),
            _ => None,
        };
        match (kind, sections.last_mut()) {
            (Some(kind), _) => sections.push(Section {
                kind,
                header: line,
                body: Vec::new(),
            }),
            (None, Some(s)) => s.body.push(line),
            (None, None) => orphans.push(line),
        }
    }
    Sections { sections, orphans }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::lexer::lex;

    #[test]
    fn an_indented_peers_block_is_its_own_section() {
        let text = "global\n    maxconn 1\n    peers mypeers\n        peer a 1.2.3.4:1\ndefaults\n    mode http\n";
        let s = split(lex(text).expect("lexes"));
        let kinds: Vec<_> = s.sections.iter().map(|s| s.kind.clone()).collect();
        assert_eq!(kinds, [Kind::Global, Kind::Peers, Kind::Defaults]);
        assert_eq!(s.sections[1].name(), Some("mypeers"));
        assert_eq!(s.sections[1].body[0].no, 4);
        assert_eq!(s.sections[0].body.len(), 1);
    }

    #[test]
    fn lines_before_any_section_are_orphans_and_other_sections_are_kept() {
        let s = split(lex("maxconn 1\nuserlist u\n  user a password x\n").expect("lexes"));
        assert_eq!(s.orphans.len(), 1);
        assert_eq!(s.sections[0].kind, Kind::Other("userlist".into()));
        assert_eq!(s.sections[0].body.len(), 1);
    }
}
