//! The shared [`Store`]: an etcd v3 cluster, for several controllers.
//!
//! # Layout
//! Every key lives under one root (`--etcd-prefix`, `/bramble/` by default, stored
//! without its trailing `/`), so one etcd can hold several clusters or other data:
//! the store's `/tasks/a` is etcd's `/bramble/tasks/a`. The root key itself (`/bramble`)
//! holds the layout's version (`bramble-store 1`); a root with keys under it but no
//! such marker belongs to someone else and is refused ([`Error::Foreign`]).
//!
//! Revisions, compares, watches and leases are etcd's own: the store contract was
//! written after them. The store's revision is the etcd cluster's, so on a shared etcd
//! it also moves for writes under other roots; nothing in Bramble assumes otherwise.
//!
//! # Endpoints
//! One client per endpoint, not etcd-client's balanced channel: that one keeps sending
//! every other request to a dead member (etcd-client#39). Requests go to the current
//! endpoint; when it cannot be reached, reads move on to the next at once, and so does a
//! transaction when its request surely never reached a member (connection refused, no
//! leader). A transaction whose outcome is unknown (a timeout, "leader changed") is
//! reported as failed and the next call goes to another endpoint: callers retry with
//! their compares, which a transaction that did commit after all then fails.
//!
//! Clients require a leader (`require_leader`): a member cut off from its quorum answers
//! "no leader" at once instead of serving stale reads or hanging a watch.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};

pub use super::TlsFiles;
use super::{
    check_ops, lease_seconds, Error, EventKind, KeyValue, Lease, LeaseId, Listing, Op, Result,
    Store, Txn, TxnResult, Watch, WatchBatch, WatchEvent,
};

/// The layout version this release writes and reads, in the root key.
const LAYOUT_VERSION: u32 = 1;

/// The root key's value prefix; a root key without it is someone else's.
const MARKER: &str = "bramble-store ";

/// The longest a unary request may take (watches and keep-alive streams are not bound
/// by it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connecting to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 pings on idle connections, so a dead member ends its watches in seconds.
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Keys per page when listing: a response stays far below gRPC's 4 MiB limit.
const PAGE: i64 = 500;

