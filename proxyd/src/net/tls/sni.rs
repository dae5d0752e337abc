//! Which certificate a TLS handshake gets: by the client's SNI, an exact name before a wildcard
//! one, a wildcard covering one label only, and the default (the first certificate) for an
//! unknown or absent name; among a name's certificates (RSA and ECDSA), the first whose key can
//! sign with a scheme the client offers.
//!
//! The certificates can be replaced while the worker serves (a rotation): each handshake reads
//! the store once, so it sees the old set or the new one whole, and a connection keeps the
//! certificate it was given.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::tls::LoadedCert;

/// Certificates by name. Generic over what a certificate is, so that the choice by name is
/// tested without keys.
#[derive(Debug)]
pub struct CertStore<K> {
    certs: Vec<K>,
    /// Indices into `certs` by exact name, in order of preference.
    exact: HashMap<String, Vec<usize>>,
    /// By the part after `*.` of a wildcard name (`*.example.com` under `example.com`).
    wildcard: HashMap<String, Vec<usize>>,
    /// The first certificate, and those for exactly its names with another key type.
    default: Vec<usize>,
}

impl<K> CertStore<K> {
    /// `certs` in order of preference, each with its DNS names (lower case); the first one is
    /// the default.
    pub fn new(certs: Vec<(Vec<String>, K)>) -> Self {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        let first_names = certs.first().map(|(n, _)| n.clone()).unwrap_or_default();
        let mut default = Vec::new();
        let mut store = Vec::with_capacity(certs.len());
        for (i, (names, cert)) in certs.into_iter().enumerate() {
            for name in &names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                let list = map.entry(key.to_owned()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
            if i == 0 || (!names.is_empty() && names == first_names) {
                default.push(i);
            }
            store.push(cert);
        }
        Self {
            certs: store,
            exact,
            wildcard,
            default,
        }
    }

    /// Orders each name's certificates by `rank`, lowest first, keeping the config's order
    /// among equals.
    pub fn prefer<R: Ord>(&mut self, rank: impl Fn(&K) -> R) {
        let certs = &self.certs;
        let lists = self
            .exact
            .values_mut()
            .chain(self.wildcard.values_mut())
            .chain(std::iter::once(&mut self.default));
        for list in lists {
            list.sort_by_key(|&i| rank(&certs[i]));
        }
    }

    /// The certificates for a server name, best first; never empty unless the store is.
    pub fn candidates(&self, sni: Option<&str>) -> impl Iterator<Item = &K> {
        let found = sni.and_then(|name| {
            let name = name.strip_suffix('.').unwrap_or(name);
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                lower.as_str()
            } else {
                name
            };
            self.exact.get(name).or_else(|| {
                // `*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`.
                let (label, parent) = name.split_once('.')?;
                (!label.is_empty()).then(|| self.wildcard.get(parent))?
            })
        });
        found
            .unwrap_or(&self.default)
            .iter()
            .map(|&i| &self.certs[i])
    }
}

/// The rustls side of a [`CertStore`]: the store of one TLS setting's certificates, replaced
/// whole by [`SniResolver::replace`].
#[derive(Debug)]
pub struct SniResolver {
    /// Read once per handshake: a clone of the `Arc` under a read lock nobody holds longer.
    store: RwLock<Arc<CertStore<Arc<CertifiedKey>>>>,
}

impl SniResolver {
    /// `certs` in the config's order, the first one the default.
    pub fn new(certs: &[Arc<LoadedCert>]) -> Self {
        Self {
            store: RwLock::new(Arc::new(store(certs))),
        }
    }

    /// Serves `certs` to every handshake from now on; handshakes under way and connections
    /// already open keep what they got.
    pub fn replace(&self, certs: &[Arc<LoadedCert>]) {
        let new = Arc::new(store(certs));
        // A poisoned lock only means a panic elsewhere while it was held: the Arc is whole.
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = new;
    }

