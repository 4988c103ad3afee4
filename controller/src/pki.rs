//! Certificate authorities kept in the data dir: the cluster CA agents pin
//! (`http::tls`) and the etcd CA of a supervised etcd member (`member`). A CA is made
//! once, its key owner-only, and signs fresh leaf certificates at every start.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::files::write_secret;

/// Why the TLS identity cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Making a key or certificate failed.
    #[error("cannot make the {what}")]
    Generate {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the certificate and key.
    #[error("the server certificate and key do not fit together")]
    Config(#[source] rustls::Error),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A certificate as PEM.
pub fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes a public file atomically (readable by all: it holds no secret).
pub(crate) fn write_public(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Loads a CA (`cert_path`, public, and `key_path`, 0600), or makes it when its key is
/// absent, named `name`. Only signs leaf certificates (path length 0).
pub fn load_or_make_ca(
    cert_path: &Path,
    key_path: &Path,
    name: &str,
) -> Result<(Issuer<'static, KeyPair>, CertificateDer<'static>), TlsError> {
    let (cert_path, key_path) = (cert_path.to_path_buf(), key_path.to_path_buf());
    if key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a private key: {e}")))?;
        let cert_pem = std::fs::read(&cert_path).map_err(io(&cert_path))?;
        let der = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|e| invalid(&cert_path, format!("not a certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
            invalid(
                &cert_path,
                format!("not a CA certificate for {}: {e}", key_path.display()),
            )
        })?;
        return Ok((issuer, der));
    }
    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsError::Generate {
            what: "CA certificate",
            source,
        })?;
    // The key first: a CA certificate without its key is useless, a key alone is
    // simply made again.
    write_secret(&key_path, &key.serialize_pem()).map_err(io(&key_path))?;
    write_public(&cert_path, &cert.pem()).map_err(io(&cert_path))?;
    tracing::info!(path = %cert_path.display(), name, "made a CA");
    let der = cert.der().clone();
    Ok((Issuer::new(params, key), der))
}

/// Signs nodes' agent-to-agent certificates ([`bramble_api::endpoints::MESH_PORT`]):
/// the cluster CA when the controller runs its own, else a mesh CA of its own
/// (`mesh-ca.crt`/`mesh-ca.key`, copied with the other identity files).
pub struct NodeSigner {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// How long a node certificate is valid: it is signed again at every link, so a day
/// covers any link's life with room to spare, and a stolen one soon expires.
const NODE_CERT_DAYS: i64 = 30;

impl NodeSigner {
    /// A signer for `issuer`, whose certificate is `ca`.
    pub fn new(issuer: Issuer<'static, KeyPair>, ca: &CertificateDer<'_>) -> NodeSigner {
        NodeSigner {
            issuer,
            ca_pem: pem(ca),
        }
    }

    /// The CA certificate (PEM) agents check each other's certificates against.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate for the key of `csr_pem`, for `node` and for nothing the request
    /// asks besides: the name is the one the node was admitted under.
    pub fn sign(&self, csr_pem: &str, node: &str) -> Result<String, rcgen::Error> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::new(vec![node.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }
}
