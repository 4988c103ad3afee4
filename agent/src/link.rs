//! The links to the controllers: one outbound WebSocket to each controller listed
//! (or one found over mDNS), each re-dialled with back-off.
//!
//! The leader welcomes its link as the leader's: task sets come on it and task reports
//! go on it. With several controllers listed, the others (followers) welcome theirs as
//! standby links, which carry heartbeats out and Vouch frames in, and nothing else;
//! when a follower becomes the leader it closes its standby links and the agent dials
//! it again for the leader's.
//!
//! While no leader's link is up the agent keeps running what it has (static
//! stability); the supervisor only acts on task sets a leader actually sent. On every
//! (re)connect the agent says Hello with the tasks it observes in Docker, so the
//! controller's view is rebuilt from facts rather than from messages that may have been
//! lost.
//!
//! The one exception is fencing (see [`crate::fence`]): every frame on the leader's
//! link (text, ping or pong) and every Vouch on a standby link is noted in the fence
//! clock, which runs from agent start. After the fence timeout without either the
//! node's Wallets are stopped, and the leader's link hangs up and dials again, since
//! only a task set sent on a session welcomed after the fence lifts it. A standby link
//! never lifts a fence: a vouch only keeps running what a leader assigned.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::backoff::{Backoff, Retry};
use bramble_api::duration::Duration as ApiDuration;
use bramble_api::manifest::{Arch, Kind};
use bramble_api::task::container_name;
use bramble_api::token::JoinToken;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo, MAX_FRAME_BYTES};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::fence::{self, Contact, SharedContact};
use crate::host_paths::Policy as HostPaths;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::supervisor::{Desired, Supervisor};
use crate::{Config, Error};

/// How often the node is measured; heartbeats in between repeat the last measurement
/// (the controller takes such a repeat without decoding it again).
pub const METRICS_EVERY: Duration = Duration::from_secs(1);

/// Whether a heartbeat `heartbeat` after the last one, `since` the last measurement,
/// measures again: when the next one would be later than [`METRICS_EVERY`] after it.
/// A plain `since >= METRICS_EVERY` misses by the microseconds measuring takes whenever
/// the heartbeat divides [`METRICS_EVERY`], and at 1 Hz would measure every other second.
pub fn metrics_due(since: Option<Duration>, heartbeat: Duration) -> bool {
    since.is_none_or(|since| since + heartbeat / 2 >= METRICS_EVERY)
}

/// The longest wait between two dial attempts.
const MAX_REDIAL: Duration = Duration::from_secs(5);

/// Redials back off from 200 ms to [`MAX_REDIAL`], and start over at 200 ms after a
/// session the controller welcomed (it was a working link).
const REDIAL: Backoff = Backoff::new(Duration::from_millis(200), MAX_REDIAL);

/// After a refusal (bad join token, node refused) every wait is [`MAX_REDIAL`] until a
/// session is welcomed: retrying faster would not change the controller's mind.
const REFUSED: Backoff = Backoff::new(MAX_REDIAL, MAX_REDIAL);

/// Up to this much is added to each redial wait, so that agents that lost the
/// controller together do not all dial at the same instant.
const REDIAL_JITTER_MS: u64 = 200;

/// The longest wait for the connection, the Hello to go out and the Welcome to come
/// back: a partitioned network answers a TCP connect with silence, not a refusal.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one mDNS search for the controller lasts before the next dial attempt.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new session waits for the task reports' lock before its Hello (see
/// [`session_at`]).
const REPORTS_LOCK_WAIT: Duration = Duration::from_secs(1);

/// How often an agent without `--controller` looks again for controllers over mDNS once
/// it knows some (a controller added, or one that moved to another address).
const REDISCOVER: Duration = Duration::from_secs(30);

/// How long a discovered controller may go unseen by searches before its link is
/// dropped: a search often sees only some controllers (answers come late, packets get
/// lost), and that must not cut a working link.
const DROP_UNSEEN_AFTER: Duration = Duration::from_secs(90);

/// `https://host:port[/]` (or a bare `host:port`) → `wss://host:port/v1/agent`.
/// Plain `http://` is refused: controllers serve TLS only, and the agent sends its
/// credentials only to a controller of its cluster's CA.
pub fn agent_url(base: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::ControllerUrl {
        url: base.to_string(),
        reason: reason.to_string(),
    };
    // The scheme first: trimming slashes before would eat the `//` of a bare `https://`.
    let host = if let Some(r) = base.strip_prefix("https://") {
        r
    } else if let Some(r) = base.strip_prefix("wss://") {
        r
    } else if base.starts_with("http://") || base.starts_with("ws://") {
        return Err(bad(
            "plain HTTP is refused: the controller serves TLS only; use https://",
        ));
    } else if base.contains("://") {
        return Err(bad("expected an https:// URL"));
    } else {
        base
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad("expected https://HOST:PORT"));
    }
    Ok(format!("wss://{host}/v1/agent"))
}

/// Every controller of `list` (`URL[,URL...]`, see [`agent_url`]) as agent URLs, in
/// order, each once. An agent tries them in turn: any controller of the cluster
/// serves it (one that is not the leader refuses, and the agent moves on).
pub fn agent_urls(list: &str) -> Result<Vec<String>, Error> {
    let mut urls: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(Error::ControllerUrl {
                url: list.to_string(),
                reason:
                    "an empty URL in the list; expected https://HOST:PORT[,https://HOST:PORT...]"
                        .into(),
            });
        }
        let url = agent_url(part)?;
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Ok(urls)
}

