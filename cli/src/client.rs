//! A typed client for the controller's REST API (see `bramble_api::rest`).
//!
//! Errors are meant to be shown to people as one line, so the transport's error chain
//! (reqwest → hyper → io) is boiled down to a short reason (`connection refused`) when
//! the error is made, instead of being kept as a `#[source]` chain.

use std::time::Duration;

use bramble_api::duration::Duration as ApiDuration;
use bramble_api::manifest::Kind;
use bramble_api::rest::{
    ApiErrorBody, ApplyRequest, ApplyResponse, ControllerView, CronJobView, DeleteResponse,
    DrainResponse, Event, NodeView, SecretDeleteResponse, SecretView, VersionInfo,
    WebhookTestResponse, WebhookView, WorkloadView,
};
use bramble_api::task::Task;
use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, USER_AGENT};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{Target, Trust};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take (streams and drains excepted).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its own timeout a drain may take to answer: the controller
/// stops waiting at the timeout, then still has to answer.
const DRAIN_GRACE: Duration = Duration::from_secs(15);

/// What can go wrong talking to the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server setting is not an http(s) URL.
    #[error("invalid server URL {server:?}: {reason}")]
    BadServer {
        /// As configured.
        server: String,
        /// Why.
        reason: String,
    },
    /// The token cannot be sent in an HTTP header.
    #[error("invalid token: it must be printable ASCII without line breaks")]
    BadToken,
    /// Nothing says which CA the controller must hold: no credential is sent to a
    /// controller that has not proved who it is.
    #[error("the cluster CA of {server} is not pinned: run `bramblectl login {server}` (it shows the CA's fingerprint and asks), or give --ca-fingerprint, BRAMBLE_CA_FINGERPRINT or --certificate-authority (the controller's DATA_DIR/ca.crt)")]
    NotPinned {
        /// Base URL.
        server: String,
    },
    /// The CA given cannot be used.
    #[error("{0}")]
    BadCa(String),
    /// The server is not of the pinned cluster: nothing was sent.
    #[error("the controller at {server} is not the one pinned (nothing was sent): {reason}")]
    Untrusted {
        /// Base URL.
        server: String,
        /// What the TLS check found.
        reason: String,
    },
    /// Nothing answers at the server's address.
    #[error("cannot reach the controller at {server}: {reason} (is bramble-controller running? set --server or BRAMBLE_SERVER)")]
    Unreachable {
        /// Base URL.
        server: String,
        /// `connection refused`, `timed out`, …
        reason: String,
    },
    /// Something answers, but no HTTP conversation could be had (TLS, protocol…).
    #[error("cannot talk to the controller at {server}: {reason}")]
    Connect {
        /// Base URL.
        server: String,
        /// What failed.
        reason: String,
    },
    /// 401.
    #[error(
        "unauthorized: the server rejected the token (set --token, BRAMBLE_TOKEN or a context)"
    )]
    Unauthorized,
    /// 401 to a request that carried no token at all.
    #[error("unauthorized: no token was sent; give --token, set BRAMBLE_TOKEN, or add one to a context (bramblectl config set-context NAME --token T); the admin token is in the controller's data directory")]
    NoToken,
    /// An error answer in the API's shape.
    #[error("{}", body.message)]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// `{code, message, details}`.
        body: ApiErrorBody,
    },
    /// An error answer that is not in the API's shape (a proxy, another server).
    #[error("the server at {server} answered {status}: {text}")]
    Http {
        /// Base URL.
        server: String,
        /// HTTP status.
        status: StatusCode,
        /// The start of the body.
        text: String,
    },
    /// A success answer that does not parse as the expected type.
    #[error("unexpected answer to {method} {path}: {reason} (is the controller the same version as bramblectl?)")]
    Decode {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// What did not parse.
        reason: String,
    },
    /// The connection broke while reading an answer.
    #[error("connection to the controller at {server} broke: {reason}")]
    Interrupted {
        /// Base URL.
        server: String,
        /// What failed.
        reason: String,
    },
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a follower refused what only the leader serves.
    pub fn is_not_leader(&self) -> bool {
        matches!(self, Error::Api { body, .. } if body.code == "not_leader")
    }

    /// Whether the server said 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { status, .. } | Error::Http { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// A client for one controller.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    server: String,
    auth: Option<HeaderValue>,
    /// Every controller listed, tried in turn from `current`.
    bases: Vec<Url>,
    /// Their base URLs as shown in messages.
    servers: Vec<String>,
    /// The one that last answered.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The TLS setup pinning the cluster CA, for the WebSocket of `exec`.
    tls: std::sync::Arc<rustls::ClientConfig>,
}