/// Whether `host` (from a URL) is this machine: plain HTTP there crosses no network.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why `--etcd` cannot be used with these TLS settings, said in terms of the flags.
/// Plain `http://` is for an etcd on this machine only, unless `allow_plain` (the
/// operator's explicit choice for a network only the controllers reach): etcd holds
/// every workload, and its traffic is no less secret than the agents'.
pub fn check_endpoints(
    endpoints: &[String],
    tls: Option<&TlsFiles>,
    allow_plain: bool,
) -> std::result::Result<(), String> {
    if endpoints.is_empty() {
        return Err("--etcd needs at least one URL".into());
    }
    if let Some(t) = tls {
        if t.cert.is_some() != t.key.is_some() {
            return Err("--etcd-cert and --etcd-key go together".into());
        }
    }
    for e in endpoints {
        let (rest, https) = if let Some(r) = e.strip_prefix("https://") {
            (r, true)
        } else if let Some(r) = e.strip_prefix("http://") {
            (r, false)
        } else {
            return Err(format!(
                "--etcd {e}: expected https://HOST:PORT (or http:// for an etcd on this machine)"
            ));
        };
        let hostport = rest.trim_end_matches('/');
        let host = hostport.rsplit_once(':').and_then(|(host, port)| {
            (!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)).then_some(host)
        });
        let Some(host) = host.filter(|_| !hostport.contains('/') && !hostport.contains('@')) else {
            return Err(format!("--etcd {e}: expected https://HOST:PORT"));
        };
        match (https, tls.is_some()) {
            (true, false) => {
                return Err(format!(
                    "--etcd {e}: https needs --etcd-cacert (the CA that signed etcd's certificate)"
                ))
            }
            (false, true) => {
                return Err(format!(
                    "--etcd {e}: --etcd-cacert is given, so every endpoint must be https://"
                ))
            }
            (false, false) if !allow_plain && !is_loopback(host) => {
                return Err(format!(
                    "--etcd {e}: plain http to another machine sends the cluster's state in clear; \
                     use https:// with --etcd-cacert (and --etcd-cert/--etcd-key), or \
                     --etcd-allow-plain-http on a network only the controllers reach"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The TLS settings for etcd-client from the PEM files.
fn tls_options(t: &TlsFiles) -> std::result::Result<etcd_client::TlsOptions, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let ca = read(&t.ca)?;
    if bramble_tls::certificates(&ca).map_or(true, |c| c.is_empty()) {
        return Err(format!("{}: no PEM certificate in it", t.ca.display()));
    }
    let mut options =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// A channel to one endpoint, connected on first use and again after every loss.
///
/// A plain channel, not etcd-client's balanced one even for a single endpoint: a
/// balanced channel whose only endpoint is down holds requests until it comes back,
/// so a dead member would cost every call [`REQUEST_TIMEOUT`] instead of failing at
/// once with "connection refused" and moving on to the next member.
fn channel_to(
    url: &str,
    tls: Option<etcd_client::TlsOptions>,
) -> std::result::Result<etcd_client::Channel, tonic::transport::Error> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(etcd_client::Channel::Tonic(endpoint.connect_lazy()))
}

/// The root key of a `--etcd-prefix`: `/bramble/` and `/bramble` both give `/bramble`.
pub fn root_of(prefix: &str) -> std::result::Result<String, String> {
    let root = prefix.trim_end_matches('/');
    if !prefix.starts_with('/') || root.is_empty() {
        return Err(format!(
            "--etcd-prefix {prefix:?}: must start with / and name something below it (e.g. /bramble/)"
        ));
    }
    if root.chars().any(|c| c.is_control()) {
        return Err(format!(
            "--etcd-prefix {prefix:?}: control characters are not allowed"
        ));
    }
    Ok(root.to_string())
}

/// The end of etcd's key range for every key that starts with `key` (etcd's own rule:
/// the last byte below 0xff, plus one; all 0xff means "to the end", `\0`).
fn range_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An etcd v3 cluster as a [`Store`].
pub struct EtcdStore {
    endpoints: Vec<String>,
    clients: Vec<Client>,
    current: AtomicUsize,
    mapper: Mapper,
    writes: AtomicU64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("root", &self.mapper.root)
            .field("writes", &self.write_count())
            .finish()
    }
}

/// How a failed request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request surely reached no member's state machine: try the next endpoint.
    NotSent,
    /// The member is unreachable or slow; the outcome of a write is unknown.
    Unknown,
    /// An answer (a refusal): retrying elsewhere gives the same.
    Answered,
}

fn classify(e: &etcd_client::Error) -> Failure {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Failure::NotSent,
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() {
                tonic::Code::Unavailable
                    if msg.contains("leader changed") || msg.contains("timed out") =>
                {
                    Failure::Unknown
                }
                // Connection refused or reset, or "no leader" (require_leader).
                tonic::Code::Unavailable => Failure::NotSent,
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
                    Failure::Unknown
                }
                _ => Failure::Answered,
            }
        }
        _ => Failure::Answered,
    }
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound && s.message().contains("lease not found")
        }
        // etcd-client's own answer to a keep-alive for an ended lease (a TTL of 0).
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// A request that took longer than [`REQUEST_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct TimedOut(Duration);

/// A response without the header etcd always sends.
#[derive(Debug, thiserror::Error)]
#[error("the response has no header")]
struct NoHeader;

/// A watch the server ended.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WatchEnded(String);

fn revision_of(h: Option<&etcd_client::ResponseHeader>) -> std::result::Result<u64, NoHeader> {
    h.map(|h| u64::try_from(h.revision()).unwrap_or(0))
        .ok_or(NoHeader)
}