/// The host and port of a `wss://host:port/...` URL; the port defaults to 443.
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("wss://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port
            .strip_prefix(':')
            .map_or(Some(443), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), 443)),
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("not a controller of this cluster, nothing sent: {0}")]
    Untrusted(String),
    #[error("the controller rejected the {0} (HTTP 401)")]
    Unauthorized(&'static str),
    #[error("the controller refused this agent: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("link lost: {0}")]
    Lost(String),
    #[error("docker: {0}")]
    Runtime(#[from] crate::runtime::Error),
}

/// Runs the supervisor and keeps the links up until `shutdown`. `urls` are the
/// controllers' agent URLs (see [`agent_urls`]), one link to each; without any, a
/// single link to a controller found over mDNS. Either way the supervisor and the fence
/// clock run from the start, so an agent that never reaches a controller still fences
/// its Wallets.
pub async fn run(
    cfg: Config,
    token: JoinToken,
    credential: String,
    urls: Vec<String>,
    host_paths: HostPaths,
    gate: Option<crate::gate::Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    tracing::info!(host_paths = %host_paths, "host path rules");
    let mut runtime = Runtime::connect(&cfg.node_name)
        .await?
        .with_host_paths(host_paths);
    match gate {
        Some(gate) => {
            tracing::info!(gate = %gate.path().display(), "cron runs start ahead of their slot, held by the gate until it");
            runtime = runtime.with_gate(gate);
        }
        None => tracing::info!(
            "no cron gate (bramble-gate beside the agent, or --cron-gate): cron runs are started by Docker at their slot, a Docker start late"
        ),
    }
    let routes = crate::routes::Routes::load(&cfg.data_dir);
    let volumes =
        Arc::new(
            crate::volumes::Store::open(&cfg.data_dir).map_err(|e| Error::DataDir {
                path: cfg.data_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?,
        );
    runtime = runtime.with_volumes(Arc::clone(&volumes));
    let duties = Arc::new(crate::sync::Duties::default());
    let receiver = Arc::new(crate::sync::Receiver::new(
        Arc::clone(&volumes),
        Arc::clone(&duties),
    ));
    let mut serving: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mesh = match cfg.mesh_port {
        Some(port) => match crate::mesh::Mesh::load_or_new(&cfg.node_name, &cfg.data_dir) {
            Ok(mesh) => {
                let mesh = Arc::new(mesh);
                runtime = runtime.with_fetch(Arc::clone(&receiver), Arc::clone(&mesh));
                if let Some((ns, dns)) = serve_names(&routes, &mut serving).await {
                    runtime = runtime.with_dns(dns);
                    let proxy = crate::proxy::Proxy::new(
                        cfg.node_name.clone(),
                        routes.clone(),
                        Arc::clone(&mesh),
                        runtime.clone(),
                        ns,
                        Some(Arc::clone(&receiver)),
                    );
                    serving.push(tokio::spawn(Arc::clone(&proxy).listen()));
                    serve_mesh(proxy, port, &mut serving).await;
                }
                Some((mesh, port))
            }
            Err(e) => {
                tracing::error!(error = %bramble_api::error_chain(&e), "workload names are not served on this node");
                None
            }
        },
        None => {
            tracing::info!("workload names are not served on this node (--no-service-proxy)");
            None
        }
    };
    let docker_version = runtime.version().await?;
    let metrics = Metrics::new();
    metrics.watch(&runtime, &cfg.data_dir);
    let memory_limits = crate::host::memory_limits(&runtime).await;
    let mut warnings = Vec::new();
    if memory_limits == Some(false) {
        // Loud: every `resources.memory` on this node is silently ignored by Docker.
        tracing::error!(
            fix = crate::host::MEMORY_LIMITS_WARNING,
            "MEMORY LIMITS ARE NOT ENFORCED on this node: the kernel's memory cgroup is disabled"
        );
        warnings.push(crate::host::MEMORY_LIMITS_WARNING.to_string());
    }
    let info = NodeInfo {
        mesh: None,
        name: cfg.node_name.clone(),
        arch: Arch::current().unwrap_or(Arch::Amd64),
        cores: metrics.cores(),
        memory_bytes: metrics.memory_total(),
        docker_version,
        labels: cfg.labels.clone(),
        agent_version: bramble_api::VERSION.to_string(),
        os: Metrics::os(),
        machine_id: crate::host::machine_id(),
        memory_limits,
        warnings,
    };
    tracing::info!(node = %info.name, machine_id = info.machine_id.as_deref().unwrap_or("unknown"), arch = %info.arch, docker = %info.docker_version, controllers = %if urls.is_empty() { "(mDNS)".to_string() } else { urls.join(",") }, "agent starting");

    let contact: SharedContact = Arc::new(Mutex::new(Contact::new(fence::now())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(1024);
    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let supervisor = Supervisor::new(runtime.clone(), cfg.node_name.clone(), out_tx);
    let observer = supervisor.observer();
    let mut sup_stop = stop_rx.clone();
    let sup = tokio::spawn(supervisor.run(desired_rx, async move {
        let _ = sup_stop.changed().await;
    }));
    let desired_tx = Arc::new(desired_tx);
    let syncer = mesh.as_ref().map(|(m, _)| {
        tokio::spawn(
            crate::syncer::Syncer {
                store: Arc::clone(&volumes),
                mesh: Arc::clone(m),
                runtime: runtime.clone(),
                rate: cfg.sync_rate,
            }
            .run(desired_tx.subscribe()),
        )
    });
    let fencer = tokio::spawn(fence::watch(Arc::clone(&contact), {
        let desired_tx = Arc::clone(&desired_tx);
        move || desired_tx.send_modify(|d| d.fenced = true)
    }));
    let image_gc = tokio::spawn(crate::disk::watch(runtime.clone(), cfg.image_gc_threshold));

    let tls = Arc::new(bramble_tls::client_config(bramble_tls::Pins::one(
        token.ca.clone(),
    )));
    let mut unique: Vec<String> = Vec::with_capacity(urls.len());
    for u in &urls {
        if !unique.contains(u) {
            unique.push(u.clone());
        }
    }
    // Standby links only make sense beside other links: a lone URL must reach the
    // leader, so a follower refuses it. Over mDNS every controller found gets a link.
    let standby = unique.len() > 1 || unique.is_empty();
    let epochs = crate::epoch::Epochs::load(&cfg.data_dir, token.ca.as_str());
    let shared = Arc::new(Shared {
        cfg,
        token,
        credential,
        info,
        runtime,
        observer,
        tls,
        reports: tokio::sync::Mutex::new(out_rx),
        desired_tx,
        contact,
        metrics: Mutex::new(metrics),
        epochs: Mutex::new(epochs),
        standby,
        routes,
        mesh,
        volumes,
        duties,
    });
    let dialers: Vec<_> = if unique.is_empty() {
        vec![tokio::spawn(discovering(Arc::clone(&shared)))]
    } else {
        unique
            .into_iter()
            .map(|u| tokio::spawn(dial_loop(Arc::clone(&shared), u)))
            .collect()
    };
    shutdown.await;
    for d in &dialers {
        d.abort();
    }
    for d in dialers {
        let _ = d.await;
    }
    fencer.abort();
    image_gc.abort();
    if let Some(s) = syncer {
        s.abort();
    }
    for t in serving {
        t.abort();
    }
    let _ = stop_tx.send(true);
    let _ = sup.await;
    tracing::info!("agent stopped; containers left running");
    Ok(())
}

/// What every link of the agent shares.
struct Shared {
    cfg: Config,
    token: JoinToken,
    credential: String,
    info: NodeInfo,
    runtime: Runtime,
    observer: crate::supervisor::Observer,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// The supervisor's task reports. The leader's link holds the lock for as long as
    /// it lasts, so reports go to the leader only; a session takes it (if free) before
    /// its Hello, so that the Hello supersedes what was queued.
    reports: tokio::sync::Mutex<mpsc::Receiver<AgentMessage>>,
    desired_tx: Arc<watch::Sender<Desired>>,
    contact: SharedContact,
    metrics: Mutex<Metrics>,
    /// The highest Wallet epochs seen (see [`crate::epoch`]).
    epochs: Mutex<crate::epoch::Epochs>,
    /// Whether to ask followers for standby links (several controllers are listed).
    standby: bool,
    /// The routing table the leader sends.
    routes: crate::routes::Routes,
    /// The agent-to-agent identity and port, when this node serves workload names.
    mesh: Option<(Arc<crate::mesh::Mesh>, u16)>,
    /// Managed volumes, copies and data set aside.
    volumes: Arc<crate::volumes::Store>,
    /// The copies this node keeps, as the leader last said.
    duties: Arc<crate::sync::Duties>,
}

/// How often the volumes are measured again for the controller (sizes change without
/// any event); a report is sent only when it differs from the last.
const VOLUMES_EVERY: Duration = Duration::from_secs(30);

/// A fresh volume report, unless it is the one sent last.
async fn volumes_report(
    store: &Arc<crate::volumes::Store>,
    sent: &mut Option<Vec<bramble_api::wire::VolumeReport>>,
) -> Option<AgentMessage> {
    let store = Arc::clone(store);
    let report = tokio::task::spawn_blocking(move || store.report())
        .await
        .ok()?;
    if sent.as_ref() == Some(&report) {
        return None;
    }
    *sent = Some(report.clone());
    Some(AgentMessage::Volumes { volumes: report })
}

/// Listens on the agent-to-agent port (in the node's namespace: other nodes dial it).
async fn serve_mesh(
    proxy: Arc<crate::proxy::Proxy>,
    port: u16,
    serving: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => {
            tracing::info!(port, "agent-to-agent port listening");
            serving.push(tokio::spawn(proxy.serve_mesh(l)));
        }
        Err(e) => {
            tracing::error!(port, error = %e, "cannot listen on the agent-to-agent port: other nodes cannot reach this node's instances by name (--mesh-port)")
        }
    }
}

/// Makes the namespace of the workload addresses and starts the containers' resolver
/// in it; the namespace and what containers should be told, or `None` (then they keep
/// Docker's resolver, and names do not resolve in them: said loudly).
async fn serve_names(
    routes: &crate::routes::Routes,
    serving: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<(Arc<crate::proxy::Namespace>, crate::runtime::Dns)> {
    let table = routes.current();
    let ns = match crate::proxy::Namespace::create(table.range).await {
        Ok(ns) => Arc::new(ns),
        Err(e) => {
            tracing::error!(error = %e, "WORKLOAD NAMES WILL NOT RESOLVE in this node's containers");
            return None;
        }
    };
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (upstream, mut search) = crate::dns::host_resolvers(&resolv, &table);
    let server = table.range.resolver();
    match crate::dns::serve(&ns, server, routes.clone(), upstream).await {
        Ok(task) => {
            serving.push(task);
            search.insert(0, bramble_api::endpoints::DOMAIN.to_string());
            search.dedup();
            Some((ns, crate::runtime::Dns { server, search }))
        }
        Err(e) => {
            tracing::error!(address = %server, error = %e, "cannot start the containers' resolver: WORKLOAD NAMES WILL NOT RESOLVE in this node's containers");
            None
        }
    }
}

/// Without `--controller`: finds the controllers of the cluster over mDNS and keeps a
/// link to each ([`dial_loop`]), as with a list of URLs; looks again every
/// [`REDISCOVER`] for controllers added or moved, and drops the link to one unseen for
/// [`DROP_UNSEEN_AFTER`]. Runs until aborted (its links with
/// it: a `JoinSet` aborts its tasks when dropped).
async fn discovering(shared: Arc<Shared>) {
    let mut seen: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut handles: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let mut set = tokio::task::JoinSet::new();
    let mut retry = Retry::new(REDIAL);
    loop {
        // Quick while no controller is known (a new node joins fast), thorough after.
        let settle = if handles.is_empty() {
            crate::discovery::SETTLE
        } else {
            crate::discovery::SETTLE_THOROUGH
        };
        match discover(&shared.cfg, &shared.token, settle).await {
            Ok(found) => {
                retry = Retry::new(REDIAL);
                let (add, drop) = rediscovered(&mut seen, &found, tokio::time::Instant::now());
                for url in drop {
                    tracing::info!(controller = %url, "no longer advertised; dropping its link");
                    if let Some(h) = handles.remove(&url) {
                        h.abort();
                    }
                }
                for url in add {
                    tracing::info!(controller = %url, "found over mDNS; linking");
                    let h = set.spawn(dial_loop(Arc::clone(&shared), url.clone()));
                    handles.insert(url, h);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no controller found over mDNS; looking again");
            }
        }
        // Reap aborted links so the set does not grow.
        while set.try_join_next().is_some() {}
        // Soon again while no link reaches the leader (only followers answered so far,
        // or none): the leader's link is the one that brings tasks.
        let wait = if handles.is_empty() || !leader_linked(&shared) {
            retry.failed()
        } else {
            REDISCOVER
        };
        tokio::time::sleep(wait).await;
    }
}

/// Whether a link to the leader is up: the leader's link holds the reports lock for as
/// long as it lasts.
fn leader_linked(shared: &Shared) -> bool {
    shared.reports.try_lock().is_err()
}

/// After a search at `now` that found `found`, with `seen` when each known controller
/// was last found: the URLs to link to (new ones, now known) and the ones to drop
/// (unseen for [`DROP_UNSEEN_AFTER`], now forgotten). An empty search drops nothing:
/// mDNS itself failed, not every controller at once.
fn rediscovered(
    seen: &mut BTreeMap<String, tokio::time::Instant>,
    found: &[String],
    now: tokio::time::Instant,
) -> (Vec<String>, Vec<String>) {
    let mut add = Vec::new();
    for url in found {
        if seen.insert(url.clone(), now).is_none() {
            add.push(url.clone());
        }
    }
    let mut drop = Vec::new();
    if !found.is_empty() {
        seen.retain(|url, last| {
            let keep = now.saturating_duration_since(*last) < DROP_UNSEEN_AFTER;
            if !keep {
                drop.push(url.clone());
            }
            keep
        });
    }
    (add, drop)
}

/// Keeps one link to `url` up, dialling again with back-off whenever it ends. Runs
/// until aborted.
async fn dial_loop(shared: Arc<Shared>, url: String) {
    let mut redial = Retry::new(REDIAL);
    // The node's own credential first; the join token only when the controller does not
    // know it (a new node, or one an operator deleted).
    let mut use_join = false;
    loop {
        let auth = if use_join {
            Auth::Join(&shared.token.secret)
        } else {
            Auth::Node
        };
        let mut welcomed = false;
        let result = session_at(&shared, auth, &url, &mut welcomed).await;
        if matches!(result, Err(SessionError::Unauthorized(_))) && !use_join {
            // Not known by its credential: join (once) with the join token.
            tracing::info!(
                "the controller does not know this node's credential; joining with the join token"
            );
            use_join = true;
            continue;
        }
        if welcomed {
            use_join = false;
        }
        let refused = matches!(
            result,
            Err(SessionError::Unauthorized(_)
                | SessionError::Refused { .. }
                | SessionError::Untrusted(_))
        );
        let delay = next_redial(&mut redial, welcomed, refused);
        let controller = url.as_str();
        match result {
            Ok(()) => {}
            Err(e) if refused => {
                tracing::error!(controller, error = %e, retry_in = ?delay, "controller refused the agent; retrying");
            }
            Err(e) => {
                tracing::warn!(controller, error = %e, retry_in = ?delay, "controller link down; containers keep running")
            }
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % REDIAL_JITTER_MS);
        tokio::time::sleep(delay + jitter).await;
    }
}

/// The wait before the next dial, after a session that ended (`welcomed`: the
/// controller had welcomed it; `refused`: the controller refused the agent). Without
/// jitter; pure, so the schedule is tested.
fn next_redial(redial: &mut Retry, welcomed: bool, refused: bool) -> Duration {
    if welcomed {
        *redial = Retry::new(REDIAL);
    }
    if refused {
        *redial = Retry::new(REFUSED);
    }
    redial.failed()
}

/// One mDNS search for the controllers of this cluster; their agent URLs.
async fn discover(
    cfg: &Config,
    token: &JoinToken,
    settle: Duration,
) -> Result<Vec<String>, SessionError> {
    tracing::info!("no --controller given; looking for one over mDNS (_bramble._tcp.local.)");
    let found = crate::discovery::discover(
        DISCOVERY_TIMEOUT,
        settle,
        &cfg.mdns_interfaces,
        token.ca.as_str(),
    )
    .await
    .map_err(|e| SessionError::Connect(crate::runtime::error_chain(&e)))?;
    found
        .iter()
        .map(|u| agent_url(u).map_err(|e| SessionError::Connect(e.to_string())))
        .collect()
}

/// How a session authenticates.
#[derive(Debug, Clone, Copy)]
enum Auth<'a> {
    /// With the node's own credential.
    Node,
    /// With the join token's secret (a first join).
    Join(&'a str),
}

/// Opens TLS to the controller, verified against the cluster CA before anything is
/// sent, and upgrades it to the agent WebSocket with `bearer`.
async fn dial(
    tls: &std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    url: &str,
    bearer: &str,
    standby: bool,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        std::net::IpAddr,
    ),
    SessionError,
> {
    let (host, port) = host_port(url)
        .ok_or_else(|| SessionError::Connect(format!("cannot read host and port of {url}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| SessionError::Connect(format!("{host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    // The address this node reaches the controller from: the one its LAN knows it by,
    // where other agents reach its agent-to-agent port.
    let local_ip = tcp
        .local_addr()
        .map_err(|e| SessionError::Connect(format!("{host}:{port}: {e}")))?
        .ip();
    let name = ServerName::try_from(host.clone())
        .map_err(|e| SessionError::Connect(format!("{host}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| SessionError::Untrusted(format!("{url}: {e}")))?;
    let mut req = url
        .into_client_request()
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {bearer}")).map_err(|_| {
        SessionError::Connect("the credential has characters not allowed in a header".into())
    })?;
    req.headers_mut().insert("authorization", auth);
    if standby {
        req.headers_mut()
            .insert("x-bramble-standby", HeaderValue::from_static("1"));
    }
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_FRAME_BYTES);
    config.max_frame_size = Some(MAX_FRAME_BYTES);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401 => {
                SessionError::Unauthorized("credential")
            }
            e => SessionError::Connect(e.to_string()),
        })?;
    Ok((ws, local_ip))
}

/// One session with the controller at `url`: dial, Hello, Welcome, then serve it as the
/// leader's link or as a follower's standby link, as the controller's Welcome says.
async fn session_at(
    shared: &Shared,
    auth: Auth<'_>,
    url: &str,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let url = url.to_string();
    let bearer = match auth {
        Auth::Node => shared.credential.as_str(),
        Auth::Join(secret) => secret,
    };
    let ws = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        dial(&shared.tls, &url, bearer, shared.standby),
    )
    .await
    .map_err(|_| {
        SessionError::Connect(format!(
            "no answer within {}",
            ApiDuration::from(HANDSHAKE_TIMEOUT)
        ))
    })?
    .map_err(|e| match (e, auth) {
        (SessionError::Unauthorized(_), Auth::Join(_)) => {
            SessionError::Unauthorized("join token; check --join-token")
        }
        (e, _) => e,
    })?;
    let (ws, local_ip) = ws;
    let (mut sink, mut stream) = ws.split();

    // Reports queued while no leader's link held them are superseded by the Hello.
    // Sessions that start together take the lock in turn (a standby session gives it
    // up at its Welcome), so the one the leader welcomes holds it; only a lock held on
    // (by a current leader's link) is given up on after a moment.
    let mut reports = tokio::time::timeout(REPORTS_LOCK_WAIT, shared.reports.lock())
        .await
        .ok();
    if let Some(r) = reports.as_mut() {
        while r.try_recv().is_ok() {}
    }
    let tasks = shared.observer.observe().await?;
    let mut node = shared.info.clone();
    node.mesh = shared
        .mesh
        .as_ref()
        .map(|(_, port)| std::net::SocketAddr::new(local_ip, *port).to_string());
    let hello = AgentMessage::Hello {
        csr: shared.mesh.as_ref().map(|(m, _)| m.csr().to_string()),
        node,
        tasks,
        credential: Some(bramble_api::token::Secret(shared.credential.clone())),
        standby: shared.standby,
        // The supervisor starts a run sent ahead of its slot at the slot.
        not_before: true,
        // `Routes::apply` patches the table this link sent last.
        endpoint_changes: true,
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.send(Message::text(frame(hello))))
        .await
        .map_err(|_| SessionError::Lost("the hello could not be sent".into()))?
        .map_err(|e| SessionError::Lost(e.to_string()))?;

    let (heartbeat, fence, standby) = loop {
        let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.next())
            .await
            .map_err(|_| SessionError::Lost("no welcome within 10s".into()))?;
        match frame {
            Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str()) {
                Ok(ControllerMessage::Welcome {
                    heartbeat_ms,
                    fence_ms,
                    standby,
                    certificate,
                    ca,
                    ..
                }) => {
                    if let (Some((mesh, _)), Some(cert), Some(ca)) = (&shared.mesh, certificate, ca)
                    {
                        if let Err(e) = mesh.install(&cert, &ca) {
                            tracing::error!(error = %e, "cannot use the agent-to-agent certificate the controller sent");
                        }
                    }
                    // Used as given, even if tiny: a longer fence than the controller
                    // assumes would break its failover timing (see `fence`).
                    break (
                        Duration::from_millis(heartbeat_ms.max(100)),
                        Duration::from_millis(fence_ms),
                        standby,
                    );
                }
                Ok(ControllerMessage::Error { code, message }) => {
                    return Err(SessionError::Refused { code, message })
                }
                Ok(other) => tracing::debug!(?other, "ignoring message before welcome"),
                Err(e) => return Err(SessionError::Lost(e.to_string())),
            },
            Some(Ok(Message::Close(_))) | None => {
                return Err(SessionError::Lost("closed before welcome".into()))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(SessionError::Lost(e.to_string())),
        }
    };
    *welcomed = true;
    if standby {
        drop(reports);
        return standby_link(shared, &url, sink, stream, heartbeat, fence).await;
    }
    let Some(mut out_rx) = reports else {
        return Err(SessionError::Lost(
            "another controller's leader link still holds the task reports; dialling again".into(),
        ));
    };
    let contact = &shared.contact;
    let session = fence::lock(contact).welcomed(fence::now(), fence);
    let info = &shared.info;
    tracing::info!(node = %info.name, controller = %url, session, fence_ms = fence.as_millis(), "connected to the leader");

    let (log_tx, mut log_rx) = mpsc::channel::<AgentMessage>(256);
    let mut logs: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut execs: HashMap<u64, crate::exec::Session> = HashMap::new();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(fence::CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A send that blocks this long means the link is gone (a full socket buffer).
    let send_timeout = fence.max(fence::CHECK_EVERY);
    let mut sampled: Option<(std::time::Instant, bramble_api::wire::NodeMetrics)> = None;
    // The last frame of this link (others may vouch meanwhile: this link's own
    // silence is what tells that its controller is gone).
    let mut last = fence::now();
    let mut volumes_rx = shared.volumes.subscribe();
    volumes_rx.mark_changed();
    let mut volumes_tick = tokio::time::interval(VOLUMES_EVERY);
    volumes_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut volumes_sent = None;
    let result = loop {
        let outgoing = tokio::select! {
            Ok(()) = volumes_rx.changed() => match volumes_report(&shared.volumes, &mut volumes_sent).await {
                Some(m) => m,
                None => continue,
            },
            _ = volumes_tick.tick() => match volumes_report(&shared.volumes, &mut volumes_sent).await {
                Some(m) => m,
                None => continue,
            },
            _ = ticker.tick() => {
                // Heartbeats are frequent (fast failover); measuring is not: a Pi's CPU
                // is for its tasks, and the dashboard draws 10-second points.
                if metrics_due(sampled.as_ref().map(|(at, _)| at.elapsed()), heartbeat) {
                    let m = shared.metrics.lock().unwrap_or_else(|p| p.into_inner()).sample();
                    sampled = Some((std::time::Instant::now(), m));
                }
                let m = sampled.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
                AgentMessage::Heartbeat { metrics: m }
            }
            _ = check.tick() => {
                let c = fence::lock(contact);
                if c.must_redial(session, last, fence::now()) {
                    let why = if c.is_fenced() {
                        "the node is fenced; dialling again for a fresh task set".to_string()
                    } else {
                        format!("no word from the leader for {}", ApiDuration::from(c.fence()))
                    };
                    break Err(SessionError::Lost(why));
                }
                continue;
            }
            Some(m) = out_rx.recv() => m,
            Some(m) = log_rx.recv() => m,
            frame = stream.next() => {
                if let Some(Ok(_)) = &frame {
                    // Pings count too: tungstenite answers them, but they still show up here.
                    let now = fence::now();
                    last = now;
                    fence::lock(contact).heard(now);
                }
                match frame {
                    Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str()) {
                        Ok(ControllerMessage::Assign { revision, tasks, standby, epochs }) => {
                            tracing::debug!(revision, tasks = tasks.len(), "task set received");
                            let admitted = shared.epochs.lock().unwrap_or_else(|p| p.into_inner()).admit(&tasks);
                            if let Err(stale) = admitted {
                                for s in stale {
                                    tracing::error!(wallet = %s.workload, epoch = s.epoch, seen = s.seen, revision, "refusing a task set with a Wallet placement older than one this node has seen (a leader that lost the lead?); keeping the current one. If the cluster's store was rebuilt, remove wallet-epochs.json from the agent's data dir");
                                }
                                continue;
                            }
                            shared.duties.set(standby);
                            let here: std::collections::BTreeSet<String> = tasks.iter().map(|a| a.workload.clone()).collect();
                            shared.volumes.set_aside_stale(&epochs, &here);
                            let wallets = tasks.iter().filter(|a| a.kind == Kind::Wallet).count();
                            let count = tasks.len();
                            // Decided and published under the contact lock, as the fence
                            // watcher does, so the two never disagree.
                            let unfenced = {
                                let mut c = fence::lock(contact);
                                let unfenced = c.assigned(session);
                                shared.desired_tx.send_modify(|d| {
                                    d.tasks = Some(tasks);
                                    if unfenced {
                                        d.fenced = false;
                                    }
                                });
                                unfenced
                            };
                            if unfenced {
                                tracing::warn!(session, revision, tasks = count, wallets, "wallets unfenced: the controller sent a fresh task set");
                            }
                        }
                        Ok(ControllerMessage::Logs { request, task, follow, tail }) => {
                            logs.retain(|_, h| !h.is_finished());
                            let name = container_name(&info.name, &task);
                            let h = tokio::spawn(stream_logs(shared.runtime.clone(), request, task, name, follow, tail, log_tx.clone()));
                            logs.insert(request, h);
                        }
                        Ok(ControllerMessage::CancelLogs { request }) => {
                            if let Some(h) = logs.remove(&request) {
                                h.abort();
                            }
                        }
                        Ok(ControllerMessage::Exec { request, task, command, tty, stdin, size }) => {
                            execs.retain(|_, s| !s.task.is_finished());
                            let container = container_name(&info.name, &task);
                            let req = crate::exec::Request { request, container, task, command, tty, stdin, size };
                            execs.insert(request, crate::exec::start(shared.runtime.clone(), req, log_tx.clone()));
                        }
                        Ok(ControllerMessage::ExecInput { request, data, eof }) => {
                            if let Some(s) = execs.get(&request) {
                                use base64::Engine as _;
                                match base64::engine::general_purpose::STANDARD.decode(data.as_bytes()) {
                                    Ok(bytes) if !bytes.is_empty() => {
                                        let _ = s.input.try_send(crate::exec::Input::Data(bytes));
                                    }
                                    Ok(_) => {}
                                    Err(e) => tracing::warn!(request, error = %e, "exec input is not base64; dropped"),
                                }
                                if eof {
                                    let _ = s.input.try_send(crate::exec::Input::Eof);
                                }
                            }
                        }
                        Ok(ControllerMessage::ExecResize { request, size }) => {
                            if let Some(s) = execs.get(&request) {
                                let _ = s.input.try_send(crate::exec::Input::Resize(size));
                            }
                        }
                        Ok(ControllerMessage::CancelExec { request }) => {
                            if let Some(s) = execs.remove(&request) {
                                s.task.abort();
                            }
                        }
                        Ok(ControllerMessage::Error { code, message }) => tracing::warn!(code = %code, message = %message, "controller reported an error"),
                        Ok(ControllerMessage::Welcome { .. } | ControllerMessage::Vouch) => {}
                        Ok(ControllerMessage::Endpoints { revision, table }) => shared.routes.update(revision, table),
                        // A link's first table is whole, so the current one is what it sent last.
                        Ok(ControllerMessage::EndpointChanges { revision, changes }) => shared.routes.apply(revision, changes),
                        Err(e) => tracing::warn!(error = %e, "ignoring a frame the agent does not understand"),
                    },
                    Some(Ok(Message::Close(_))) | None => break Err(SessionError::Lost("closed by the controller".into())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(SessionError::Lost(e.to_string())),
                }
                continue;
            }
        };
        match tokio::time::timeout(send_timeout, sink.send(Message::text(frame(outgoing)))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Err(SessionError::Lost(e.to_string())),
            Err(_) => {
                break Err(SessionError::Lost(format!(
                    "a send blocked for {}",
                    ApiDuration::from(send_timeout)
                )))
            }
        }
    };
    for (_, h) in logs {
        h.abort();
    }
    for (_, s) in execs {
        s.task.abort();
    }
    result
}

/// A follower's standby link: heartbeats out, and only its Vouch frames count against
/// the fence (its Welcome and pings show the link is up, nothing more). No task set
/// comes on it and no report goes. Ends when the follower closes it (it became the
/// leader, or the agent went silent to it) or is silent for the fence timeout.
async fn standby_link<S, R>(
    shared: &Shared,
    url: &str,
    mut sink: S,
    mut stream: R,
    heartbeat: Duration,
    fence: Duration,
) -> Result<(), SessionError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tracing::info!(controller = %url, "standby link to a follower: it vouches for this node while the leader is out of reach");
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(fence::CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = frame(AgentMessage::Heartbeat {
        metrics: bramble_api::wire::NodeMetrics::default(),
    });
    let mut last = fence::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                match tokio::time::timeout(fence, sink.send(Message::text(beat.clone()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(SessionError::Lost(e.to_string())),
                    Err(_) => return Err(SessionError::Lost("a send to the follower blocked".into())),
                }
            }
            _ = check.tick() => {
                if fence::fenced(last, fence::now(), fence) {
                    return Err(SessionError::Lost(format!(
                        "no word from the follower for {}",
                        ApiDuration::from(fence)
                    )));
                }
            }
            frame = stream.next() => {
                if let Some(Ok(_)) = &frame {
                    last = fence::now();
                }
                match frame {
                    Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str()) {
                        Ok(ControllerMessage::Vouch) => fence::lock(&shared.contact).heard(last),
                        Ok(ControllerMessage::Error { code, message }) => {
                            tracing::warn!(controller = %url, code = %code, message = %message, "follower reported an error");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "ignoring a frame the agent does not understand"),
                    },
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(SessionError::Lost("closed by the follower".into()))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(SessionError::Lost(e.to_string())),
                }
            }
        }
    }
}

/// A message as a frame, cut to the wire's limits first (see [`wire`]'s Limits): what
/// this node measures or is told by Docker may be odd (a many-core machine, a long error
/// text), and the controller refuses a message beyond a limit as a whole.
fn frame(mut msg: AgentMessage) -> String {
    // Said once loudly: a machine that needs it once (many cores) needs it every beat.
    static WARNED: AtomicBool = AtomicBool::new(false);
    if msg.cap() {
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                kind = msg_kind(&msg),
                "a message was cut to the wire's limits"
            );
        } else {
            tracing::warn!(
                kind = msg_kind(&msg),
                "a message was cut to the wire's limits"
            );
        }
    }
    wire::encode(&msg)
}

fn msg_kind(msg: &AgentMessage) -> &'static str {
    match msg {
        AgentMessage::Hello { .. } => "hello",
        AgentMessage::Heartbeat { .. } => "heartbeat",
        AgentMessage::Status { .. } => "status",
        AgentMessage::Removed { .. } => "removed",
        AgentMessage::Volumes { .. } => "volumes",
        AgentMessage::LogData { .. } => "logData",
        AgentMessage::LogEnd { .. } => "logEnd",
        AgentMessage::ExecData { .. } => "execData",
        AgentMessage::ExecEnd { .. } => "execEnd",
    }
}

/// Streams a task's container logs back to the controller.
#[allow(clippy::too_many_arguments)]
async fn stream_logs(
    runtime: Runtime,
    request: u64,
    task: String,
    container: String,
    follow: bool,
    tail: Option<u32>,
    tx: mpsc::Sender<AgentMessage>,
) {
    let error = match runtime.logs(&container, follow, tail).await {
        Ok(stream) => {
            let mut stream = std::pin::pin!(stream);
            let mut error = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(data) => {
                        if tx
                            .send(AgentMessage::LogData { request, data })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            error
        }
        Err(e) => Some(format!("cannot read logs of task {task}: {e}")),
    };
    let _ = tx.send(AgentMessage::LogEnd { request, error }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heartbeats (numbered from 0) that measure, over `beats` heartbeats exactly
    /// `heartbeat` apart, each measurement taking `cost` before its instant is taken.
    fn measuring_beats(heartbeat: Duration, cost: Duration, beats: u32) -> Vec<u32> {
        let mut last: Option<Duration> = None;
        let mut out = Vec::new();
        for n in 0..beats {
            let now = heartbeat * n;
            if metrics_due(last.map(|at| now.saturating_sub(at)), heartbeat) {
                last = Some(now + cost);
                out.push(n);
            }
        }
        out
    }

    #[test]
    fn a_node_is_measured_about_once_a_second_whatever_its_heartbeat() {
        let ms = Duration::from_millis;
        for cost in [ms(0), ms(3), ms(40)] {
            // At 1 Hz every heartbeat measures, though the last measurement's instant
            // was taken a little after the previous tick.
            assert_eq!(
                measuring_beats(ms(1000), cost, 5),
                [0, 1, 2, 3, 4],
                "{cost:?}"
            );
            assert_eq!(measuring_beats(ms(250), cost, 9), [0, 4, 8], "{cost:?}");
            assert_eq!(measuring_beats(ms(333), cost, 7), [0, 3, 6], "{cost:?}");
            assert_eq!(measuring_beats(ms(500), cost, 5), [0, 2, 4], "{cost:?}");
            // Slower heartbeats than a second measure each time.
            assert_eq!(measuring_beats(ms(3000), cost, 3), [0, 1, 2], "{cost:?}");
            // Between the two, the measurement nearest a second apart.
            assert_eq!(measuring_beats(ms(450), cost, 7), [0, 2, 4, 6], "{cost:?}");
            assert_eq!(measuring_beats(ms(700), cost, 4), [0, 1, 2, 3], "{cost:?}");
        }
        // Never closer than half a second, nor further than 1.5 s, apart.
        for hb in (50..=1500).step_by(10).map(ms) {
            let beats = measuring_beats(hb, ms(3), 100);
            for pair in beats.windows(2) {
                let gap = hb * (pair[1] - pair[0]);
                assert!(gap >= METRICS_EVERY / 2 || gap == hb, "{hb:?}: {gap:?}");
                assert!(gap <= METRICS_EVERY * 3 / 2, "{hb:?}: {gap:?}");
            }
        }
    }

    #[test]
    fn controllers_found_over_mdns_are_linked_once_and_dropped_when_unseen_for_90s() {
        let urls = |v: &[&str]| v.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut seen = BTreeMap::new();
        // First search: both linked. Found again: nothing new. A third: linked.
        assert_eq!(
            rediscovered(&mut seen, &urls(&["a", "b"]), at(0)),
            (urls(&["a", "b"]), vec![])
        );
        assert_eq!(
            rediscovered(&mut seen, &urls(&["b", "a"]), at(1)),
            (vec![], vec![])
        );
        assert_eq!(
            rediscovered(&mut seen, &urls(&["a", "b", "c"]), at(2)),
            (urls(&["c"]), vec![])
        );
        // Searches that each see only some controllers cut no link.
        for s in 3..60 {
            let some = if s % 2 == 0 { ["a", "b"] } else { ["a", "c"] };
            assert_eq!(
                rediscovered(&mut seen, &urls(&some), at(s)),
                (vec![], vec![])
            );
        }
        // An empty search is mDNS failing: it counts for nothing, however late.
        assert_eq!(rediscovered(&mut seen, &[], at(500)), (vec![], vec![]));
        // c unseen since 59 s: still kept at 148 s, dropped at 149 s; found again
        // later, linked again.
        assert_eq!(
            rediscovered(&mut seen, &urls(&["a", "b"]), at(148)),
            (vec![], vec![])
        );
        assert_eq!(
            rediscovered(&mut seen, &urls(&["a", "b"]), at(149)),
            (vec![], urls(&["c"]))
        );
        assert_eq!(
            rediscovered(&mut seen, &urls(&["a", "b", "c"]), at(150)),
            (urls(&["c"]), vec![])
        );
    }

    #[test]
    fn redials_back_off_to_5s_start_over_after_a_welcome_and_stay_slow_after_a_refusal() {
        let ms = Duration::from_millis;
        let mut r = Retry::new(REDIAL);
        let waits: Vec<Duration> = (0..7).map(|_| next_redial(&mut r, false, false)).collect();
        assert_eq!(
            waits,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(next_redial(&mut r, true, false), ms(200), "a working link");
        assert_eq!(next_redial(&mut r, false, false), ms(400));
        assert_eq!(next_redial(&mut r, false, true), MAX_REDIAL, "refused");
        assert_eq!(
            next_redial(&mut r, false, false),
            MAX_REDIAL,
            "slow until a session is welcomed"
        );
        assert_eq!(next_redial(&mut r, true, false), ms(200));
    }

    #[test]
    fn the_redial_schedule_is_the_one_the_link_had_before_the_shared_backoff() {
        // The link's own arithmetic before it used `Backoff`: reset on a welcome, jump to
        // the cap on a refusal, wait, then double up to the cap.
        fn before(delay: &mut Duration, welcomed: bool, refused: bool) -> Duration {
            if welcomed {
                *delay = Duration::from_millis(200);
            }
            if refused {
                *delay = MAX_REDIAL;
            }
            let wait = *delay;
            *delay = (*delay * 2).min(MAX_REDIAL);
            wait
        }
        // Every sequence of 8 session endings (of 4 kinds) gives the same waits.
        for n in 0..4u32.pow(8) {
            let mut old = Duration::from_millis(200);
            let mut new = Retry::new(REDIAL);
            for i in 0..8 {
                let kind = (n >> (2 * i)) & 3;
                let (welcomed, refused) = (kind & 1 == 1, kind & 2 == 2);
                assert_eq!(
                    next_redial(&mut new, welcomed, refused),
                    before(&mut old, welcomed, refused),
                    "sequence {n:#x}, step {i}"
                );
            }
        }
    }

    #[test]
    fn what_the_agent_sends_is_cut_to_the_limits_the_controller_checks() {
        // A machine with more cores than a heartbeat may carry, and a long Docker error.
        let beat = AgentMessage::Heartbeat {
            metrics: wire::NodeMetrics {
                cores_percent: Some(vec![1.5; 300]),
                ..Default::default()
            },
        };
        let status = AgentMessage::Status {
            status: wire::TaskStatus {
                message: Some("cannot create container: ".repeat(1000)),
                ..wire::TaskStatus::new("web-0123ab-0", bramble_api::task::TaskPhase::Starting)
            },
        };
        for msg in [beat, status] {
            assert!(msg.validate().is_err(), "over a limit before");
            let text = frame(msg);
            assert!(wire::decode_agent(&text).is_ok(), "{}", &text[..100]);
        }
        assert!(crate::host::MEMORY_LIMITS_WARNING.len() <= wire::MAX_WARNING_BYTES);
    }

    #[test]
    fn controller_urls_are_tls_only() {
        let ok = |u: &str| agent_url(u).expect("valid");
        assert_eq!(ok("https://10.0.0.1:7878"), "wss://10.0.0.1:7878/v1/agent");
        assert_eq!(
            ok("https://pi1.local:7878/"),
            "wss://pi1.local:7878/v1/agent"
        );
        assert_eq!(ok("127.0.0.1:7878"), "wss://127.0.0.1:7878/v1/agent");
        assert_eq!(ok("wss://pi1:7878//"), "wss://pi1:7878/v1/agent");
        for plain in ["http://10.0.0.1:7878", "ws://pi1:7878"] {
            let e = agent_url(plain).expect_err("plain");
            assert!(
                e.to_string().contains("plain HTTP is refused")
                    || format!("{e:?}").contains("plain HTTP is refused"),
                "{e:?}"
            );
        }
        for bad in [
            "ftp://x",
            "https://",
            "https:///",
            "wss://",
            "https://a b",
            "https://a/b",
            "",
        ] {
            assert!(agent_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            host_port("wss://[::1]:7878/v1/agent"),
            Some(("::1".into(), 7878))
        );
        assert_eq!(host_port("wss://pi1/v1/agent"), Some(("pi1".into(), 443)));
    }

    #[test]
    fn several_controllers_are_tried_in_order_each_once() {
        assert_eq!(
            agent_urls("https://c1:7878, https://c2:7878,https://c1:7878/").expect("valid"),
            ["wss://c1:7878/v1/agent", "wss://c2:7878/v1/agent"]
        );
        for bad in [
            "https://c1:7878,",
            ",https://c1:7878",
            "https://c1:7878,,https://c2:7878",
        ] {
            let e = agent_urls(bad).expect_err(bad).to_string();
            assert!(e.contains("empty URL"), "{e}");
        }
        let e = agent_urls("https://c1:7878,http://c2:7878")
            .expect_err("one plain")
            .to_string();
        assert!(e.contains("http://c2:7878"), "{e}");
    }
}
