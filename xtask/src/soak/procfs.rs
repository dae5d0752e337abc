//! What the soak reads from /proc: the daemons of its cluster with their RSS, and the client
//! connections a worker holds at the instant it is killed.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use super::report::Daemon;
use crate::harness;

/// RSS in bytes and pids of every daemon kind per node (0-based), found through the log file
/// each process writes to (the harness points stderr at `logs/NAME-nH.log`, and workers inherit
/// their master's), so that orphaned draining workers are counted too.
pub fn cluster_rss(logs: &Path) -> BTreeMap<(usize, Daemon), (u64, Vec<u32>)> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut out: BTreeMap<(usize, Daemon), (u64, Vec<u32>)> = BTreeMap::new();
    for pid in crate::harness::all_pids() {
        let Ok(log) = std::fs::read_link(format!("/proc/{pid}/fd/2")) else {
            continue;
        };
        let Ok(rel) = log.strip_prefix(logs) else {
            continue;
        };
        let Some((daemon, node)) = rel.to_str().and_then(parse_log_name) else {
            continue;
        };
        let daemon = match daemon {
            "fdkeeper" => Daemon::Fdkeeper,
            "stickd" => Daemon::Stickd,
            "proxyd" if is_worker(pid) => Daemon::ProxydWorkers,
            "proxyd" => Daemon::ProxydMaster,
            _ => continue,
        };
        let Some(rss) = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        else {
            continue;
        };
        if !harness::pid_alive(pid) {
            continue;
        }
        let slot = out.entry((node, daemon)).or_default();
        slot.0 += rss * page;
        slot.1.push(pid);
    }
    for (_, pids) in out.values_mut() {
        pids.sort_unstable();
    }
    out
}

/// "stickd-n2.log" -> ("stickd", 1).
fn parse_log_name(name: &str) -> Option<(&str, usize)> {
    let (daemon, node) = name.strip_suffix(".log")?.rsplit_once("-n")?;
    let node: usize = node.parse().ok()?;
    Some((daemon, node.checked_sub(1)?))
}

/// A proxyd worker runs `proxyd worker --control-fd N`.
fn is_worker(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"worker".as_slice()))
}

/// The client end of every TCP connection to `frontend` that `pid` holds (best read while the
/// process is stopped, so that it accepts nothing more).
pub fn client_conns(pid: u32, frontend: SocketAddr) -> HashSet<SocketAddr> {
    let inodes = harness::socket_inodes(pid).unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    parse_tcp_table(&table)
        .into_iter()
        // The listening socket (lent by fdkeeper) is there too, with no remote end.
        .filter(|(local, remote, inode)| {
            *local == frontend && remote.port() != 0 && inodes.contains(inode)
        })
        .map(|(_, remote, _)| remote)
        .collect()
}

/// (local, remote, inode) of each line of /proc/net/tcp.
fn parse_tcp_table(text: &str) -> Vec<(SocketAddr, SocketAddr, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some((
                parse_addr(f.get(1)?)?,
                parse_addr(f.get(2)?)?,
                f.get(9)?.parse().ok()?,
            ))
        })
        .collect()
}

/// "0100007F:1F90" -> 127.0.0.1:8080: the address is the kernel's big-endian word printed as a
/// native integer, the port is in host order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((Ipv4Addr::from(ip.to_ne_bytes()), port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0300007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1\n";
        let got = parse_tcp_table(text);
        if cfg!(target_endian = "little") {
            assert_eq!(
                got,
                vec![(
                    "127.0.0.3:8080".parse().expect("addr"),
                    "127.0.0.1:40000".parse().expect("addr"),
                    123456
                )]
            );
        }
    }

    #[test]
    fn log_names_give_daemon_and_node() {
        assert_eq!(parse_log_name("stickd-n2.log"), Some(("stickd", 1)));
        assert_eq!(parse_log_name("proxyd-n1.log"), Some(("proxyd", 0)));
        assert_eq!(parse_log_name("backend-app1.log"), None);
        assert_eq!(parse_log_name("x-n0.log"), None);
    }

    #[test]
    fn finds_the_client_end_of_our_own_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = l.local_addr().expect("addr");
        let c = std::net::TcpStream::connect(server).expect("connect");
        let (_accepted, _) = l.accept().expect("accept");
        let got = client_conns(std::process::id(), server);
        assert_eq!(got, HashSet::from([c.local_addr().expect("addr")]));
    }
}
