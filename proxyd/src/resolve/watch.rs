//! A worker's servers named by DNS: resolved once before it serves, then again every
//! `resolve_interval` of their backend; a server whose name moved takes the new address at
//! once, without a reload (its idle pooled connections are closed, those in use finish).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Resolver, choose};
use crate::config::Address;
use crate::shared::{BackendRt, Shared};

/// The resolvers a worker uses: one per `[[resolvers]]`, and the system's.
#[derive(Debug)]
pub struct Resolvers {
    each: Vec<Resolver>,
    system: Resolver,
}

impl Resolvers {
    pub fn for_config(config: &crate::config::Config) -> Arc<Self> {
        Arc::new(Resolvers {
            each: config
                .resolvers
                .iter()
                .map(|r| Resolver::new(Some(r)))
                .collect(),
            system: Resolver::System,
        })
    }

    fn of(&self, index: Option<usize>) -> &Resolver {
        index.map_or(&self.system, |i| &self.each[i])
    }
}

/// Resolves every server name of every backend once; a name that fails leaves its server
/// unused (never a guessed address) until a later round resolves it.
pub async fn first_round(shared: &Shared, resolvers: &Resolvers) {
    for (b, backend) in shared.backends.iter().enumerate() {
        let r = resolvers.of(shared.config.backends[b].resolvers);
        round(backend, r).await;
    }
}

/// One task per backend with server names, resolving them every `resolve_interval`.
pub fn spawn_all(shared: &Arc<Shared>, resolvers: &Arc<Resolvers>, stop: CancellationToken) {
    for (b, backend) in shared.backends.iter().enumerate() {
        if !backend
            .servers
            .iter()
            .any(|s| matches!(s.config.address, Address::Name { .. }))
        {
            continue;
        }
        let every = shared.config.backends[b].resolve_interval;
        let span = tracing::info_span!("resolve", backend = %backend.name);
        let (shared, resolvers, stop) = (shared.clone(), resolvers.clone(), stop.clone());
        tokio::spawn(
            async move {
                let backend = &shared.backends[b];
                let r = resolvers.of(shared.config.backends[b].resolvers);
                run(backend, r, every, &stop).await;
            }
            .instrument(span),
        );
    }
}

async fn run(backend: &BackendRt, resolver: &Resolver, every: Duration, stop: &CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = round(backend, resolver) => {}
        }
    }
}

/// Resolves the backend's server names once, moving each server whose address changed.
async fn round(backend: &BackendRt, resolver: &Resolver) {
    for server in &backend.servers {
        let Address::Name { host, port, .. } = &server.config.address else {
            continue;
        };
        let answers = match resolver.lookup(host, *port).await {
            Ok(a) => a,
            Err(e) => {
                // The last address known stays: a nameserver that is down for a moment must
                // not take every server out with it.
                tracing::warn!(server = %server.name, name = %host, error = %e, "cannot resolve the server's name; it keeps its address");
                continue;
            }
        };
        let current = server.address();
        let Some(new) = choose(current, &answers) else {
            continue;
        };
        if current == Some(new) {
            continue;
        }
        server.set_address(new);
        match current {
            Some(old) => tracing::warn!(
                server = %server.name,
                name = %host,
                old = %old,
                new = %new,
                answers = answers.len(),
                "server address changed"
            ),
            None => tracing::info!(
                server = %server.name,
                name = %host,
                address = %new,
                answers = answers.len(),
                "server name resolved"
            ),
        }
        // Requests queued for a server of this backend may go to this one now.
        backend.freed.notify_waiters();
    }
}