    fn current(&self) -> Arc<CertStore<Arc<CertifiedKey>>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The store of `certs`. ECDSA (and Ed25519) keys come before RSA ones for the same name:
/// smaller handshakes and cheaper signatures, for every client that accepts them.
fn store(certs: &[Arc<LoadedCert>]) -> CertStore<Arc<CertifiedKey>> {
    let entries = certs
        .iter()
        .map(|c| (c.names.clone(), c.key.clone()))
        .collect();
    let mut store = CertStore::new(entries);
    store.prefer(|k: &Arc<CertifiedKey>| k.key.algorithm() == rustls::SignatureAlgorithm::RSA);
    store
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        let store = self.current();
        let mut candidates = store.candidates(hello.server_name());
        let first = candidates.next()?;
        if first.key.choose_scheme(schemes).is_some() {
            return Some(first.clone());
        }
        // A certificate the client cannot verify is no better than the first: rustls then
        // ends the handshake with the right alert.
        Some(
            candidates
                .find(|c| c.key.choose_scheme(schemes).is_some())
                .unwrap_or(first)
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(certs: &[(&str, &[&str])]) -> CertStore<String> {
        CertStore::new(
            certs
                .iter()
                .map(|(id, names)| {
                    (
                        names.iter().map(|n| (*n).to_owned()).collect(),
                        (*id).to_owned(),
                    )
                })
                .collect(),
        )
    }

    fn pick<'a>(s: &'a CertStore<String>, sni: Option<&str>) -> Vec<&'a str> {
        s.candidates(sni).map(String::as_str).collect()
    }

    #[test]
    fn exact_name_beats_wildcard() {
        let s = store(&[("wild", &["*.example.com"]), ("www", &["www.example.com"])]);
        assert_eq!(pick(&s, Some("www.example.com")), ["www"]);
        assert_eq!(pick(&s, Some("api.example.com")), ["wild"]);
    }

    #[test]
    fn wildcard_matches_one_label_only() {
        let s = store(&[("default", &["other.test"]), ("wild", &["*.example.com"])]);
        assert_eq!(pick(&s, Some("a.example.com")), ["wild"]);
        assert_eq!(pick(&s, Some("a.b.example.com")), ["default"]);
        assert_eq!(pick(&s, Some("example.com")), ["default"]);
        assert_eq!(pick(&s, Some(".example.com")), ["default"]);
    }

    #[test]
    fn unknown_or_absent_name_gets_the_first_certificate() {
        let s = store(&[("a", &["a.test"]), ("b", &["b.test"])]);
        assert_eq!(pick(&s, Some("b.test")), ["b"]);
        assert_eq!(pick(&s, Some("c.test")), ["a"]);
        assert_eq!(pick(&s, None), ["a"]);
        // A certificate without names serves only as the default.
        let s = store(&[("bare", &[]), ("b", &["b.test"])]);
        assert_eq!(pick(&s, None), ["bare"]);
        assert_eq!(pick(&s, Some("b.test")), ["b"]);
    }

    #[test]
    fn names_compare_without_case_or_final_dot() {
        let s = store(&[("d", &["d.test"]), ("a", &["a.test", "*.w.test"])]);
        assert_eq!(pick(&s, Some("A.Test")), ["a"]);
        assert_eq!(pick(&s, Some("a.test.")), ["a"]);
        assert_eq!(pick(&s, Some("X.W.TEST")), ["a"]);
    }

    #[test]
    fn preference_reorders_each_name_but_not_the_rest() {
        let mut s = store(&[
            ("rsa", &["a.test"]),
            ("ecdsa", &["a.test"]),
            ("rsa-b", &["b.test"]),
        ]);
        s.prefer(|k| k.starts_with("rsa"));
        assert_eq!(pick(&s, Some("a.test")), ["ecdsa", "rsa"]);
        assert_eq!(pick(&s, None), ["ecdsa", "rsa"]);
        assert_eq!(pick(&s, Some("b.test")), ["rsa-b"]);
    }

    #[test]
    fn a_name_with_two_key_types_lists_both_in_order() {
        let s = store(&[
            ("ecdsa", &["a.test"]),
            ("rsa", &["a.test"]),
            ("other", &["b.test"]),
        ]);
        assert_eq!(pick(&s, Some("a.test")), ["ecdsa", "rsa"]);
        // The default is the first certificate and its twin of the other key type.
        assert_eq!(pick(&s, Some("zzz.test")), ["ecdsa", "rsa"]);
        assert_eq!(pick(&s, Some("b.test")), ["other"]);
    }
}
