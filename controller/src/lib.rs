//! The Bramble controller: stores the desired state (workloads), turns it into tasks,
//! places them on nodes and keeps every agent's task set current.
//!
//! This file is the composition root: it opens the store, starts the loops and serves;
//! it decides nothing. Imports go one way: `http` → `loops` → `state` → `core`, and
//! `state` → `store`; `core` and `store` import nothing else of the crate, and only this
//! file imports `http`.
//!
//! # Layout
//! - [`config`]: the configuration and its checks (the Wallet timing inequality).
//! - [`core`]: every decision, pure: reconcile, scheduler, cron, health, operations.
//! - [`store`]: the key-value store contract (revisions, transactions, watches, leases)
//!   and its SQLite backend.
//! - [`state`]: the only writer of the store; snapshots at one revision, kept current
//!   by a watch; node liveness and metric history in memory.
//! - [`loops`]: the reconcile and cron loops, the dashboard feed, webhooks.
//! - [`http`]: the REST API, the agent link, the dashboard, `/metrics`.
//! - [`mdns`]: the `_bramble._tcp.local.` advertisement agents find the controller by.
//! - [`files`]: owner-only files and directories (data dir, keys, tokens).
//! - [`pki`]: CAs in the data dir (the cluster CA, the etcd CA).
//! - [`member`]: the local etcd member a controller runs and supervises
//!   (`--etcd-cluster`).

pub mod config;
pub mod core;
pub mod files;
pub mod http;
pub mod loops;
pub mod mdns;
pub mod member;
pub mod pki;
pub mod state;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{Config, LocalAgent, Mdns};

use crate::http::auth::{TokenFiles, Tokens};
use crate::http::tls::{Identity, TlsError};
use crate::loops::feed::Feed;
use crate::loops::webhooks::{self, Webhooks};
use crate::state::{Solo, State};
use crate::store::Store;

