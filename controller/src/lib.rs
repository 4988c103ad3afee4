//! The Bramble controller: stores the desired state (workloads), turns it into tasks,
//! places them on nodes and keeps every agent's task set current.
//!
//! # Layout
//! - [`http`]: the REST API under `/v1` and its error type.
//! - [`hub`]: the `/v1/agent` WebSocket, one per node.
//! - [`cluster`]: shared state and the operations on it.
//! - [`reconcile`]: the pure decision from workloads and tasks to task writes.
//! - [`scheduler`]: the pure placement of tasks on nodes.
//! - [`cron`]: the pure CronJob decisions: due and missed slots, firing keys, concurrency, history, retries.
//! - [`cronjobs`]: fires CronJob slots exactly once; retries and prunes runs.
//! - [`nodes`]: node health, in memory only, and the Wallet fencing timing argument.
//! - [`events`]: the bounded event log.
//! - [`model`]: what is stored under which key.
//! - [`store`]: the key-value store with revisions and compare-and-swap (SQLite).
//! - [`auth`]: admin, join and viewer tokens, and who may do what.
//! - [`mdns`]: the `_bramble._tcp.local.` advertisement agents find the controller by.
//! - [`history`]: an hour of node CPU, RAM and temperature in ring buffers (memory only).
//! - [`dashboard`]: the web dashboard at `/` (embedded assets) and its views.
//! - [`feed`]: `GET /v1/stream`, the dashboard's live Server-Sent Events.
//! - [`telemetry`]: `/metrics` in the Prometheus text format; REST latency.
//! - [`webhooks`]: event notifications POSTed to `webhooks.yaml` receivers, signed.
//! - [`actions`]: operator actions (restart a workload).

pub mod actions;
pub mod auth;
pub mod cluster;
pub mod cron;
pub mod cronjobs;
pub mod dashboard;
pub mod events;
pub mod feed;
pub mod history;
pub mod http;
pub mod hub;
pub mod mdns;
pub mod model;
pub mod nodes;
pub mod reconcile;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod webhooks;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::{TokenFiles, Tokens};
use crate::cluster::Cluster;
use crate::nodes::{HealthConfig, Nodes};

