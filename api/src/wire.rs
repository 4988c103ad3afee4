//! The agent⇄controller protocol: JSON text frames over the `/v1/agent` WebSocket.
//!
//! The agent opens the connection (outbound only, so NAT is fine) over TLS, checks the
//! controller's certificate against the CA pinned in its join token, authenticates with
//! its node credential (or, once, the join token) as a bearer token, and sends [`AgentMessage::Hello`] with its node
//! and the tasks it already runs (adopted containers). The controller answers
//! [`ControllerMessage::Welcome`] and then, whenever it changes, the node's full
//! desired task set ([`ControllerMessage::Assign`]): level-triggered, so a lost
//! message is healed by the next one. The agent reports every task state change and a
//! heartbeat with node metrics.
//!
//! Every frame carries the protocol version `v`; a peer refuses a version it does not
//! speak with a clear error instead of guessing.
//!
//! # Limits
//! A controller keeps what agents send (node info, the last heartbeats, task statuses),
//! so an agent must not be able to make it hold much: a fake node's 2.7 MB heartbeat,
//! every 250 ms, once took a controller from 11 MB to 373 MB. Every agent message has
//! named limits ([`MAX_NODE_LABELS`], [`MAX_INFO_TEXT`], [`MAX_WARNINGS`],
//! [`MAX_CORES`], [`MAX_CONTAINERS`], [`MAX_MESSAGE_BYTES`], ...): [`decode_agent`]
//! refuses a message beyond them (a heartbeat frame beyond [`MAX_HEARTBEAT_FRAME_BYTES`]
//! before it is even decoded), with an error that names the field and the limit, and
//! the agent cuts what it measures to them before sending ([`AgentMessage::cap`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::health::{ContainerUsage, DiskUsage};
use crate::manifest::{Arch, Kind, Name};
use crate::task::{TaskPhase, TaskSpec, MAX_OUTPUT_BYTES};
use crate::token::Secret;

/// The protocol version this release speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// The largest heartbeat frame a controller accepts. A heartbeat within every limit
/// below ([`MAX_CORES`] cores, [`MAX_CONTAINERS`] containers with the longest task ids)
/// is under 100 KiB; heartbeats come every few hundred milliseconds, so a larger one is
/// refused before it is decoded.
pub const MAX_HEARTBEAT_FRAME_BYTES: usize = 128 << 10;

/// The most labels a node may have.
pub const MAX_NODE_LABELS: usize = 64;

/// The longest node-describing text, in bytes: `os`, `dockerVersion`, `agentVersion`,
/// `machineId`, and the paths of disk figures.
pub const MAX_INFO_TEXT: usize = 256;

/// The most warnings a node may report.
pub const MAX_WARNINGS: usize = 16;

/// The longest warning, in bytes.
pub const MAX_WARNING_BYTES: usize = 512;

/// The most CPU cores a heartbeat may report figures for.
pub const MAX_CORES: usize = 256;

/// The most containers a heartbeat may report usage for.
pub const MAX_CONTAINERS: usize = 256;

/// The longest task id, in bytes (ids are `NAME-HASH6-N`, far shorter).
pub const MAX_TASK_ID: usize = 253;

/// The longest container id, in bytes (Docker's are 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 128;

/// The longest task status message or log-stream error, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 10;

/// The most tasks a Hello may list.
pub const MAX_HELLO_TASKS: usize = 1024;

/// A node credential's bytes in a Hello (the agent makes 64 hex digits).
pub const MAX_CREDENTIAL_BYTES: usize = 256;

/// A frame that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    /// Not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Another protocol version.
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version {
        /// The version the peer sent.
        got: u32,
    },
    /// A message of a kind with a smaller limit than [`MAX_FRAME_BYTES`] (a heartbeat).
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLargeFor {
        /// The message type, e.g. `heartbeat`.
        kind: &'static str,
        /// The frame's length.
        len: usize,
        /// The limit for that type.
        limit: usize,
    },
    /// A well-formed message with a field beyond its limits.
    #[error("invalid message: {0}")]
    Invalid(#[from] FieldError),
}

/// A field of an agent message that breaks its limit or rule. Its text names the field
/// (as written on the wire) and the limit, never the (possibly huge) value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// The field's path, e.g. `metrics.coresPercent` or `tasks[3].message`.
    pub field: String,
    /// What is wrong, e.g. `300 entries, more than the limit of 256`.
    pub problem: String,
}

fn field_error(field: impl std::fmt::Display, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// Refuses text longer than `max` bytes.
fn text_within(field: impl std::fmt::Display, text: &str, max: usize) -> Result<(), FieldError> {
    if text.len() > max {
        return Err(field_error(
            field,
            format!("{} bytes, more than the limit of {max} bytes", text.len()),
        ));
    }
    Ok(())
}

/// Refuses a list longer than `max`.
fn count_within(
    field: impl std::fmt::Display,
    count: usize,
    max: usize,
    what: &str,
) -> Result<(), FieldError> {
    if count > max {
        return Err(field_error(
            field,
            format!("{count} {what}, more than the limit of {max}"),
        ));
    }
    Ok(())
}

/// Refuses NaN and infinities (JSON cannot carry them back out).
fn finite(field: impl std::fmt::Display, x: f32) -> Result<(), FieldError> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(field_error(field, "not a finite number"))
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary. Whether it cut.
pub fn truncate(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Keeps the last `max` bytes of `text`, from a character boundary (output: its end
/// matters most). Whether it cut.
fn keep_tail(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.drain(..start);
    true
}

fn cap_list<T>(list: &mut Vec<T>, max: usize) -> bool {
    let cut = list.len() > max;
    list.truncate(max);
    cut
}

fn cap_float(x: &mut f32) -> bool {
    let bad = !x.is_finite();
    if bad {
        *x = 0.0;
    }
    bad
}

fn cap_opt_float(x: &mut Option<f32>) -> bool {
    let bad = x.is_some_and(|v| !v.is_finite());
    if bad {
        *x = None;
    }
    bad
}

/// A frame: the protocol version and one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame<M> {
    /// Protocol version.
    pub v: u32,
    /// The message.
    #[serde(flatten)]
    pub msg: M,
}

/// Encodes a message as a frame of the current version.
pub fn encode<M: Serialize>(msg: &M) -> String {
    #[derive(Serialize)]
    struct Out<'a, M> {
        v: u32,
        #[serde(flatten)]
        msg: &'a M,
    }
    serde_json::to_string(&Out {
        v: PROTOCOL_VERSION,
        msg,
    })
    .expect("wire messages always serialize")
}

/// Decodes a frame, checking size and version before the message itself.
pub fn decode<M: for<'de> Deserialize<'de>>(text: &str) -> Result<M, WireError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(text.len()));
    }
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let v: Version = serde_json::from_str(text).map_err(WireError::Malformed)?;
    if v.v != PROTOCOL_VERSION {
        return Err(WireError::Version { got: v.v });
    }
    let frame: Frame<M> = serde_json::from_str(text).map_err(WireError::Malformed)?;
    Ok(frame.msg)
}

