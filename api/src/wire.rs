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

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::health::{ContainerUsage, DiskUsage};
use crate::manifest::{Arch, Kind};
use crate::task::{TaskPhase, TaskSpec};
use crate::token::Secret;

/// The protocol version this release speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

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
}

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
        /// sends a WebSocket ping every heartbeat interval, so silence means a lost link.
        #[serde(default = "default_fence_ms")]
        fence_ms: u64,
    },
    /// The node's full desired task set; anything else with Bramble labels goes.
    Assign {
        /// Increases with every change, so a stale set is never applied over a newer one.
        revision: u64,
        /// Every task the node should run.
        tasks: Vec<Assignment>,
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