/// How a request failed.
enum Sent {
    /// No connection could be made: no controller saw it.
    NotDelivered(Error),
    /// Anything else (an answer, or a connection that broke mid-way).
    Failed(Error),
}

/// `url` (built on the first server) aimed at `base` instead.
fn rebase(url: &Url, base: &Url) -> Url {
    let mut u = url.clone();
    let _ = u.set_scheme(base.scheme());
    let _ = u.set_host(base.host_str());
    let _ = u.set_port(base.port());
    u
}

/// Parses a server setting; `host:port` without a scheme means `https://host:port`.
/// Plain `http://` is refused: controllers serve TLS only.
pub fn parse_server(server: &str) -> Result<Url> {
    let bad = |reason: &str| Error::BadServer {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let has_scheme = server.contains("://");
    let text = if has_scheme {
        server.to_string()
    } else {
        format!("https://{server}")
    };
    let url = Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() == "http" {
        return Err(bad(
            "plain HTTP is refused: the controller serves TLS only; use https://",
        ));
    }
    if url.scheme() != "https" {
        return Err(bad("expected an https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a server URL has no query or fragment"));
    }
    Ok(url)
}

/// Parses a server setting that may list several controllers of one cluster,
/// comma-separated (`https://a:7878,https://b:7878`): each as [`parse_server`].
pub fn parse_servers(servers: &str) -> Result<Vec<Url>> {
    let list: Vec<Url> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_server)
        .collect::<Result<_>>()?;
    if list.is_empty() {
        return Err(Error::BadServer {
            server: servers.to_string(),
            reason: "no server in it".into(),
        });
    }
    Ok(list)
}

/// Makes rustls use ring (not aws-lc-rs, which needs cmake and more C to cross-build
/// for the Pis). Idempotent; [`Client::new`] calls it too, as reqwest panics without a
/// provider.
pub fn install_tls_provider() {
    bramble_tls::install_provider();
}

/// The fingerprint `trust` pins: given, or that of the first certificate of a file.
pub fn pinned(trust: &Trust) -> Result<bramble_tls::Fingerprint> {
    match trust {
        Trust::Fingerprint(f) => f.parse().map_err(|e: bramble_api::token::BadFingerprint| {
            Error::BadCa(format!("--ca-fingerprint: {e}"))
        }),
        Trust::File(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::BadCa(format!(
                    "--certificate-authority {}: {}",
                    path.display(),
                    crate::output::describe_io(&e)
                ))
            })?;
            let certs = bramble_tls::certificates(&pem).map_err(|e| {
                Error::BadCa(format!("--certificate-authority {}: {e}", path.display()))
            })?;
            Ok(bramble_tls::fingerprint(&certs[0]))
        }
    }
}

/// Connects to `server` and returns the fingerprint of the CA its certificate chain
/// ends with, without trusting it or sending anything over the connection (for
/// `bramblectl login`, which shows it to the user first).
pub async fn probe_ca(server: &str) -> Result<bramble_tls::Fingerprint> {
    install_tls_provider();
    let url = parse_server(server)?;
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let unreachable = |reason: String| Error::Unreachable {
        server: server.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(crate::output::describe_io(&e)))?;
    let seen = bramble_tls::Seen::default();
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| Error::BadServer {
        server: server.to_string(),
        reason: e.to_string(),
    })?;
    // The recorder refuses every server once it has its chain: the handshake fails by
    // design, and nothing is ever sent.
    let _ = tokio_rustls::TlsConnector::from(std::sync::Arc::new(seen.client_config()))
        .connect(name, tcp)
        .await;
    seen.ca().ok_or_else(|| Error::Connect {
        server: server.to_string(),
        reason: "the server sent no certificate: is it a Bramble controller?".into(),
    })
}

