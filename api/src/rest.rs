//! Request and response bodies of the REST API under `/v1`.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/version` | | [`VersionInfo`] |
//! | `GET /v1/status` | | [`StatusInfo`] |
//! | `POST /v1/apply` | [`ApplyRequest`] | [`ApplyResponse`] |
//! | `GET /v1/workloads[?kind=K]` | | `Vec<`[`WorkloadView`]`>` |
//! | `GET /v1/workloads/{kind}/{name}` | | [`WorkloadView`] |
//! | `DELETE /v1/workloads/{kind}/{name}` | | [`DeleteResponse`] |
//! | `GET /v1/nodes`, `GET /v1/nodes/{name}` | | [`NodeView`] |
//! | `GET /v1/tasks[?workload=W&node=N]`, `GET /v1/tasks/{id}` | | [`crate::task::Task`] |
//! | `GET /v1/tasks/{id}/logs?follow=&tail=` | | `text/plain`, streamed |
//! | `POST /v1/nodes/{name}/cordon`, `.../uncordon` | | [`NodeView`] |
//! | `POST /v1/nodes/{name}/drain?timeout=5m` | | [`DrainResponse`] (waits until empty or timeout) |
//! | `GET /v1/events[?since=SEQ&object=O&watch=true]` | | `Vec<`[`Event`]`>`; with `watch`, newline-delimited JSON events as they happen |
//! | `GET /v1/cronjobs`, `GET /v1/cronjobs/{name}` | | [`CronJobView`] |
//! | `POST /v1/cronjobs/{name}/run` | | [`crate::task::Task`] (the run started now) |
//! | `POST /v1/cronjobs/{name}/suspend`, `.../resume` | | [`CronJobView`] |
//! | `GET /v1/agent` | WebSocket, see [`crate::wire`] | |
//! | `POST /v1/workloads/{kind}/{name}/restart` | | [`RestartResponse`] (running tasks evicted, then placed again) |
//! | `GET /v1/webhooks` | | `Vec<`[`WebhookView`]`>` |
//! | `POST /v1/webhooks/{name}/test` | | [`WebhookTestResponse`] (one delivery, no retries) |
//! | `GET /v1/stream` | | `text/event-stream`: a `snapshot` event, then `nodes`, `tasks`, `workloads`, `cronjobs` and `events` as they change (the dashboard's feed) |
//! | `GET /metrics` (not under `/v1`) | | Prometheus text format; any token |
//!
//! Every endpoint needs `Authorization: Bearer TOKEN`. Errors are [`ApiErrorBody`].
//! A viewer token (read-only) may use every `GET` under `/v1` except `/v1/agent`;
//! anything else answers 403 with code `forbidden`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::manifest::{Kind, Manifest, VolumeSync};
use crate::parse::ManifestError;
// `Source` is what `parse` reads, so it lives there; it is also the body of
// `POST /v1/apply`, so it is found here too.
pub use crate::parse::Source;
use crate::wire::{NodeInfo, NodeMetrics, SyncOutcome, VolumeOrigin};

/// Release and protocol versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// Release.
    pub version: String,
    /// Manifest apiVersion.
    pub api_version: String,
    /// Agent protocol version.
    pub protocol: u32,
}

/// `POST /v1/apply`: create or update every workload in the sources, all or nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRequest {
    /// The manifest files.
    pub sources: Vec<Source>,
    /// Validate only; store nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What apply did to one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// It was new.
    Created,
    /// It changed.
    Configured,
    /// It was already so.
    Unchanged,
}

impl std::fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

/// One workload's apply result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// What happened.
    pub outcome: ApplyOutcome,
    /// The fields that change (configured workloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<crate::diff::FieldChange>,
    /// Tasks stopped and started afresh: their container changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
    /// Tasks added (more replicas, or a new workload's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub added: u32,
    /// Tasks removed (fewer replicas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Why tasks are replaced when no field of the workload changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `POST /v1/apply` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// One per workload, in the order given, then the stored workloads reconfigured
    /// because a Secret they reference changed.
    pub results: Vec<ApplyResult>,
    /// One per Secret, in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretApplyResult>,
}

/// One Secret's apply result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretApplyResult {
    /// Name.
    pub name: String,
    /// What happened.
    pub outcome: ApplyOutcome,
}

/// A Secret as the API shows it: its keys, never its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    /// Name.
    pub name: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The keys of its data.
    pub keys: Vec<String>,
    /// Bumped on every change.
    pub generation: u64,
    /// The workloads (`kind/name`) whose env references it.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// First applied.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// `DELETE /v1/secrets/{name}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretDeleteResponse {
    /// Name.
    pub name: String,
}

