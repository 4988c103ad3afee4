//! The controller's TLS identity: the cluster CA (made on first start and kept in the
//! data dir: `ca.key` 0600, `ca.crt` public) and a server certificate for this
//! controller's names and addresses, signed by it at every start (so a new address
//! from DHCP is simply in the next one). `--tls-cert`/`--tls-key` use the operator's
//! own chain instead; the last certificate of that chain is then the CA agents pin.
//!
//! The CA's SHA-256 fingerprint goes into the join token, and agents and `bramblectl`
//! check the controller against it before they send any credential (see
//! `bramble_tls`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bramble_api::token::Fingerprint;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate's file in the data dir (public: give it to `bramblectl
/// --certificate-authority`).
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key (0600).
pub const CA_KEY: &str = "ca.key";
/// With the operator's certificate: the CA that signs nodes' agent-to-agent
/// certificates (public).
pub const MESH_CA_CERT: &str = "mesh-ca.crt";
/// Its key (0600).
pub const MESH_CA_KEY: &str = "mesh-ca.key";

pub use crate::pki::TlsError;
use crate::pki::{invalid, io, write_public};

/// Where the controller's certificate comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The operator's certificate chain (PEM, leaf first, its CA last).
    pub cert: Option<PathBuf>,
    /// The operator's private key (PEM).
    pub key: Option<PathBuf>,
    /// Extra names and addresses to put in the server certificate.
    pub names: Vec<String>,
}

/// The controller's TLS identity, ready to serve.
pub struct Identity {
    /// The server configuration.
    pub server: Arc<rustls::ServerConfig>,
    /// The fingerprint of the CA agents pin.
    pub ca: Fingerprint,
    /// The CA certificate (DER).
    pub ca_der: CertificateDer<'static>,
    /// The names and addresses the server certificate is for (own CA only).
    pub names: Vec<String>,
    /// Signs nodes' agent-to-agent certificates.
    pub nodes: Arc<crate::pki::NodeSigner>,
}

pub use crate::pki::pem;

/// This machine's names and addresses: the host name (and `.local`, as mDNS announces
/// it), `localhost`, loopback and every interface address, plus `extra`.
pub fn own_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty() {
            names.push(format!("{h}.local"));
            names.push(h);
        }
    }
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    if let Ok(ifs) = if_addrs::get_if_addrs() {
        ips.extend(ifs.into_iter().map(|i| i.ip()));
    }
    names.extend(ips.into_iter().map(|ip| ip.to_string()));
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Loads the cluster CA from the data dir, or makes it on first start.
fn own_ca(
    data_dir: &Path,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), TlsError> {
    crate::pki::load_or_make_ca(
        &data_dir.join(CA_CERT),
        &data_dir.join(CA_KEY),
        "Bramble cluster CA",
    )
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    // HTTP/1.1 only: the agent link is a WebSocket upgrade, and a Pi has no use for h2.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl Identity {
    /// The identity for `opts`: the operator's chain, or the own CA and a fresh server
    /// certificate. Either way `ca.crt` in the data dir holds the CA agents pin.
    pub fn load(data_dir: &Path, opts: &TlsOptions) -> Result<Identity, TlsError> {
        match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => Self::operators(data_dir, cert, key),
            (None, None) => Self::own(data_dir, &opts.names),
            (Some(p), None) | (None, Some(p)) => Err(invalid(
                p,
                "--tls-cert and --tls-key go together: give both or neither",
            )),
        }
    }

    fn own(data_dir: &Path, extra: &[String]) -> Result<Identity, TlsError> {
        let (issuer, ca_der) = own_ca(data_dir)?;
        let names = own_names(extra);
        let key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: "server key",
            source,
        })?;
        let mut params =
            CertificateParams::new(names.clone()).map_err(|source| TlsError::Generate {
                what: "server certificate",
                source,
            })?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Bramble controller");
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| TlsError::Generate {
                what: "server certificate",
                source,
            })?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| invalid(data_dir, format!("the server key does not encode: {e}")))?;
        let server = server_config(vec![cert.der().clone(), ca_der.clone()], key_der)?;
        Ok(Identity {
            server,
            ca: bramble_tls::fingerprint(&ca_der),
            nodes: Arc::new(crate::pki::NodeSigner::new(issuer, &ca_der)),
            ca_der,
            names,
        })
    }

    fn operators(data_dir: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let chain_pem = std::fs::read(cert).map_err(io(cert))?;
        let chain =
            bramble_tls::certificates(&chain_pem).map_err(|e| invalid(cert, e.to_string()))?;
        if chain.len() < 2 {
            return Err(invalid(
                cert,
                "the chain must end with the CA that signed the certificate (agents pin that CA): append the CA certificate to the file",
            ));
        }
        let key_pem = std::fs::read(key).map_err(io(key))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
        let ca_der = chain.last().cloned().expect("a chain of two or more");
        let ca_path = data_dir.join(CA_CERT);
        write_public(&ca_path, &pem(&ca_der)).map_err(io(&ca_path))?;
        let server = server_config(chain, key_der)?;
        // The operator's CA key is not here: node certificates come from a CA of the
        // controllers' own, copied with the other identity files.
        let (issuer, mesh_ca) = crate::pki::load_or_make_ca(
            &data_dir.join(MESH_CA_CERT),
            &data_dir.join(MESH_CA_KEY),
            "Bramble node CA",
        )?;
        Ok(Identity {
            server,
            ca: bramble_tls::fingerprint(&ca_der),
            nodes: Arc::new(crate::pki::NodeSigner::new(issuer, &mesh_ca)),
            ca_der,
            names: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load(dir.path(), &TlsOptions::default()).expect("made");
        let again = Identity::load(dir.path(), &TlsOptions::default()).expect("loaded");
        assert_eq!(first.ca, again.ca, "the CA survives a restart");
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .expect("exists")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY), 0o600);
        let ca = std::fs::read(dir.path().join(CA_CERT)).expect("ca.crt");
        let certs = bramble_tls::certificates(&ca).expect("PEM");
        assert_eq!(bramble_tls::fingerprint(&certs[0]), first.ca);
        assert!(first.names.iter().any(|n| n == "127.0.0.1"));
        assert!(first.names.iter().any(|n| n == "localhost"));
    }

    #[test]
    fn pem_round_trips() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let text = pem(&der);
        let back = CertificateDer::from_pem_slice(text.as_bytes()).expect("PEM");
        assert_eq!(back.as_ref(), der.as_slice());
    }

    #[test]
    fn an_operators_chain_needs_its_ca_and_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let only_cert = TlsOptions {
            cert: Some(dir.path().join("c.pem")),
            key: None,
            names: vec![],
        };
        let err = Identity::load(dir.path(), &only_cert)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("go together"), "{err}");
        let leaf = rcgen::generate_simple_self_signed(vec!["pi1".to_string()]).expect("cert");
        std::fs::write(dir.path().join("c.pem"), leaf.cert.pem()).expect("write");
        std::fs::write(dir.path().join("k.pem"), leaf.signing_key.serialize_pem()).expect("write");
        let lone = TlsOptions {
            cert: Some(dir.path().join("c.pem")),
            key: Some(dir.path().join("k.pem")),
            names: vec![],
        };
        let err = Identity::load(dir.path(), &lone).err().expect("refused");
        assert!(err.to_string().contains("must end with the CA"), "{err}");
    }
}