impl Client {
    /// A client for the target's server and token.
    pub fn new(target: &Target) -> Result<Client> {
        install_tls_provider();
        let bases = parse_servers(&target.server)?;
        let trust = target.trust.as_ref().ok_or_else(|| Error::NotPinned {
            server: target.server.clone(),
        })?;
        let tls = bramble_tls::client_config(bramble_tls::Pins::one(pinned(trust)?));
        let ws_tls = std::sync::Arc::new(tls.clone());
        let auth = match &target.token {
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| Error::BadToken)?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| Error::Connect {
                server: target.server.clone(),
                reason: reason(&e),
            })?;
        Ok(Client {
            http,
            server: bases[0].as_str().trim_end_matches('/').to_string(),
            servers: bases
                .iter()
                .map(|b| b.as_str().trim_end_matches('/').to_string())
                .collect(),
            base: bases[0].clone(),
            bases,
            current: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            auth,
            tls: ws_tls,
        })
    }

    /// The base URL of the controller in use, as shown in messages.
    pub fn server(&self) -> &str {
        &self.servers[self.in_use()]
    }

    /// The URL of `/v1/{segments…}?{query}`; segments are percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .expect("parse_server accepts only http(s) URLs, which have a path");
            path.pop_if_empty().push("v1").extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends to the controller in use, moving on to the next listed one (and staying
    /// with it) when a connection cannot even be made: such a request surely reached no
    /// controller, so sending it elsewhere is safe for writes too. Any controller of a
    /// cluster answers every request (a follower's writes are the same compare-and-swap).
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&dyn ErasedJson>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        use std::sync::atomic::Ordering;
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let target = rebase(&url, &self.bases[i]);
            match self.send_to(i, method.clone(), target, body, timeout).await {
                Err(Sent::NotDelivered(e)) if k + 1 < n => {
                    last = Some(e);
                }
                // What only the leader serves (a task's logs), refused by a follower
                // that did nothing: the next controller may lead.
                Err(Sent::Failed(e)) if k + 1 < n && e.is_not_leader() => {
                    last = Some(e);
                }
                Err(Sent::NotDelivered(e) | Sent::Failed(e)) => return Err(e),
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Connect {
            server: self.server.clone(),
            reason: "no controller listed".into(),
        }))
    }

    async fn send_to(
        &self,
        i: usize,
        method: Method,
        url: Url,
        body: Option<&dyn ErasedJson>,
        timeout: Option<Duration>,
    ) -> std::result::Result<reqwest::Response, Sent> {
        let mut req = self.http.request(method, url).header(
            USER_AGENT,
            concat!("bramblectl/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(&b.to_json());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Err(Sent::NotDelivered(self.transport_error(i, &e)))
            }
            Err(e) => return Err(Sent::Failed(self.transport_error(i, &e))),
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(Sent::Failed(if self.auth.is_some() {
                Error::Unauthorized
            } else {
                Error::NoToken
            }));
        }
        let text = resp.text().await.unwrap_or_default();
        Err(Sent::Failed(
            match serde_json::from_str::<ApiErrorBody>(&text) {
                Ok(body) => Error::Api { status, body },
                Err(_) => Error::Http {
                    server: self.servers[i].clone(),
                    status,
                    text: first_line(&text, 200),
                },
            },
        ))
    }

    /// The index of the controller in use.
    fn in_use(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()
    }

    fn transport_error(&self, i: usize, e: &reqwest::Error) -> Error {
        let server = self.servers[i].clone();
        let io = io_error(e);
        let unreachable = e.is_timeout()
            || io.is_some_and(|io| {
                use std::io::ErrorKind::*;
                matches!(
                    io.kind(),
                    ConnectionRefused
                        | TimedOut
                        | HostUnreachable
                        | NetworkUnreachable
                        | AddrNotAvailable
                )
            })
            || chain(e).any(|m| m.starts_with("dns error"));
        let untrusted = chain(e).find(|m| {
            m.contains("not from the pinned cluster CA") || m.contains("invalid peer certificate")
        });
        if unreachable {
            Error::Unreachable {
                server,
                reason: reason(e),
            }
        } else if let Some(why) = untrusted {
            Error::Untrusted {
                server,
                reason: why,
            }
        } else if e.is_connect() {
            Error::Connect {
                server,
                reason: reason(e),
            }
        } else {
            Error::Interrupted {
                server,
                reason: reason(e),
            }
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&dyn ErasedJson>,
    ) -> Result<T> {
        self.json_within(method, segments, query, body, REQUEST_TIMEOUT)
            .await
    }

    async fn json_within<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&dyn ErasedJson>,
        timeout: Duration,
    ) -> Result<T> {
        let url = self.url(segments, query);
        let path = url.path().to_string();
        let resp = self.send(method.clone(), url, body, Some(timeout)).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(self.in_use(), &e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            method,
            path,
            reason: e.to_string(),
        })
    }

    /// Opens `GET /v1/tasks/{id}/exec?…` as a WebSocket on the controller in use (exec
    /// goes over the leader's link: a follower's refusal names the leader).
    pub async fn exec_socket(
        &self,
        id: &str,
        query: &[(&str, &str)],
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let i = self.in_use();
        let base = &self.bases[i];
        let server = self.servers[i].clone();
        let mut url = rebase(&self.url(&["tasks", id, "exec"], query), base);
        let _ = url.set_scheme("wss");
        let host = base
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let port = base.port_or_known_default().unwrap_or(443);
        let unreachable = |reason: String| Error::Unreachable {
            server: server.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(crate::output::describe_io(&e)))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            Error::BadServer {
                server: server.clone(),
                reason: e.to_string(),
            }
        })?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Untrusted {
                server: server.clone(),
                reason: e.to_string(),
            })?;
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Connect {
                server: server.clone(),
                reason: e.to_string(),
            })?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let (ws, _) = tokio_tungstenite::client_async(req, tls)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    let status = StatusCode::from_u16(r.status().as_u16())
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let text = r
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    if status == StatusCode::UNAUTHORIZED {
                        return if self.auth.is_some() {
                            Error::Unauthorized
                        } else {
                            Error::NoToken
                        };
                    }
                    match serde_json::from_str::<ApiErrorBody>(&text) {
                        Ok(body) => Error::Api { status, body },
                        Err(_) => Error::Http {
                            server: server.clone(),
                            status,
                            text: first_line(&text, 200),
                        },
                    }
                }
                e => Error::Connect {
                    server: server.clone(),
                    reason: e.to_string(),
                },
            })?;
        Ok(ws)
    }

    /// `GET /v1/version`.
    pub async fn version(&self) -> Result<VersionInfo> {
        self.json(Method::GET, &["version"], &[], None).await
    }

    /// `POST /v1/apply`.
    pub async fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse> {
        self.json(Method::POST, &["apply"], &[], Some(req)).await
    }

    /// `GET /v1/workloads[?kind=K]`.
    pub async fn workloads(&self, kind: Option<Kind>) -> Result<Vec<WorkloadView>> {
        let query: Vec<(&str, &str)> = kind.iter().map(|k| ("kind", k.path())).collect();
        self.json(Method::GET, &["workloads"], &query, None).await
    }

    /// `GET /v1/workloads/{kind}/{name}`.
    pub async fn workload(&self, kind: Kind, name: &str) -> Result<WorkloadView> {
        self.json(Method::GET, &["workloads", kind.path(), name], &[], None)
            .await
    }

    /// `DELETE /v1/nodes/{name}`: the node and its credential.
    pub async fn delete_node(&self, name: &str) -> Result<serde_json::Value> {
        self.json(Method::DELETE, &["nodes", name], &[], None).await
    }

    /// `GET /v1/controllers`: every live controller and who leads.
    pub async fn controllers(&self) -> Result<Vec<ControllerView>> {
        self.json(Method::GET, &["controllers"], &[], None).await
    }

    /// `GET /v1/endpoints`: every workload's address and instances.
    pub async fn endpoints(&self) -> Result<Vec<bramble_api::endpoints::Endpoint>> {
        self.json(Method::GET, &["endpoints"], &[], None).await
    }

    /// `GET /v1/endpoints/{name}`: what `name` resolves to in containers.
    pub async fn endpoint(&self, name: &str) -> Result<bramble_api::endpoints::Endpoint> {
        self.json(Method::GET, &["endpoints", name], &[], None)
            .await
    }

    /// `GET /v1/volumes`: managed volumes, where they are used, their copies.
    pub async fn volumes(&self) -> Result<Vec<bramble_api::rest::VolumeView>> {
        self.json(Method::GET, &["volumes"], &[], None).await
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn volume(&self, name: &str) -> Result<bramble_api::rest::VolumeView> {
        self.json(Method::GET, &["volumes", name], &[], None).await
    }

    /// `GET /v1/secrets`: names and keys.
    pub async fn secrets(&self) -> Result<Vec<SecretView>> {
        self.json(Method::GET, &["secrets"], &[], None).await
    }

    /// `GET /v1/secrets/{name}`: names and keys.
    pub async fn secret(&self, name: &str) -> Result<SecretView> {
        self.json(Method::GET, &["secrets", name], &[], None).await
    }

    /// `DELETE /v1/secrets/{name}`.
    pub async fn delete_secret(&self, name: &str) -> Result<SecretDeleteResponse> {
        self.json(Method::DELETE, &["secrets", name], &[], None)
            .await
    }

    /// `DELETE /v1/workloads/{kind}/{name}`.
    pub async fn delete_workload(&self, kind: Kind, name: &str) -> Result<DeleteResponse> {
        self.json(Method::DELETE, &["workloads", kind.path(), name], &[], None)
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.json(Method::GET, &["nodes"], &[], None).await
    }

    /// `GET /v1/nodes/{name}`.
    pub async fn node(&self, name: &str) -> Result<NodeView> {
        self.json(Method::GET, &["nodes", name], &[], None).await
    }

    /// `GET /v1/tasks[?workload=W&node=N]`.
    pub async fn tasks(&self, workload: Option<&str>, node: Option<&str>) -> Result<Vec<Task>> {
        let mut query = Vec::new();
        if let Some(w) = workload {
            query.push(("workload", w));
        }
        if let Some(n) = node {
            query.push(("node", n));
        }
        self.json(Method::GET, &["tasks"], &query, None).await
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn task(&self, id: &str) -> Result<Task> {
        self.json(Method::GET, &["tasks", id], &[], None).await
    }

    /// `GET /v1/tasks/{id}/logs?follow=&tail=`: the log text as it arrives.
    pub async fn logs(&self, id: &str, follow: bool, tail: Option<u32>) -> Result<Logs> {
        let tail = tail.map(|t| t.to_string());
        let mut query = vec![("follow", if follow { "true" } else { "false" })];
        if let Some(t) = &tail {
            query.push(("tail", t.as_str()));
        }
        let url = self.url(&["tasks", id, "logs"], &query);
        let resp = self
            .send(Method::GET, url, None, (!follow).then_some(REQUEST_TIMEOUT))
            .await?;
        Ok(Logs {
            resp,
            server: self.server.clone(),
        })
    }

    /// `POST /v1/workloads/{kind}/{name}/scale?replicas=N`.
    pub async fn scale(
        &self,
        kind: Kind,
        name: &str,
        replicas: u32,
    ) -> Result<bramble_api::rest::ScaleResponse> {
        let n = replicas.to_string();
        self.json(
            Method::POST,
            &["workloads", kind.path(), name, "scale"],
            &[("replicas", n.as_str())],
            None,
        )
        .await
    }

    /// `POST /v1/workloads/{kind}/{name}/restart`: every task at once.
    pub async fn restart(
        &self,
        kind: Kind,
        name: &str,
    ) -> Result<bramble_api::rest::RestartResponse> {
        self.json(
            Method::POST,
            &["workloads", kind.path(), name, "restart"],
            &[],
            None,
        )
        .await
    }

    /// `POST /v1/tasks/{id}/restart`: one task.
    pub async fn restart_task(&self, id: &str) -> Result<bramble_api::rest::TaskRestartResponse> {
        self.json(Method::POST, &["tasks", id, "restart"], &[], None)
            .await
    }

    /// `POST /v1/nodes/{name}/cordon`.
    pub async fn cordon(&self, name: &str) -> Result<NodeView> {
        self.json(Method::POST, &["nodes", name, "cordon"], &[], None)
            .await
    }

    /// `POST /v1/nodes/{name}/uncordon`.
    pub async fn uncordon(&self, name: &str) -> Result<NodeView> {
        self.json(Method::POST, &["nodes", name, "uncordon"], &[], None)
            .await
    }

    /// `POST /v1/nodes/{name}/drain?timeout=T`: answers when the node is empty or the
    /// timeout has passed, so the request may take a little longer than `timeout`.
    pub async fn drain(&self, name: &str, timeout: ApiDuration) -> Result<DrainResponse> {
        let t = timeout.to_string();
        self.json_within(
            Method::POST,
            &["nodes", name, "drain"],
            &[("timeout", t.as_str())],
            None,
            timeout.std().saturating_add(DRAIN_GRACE),
        )
        .await
    }

    /// `GET /v1/cronjobs`.
    pub async fn cronjobs(&self) -> Result<Vec<CronJobView>> {
        self.json(Method::GET, &["cronjobs"], &[], None).await
    }

    /// `GET /v1/cronjobs/{name}`.
    pub async fn cronjob(&self, name: &str) -> Result<CronJobView> {
        self.json(Method::GET, &["cronjobs", name], &[], None).await
    }

    /// `GET /v1/webhooks`.
    pub async fn webhooks(&self) -> Result<Vec<WebhookView>> {
        self.json(Method::GET, &["webhooks"], &[], None).await
    }

    /// `POST /v1/webhooks/{name}/test`: one synchronous delivery of a test event.
    pub async fn webhook_test(&self, name: &str) -> Result<WebhookTestResponse> {
        self.json(Method::POST, &["webhooks", name, "test"], &[], None)
            .await
    }

    /// `POST /v1/cronjobs/{name}/run`: the run started now.
    pub async fn cron_run(&self, name: &str) -> Result<Task> {
        self.json(Method::POST, &["cronjobs", name, "run"], &[], None)
            .await
    }

    /// `POST /v1/cronjobs/{name}/suspend` (or `.../resume` when `suspend` is false).
    pub async fn cron_suspend(&self, name: &str, suspend: bool) -> Result<CronJobView> {
        let action = if suspend { "suspend" } else { "resume" };
        self.json(Method::POST, &["cronjobs", name, action], &[], None)
            .await
    }

    /// `GET /v1/events[?object=O]`, oldest first as the controller keeps them.
    pub async fn events(&self, object: Option<&str>) -> Result<Vec<Event>> {
        let query: Vec<(&str, &str)> = object.iter().map(|o| ("object", *o)).collect();
        self.json(Method::GET, &["events"], &query, None).await
    }

    /// `GET /v1/events?[object=O&]watch=true`: the stored events, then new ones as they
    /// happen, without end.
    pub async fn watch_events(&self, object: Option<&str>) -> Result<EventStream> {
        let mut query: Vec<(&str, &str)> = object.iter().map(|o| ("object", *o)).collect();
        query.push(("watch", "true"));
        let url = self.url(&["events"], &query);
        let path = url.path().to_string();
        let resp = self.send(Method::GET, url, None, None).await?;
        Ok(EventStream {
            resp,
            server: self.server.clone(),
            path,
            buf: Vec::new(),
        })
    }
}

/// A watch answer being read: newline-delimited JSON, one [`Event`] a line.
#[derive(Debug)]
pub struct EventStream {
    resp: reqwest::Response,
    server: String,
    path: String,
    /// Bytes received after the last complete line.
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the controller ends the stream.
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(line) = next_line(&mut self.buf) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| Error::Decode {
                        method: Method::GET,
                        path: self.path.clone(),
                        reason: e.to_string(),
                    });
            }
            let chunk = self.resp.chunk().await.map_err(|e| Error::Interrupted {
                server: self.server.clone(),
                reason: reason(&e),
            })?;
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                // A last line without its newline still counts.
                None if !self.buf.iter().all(u8::is_ascii_whitespace) => self.buf.push(b'\n'),
                None => return Ok(None),
            }
        }
    }
}

