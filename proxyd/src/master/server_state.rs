//! Operators' `set server` overrides: applying one, and the server state file that keeps them
//! across restarts of the master.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proto::proxyd::v1 as api;

use super::generation::Generation;
use super::{Master, SetServerError};
use crate::config::Config;
use crate::control::{pb, to_worker};
use crate::model::{AdminState, UnknownAdminState};

impl Master {
    /// Records an operator's override and sends it to every running worker.
    pub(super) fn set_server(
        &mut self,
        req: api::SetServerRequest,
    ) -> Result<api::ServerState, SetServerError> {
        let not_found = || SetServerError::NotFound {
            backend: req.backend.clone(),
            server: req.server.clone(),
        };
        let backend = self.current.backend(&req.backend).ok_or_else(not_found)?;
        let server = backend
            .servers
            .iter()
            .find(|s| s.name == req.server)
            .ok_or_else(not_found)?;
        let key = (req.backend.clone(), req.server.clone());
        let (mut state, mut weight) = self
            .admin
            .get(&key)
            .copied()
            .unwrap_or((AdminState::Ready, server.weight));
        if !req.state.is_empty() {
            state = req
                .state
                .parse()
                .map_err(|e: UnknownAdminState| SetServerError::Invalid(e.to_string()))?;
        }
        if let Some(w) = req.weight {
            if w > 256 {
                return Err(SetServerError::Invalid(
                    "weight must be between 0 and 256".into(),
                ));
            }
            weight = w;
        }
        self.admin.insert(key, (state, weight));
        if let Some(path) = &self.current.global.server_state_file
            && let Err(e) = save(path, &self.admin)
        {
            // The change is made; only its survival across a restart of the master is lost.
            tracing::warn!(file = %path.display(), error = %e, "cannot write the server state file");
        }
        tracing::info!(backend = %req.backend, server = %req.server, state = state.as_str(), weight, "set server");
        let msg = to_worker(pb::master_to_worker::Kind::ServerAdmin(pb::ServerAdmin {
            backend: req.backend.clone(),
            server: req.server.clone(),
            state: state.to_wire(),
            weight,
        }));
        for w in self.generations.iter().filter_map(Generation::worker) {
            w.send(msg.clone());
        }
        let mut shown = self
            .serving()
            .and_then(Generation::worker)
            .and_then(|w| {
                w.servers
                    .iter()
                    .find(|s| s.backend == req.backend && s.server == req.server)
                    .cloned()
            })
            .unwrap_or_else(|| api::ServerState {
                backend: req.backend.clone(),
                server: req.server.clone(),
                address: server.address.to_string(),
                maxconn: server.maxconn,
                ..Default::default()
            });
        shown.admin_state = state.as_str().into();
        shown.weight = weight;
        Ok(shown)
    }
}

/// Operators' overrides by (backend, server): (admin state, weight).
pub(super) type AdminStates = BTreeMap<(String, String), (AdminState, u32)>;

/// The server state file: one `backend server state weight` line per override.
fn render(admin: &AdminStates) -> String {
    let mut out = String::from("# proxyd server state (SetServer): backend server state weight\n");
    for ((backend, server), (state, weight)) in admin {
        out.push_str(&format!("{backend} {server} {state} {weight}\n"));
    }
    out
}

/// Parses a server state file; returns the overrides and the lines that made no sense.
fn parse(text: &str) -> (AdminStates, Vec<String>) {
    let mut admin = AdminStates::new();
    let mut bad = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let state = f.get(2).and_then(|s| s.parse::<AdminState>().ok());
        match (f.len(), state, f.get(3).and_then(|w| w.parse::<u32>().ok())) {
            (4, Some(state), Some(weight)) if weight <= 256 => {
                admin.insert((f[0].to_owned(), f[1].to_owned()), (state, weight));
            }
            _ => bad.push(line.to_owned()),
        }
    }
    (admin, bad)
}

/// The overrides kept in the config's `server_state_file` for servers the config still has;
/// nothing when there is no file yet. A bad file is reported, never fatal: the servers then
/// start as configured.
pub(super) fn load(config: &Config) -> AdminStates {
    let Some(path) = &config.global.server_state_file else {
        return AdminStates::new();
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return AdminStates::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the server state file");
            return AdminStates::new();
        }
    };
    let (mut admin, bad) = parse(&text);
    for line in bad {
        tracing::warn!(file = %path.display(), line = %line, "server state line ignored");
    }
    admin.retain(|(backend, server), _| {
        let known = config
            .backend(backend)
            .is_some_and(|b| b.servers.iter().any(|s| s.name == *server));
        if !known {
            tracing::info!(backend = %backend, server = %server, "server state for a server the config no longer has, dropped");
        }
        known
    });
    if !admin.is_empty() {
        tracing::info!(file = %path.display(), servers = admin.len(), "server states restored");
    }
    admin
}

/// Writes the file whole, through a temporary file and a rename: a crash leaves the old or
/// the new file, never half of one.
fn save(path: &Path, admin: &AdminStates) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, render(admin))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::master) fn config_with_state_file(file: &std::path::Path) -> Config {
        let text = format!(
            r#"
[global]
admin_socket = "/tmp/p/admin.sock"
fdkeeper_socket = "/tmp/f/fdkeeper.sock"
server_state_file = "{}"

[[frontend]]
name = "www"
bind = ["127.0.0.1:8080"]
default_backend = "app"

[[backend]]
name = "app"
[[backend.server]]
name = "app1"
address = "127.0.0.1:9001"
[[backend.server]]
name = "app2"
address = "127.0.0.1:9002"
"#,
            file.display()
        );
        Config::from_source(common::SourceFile::from_text("p.toml", text)).expect("valid")
    }

    #[tokio::test]
    async fn set_server_survives_a_restart_of_the_master() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server-state");
        let exe = PathBuf::from("/nonexistent");
        let (mut m, _h) = Master::new(config_with_state_file(&file), exe.clone());
        assert!(m.admin.is_empty(), "no file yet: nothing to restore");
        let set = |state: &str, weight: Option<u32>| api::SetServerRequest {
            backend: "app".into(),
            server: "app1".into(),
            state: state.into(),
            weight,
        };
        m.set_server(set("drain", None)).expect("set");
        m.set_server(set("", Some(7))).expect("set");
        assert!(m.set_server(set("bogus", None)).is_err());
        drop(m);
        // A new master (a restart) with the same config starts from the saved states.
        let (m, _h) = Master::new(config_with_state_file(&file), exe.clone());
        assert_eq!(
            m.admin.get(&("app".to_owned(), "app1".to_owned())),
            Some(&(AdminState::Drain, 7))
        );
        assert_eq!(m.admin.len(), 1);
        // Lines for servers the config no longer has, and garbage, are dropped.
        std::fs::write(
            &file,
            "app app2 maint 3\ngone app9 maint 1\napp app1 sleepy 1\napp app1 ready\n",
        )
        .expect("write");
        let (m, _h) = Master::new(config_with_state_file(&file), exe);
        assert_eq!(
            m.admin.into_iter().collect::<Vec<_>>(),
            vec![(
                ("app".to_owned(), "app2".to_owned()),
                (AdminState::Maint, 3)
            )]
        );
    }
}
