//! The client side of Bramble's TLS: every agent, `bramblectl` and test checks the
//! controller against the cluster's CA, pinned by its SHA-256 fingerprint (from the join
//! token, or a context), before it sends a single credential.
//!
//! The controller sends its certificate chain with the CA at its end. The verifier
//! ([`PinnedCa`]) takes the certificate of the chain whose fingerprint is pinned as the
//! only trust anchor and verifies the server's certificate against it (signature,
//! validity, key usage) with rustls' own WebPKI verifier. The host name is not checked:
//! the CA is the cluster's identity, it signs only its controllers' certificates, and
//! agents reach controllers by whatever address mDNS or a flag gave them.
//!
//! Pure Rust on ring, so the same code cross-builds for every Pi.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

pub use bramble_api::token::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

pub use rustls;

/// Makes rustls use ring (clients built before a provider is installed panic).
/// Idempotent.
pub fn install_provider() {
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A certificate's SHA-256 over its DER encoding.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let digest: [u8; 32] = Sha256::digest(der).into();
    Fingerprint::from_digest(&digest)
}

/// A PEM file that holds no certificate (or not only certificates).
#[derive(Debug, thiserror::Error)]
#[error("no PEM certificate found ({0})")]
pub struct NotPem(String);

/// The certificates of a PEM text, in order.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, NotPem> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| NotPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(NotPem("the text has no BEGIN CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The fingerprints a verifier accepts as the CA. Shared, so a long-lived client (the
/// tests' one) can learn new clusters' CAs.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<RwLock<BTreeSet<Fingerprint>>>);

impl Pins {
    /// One pinned CA.
    pub fn one(fp: Fingerprint) -> Pins {
        let p = Pins::default();
        p.add(fp);
        p
    }

    /// Accepts one more CA.
    pub fn add(&self, fp: Fingerprint) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(fp);
    }

    fn contains(&self, fp: &Fingerprint) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fp)
    }
}

