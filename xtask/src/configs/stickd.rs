//! stickd.toml: data dir, socket, peers and stick tables.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::{bare_line, comment_line, quoted, string_line};

/// One stickd node.
#[derive(Clone, Debug)]
pub struct Stickd {
    /// The file's first line, after `# ` (none when empty).
    pub comment: &'static str,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub heartbeat: Option<&'static str>,
    pub flush_interval: Option<&'static str>,
    pub log_keep: Option<u64>,
    /// Every node of the mesh by name, this one included.
    pub peers: Vec<(String, SocketAddr)>,
    pub tables: Vec<Table>,
}

/// A stick table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub key: Key,
    pub size: String,
    pub expire: String,
}

/// A table's key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    String { len: u32 },
    Integer,
}

impl Table {
    pub fn string(name: &str, len: u32, size: &str, expire: &str) -> Self {
        Self {
            name: name.to_owned(),
            key: Key::String { len },
            size: size.to_owned(),
            expire: expire.to_owned(),
        }
    }

    pub fn integer(name: &str, size: &str, expire: &str) -> Self {
        Self {
            name: name.to_owned(),
            key: Key::Integer,
            size: size.to_owned(),
            expire: expire.to_owned(),
        }
    }

    /// The same table as HAProxy's `stick-table` line would declare it.
    fn haproxy(&self) -> String {
        let key = match self.key {
            Key::String { len } => format!("string len {len}"),
            Key::Integer => "integer".to_owned(),
        };
        format!(
            "stick-table type {key} size {} expire {}",
            self.size, self.expire
        )
    }
}

impl Stickd {
    /// A node with no peers and no tables yet.
    pub fn new(data_dir: PathBuf, socket: PathBuf) -> Self {
        Self {
            comment: "",
            data_dir,
            socket,
            heartbeat: None,
            flush_interval: None,
            log_keep: None,
            peers: Vec::new(),
            tables: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        comment_line(&mut s, self.comment);
        let _ = writeln!(s, "data_dir = {}", quoted(self.data_dir.display()));
        let _ = writeln!(s, "socket = {}", quoted(self.socket.display()));
        string_line(&mut s, "heartbeat", self.heartbeat);
        string_line(&mut s, "flush_interval", self.flush_interval);
        bare_line(&mut s, "log_keep", self.log_keep);
        for (name, address) in &self.peers {
            let _ = write!(
                s,
                "\n[[peers]]\nname = {}\naddress = {}\n",
                quoted(name),
                quoted(address)
            );
        }
        for t in &self.tables {
            let _ = write!(
                s,
                "\n# HAProxy: {}\n[[tables]]\nname = {}\n",
                t.haproxy(),
                quoted(&t.name)
            );
            match t.key {
                Key::String { len } => {
                    let _ = writeln!(s, "type = \"string\"\nlen = {len}");
                }
                Key::Integer => s.push_str("type = \"integer\"\n"),
            }
            let _ = writeln!(
                s,
                "size = {}\nexpire = {}",
                quoted(&t.size),
                quoted(&t.expire)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_and_tables() {
        let mut n = Stickd::new("/d/data".into(), "/d/stickd.sock".into());
        n.heartbeat = Some("500ms");
        n.log_keep = Some(7);
        n.peers = vec![("node1".into(), "127.0.0.1:10000".parse().expect("addr"))];
        n.tables = vec![
            Table::string("t", 32, "5k", "5m"),
            Table::integer("i", "1k", "2s"),
        ];
        let t = n.render();
        assert!(t.starts_with("data_dir = \"/d/data\"\n"), "{t}");
        assert!(t.contains("heartbeat = \"500ms\"\nlog_keep = 7\n"), "{t}");
        assert!(
            t.contains("[[peers]]\nname = \"node1\"\naddress = \"127.0.0.1:10000\"\n"),
            "{t}"
        );
        assert!(
            t.contains("# HAProxy: stick-table type string len 32 size 5k expire 5m\n"),
            "{t}"
        );
        assert!(
            t.contains("name = \"i\"\ntype = \"integer\"\nsize = \"1k\"\nexpire = \"2s\"\n"),
            "{t}"
        );
    }
}