/// Takes the first complete line (without its `\n`) out of `buf`.
fn next_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let pos = buf.iter().position(|b| *b == b'\n')?;
    let mut line: Vec<u8> = buf.drain(..=pos).collect();
    line.pop();
    Some(line)
}

/// A log answer being read.
#[derive(Debug)]
pub struct Logs {
    resp: reqwest::Response,
    server: String,
}

impl Logs {
    /// The next piece of log text; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        self.resp.chunk().await.map_err(|e| Error::Interrupted {
            server: self.server.clone(),
            reason: reason(&e),
        })
    }
}

/// Request bodies, type-erased so `send` is compiled once.
trait ErasedJson: Sync {
    fn to_json(&self) -> serde_json::Value;
}

impl<T: Serialize + Sync> ErasedJson for T {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("API request bodies always serialize")
    }
}

/// The messages of an error and its sources, outermost first.
fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = String> + 'a {
    std::iter::successors(Some(e), |e| e.source()).map(|e| e.to_string())
}

fn io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref())
}

/// A short reason for a transport error: the innermost cause, in lower case, without
/// the `(os error 111)` suffix.
fn reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if let Some(io) = io_error(e) {
        use std::io::ErrorKind::*;
        match io.kind() {
            ConnectionRefused => return "connection refused".into(),
            TimedOut => return "timed out".into(),
            ConnectionReset => return "connection reset".into(),
            _ => {}
        }
    }
    let inner = chain(e).last().unwrap_or_default();
    let inner = match inner.rfind(" (os error ") {
        Some(i) => inner[..i].to_string(),
        None => inner,
    };
    let mut chars = inner.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "unknown error".into(),
    }
}

