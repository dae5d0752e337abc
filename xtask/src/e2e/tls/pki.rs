//! A CA of the scenario's own and the ECDSA certificates it signs (rcgen), written as PEM files
//! for proxyd to serve and for curl to verify against.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};

/// The scenario's CA; its certificate is `ca.pem` in the directory given to [`Pki::new`].
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_path: PathBuf,
}

/// One leaf certificate and its key, in PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub name: String,
    pub cert: String,
    pub key: String,
    /// As `openssl x509 -serial` and proxyd's Status print it: upper-case hex.
    pub serial: String,
}

impl Leaf {
    /// Chain and key in one file, as proxyd (and HAProxy's `crt`) take them.
    pub fn pem(&self) -> String {
        format!("{}{}", self.cert, self.key)
    }

    /// This certificate with a key of its own that does not match it: a file proxyd must refuse.
    pub fn with_wrong_key(&self) -> Result<String> {
        let other = KeyPair::generate().context("cannot make a key")?;
        Ok(format!("{}{}", self.cert, other.serialize_pem()))
    }
}

/// A serial of its own for every certificate of the run (the first byte keeps it positive).
fn next_serial() -> [u8; 4] {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let [hi, lo] = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    [0x5e, 0xe2, hi, lo]
}

impl Pki {
    /// Makes the CA and writes its certificate to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "xtask e2e ca");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().context("cannot make the CA key")?;
        let ca = CertifiedIssuer::self_signed(params, key).context("cannot sign the CA")?;
        std::fs::create_dir_all(dir)?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem())
            .with_context(|| format!("cannot write {}", ca_path.display()))?;
        Ok(Pki { ca, ca_path })
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// A new P-256 certificate for the DNS name `name` (its subject's CN too), with a new serial.
    pub fn leaf(&self, name: &str) -> Result<Leaf> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate().context("cannot make a key")?;
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("cannot sign a certificate for {name}"))?;
        Ok(Leaf {
            name: name.to_owned(),
            cert: cert.pem(),
            key: key.serialize_pem(),
            serial: serial.iter().map(|b| format!("{b:02X}")).collect(),
        })
    }
}
