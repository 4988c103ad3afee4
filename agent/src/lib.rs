//! The Bramble agent: runs on every node, keeps one outbound WebSocket to the
//! controller, converges Docker onto the node's desired task set and reports back.
//!
//! # Layout
//! - [`beneath`]: opening what lies under a volume without following links.
//! - [`credential`]: this node's own credential, kept 0600 in the data dir.
//! - [`discovery`]: finds the controller over mDNS when no URL is given.
//! - [`host`]: the machine's identity, the node name, memory-limit support.
//! - [`host_paths`]: which `hostPath` volumes this node lets containers mount (its own
//!   allow list, on top of the universal rules), checked before any container or
//!   directory is made.
//! - [`logging`]: how the binaries log (colour on terminals only, JSON on request).
//! - [`link`]: the connection to the controller (hello, task sets, heartbeats, logs).
//! - [`supervisor`]: converges containers onto the desired tasks; restarts with back-off.
//!   A pure planner, an I/O shell generic over [`runtime::Engine`], and the fence
//!   sweeper that stops Wallets while the node is fenced.
//! - [`fence`]: when the node is fenced (the controller fell silent) and when that ends.
//! - [`probe`]: liveness and readiness probes (exec, HTTP, TCP).
//! - [`runtime`]: the Docker Engine, through bollard, and the [`runtime::Engine`] trait
//!   (what the supervisor needs of it).
//! - [`metrics`]: CPU, memory, load, temperature, Pi throttling, disks and container stats.
//! - [`disk`]: removes unused images when Docker's disk fills up.
//! - [`routes`]: the routing table of workload addresses the leader sends, kept on disk.
//! - [`proxy`]: serves every workload address on this node (userspace TCP proxy).
//! - [`mesh`]: agent-to-agent connections (mutual TLS with node certificates).
//! - [`dns`]: the resolver containers use, for workload names.
//! - [`volumes`]: managed volumes, the copies kept of other nodes' volumes, data set
//!   aside; what a task's volume starts from.
//! - [`sync`]: the copy protocol: sending a volume to a standby node, taking copies
//!   from other nodes, fetching one (over the mesh port).
//! - [`syncer`]: the loop that syncs this node's running tasks' volumes.

pub mod beneath;
pub mod credential;
pub mod discovery;
pub mod disk;
pub mod dns;
pub mod epoch;
pub mod exec;
pub mod fence;
pub mod gate;
pub mod host;
pub mod host_paths;
pub mod link;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod routes;
pub mod runtime;
pub mod supervisor;
pub mod sync;
pub mod syncer;
pub mod volumes;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

/// What can stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Docker is not reachable.
    #[error("docker")]
    Runtime(#[from] runtime::Error),
    /// The controller URL is unusable.
    #[error("controller URL {url:?}: {reason}")]
    ControllerUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The join token is unusable.
    #[error("--join-token")]
    JoinToken(#[from] bramble_api::token::BadToken),
    /// The node's own credential cannot be read or written.
    #[error("node credential {path}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An allowed host path prefix is unusable.
    #[error("host path rules")]
    HostPaths(#[from] host_paths::BadPrefix),
    /// A node label is invalid (it could never be matched by a node selector).
    #[error("node label {key:?}: {reason}")]
    Label {
        /// The label's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The cron gate named by `--cron-gate` is unusable.
    #[error("--cron-gate")]
    Gate(#[from] gate::GateError),
    /// The data directory cannot be created.
    #[error("data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The agent's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Controller base URL (`https://host:7878`), or several separated by commas (every
    /// controller of a cluster that has more than one).
    pub controller: Option<String>,
    /// Join token, whole (`BRAMBLE1-<CA fingerprint>-<secret>`).
    pub join_token: String,
    /// This node's name.
    pub node_name: String,
    /// Local state.
    pub data_dir: PathBuf,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Network interfaces to look for the controller on (mDNS); empty means all.
    pub mdns_interfaces: Vec<String>,
    /// Remove unused images when Docker's disk is more than this many percent used
    /// (see [`disk`]); 100 turns it off. [`disk::DEFAULT_THRESHOLD`] by default.
    pub image_gc_threshold: u8,
    /// Prefixes under which `hostPath` volumes are allowed on this node (see
    /// [`host_paths`]); empty means [`host_paths::DEFAULT_ALLOWED`] alone. System paths
    /// stay refused whatever is allowed here.
    pub allow_host_paths: Vec<PathBuf>,
    /// The agent-to-agent port; `None`: this node serves no workload address (names
    /// do not resolve in its containers and other nodes' proxies cannot reach its
    /// instances).
    pub mesh_port: Option<u16>,
    /// Bytes a second each volume copy sent to a standby node may use (0: no cap).
    pub sync_rate: u64,
    /// The static `bramble-gate` executable that starts cron runs on time (see
    /// [`gate`]); `None`: the one beside the agent's executable, if there is a usable
    /// one.
    pub cron_gate: Option<PathBuf>,
}

impl Config {
    /// Checks what the agent would otherwise send the controller and have refused: at
    /// most [`bramble_api::wire::MAX_NODE_LABELS`] labels, each one a node selector can
    /// match; and the allowed host path prefixes. Returns the node's host path rules,
    /// with the data dir and the Docker socket's directory (from `DOCKER_HOST`) reserved.
    pub fn validate(&self) -> Result<host_paths::Policy, Error> {
        let max = bramble_api::wire::MAX_NODE_LABELS;
        if self.labels.len() > max {
            return Err(Error::Label {
                key: self.labels.keys().nth(max).cloned().unwrap_or_default(),
                reason: format!("{} labels, more than the limit of {max}", self.labels.len()),
            });
        }
        for (k, v) in &self.labels {
            let label = |reason| Error::Label {
                key: k.clone(),
                reason,
            };
            bramble_api::manifest::check_label_key(k).map_err(label)?;
            bramble_api::manifest::check_label_value(v).map_err(label)?;
        }
        if let Some(path) = &self.cron_gate {
            gate::check(path)?;
        }
        let docker_host = std::env::var("DOCKER_HOST").ok();
        let mut policy =
            host_paths::Policy::new(self.allow_host_paths.clone())?.reserve(&self.data_dir);
        // A container that mounts the engine's socket owns the node.
        if let Some(dir) = host_paths::docker_socket_dir(docker_host.as_deref()) {
            policy = policy.reserve(dir);
        }
        Ok(policy)
    }
}

/// Runs the agent until `shutdown` completes. Containers keep running after it returns.
/// Without a controller URL the link looks for the controller over mDNS.
/// Bad configuration ([`Config::validate`]) is refused before anything is done.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let host_paths = cfg.validate()?;
    let token: bramble_api::token::JoinToken = cfg.join_token.parse()?;
    let urls = match cfg.controller.as_deref() {
        Some(list) => link::agent_urls(list)?,
        None => Vec::new(),
    };
    credential::private_dir(&cfg.data_dir).map_err(|source| Error::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let credential = credential::load_or_create(&cfg.data_dir)?;
    let exe = std::env::current_exe().ok();
    let gate = gate::find(cfg.cron_gate.as_deref(), exe.as_deref())?;
    link::run(cfg, token, credential, urls, host_paths, gate, shutdown).await
}
