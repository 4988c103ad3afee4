//! Agent-to-agent connections ([`bramble_api::endpoints::MESH_PORT`]): the way a
//! connection to a workload's address reaches an instance on another node.
//!
//! Mutual TLS with node certificates: the agent makes a key at every start and sends a
//! certificate request in its Hello; the controller signs it for the node's admitted
//! name (the Welcome carries the certificate and the CA). Each side checks the other's
//! certificate against that CA, and the dialling side checks the name too, so only a
//! node of this cluster gets in, and the node dialled is the one the table names.
//! Traffic between Pis (a wallet's RPC password among it) is encrypted.
//!
//! After the handshake the dialling agent sends one line: `BRAMBLE/1 TASK PORT` asks for
//! a connection to that task's container on that port; `BRAMBLE/1 SYNC WORKLOAD VOLUME
//! EPOCH` offers a copy of a managed volume ([`crate::sync`]). The other answers `OK`
//! or `ERR why`; then both copy bytes, or speak the sync protocol.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The longest request or answer line.
const MAX_LINE: usize = 256;
/// A TCP connect and TLS handshake to another agent, and its answer.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// What an agent that was dialled waits for the request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAGIC: &str = "BRAMBLE/1";

/// Why a mesh connection failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// No certificate from a controller yet.
    #[error("this node has no agent-to-agent certificate yet (no controller has welcomed it)")]
    NoCertificate,
    /// Making the key or the request failed.
    #[error("cannot make the node's agent-to-agent key")]
    Key(#[source] rcgen::Error),
    /// The certificate or CA from the controller does not work.
    #[error("the agent-to-agent certificate from the controller: {0}")]
    Certificate(String),
    /// Connecting failed.
    #[error("{addr}: {why}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        why: String,
    },
    /// The other side said no.
    #[error("{node} refused: {why}")]
    Refused {
        /// Who.
        node: String,
        /// What it said.
        why: String,
    },
}

#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// This node's mesh identity: its key, its certificate request and, once a controller
/// has signed it, its TLS configurations.
pub struct Mesh {
    key: PrivateKeyDer<'static>,
    csr: String,
    tls: RwLock<Option<Tls>>,
    /// Where the key and the last certificate are kept (0600), so that an agent
    /// restarted while no controller answers still reaches the other nodes.
    dir: PathBuf,
}

const KEY_FILE: &str = "mesh.key";
const CERT_FILE: &str = "mesh.crt";
const CA_FILE: &str = "mesh-ca.crt";

