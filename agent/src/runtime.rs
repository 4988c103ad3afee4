//! The Docker runtime: the agent's only door to the container engine, over bollard.
//!
//! A [`Runtime`] is bound to one node: every container it creates carries the node's
//! `bramble.node` label, and [`Runtime::list`] and [`Runtime::events`] see only
//! containers with that label, so several agents (or tests) can share one engine
//! without touching each other's containers.
//!
//! Docker's own restart policy is always `no`: restarts, back-off and giving up are the
//! supervisor's decisions, made with the whole picture (see `crate::supervisor`).
//!
//! The supervisor and its probers do not name [`Runtime`]: they are generic over
//! [`Engine`], the few calls they make, which [`Runtime`] implements for Docker. That
//! keeps the supervisor's own decisions (which containers to remove and report, when a
//! Wallet may start) testable against an in-memory engine. Everything else (the link's
//! log streaming, metrics, image GC) uses [`Runtime`] directly.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerUpdateBody,
    EventMessage, HostConfig, HostConfigLogConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, PruneImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use bramble_api::manifest::{EnvValue, Kind};
use bramble_api::task::Reason;
use bramble_api::task::{container_name, labels};
use bramble_api::wire::Assignment;
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use tracing::{debug, info, instrument, warn};

use crate::host_paths;

#[cfg(test)]
pub(crate) mod fake;

