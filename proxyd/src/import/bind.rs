//! `bind` lines of a frontend or listen section: addresses and their TLS (certificates, ALPN,
//! minimum version), every other parameter reported.

use std::net::SocketAddr;

use super::address;
use super::catalog::Topic;
use super::lexer::Line;
use super::params::{BIND_VALUE_PARAMS, cert_path};
use super::proxies::{Context, Proxy};

/// A `bind` address and its TLS.
#[derive(Clone, Debug)]
pub struct BindDef {
    pub address: SocketAddr,
    pub tls: Option<TlsDef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsDef {
    pub certs: Vec<String>,
    pub alpn: Option<Vec<String>>,
    pub min_version: Option<String>,
}

impl Proxy {
    pub(super) fn bind(&mut self, line: &Line, cx: &mut Context<'_>) {
        let args = line.args();
        let Some(addrs) = args.first() else {
            cx.report.add(line, Topic::BindUnsupported, None);
            return;
        };
        let mut tls = TlsDef {
            min_version: cx.default_min_version.clone(),
            ..TlsDef::default()
        };
        let mut ssl = false;
        let mut i = 1;
        while i < args.len() {
            let value = args.get(i + 1).cloned().unwrap_or_default();
            match args[i].as_str() {
                "ssl" => ssl = true,
                "crt" => {
                    tls.certs.push(cert_path(cx.crt_base, &value));
                    i += 1;
                }
                "alpn" => {
                    tls.alpn = Some(value.split(',').map(str::to_owned).collect());
                    i += 1;
                }
                "ssl-min-ver" => {
                    match value.as_str() {
                        "TLSv1.2" => tls.min_version = Some("1.2".to_owned()),
                        "TLSv1.3" => tls.min_version = Some("1.3".to_owned()),
                        _ => cx.report.add(
                            line,
                            Topic::BindParam,
                            Some(format!("ssl-min-ver {value}")),
                        ),
                    }
                    i += 1;
                }
                "backlog" => {
                    match value.parse() {
                        Ok(n) => self.backlog = Some(n),
                        Err(_) => cx.report.add(line, Topic::BindParam, None),
                    }
                    i += 1;
                }
                p if BIND_VALUE_PARAMS.contains(&p) => {
                    cx.report
                        .add(line, Topic::BindParam, Some(format!("{p} {value}")));
                    i += 1;
                }
                p => cx.report.add(line, Topic::BindParam, Some(p.to_owned())),
            }
            i += 1;
        }
        let tls = match (ssl, tls.certs.is_empty()) {
            (true, false) => Some(tls),
            (false, _) => None,
            (true, true) => {
                cx.report
                    .add(line, Topic::BindParam, Some("ssl without crt".to_owned()));
                return;
            }
        };
        for a in addrs.split(',') {
            match address::parse_with_port(a) {
                Ok(addr) => self.binds.push(BindDef {
                    address: address::map(cx.maps, addr),
                    tls: tls.clone(),
                }),
                Err(e) => cx
                    .report
                    .add(line, Topic::BindUnsupported, Some(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::import::proxies::tests::read;

    #[test]
    fn tls_binds_take_crt_base_alpn_and_min_version() {
        let (p, r) = read(
            "frontend f\n bind :443,:8443 ssl crt site.pem crt /x/y.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3 accept-proxy\n bind 10.0.0.1:80\n",
        );
        let f = &p[0];
        assert_eq!(f.binds.len(), 3);
        let tls = f.binds[0].tls.as_ref().expect("tls");
        assert_eq!(tls.certs, ["/etc/ssl/private/site.pem", "/x/y.pem"]);
        assert_eq!(
            tls.alpn.as_deref(),
            Some(&["h2".to_owned(), "http/1.1".to_owned()][..])
        );
        assert_eq!(tls.min_version.as_deref(), Some("1.3"));
        assert!(f.binds[2].tls.is_none());
        let e = r.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].detail.as_deref(), Some("accept-proxy"));
    }
}