impl EtcdStore {
    /// Connects to `endpoints` (`https://HOST:PORT` with `tls`, or `http://` without;
    /// tried in order) and opens the store under `prefix`, writing the layout marker
    /// into an empty root. Fails when no endpoint answers, when etcd's certificate is not
    /// from `tls.ca` or it refuses ours, or when the root holds someone else's keys or a
    /// newer layout. Which endpoints are allowed is [`check_endpoints`]'s to say.
    pub async fn open(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&TlsFiles>,
    ) -> Result<EtcdStore> {
        let location = format!("etcd {} under {prefix}", endpoints.join(","));
        let invalid = |msg: String| Error::Open {
            location: location.clone(),
            source: msg.into(),
        };
        let root = root_of(prefix).map_err(invalid)?;
        let tls = tls.map(tls_options).transpose().map_err(invalid)?;
        let options = ConnectOptions::new().with_require_leader(true);
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let channel = channel_to(e, tls.clone()).map_err(|source| Error::Open {
                location: location.clone(),
                source: format!("{e}: {source}").into(),
            })?;
            let client = Client::from_channel(channel, Some(options.clone()))
                .await
                .map_err(|source| Error::Open {
                    location: location.clone(),
                    source: Box::new(source),
                })?;
            clients.push(client);
        }
        let mapper = Mapper {
            root: root.clone(),
            location: format!("etcd {} under {root}/", endpoints.join(",")),
        };
        let store = EtcdStore {
            endpoints: endpoints.to_vec(),
            clients,
            current: AtomicUsize::new(0),
            mapper,
            writes: AtomicU64::new(0),
        };
        store.claim_root().await.map_err(|e| match e {
            Error::Backend { source, .. } => Error::Open {
                location: location.clone(),
                source,
            },
            other => other,
        })?;
        Ok(store)
    }

    /// The store's key as an etcd key.
    fn full(&self, key: &str) -> Vec<u8> {
        let root = &self.mapper.root;
        let mut k = Vec::with_capacity(root.len() + key.len());
        k.extend_from_slice(root.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn backend(
        &self,
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Backend {
            location: self.location(),
            op,
            source: Box::new(source),
        }
    }

    /// Runs `call` against the current endpoint, moving on to the next ones as
    /// [`Failure`] allows (`write`: the call changes state, so only a request that was
    /// surely not sent is sent again).
    async fn call<T, F, Fut>(&self, op: &'static str, write: bool, call: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let mut last = None;
        for _ in 0..n {
            let i = self.current.load(Ordering::Relaxed) % n;
            let client = self.clients[i].clone();
            let failure = match tokio::time::timeout(REQUEST_TIMEOUT, call(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    if lease_not_found(&e) {
                        return Err(Error::LeaseNotFound(0));
                    }
                    let f = classify(&e);
                    last = Some(self.backend(op, e));
                    f
                }
                Err(_) => {
                    last = Some(self.backend(op, TimedOut(REQUEST_TIMEOUT)));
                    Failure::Unknown
                }
            };
            if failure == Failure::Answered {
                break;
            }
            // Another caller may have moved on already; move only from where we were.
            let _ =
                self.current
                    .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
            if n > 1 {
                tracing::warn!(endpoint = %self.endpoints[i], op, "etcd endpoint failed; trying the next");
            }
            if failure == Failure::Unknown && write {
                break;
            }
        }
        Err(last.unwrap_or_else(|| self.backend(op, WatchEnded("no endpoint".into()))))
    }

    /// Writes the layout marker into an empty root, or checks the one there.
    async fn claim_root(&self) -> Result<()> {
        let root = self.mapper.root.clone().into_bytes();
        loop {
            let found = self
                .call("open", false, |mut c| {
                    let root = root.clone();
                    async move { c.get(root, None).await }
                })
                .await?;
            if let Some(kv) = found.kvs().first() {
                let text = String::from_utf8_lossy(kv.value());
                let version = text
                    .strip_prefix(MARKER)
                    .and_then(|v| v.trim().parse::<u32>().ok());
                return match version {
                    Some(v) if v <= LAYOUT_VERSION => Ok(()),
                    Some(v) => Err(Error::SchemaTooNew {
                        location: self.location(),
                        found: i64::from(v),
                        supported: i64::from(LAYOUT_VERSION),
                    }),
                    None => Err(Error::Foreign {
                        location: self.location(),
                    }),
                };
            }
            let below = self.full("/");
            let end = range_end(&below);
            let count = self
                .call("open", false, |mut c| {
                    let (below, end) = (below.clone(), end.clone());
                    async move {
                        c.get(
                            below,
                            Some(GetOptions::new().with_range(end).with_count_only()),
                        )
                        .await
                    }
                })
                .await?;
            if count.count() > 0 {
                return Err(Error::Foreign {
                    location: self.location(),
                });
            }
            let marker = format!("{MARKER}{LAYOUT_VERSION}");
            let created = self
                .call("open", true, |mut c| {
                    let (root, marker) = (root.clone(), marker.clone());
                    async move {
                        c.txn(
                            EtcdTxn::new()
                                .when([EtcdCompare::create_revision(
                                    root.clone(),
                                    CompareOp::Equal,
                                    0,
                                )])
                                .and_then([TxnOp::put(root, marker, None)]),
                        )
                        .await
                    }
                })
                .await?;
            if created.succeeded() {
                self.writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(store = %self.location(), "created the Bramble store in etcd");
                return Ok(());
            }
            // Another controller created it first: check what it wrote.
        }
    }

    fn compare(&self, c: &super::Compare) -> EtcdCompare {
        let key = self.full(c.key());
        match c {
            super::Compare::ModRevision { rev, .. } => {
                EtcdCompare::mod_revision(key, CompareOp::Equal, to_i64(*rev))
            }
            super::Compare::CreateRevision { rev, .. } => {
                EtcdCompare::create_revision(key, CompareOp::Equal, to_i64(*rev))
            }
            super::Compare::Value { value, .. } => {
                EtcdCompare::value(key, CompareOp::Equal, value.clone())
            }
        }
    }

    fn op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put { key, value, lease } => {
                let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                TxnOp::put(self.full(key), value.clone(), options)
            }
            Op::Delete { key } => TxnOp::delete(self.full(key), None),
            Op::DeletePrefix { prefix } => {
                let from = self.full(prefix);
                let end = range_end(&from);
                TxnOp::delete(from, Some(DeleteOptions::new().with_range(end)))
            }
        }
    }
}