/// A failed runtime call. Each variant names the operation; the cause is its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine could not be reached or its API version not negotiated.
    #[error("cannot connect to the Docker engine")]
    Connect(#[source] DockerError),
    /// `GET /version` failed.
    #[error("cannot read the Docker engine version")]
    Version(#[source] DockerError),
    /// Listing the node's containers failed.
    #[error("cannot list the node's containers")]
    List(#[source] DockerError),
    /// The container does not exist (any more).
    #[error("container {id} does not exist")]
    NotFound {
        /// Container id or name.
        id: String,
    },
    /// Inspecting a container failed.
    #[error("cannot inspect container {id}")]
    Inspect {
        /// Container id or name.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// A container lacks a label every Bramble container has.
    #[error("container {id} has no {label} label, so it is not a Bramble task container")]
    NotBramble {
        /// Container id.
        id: String,
        /// The missing label.
        label: &'static str,
    },
    /// Inspecting an image failed for another reason than its absence.
    #[error("cannot inspect image {image}")]
    ImageInspect {
        /// Image reference.
        image: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// The image is not on the node and could not be pulled.
    #[error("image {image} not found locally and pull failed")]
    ImagePull {
        /// Image reference.
        image: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// A Secret reference without its value: never started with the variable missing.
    #[error("env {var}: the controller sent no value for Secret {secret:?} key {key:?}; not started without it")]
    SecretMissing {
        /// The variable.
        var: String,
        /// The Secret.
        secret: String,
        /// Its key.
        key: String,
    },
    /// A volume's host path is one this node refuses (see [`crate::host_paths`]).
    #[error("cannot create a container for task {task}")]
    HostPath {
        /// The task.
        task: String,
        /// The volume and the rule it breaks.
        #[source]
        refused: host_paths::Refused,
    },
    /// A managed volume could not be readied (made, restored from its copy).
    #[error("volume {name:?}")]
    Volume {
        /// The volume.
        name: String,
        /// Cause.
        #[source]
        source: crate::volumes::VolumeError,
    },
    /// A volume's host directory could not be created.
    #[error("cannot create host directory {path} for a volume")]
    HostDir {
        /// Host directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The task's container name is used by a container of another node (only possible
    /// when several agents share one engine, as in tests). It is left alone.
    #[error("container name {name} is taken by a container of node {owner:?}")]
    NameTaken {
        /// Container name.
        name: String,
        /// The other container's `bramble.node` label.
        owner: String,
    },
    /// Creating the container failed.
    #[error("cannot create container {name}")]
    Create {
        /// Container name.
        name: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Starting the container failed.
    #[error("cannot start container {id}")]
    Start {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Setting the container's CPU limit failed.
    #[error("cannot set the CPU limit of container {id}")]
    LimitCpu {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Stopping the container failed.
    #[error("cannot stop container {id}")]
    Stop {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Removing the container failed.
    #[error("cannot remove container {id}")]
    Remove {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Reading the container's logs failed.
    #[error("cannot read the logs of container {id}")]
    Logs {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// Running a command in the container failed.
    #[error("cannot run a command in container {id}")]
    Exec {
        /// Container id.
        id: String,
        /// Cause.
        #[source]
        source: DockerError,
    },
    /// A command run in the container ended its output but never reported an exit code.
    #[error("a command in container {id} reported no exit code")]
    ExecUnfinished {
        /// Container id.
        id: String,
    },
    /// The engine's event stream failed.
    #[error("the Docker event stream failed")]
    Events(#[source] DockerError),
    /// `GET /info` failed.
    #[error("cannot read the Docker engine's system information")]
    Info(#[source] DockerError),
    /// Pruning unused images failed.
    #[error("cannot prune unused images")]
    PruneImages(#[source] DockerError),
}

/// Result of a runtime call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A command running in a container with its streams attached.
pub struct Attached {
    /// The engine's exec id.
    pub exec: String,
    /// stdout and stderr (one stream with a TTY).
    pub output: std::pin::Pin<
        Box<
            dyn Stream<Item = std::result::Result<bollard::container::LogOutput, DockerError>>
                + Send,
        >,
    >,
    /// stdin.
    pub input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

impl Error {
    /// What an operator can act on, by name, when creating or starting a task's
    /// container failed this way.
    pub fn reason(&self) -> Reason {
        match self {
            Error::ImagePull { .. } | Error::ImageInspect { .. } => Reason::ImagePullBackOff,
            Error::SecretMissing { .. } => Reason::SecretMissing,
            Error::HostPath { .. } => Reason::HostPathRefused,
            Error::Volume { .. } | Error::HostDir { .. } => Reason::VolumeError,
            Error::Start { .. } | Error::Create { .. } if port_in_use(&error_chain(self)) => {
                Reason::PortInUse
            }
            Error::Start { .. } | Error::LimitCpu { .. } => Reason::RunContainerError,
            _ => Reason::CreateContainerError,
        }
    }
}

/// An engine error chain as an operator reads it: without bollard's `Docker responded
/// with status code 500: ` and, for a taken port, only what says which port.
pub fn tidy(chain: &str, reason: Reason) -> String {
    let mut text = chain.to_string();
    while let Some(start) = text.find("Docker responded with status code ") {
        let rest = &text[start..];
        let Some(colon) = rest.find(": ") else { break };
        text.replace_range(start..start + colon + 2, "");
    }
    if reason == Reason::PortInUse {
        if let Some(i) = text.find("Bind for ").or_else(|| text.find("listen tcp")) {
            return format!("host port taken on this node: {}", &text[i..]);
        }
    }
    text
}

/// Whether an engine's error says a published host port is taken: by another
/// container (`port is already allocated`) or by a process of the host
/// (`address already in use`).
pub fn port_in_use(error: &str) -> bool {
    error.contains("port is already allocated") || error.contains("address already in use")
}

pub use bramble_api::error_chain;

/// A container's lifecycle state as Docker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerState {
    /// Created, never started (or a start failed).
    Created,
    /// Running.
    Running,
    /// Frozen by `docker pause`.
    Paused,
    /// Docker is restarting it (never from Bramble: its containers have policy `no`).
    Restarting,
    /// Ended; `exit_code` says how.
    Exited,
    /// Partly removed after a failed removal.
    Dead,
    /// Being removed, or a state this release does not know.
    Other,
}

/// One Bramble container as observed on the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Docker container id.
    pub id: String,
    /// Container name (without Docker's leading `/`).
    pub name: String,
    /// `bramble.task` label.
    pub task: String,
    /// `bramble.workload` label (empty if missing).
    pub workload: String,
    /// `bramble.kind` label, when present and known.
    pub kind: Option<Kind>,
    /// `bramble.spec-hash` label (empty if missing, which never matches a spec).
    pub spec_hash: String,
    /// `bramble.node` label.
    pub node: String,
    /// Lifecycle state.
    pub state: ContainerState,
    /// The host ports it binds, as `PORT/PROTOCOL` (`8080/tcp`), whether or not it runs.
    pub host_ports: Vec<String>,
    /// Exit code, once the container has exited.
    pub exit_code: Option<i64>,
    /// Whether the kernel's OOM killer ended the last run.
    pub oom_killed: bool,
    /// Docker's error text for the last run (e.g. why a start failed), if any.
    pub error: Option<String>,
    /// When the container was created.
    pub created_at: Option<DateTime<Utc>>,
    /// When the last run started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last run ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The CPU limit Docker holds for it, in billionths of a core (`NanoCpus`); None
    /// without one.
    pub nano_cpus: Option<i64>,
}

/// What happened to a container, from the engine's event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAction {
    /// It started.
    Start,
    /// Its process ended.
    Die,
    /// The OOM killer hit it (a `Die` follows).
    Oom,
}

/// An engine event for one of the node's containers. A hint to look again, not a
/// source of truth: the supervisor re-reads the state (level-triggered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    /// Container id.
    pub id: String,
    /// `bramble.task` label, when present.
    pub task: Option<String>,
    /// What happened.
    pub action: EventAction,
    /// Exit code, for `Die`.
    pub exit_code: Option<i64>,
}

/// What the supervisor and its probers need of the container engine, for one node's
/// containers (those labelled `bramble.node=<node>`). [`Runtime`] is the real one; each
/// method means what the [`Runtime`] method of the same name documents.
///
/// The futures are `Send`, as the supervisor runs in a spawned task. Static dispatch
/// only: the supervisor is generic over its engine.
pub trait Engine: Clone + Send + Sync + 'static {
    /// The node whose containers this engine sees.
    fn node(&self) -> &str;

    /// The host paths this node lets containers mount; [`Self::create_and_start`]
    /// refuses a task that breaks them.
    fn host_paths(&self) -> &host_paths::Policy;

    /// All of the node's task containers, running or not, sorted by task, then by
    /// creation time.
    fn list(&self) -> impl Future<Output = Result<Vec<Observed>>> + Send;

    /// The node's task containers of one kind, running or not.
    fn list_kind(&self, kind: Kind) -> impl Future<Output = Result<Vec<Observed>>> + Send;

    /// Makes sure `image` is on the node (pulls it if absent).
    fn ensure_image(&self, image: &str) -> impl Future<Output = Result<()>> + Send;

    /// Creates and starts the container of an assigned task; returns its id. A failed
    /// attempt leaves no container behind; a task whose volumes break
    /// [`Self::host_paths`] is [`Error::HostPath`], with no directory made.
    fn create_and_start(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send;

    /// Creates the container of an assigned task without starting it, as
    /// [`Self::create_and_start`] does before it starts; returns its id.
    fn create(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send;

    /// Readies a run sent ahead of its slot: creates its container and, where the node
    /// has a cron gate, starts it with its command held until the slot; returns its id.
    fn prepare(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send;

    /// Starts an existing container (again).
    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Sets a container's CPU limit, running or not ([`nano_cpus`]).
    fn limit_cpu(&self, id: &str, nano_cpus: i64) -> impl Future<Output = Result<()>> + Send;

    /// SIGTERM, then SIGKILL after `grace`; a missing container is [`Error::NotFound`].
    fn stop(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Stops within `grace` (sub-second graces honoured) and removes; a missing
    /// container is no error.
    fn terminate(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Removes a container, killing it if it runs; a missing container is no error.
    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// The last `max` bytes of a container's output.
    fn output(&self, id: &str, max: usize) -> impl Future<Output = Result<String>> + Send;

    /// Runs `cmd` in a running container; its exit code (exec probes).
    fn exec(&self, id: &str, cmd: &[String]) -> impl Future<Output = Result<i64>> + Send;

    /// The container's IP address, if it has one (HTTP and TCP probes).
    fn address(&self, id: &str) -> impl Future<Output = Result<Option<IpAddr>>> + Send;

    /// Start, die and OOM events of the node's containers; ends if the engine restarts.
    fn events(&self) -> impl Stream<Item = Result<RuntimeEvent>> + Send + 'static;
}

/// The Docker engine, as seen by one node's agent. Cheap to clone (one shared
/// connection pool).
#[derive(Debug, Clone)]
pub struct Runtime {
    docker: Docker,
    node: String,
    host_paths: Arc<host_paths::Policy>,
    dns: Option<Arc<Dns>>,
    volumes: Option<Arc<crate::volumes::Store>>,
    /// Fetches a newer copy of a task's volumes from the node holding it.
    fetch: Option<Fetch>,
    /// Starts cron runs ahead of their slot, holding their command until it.
    gate: Option<Arc<crate::gate::Gate>>,
}

/// What fetching a copy from another node takes: this node's receiver of copies and
/// its mesh identity.
#[derive(Clone)]
struct Fetch(Arc<crate::sync::Receiver>, Arc<crate::mesh::Mesh>);

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetch")
    }
}

/// The resolver containers on this node use: the agent's ([`crate::dns`]), so that
/// workload names resolve in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// The agent's resolver address.
    pub server: std::net::Ipv4Addr,
    /// Search domains: `bramble`, then the node's own.
    pub search: Vec<String>,
}

/// Docker's security option that keeps every process of a container from gaining
/// privileges it did not start with (setuid and setgid binaries, file capabilities):
/// a task running as an ordinary user stays one.
pub const NO_NEW_PRIVILEGES: &str = "no-new-privileges";

/// Log rotation for every container: the SD card must not fill up with logs.
const LOG_MAX_SIZE: &str = "10m";
const LOG_MAX_FILES: &str = "3";

/// Extra time allowed for a stop request beyond the grace period: the engine answers
/// only after the container has stopped, and bollard's own request timeout (120 s by
/// default) would otherwise cut long grace periods short.
const STOP_SLACK: Duration = Duration::from_secs(30);

impl Runtime {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and negotiates
    /// the API version, since bollard speaks a newer API than Debian's docker.io (1.41).
    /// Host paths are allowed by the default [`host_paths::Policy`] until
    /// [`Self::with_host_paths`] says otherwise.
    #[instrument]
    pub async fn connect(node: &str) -> Result<Runtime> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(Error::Connect)?
            .negotiate_version()
            .await
            .map_err(Error::Connect)?;
        let version = docker.client_version();
        debug!(api = %version, "connected to the Docker engine");
        Ok(Runtime {
            docker,
            node: node.to_string(),
            host_paths: Arc::new(host_paths::Policy::default()),
            dns: None,
            volumes: None,
            fetch: None,
            gate: None,
        })
    }

    /// This runtime starting runs sent ahead of their slot through `gate` (see
    /// [`crate::gate`]).
    pub fn with_gate(mut self, gate: crate::gate::Gate) -> Runtime {
        self.gate = Some(Arc::new(gate));
        self
    }

    /// This runtime with containers made from now on resolving through `dns`.
    pub fn with_dns(mut self, dns: Dns) -> Runtime {
        self.dns = Some(Arc::new(dns));
        self
    }

    /// This runtime with managed volumes kept in `store`.
    pub fn with_volumes(mut self, store: Arc<crate::volumes::Store>) -> Runtime {
        self.volumes = Some(store);
        self
    }

    /// This runtime fetching a newer copy of a task's volumes from the node holding it
    /// (the task's `restore_from`) before its container starts.
    pub fn with_fetch(
        mut self,
        receiver: Arc<crate::sync::Receiver>,
        mesh: Arc<crate::mesh::Mesh>,
    ) -> Runtime {
        self.fetch = Some(Fetch(receiver, mesh));
        self
    }

    /// This runtime with `policy` deciding which host paths containers may mount.
    pub fn with_host_paths(mut self, policy: host_paths::Policy) -> Runtime {
        self.host_paths = Arc::new(policy);
        self
    }

    /// The node this runtime acts for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The host paths containers may mount on this node.
    pub fn host_paths(&self) -> &host_paths::Policy {
        &self.host_paths
    }

    /// Refuses a task whose volumes break this node's host path rules.
    fn check_host_paths(&self, a: &Assignment) -> Result<()> {
        self.host_paths
            .check_volumes(&a.spec.volumes)
            .map_err(|refused| Error::HostPath {
                task: a.task.clone(),
                refused,
            })
    }

    /// The engine client, for read-only queries outside task supervision (node
    /// metrics: `docker info`, container stats).
    pub(crate) fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The engine's version, e.g. `20.10.24+dfsg1`.
    #[instrument(skip(self))]
    pub async fn version(&self) -> Result<String> {
        let v = self.docker.version().await.map_err(Error::Version)?;
        Ok(v.version.unwrap_or_else(|| "unknown".to_string()))
    }

    /// All of this node's task containers, running or not: those labelled
    /// `bramble.node=<node>` that also carry a `bramble.task` label. Sorted by task, then
    /// by creation time.
    #[instrument(skip(self), fields(node = %self.node))]
    pub async fn list(&self) -> Result<Vec<Observed>> {
        self.list_labelled(None).await
    }

    /// This node's task containers of one kind, running or not (see [`Self::list`]).
    /// Fencing lists only the Wallets, so it inspects no other container.
    #[instrument(skip(self), fields(node = %self.node))]
    pub async fn list_kind(&self, kind: Kind) -> Result<Vec<Observed>> {
        self.list_labelled(Some(format!("{}={}", labels::KIND, kind.as_str())))
            .await
    }

    async fn list_labelled(&self, extra: Option<String>) -> Result<Vec<Observed>> {
        let mut label = vec![
            format!("{}={}", labels::NODE, self.node),
            labels::TASK.to_string(),
        ];
        label.extend(extra);
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", label)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(Error::List)?;
        // The summary lacks exit codes and times, which restart decisions need; an
        // inspect per container is cheap on the local socket (a node runs a handful).
        let mut out = Vec::with_capacity(summaries.len());
        for id in summaries.into_iter().filter_map(|s| s.id) {
            match self.inspect(&id).await {
                Ok(o) => out.push(o),
                // Removed between list and inspect: it is simply not there.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (&a.task, a.created_at).cmp(&(&b.task, b.created_at)));
        Ok(out)
    }

    /// Docker's whole inspection of a container; a missing one is [`Error::NotFound`].
    async fn inspect_raw(&self, id: &str) -> Result<ContainerInspectResponse> {
        self.docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| container_error(id, e, |id, source| Error::Inspect { id, source }))
    }

    /// One container's state and labels.
    #[instrument(skip(self))]
    pub async fn inspect(&self, id: &str) -> Result<Observed> {
        let resp = self.inspect_raw(id).await?;
        observed_from(id, resp)
    }

    /// Makes sure `image` is on the node: a local image is used as is (never re-pulled,
    /// so `latest` does not change under a running workload); otherwise it is pulled,
    /// with progress in the debug log.
    #[instrument(skip(self))]
    pub async fn ensure_image(&self, image: &str) -> Result<()> {
        self.inspect_or_pull(image).await.map(drop)
    }

    /// What the engine knows of `image`, pulled first when it does not have it.
    async fn inspect_or_pull(&self, image: &str) -> Result<bollard::models::ImageInspect> {
        let inspect_error = |source| Error::ImageInspect {
            image: image.to_string(),
            source,
        };
        match self.docker.inspect_image(image).await {
            Ok(inspected) => return Ok(inspected),
            Err(e) if is_status(&e, 404) => {}
            Err(source) => return Err(inspect_error(source)),
        }
        let reference = with_default_tag(image);
        info!(%reference, "pulling image");
        let options = CreateImageOptionsBuilder::default()
            .from_image(&reference)
            .build();
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            match item {
                Ok(p) => debug!(
                    layer = p.id.as_deref().unwrap_or(""),
                    status = p.status.as_deref().unwrap_or(""),
                    "pull progress"
                ),
                Err(source) => {
                    return Err(Error::ImagePull {
                        image: image.to_string(),
                        source,
                    })
                }
            }
        }
        info!(%reference, "image pulled");
        self.docker
            .inspect_image(image)
            .await
            .map_err(inspect_error)
    }

    /// Creates and starts the container of an assigned task and returns its id.
    ///
    /// The container is named `bramble-{node}-{task}`. Pulls the image if needed and
    /// creates missing volume directories. A leftover container with that name (an
    /// agent that crashed mid-create), found when Docker refuses the name, is removed
    /// and the create tried again, but only if it belongs to this node. If the start
    /// fails, the created container is removed again, so a failed attempt leaves
    /// nothing behind.
    ///
    /// A task with a volume this node refuses (see [`crate::host_paths`]) is
    /// [`Error::HostPath`] before anything is pulled, made or created. The check runs
    /// again after the pull, right before the directories are made: a pull may take
    /// minutes, and a link planted meanwhile must not be followed.
    ///
    /// A task with a CPU limit is created without it, and the limit set right after the
    /// start: the start's own work in the container (runc's set-up, about 20 ms of CPU
    /// on a fast x86 core, several times that on a Pi's) counts against the container's
    /// quota, and at `cpu: 100m` (10 ms per 100 ms period) it waited for the next period
    /// instead of running. The memory limit holds from the create. Should the agent
    /// die between start and limit, the next plan finds the container's limit missing
    /// and sets it ([`Observed::nano_cpus`]); should setting it fail here, the container
    /// is removed, never left running without its limit.
    #[instrument(skip(self, a), fields(node = %self.node, task = %a.task, image = %a.spec.image))]
    pub async fn create_and_start(&self, a: &Assignment) -> Result<String> {
        let id = self.create_with(a, None, Cpu::AfterStart).await?;
        if let Err(e) = self.start(&id).await {
            self.discard(&id).await;
            return Err(e);
        }
        if let Some(limit) = nano_cpus(a) {
            if let Err(e) = self.limit_cpu(&id, limit).await {
                self.discard(&id).await;
                return Err(e);
            }
        }
        info!(container = %id, "container started");
        Ok(id)
    }

    /// Creates the container of an assigned task, as [`Self::create_and_start`] does,
    /// without starting it; returns its id.
    #[instrument(skip(self, a), fields(node = %self.node, task = %a.task, image = %a.spec.image))]
    pub async fn create(&self, a: &Assignment) -> Result<String> {
        self.create_with(a, None, Cpu::AtCreate).await
    }

    /// Readies a run sent ahead of its slot ([`Assignment::not_before`]) and returns its
    /// container's id. With a usable gate (see [`crate::gate`]) the container is started
    /// now, its command held by the gate until the slot; otherwise it is only created,
    /// without its CPU limit, and started at the slot, the limit set right after (as
    /// [`Self::create_and_start`] does, and for the same reason). A gate Docker cannot
    /// run is not used again: the run is then made again without it.
    #[instrument(skip(self, a), fields(node = %self.node, task = %a.task, image = %a.spec.image))]
    pub async fn prepare(&self, a: &Assignment) -> Result<String> {
        let (Some(gate), Some(at)) = (self.gate.as_ref().filter(|g| g.usable()), a.not_before)
        else {
            return self.create_with(a, None, Cpu::AfterStart).await;
        };
        if !crate::gate::may_use(gate.proven(), Utc::now(), at) {
            return self.create_with(a, None, Cpu::AfterStart).await;
        }
        let (image_entrypoint, image_cmd) = match a.spec.command {
            // The task's own command: the image's defaults do not matter.
            Some(_) => (None, None),
            None => self.image_command(&a.spec.image).await?,
        };
        let Some((entrypoint, cmd)) = crate::gate::gated_command(
            at,
            a.spec.command.as_deref(),
            a.spec.args.as_deref(),
            image_entrypoint.as_deref(),
            image_cmd.as_deref(),
        ) else {
            return self.create_with(a, None, Cpu::AfterStart).await;
        };
        let gated = Gated {
            source: gate.path().display().to_string(),
            entrypoint,
            cmd,
        };
        let id = self.create_with(a, Some(gated), Cpu::AtCreate).await?;
        let failed = match self.start(&id).await {
            Ok(()) => self.gate_failed(gate, &id, at).await,
            Err(e) => {
                let message = error_chain(&e);
                if !crate::gate::blames_gate(&message) {
                    self.discard(&id).await;
                    return Err(e);
                }
                Some(message)
            }
        };
        let Some(why) = failed else {
            info!(container = %id, not_before = %at, "container started ahead; the gate holds its command until the slot");
            return Ok(id);
        };
        if gate.mark_broken() {
            warn!(gate = %gate.path().display(), error = %why, "containers cannot run the cron gate; cron runs are started at their slot from now on");
        }
        // The command never ran (the gate runs it only at the slot): made again, plain.
        self.remove(&id).await?;
        self.create_with(a, None, Cpu::AfterStart).await
    }

    /// Why the gate could not run in container `id`, started ahead of `at`, if it could
    /// not. Watched for [`crate::gate::WATCH`] until a container on this node has run
    /// it: an exec failure (a file that passed [`crate::gate::check`] but the kernel
    /// will not run) ends the container within moments of its start, long before its
    /// slot ([`crate::gate::may_use`] left the time for that).
    async fn gate_failed(
        &self,
        gate: &crate::gate::Gate,
        id: &str,
        at: DateTime<Utc>,
    ) -> Option<String> {
        // Looked at every POLL, so that a failure is acted on at once.
        const POLL: Duration = Duration::from_millis(100);
        if gate.proven() {
            return None;
        }
        let until = Utc::now() + chrono::Duration::from_std(crate::gate::WATCH).unwrap_or_default();
        let c = loop {
            tokio::time::sleep(POLL).await;
            let c = self.inspect(id).await.ok()?;
            if c.state != ContainerState::Running || Utc::now() >= until {
                break c;
            }
        };
        // Only an end before the slot is the gate's own: from the slot on it may be the
        // run's command, which must never run twice.
        // Ended by a signal (SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGTERM: the run called
        // off meanwhile) is no failure of the gate.
        let signalled = matches!(c.exit_code, Some(129..=131 | 137 | 143));
        let ended_early = c.state != ContainerState::Running
            && !signalled
            && c.finished_at.is_some_and(|f| f < at)
            && Utc::now() < at;
        if !ended_early {
            if c.state == ContainerState::Running && gate.mark_proven() {
                debug!(gate = %gate.path().display(), "the cron gate runs in containers on this node");
            }
            return None;
        }
        let output = self.output(id, 512).await.unwrap_or_default();
        Some(format!(
            "the container ended before its slot (exit code {}){}",
            c.exit_code.map_or("unknown".to_string(), |c| c.to_string()),
            if output.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", output.trim())
            }
        ))
    }

    /// Removes (killing it if it runs) a container whose start, or the setting of its
    /// CPU limit after it, failed, so that a failed attempt leaves nothing behind; a
    /// removal that fails too is logged (the first error is the one to report).
    async fn discard(&self, id: &str) {
        if let Err(cleanup) = self.remove(id).await {
            warn!(container = %id, error = %error_chain(&cleanup), "cannot remove a container that failed to start");
        }
    }

    /// An image's entrypoint and default arguments, pulling it first if it is missing.
    async fn image_command(
        &self,
        image: &str,
    ) -> Result<(Option<Vec<String>>, Option<Vec<String>>)> {
        let config = self
            .inspect_or_pull(image)
            .await?
            .config
            .unwrap_or_default();
        Ok((config.entrypoint, config.cmd))
    }

    async fn create_with(&self, a: &Assignment, gated: Option<Gated>, cpu: Cpu) -> Result<String> {
        if let Some((var, r)) = a
            .spec
            .secret_refs()
            .find(|(var, _)| !a.secrets.contains_key(*var))
        {
            return Err(Error::SecretMissing {
                var: var.to_string(),
                secret: r.secret.to_string(),
                key: r.key.clone(),
            });
        }
        self.check_host_paths(a)?;
        // The image is almost always there: the create is tried first and the image
        // pulled only when Docker says it is missing, which saves an inspect per start.
        // A task with volumes has its image first (a pull may take minutes, and its
        // host paths are checked again after it, right before they are made).
        let mut pulled = !a.spec.volumes.is_empty();
        if pulled {
            self.ensure_image(&a.spec.image).await?;
            self.check_host_paths(a)?;
        }
        let mut sources = Vec::with_capacity(a.spec.volumes.len());
        for v in &a.spec.volumes {
            if let Some(name) = v.managed() {
                sources.push(self.prepare_volume(a, name).await?);
                continue;
            }
            tokio::fs::create_dir_all(&v.host_path)
                .await
                .map_err(|source| Error::HostDir {
                    path: PathBuf::from(&v.host_path),
                    source,
                })?;
            sources.push(v.host_path.clone());
        }
        let name = container_name(&self.node, &a.task);
        let mut config = container_config(a, &self.node, self.dns.as_deref(), &sources);
        if let Some(g) = gated {
            g.apply(&mut config);
        }
        if cpu == Cpu::AfterStart {
            if let Some(h) = config.host_config.as_mut() {
                h.nano_cpus = None;
            }
        }
        // Likewise, a leftover with the task's name is looked for only on a conflict.
        let mut cleared = false;
        loop {
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            let source = match self
                .docker
                .create_container(Some(options), config.clone())
                .await
            {
                Ok(created) => return Ok(created.id),
                Err(source) => source,
            };
            if is_status(&source, 404) && !pulled {
                self.ensure_image(&a.spec.image).await?;
                pulled = true;
                continue;
            }
            if is_status(&source, 409) && !cleared {
                cleared = true;
                match self.inspect(&name).await {
                    Ok(old) if old.node == self.node => {
                        warn!(container = %old.id, "removing a leftover container with the task's name");
                        self.remove(&old.id).await?;
                        continue;
                    }
                    Ok(old) => {
                        return Err(Error::NameTaken {
                            name,
                            owner: old.node,
                        })
                    }
                    // Gone meanwhile: try again.
                    Err(Error::NotFound { .. }) => continue,
                    // Same name but no Bramble labels: someone else's container; Docker's
                    // "name in use" conflict says it clearly.
                    Err(Error::NotBramble { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            return Err(Error::Create { name, source });
        }
    }

    /// Readies managed volume `name` of `a` (see [`crate::volumes::decide`]): its
    /// directory, restored from the copy this node holds when that is the newest data.
    /// The task's container is created only after this returns.
    async fn prepare_volume(&self, a: &Assignment, name: &str) -> Result<String> {
        let store = self.volumes.clone().ok_or_else(|| Error::Volume {
            name: name.to_string(),
            source: crate::volumes::VolumeError::Io {
                what: "no managed volumes on this agent for",
                path: PathBuf::from(name),
                source: std::io::Error::other(
                    "the agent was started without a data dir for volumes",
                ),
            },
        })?;
        if let (Some(src), Some(Fetch(receiver, mesh))) = (&a.restore_from, &self.fetch) {
            let mine = crate::volumes::newest_here(&store, &a.workload, name);
            if crate::volumes::older_than(mine, src.epoch, src.at) {
                info!(volume = name, from = %src.node, epoch = src.epoch, "fetching the newest copy of the volume before the task starts");
                // The holder learns that this node now runs the workload in its own task
                // set, which may reach it a moment after this one reached here.
                let mut tries = 0;
                let fetched = loop {
                    tries += 1;
                    match receiver
                        .fetch(mesh, src, &a.workload, name, a.epoch.unwrap_or(0))
                        .await
                    {
                        Err(crate::sync::SyncError::Mesh(e)) if tries < 10 => {
                            debug!(error = %e, "the holder refused the copy for now; asking again");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        r => break r,
                    }
                };
                fetched.map_err(|e| Error::Volume {
                    name: name.to_string(),
                    source: crate::volumes::VolumeError::Io {
                        what: "cannot fetch its newest copy from",
                        path: PathBuf::from(&src.node),
                        source: std::io::Error::other(e.to_string()),
                    },
                })?;
            }
        }
        let (workload, volume, epoch) =
            (a.workload.clone(), name.to_string(), a.epoch.unwrap_or(0));
        let prepared =
            tokio::task::spawn_blocking(move || store.prepare(&workload, &volume, epoch))
                .await
                .map_err(|e| Error::Volume {
                    name: name.to_string(),
                    source: crate::volumes::VolumeError::Io {
                        what: "cannot prepare",
                        path: PathBuf::from(name),
                        source: std::io::Error::other(e.to_string()),
                    },
                })?
                .map_err(|source| Error::Volume {
                    name: name.to_string(),
                    source,
                })?;
        let (dir, origin) = prepared;
        match origin {
            bramble_api::wire::VolumeOrigin::Empty if a.spec.sync.is_some() => {
                warn!(
                    volume = name,
                    "volume starts EMPTY: this node holds no copy of it"
                )
            }
            bramble_api::wire::VolumeOrigin::Copy {
                epoch,
                at,
                ref owner,
            } => {
                info!(volume = name, epoch, %at, owner = %owner, "volume restored from its copy")
            }
            _ => {}
        }
        Ok(dir.display().to_string())
    }

    /// Starts an existing container (again). Starting a running container is a no-op.
    #[instrument(skip(self))]
    pub async fn start(&self, id: &str) -> Result<()> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| container_error(id, e, |id, source| Error::Start { id, source }))
    }

    /// Sets a container's CPU limit ([`nano_cpus`]), running or not; the memory limit
    /// and everything else stay as they are.
    #[instrument(skip(self))]
    pub async fn limit_cpu(&self, id: &str, nano_cpus: i64) -> Result<()> {
        let update = ContainerUpdateBody {
            nano_cpus: Some(nano_cpus),
            ..Default::default()
        };
        self.docker
            .update_container(id, update)
            .await
            .map(drop)
            .map_err(|e| container_error(id, e, |id, source| Error::LimitCpu { id, source }))
    }

    /// Stops a container: SIGTERM, then SIGKILL after `grace`. Stopping a stopped
    /// container is a no-op; a missing one is [`Error::NotFound`].
    #[instrument(skip(self))]
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        let secs = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0))
            .unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(secs).build();
        self.docker
            .clone()
            .with_timeout(grace + STOP_SLACK)
            .stop_container(id, Some(options))
            .await
            .map_err(|e| container_error(id, e, |id, source| Error::Stop { id, source }))
    }

    /// Stops a container within `grace` and removes it: SIGTERM, at most `grace` for it to
    /// exit, then SIGKILL and removal in one forced remove. Unlike [`Self::stop`], whose
    /// grace Docker counts in whole seconds, this honours sub-second graces, which fencing
    /// needs. Terminating a container that is gone succeeds.
    #[instrument(skip(self))]
    pub async fn terminate(&self, id: &str, grace: Duration) -> Result<()> {
        let sigterm = KillContainerOptionsBuilder::new().signal("SIGTERM").build();
        match self.docker.kill_container(id, Some(sigterm)).await {
            Ok(()) => {
                let not_running = WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build();
                let mut wait = self.docker.wait_container(id, Some(not_running));
                // Any answer (an exit code, or an error for a non-zero one) means it
                // stopped; no answer within the grace means SIGKILL.
                let _ = tokio::time::timeout(grace, wait.next()).await;
            }
            Err(e) if is_status(&e, 404) => return Ok(()),
            // 409: not running, so there is nothing to wait for.
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                warn!(container = %id, error = %error_chain(&e), "SIGTERM failed; killing");
            }
        }
        self.remove(id).await
    }

    /// Runs `cmd` in a running container and returns its exit code. The output is read
    /// and dropped: Docker ends the exec's stream when the process ends. A caller that
    /// gives up early (a probe timeout) leaves the process running, since Docker cannot
    /// kill an exec; it ends with the container at the latest.
    #[instrument(skip(self))]
    pub async fn exec(&self, id: &str, cmd: &[String]) -> Result<i64> {
        let mut attached = self.exec_attached(id, cmd, false, false).await?;
        while let Some(chunk) = attached.output.next().await {
            chunk.map_err(|source| Error::Exec {
                id: id.to_string(),
                source,
            })?;
        }
        drop(attached.input);
        self.exec_finished(id, &attached.exec).await
    }

    /// The exit code of an exec whose output has ended, in `container`. The stream may
    /// end a moment before the engine records the exit code: it is asked for up to 1 s.
    pub async fn exec_finished(&self, container: &str, exec: &str) -> Result<i64> {
        for _ in 0..50 {
            let info = self
                .docker
                .inspect_exec(exec)
                .await
                .map_err(|source| Error::Exec {
                    id: container.to_string(),
                    source,
                })?;
            if info.running != Some(true) {
                if let Some(code) = info.exit_code {
                    return Ok(code);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::ExecUnfinished {
            id: container.to_string(),
        })
    }

    /// Starts `cmd` in a running container with its streams attached (`bramblectl
    /// exec`): the exec's id, its output and its stdin.
    #[instrument(skip(self))]
    pub async fn exec_attached(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<Attached> {
        let exec_err = |source| Error::Exec {
            id: id.to_string(),
            source,
        };
        let created = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(tty),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| container_error(id, e, |_, e| exec_err(e)))?;
        let options = bollard::exec::StartExecOptions {
            detach: false,
            tty,
            output_capacity: None,
        };
        match self
            .docker
            .start_exec(&created.id, Some(options))
            .await
            .map_err(exec_err)?
        {
            StartExecResults::Attached { output, input } => Ok(Attached {
                exec: created.id,
                output,
                input,
            }),
            StartExecResults::Detached => Err(Error::ExecUnfinished { id: id.to_string() }),
        }
    }

    /// Resizes an attached exec's terminal.
    pub async fn resize_exec(&self, exec: &str, cols: u16, rows: u16) -> Result<()> {
        self.docker
            .resize_exec(
                exec,
                bollard::exec::ResizeExecOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await
            .map_err(|source| Error::Exec {
                id: exec.to_string(),
                source,
            })
    }

    /// The container's IP address on its (first) network, if it has one: where HTTP and
    /// TCP probes connect. Reachable from the agent only when the agent runs in the
    /// host's network namespace, as it does on a Pi.
    #[instrument(skip(self))]
    pub async fn address(&self, id: &str) -> Result<Option<IpAddr>> {
        let resp = self.inspect_raw(id).await?;
        Ok(container_address(&resp))
    }

    /// Removes a container, killing it if it runs; named volumes are kept. Removing a
    /// container that is already gone succeeds (the goal is met).
    #[instrument(skip(self))]
    pub async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(source) => Err(Error::Remove {
                id: id.to_string(),
                source,
            }),
        }
    }

    /// A container's output (stdout and stderr interleaved) as text chunks, usually one
    /// line each. `tail` limits it to the last lines; with `follow` the stream goes on
    /// until the container stops.
    #[instrument(skip(self))]
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<u32>,
    ) -> Result<impl Stream<Item = Result<String>> + Send + 'static> {
        // Fail early and clearly for an unknown container instead of in the stream.
        self.inspect(id).await?;
        let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
        let options = LogsOptionsBuilder::default()
            .follow(follow)
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let id = id.to_string();
        Ok(self.docker.logs(&id, Some(options)).map(move |chunk| {
            chunk
                .map(|out| String::from_utf8_lossy(&out.into_bytes()).into_owned())
                .map_err(|source| Error::Logs {
                    id: id.clone(),
                    source,
                })
        }))
    }

    /// What the engine says about the host: memory-limit support and its root directory.
    #[instrument(skip(self))]
    pub async fn engine_info(&self) -> Result<EngineInfo> {
        let info = self.docker.info().await.map_err(Error::Info)?;
        Ok(EngineInfo {
            memory_limit: info.memory_limit,
            root_dir: info.docker_root_dir.map(PathBuf::from),
        })
    }

    /// The last `max` bytes of a container's output (stdout and stderr interleaved),
    /// starting at a line start where possible (see [`last_output`]): what a finished
    /// Job leaves behind for `bramblectl logs`. The log is read from its end: the last
    /// [`OUTPUT_TAIL_LINES`] lines first, and all of it only when those were too short
    /// to fill `max`; either way at most about `2 × max` bytes are held at once.
    #[instrument(skip(self))]
    pub async fn output(&self, id: &str, max: usize) -> Result<String> {
        let (bytes, lines) = self.read_log(id, Some(OUTPUT_TAIL_LINES), max).await?;
        let bytes = if bytes.len() <= max && lines >= OUTPUT_TAIL_LINES as usize {
            self.read_log(id, None, max).await?.0
        } else {
            bytes
        };
        Ok(last_output(&bytes, max))
    }

    /// The container's log (or its last `tail` lines), keeping only the last `max + 1`
    /// bytes or more (up to `2 × max + 1`), and the number of lines read.
    async fn read_log(&self, id: &str, tail: Option<u32>, max: usize) -> Result<(Vec<u8>, usize)> {
        let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
        let options = LogsOptionsBuilder::default()
            .follow(false)
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        let mut buf: Vec<u8> = Vec::new();
        let mut lines = 0usize;
        while let Some(chunk) = stream.next().await {
            let bytes = chunk
                .map_err(|e| container_error(id, e, |id, source| Error::Logs { id, source }))?
                .into_bytes();
            lines += bytes.iter().filter(|b| **b == b'\n').count();
            buf.extend_from_slice(&bytes);
            // One byte more than `max` is kept, so the trimming can tell whether the
            // kept part starts at a line start.
            if buf.len() > 2 * max + 1 {
                buf.drain(..buf.len() - (max + 1));
            }
        }
        Ok((buf, lines))
    }

    /// Removes every image no container uses (running or not), except those labelled
    /// `bramble.keep`; with `only_label`, only images with that label (`key` or
    /// `key=value`), which lets a test prune just its own image. Returns what went.
    #[instrument(skip(self))]
    pub async fn prune_images(&self, only_label: Option<&str>) -> Result<Pruned> {
        let mut filters: HashMap<&str, Vec<String>> = HashMap::from([
            // `false`: tagged images too, not only dangling layers.
            ("dangling", vec!["false".to_string()]),
            ("label!", vec![KEEP_IMAGE_LABEL.to_string()]),
        ]);
        if let Some(label) = only_label {
            filters.insert("label", vec![label.to_string()]);
        }
        let options = PruneImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let resp = self
            .docker
            .prune_images(Some(options))
            .await
            .map_err(Error::PruneImages)?;
        let items = resp.images_deleted.unwrap_or_default();
        Ok(Pruned {
            images: items.iter().filter_map(|i| i.untagged.clone()).collect(),
            layers: items.iter().filter(|i| i.deleted.is_some()).count(),
            bytes: u64::try_from(resp.space_reclaimed.unwrap_or(0)).unwrap_or(0),
        })
    }

    /// Start, die and OOM events of this node's containers. The stream ends if the
    /// engine restarts; subscribe again.
    pub fn events(&self) -> impl Stream<Item = Result<RuntimeEvent>> + Send + 'static {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([
            ("type", vec!["container".to_string()]),
            (
                "event",
                vec!["start".to_string(), "die".to_string(), "oom".to_string()],
            ),
            ("label", vec![format!("{}={}", labels::NODE, self.node)]),
        ]);
        let options = EventsOptionsBuilder::default().filters(&filters).build();
        self.docker
            .events(Some(options))
            .filter_map(|item| async move {
                match item {
                    Ok(msg) => runtime_event(msg).map(Ok),
                    Err(e) => Some(Err(Error::Events(e))),
                }
            })
    }
}

// Each method calls the inherent one of the same name (inherent methods win the path
// lookup), so callers that hold a `Runtime` need not import the trait.
impl Engine for Runtime {
    fn node(&self) -> &str {
        Runtime::node(self)
    }

    fn host_paths(&self) -> &host_paths::Policy {
        Runtime::host_paths(self)
    }

    fn list(&self) -> impl Future<Output = Result<Vec<Observed>>> + Send {
        Runtime::list(self)
    }

    fn list_kind(&self, kind: Kind) -> impl Future<Output = Result<Vec<Observed>>> + Send {
        Runtime::list_kind(self, kind)
    }

    fn ensure_image(&self, image: &str) -> impl Future<Output = Result<()>> + Send {
        Runtime::ensure_image(self, image)
    }

    fn create_and_start(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        Runtime::create_and_start(self, a)
    }

    fn create(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        Runtime::create(self, a)
    }

    fn prepare(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        Runtime::prepare(self, a)
    }

    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send {
        Runtime::start(self, id)
    }

    fn limit_cpu(&self, id: &str, nano_cpus: i64) -> impl Future<Output = Result<()>> + Send {
        Runtime::limit_cpu(self, id, nano_cpus)
    }

    fn stop(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send {
        Runtime::stop(self, id, grace)
    }

    fn terminate(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send {
        Runtime::terminate(self, id, grace)
    }

    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send {
        Runtime::remove(self, id)
    }

    fn output(&self, id: &str, max: usize) -> impl Future<Output = Result<String>> + Send {
        Runtime::output(self, id, max)
    }

    fn exec(&self, id: &str, cmd: &[String]) -> impl Future<Output = Result<i64>> + Send {
        Runtime::exec(self, id, cmd)
    }

    fn address(&self, id: &str) -> impl Future<Output = Result<Option<IpAddr>>> + Send {
        Runtime::address(self, id)
    }

    fn events(&self) -> impl Stream<Item = Result<RuntimeEvent>> + Send + 'static {
        Runtime::events(self)
    }
}

/// An image with this label is never pruned by the agent's image garbage collection,
/// used or not (e.g. an image loaded by hand for a workload not applied yet).
pub const KEEP_IMAGE_LABEL: &str = "bramble.keep";

/// How many lines [`Runtime::output`] reads first from a log's end.
pub const OUTPUT_TAIL_LINES: u32 = 4096;

/// What the engine says about its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Whether the engine can enforce memory limits (`docker info`: `MemoryLimit`);
    /// false when the kernel's memory cgroup is disabled.
    pub memory_limit: Option<bool>,
    /// Where the engine keeps images, containers and their logs.
    pub root_dir: Option<PathBuf>,
}

/// What an image prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// References untagged (`repo:tag`).
    pub images: Vec<String>,
    /// Image layers deleted.
    pub layers: usize,
    /// Disk space freed, bytes.
    pub bytes: u64,
}

/// The last `max` bytes of `bytes` as text. A cut falls at a line start when the kept
/// part has one in its first half (a reader wants whole lines), else at a character
/// boundary (one huge line). Invalid UTF-8 is replaced, and the result is never longer
/// than `max` bytes.
pub fn last_output(bytes: &[u8], max: usize) -> String {
    let Some(start) = bytes.len().checked_sub(max).filter(|s| *s > 0) else {
        return String::from_utf8_lossy(bytes).into_owned();
    };
    let window = &bytes[start..];
    let at = if bytes[start - 1] == b'\n' {
        0
    } else {
        match window.iter().position(|b| *b == b'\n') {
            Some(i) if i < max / 2 => i + 1,
            // Skip UTF-8 continuation bytes (10xxxxxx) to the next character start.
            _ => window
                .iter()
                .position(|b| b & 0xC0 != 0x80)
                .unwrap_or(window.len()),
        }
    };
    let mut text = String::from_utf8_lossy(&window[at..]).into_owned();
    // Each invalid byte became a 3-byte U+FFFD: trim again to the limit.
    if text.len() > max {
        let mut cut = text.len() - max;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
    }
    text
}

/// The first IP address among the container's networks (by network name, so the
/// answer is stable; `bridge` sorts early among Docker's defaults).
fn container_address(resp: &ContainerInspectResponse) -> Option<IpAddr> {
    let networks = resp.network_settings.as_ref()?.networks.as_ref()?;
    let mut entries: Vec<_> = networks.iter().collect();
    entries.sort_by_key(|(name, _)| *name);
    entries
        .into_iter()
        .find_map(|(_, e)| e.ip_address.as_deref().and_then(|ip| ip.parse().ok()))
}

/// Whether a bollard error is the engine answering with HTTP `status`.
/// A Docker error about container `id`: 404 is [`Error::NotFound`], anything else what
/// `other` makes of it.
fn container_error(
    id: &str,
    e: DockerError,
    other: impl FnOnce(String, DockerError) -> Error,
) -> Error {
    if is_status(&e, 404) {
        Error::NotFound { id: id.to_string() }
    } else {
        other(id.to_string(), e)
    }
}

fn is_status(e: &DockerError, status: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

/// `name` → `name:latest`. The engine's pull API pulls every tag of a repository when
/// none is given, which is never what a manifest means.
fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// A run started through the cron gate: the gate's path on the node, and the
/// container's entrypoint and command from [`crate::gate::gated_command`].
#[derive(Debug, Clone, PartialEq)]
struct Gated {
    source: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Gated {
    /// Makes `config` run the gate: its entrypoint and command, and the gate mounted
    /// read-only (so a task cannot change it for later runs).
    fn apply(self, config: &mut ContainerCreateBody) {
        config.entrypoint = Some(self.entrypoint);
        config.cmd = Some(self.cmd);
        let host = config.host_config.get_or_insert_with(Default::default);
        host.mounts.get_or_insert_with(Vec::new).push(Mount {
            typ: Some(MountType::BIND),
            source: Some(self.source),
            target: Some(crate::gate::TARGET.to_string()),
            read_only: Some(true),
            ..Default::default()
        });
    }
}

/// When a created container gets its CPU limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cpu {
    /// With the create: a container started ahead of its slot (its start is not what
    /// anyone waits for), or made by [`Runtime::create`].
    AtCreate,
    /// Right after the start (see [`Runtime::create_and_start`]). A container created
    /// so and started by the supervisor gets it from the planner's `Start` action or,
    /// failing that, from a `LimitCpu` of the next round.
    AfterStart,
}

/// A CPU limit of every core of this node, in billionths of a core: as good as none,
/// and the most Docker accepts (it refuses more cores than its host has).
pub fn whole_node_nano_cpus() -> i64 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    i64::try_from(cores)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000_000)
}

/// The CPU limit of an assigned task as Docker holds it (`NanoCpus`, billionths of a
/// core); None when the task has none. What its container is created with, and what a
/// running container must have (see [`Observed::nano_cpus`]).
pub fn nano_cpus(a: &Assignment) -> Option<i64> {
    a.spec
        .resources
        .cpu
        .map(|c| i64::try_from(c.millis().saturating_mul(1_000_000)).unwrap_or(i64::MAX))
}

/// The container to create for an assignment on `node`. Pure, so it is unit tested.
/// `sources`: each volume's directory on the node, in `a.spec.volumes` order (a
/// managed volume's is under the data dir).
fn container_config(
    a: &Assignment,
    node: &str,
    dns: Option<&Dns>,
    sources: &[String],
) -> ContainerCreateBody {
    let spec = &a.spec;
    let labels = HashMap::from([
        (labels::TASK.to_string(), a.task.clone()),
        (labels::WORKLOAD.to_string(), a.workload.clone()),
        (labels::KIND.to_string(), a.kind.as_str().to_string()),
        (labels::NODE.to_string(), node.to_string()),
        (labels::SPEC_HASH.to_string(), a.spec_hash.clone()),
    ]);
    // Secret references take the values sent with this assignment (checked present
    // before anything is created).
    let env: Vec<String> = spec
        .env
        .iter()
        .filter_map(|(k, v)| match v {
            EnvValue::Text(t) => Some(format!("{k}={t}")),
            EnvValue::Secret(_) => a.secrets.get(k).map(|s| format!("{k}={}", s.0)),
        })
        .collect();
    let exposed: Vec<String> = spec
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.container, p.protocol.as_str()))
        .collect();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        if let Some(host) = p.host {
            bindings
                .entry(format!("{}/{}", p.container, p.protocol.as_str()))
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: None,
                    host_port: Some(host.to_string()),
                });
        }
    }
    // Structured mounts, not `src:dst:opts` bind strings: a path is a field of its own,
    // so no ':' in it can add options or another path. (The host path has passed this
    // node's rules anyway; the container path has not, and needs no such rule.)
    let mounts: Vec<Mount> = spec
        .volumes
        .iter()
        .zip(sources)
        .map(|(v, source)| Mount {
            typ: Some(MountType::BIND),
            source: Some(source.clone()),
            target: Some(v.path.clone()),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect();
    let memory = spec
        .resources
        .memory
        .map(|m| i64::try_from(m.bytes()).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        nano_cpus: nano_cpus(a),
        memory,
        // Swap limit = memory limit: no swap, so a leaking task is OOM-killed instead of
        // grinding the node's SD card.
        memory_swap: memory,
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        security_opt: Some(vec![NO_NEW_PRIVILEGES.to_string()]),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_string()),
            config: Some(HashMap::from([
                ("max-size".to_string(), LOG_MAX_SIZE.to_string()),
                ("max-file".to_string(), LOG_MAX_FILES.to_string()),
            ])),
        }),
        dns: dns.map(|d| vec![d.server.to_string()]),
        dns_search: dns.map(|d| d.search.clone()),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: spec.command.clone(),
        cmd: spec.args.clone(),
        env: (!env.is_empty()).then_some(env),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(labels),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// `PORT/PROTOCOL` of every host port in Docker's port bindings (keyed by the