/// What can stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work.
    #[error("invalid configuration")]
    Config(#[from] config::Invalid),
    /// The store failed.
    #[error("store")]
    Store(#[from] store::Error),
    /// The state could not be loaded.
    #[error("state")]
    State(#[from] state::Error),
    /// Token files.
    #[error("tokens")]
    Tokens(#[from] http::auth::TokenError),
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
    /// The TLS certificate or the CA cannot be set up.
    #[error("TLS")]
    Tls(#[from] TlsError),
    /// The key Secrets are sealed with cannot be loaded.
    #[error("Secrets key")]
    Vault(#[from] state::vault::VaultError),
    /// This controller's CA or Secrets key is not the one of the cluster in the store.
    #[error("joining the controllers of the store")]
    Identity(#[from] state::identity::Mismatch),
    /// The local etcd member cannot start.
    #[error("local etcd member")]
    Member(#[from] member::MemberError),
}

/// An opened controller: configuration checked, store and tokens ready, not yet
/// serving.
pub struct Controller {
    cfg: Config,
    store: Arc<dyn Store>,
    tokens: Tokens,
    files: TokenFiles,
    webhooks: Arc<Webhooks>,
    identity: Identity,
    vault: Arc<state::vault::Vault>,
    /// The local etcd member, when this controller runs one.
    member: Option<member::Member>,
}

impl Controller {
    /// Checks the configuration, creates the data directory, opens the store (the
    /// data dir's SQLite file, or etcd), sets up the CA and the server certificate, and
    /// loads or creates the tokens.
    pub async fn open(cfg: Config) -> Result<Controller, Error> {
        cfg.validate()?;
        files::private_dir(&cfg.data_dir).map_err(|source| Error::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        // The identity first: the first controller of a cluster makes the files the
        // others need before it waits for them (with a local etcd member, no quorum
        // exists until they run).
        let identity = Identity::load(&cfg.data_dir, &cfg.tls)?;
        let (tokens, files) = Tokens::load(
            &cfg.data_dir,
            cfg.admin_token.clone(),
            cfg.join_token.clone(),
            cfg.viewer_token.clone(),
            &identity.ca,
        )?;
        let vault = state::vault::Vault::load(&cfg.data_dir)?;
        let hooks = Webhooks::default();
        hooks.configure(webhooks::load(&cfg.data_dir)?);
        let member = match &cfg.cluster.member {
            Some(m) => Some(member::Member::start(m, &cfg.data_dir).await?),
            None => None,
        };
        let store: Arc<dyn Store> = match &cfg.cluster.etcd {
            #[cfg(feature = "etcd")]
            Some(etcd) => Arc::new(open_etcd(etcd, &cfg, member.is_some()).await?),
            #[cfg(not(feature = "etcd"))]
            Some(_) => {
                return Err(Error::Config(config::Invalid(
                    "--etcd: this controller was built without the etcd feature".into(),
                )))
            }
            None => Arc::new(store::SqliteStore::open(&cfg.data_dir.join("bramble.db"))?),
        };
        if cfg.cluster.etcd.is_some() {
            state::identity::check(store.as_ref(), &identity.ca, vault.key_id()).await?;
        }
        Ok(Controller {
            cfg,
            store,
            tokens,
            files,
            webhooks: Arc::new(hooks),
            identity,
            vault: Arc::new(vault),
            member,
        })
    }

    /// Where the state is kept (the SQLite file, or the etcd endpoints and prefix).
    pub fn store_location(&self) -> String {
        self.store.location()
    }

    /// Where the tokens are kept.
    pub fn token_files(&self) -> &TokenFiles {
        &self.files
    }

    /// The cluster CA's fingerprint (agents and `bramblectl` pin it).
    pub fn ca_fingerprint(&self) -> &bramble_api::token::Fingerprint {
        &self.identity.ca
    }

    /// The names and addresses the server certificate is for.
    pub fn certificate_names(&self) -> &[String] {
        &self.identity.names
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
        let name = match self.cfg.cluster.name.as_str() {
            "" => "controller".to_string(),
            n => n.to_string(),
        };
        let me = state::leader::LeaderRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            name: name.clone(),
            url: self
                .cfg
                .cluster
                .url
                .clone()
                .or_else(|| Some(format!("https://{name}:{}", addr.port()))),
            since: chrono::Utc::now(),
        };
        // One controller on its own file always leads; controllers sharing etcd elect one.
        let (leadership, election): (Arc<dyn state::Leadership>, _) =
            if self.cfg.cluster.etcd.is_some() {
                let (elected, task) = state::leader::Elected::start(
                    Arc::clone(&self.store),
                    me.clone(),
                    self.cfg.cluster.leader,
                    stop_rx.clone(),
                );
                (elected, Some(task))
            } else {
                (Arc::new(Solo::default()), None)
            };
        let state = State::open(Arc::clone(&self.store), self.cfg.health, leadership).await?;
        let unreadable = self.vault.unreadable(&state.snapshot());
        if !unreadable.is_empty() {
            tracing::error!(
                secrets = ?unreadable,
                key = %self.cfg.data_dir.join(state::vault::KEY_FILE).display(),
                "these Secrets were sealed with another key (the key file was lost or replaced): tasks referencing them cannot start until they are applied again"
            );
        }
        let feed = Arc::new(Feed::default());

        let loops = [
            tokio::spawn(loops::reconcile::run(
                Arc::clone(&state),
                self.cfg.resync,
                stop_rx.clone(),
            )),
            tokio::spawn(loops::cron::run(Arc::clone(&state), stop_rx.clone())),
            // Both end on stop; the feed closes the dashboards' streams so the HTTP
            // server's graceful shutdown does not wait on them.
            tokio::spawn(loops::feed::run(
                Arc::clone(&state),
                Arc::clone(&feed),
                stop_rx.clone(),
            )),
            tokio::spawn(webhooks::run(
                Arc::clone(&state),
                Arc::clone(&self.webhooks),
                stop_rx.clone(),
            )),
        ];
        // Only a controller that may follow vouches: with SQLite there is one.
        let vouching = self
            .cfg
            .cluster
            .etcd
            .is_some()
            .then(|| tokio::spawn(loops::vouch::run(Arc::clone(&state), stop_rx.clone())));

        // A failed advertisement is not fatal: agents can still be pointed at the URL.
        let _advertisement = self.cfg.mdns.as_ref().and_then(|m| {
            mdns::Advertisement::start(
                &m.instance,
                addr.port(),
                m.url.as_deref(),
                self.identity.ca.as_str(),
                &m.interfaces,
            )
                .map_err(|e| tracing::warn!(error = %e, "cannot advertise over mDNS; agents need --controller"))
                .ok()
        });

        let agent = match &self.cfg.local_agent {
            Some(la) => self.spawn_local_agent(la, addr, stop_rx.clone()),
            None => None,
        };

        let app = Arc::new(http::App {
            state,
            tokens: self.tokens.clone(),
            feed: Arc::clone(&feed),
            webhooks: Arc::clone(&self.webhooks),
            latency: Default::default(),
            viewer_logs: self.cfg.viewer_logs,
            vault: Arc::clone(&self.vault),
            links: Arc::new(tokio::sync::Semaphore::new(http::hub::MAX_AGENT_LINKS)),
            me,
            nodes: Arc::clone(&self.identity.nodes),
        });
        let router = http::router(app);
        tracing::info!(addr = %addr, ca = %self.identity.ca.short(), "controller listening (TLS)");
        http::serve::raise_file_limit();
        let mut stop_for_http = stop_rx.clone();
        let served = http::serve::serve(
            listener,
            Arc::clone(&self.identity.server),
            router,
            async move {
                tokio::select! {
                    () = shutdown => {}
                    _ = stop_for_http.changed() => {}
                }
                // Dashboard streams never end by themselves; graceful shutdown waits
                // for every open connection.
                feed.close_all();
            },
        )
        .await;
        let _ = stop_tx.send(true);
        if let Some(a) = agent {
            let _ = a.await;
        }
        for l in loops.into_iter().chain(vouching) {
            let _ = l.await;
        }
        if let Some(e) = election {
            let _ = e.await;
        }
        // Last: the election revoked its lease through it.
        if let Some(m) = self.member {
            m.stop().await;
        }
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
        // Its own controller first, then the others: any controller serves it.
        let mut controllers = vec![format!("https://{host}:{}", addr.port())];
        controllers.extend(self.cfg.cluster.peers.iter().cloned());
        let cfg = bramble_agent::Config {
            controller: Some(controllers.join(",")),
            join_token: self.tokens.join(),
            node_name: la.node_name.clone(),
            data_dir: self.cfg.data_dir.join("agent"),
            labels: la.labels.clone(),
            mdns_interfaces: Vec::new(),
            image_gc_threshold: bramble_agent::disk::DEFAULT_THRESHOLD,
            allow_host_paths: la.allow_host_paths.clone(),
            mesh_port: la.mesh_port,
            sync_rate: 4 << 20,
            cron_gate: la.cron_gate.clone(),
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

/// Opens the etcd store. With a local member, the members may not have a quorum yet
/// (the others are still being set up): it waits, saying what for, instead of exiting.
#[cfg(feature = "etcd")]
async fn open_etcd(
    etcd: &config::Etcd,
    cfg: &Config,
    local_member: bool,
) -> Result<store::EtcdStore, Error> {
    const ATTEMPT: std::time::Duration = std::time::Duration::from_secs(10);
    const PAUSE: std::time::Duration = std::time::Duration::from_secs(2);
    if !local_member {
        return Ok(store::EtcdStore::open(&etcd.endpoints, &etcd.prefix, etcd.tls.as_ref()).await?);
    }
    let began = std::time::Instant::now();
    loop {
        let attempt = tokio::time::timeout(
            ATTEMPT,
            store::EtcdStore::open(&etcd.endpoints, &etcd.prefix, etcd.tls.as_ref()),
        )
        .await;
        let error = match attempt {
            Ok(Ok(store)) => return Ok(store),
            Ok(Err(e)) => core::error::chain(&e),
            Err(_) => format!("no answer within {ATTEMPT:?}"),
        };
        // etcd takes a moment to listen: the first failures say nothing new.
        if began.elapsed() < std::time::Duration::from_secs(5) {
            tracing::debug!(error = %error, "etcd members not ready yet");
            tokio::time::sleep(PAUSE).await;
            continue;
        }
        tracing::warn!(
            error = %error,
            waited_s = began.elapsed().as_secs(),
            members = %etcd.endpoints.join(","),
            copy_to_the_others = %cfg.data_dir.display(),
            files = "ca.crt ca.key secrets.key etcd-ca.crt etcd-ca.key admin-token join-token viewer-token",
            "waiting for a quorum of etcd members: start the other controllers (their data dirs need these files from this one first)"
        );
        tokio::time::sleep(PAUSE).await;
    }
}

/// Makes rustls use ring for HTTPS clients (webhooks). Idempotent; reqwest panics on a
/// client built before a provider is installed.
pub fn install_tls_provider() {
    bramble_tls::install_provider();
}