impl Mesh {
    /// The key kept in `dir` (made on first use), with the certificate kept beside it
    /// if it is still good for it.
    pub fn load_or_new(node: &str, dir: &Path) -> Result<Mesh, MeshError> {
        let path = dir.join(KEY_FILE);
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|pem| KeyPair::from_pem(&pem).ok());
        let key = match kept {
            Some(k) => k,
            None => {
                let k = KeyPair::generate().map_err(MeshError::Key)?;
                if let Err(e) = crate::credential::write_private(&path, &k.serialize_pem()) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot keep the agent-to-agent key; a new one is made at every start");
                }
                k
            }
        };
        let mesh = Mesh::with_key(node, key, dir.to_path_buf())?;
        let cert = std::fs::read_to_string(dir.join(CERT_FILE));
        let ca = std::fs::read_to_string(dir.join(CA_FILE));
        if let (Ok(cert), Ok(ca)) = (cert, ca) {
            match mesh.configure(&cert, &ca) {
                Ok(()) => tracing::info!("agent-to-agent certificate kept from before the restart"),
                Err(e) => {
                    tracing::info!(error = %e, "the kept agent-to-agent certificate is not usable; waiting for a controller's")
                }
            }
        }
        Ok(mesh)
    }

    fn with_key(node: &str, key: KeyPair, dir: PathBuf) -> Result<Mesh, MeshError> {
        let mut params = CertificateParams::new(vec![node.to_string()]).map_err(MeshError::Key)?;
        params.distinguished_name.push(DnType::CommonName, node);
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(MeshError::Key)?;
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(Mesh {
            key,
            csr,
            tls: RwLock::new(None),
            dir,
        })
    }

    /// The certificate request (PEM) for the Hello.
    pub fn csr(&self) -> &str {
        &self.csr
    }

    /// Whether a controller has signed this node's certificate.
    pub fn ready(&self) -> bool {
        self.tls().is_some()
    }

    fn tls(&self) -> Option<Tls> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the certificate and CA of a Welcome, and keeps them.
    pub fn install(&self, cert_pem: &str, ca_pem: &str) -> Result<(), MeshError> {
        self.configure(cert_pem, ca_pem)?;
        let dir = &self.dir;
        let same = std::fs::read_to_string(dir.join(CERT_FILE)).is_ok_and(|c| c == cert_pem)
            && std::fs::read_to_string(dir.join(CA_FILE)).is_ok_and(|c| c == ca_pem);
        if !same {
            for (file, text) in [(CA_FILE, ca_pem), (CERT_FILE, cert_pem)] {
                if let Err(e) = crate::credential::write_private(&dir.join(file), text) {
                    tracing::warn!(file, error = %e, "cannot keep the agent-to-agent certificate");
                }
            }
        }
        Ok(())
    }

    fn configure(&self, cert_pem: &str, ca_pem: &str) -> Result<(), MeshError> {
        let bad = |e: &dyn std::fmt::Display| MeshError::Certificate(e.to_string());
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(&e))?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| bad(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| bad(&e))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| bad(&e))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], self.key.clone_key())
            .map_err(|e| bad(&e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], self.key.clone_key())
            .map_err(|e| bad(&e))?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Some(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        });
        Ok(())
    }

    /// Connects to the agent of `node` at `addr` and asks for `task`'s `port`; the
    /// stream is then the container's.
    pub async fn dial(
        &self,
        addr: &str,
        node: &str,
        task: &str,
        port: u16,
    ) -> Result<client::TlsStream<TcpStream>, MeshError> {
        self.dial_for(
            addr,
            node,
            &Request::Task {
                task: task.to_string(),
                port,
            },
        )
        .await
    }

    /// Connects to the agent of `node` at `addr` and makes `req`; the stream once it
    /// answered `OK`.
    pub async fn dial_for(
        &self,
        addr: &str,
        node: &str,
        req: &Request,
    ) -> Result<client::TlsStream<TcpStream>, MeshError> {
        let tls = self.tls().ok_or(MeshError::NoCertificate)?;
        let connect = |why: String| MeshError::Connect {
            addr: addr.to_string(),
            why,
        };
        let name = ServerName::try_from(node.to_string()).map_err(|e| connect(e.to_string()))?;
        let work = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let mut stream = tls
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| connect(format!("TLS: {e}")))?;
            stream
                .write_all(req.line().as_bytes())
                .await
                .map_err(|e| connect(e.to_string()))?;
            let answer = read_line(&mut stream)
                .await
                .map_err(|e| connect(e.to_string()))?;
            match answer.strip_prefix("OK") {
                Some("") => Ok(stream),
                _ => Err(MeshError::Refused {
                    node: node.to_string(),
                    why: answer.strip_prefix("ERR ").unwrap_or(&answer).to_string(),
                }),
            }
        };
        tokio::time::timeout(DIAL_TIMEOUT, work)
            .await
            .map_err(|_| connect(format!("no answer within {DIAL_TIMEOUT:?}")))?
    }

    /// The TLS handshake and request line of a connection to this node's mesh port:
    /// the stream and what it asks for. A peer without a certificate of this cluster
    /// never gets to send its request.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(server::TlsStream<TcpStream>, Request), MeshError> {
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let fail = |why: String| MeshError::Connect {
            addr: peer.clone(),
            why,
        };
        let tls = self.tls().ok_or(MeshError::NoCertificate)?;
        let work = async {
            let mut stream = tls
                .acceptor
                .accept(tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let line = read_line(&mut stream)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let req = parse_request(&line).map_err(|e| fail(e.to_string()))?;
            Ok((stream, req))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| fail("no request in time".into()))?
    }
}

/// Answers a request: `Ok` when the container is connected.
pub async fn answer<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    result: &Result<(), String>,
) -> std::io::Result<()> {
    let line = match result {
        Ok(()) => "OK\n".to_string(),
        Err(why) => format!("ERR {}\n", one_line(why)),
    };
    stream.write_all(line.as_bytes()).await?;
    stream.flush().await
}

fn one_line(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.truncate(MAX_LINE - 8);
    s
}