/// Decodes a frame from an agent and checks it against the limits (see the module's
/// Limits): a heartbeat frame over [`MAX_HEARTBEAT_FRAME_BYTES`] is refused before it is
/// decoded, any frame over [`MAX_FRAME_BYTES`] too, and a decoded message must pass
/// [`AgentMessage::validate`]. What a controller calls on every agent frame.
pub fn decode_agent(text: &str) -> Result<AgentMessage, WireError> {
    refuse_large_heartbeat(text)?;
    let msg = match decode_heartbeat(text) {
        Some(heartbeat) => heartbeat,
        None => decode(text)?,
    };
    msg.validate()?;
    Ok(msg)
}

/// What [`decode_agent`] does, with every frame decoded the general way (the enum's
/// `type` tag read through serde's buffered content). The reference the heartbeat fast
/// path is checked against, by tests and by the `wire_agent` fuzz target.
#[doc(hidden)]
pub fn decode_agent_reference(text: &str) -> Result<AgentMessage, WireError> {
    refuse_large_heartbeat(text)?;
    let msg: AgentMessage = decode(text)?;
    msg.validate()?;
    Ok(msg)
}

/// Refuses a heartbeat frame over [`MAX_HEARTBEAT_FRAME_BYTES`] before it is decoded.
fn refuse_large_heartbeat(text: &str) -> Result<(), WireError> {
    if text.len() > MAX_HEARTBEAT_FRAME_BYTES && text.len() <= MAX_FRAME_BYTES {
        // Only the type is read here: serde skips the other values without keeping them.
        #[derive(Deserialize)]
        struct Type {
            #[serde(rename = "type")]
            kind: String,
        }
        if serde_json::from_str::<Type>(text).is_ok_and(|t| t.kind == "heartbeat") {
            return Err(WireError::TooLargeFor {
                kind: "heartbeat",
                len: text.len(),
                limit: MAX_HEARTBEAT_FRAME_BYTES,
            });
        }
    }
    Ok(())
}

/// A heartbeat of the current version, decoded straight into its fields; `None` for
/// any other frame, and for one this cannot decode (the general way then decodes it,
/// or says what is wrong with it, as before).
///
/// Why: every node sends one every heartbeat, and the general way (a flattened,
/// internally tagged enum) buffers and copies the whole frame twice before reading
/// it. That was a quarter of a 1,000-node controller's CPU at rest.
fn decode_heartbeat(text: &str) -> Option<AgentMessage> {
    if text.len() > MAX_HEARTBEAT_FRAME_BYTES {
        return None;
    }
    #[derive(Deserialize)]
    struct Head<'a> {
        v: u32,
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    let head: Head = serde_json::from_str(text).ok()?;
    if head.v != PROTOCOL_VERSION || head.kind != "heartbeat" {
        return None;
    }
    #[derive(Deserialize)]
    struct Body {
        metrics: NodeMetrics,
    }
    let body: Body = serde_json::from_str(text).ok()?;
    Some(AgentMessage::Heartbeat {
        metrics: body.metrics,
    })
}

/// What a node is, as its agent reports it when it connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Unique node name.
    pub name: String,
    /// Userland architecture.
    pub arch: Arch,
    /// CPU cores.
    pub cores: u32,
    /// Total RAM in bytes.
    pub memory_bytes: u64,
    /// Docker Engine version.
    pub docker_version: String,
    /// Node labels (from the agent's `--label` flags).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Agent release.
    pub agent_version: String,
    /// Operating system, e.g. `Debian GNU/Linux 12 (bookworm)`.
    #[serde(default)]
    pub os: String,
    // Fields below were added after protocol version 1 shipped: optional, so Hellos of
    // older agents still parse.
    /// A stable identity of the machine, independent of its host name: the Raspberry
    /// Pi's serial number, else `/etc/machine-id`. The controller refuses a second
    /// machine that connects under a name another machine is connected with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Whether Docker enforces memory limits on this node. `Some(false)` is the
    /// Raspberry Pi OS default (memory cgroup disabled): `resources.memory` is then
    /// silently ignored. `None`: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limits: Option<bool>,
    /// Problems with the node's setup, each with its fix, for people to read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Where other agents reach this one for workload traffic (`IP:PORT`, see
    /// [`crate::endpoints`]). `None`: an agent that serves no such port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// A heartbeat's view of the node's load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetrics {
    /// When measured (agent clock).
    pub at: DateTime<Utc>,
    /// CPU use over all cores, 0–100.
    pub cpu_percent: f32,
    /// RAM in use, bytes.
    pub memory_used_bytes: u64,
    /// RAM in all, bytes.
    pub memory_total_bytes: u64,
    /// 1-minute load average.
    pub load1: f32,
    // Fields below were added after protocol version 1 shipped: all optional, so older
    // agents' heartbeats still parse. `None` means the node cannot measure it.
    /// CPU use per core, 0–100 each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores_percent: Option<Vec<f32>>,
    /// RAM available to new processes without swapping, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available_bytes: Option<u64>,
    /// 5-minute load average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load5: Option<f32>,
    /// 15-minute load average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load15: Option<f32>,
    /// Free space where the agent keeps its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_disk: Option<DiskUsage>,
    /// Free space of Docker's root directory (images, containers, logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_disk: Option<DiskUsage>,
    /// SoC temperature, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f32>,
    /// Raspberry Pi firmware throttling bits (see [`crate::health::decode_throttled`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<u32>,
    /// Running task containers' CPU and memory, refreshed at most every 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<ContainerUsage>>,
}

/// A task the controller wants on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// Task id (`bramble.task` label).
    pub task: String,
    /// Workload kind.
    pub kind: Kind,
    /// Workload name.
    pub workload: String,
    /// [`TaskSpec::hash`] of `spec`.
    pub spec_hash: String,
    /// What to run.
    pub spec: TaskSpec,
    /// Job and CronJob runs: when the run has failed if it has not finished, counted
    /// from its firing (`timeout` after it), whether or not it has started by then.
    /// Added after protocol version 1 shipped: optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The values of the spec's Secret references, by variable: sent to this task's node
    /// only, never stored by the agent, never in any view.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
    /// Wallets: the placement's epoch ([`crate::task::Task::epoch`]). Added after
    /// protocol version 1 shipped: optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// A task whose managed volumes sync: the standby nodes its agent sends copies to.
    /// Added after protocol version 1 shipped: optional.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sync_to: Vec<SyncPeer>,
    /// A node holding newer data of the task's managed volumes than this one: the agent
    /// fetches that copy before the container starts. Added after protocol version 1
    /// shipped: optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSource>,
    /// A CronJob's run sent ahead of its slot: the agent readies its container (image
    /// and create) at once, and starts it at this instant, never before. Added after
    /// protocol version 1 shipped: optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

/// Where the newest copy of a task's volumes is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// The node holding it.
    pub node: String,
    /// Where its agent listens for other agents (`IP:PORT`).
    pub mesh: String,
    /// The placement that made the copy.
    pub epoch: u64,
    /// When the copy completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// A node that keeps copies of a task's managed volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncPeer {
    /// The node.
    pub node: String,
    /// Where its agent listens for other agents (`IP:PORT`).
    pub mesh: String,
}