/// Verifies a server against a pinned CA (see the crate documentation), or only records
/// what it offers ([`Seen`]).
#[derive(Debug)]
pub struct PinnedCa {
    check: Check,
    algorithms: WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
enum Check {
    Pinned(Pins),
    Record(Seen),
}

impl PinnedCa {
    /// A verifier accepting servers whose chain ends at one of `pins`.
    pub fn new(pins: Pins) -> PinnedCa {
        PinnedCa {
            check: Check::Pinned(pins),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn verify_pinned(
        pins: &Pins,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = intermediates
            .iter()
            .chain(std::iter::once(end_entity))
            .find(|c| pins.contains(&fingerprint(c)))
            .ok_or_else(|| {
                let offered = intermediates
                    .last()
                    .map_or_else(|| fingerprint(end_entity), |c| fingerprint(c));
                refusal(format!(
                    "the server's certificate is not from the pinned cluster CA (it offers CA {}): refusing to send any credential",
                    offered.short()
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|e| refusal(format!("the pinned CA certificate is unusable: {e}")))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| refusal(format!("cannot verify against the pinned CA: {e}")))?;
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(ok) => Ok(ok),
            // The CA is the identity; the address the server was reached at is not.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }
}

fn refusal(message: String) -> rustls::Error {
    rustls::Error::General(message)
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            Check::Pinned(pins) => Self::verify_pinned(
                pins,
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Check::Record(seen) => {
                let chain = std::iter::once(end_entity)
                    .chain(intermediates)
                    .map(|c| c.clone().into_owned())
                    .collect();
                *seen.0.lock().unwrap_or_else(|e| e.into_inner()) = chain;
                Err(refusal(
                    "recorded the server's chain; not trusted yet".into(),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that trusts only servers of the pinned CAs.
pub fn client_config(pins: Pins) -> rustls::ClientConfig {
    config_with(PinnedCa::new(pins))
}

/// What a server offered during a handshake, for `bramblectl login` to show before the
/// user decides to trust it. It trusts nothing: a [`Seen`] connection must never carry
/// a credential.
#[derive(Debug, Default, Clone)]
pub struct Seen(Arc<Mutex<Vec<CertificateDer<'static>>>>);

impl Seen {
    /// The chain the server sent, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fingerprint of the last certificate the server sent (its CA).
    pub fn ca(&self) -> Option<Fingerprint> {
        self.chain().last().map(|c| fingerprint(c))
    }

    /// A configuration that records the server's chain and then fails the handshake,
    /// so nothing is ever sent over it.
    pub fn client_config(&self) -> rustls::ClientConfig {
        config_with(PinnedCa {
            check: Check::Record(self.clone()),
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

fn config_with(verifier: PinnedCa) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth()
}

impl fmt::Display for Pins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pins = self.0.read().unwrap_or_else(|e| e.into_inner());
        let shown: Vec<String> = pins.iter().map(Fingerprint::short).collect();
        f.write_str(&shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    /// A CA and a server certificate it signed for `names`: the chain, server first.
    fn chain(names: &[&str]) -> Vec<CertificateDer<'static>> {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        vec![leaf.der().clone(), ca_cert.der().clone()]
    }

    fn verify(
        v: &PinnedCa,
        chain: &[CertificateDer<'static>],
        name: &str,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_string()).expect("name");
        v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_chain_holding_the_pinned_ca_is_trusted_whatever_name_it_was_reached_by() {
        install_provider();
        let good = chain(&["127.0.0.1", "pi1.local"]);
        let v = PinnedCa::new(Pins::one(fingerprint(&good[1])));
        assert!(verify(&v, &good, "127.0.0.1").is_ok());
        // An mDNS name or a new DHCP address the certificate does not list: still the
        // cluster, since the CA is the identity.
        assert!(verify(&v, &good, "10.0.0.99").is_ok());
    }

    #[test]
    fn another_ca_a_lone_leaf_or_a_pinned_ca_signing_nothing_are_refused() {
        install_provider();
        let ours = chain(&["127.0.0.1"]);
        let theirs = chain(&["127.0.0.1"]);
        let v = PinnedCa::new(Pins::one(fingerprint(&ours[1])));
        let e = verify(&v, &theirs, "127.0.0.1").expect_err("another CA");
        assert!(
            e.to_string().contains("not from the pinned cluster CA"),
            "{e}"
        );
        // Their leaf presented with our CA certificate appended: the signature fails.
        let forged = vec![theirs[0].clone(), ours[1].clone()];
        assert!(verify(&v, &forged, "127.0.0.1").is_err());
        // Our leaf alone, without the CA: no anchor in the chain.
        assert!(verify(&v, &ours[..1], "127.0.0.1").is_err());
    }

    #[test]
    fn pins_can_be_added_and_are_shown_short() {
        let a = chain(&["a"]);
        let b = chain(&["b"]);
        let pins = Pins::one(fingerprint(&a[1]));
        assert!(pins.contains(&fingerprint(&a[1])));
        assert!(!pins.contains(&fingerprint(&b[1])));
        pins.add(fingerprint(&b[1]));
        assert!(pins.contains(&fingerprint(&b[1])));
        assert!(pins.to_string().contains("sha256:"));
    }

    #[test]
    fn recording_trusts_nothing_and_keeps_the_chain() {
        install_provider();
        let c = chain(&["127.0.0.1"]);
        let seen = Seen::default();
        let v = PinnedCa {
            check: Check::Record(seen.clone()),
            algorithms: provider().signature_verification_algorithms,
        };
        assert!(verify(&v, &c, "127.0.0.1").is_err(), "never trusted");
        assert_eq!(seen.chain(), c);
        assert_eq!(seen.ca(), Some(fingerprint(&c[1])));
    }

    #[test]
    fn pem_files_are_read_and_anything_else_refused() {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            certificates(cert.pem().as_bytes()).expect("pem"),
            vec![cert.der().clone()]
        );
        assert!(certificates(b"not a certificate").is_err());
        assert!(
            certificates(key.serialize_pem().as_bytes()).is_err(),
            "a key is no certificate"
        );
    }
}