/// A managed volume (`GET /v1/volumes`): the node using it, its copies and what is set
/// aside of it, as the nodes last reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    /// The volume's name.
    pub name: String,
    /// The workload that mounts it.
    pub workload: String,
    /// Its kind, when the workload exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// How it follows the workload (none: it stays on its node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<VolumeSync>,
    /// The node using it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Size of its files there.
    pub bytes: u64,
    /// Number of its files there.
    pub files: u64,
    /// The placement using it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Where its data came from when that placement started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<VolumeOrigin>,
    /// Its last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncOutcome>,
    /// Complete copies on standby nodes, newest first.
    #[serde(default)]
    pub copies: Vec<VolumeCopyView>,
    /// Data of earlier placements set aside for the operator.
    #[serde(default)]
    pub set_aside: Vec<VolumeCopyView>,
}

/// A copy of a volume on a node, or data set aside there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCopyView {
    /// The node.
    pub node: String,
    /// The placement it is of.
    pub epoch: u64,
    /// When it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// Size of its files.
    pub bytes: u64,
    /// Number of files.
    pub files: u64,
    /// Of an older placement than the one running now.
    #[serde(default)]
    pub stale: bool,
    /// Set aside: where on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A workload with its desired and observed counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    /// The manifest as applied.
    pub manifest: Manifest,
    /// Bumped on every change of the manifest.
    pub generation: u64,
    /// Tasks wanted running.
    pub desired: u32,
    /// Tasks running now.
    pub running: u32,
    /// First applied.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// `DELETE /v1/workloads/{kind}/{name}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Tasks told to stop.
    pub tasks_stopped: u32,
}

/// A node's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Heartbeating.
    Ready,
    /// Heartbeats late.
    NotReady,
    /// Gone long enough that its tasks are replaced elsewhere.
    Dead,
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeStatus::Ready => "Ready",
            NodeStatus::NotReady => "NotReady",
            NodeStatus::Dead => "Dead",
        })
    }
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    /// What the agent reported.
    pub info: NodeInfo,
    /// Health.
    pub status: NodeStatus,
    /// Kept free of new tasks.
    pub cordoned: bool,
    /// Last heartbeat (controller clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    /// Last reported load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<NodeMetrics>,
    /// Tasks placed here.
    pub tasks: u32,
    /// CPU reserved by those tasks, millicores.
    pub allocated_cpu_millis: u64,
    /// Memory reserved by those tasks, bytes.
    pub allocated_memory_bytes: u64,
    /// Remote address of the agent's connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// First registered.
    pub registered_at: DateTime<Utc>,
}

/// A controller of the cluster, as `GET /v1/controllers` shows it. Every controller
/// listed is alive: its presence in the store lives on a lease it keeps renewing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerView {
    /// Its id (random per process start).
    pub id: String,
    /// Its name (the host name).
    pub name: String,
    /// Where agents and `bramblectl` reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When it started.
    pub started: DateTime<Utc>,
    /// Whether it leads (runs reconcile, scheduling, node health, cron, webhooks).
    pub leader: bool,
    /// Since when it leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_since: Option<DateTime<Utc>>,
    /// The controller that answered this request.
    pub answering: bool,
}

/// Every error answer: `{code, message, details}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Machine-readable, e.g. `invalid_manifest`, `not_found`, `unauthorized`.
    pub code: String,
    /// One line for people.
    pub message: String,
    /// Per-field problems of a rejected manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ManifestError>,
}

/// Labels as `k=v,k=v`, for tables.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "<none>".to_string();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Routine.
    Normal,
    /// Something failed or was lost, and was (or is being) healed.
    Warning,
}

/// A record of a decision or a change: scheduled, started, exited, restarted, probe
/// failed, node NotReady/Dead/back, replaced, fenced, drained…
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Increasing sequence number (resume a watch with `since`).
    pub seq: u64,
    /// When (controller clock).
    pub at: DateTime<Utc>,
    /// Normal or Warning.
    pub severity: Severity,
    /// The object, as `node/pi3`, `task/web-1a2b3c-0`, `service/web`.
    pub object: String,
    /// One CamelCase word: `Scheduled`, `Started`, `Exited`, `Restarted`, `ProbeFailed`,
    /// `NodeNotReady`, `NodeDead`, `NodeBack`, `Replaced`, `Fenced`, `Drained`, `GaveUp`…
    pub reason: String,
    /// For people.
    pub message: String,
}

