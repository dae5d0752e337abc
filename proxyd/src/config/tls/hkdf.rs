//! TLS 1.3's key schedule (HKDF) on aws-lc-rs HMAC keys that are set up once per secret.
//!
//! A full handshake derives some two dozen keys and secrets. aws-lc-rs's `Prk` keeps the salt
//! and the secret and runs the whole HKDF (extract, then expand, each keying an HMAC from
//! scratch) for every one of them. On kept keys, SHA-384's share of the worker's CPU under full
//! RSA handshakes went from 7.3 % to 5.2 %, and a full ECDSA handshake cost 8 % less. rustls's
//! `HkdfUsingHmac` computes the same function from an HMAC whose key is set up once per secret,
//! so only the suites' key schedule changes: same algorithms, same bytes on the wire.

use std::sync::LazyLock;

use aws_lc_rs::hmac;
use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::{CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

/// HMAC over one of aws-lc-rs's digests.
struct AwsLcHmac(hmac::Algorithm);

/// An HMAC key: aws-lc-rs hashes the padded key once, and each tag starts from a copy of that
/// state.
struct KeptKey(hmac::Key);

impl Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(KeptKey(hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

impl Key for KeptKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(first);
        for part in middle {
            context.update(part);
        }
        context.update(last);
        Tag::new(context.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// aws-lc-rs's TLS 1.3 suites, in rustls's order of preference, each on the kept-key HKDF of its
/// hash. Built once: rustls wants suites that live as long as the program.
static SUITES: LazyLock<Vec<Tls13CipherSuite>> = LazyLock::new(|| {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .filter_map(SupportedCipherSuite::tls13)
        .map(|suite| Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: suite.common.suite,
                hash_provider: suite.common.hash_provider,
                confidentiality_limit: suite.common.confidentiality_limit,
            },
            hkdf_provider: match suite.common.hash_provider.algorithm() {
                HashAlgorithm::SHA256 => &HKDF_SHA256,
                HashAlgorithm::SHA384 => &HKDF_SHA384,
                _ => suite.hkdf_provider,
            },
            aead_alg: suite.aead_alg,
            quic: suite.quic,
        })
        .collect()
});

/// `suites` with each aws-lc-rs TLS 1.3 suite replaced by the same suite on the kept-key HKDF;
/// TLS 1.2 suites (whose PRF is not HKDF) are left as they are.
pub(super) fn with_kept_keys(suites: &[SupportedCipherSuite]) -> Vec<SupportedCipherSuite> {
    suites
        .iter()
        .map(|&suite| match suite {
            SupportedCipherSuite::Tls13(tls13) => SUITES
                .iter()
                .find(|kept| kept.common.suite == tls13.common.suite)
                .map_or(suite, SupportedCipherSuite::Tls13),
            tls12 => tls12,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::tls13::HkdfExpander;

    /// The kept-key HKDF gives aws-lc-rs's own results, for every suite and every way the key
    /// schedule calls it.
    #[test]
    fn derives_what_aws_lc_rs_derives() {
        let salt = [7u8; 48];
        let secret = b"the shared secret of a key exchange, any length";
        let label: &[&[u8]] = &[b"\x00\x30", b"\x0dtls13 c hs traffic", b"\x20", &[9u8; 32]];
        for stock in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .filter_map(SupportedCipherSuite::tls13)
        {
            let kept = match with_kept_keys(&[SupportedCipherSuite::Tls13(stock)])[0] {
                SupportedCipherSuite::Tls13(kept) => kept,
                SupportedCipherSuite::Tls12(_) => unreachable!("a TLS 1.3 suite stays one"),
            };
            assert!(
                !std::ptr::eq(kept, stock),
                "{:?} was not replaced",
                stock.common.suite
            );
            let (a, b) = (stock.hkdf_provider, kept.hkdf_provider);
            let expanders: [(Box<dyn HkdfExpander>, Box<dyn HkdfExpander>); 3] = [
                (
                    a.extract_from_secret(Some(&salt), secret),
                    b.extract_from_secret(Some(&salt), secret),
                ),
                (a.extract_from_zero_ikm(None), b.extract_from_zero_ikm(None)),
                (
                    a.expander_for_okm(&a.extract_from_zero_ikm(Some(&salt)).expand_block(label)),
                    b.expander_for_okm(&b.extract_from_zero_ikm(Some(&salt)).expand_block(label)),
                ),
            ];
            for (a_x, b_x) in &expanders {
                assert_eq!(
                    a_x.expand_block(label).as_ref(),
                    b_x.expand_block(label).as_ref()
                );
                // Longer than one block: the counter and the chaining of blocks.
                let (mut a_out, mut b_out) = ([0u8; 100], [0u8; 100]);
                a_x.expand_slice(label, &mut a_out)
                    .expect("100 bytes is a valid length");
                b_x.expand_slice(label, &mut b_out)
                    .expect("100 bytes is a valid length");
                assert_eq!(a_out, b_out);
            }
            let okm = a.extract_from_secret(None, secret).expand_block(label);
            assert_eq!(
                a.hmac_sign(&okm, secret).as_ref(),
                b.hmac_sign(&okm, secret).as_ref()
            );
        }
    }
}