/// The first line of `text`, at most `max` characters.
fn first_line(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.chars().count() > max {
        let mut s: String = line.chars().take(max).collect();
        s.push('…');
        s
    } else if line.is_empty() {
        "(empty body)".into()
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn target(server: &str, token: Option<&str>) -> Target {
        Target {
            server: server.into(),
            token: token.map(str::to_string),
            context: None,
            trust: Some(Trust::Fingerprint(FP.into())),
        }
    }

    fn client(server: &str) -> Client {
        Client::new(&target(server, None)).expect("valid server")
    }

    #[test]
    fn urls_are_built_under_v1_with_encoded_segments() {
        let c = client("https://pi:7878");
        assert_eq!(
            c.url(&["tasks", "a b/c"], &[("follow", "true")]).as_str(),
            "https://pi:7878/v1/tasks/a%20b%2Fc?follow=true"
        );
        let c = client("https://host/bramble/");
        assert_eq!(
            c.url(&["nodes"], &[]).as_str(),
            "https://host/bramble/v1/nodes"
        );
        assert_eq!(c.server(), "https://host/bramble");
    }

    #[test]
    fn a_server_without_scheme_is_https_and_plain_http_is_refused() {
        assert_eq!(
            parse_server("pi-1:7878").map(|u| u.to_string()).ok(),
            Some("https://pi-1:7878/".to_string())
        );
        assert!(parse_server("ftp://x").is_err());
        assert!(parse_server("https://").is_err());
        let e = parse_server("http://pi-1:7878").expect_err("plain http");
        assert!(e.to_string().contains("plain HTTP is refused"), "{e}");
    }

    #[test]
    fn a_token_with_a_line_break_is_refused() {
        let err = Client::new(&target("https://x", Some("a\nb"))).expect_err("must fail");
        assert!(matches!(err, Error::BadToken));
    }

    #[test]
    fn an_unpinned_controller_is_not_contacted() {
        let mut t = target("https://x", Some("t"));
        t.trust = None;
        let err = Client::new(&t).expect_err("must fail");
        assert!(matches!(err, Error::NotPinned { .. }), "{err}");
    }

    #[test]
    fn ndjson_lines_are_taken_whole_and_partial_ones_kept() {
        let mut buf = b"{\"a\":1}\n{\"b\":".to_vec();
        assert_eq!(next_line(&mut buf).as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(next_line(&mut buf), None);
        assert_eq!(buf, b"{\"b\":");
        buf.extend_from_slice(b"2}\n");
        assert_eq!(next_line(&mut buf).as_deref(), Some(&b"{\"b\":2}"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn first_line_is_trimmed_and_bounded() {
        assert_eq!(first_line("\n  Bad Gateway \nmore", 50), "Bad Gateway");
        assert_eq!(first_line("abcdef", 3), "abc…");
        assert_eq!(first_line("", 3), "(empty body)");
    }
}