/// What a dialling agent asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A connection to `task`'s container on `port`.
    Task {
        /// The task.
        task: String,
        /// The container port.
        port: u16,
    },
    /// To get this node's copy of `workload`'s `volume`, for the placement `epoch`
    /// now on the asking node.
    Fetch {
        /// The workload.
        workload: String,
        /// The managed volume.
        volume: String,
        /// The asker's placement epoch.
        epoch: u64,
    },
    /// To take a copy of `workload`'s `volume`, sent for its placement `epoch`.
    Sync {
        /// The workload.
        workload: String,
        /// The managed volume.
        volume: String,
        /// The sender's placement epoch.
        epoch: u64,
    },
}

impl Request {
    fn line(&self) -> String {
        match self {
            Request::Task { task, port } => format!("{MAGIC} {task} {port}\n"),
            Request::Sync {
                workload,
                volume,
                epoch,
            } => format!("{MAGIC} SYNC {workload} {volume} {epoch}\n"),
            Request::Fetch {
                workload,
                volume,
                epoch,
            } => format!("{MAGIC} FETCH {workload} {volume} {epoch}\n"),
        }
    }
}

/// Whether the peer of an accepted connection holds a certificate for node `name`
/// (its chain was checked against the cluster CA in the handshake).
pub fn peer_is(stream: &server::TlsStream<TcpStream>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    let Some(cert) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    else {
        return false;
    };
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
}

/// Reads one line of at most [`MAX_LINE`] bytes, without the newline, byte by byte so
/// nothing after it is consumed (it belongs to the copied stream).
async fn read_line<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut reader = BufReader::with_capacity(1, stream);
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        let Some(&b) = buf.first() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a whole line",
            ));
        };
        reader.consume(1);
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// The request of a request line.
fn parse_request(line: &str) -> Result<Request, &'static str> {
    let mut parts = line.split(' ');
    if parts.next() != Some(MAGIC) {
        return Err("not a Bramble mesh request");
    }
    let task = parts.next().filter(|t| !t.is_empty()).ok_or("no task")?;
    if task == "SYNC" || task == "FETCH" {
        let name = |p: Option<&str>, what| {
            p.filter(|n| n.parse::<bramble_api::manifest::Name>().is_ok())
                .map(str::to_string)
                .ok_or(what)
        };
        let workload = name(parts.next(), "no workload")?;
        let volume = name(parts.next(), "no volume")?;
        let epoch = parts
            .next()
            .and_then(|e| e.parse::<u64>().ok())
            .ok_or("no epoch")?;
        if parts.next().is_some() {
            return Err("extra words");
        }
        return Ok(if task == "SYNC" {
            Request::Sync {
                workload,
                volume,
                epoch,
            }
        } else {
            Request::Fetch {
                workload,
                volume,
                epoch,
            }
        });
    }
    let port = parts
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or("no port")?;
    if parts.next().is_some() {
        return Err("extra words");
    }
    Ok(Request::Task {
        task: task.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        for req in [
            Request::Task {
                task: "coin-abc123-0".into(),
                port: 9332,
            },
            Request::Sync {
                workload: "ltc-wallet".into(),
                volume: "ltc-data".into(),
                epoch: 42,
            },
            Request::Fetch {
                workload: "ltc-wallet".into(),
                volume: "ltc-data".into(),
                epoch: 43,
            },
        ] {
            assert_eq!(parse_request(req.line().trim_end()), Ok(req));
        }
        for bad in [
            "",
            "GET / HTTP/1.1",
            "BRAMBLE/1",
            "BRAMBLE/1 t",
            "BRAMBLE/1 t 0",
            "BRAMBLE/1 t 70000",
            "BRAMBLE/1 t 80 x",
            "BRAMBLE/2 t 80",
            "BRAMBLE/1 SYNC w v",
            "BRAMBLE/1 SYNC w v x",
            "BRAMBLE/1 SYNC ../w v 1",
            "BRAMBLE/1 SYNC w V 1",
            "BRAMBLE/1 SYNC w v 1 x",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn lines_are_read_without_taking_what_follows() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"OK\nrest").await.expect("write");
        assert_eq!(read_line(&mut b).await.expect("line"), "OK");
        let mut rest = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut rest)
            .await
            .expect("rest");
        assert_eq!(&rest, b"rest");
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[b'x'; 300]).await.expect("write");
        assert!(read_line(&mut b).await.is_err(), "a line that never ends");
    }

    #[test]
    fn an_error_answer_is_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
        assert!(one_line(&"x".repeat(1000)).len() < MAX_LINE);
    }
}