/// What can stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error("store")]
    Store(#[from] store::Error),
    /// A stored value does not decode.
    #[error(transparent)]
    Decode(#[from] model::DecodeError),
    /// Token files.
    #[error("tokens")]
    Tokens(#[from] auth::TokenError),
    /// The data directory cannot be created.
    #[error("data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    /// `webhooks.yaml` is unusable.
    #[error("webhooks")]
    Webhooks(#[from] webhooks::ConfigError),
}

/// The controller's configuration (see `main.rs` for flags and defaults).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the store and tokens live.
    pub data_dir: PathBuf,
    /// Admin token to use instead of the stored or generated one.
    pub admin_token: Option<String>,
    /// Join token to use instead of the stored or generated one.
    pub join_token: Option<String>,
    /// Viewer (read-only) token to use instead of the stored or generated one.
    pub viewer_token: Option<String>,
    /// Run an agent for this machine in the same process.
    pub local_agent: Option<LocalAgent>,
    /// Heartbeat and node-loss timings.
    pub health: HealthConfig,
    /// Full reconcile at least this often, whatever happens.
    pub resync: Duration,
    /// Advertise over mDNS; `None` turns it off.
    pub mdns: Option<Mdns>,
}

/// mDNS advertisement settings.
#[derive(Debug, Clone, Default)]
pub struct Mdns {
    /// Instance name (the host name).
    pub instance: String,
    /// Network interfaces to advertise on; empty means all.
    pub interfaces: Vec<String>,
    /// Base URL to put in the TXT record, when the addresses alone are not enough
    /// (NAT, a reverse proxy).
    pub url: Option<String>,
}

/// The embedded agent's settings.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    /// Node name.
    pub node_name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
}

/// An opened controller: store and tokens ready, not yet serving.
pub struct Controller {
    cfg: Config,
    cluster: Arc<Cluster>,
    files: TokenFiles,
}

impl Controller {
    /// Creates the data directory, opens the store and loads or creates the tokens.
    pub fn open(cfg: Config) -> Result<Controller, Error> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| Error::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let store = store::sqlite::SqliteStore::open(&cfg.data_dir.join("bramble.db"))?;
        let (tokens, files) = Tokens::load_with_viewer(
            &cfg.data_dir,
            cfg.admin_token.clone(),
            cfg.join_token.clone(),
            cfg.viewer_token.clone(),
        )?;
        let cluster = Arc::new(Cluster::new(
            Arc::new(store),
            Nodes::new(cfg.health),
            tokens,
        )?);
        cluster.webhooks.configure(webhooks::load(&cfg.data_dir)?);
        Ok(Controller {
            cfg,
            cluster,
            files,
        })
    }

    /// Where the tokens are kept.
    pub fn token_files(&self) -> &TokenFiles {
        &self.files
    }

    /// The shared state (for tests and benchmarks).
    pub fn cluster(&self) -> Arc<Cluster> {
        self.cluster.clone()
    }

    /// Serves the API on `listener` and runs the loops until `shutdown` completes. On
    /// shutdown the local agent leaves its containers running.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let crons = tokio::spawn(cronjobs::run(self.cluster.clone(), stop_rx.clone()));
        let reconciler = tokio::spawn(reconcile_loop(
            self.cluster.clone(),
            self.cfg.resync,
            stop_rx.clone(),
        ));
        // Both end on stop; the feed closes the dashboards' streams so the HTTP server's
        // graceful shutdown does not wait on them.
        tokio::spawn(feed::run(self.cluster.clone(), stop_rx.clone()));
        tokio::spawn(webhooks::run(self.cluster.clone(), stop_rx.clone()));

        // A failed advertisement is not fatal: agents can still be pointed at the URL.
        let _advertisement = self.cfg.mdns.as_ref().and_then(|m| {
            mdns::Advertisement::start(&m.instance, addr.port(), m.url.as_deref(), &m.interfaces)
                .map_err(|e| tracing::warn!(error = %e, "cannot advertise over mDNS; agents need --controller"))
                .ok()
        });

        let agent = match &self.cfg.local_agent {
            Some(la) => self.spawn_local_agent(la, addr, stop_rx.clone()),
            None => None,
        };

        let app =
            http::router(self.cluster.clone()).into_make_service_with_connect_info::<SocketAddr>();
        tracing::info!(addr = %addr, "controller listening");
        let mut stop_for_http = stop_rx.clone();
        let streams = self.cluster.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    () = shutdown => {}
                    _ = stop_for_http.changed() => {}
                }
                // Dashboard streams never end by themselves; graceful shutdown waits
                // for every open connection.
                streams.feed.close_all();
            })
            .await;
        let _ = stop_tx.send(true);
        if let Some(a) = agent {
            let _ = a.await;
        }
        let _ = reconciler.await;
        let _ = crons.await;
        tracing::info!("controller stopped");
        served.map_err(Error::Serve)
    }

    #[cfg(feature = "local-agent")]
    fn spawn_local_agent(
        &self,
        la: &LocalAgent,
        addr: SocketAddr,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        // The agent dials the controller like any other node, over loopback when the
        // controller listens on all addresses.
        let host = if addr.ip().is_unspecified() {
            if addr.is_ipv4() {
                "127.0.0.1".to_string()
            } else {
                "[::1]".to_string()
            }
        } else if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        let cfg = bramble_agent::Config {
            controller: Some(format!("http://{host}:{}", addr.port())),
            join_token: self.cluster.tokens.join().to_string(),
            node_name: la.node_name.clone(),
            data_dir: self.cfg.data_dir.join("agent"),
            labels: la.labels.clone(),
            mdns_interfaces: Vec::new(),
            image_gc_threshold: bramble_agent::disk::DEFAULT_THRESHOLD,
        };
        Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = bramble_agent::run(cfg, shutdown).await {
                tracing::error!(error = %e, "local agent stopped");
            }
        }))
    }

    #[cfg(not(feature = "local-agent"))]
    fn spawn_local_agent(
        &self,
        _la: &LocalAgent,
        _addr: SocketAddr,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        tracing::warn!("built without the local-agent feature; not running a local agent");
        None
    }
}

/// Reconciles on every wake-up, when a silent node crosses a health threshold, and at
/// least every `resync`; a failed pass is retried with capped, jittered back-off and
/// never ends the loop.
async fn reconcile_loop(
    c: Arc<Cluster>,
    resync: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut wake = tokio::time::Instant::now() + resync;
        if let Some(at) = c.nodes.next_change() {
            wake = wake.min(tokio::time::Instant::from_std(at));
        }
        tokio::select! {
            () = c.woken() => {}
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => return,
        }
        match c.reconcile_once() {
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                tracing::warn!(error = %e, retry_in = ?(backoff + jitter), "reconcile failed");
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Makes rustls use ring for HTTPS clients (webhooks). Idempotent; reqwest panics on a
/// client built before a provider is installed.
pub fn install_tls_provider() {
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