/// This node keeps copies of `workload`'s managed volumes, sent by `owner`'s agent for
/// the placement of `epoch`: the only sender and the only epoch it accepts them from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StandbyDuty {
    /// The workload.
    pub workload: String,
    /// The node running it.
    pub owner: String,
    /// Its placement's epoch.
    pub epoch: u64,
    /// Its managed volumes.
    pub volumes: Vec<String>,
}

/// What a node holds of a managed volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VolumeRole {
    /// Mounted by a task of this node (or kept for the next one).
    InUse,
    /// A complete copy kept for a workload that runs elsewhere.
    Copy,
    /// Data of a placement that is over, set aside for the operator: never used
    /// again, never deleted by Bramble.
    SetAside,
}

/// Where a volume in use came from when its task started on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "camelCase")]
pub enum VolumeOrigin {
    /// Made empty.
    Empty,
    /// The directory this node already had for it.
    Kept,
    /// Restored from the copy of `epoch`, completed at `at`.
    Copy {
        /// The placement that made the copy.
        epoch: u64,
        /// When that copy completed.
        at: DateTime<Utc>,
        /// The node that sent it.
        owner: String,
    },
}

/// The last sync of a volume in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncOutcome {
    /// When it ended.
    pub at: DateTime<Utc>,
    /// The standby nodes that now hold a complete copy of this round.
    pub done: Vec<String>,
    /// Bytes sent in all (file contents and lists).
    pub sent_bytes: u64,
    /// What went wrong (the `before` command, a standby), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One managed volume (or copy of one) on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReport {
    /// The owning workload.
    pub workload: String,
    /// The volume's name.
    pub volume: String,
    /// What the node holds.
    pub role: VolumeRole,
    /// The placement it belongs to (a copy: the one that sent it; in use: the task's).
    pub epoch: u64,
    /// A copy: when it completed; in use: when its last sync completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// Size of its files.
    pub bytes: u64,
    /// Number of files.
    pub files: u64,
    /// In use: where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<VolumeOrigin>,
    /// In use: the last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncOutcome>,
    /// Set aside: where it lies on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The most volume reports one message carries.
pub const MAX_VOLUME_REPORTS: usize = 1_000;

/// A task's observed state on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    /// Task id.
    pub task: String,
    /// Phase.
    pub phase: TaskPhase,
    /// Exit code of the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Why (failure reason, e.g. `image not found`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Docker container id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// Readiness, when probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// When the container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The node stopped restarting it (too many failures in the restart window); the
    /// controller places it on another node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up: bool,
    /// Job and CronJob runs that finished: the last 64 KiB of their output, so it
    /// outlives the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why the task is not running as wanted, by name (added after protocol version 1
    /// shipped: optional; an unknown name parses as `Unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<crate::reason::Reason>,
    /// When the node tries again, while it backs off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<DateTime<Utc>>,
}

impl NodeInfo {
    /// Checks the node's description against the limits: a valid node name, at most
    /// [`MAX_NODE_LABELS`] labels each valid as a node selector would need it, texts up
    /// to [`MAX_INFO_TEXT`] bytes, at most [`MAX_WARNINGS`] warnings of up to
    /// [`MAX_WARNING_BYTES`] bytes.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.validate_at("node")
    }

    fn validate_at(&self, at: &str) -> Result<(), FieldError> {
        if self.name.parse::<Name>().is_err() {
            return Err(field_error(
                format!("{at}.name"),
                "not a valid node name: use 1 to 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
            ));
        }
        count_within(
            format_args!("{at}.labels"),
            self.labels.len(),
            MAX_NODE_LABELS,
            "labels",
        )?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            // The key may be garbage: the field names its position, not its text.
            let field = format_args!("{at}.labels[{i}]");
            if crate::manifest::check_label_key(k).is_err() {
                return Err(field_error(
                    field,
                    format!(
                        "invalid key: use 1 to {} letters, digits, '-', '_', '.', '/'",
                        crate::manifest::MAX_LABEL_KEY
                    ),
                ));
            }
            if crate::manifest::check_label_value(v).is_err() {
                return Err(field_error(
                    field,
                    format!(
                        "invalid value: at most {} bytes, no control characters, ',' or '='",
                        crate::manifest::MAX_LABEL_VALUE
                    ),
                ));
            }
        }
        for (name, text) in [
            ("dockerVersion", &self.docker_version),
            ("agentVersion", &self.agent_version),
            ("os", &self.os),
        ] {
            text_within(format_args!("{at}.{name}"), text, MAX_INFO_TEXT)?;
        }
        if let Some(id) = &self.machine_id {
            text_within(format_args!("{at}.machineId"), id, MAX_INFO_TEXT)?;
        }
        count_within(
            format_args!("{at}.warnings"),
            self.warnings.len(),
            MAX_WARNINGS,
            "warnings",
        )?;
        for (i, w) in self.warnings.iter().enumerate() {
            text_within(format_args!("{at}.warnings[{i}]"), w, MAX_WARNING_BYTES)?;
        }
        if let Some(mesh) = &self.mesh {
            if mesh.len() > MAX_INFO_TEXT || mesh.parse::<std::net::SocketAddr>().is_err() {
                return Err(field_error(format!("{at}.mesh"), "not an IP:PORT address"));
            }
        }
        Ok(())
    }

    /// Cuts what the agent measured or was told by the machine (texts, warnings) to the
    /// limits, so an odd machine still gets through. The name and labels come from the
    /// agent's flags and are checked there instead. Whether anything was cut.
    pub fn cap(&mut self) -> bool {
        let mut cut = false;
        for text in [
            &mut self.docker_version,
            &mut self.agent_version,
            &mut self.os,
        ] {
            cut |= truncate(text, MAX_INFO_TEXT);
        }
        if let Some(id) = &mut self.machine_id {
            cut |= truncate(id, MAX_INFO_TEXT);
        }
        cut |= cap_list(&mut self.warnings, MAX_WARNINGS);
        for w in &mut self.warnings {
            cut |= truncate(w, MAX_WARNING_BYTES);
        }
        cut
    }
}

