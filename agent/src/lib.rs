//! The Bramble agent: runs on every node, keeps one outbound WebSocket to the
//! controller, converges Docker onto the node's desired task set and reports back.
//!
//! # Layout
//! - [`credential`]: this node's own credential, kept 0600 in the data dir.
//! - [`discovery`]: finds the controller over mDNS when no URL is given.
//! - [`host`]: the machine's identity, the node name, memory-limit support.
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

pub mod credential;
pub mod discovery;
pub mod disk;
pub mod fence;
pub mod host;
pub mod link;
pub mod metrics;
pub mod probe;
pub mod runtime;
pub mod supervisor;

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
    /// Controller base URL (`https://host:7878`).
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
}

/// Runs the agent until `shutdown` completes. Containers keep running after it returns.
/// Without a controller URL the link looks for the controller over mDNS.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let token: bramble_api::token::JoinToken = cfg.join_token.parse()?;
    credential::private_dir(&cfg.data_dir).map_err(|source| Error::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let credential = credential::load_or_create(&cfg.data_dir)?;
    let url = cfg.controller.as_deref().map(link::agent_url).transpose()?;
    link::run(cfg, token, credential, url, shutdown).await
}
