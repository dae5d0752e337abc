//! Servers named by DNS: their names resolved through the nameservers of a `[[resolvers]]`
//! (hickory, over UDP) or through the system's resolver (getaddrinfo), refused at load when
//! a name does not resolve, and followed by each worker ([`watch`]).
//!
//! A name with several addresses gives its server one of them, as HAProxy does: the one it
//! has if that is still among the answers (round-robin DNS does not move it for nothing),
//! else the first answered. IPv4 is asked first, IPv6 only for a name without IPv4.

pub mod watch;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::ConfigError;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

use crate::config::{Address, Config, Resolvers};

/// How long the system's resolver may take for one name.
const SYSTEM_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a name gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Dns(#[from] hickory_resolver::ResolveError),
    #[error("no such name")]
    NoSuchName,
    #[error("{0}")]
    System(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("no address")]
    NoAddress,
}

/// Resolves server names the way one `[[resolvers]]` (or the system) says.
#[derive(Debug)]
pub enum Resolver {
    /// getaddrinfo on a blocking thread: /etc/hosts, nsswitch and resolv.conf as every
    /// program on the machine sees them.
    System,
    Dns {
        resolver: TokioResolver,
        /// Bounds one lookup over every nameserver.
        timeout: Duration,
    },
}

impl Resolver {
    pub fn new(resolvers: Option<&Resolvers>) -> Resolver {
        let Some(r) = resolvers else {
            return Resolver::System;
        };
        let mut config = ResolverConfig::new();
        for ns in &r.nameservers {
            config.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
        }
        let mut builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        let o = builder.options_mut();
        o.timeout = r.timeout;
        o.attempts = 1;
        o.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        // The names are the nameservers' to answer, as written: no hosts file, no search list.
        o.use_hosts_file = ResolveHosts::Never;
        o.ndots = 0;
        Resolver::Dns {
            resolver: builder.build(),
            timeout: r.timeout * (r.nameservers.len() as u32 + 1),
        }
    }

    /// Every address `host` has now, with `port`, in the order answered. Never cached: each
    /// call asks, so that an address that changed is seen at the next round whatever the TTL.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let addrs: Vec<SocketAddr> = match self {
            Resolver::System => {
                let found =
                    tokio::time::timeout(SYSTEM_TIMEOUT, tokio::net::lookup_host((host, port)))
                        .await
                        .map_err(|_| ResolveError::Timeout(SYSTEM_TIMEOUT))??;
                // getaddrinfo answers once per socket type: keep each address once.
                let mut seen = HashSet::new();
                let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = found
                    .filter(|a| seen.insert(*a))
                    .partition(SocketAddr::is_ipv4);
                if v4.is_empty() { v6 } else { v4 }
            }
            Resolver::Dns { resolver, timeout } => {
                resolver.clear_cache();
                let fqdn = if host.ends_with('.') {
                    host.to_owned()
                } else {
                    format!("{host}.")
                };
                let found = match tokio::time::timeout(*timeout, resolver.lookup_ip(fqdn)).await {
                    Err(_) => return Err(ResolveError::Timeout(*timeout)),
                    Ok(Err(e)) if e.is_nx_domain() => return Err(ResolveError::NoSuchName),
                    Ok(Err(e)) if e.is_no_records_found() => return Err(ResolveError::NoAddress),
                    Ok(r) => r?,
                };
                found.iter().map(|ip| SocketAddr::new(ip, port)).collect()
            }
        };
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress);
        }
        Ok(addrs)
    }
}

/// The address a server takes among a name's answers: the one it has while it is still
/// answered, else the first.
pub fn choose(current: Option<SocketAddr>, answers: &[SocketAddr]) -> Option<SocketAddr> {
    current
        .filter(|c| answers.contains(c))
        .or_else(|| answers.first().copied())
}

/// [`Config::load`], and every server name resolved once: a name that does not resolve
/// refuses the config at the line that writes it (`check`, start and reload alike). Blocks
/// for at most the resolvers' timeouts; a config without names costs nothing.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check_names(&config)?;
    Ok(config)
}

/// Resolves every distinct server name of `config` (see [`load`]).
pub fn check_names(config: &Config) -> Result<(), ConfigError> {
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for b in &config.backends {
        for s in &b.servers {
            if let Address::Name { host, port, span } = &s.address
                && seen.insert((b.resolvers, host.as_str(), *port))
            {
                names.push((b.resolvers, host.as_str(), *port, span.clone()));
            }
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    // Its own thread and runtime: callers are plain functions, some on a runtime's thread.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        config
                            .source
                            .error(format!("cannot resolve server names: {e}"))
                    })?;
                rt.block_on(async {
                    let resolvers: Vec<Resolver> = config
                        .resolvers
                        .iter()
                        .map(|r| Resolver::new(Some(r)))
                        .collect();
                    let system = Resolver::System;
                    for (r, host, port, span) in names {
                        let resolver = r.map_or(&system, |i| &resolvers[i]);
                        if let Err(e) = resolver.lookup(host, port).await {
                            let via = r.map_or_else(
                                || "the system's resolver".to_owned(),
                                |i| format!("resolvers '{}'", config.resolvers[i].name),
                            );
                            return Err(config.source.error_at(
                                span,
                                format!("cannot resolve server name '{host}' through {via}: {e}"),
                            ));
                        }
                    }
                    Ok(())
                })
            })
            .join()
            .unwrap_or_else(|_| Err(config.source.error("resolving server names panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_server_keeps_its_address_while_it_is_answered() {
        let answers = [a("10.0.0.2:80"), a("10.0.0.1:80")];
        assert_eq!(choose(None, &answers), Some(a("10.0.0.2:80")));
        assert_eq!(
            choose(Some(a("10.0.0.1:80")), &answers),
            Some(a("10.0.0.1:80"))
        );
        assert_eq!(
            choose(Some(a("10.0.0.3:80")), &answers),
            Some(a("10.0.0.2:80"))
        );
        assert_eq!(choose(Some(a("10.0.0.3:80")), &[]), None);
    }

    #[tokio::test]
    async fn the_system_resolver_knows_localhost() {
        let got = Resolver::System
            .lookup("localhost", 8080)
            .await
            .expect("localhost");
        assert!(
            got.iter().all(|s| s.port() == 8080 && s.ip().is_loopback()),
            "{got:?}"
        );
    }
}