impl NodeMetrics {
    /// Checks a heartbeat's figures against the limits: finite numbers, at most
    /// [`MAX_CORES`] per-core figures and [`MAX_CONTAINERS`] containers (task ids up to
    /// [`MAX_TASK_ID`] bytes), disk paths up to [`MAX_INFO_TEXT`] bytes.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.validate_at("metrics")
    }

    fn validate_at(&self, at: &str) -> Result<(), FieldError> {
        finite(format_args!("{at}.cpuPercent"), self.cpu_percent)?;
        finite(format_args!("{at}.load1"), self.load1)?;
        for (name, x) in [
            ("load5", self.load5),
            ("load15", self.load15),
            ("temperatureCelsius", self.temperature_celsius),
        ] {
            if let Some(x) = x {
                finite(format_args!("{at}.{name}"), x)?;
            }
        }
        if let Some(cores) = &self.cores_percent {
            count_within(
                format_args!("{at}.coresPercent"),
                cores.len(),
                MAX_CORES,
                "entries",
            )?;
            for (i, x) in cores.iter().enumerate() {
                finite(format_args!("{at}.coresPercent[{i}]"), *x)?;
            }
        }
        for (name, disk) in [
            ("dataDisk", &self.data_disk),
            ("dockerDisk", &self.docker_disk),
        ] {
            if let Some(d) = disk {
                text_within(format_args!("{at}.{name}.path"), &d.path, MAX_INFO_TEXT)?;
            }
        }
        if let Some(containers) = &self.containers {
            count_within(
                format_args!("{at}.containers"),
                containers.len(),
                MAX_CONTAINERS,
                "entries",
            )?;
            for (i, c) in containers.iter().enumerate() {
                text_within(
                    format_args!("{at}.containers[{i}].task"),
                    &c.task,
                    MAX_TASK_ID,
                )?;
                if let Some(x) = c.cpu_percent {
                    finite(format_args!("{at}.containers[{i}].cpuPercent"), x)?;
                }
            }
        }
        Ok(())
    }

    /// Cuts a measurement to the limits: per-core figures and containers beyond the
    /// first [`MAX_CORES`] and [`MAX_CONTAINERS`], containers with over-long task ids, and
    /// figures that are not finite numbers (as unknown). Whether anything was cut.
    pub fn cap(&mut self) -> bool {
        let mut cut = cap_float(&mut self.cpu_percent) | cap_float(&mut self.load1);
        for x in [
            &mut self.load5,
            &mut self.load15,
            &mut self.temperature_celsius,
        ] {
            cut |= cap_opt_float(x);
        }
        if let Some(cores) = &mut self.cores_percent {
            cut |= cap_list(cores, MAX_CORES);
            for x in cores.iter_mut() {
                cut |= cap_float(x);
            }
        }
        for d in [&mut self.data_disk, &mut self.docker_disk]
            .into_iter()
            .flatten()
        {
            cut |= truncate(&mut d.path, MAX_INFO_TEXT);
        }
        if let Some(containers) = &mut self.containers {
            let before = containers.len();
            containers.retain(|c| c.task.len() <= MAX_TASK_ID);
            cut |= containers.len() != before;
            cut |= cap_list(containers, MAX_CONTAINERS);
            for c in containers.iter_mut() {
                cut |= cap_opt_float(&mut c.cpu_percent);
            }
        }
        cut
    }
}

impl TaskStatus {
    /// A task in `phase`, with nothing else said about it.
    pub fn new(task: impl Into<String>, phase: TaskPhase) -> TaskStatus {
        TaskStatus {
            task: task.into(),
            phase,
            exit_code: None,
            message: None,
            container_id: None,
            restarts: 0,
            ready: None,
            started_at: None,
            finished_at: None,
            gave_up: false,
            output: None,
            reason: None,
            restart_at: None,
        }
    }

    /// Checks a task status against the limits: task id up to [`MAX_TASK_ID`] bytes,
    /// container id up to [`MAX_CONTAINER_ID`], message up to [`MAX_MESSAGE_BYTES`],
    /// output up to [`MAX_OUTPUT_BYTES`].
    pub fn validate(&self) -> Result<(), FieldError> {
        self.validate_at("status")
    }

    fn validate_at(&self, at: &str) -> Result<(), FieldError> {
        text_within(format_args!("{at}.task"), &self.task, MAX_TASK_ID)?;
        if let Some(id) = &self.container_id {
            text_within(format_args!("{at}.containerId"), id, MAX_CONTAINER_ID)?;
        }
        if let Some(m) = &self.message {
            text_within(format_args!("{at}.message"), m, MAX_MESSAGE_BYTES)?;
        }
        if let Some(o) = &self.output {
            text_within(format_args!("{at}.output"), o, MAX_OUTPUT_BYTES)?;
        }
        Ok(())
    }

    /// Cuts the message to [`MAX_MESSAGE_BYTES`] (its start says what happened) and the
    /// output to its last [`MAX_OUTPUT_BYTES`]. Ids are left alone: they cannot be cut
    /// and still name the task. Whether anything was cut.
    pub fn cap(&mut self) -> bool {
        let mut cut = false;
        if let Some(m) = &mut self.message {
            cut |= truncate(m, MAX_MESSAGE_BYTES);
        }
        if let Some(o) = &mut self.output {
            cut |= keep_tail(o, MAX_OUTPUT_BYTES);
        }
        cut
    }
}

impl AgentMessage {
    /// Checks the message against the limits (see the module's Limits); the error names
    /// the field, e.g. `tasks[3].message` of a Hello.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            AgentMessage::Hello {
                node,
                tasks,
                credential,
                ..
            } => {
                node.validate_at("node")?;
                if let Some(c) = credential {
                    // The controller keeps only its hash; a credential is a token's size.
                    text_within("credential", &c.0, MAX_CREDENTIAL_BYTES)?;
                }
                count_within("tasks", tasks.len(), MAX_HELLO_TASKS, "tasks")?;
                for (i, t) in tasks.iter().enumerate() {
                    t.validate_at(&format!("tasks[{i}]"))?;
                }
                Ok(())
            }
            AgentMessage::Heartbeat { metrics } => metrics.validate_at("metrics"),
            AgentMessage::Status { status } => status.validate_at("status"),
            AgentMessage::Removed { task } => text_within("task", task, MAX_TASK_ID),
            AgentMessage::Volumes { volumes } => {
                count_within("volumes", volumes.len(), MAX_VOLUME_REPORTS, "volumes")?;
                for (i, v) in volumes.iter().enumerate() {
                    text_within(
                        format_args!("volumes[{i}].workload"),
                        &v.workload,
                        MAX_TASK_ID,
                    )?;
                    text_within(format_args!("volumes[{i}].volume"), &v.volume, MAX_TASK_ID)?;
                    if let Some(p) = &v.path {
                        text_within(format_args!("volumes[{i}].path"), p, MAX_MESSAGE_BYTES)?;
                    }
                    if let Some(e) = v.last_sync.as_ref().and_then(|s| s.error.as_ref()) {
                        text_within(
                            format_args!("volumes[{i}].lastSync.error"),
                            e,
                            MAX_MESSAGE_BYTES,
                        )?;
                    }
                }
                Ok(())
            }
            AgentMessage::LogData { .. } => Ok(()),
            AgentMessage::LogEnd { error, .. } | AgentMessage::ExecEnd { error, .. } => match error
            {
                Some(e) => text_within("error", e, MAX_MESSAGE_BYTES),
                None => Ok(()),
            },
            // base64 of at most MAX_EXEC_CHUNK bytes.
            AgentMessage::ExecData { data, .. } => {
                text_within("data", data, MAX_EXEC_CHUNK.div_ceil(3) * 4)
            }
        }
    }

    /// Cuts what can be cut to the limits (see [`NodeInfo::cap`], [`NodeMetrics::cap`],
    /// [`TaskStatus::cap`]; a Hello's tasks beyond [`MAX_HELLO_TASKS`]; a log stream's
    /// error). What an agent does to every message before sending it. Whether anything
    /// was cut.
    pub fn cap(&mut self) -> bool {
        match self {
            AgentMessage::Hello { node, tasks, .. } => {
                let mut cut = node.cap() | cap_list(tasks, MAX_HELLO_TASKS);
                for t in tasks.iter_mut() {
                    cut |= t.cap();
                }
                cut
            }
            AgentMessage::Heartbeat { metrics } => metrics.cap(),
            AgentMessage::Status { status } => status.cap(),
            AgentMessage::Removed { .. }
            | AgentMessage::LogData { .. }
            | AgentMessage::ExecData { .. } => false,
            AgentMessage::Volumes { volumes } => {
                let mut cut = cap_list(volumes, MAX_VOLUME_REPORTS);
                for v in volumes.iter_mut() {
                    if let Some(e) = v.last_sync.as_mut().and_then(|s| s.error.as_mut()) {
                        cut |= truncate(e, MAX_MESSAGE_BYTES);
                    }
                }
                cut
            }
            AgentMessage::LogEnd { error, .. } | AgentMessage::ExecEnd { error, .. } => error
                .as_mut()
                .is_some_and(|e| truncate(e, MAX_MESSAGE_BYTES)),
        }
    }
}

