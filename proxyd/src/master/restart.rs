//! The settings the master binds once at start (its admin socket, its metrics listener): a
//! reload cannot apply a change to them, so it names each one, with the value kept and the
//! value configured, in its answer and in the log.

use std::net::SocketAddr;
use std::path::PathBuf;

use proto::proxyd::v1 as api;

use crate::config::Global;

/// The values the master started with, for the settings only a restart applies.
#[derive(Clone, Debug)]
pub struct AtStart {
    admin_socket: PathBuf,
    metrics: Option<SocketAddr>,
}

impl AtStart {
    pub fn new(global: &Global) -> AtStart {
        AtStart {
            admin_socket: global.admin_socket.clone(),
            metrics: global.metrics,
        }
    }

    /// Every such setting `global` sets otherwise than the running master, in config order.
    /// Compared with the start, not the last reload: the master still runs with the start's.
    pub fn changed(&self, global: &Global) -> Vec<api::RestartOnly> {
        let mut out = Vec::new();
        if global.admin_socket != self.admin_socket {
            out.push(api::RestartOnly {
                setting: "admin_socket".into(),
                running: self.admin_socket.display().to_string(),
                configured: global.admin_socket.display().to_string(),
            });
        }
        if global.metrics != self.metrics {
            out.push(api::RestartOnly {
                setting: "metrics".into(),
                running: addr_text(self.metrics),
                configured: addr_text(global.metrics),
            });
        }
        out
    }
}

fn addr_text(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "none".to_owned(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use common::SourceFile;

    use super::*;
    use crate::config::Config;

    fn global(extra: &str) -> Global {
        let text = format!(
            "[global]\nfdkeeper_socket = \"/run/f.sock\"\n{extra}\n\n[[frontend]]\nname = \"f\"\nbind = [\"127.0.0.1:8080\"]\ndefault_backend = \"b\"\n\n[[backend]]\nname = \"b\"\n[[backend.server]]\nname = \"s\"\naddress = \"127.0.0.1:9000\"\n"
        );
        Config::from_source(SourceFile::from_text("p.toml", text))
            .expect("valid")
            .global
    }

    #[test]
    fn names_each_bound_setting_with_both_values() {
        let start = AtStart::new(&global(
            "admin_socket = \"/run/a.sock\"\nmetrics = \"127.0.0.1:9100\"",
        ));
        assert!(
            start
                .changed(&global(
                    "admin_socket = \"/run/a.sock\"\nmetrics = \"127.0.0.1:9100\"\nthreads = 3"
                ))
                .is_empty()
        );
        let got = start.changed(&global("admin_socket = \"/run/b.sock\""));
        let got: Vec<(&str, &str, &str)> = got
            .iter()
            .map(|r| (&*r.setting, &*r.running, &*r.configured))
            .collect();
        assert_eq!(
            got,
            [
                ("admin_socket", "/run/a.sock", "/run/b.sock"),
                ("metrics", "127.0.0.1:9100", "none"),
            ]
        );
    }
}
