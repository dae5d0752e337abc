//! Every config file xtask writes for the programs it starts (e2e, demo, soak, bench): one typed
//! builder per program, rendered to text with `render()`.
//!
//! The daemons' TOML builders write only what a caller set, so that a file says what its test
//! or bench chose and leaves the rest to the daemon's defaults.

pub mod fdkeeper;
pub mod haproxy;
pub mod nginx;
pub mod proxyd;
pub mod stickd;

pub use fdkeeper::Fdkeeper;
pub use haproxy::Haproxy;
pub use nginx::Nginx;
pub use proxyd::Proxyd;
pub use stickd::Stickd;

use std::fmt::{Display, Write};

/// Server names and addresses, in config order.
pub type Servers = [(String, std::net::SocketAddr)];

/// A TOML basic string.
pub(crate) fn quoted(s: impl Display) -> String {
    let mut out = String::from("\"");
    for c in s.to_string().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Appends `key = "value"` when `value` is set.
fn string_line(out: &mut String, key: &str, value: Option<impl Display>) {
    if let Some(v) = value {
        let _ = writeln!(out, "{key} = {}", quoted(v));
    }
}

/// Appends `key = value` (a number or a boolean) when `value` is set.
fn bare_line(out: &mut String, key: &str, value: Option<impl Display>) {
    if let Some(v) = value {
        let _ = writeln!(out, "{key} = {v}");
    }
}

/// Appends `# comment` when there is one.
fn comment_line(out: &mut String, comment: &str) {
    if !comment.is_empty() {
        let _ = writeln!(out, "# {comment}");
    }
}

#[cfg(test)]
mod tests {
    use super::quoted;

    #[test]
    fn quoted_escapes_quotes_and_backslashes() {
        assert_eq!(quoted("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
