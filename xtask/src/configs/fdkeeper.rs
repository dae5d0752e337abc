//! fdkeeper.toml: a lending socket for loopback listeners and an admin socket.

use std::fmt::Write;
use std::path::PathBuf;

use super::quoted;

/// An fdkeeper that lends listeners on 127.0.0.0/8.
#[derive(Clone, Debug)]
pub struct Fdkeeper {
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub allowed_uids: Vec<u32>,
    /// `socket_mode` and `socket_group` of the lending socket, for borrowers of another uid.
    pub socket_access: Option<(&'static str, u32)>,
}

impl Fdkeeper {
    /// Lends to this process's uid (proxyd runs as the same user).
    pub fn new(socket: PathBuf, admin: PathBuf) -> Self {
        Self {
            socket,
            admin,
            allowed_uids: vec![nix::unistd::getuid().as_raw()],
            socket_access: None,
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::from("# fdkeeper started by xtask: lends loopback listeners.\n");
        let _ = writeln!(s, "socket = {}", quoted(self.socket.display()));
        if let Some((mode, group)) = self.socket_access {
            let _ = writeln!(s, "socket_mode = {}", quoted(mode));
            let _ = writeln!(s, "socket_group = {group}");
        }
        let _ = writeln!(s, "admin = {}", quoted(self.admin.display()));
        let uids: Vec<String> = self.allowed_uids.iter().map(u32::to_string).collect();
        let _ = writeln!(s, "allowed_uids = [{}]", uids.join(", "));
        s.push_str("allowed_binds = [\"127.0.0.0/8\"]\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_key() {
        let mut f = Fdkeeper::new("/d/lend.sock".into(), "/d/admin.sock".into());
        f.allowed_uids = vec![0, 65534];
        f.socket_access = Some(("0660", 4242));
        let t = f.render();
        assert!(t.contains("socket = \"/d/lend.sock\"\n"), "{t}");
        assert!(
            t.contains("socket_mode = \"0660\"\nsocket_group = 4242\n"),
            "{t}"
        );
        assert!(t.contains("admin = \"/d/admin.sock\"\n"), "{t}");
        assert!(t.contains("allowed_uids = [0, 65534]\n"), "{t}");
    }
}