fn to_i64(rev: u64) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, u64)> {
        let k = self.full(key);
        let resp = self
            .call("read", false, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let rev = revision_of(resp.header()).map_err(|e| self.backend("read", e))?;
        let kv = resp
            .kvs()
            .first()
            .map(|kv| self.mapper.kv(kv))
            .transpose()?;
        Ok((kv, rev))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let from = self.full(prefix);
        let end = range_end(&from);
        let mut start = from;
        let mut revision = 0i64;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                // Every page at the first page's revision: one consistent listing.
                options = options.with_revision(revision);
            }
            let resp = self
                .call("read", false, |mut c| {
                    let (start, options) = (start.clone(), options.clone());
                    async move { c.get(start, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| self.backend("read", NoHeader))?;
            }
            for kv in resp.kvs() {
                kvs.push(self.mapper.kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    let mut next = last.key().to_vec();
                    next.push(0);
                    start = next;
                }
                _ => break,
            }
        }
        Ok(Listing {
            kvs,
            revision: u64::try_from(revision).unwrap_or(0),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        check_ops(&txn.ops)?;
        let compares: Vec<EtcdCompare> = txn.compares.iter().map(|c| self.compare(c)).collect();
        let ops: Vec<TxnOp> = txn.ops.iter().map(|o| self.op(o)).collect();
        let resp = self
            .call("write", true, |mut c| {
                let t = EtcdTxn::new().when(compares.clone()).and_then(ops.clone());
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| match e {
                Error::LeaseNotFound(_) => Error::LeaseNotFound(
                    txn.ops
                        .iter()
                        .find_map(|o| match o {
                            Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                            _ => None,
                        })
                        .unwrap_or(0),
                ),
                other => other,
            })?;
        let revision = revision_of(resp.header()).map_err(|e| self.backend("write", e))?;
        if resp.succeeded() {
            let changed = resp.op_responses().iter().any(|r| match r {
                TxnOpResponse::Put(_) => true,
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                _ => false,
            });
            if changed {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch> {
        let from = self.full(prefix);
        let end = range_end(&from);
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(to_i64(from_revision));
        let stream = self
            .call("watch", false, |mut c| {
                let (from, options) = (from.clone(), options.clone());
                async move { c.watch(from, Some(options)).await }
            })
            .await?;
        let mapper = self.mapper.clone();
        struct Progress {
            stream: Option<etcd_client::WatchStream>,
            mapper: Mapper,
            pending: std::collections::VecDeque<WatchBatch>,
            next: u64,
        }
        let progress = Progress {
            stream: Some(stream),
            mapper,
            pending: Default::default(),
            next: from_revision,
        };
        let watch = futures_util::stream::unfold(progress, |mut p| async move {
            loop {
                if let Some(b) = p.pending.pop_front() {
                    p.next = b.revision + 1;
                    return Some((Ok(b), p));
                }
                let stream = p.stream.as_mut()?;
                let fail = |p: &mut Progress, e: Error| {
                    p.stream = None;
                    Some(Err(e))
                };
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let err = if resp.compact_revision() > 0 {
                                Error::Compacted {
                                    requested: p.next,
                                    oldest: u64::try_from(resp.compact_revision()).unwrap_or(0),
                                }
                            } else {
                                p.mapper.backend(WatchEnded(format!(
                                    "the watch was cancelled: {}",
                                    resp.cancel_reason()
                                )))
                            };
                            let item = fail(&mut p, err)?;
                            return Some((item, p));
                        }
                        match p.mapper.batches(resp.events()) {
                            Ok(b) => p.pending.extend(b),
                            Err(e) => {
                                let item = fail(&mut p, e)?;
                                return Some((item, p));
                            }
                        }
                    }
                    Ok(None) => {
                        let e = p
                            .mapper
                            .backend(WatchEnded("the watch stream ended".into()));
                        let item = fail(&mut p, e)?;
                        return Some((item, p));
                    }
                    Err(e) => {
                        let e = p.mapper.backend(e);
                        let item = fail(&mut p, e)?;
                        return Some((item, p));
                    }
                }
            }
        });
        Ok(Box::pin(watch))
    }

    async fn grant(&self, ttl: Duration) -> Result<Lease> {
        let secs = i64::try_from(lease_seconds(ttl)).unwrap_or(i64::MAX);
        let resp = self
            .call("grant", true, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(self.backend("grant", WatchEnded(resp.error().to_string())));
        }
        Ok(Lease {
            id: resp.id(),
            ttl: Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0)),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        // One short keep-alive stream per renewal (an HTTP/2 stream on the member's
        // open channel, not a connection): each renewal is then a request of its own
        // with its own timeout and its own member choice, so a stream stuck on a dead
        // member can never hold the next renewal back.
        let ttl = self
            .call("keep-alive", false, |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(resp) => Ok(resp.ttl()),
                    None => Err(etcd_client::Error::LeaseKeepAliveError(
                        "the keep-alive stream ended".into(),
                    )),
                }
            })
            .await
            .map_err(|e| match e {
                Error::LeaseNotFound(_) => Error::LeaseNotFound(lease),
                other => other,
            })?;
        if ttl <= 0 {
            return Err(Error::LeaseNotFound(lease));
        }
        Ok(Duration::from_secs(u64::try_from(ttl).unwrap_or(0)))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.call("revoke", true, |mut c| async move {
            c.lease_revoke(lease).await
        })
        .await
        .map_err(|e| match e {
            Error::LeaseNotFound(_) => Error::LeaseNotFound(lease),
            other => other,
        })?;
        Ok(())
    }

    async fn revision(&self) -> Result<u64> {
        let root = self.mapper.root.clone().into_bytes();
        let resp = self
            .call("read", false, |mut c| {
                let root = root.clone();
                async move { c.get(root, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        revision_of(resp.header()).map_err(|e| self.backend("read", e))
    }

    fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn location(&self) -> String {
        self.mapper.location.clone()
    }
}

/// The store's key mapping and where it is: what a watch stream needs of the store.
#[derive(Debug, Clone)]
struct Mapper {
    root: String,
    location: String,
}

impl Mapper {
    fn backend(&self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Backend {
            location: self.location.clone(),
            op: "watch",
            source: Box::new(source),
        }
    }

    /// An etcd key as the store's key.
    fn strip(&self, key: &[u8]) -> Result<String> {
        key.strip_prefix(self.root.as_bytes())
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
            .ok_or_else(|| Error::Corrupt {
                location: self.location.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "not a UTF-8 key under the store's prefix".into(),
            })
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: u64::try_from(kv.create_revision()).unwrap_or(0),
            mod_revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
            lease: kv.lease(),
        })
    }

    /// Splits one watch response into batches, one per revision, in order (etcd never
    /// splits a revision across responses unless asked to fragment).
    fn batches(&self, events: &[etcd_client::Event]) -> Result<Vec<WatchBatch>> {
        let mut out: Vec<WatchBatch> = Vec::new();
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let kind = match e.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            let mut kv = self.kv(kv)?;
            if kind == EventKind::Delete {
                kv.value.clear();
                kv.create_revision = 0;
                kv.lease = 0;
            }
            let revision = kv.mod_revision;
            match out.last_mut() {
                Some(b) if b.revision == revision => b.events.push(WatchEvent { kind, kv }),
                _ => out.push(WatchBatch {
                    revision,
                    events: vec![WatchEvent { kind, kv }],
                }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends_follow_etcds_rule() {
        assert_eq!(range_end(b"/bramble/"), b"/bramble0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
        assert_eq!(range_end(b""), b"\0");
    }

    #[test]
    fn prefixes_name_a_root_below_slash() {
        assert_eq!(root_of("/bramble/").as_deref(), Ok("/bramble"));
        assert_eq!(root_of("/bramble").as_deref(), Ok("/bramble"));
        assert_eq!(root_of("/a/b//").as_deref(), Ok("/a/b"));
        for bad in ["", "/", "//", "bramble/", "/x\n"] {
            assert!(root_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_are_https_with_a_ca_or_plain_http_on_this_machine() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tls = TlsFiles {
            ca: "/ca.pem".into(),
            cert: None,
            key: None,
        };
        let plain = |v: &[&str]| check_endpoints(&list(v), None, false);
        let secure = |v: &[&str]| check_endpoints(&list(v), Some(&tls), false);
        assert!(plain(&["http://127.0.0.1:2379"]).is_ok());
        assert!(plain(&["http://localhost:2379/", "http://[::1]:2379"]).is_ok());
        assert!(secure(&["https://etcd-1:2379", "https://10.0.0.3:2379/"]).is_ok());
        assert!(plain(&[]).is_err());
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://:2379",
            "http://u:p@127.0.0.1:2379",
            "http://127.0.0.1:2379/v3",
            "unix:///run/etcd.sock",
        ] {
            let e = plain(&[bad]).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
        // Another machine in clear: refused unless the operator says so.
        let e = plain(&["http://10.0.0.3:2379"]).expect_err("plain on the LAN");
        assert!(
            e.contains("in clear") && e.contains("--etcd-allow-plain-http"),
            "{e}"
        );
        assert!(check_endpoints(&list(&["http://10.0.0.3:2379"]), None, true).is_ok());
        let e = plain(&["https://etcd-1:2379"]).expect_err("https without a CA");
        assert!(e.contains("--etcd-cacert"), "{e}");
        let e = secure(&["https://etcd-1:2379", "http://127.0.0.1:2379"]).expect_err("mixed");
        assert!(e.contains("every endpoint must be https"), "{e}");
        let half = TlsFiles {
            cert: Some("/c.pem".into()),
            ..tls.clone()
        };
        let e = check_endpoints(&list(&["https://e:2379"]), Some(&half), false)
            .expect_err("cert without key");
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn failures_are_retried_only_where_nothing_can_have_happened() {
        let s = |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert_eq!(
            classify(&s(tonic::Code::Unavailable, "etcdserver: no leader")),
            Failure::NotSent
        );
        assert_eq!(
            classify(&s(tonic::Code::Unavailable, "etcdserver: leader changed")),
            Failure::Unknown
        );
        assert_eq!(
            classify(&s(
                tonic::Code::Unavailable,
                "etcdserver: request timed out"
            )),
            Failure::Unknown
        );
        assert_eq!(
            classify(&s(tonic::Code::DeadlineExceeded, "")),
            Failure::Unknown
        );
        assert_eq!(
            classify(&s(tonic::Code::InvalidArgument, "duplicate key")),
            Failure::Answered
        );
        assert!(lease_not_found(&s(
            tonic::Code::NotFound,
            "etcdserver: requested lease not found"
        )));
        assert!(!lease_not_found(&s(tonic::Code::NotFound, "key not found")));
        assert!(lease_not_found(&etcd_client::Error::LeaseKeepAliveError(
            "lease not found".into()
        )));
    }
}
