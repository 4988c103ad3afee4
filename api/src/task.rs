//! Tasks: one replica of a Service, the one instance of a Wallet, one run of a Job or
//! one firing of a CronJob. A task is placed on one node and becomes one container there.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::manifest::{
    EnvValue, Kind, Manifest, Placement, Port, Probes, Resources, Restart, SecretRef, Volume,
    VolumeSync,
};
pub use crate::reason::Reason;

/// What the agent needs to run one task's container. Two tasks with equal specs run
/// equal containers; a changed spec (image, env, …) means a new container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// Image reference.
    pub image: String,
    /// Replaces the image ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment. Secret references stay references here (so a spec, its hash and every
    /// view of it hold no secret value); the values travel in
    /// [`crate::wire::Assignment::secrets`], to the task's node only.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Bind mounts.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// CPU and memory limits.
    #[serde(default)]
    pub resources: Resources,
    /// Restart rule (always filled in: the kind's default if the manifest named none).
    pub restart: Restart,
    /// Health probes.
    #[serde(default)]
    pub probes: Probes,
    /// Job and CronJob: longest run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// How the managed volumes follow the task ([`Manifest::sync`]: filled in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<VolumeSync>,
}

impl TaskSpec {
    /// The container part of a workload's manifest.
    pub fn from_manifest(m: &Manifest) -> TaskSpec {
        let s = &m.spec;
        TaskSpec {
            image: s.image.clone(),
            command: s.command.clone(),
            args: s.args.clone(),
            env: s.env.clone(),
            ports: s.ports.clone(),
            volumes: s.volumes.clone(),
            resources: s.resources,
            restart: m.restart(),
            probes: s.probes.clone(),
            timeout: s.timeout,
            sync: m.sync(),
        }
    }

    /// The Secret references of the environment, by variable.
    pub fn secret_refs(&self) -> impl Iterator<Item = (&str, &SecretRef)> {
        self.env
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.secret_ref()?)))
    }

    /// A stable fingerprint of the spec (16 hex digits). Equal specs give equal hashes on
    /// every platform and release, since it hashes the canonical JSON form.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a TaskSpec always serializes");
        format!("{:016x}", fnv1a64(&json))
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// The most output kept of a finished run.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// FNV-1a, 64 bit: tiny, stable, good enough to tell specs apart (not for security).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether the controller wants a task's container to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DesiredState {
    /// Run it (and keep it running, per the restart policy).
    Running,
    /// Stop and remove it; the task record goes once its node confirms.
    Stopped,
    /// Stop it on its node (drain); once the node confirms it is gone, place it again
    /// elsewhere. Break-before-make, so a Wallet never runs twice while moving.
    Evicting,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskPhase {
    /// Waiting for a node (the task's message says why none fits).
    Pending,
    /// Placed on a node, not yet reported by it.
    Scheduled,
    /// The node is pulling the image or creating the container.
    Starting,
    /// The container is running.
    Running,
    /// The container exited 0 (final for Jobs; Services restart per policy).
    Succeeded,
    /// The container exited non-zero, or could not be created or started.
    Failed,
    /// The container was stopped on purpose.
    Stopped,
    /// The node lost it (node dead, or the container vanished).
    Lost,
}

impl TaskPhase {
    /// Whether the phase is the end of a run.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Stopped | TaskPhase::Lost
        )
    }
}

impl fmt::Display for TaskPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            TaskPhase::Pending => "Pending",
            TaskPhase::Scheduled => "Scheduled",
            TaskPhase::Starting => "Starting",
            TaskPhase::Running => "Running",
            TaskPhase::Succeeded => "Succeeded",
            TaskPhase::Failed => "Failed",
            TaskPhase::Stopped => "Stopped",
            TaskPhase::Lost => "Lost",
        };
        f.write_str(s)
    }
}