/// `POST /v1/nodes/{name}/drain` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainResponse {
    /// The node.
    pub node: String,
    /// Tasks told to leave the node.
    pub moved: u32,
    /// Tasks still on the node when the timeout passed (0 when drained).
    pub remaining: u32,
    /// Of the tasks that left, those placed on another node.
    #[serde(default)]
    pub placed: u32,
    /// Of the tasks that left, those waiting for a node, with why (no other node fits,
    /// say): their workloads are not running until one does.
    #[serde(default)]
    pub pending: Vec<PendingTask>,
}

/// A task waiting for a node, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTask {
    /// Task id.
    pub task: String,
    /// Why no node takes it (the scheduler's summary).
    pub reason: String,
}

/// What happened to one CronJob slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FiringOutcome {
    /// A run was started.
    Fired,
    /// Missed by more than the starting deadline (controller down, clock jump): not run.
    Missed,
    /// Not run because the previous run was still active (`concurrencyPolicy: Forbid`).
    Skipped,
    /// Started by hand (`bramblectl cron run`).
    Manual,
}

/// The record of one slot, stored under a key unique to (job, slot) before anything is
/// dispatched, so a slot fires at most once whatever the controllers do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Firing {
    /// The scheduled time.
    pub slot: DateTime<Utc>,
    /// What happened.
    pub outcome: FiringOutcome,
    /// The run's task id, when one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// When the controller decided (lateness = this − slot).
    pub decided_at: DateTime<Utc>,
}

/// A CronJob as `get cronjobs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CronJobView {
    /// Name.
    pub name: String,
    /// Cron expression.
    pub schedule: String,
    /// IANA time zone.
    pub timezone: String,
    /// Not firing (by manifest or by `cron suspend`).
    pub suspended: bool,
    /// Last slot decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_slot: Option<DateTime<Utc>>,
    /// Phase of the newest run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<crate::task::TaskPhase>,
    /// Next slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<DateTime<Utc>>,
    /// Runs active now.
    pub active: u32,
    /// Recent slots, newest first.
    #[serde(default)]
    pub firings: Vec<Firing>,
}

/// The controller's own state, for operators and benchmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusInfo {
    /// Release.
    pub version: String,
    /// The store's revision.
    pub revision: u64,
    /// Store write transactions since the controller started (a cluster at rest makes
    /// none: SD cards wear out).
    pub store_writes: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// `POST /v1/workloads/{kind}/{name}/restart` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartResponse {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Tasks told to stop and start again (all at once, not rolling).
    pub tasks_restarted: u32,
}

/// `POST /v1/workloads/{kind}/{name}/scale?replicas=N` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleResponse {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Replicas before.
    pub previous: u32,
    /// Replicas now.
    pub replicas: u32,
}

/// `POST /v1/tasks/{id}/restart` answer: the task stops on its node, then is placed
/// and started again (a Wallet never runs twice meanwhile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRestartResponse {
    /// The task.
    pub task: String,
    /// When the restart was asked for (controller clock): a run started after it is
    /// the new one.
    pub requested_at: DateTime<Utc>,
}

/// A configured webhook with its delivery counters since the controller started
/// (`GET /v1/webhooks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    /// Name from `webhooks.yaml`.
    pub name: String,
    /// Receiver URL (for a viewer token, only scheme, host and port).
    pub url: String,
    /// Event reasons or severities it receives; empty means every Warning event.
    pub events: Vec<String>,
    /// Whether deliveries carry an `X-Bramble-Signature` (a secret is configured).
    pub signed: bool,
    /// Events delivered (the receiver answered 2xx).
    pub sent: u64,
    /// Events given up after every retry, or refused by the receiver with a 4xx.
    pub failed: u64,
    /// Events dropped without a try because the queue was full.
    pub dropped: u64,
    /// Deliveries waiting in the queue now.
    pub queued: u64,
    /// The last failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last delivery succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_at: Option<DateTime<Utc>>,
}

/// `POST /v1/webhooks/{name}/test` answer: what the receiver said to one test event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookTestResponse {
    /// The webhook.
    pub name: String,
    /// The receiver answered 2xx.
    pub ok: bool,
    /// The receiver's HTTP status, when it answered at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed (connection refused, timeout, non-2xx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds until the answer.
    pub elapsed_ms: u64,
}

/// The JSON body a webhook receives, signed with `X-Bramble-Signature:
/// sha256=<hex HMAC-SHA256 of the body bytes>` when the webhook has a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// Which webhook this delivery is for.
    pub webhook: String,
    /// Sent by `POST /v1/webhooks/{name}/test`, not by the cluster.
    #[serde(default)]
    pub test: bool,
    /// The event.
    pub event: Event,
}