/// container's `PORT/PROTOCOL`).
fn host_ports(bindings: &HashMap<String, Option<Vec<PortBinding>>>) -> Vec<String> {
    let mut ports: Vec<String> = bindings
        .iter()
        .flat_map(|(inside, hosts)| {
            let protocol = inside.split_once('/').map_or("tcp", |(_, p)| p);
            hosts
                .iter()
                .flatten()
                .filter_map(|b| b.host_port.as_deref().filter(|p| !p.is_empty()))
                .map(move |p| format!("{p}/{protocol}"))
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

fn observed_from(id: &str, resp: ContainerInspectResponse) -> Result<Observed> {
    let labels = resp
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let id = resp.id.clone().unwrap_or_else(|| id.to_string());
    let Some(task) = labels.get(labels::TASK).cloned() else {
        return Err(Error::NotBramble {
            id,
            label: labels::TASK,
        });
    };
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    let host_ports = resp
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref())
        .map(host_ports)
        .unwrap_or_default();
    let st = resp.state.unwrap_or_default();
    let state = match st.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
        Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
        _ => ContainerState::Other,
    };
    // Docker reports exit code 0 for containers that have not exited; that is no code.
    let exit_code = matches!(state, ContainerState::Exited | ContainerState::Dead)
        .then_some(st.exit_code)
        .flatten();
    Ok(Observed {
        name: resp
            .name
            .as_deref()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        workload: label(labels::WORKLOAD),
        kind: labels.get(labels::KIND).and_then(|k| k.parse().ok()),
        spec_hash: label(labels::SPEC_HASH),
        node: label(labels::NODE),
        task,
        id,
        state,
        host_ports,
        exit_code,
        oom_killed: st.oom_killed.unwrap_or(false),
        error: st.error.filter(|e| !e.is_empty()),
        created_at: resp.created.and_then(IntoDate::into_date),
        started_at: st.started_at.and_then(IntoDate::into_date),
        finished_at: st.finished_at.and_then(IntoDate::into_date),
        nano_cpus: resp
            .host_config
            .and_then(|h| h.nano_cpus)
            .filter(|n| *n > 0),
    })
}

/// Docker times: RFC 3339 text, or a parsed date when bollard's `chrono` feature is on
/// (feature unification may turn it on from another crate, so both are accepted). The
/// zero time `0001-01-01T00:00:00Z` means "never".
trait IntoDate {
    fn into_date(self) -> Option<DateTime<Utc>>;
}

impl IntoDate for String {
    fn into_date(self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            .and_then(IntoDate::into_date)
    }
}

impl IntoDate for DateTime<Utc> {
    fn into_date(self) -> Option<DateTime<Utc>> {
        (self.timestamp() > 0).then_some(self)
    }
}

fn runtime_event(msg: EventMessage) -> Option<RuntimeEvent> {
    let action = match msg.action.as_deref()? {
        "start" => EventAction::Start,
        "die" => EventAction::Die,
        "oom" => EventAction::Oom,
        _ => return None,
    };
    let actor = msg.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    Some(RuntimeEvent {
        id: actor.id?,
        task: attributes.get(labels::TASK).cloned(),
        action,
        exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources_of(a: &Assignment) -> Vec<String> {
        a.spec.volumes.iter().map(|v| v.host_path.clone()).collect()
    }
    use bramble_api::manifest::{Port, Protocol, Restart, Volume};
    use bramble_api::quantity::{Cpu, Memory};
    use bramble_api::task::TaskSpec;

    fn assignment() -> Assignment {
        let spec = TaskSpec {
            sync: None,
            image: "pool/ltc:1".into(),
            command: Some(vec!["/bin/ltcd".into()]),
            args: Some(vec!["-x".into()]),
            env: [("A".to_string(), EnvValue::from("1"))].into(),
            ports: vec![
                Port {
                    container: 9332,
                    host: Some(19332),
                    protocol: Protocol::Tcp,
                },
                Port {
                    container: 53,
                    host: None,
                    protocol: Protocol::Udp,
                },
            ],
            volumes: vec![Volume {
                name: None,
                host_path: "/var/lib/x".into(),
                path: "/data".into(),
                read_only: true,
            }],
            resources: bramble_api::manifest::Resources {
                cpu: Some(Cpu(500)),
                memory: Some(Memory::mib(64)),
            },
            restart: Restart::default_for(Kind::Wallet),
            probes: Default::default(),
            timeout: None,
        };
        Assignment {
            restore_from: None,
            not_before: None,
            sync_to: Vec::new(),
            task: "ltc-abcdef-0".into(),
            kind: Kind::Wallet,
            workload: "ltc".into(),
            spec_hash: spec.hash(),
            spec,
            deadline: None,
            secrets: Default::default(),
            epoch: None,
        }
    }

    fn with_secret_ref(mut a: Assignment) -> Assignment {
        a.spec.env.insert(
            "RPC_PASSWORD".into(),
            EnvValue::Secret(bramble_api::manifest::SecretRef {
                secret: "ltc-rpc".parse().expect("name"),
                key: "password".into(),
            }),
        );
        a
    }

    #[test]
    fn secret_references_take_the_values_sent_with_the_assignment() {
        let mut a = with_secret_ref(assignment());
        a.secrets.insert(
            "RPC_PASSWORD".into(),
            bramble_api::token::Secret("hunter2".into()),
        );
        let env = container_config(&a, "pi-1", None, &sources_of(&a))
            .env
            .expect("env");
        assert_eq!(
            env,
            vec!["A=1".to_string(), "RPC_PASSWORD=hunter2".to_string()]
        );
    }

    #[tokio::test]
    async fn a_task_whose_secret_value_was_not_sent_is_refused_before_anything_is_made() {
        let a = with_secret_ref(assignment());
        // An engine nobody listens on: the refusal comes before any call to it.
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("docker.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("socket");
        let docker = bollard::Docker::connect_with_unix(
            &sock.display().to_string(),
            5,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("client");
        let rt = Runtime {
            fetch: None,
            gate: None,
            volumes: None,
            dns: None,
            docker,
            node: "pi-1".into(),
            host_paths: Arc::new(host_paths::Policy::default()),
        };
        let e = rt.create_and_start(&a).await.expect_err("refused");
        assert!(matches!(e, Error::SecretMissing { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("RPC_PASSWORD") && msg.contains("ltc-rpc"),
            "{msg}"
        );
    }

    #[test]
    fn container_config_carries_labels_limits_ports_and_mounts() {
        let a = assignment();
        let c = container_config(&a, "pi-1", None, &sources_of(&a));
        let labels = c.labels.expect("labels");
        assert_eq!(labels[labels::TASK], "ltc-abcdef-0");
        assert_eq!(labels[labels::WORKLOAD], "ltc");
        assert_eq!(labels[labels::KIND], "Wallet");
        assert_eq!(labels[labels::NODE], "pi-1");
        assert_eq!(labels[labels::SPEC_HASH], a.spec_hash);
        assert_eq!(c.entrypoint, Some(vec!["/bin/ltcd".to_string()]));
        assert_eq!(c.cmd, Some(vec!["-x".to_string()]));
        assert_eq!(c.env, Some(vec!["A=1".to_string()]));
        let mut exposed = c.exposed_ports.expect("exposed");
        exposed.sort();
        assert_eq!(exposed, vec!["53/udp".to_string(), "9332/tcp".to_string()]);
        let h = c.host_config.expect("host config");
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.memory, Some(64 << 20));
        assert_eq!(h.memory_swap, Some(64 << 20));
        let bindings = h.port_bindings.expect("bindings");
        assert_eq!(bindings.len(), 1, "unpublished ports get no binding");
        assert_eq!(
            bindings["9332/tcp"],
            Some(vec![PortBinding {
                host_ip: None,
                host_port: Some("19332".into())
            }])
        );
        assert_eq!(h.binds, None, "never the `src:dst:opts` text");
        assert_eq!(
            h.mounts,
            Some(vec![Mount {
                typ: Some(MountType::BIND),
                source: Some("/var/lib/x".into()),
                target: Some("/data".into()),
                read_only: Some(true),
                ..Default::default()
            }])
        );
        assert_eq!(h.security_opt, Some(vec!["no-new-privileges".to_string()]));
        assert_eq!(
            h.restart_policy.and_then(|p| p.name),
            Some(RestartPolicyNameEnum::NO)
        );
        let log = h.log_config.expect("log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        assert_eq!(log.config.expect("log opts")["max-size"], "10m");
    }

    #[test]
    fn a_gated_run_keeps_its_mounts_and_adds_the_gate_read_only() {
        let a = assignment();
        let mut c = container_config(&a, "pi-1", None, &sources_of(&a));
        let before = c
            .host_config
            .as_ref()
            .and_then(|h| h.mounts.clone())
            .unwrap_or_default();
        Gated {
            source: "/usr/local/bin/bramble-gate".into(),
            entrypoint: vec![crate::gate::TARGET.into(), "1".into(), "--".into()],
            cmd: vec!["/bin/ltcd".into(), "-x".into()],
        }
        .apply(&mut c);
        assert_eq!(
            c.entrypoint,
            Some(vec![
                crate::gate::TARGET.to_string(),
                "1".into(),
                "--".into()
            ])
        );
        assert_eq!(c.cmd, Some(vec!["/bin/ltcd".to_string(), "-x".into()]));
        let mounts = c.host_config.and_then(|h| h.mounts).expect("mounts");
        assert_eq!(&mounts[..before.len()], &before[..]);
        let gate = mounts.last().expect("gate mount");
        assert_eq!(gate.source.as_deref(), Some("/usr/local/bin/bramble-gate"));
        assert_eq!(gate.target.as_deref(), Some(crate::gate::TARGET));
        assert_eq!(gate.read_only, Some(true));
        assert_eq!(gate.typ, Some(MountType::BIND));
    }

    #[test]
    fn container_config_leaves_image_defaults_alone_when_unset() {
        let mut a = assignment();
        a.spec.command = None;
        a.spec.args = None;
        a.spec.env.clear();
        a.spec.ports.clear();
        a.spec.volumes.clear();
        a.spec.resources = Default::default();
        let c = container_config(&a, "pi-1", None, &sources_of(&a));
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.cmd, None);
        assert_eq!(c.env, None);
        assert_eq!(c.exposed_ports, None);
        let h = c.host_config.expect("host config");
        assert_eq!((h.nano_cpus, h.memory, h.memory_swap), (None, None, None));
        assert_eq!((h.binds, h.mounts), (None, None));
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges".to_string()]),
            "on every container"
        );
    }

    #[test]
    fn a_colon_in_a_mount_stays_inside_its_own_field() {
        let mut a = assignment();
        a.spec.volumes[0].path = "/data:rw,rshared".into();
        let h = container_config(&a, "pi-1", None, &sources_of(&a))
            .host_config
            .expect("host config");
        let m = h.mounts.expect("mounts");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].target.as_deref(), Some("/data:rw,rshared"));
        assert_eq!(m[0].read_only, Some(true));
        assert_eq!(m[0].bind_options, None, "no propagation option smuggled in");
        assert_eq!(h.binds, None);
    }

    #[test]
    fn untagged_images_are_pulled_as_latest() {
        let cases = [
            ("alpine", "alpine:latest"),
            ("pool/ltc", "pool/ltc:latest"),
            ("pool/ltc:0.21", "pool/ltc:0.21"),
            ("registry:5000/pool/ltc", "registry:5000/pool/ltc:latest"),
            ("registry:5000/pool/ltc:1", "registry:5000/pool/ltc:1"),
            ("alpine@sha256:abc", "alpine@sha256:abc"),
        ];
        for (image, want) in cases {
            assert_eq!(with_default_tag(image), want, "{image}");
        }
    }

    #[test]
    fn docker_zero_time_means_never() {
        assert_eq!("0001-01-01T00:00:00Z".to_string().into_date(), None);
        let t = "2026-11-21T16:31:02.123456789Z"
            .to_string()
            .into_date()
            .expect("parses nanoseconds");
        assert_eq!(t.timestamp(), 1_795_278_662);
        assert_eq!("garbage".to_string().into_date(), None);
    }

    #[test]
    fn the_container_address_is_the_first_networks_ip() {
        use bollard::models::{EndpointSettings, NetworkSettings};
        let with = |nets: &[(&str, &str)]| ContainerInspectResponse {
            network_settings: Some(NetworkSettings {
                networks: Some(
                    nets.iter()
                        .map(|(n, ip)| {
                            let e = EndpointSettings {
                                ip_address: Some(ip.to_string()),
                                ..Default::default()
                            };
                            (n.to_string(), e)
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(
            container_address(&with(&[("bridge", "172.17.0.5")])),
            ip("172.17.0.5")
        );
        assert_eq!(
            container_address(&with(&[
                ("zeta", "10.0.0.9"),
                ("alpha", ""),
                ("beta", "10.0.0.2")
            ])),
            ip("10.0.0.2"),
            "the first network by name that has an address"
        );
        assert_eq!(container_address(&with(&[("host", "")])), None);
        assert_eq!(
            container_address(&ContainerInspectResponse::default()),
            None
        );
    }

    #[test]
    fn output_keeps_the_last_bytes_from_a_line_start() {
        assert_eq!(last_output(b"a 1\nb 2\n", 64), "a 1\nb 2\n");
        assert_eq!(last_output(b"", 64), "");
        // Cut inside "line 2": the kept part starts at the next line.
        let text = b"line 1\nline 2\nline 3\nline 4\n";
        assert_eq!(last_output(text, 17), "line 3\nline 4\n");
        // Cut exactly at a line start.
        assert_eq!(last_output(text, 14), "line 3\nline 4\n");
        // One long line: cut at a character, never inside one.
        let long = "é".repeat(100); // 2 bytes each
        let out = last_output(long.as_bytes(), 51);
        assert_eq!(out, "é".repeat(25));
        // Invalid UTF-8 is replaced, within the limit.
        let out = last_output(b"\xff\xff\xff\xffabcdef", 8);
        assert!(out.len() <= 8 && out.ends_with("abcdef"), "{out:?}");
        for max in 1..40 {
            assert!(last_output(text, max).len() <= max, "{max}");
        }
    }

    #[test]
    fn failures_are_named_for_the_operator() {
        let docker = |message: &str| DockerError::DockerResponseServerError {
            status_code: 500,
            message: message.into(),
        };
        let start = |message: &str| Error::Start {
            id: "c".into(),
            source: docker(message),
        };
        for (message, want) in [
            ("driver failed programming external connectivity on endpoint x: Bind for 0.0.0.0:8080 failed: port is already allocated", Reason::PortInUse),
            ("listen tcp4 0.0.0.0:80: bind: address already in use", Reason::PortInUse),
            ("OCI runtime create failed: exec: \"nope\": not found", Reason::RunContainerError),
        ] {
            assert_eq!(start(message).reason(), want, "{message}");
        }
        let host = start("listen tcp4 0.0.0.0:80: bind: address already in use");
        let pull = Error::ImagePull {
            image: "x:1".into(),
            source: docker("pull access denied"),
        };
        assert_eq!(pull.reason(), Reason::ImagePullBackOff);
        let create = Error::Create {
            name: "c".into(),
            source: docker("invalid mount config"),
        };
        assert_eq!(create.reason(), Reason::CreateContainerError);
        let secret = Error::SecretMissing {
            var: "A".into(),
            secret: "s".into(),
            key: "k".into(),
        };
        assert_eq!(secret.reason(), Reason::SecretMissing);

        assert_eq!(
            tidy(&error_chain(&host), Reason::PortInUse),
            "host port taken on this node: listen tcp4 0.0.0.0:80: bind: address already in use"
        );
        assert_eq!(
            tidy(&error_chain(&pull), Reason::ImagePullBackOff),
            "image x:1 not found locally and pull failed: pull access denied"
        );
    }

    #[test]
    fn error_chain_names_every_cause() {
        let err = Error::HostDir {
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(
            error_chain(&err),
            "cannot create host directory /x for a volume: disk full"
        );
    }
}