/// One task as the controller stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// Unique id, also the container's `bramble.task` label: `{workload}-{hash6}-{replica}`.
    pub id: String,
    /// The owning workload's kind.
    pub kind: Kind,
    /// The owning workload's name.
    pub workload: String,
    /// Replica index (0 for Wallets and Jobs).
    pub replica: u32,
    /// [`TaskSpec::hash`] of `spec`.
    pub spec_hash: String,
    /// What to run.
    pub spec: TaskSpec,
    /// Placement constraints, copied from the workload.
    #[serde(default)]
    pub placement: Placement,
    /// The node it is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Whether it should run.
    pub desired: DesiredState,
    /// Observed phase.
    pub phase: TaskPhase,
    /// Readiness, when the task has a readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Exit code of the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Why the task is where it is (why Pending, why Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Docker container id on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// How often the node restarted the container.
    #[serde(default)]
    pub restarts: u32,
    /// Nodes where the task gave up (too many failures); avoided when placing it again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
    /// CronJob: the scheduled time this run fires for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<DateTime<Utc>>,
    /// Job and CronJob: which attempt this is (0 = the first run, 1 = the first retry).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// A node gave this task up (too many failures there): it is placed again no
    /// earlier than this, with back-off, so a task that fails everywhere is retried
    /// slowly instead of never or in a tight loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// How many times in a row nodes gave this task up; the exponent of its back-off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub give_ups: u32,
    /// Wallets: the fencing token of the current placement, above the store revision
    /// every earlier placement was decided at (0 until placed). An agent never starts a
    /// Wallet of an older epoch than one it has seen, so a task set from a leader that
    /// has lost the lead cannot bring an old placement back.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub epoch: u64,
    /// Job and CronJob: the last 64 KiB of output, kept once the run has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// What an operator can act on, as its node named it (`CrashLoopBackOff`, …);
    /// the message says the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When its node tries again (restart, create or start), while it backs off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<DateTime<Utc>>,
    /// When the task was created.
    pub created_at: DateTime<Utc>,
    /// When its container last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When its container last finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl Task {
    /// A pending, unplaced task `id`: replica `replica` of `manifest`'s workload, whose
    /// spec hashes to `spec_hash` (with its Secrets' versions, which the manifest alone
    /// does not know).
    pub fn pending(
        id: String,
        manifest: &Manifest,
        spec_hash: String,
        replica: u32,
        now: DateTime<Utc>,
    ) -> Task {
        Task {
            id,
            kind: manifest.kind,
            workload: manifest.metadata.name.to_string(),
            replica,
            spec_hash,
            spec: TaskSpec::from_manifest(manifest),
            placement: manifest.spec.placement.clone(),
            node: None,
            desired: DesiredState::Running,
            phase: TaskPhase::Pending,
            ready: None,
            exit_code: None,
            message: None,
            container_id: None,
            restarts: 0,
            avoid: Vec::new(),
            slot: None,
            attempt: 0,
            retry_at: None,
            give_ups: 0,
            epoch: 0,
            output: None,
            reason: None,
            restart_at: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        }
    }
}

/// Docker labels every Bramble container carries.
pub mod labels {
    /// The task id.
    pub const TASK: &str = "bramble.task";
    /// The workload's name.
    pub const WORKLOAD: &str = "bramble.workload";
    /// The workload's kind (`Service`, `Wallet`, …).
    pub const KIND: &str = "bramble.kind";
    /// The node's name.
    pub const NODE: &str = "bramble.node";
    /// The task spec hash, so an adopted container can be checked against its task.
    pub const SPEC_HASH: &str = "bramble.spec-hash";
}

/// The container name of a task on a node: `bramble-{node}-{task id}`. The node is part
/// of the name because several nodes may share one Docker engine (test clusters), and a
/// task replaced on another node must never collide with its stale predecessor.
pub fn container_name(node: &str, task_id: &str) -> String {
    format!("bramble-{node}-{task_id}")
}

/// A task id for replica `replica` of workload `workload` at spec `spec_hash`.
pub fn task_id(workload: &str, spec_hash: &str, replica: u32) -> String {
    let short = spec_hash.get(..6).unwrap_or(spec_hash);
    format!("{workload}-{short}-{replica}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_manifests;

    fn spec(yaml: &str) -> TaskSpec {
        let docs = parse_manifests("t.yaml", yaml)
            .expect("valid manifest")
            .workloads;
        TaskSpec::from_manifest(&docs[0].manifest)
    }

    const BASE: &str = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  image: a:1\n  env: {A: '1', B: '2'}\n";

    #[test]
    fn equal_specs_hash_equal_whatever_the_key_order() {
        let other = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  env: {B: '2', A: '1'}\n  image: a:1\n";
        assert_eq!(spec(BASE).hash(), spec(other).hash());
    }

    #[test]
    fn replicas_do_not_change_the_hash_but_env_does() {
        let scaled = format!("{BASE}  replicas: 3\n");
        assert_eq!(spec(BASE).hash(), spec(&scaled).hash());
        let changed = BASE.replace("'2'", "'3'");
        assert_ne!(spec(BASE).hash(), spec(&changed).hash());
    }

    #[test]
    fn task_ids_are_names() {
        let id = task_id("web", "0123456789abcdef", 2);
        assert_eq!(id, "web-012345-2");
        assert_eq!(container_name("pi1", &id), "bramble-pi1-web-012345-2");
    }
}