fn default_fence_ms() -> u64 {
    2_000
}

/// Agent → controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AgentMessage {
    /// First frame: who I am and what I already run.
    Hello {
        /// The node.
        node: NodeInfo,
        /// Tasks found running or stopped on the node (adopted by label).
        tasks: Vec<TaskStatus>,
        /// The node's own credential, made at its first start: at a first join (with
        /// the join token) the controller keeps its hash, and admits the name only with
        /// it from then on. Added after protocol version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<Secret>,
        /// The agent keeps standby links to controllers that do not lead and counts
        /// only their [`ControllerMessage::Vouch`] frames against its fence: a follower
        /// serves a standby link only to an agent that says so (an older agent would
        /// count any frame). Added after protocol version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        standby: bool,
        /// A certificate signing request (PEM) for the node's agent-to-agent
        /// certificate, for its own key made at its start. Added after protocol
        /// version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        csr: Option<String>,
        /// The agent starts an assignment no earlier than its
        /// [`Assignment::not_before`]. A controller sends an agent that does not say so
        /// (an older one) a CronJob's run only once its slot has come, as such an agent
        /// would start it on receipt. Added after protocol version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        not_before: bool,
        /// The agent applies [`ControllerMessage::EndpointChanges`] to the table it was
        /// sent last on the link; an agent that does not say so (an older one) is sent
        /// every table whole. Added after protocol version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        endpoint_changes: bool,
    },
    /// Periodic liveness and load.
    Heartbeat {
        /// Node metrics.
        metrics: NodeMetrics,
    },
    /// A task changed state.
    Status {
        /// The new state.
        status: TaskStatus,
    },
    /// A task's container is gone from the node (after it was unassigned).
    Removed {
        /// Task id.
        task: String,
    },
    /// Every managed volume and copy the node holds; sent after the Hello and whenever
    /// it changes. Added after protocol version 1 shipped: an older controller ignores
    /// it.
    Volumes {
        /// The reports.
        volumes: Vec<VolumeReport>,
    },
    /// A chunk of a log stream the controller asked for.
    LogData {
        /// Request id from [`ControllerMessage::Logs`].
        request: u64,
        /// Log text (stdout and stderr interleaved).
        data: String,
    },
    /// The end of a log stream.
    LogEnd {
        /// Request id.
        request: u64,
        /// Why it ended early, if it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Output of a command run in a task's container ([`ControllerMessage::Exec`]).
    /// Added after protocol version 1 shipped.
    ExecData {
        /// Request id.
        request: u64,
        /// The bytes, base64 (a terminal's output need not be UTF-8), at most
        /// [`MAX_EXEC_CHUNK`] of them.
        data: String,
        /// From stderr (never with a TTY, which has one stream).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stderr: bool,
    },
    /// The command ended.
    ExecEnd {
        /// Request id.
        request: u64,
        /// Its exit code, when it ran.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i64>,
        /// Why it could not run or was cut off.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// The most bytes of one [`AgentMessage::ExecData`] or [`ControllerMessage::ExecInput`]
/// (before base64).
pub const MAX_EXEC_CHUNK: usize = 32 * 1024;

/// A terminal's size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// Controller → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControllerMessage {
    /// The answer to Hello.
    Welcome {
        /// The node's name as registered.
        node: String,
        /// How often to send heartbeats, in milliseconds.
        heartbeat_ms: u64,
        /// Fence timeout in milliseconds: an agent that has received nothing from the
        /// controller for this long stops its Wallet containers by itself. The controller
        /// sends a keep-alive every heartbeat interval (a WebSocket pong, unsolicited;
        /// older controllers a ping), so silence means a lost link.
        #[serde(default = "default_fence_ms")]
        fence_ms: u64,
        /// This controller does not lead: the link is a standby one, which carries
        /// heartbeats one way and [`ControllerMessage::Vouch`] the other, and no task
        /// set. Added after protocol version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        standby: bool,
        /// The node's agent-to-agent certificate (PEM), signed by the cluster CA for the
        /// Hello's `csr`, named after the node. Added after protocol version 1 shipped:
        /// optional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        certificate: Option<String>,
        /// The cluster CA's certificate (PEM), which the agent checks against the
        /// fingerprint its join token pins. Optional, as `certificate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca: Option<String>,
    },
    /// On a standby link: this controller, a follower on the quorum side of the store,
    /// hears the node and knows of no leader's suspicion of it, so the node's Wallets
    /// may go on running (the argument is `HealthConfig`'s, in the controller).
    Vouch,
    /// The node's full desired task set; anything else with Bramble labels goes.
    Assign {
        /// Increases with every change, so a stale set is never applied over a newer one.
        revision: u64,
        /// Every task the node should run.
        tasks: Vec<Assignment>,
        /// The workloads whose volume copies this node keeps. Added after protocol
        /// version 1 shipped: optional.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        standby: Vec<StandbyDuty>,
        /// The current placement epoch of every placed workload whose volumes sync: a
        /// node holding the data of an older placement sets it aside. Optional, as
        /// `standby`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        epochs: BTreeMap<String, u64>,
    },
    /// Every workload's address and Ready instances ([`crate::endpoints`]), whenever
    /// they change. Added after protocol version 1 shipped: an older agent ignores it.
    Endpoints {
        /// The store revision it was computed at.
        revision: u64,
        /// The table.
        table: crate::endpoints::Table,
    },
    /// What changed in the endpoints table since the one sent last on this link, which
    /// is always a whole [`ControllerMessage::Endpoints`] first; only to an agent whose
    /// Hello says `endpoint_changes`.
    EndpointChanges {
        /// The store revision the new table was computed at.
        revision: u64,
        /// The changes.
        changes: crate::endpoints::Changes,
    },
    /// Stream a task's logs back as LogData/LogEnd.
    Logs {
        /// Request id, echoed back.
        request: u64,
        /// Task id.
        task: String,
        /// Keep streaming new output.
        follow: bool,
        /// Only the last N lines.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<u32>,
    },
    /// Stop a log stream.
    CancelLogs {
        /// Request id.
        request: u64,
    },
    /// Run a command in a task's container, its output back as ExecData/ExecEnd.
    /// Added after protocol version 1 shipped.
    Exec {
        /// Request id, echoed back.
        request: u64,
        /// Task id.
        task: String,
        /// The command and its arguments.
        command: Vec<String>,
        /// With a terminal (stdout and stderr as one stream).
        #[serde(default)]
        tty: bool,
        /// Keep its stdin open for ExecInput.
        #[serde(default)]
        stdin: bool,
        /// The terminal's size, when `tty`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<TermSize>,
    },
    /// Bytes for an exec's stdin; `eof` closes it.
    ExecInput {
        /// Request id.
        request: u64,
        /// The bytes, base64.
        #[serde(default)]
        data: String,
        /// No more input.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        eof: bool,
    },
    /// The exec's terminal changed size.
    ExecResize {
        /// Request id.
        request: u64,
        /// The new size.
        size: TermSize,
    },
    /// End an exec: its stream is dropped (the engine cannot kill an exec's process; it
    /// gets end-of-file on stdin and ends with the container at the latest).
    CancelExec {
        /// Request id.
        request: u64,
    },
    /// The controller refuses the connection or a message; the text says why.
    Error {
        /// Machine-readable code.
        code: String,
        /// What was wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_version() {
        let m = AgentMessage::Removed {
            task: "web-abc123-0".into(),
        };
        let text = encode(&m);
        assert!(text.contains("\"v\":1"), "{text}");
        assert_eq!(decode::<AgentMessage>(&text).expect("decodes"), m);
    }

    #[test]
    fn heartbeats_of_agents_without_health_fields_still_parse() {
        let old = r#"{"v":1,"type":"heartbeat","metrics":{"at":"2026-01-01T00:00:00Z","cpuPercent":12.5,"memoryUsedBytes":1,"memoryTotalBytes":2,"load1":0.5}}"#;
        let Ok(AgentMessage::Heartbeat { metrics }) = decode::<AgentMessage>(old) else {
            panic!("an old heartbeat must parse");
        };
        assert_eq!(metrics.cpu_percent, 12.5);
        assert_eq!(metrics.temperature_celsius, None);
        assert_eq!(metrics.containers, None);
        // And a new one round-trips, leaving out what is unknown.
        let m = NodeMetrics {
            temperature_celsius: Some(51.5),
            throttled: Some(0x50005),
            ..metrics
        };
        let text = encode(&AgentMessage::Heartbeat { metrics: m.clone() });
        assert!(!text.contains("load5"), "{text}");
        assert_eq!(
            decode::<AgentMessage>(&text).expect("decodes"),
            AgentMessage::Heartbeat { metrics: m }
        );
    }

    #[test]
    fn hellos_of_agents_without_identity_fields_still_parse() {
        let old = r#"{"v":1,"type":"hello","node":{"name":"pi1","arch":"arm64","cores":4,"memoryBytes":1,"dockerVersion":"20.10","agentVersion":"0.1.0"},"tasks":[]}"#;
        let Ok(AgentMessage::Hello { node, .. }) = decode::<AgentMessage>(old) else {
            panic!("an old hello must parse");
        };
        assert_eq!(
            (node.machine_id, node.memory_limits, node.warnings),
            (None, None, vec![])
        );
    }

    #[test]
    fn endpoint_changes_are_opt_in_and_named_on_the_wire() {
        let old = r#"{"v":1,"type":"hello","node":{"name":"pi1","arch":"arm64","cores":4,"memoryBytes":1,"dockerVersion":"20.10","agentVersion":"0.1.0"},"tasks":[]}"#;
        let Ok(AgentMessage::Hello {
            endpoint_changes, ..
        }) = decode::<AgentMessage>(old)
        else {
            panic!("an old hello must parse");
        };
        assert!(!endpoint_changes, "an older agent is sent whole tables");
        assert!(encode(&pi_hello()).contains(r#""endpoint_changes":true"#));

        let m = ControllerMessage::EndpointChanges {
            revision: 9,
            changes: crate::endpoints::Changes {
                range: crate::endpoints::DEFAULT_RANGE,
                set: Vec::new(),
                removed: vec![crate::endpoints::Gone {
                    kind: crate::manifest::Kind::Wallet,
                    name: "coin".into(),
                }],
            },
        };
        let text = encode(&m);
        assert_eq!(
            text,
            r#"{"v":1,"type":"endpointChanges","revision":9,"changes":{"range":"169.254.100.0/22","removed":[{"kind":"Wallet","name":"coin"}]}}"#
        );
        assert_eq!(decode::<ControllerMessage>(&text).expect("decodes"), m);
    }

    #[test]
    fn standby_links_are_opt_in_on_both_sides() {
        // Messages of agents and controllers that predate standby links.
        let old_welcome =
            r#"{"v":1,"type":"welcome","node":"pi","heartbeat_ms":250,"fence_ms":1500}"#;
        let Ok(ControllerMessage::Welcome { standby, .. }) = decode(old_welcome) else {
            panic!(
                "an old welcome still decodes: {:?}",
                decode::<ControllerMessage>(old_welcome)
            )
        };
        assert!(!standby, "an old controller's link is a leader's");
        let AgentMessage::Hello { standby, .. } = pi_hello() else {
            unreachable!()
        };
        assert!(!standby);
        let text = encode(&pi_hello());
        assert!(!text.contains("standby"), "not sent when false: {text}");
        // The vouch is a bare tag.
        let v = encode(&ControllerMessage::Vouch);
        assert!(v.contains(r#""type":"vouch""#), "{v}");
        assert_eq!(
            decode::<ControllerMessage>(&v).ok(),
            Some(ControllerMessage::Vouch)
        );
    }

    /// A Raspberry Pi 3 as its agent describes itself.
    fn pi_hello() -> AgentMessage {
        AgentMessage::Hello {
            not_before: true,
            endpoint_changes: true,
            csr: None,
            node: NodeInfo {
                mesh: None,
                name: "pool-1a2b3c".into(),
                arch: Arch::Arm64,
                cores: 4,
                memory_bytes: 948 << 20,
                docker_version: "20.10.24+dfsg1".into(),
                labels: [
                    ("disk".to_string(), "ssd".to_string()),
                    ("zone".into(), "shelf-2".into()),
                ]
                .into(),
                agent_version: "0.1.0".into(),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                machine_id: Some("00000000a1b2c3d4".into()),
                memory_limits: Some(false),
                warnings: vec![format!(
                    "memory limits are not enforced: {}",
                    "x".repeat(300)
                )],
            },
            tasks: vec![TaskStatus {
                task: "payout-0123ab-0".into(),
                phase: TaskPhase::Succeeded,
                exit_code: Some(0),
                message: None,
                container_id: Some("f".repeat(64)),
                restarts: 0,
                ready: None,
                started_at: None,
                finished_at: None,
                gave_up: false,
                output: Some("paid 3 miners\n".repeat(4000)),
                reason: None,
                restart_at: None,
            }],
            credential: Some(Secret("c".repeat(64))),
            standby: false,
        }
    }

    /// A Pi 3's heartbeat with a handful of tasks.
    fn pi_heartbeat() -> NodeMetrics {
        NodeMetrics {
            at: "2026-11-21T16:31:02Z".parse().expect("time"),
            cpu_percent: 37.5,
            memory_used_bytes: 412 << 20,
            memory_total_bytes: 948 << 20,
            load1: 1.25,
            cores_percent: Some(vec![40.0, 35.0, 30.0, 45.0]),
            memory_available_bytes: Some(500 << 20),
            load5: Some(1.0),
            load15: Some(0.8),
            data_disk: Some(DiskUsage {
                path: "/var/lib/bramble-agent".into(),
                free_bytes: 20 << 30,
                total_bytes: 29 << 30,
            }),
            docker_disk: None,
            temperature_celsius: Some(61.2),
            throttled: Some(0x50000),
            containers: Some(
                (0..10)
                    .map(|i| ContainerUsage {
                        task: format!("stratum-0123ab-{i}"),
                        cpu_percent: Some(12.5),
                        memory_bytes: Some(30 << 20),
                    })
                    .collect(),
            ),
        }
    }

    fn status(task: &str) -> TaskStatus {
        let AgentMessage::Hello { mut tasks, .. } = pi_hello() else {
            unreachable!("pi_hello is a hello")
        };
        let mut t = tasks.remove(0);
        t.task = task.into();
        t
    }

    #[test]
    fn heartbeats_decode_the_same_by_the_fast_path_as_the_general_way() {
        let hb = encode(&AgentMessage::Heartbeat {
            metrics: pi_heartbeat(),
        });
        let old = r#"{"v":1,"type":"heartbeat","metrics":{"at":"2026-01-01T00:00:00Z","cpuPercent":12.5,"memoryUsedBytes":1,"memoryTotalBytes":2,"load1":0.5}}"#;
        let frames = [
            hb.clone(),
            old.to_string(),
            // Keys in another order, an unknown field, an escaped tag.
            r#"{"metrics":{"at":"2026-01-01T00:00:00Z","cpuPercent":1,"memoryUsedBytes":1,"memoryTotalBytes":2,"load1":0},"type":"heartbeat","v":1,"extra":[1,{"a":2}]}"#.into(),
            r#"{"v":1,"type":"heart\u0062eat","metrics":{"at":"2026-01-01T00:00:00Z","cpuPercent":1,"memoryUsedBytes":1,"memoryTotalBytes":2,"load1":0}}"#.into(),
            // Errors: another version, no metrics, metrics twice, a tag twice, a bad
            // value, a value over a limit, not JSON, another type.
            hb.replacen("\"v\":1", "\"v\":2", 1),
            r#"{"v":1,"type":"heartbeat"}"#.into(),
            old.replacen("}}", "},\"metrics\":{}}", 1),
            old.replacen("\"type\":\"heartbeat\"", "\"type\":\"heartbeat\",\"type\":\"heartbeat\"", 1),
            old.replacen("12.5", "\"12.5\"", 1),
            old.replacen("12.5", "1e9", 1),
            old[..old.len() - 3].to_string(),
            encode(&AgentMessage::Removed { task: "web-abc-0".into() }),
        ];
        for f in &frames {
            let fast = decode_agent(f).map_err(|e| e.to_string());
            let reference = decode_agent_reference(f).map_err(|e| e.to_string());
            assert_eq!(fast, reference, "frame {f}");
        }
        assert!(decode_agent(&hb).is_ok());
        assert!(decode_agent(&frames[4]).is_err());
    }

    #[test]
    fn a_normal_pi_hello_heartbeat_and_status_pass_the_limits() {
        for msg in [
            pi_hello(),
            AgentMessage::Heartbeat {
                metrics: pi_heartbeat(),
            },
            AgentMessage::Status {
                status: status("web-0123ab-1"),
            },
            AgentMessage::Removed {
                task: "web-0123ab-1".into(),
            },
            AgentMessage::LogEnd {
                request: 1,
                error: Some("container gone".into()),
            },
        ] {
            assert_eq!(msg.validate(), Ok(()), "{msg:?}");
            let text = encode(&msg);
            assert_eq!(decode_agent(&text).expect("accepted"), msg);
            let mut capped = msg.clone();
            assert!(!capped.cap(), "nothing to cut");
            assert_eq!(capped, msg);
        }
    }

    /// A message with one field changed, the field the error must name and a part of its
    /// problem.
    type Oversize = (&'static str, AgentMessage, &'static str, &'static str);

    fn oversizes() -> Vec<Oversize> {
        let hello = |f: &dyn Fn(&mut NodeInfo)| {
            let mut m = pi_hello();
            if let AgentMessage::Hello { node, .. } = &mut m {
                f(node);
            }
            m
        };
        let beat = |f: &dyn Fn(&mut NodeMetrics)| {
            let mut m = pi_heartbeat();
            f(&mut m);
            AgentMessage::Heartbeat { metrics: m }
        };
        let stat = |f: &dyn Fn(&mut TaskStatus)| {
            let mut s = status("web-0123ab-1");
            f(&mut s);
            AgentMessage::Status { status: s }
        };
        let long = |n: usize| "x".repeat(n);
        vec![
            (
                "node name",
                hello(&|n| n.name = long(64)),
                "node.name",
                "not a valid node name",
            ),
            (
                "bad node name",
                hello(&|n| n.name = "Pi 1".into()),
                "node.name",
                "not a valid node name",
            ),
            (
                "65 labels",
                hello(&|n| n.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()),
                "node.labels",
                "65 labels, more than the limit of 64",
            ),
            (
                "label key",
                hello(&|n| {
                    n.labels.insert(long(64), "v".into());
                }),
                "node.labels[1]",
                "invalid key: use 1 to 63",
            ),
            (
                "label value",
                hello(&|n| {
                    n.labels.insert("disk".into(), long(254));
                }),
                "node.labels[0]",
                "invalid value: at most 253 bytes",
            ),
            (
                "os",
                hello(&|n| n.os = long(257)),
                "node.os",
                "257 bytes, more than the limit of 256 bytes",
            ),
            (
                "docker version",
                hello(&|n| n.docker_version = long(2_700_000)),
                "node.dockerVersion",
                "2700000 bytes, more than the limit of 256 bytes",
            ),
            (
                "agent version",
                hello(&|n| n.agent_version = long(257)),
                "node.agentVersion",
                "limit of 256 bytes",
            ),
            (
                "machine id",
                hello(&|n| n.machine_id = Some(long(257))),
                "node.machineId",
                "limit of 256 bytes",
            ),
            (
                "17 warnings",
                hello(&|n| n.warnings = vec!["w".into(); 17]),
                "node.warnings",
                "17 warnings, more than the limit of 16",
            ),
            (
                "a long warning",
                hello(&|n| n.warnings = vec!["w".into(), long(513)]),
                "node.warnings[1]",
                "513 bytes, more than the limit of 512 bytes",
            ),
            (
                "hello tasks",
                {
                    let mut m = pi_hello();
                    if let AgentMessage::Hello { tasks, .. } = &mut m {
                        *tasks = vec![status("a-0123ab-0"); 1025];
                    }
                    m
                },
                "tasks",
                "1025 tasks, more than the limit of 1024",
            ),
            (
                "a hello task's message",
                {
                    let mut m = pi_hello();
                    if let AgentMessage::Hello { tasks, .. } = &mut m {
                        tasks[0].message = Some(long(4097));
                    }
                    m
                },
                "tasks[0].message",
                "4097 bytes, more than the limit of 4096 bytes",
            ),
            (
                "cores",
                beat(&|m| m.cores_percent = Some(vec![1.0; 257])),
                "metrics.coresPercent",
                "257 entries, more than the limit of 256",
            ),
            (
                "containers",
                beat(&|m| {
                    m.containers = Some(
                        (0..257)
                            .map(|i| ContainerUsage {
                                task: format!("t-{i}"),
                                cpu_percent: None,
                                memory_bytes: None,
                            })
                            .collect(),
                    )
                }),
                "metrics.containers",
                "257 entries, more than the limit of 256",
            ),
            (
                "a container's task id",
                beat(&|m| {
                    if let Some(cs) = &mut m.containers {
                        cs[3].task = long(254);
                    }
                }),
                "metrics.containers[3].task",
                "254 bytes, more than the limit of 253 bytes",
            ),
            (
                "disk path",
                beat(&|m| {
                    if let Some(d) = &mut m.data_disk {
                        d.path = long(257);
                    }
                }),
                "metrics.dataDisk.path",
                "limit of 256 bytes",
            ),
            (
                "infinite CPU",
                beat(&|m| m.cpu_percent = f32::INFINITY),
                "metrics.cpuPercent",
                "not a finite number",
            ),
            (
                "NaN core",
                beat(&|m| m.cores_percent = Some(vec![1.0, f32::NAN])),
                "metrics.coresPercent[1]",
                "not a finite number",
            ),
            (
                "status message",
                stat(&|s| s.message = Some(long(4097))),
                "status.message",
                "4097 bytes, more than the limit of 4096 bytes",
            ),
            (
                "status output",
                stat(&|s| s.output = Some(long(MAX_OUTPUT_BYTES + 1))),
                "status.output",
                "65537 bytes, more than the limit of 65536 bytes",
            ),
            (
                "status task id",
                stat(&|s| s.task = long(254)),
                "status.task",
                "limit of 253 bytes",
            ),
            (
                "container id",
                stat(&|s| s.container_id = Some(long(129))),
                "status.containerId",
                "limit of 128 bytes",
            ),
            (
                "removed task id",
                AgentMessage::Removed { task: long(254) },
                "task",
                "limit of 253 bytes",
            ),
            (
                "log stream error",
                AgentMessage::LogEnd {
                    request: 1,
                    error: Some(long(4097)),
                },
                "error",
                "limit of 4096 bytes",
            ),
        ]
    }

    #[test]
    fn every_field_beyond_its_limit_is_refused_with_its_name_and_limit() {
        for (what, msg, field, problem) in oversizes() {
            let e = msg.validate().expect_err(what);
            assert_eq!(e.field, field, "{what}: {e}");
            assert!(e.problem.contains(problem), "{what}: {e}");
            assert!(
                e.to_string().len() < 200,
                "{what}: the value is never echoed"
            );
            // Through the controller's decoder too (NaN cannot be written in JSON).
            let text = encode(&msg);
            if text.len() <= MAX_FRAME_BYTES && !what.contains("NaN") && !what.contains("infinite")
            {
                match decode_agent(&text) {
                    Err(WireError::Invalid(got)) => assert_eq!(got, e, "{what}"),
                    Err(WireError::TooLargeFor { .. }) => {}
                    other => panic!("{what}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn what_an_agent_caps_passes_the_limits() {
        for (what, mut msg, _, _) in oversizes() {
            msg.cap();
            match msg.validate() {
                Ok(()) => {}
                // Names, labels and ids cannot be cut and still mean the same: the agent
                // refuses bad names and labels at start instead.
                Err(e) => assert!(
                    [
                        "node.name",
                        "node.labels",
                        "node.labels[1]",
                        "node.labels[0]",
                        "status.task",
                        "status.containerId",
                        "task"
                    ]
                    .contains(&e.field.as_str()),
                    "{what}: {e}"
                ),
            }
        }
        let mut s = status("w-0123ab-0");
        s.message = Some("é".repeat(3000));
        s.output = Some(format!("{}end\n", "ö".repeat(40_000)));
        assert!(s.cap());
        let m = s.message.as_deref().unwrap_or_default();
        assert!(
            m.len() <= MAX_MESSAGE_BYTES && m.starts_with('é'),
            "cut at a character"
        );
        let o = s.output.as_deref().unwrap_or_default();
        assert!(
            o.len() <= MAX_OUTPUT_BYTES && o.ends_with("end\n"),
            "the end is kept"
        );
    }

    #[test]
    fn a_heartbeat_within_every_limit_fits_its_frame_and_a_bigger_frame_is_refused_unread() {
        let widest = NodeMetrics {
            cores_percent: Some(vec![100.0; MAX_CORES]),
            containers: Some(
                (0..MAX_CONTAINERS)
                    .map(|_| ContainerUsage {
                        task: "t".repeat(MAX_TASK_ID),
                        cpu_percent: Some(-1.234_567_8e-30),
                        memory_bytes: Some(u64::MAX),
                    })
                    .collect(),
            ),
            data_disk: Some(DiskUsage {
                path: "p".repeat(MAX_INFO_TEXT),
                free_bytes: u64::MAX,
                total_bytes: u64::MAX,
            }),
            docker_disk: Some(DiskUsage {
                path: "p".repeat(MAX_INFO_TEXT),
                free_bytes: u64::MAX,
                total_bytes: u64::MAX,
            }),
            ..pi_heartbeat()
        };
        let text = encode(&AgentMessage::Heartbeat { metrics: widest });
        assert!(
            text.len() < MAX_HEARTBEAT_FRAME_BYTES,
            "{} bytes",
            text.len()
        );
        assert!(decode_agent(&text).is_ok());

        // The fake node's heartbeat: 2.7 MB of per-core figures.
        let fat = NodeMetrics {
            cores_percent: Some(vec![99.999_99; 300_000]),
            ..pi_heartbeat()
        };
        let text = encode(&AgentMessage::Heartbeat { metrics: fat });
        assert!(text.len() > 2_000_000 && text.len() < MAX_FRAME_BYTES);
        assert!(matches!(
            decode_agent(&text),
            Err(WireError::TooLargeFor {
                kind: "heartbeat",
                limit: MAX_HEARTBEAT_FRAME_BYTES,
                ..
            })
        ));
        // A Hello of that size is fine: it carries finished runs' output.
        let AgentMessage::Hello { node, .. } = pi_hello() else {
            unreachable!()
        };
        let big = AgentMessage::Hello {
            not_before: true,
            endpoint_changes: true,
            csr: None,
            node,
            tasks: (0..40)
                .map(|i| status(&format!("job-0123ab-{i}")))
                .collect(),
            credential: None,
            standby: true,
        };
        let text = encode(&big);
        assert!(text.len() > MAX_HEARTBEAT_FRAME_BYTES);
        assert!(decode_agent(&text).is_ok());
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        assert!(matches!(
            decode::<AgentMessage>(r#"{"v":2,"type":"removed","task":"x"}"#),
            Err(WireError::Version { got: 2 })
        ));
        assert!(matches!(
            decode::<AgentMessage>("not json"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<AgentMessage>(r#"{"v":1,"type":"launchMissiles"}"#),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<AgentMessage>(r#"{"type":"removed","task":"x"}"#),
            Err(WireError::Malformed(_))
        ));
        let huge = "x".repeat(MAX_FRAME_BYTES + 1);
        assert!(matches!(
            decode::<AgentMessage>(&huge),
            Err(WireError::TooLarge(_))
        ));
    }
}
