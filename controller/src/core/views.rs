//! What the API shows, computed from a snapshot (and, for nodes, what is known of them
//! in memory): workloads with their running counts, nodes with their health and
//! allocation, tasks and events with filters.

use std::collections::BTreeMap;

use bramble_api::manifest::{EnvValue, Kind};
use bramble_api::rest::{Event, NodeStatus, NodeView, SecretView, WorkloadView};
use bramble_api::task::{DesiredState, Task, TaskPhase};
use bramble_api::wire::NodeMetrics;
use chrono::{DateTime, Utc};

use super::error::DomainError;
use super::model::{StoredSecret, StoredWorkload};
use super::secrets;
use super::snapshot::Snapshot;

/// What memory knows of a node: health, last contact, metrics, address.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// Health now.
    pub status: NodeStatus,
    /// Last heard (wall clock).
    pub last_seen: Option<DateTime<Utc>>,
    /// Last metrics.
    pub metrics: Option<NodeMetrics>,
    /// Agent address while connected.
    pub address: Option<String>,
}

fn workload_view(snap: &Snapshot, w: &StoredWorkload) -> WorkloadView {
    let running = snap
        .tasks_of(w.kind(), w.name())
        .filter(|t| t.value.desired == DesiredState::Running && t.value.phase == TaskPhase::Running)
        .count();
    WorkloadView {
        manifest: w.manifest.clone(),
        generation: w.generation,
        desired: w.manifest.replicas(),
        running: u32::try_from(running).unwrap_or(u32::MAX),
        created_at: w.created_at,
        updated_at: w.updated_at,
    }
}

/// All workloads, optionally of one kind.
pub fn workloads(snap: &Snapshot, kind: Option<Kind>) -> Vec<WorkloadView> {
    snap.workloads
        .values()
        .filter(|w| kind.is_none_or(|k| w.value.kind() == k))
        .map(|w| workload_view(snap, &w.value))
        .collect()
}

/// One workload.
pub fn workload(snap: &Snapshot, kind: Kind, name: &str) -> Result<WorkloadView, DomainError> {
    snap.workload(kind, name)
        .map(|w| workload_view(snap, &w.value))
        .ok_or_else(|| DomainError::not_found(kind.path(), name))
}

/// All nodes with health and allocation; `live` says what memory knows of each.
pub fn nodes(snap: &Snapshot, live: impl Fn(&str) -> Liveness) -> Vec<NodeView> {
    let mut per_node: BTreeMap<&str, (u32, u64, u64)> = BTreeMap::new();
    for t in snap.tasks.values() {
        if let Some(n) = t.value.node.as_deref() {
            let e = per_node.entry(n).or_default();
            e.0 += 1;
            e.1 += t.value.spec.resources.cpu.map_or(0, |c| c.millis());
            e.2 += t.value.spec.resources.memory.map_or(0, |m| m.bytes());
        }
    }
    snap.nodes
        .values()
        .map(|n| {
            let name = n.value.info.name.as_str();
            let l = live(name);
            let (count, cpu, mem) = per_node.get(name).copied().unwrap_or_default();
            NodeView {
                info: n.value.info.clone(),
                status: l.status,
                cordoned: n.value.cordoned,
                last_seen: l.last_seen,
                metrics: l.metrics,
                tasks: count,
                allocated_cpu_millis: cpu,
                allocated_memory_bytes: mem,
                address: l.address,
                registered_at: n.value.registered_at,
            }
        })
        .collect()
}

/// One node.
pub fn node(
    snap: &Snapshot,
    name: &str,
    live: impl Fn(&str) -> Liveness,
) -> Result<NodeView, DomainError> {
    if !snap.nodes.contains_key(name) {
        return Err(DomainError::not_found("node", name));
    }
    Ok(nodes(snap, live)
        .into_iter()
        .find(|n| n.info.name == name)
        .expect("the node is in the snapshot"))
}

/// Tasks, filtered by workload, node and kind.
pub fn tasks(
    snap: &Snapshot,
    workload: Option<&str>,
    node: Option<&str>,
    kind: Option<Kind>,
) -> Vec<Task> {
    snap.tasks
        .values()
        .map(|t| &t.value)
        .filter(|t| workload.is_none_or(|w| t.workload == w))
        .filter(|t| node.is_none_or(|n| t.node.as_deref() == Some(n)))
        .filter(|t| kind.is_none_or(|k| t.kind == k))
        .cloned()
        .collect()
}

/// One task.
pub fn task(snap: &Snapshot, id: &str) -> Result<Task, DomainError> {
    snap.task(id)
        .map(|t| t.value.clone())
        .ok_or_else(|| DomainError::not_found("task", id))
}

/// Whether an event is about `object` or one of its tasks (`service/web` matches
/// `service/web` and tasks `task/web-…` are asked for as `task/web`).
pub fn event_matches(e: &Event, object: Option<&str>) -> bool {
    object.is_none_or(|o| e.object == o || e.object.starts_with(&format!("{o}-")))
}

/// Stored events after `since`, oldest first, optionally only for one object.
pub fn events(snap: &Snapshot, since: u64, object: Option<&str>) -> Vec<Event> {
    snap.events()
        .filter(|e| e.seq > since && event_matches(e, object))
        .collect()
}

/// What a viewer (the read-only token) sees in place of an env value: names are shown,
/// values never (a wallet's RPC password may be one).
pub const REDACTED: &str = "<redacted>";

/// Env values as a viewer sees them: text redacted; Secret references (names, never
/// values) kept.
fn redact_env(env: &mut BTreeMap<String, EnvValue>) {
    for v in env.values_mut() {
        if let EnvValue::Text(t) = v {
            *t = REDACTED.to_string();
        }
    }
}

/// A workload as a viewer sees it: env values redacted.
pub fn redact_workload(mut w: WorkloadView) -> WorkloadView {
    redact_env(&mut w.manifest.spec.env);
    w
}

/// A task as a viewer sees it: env values redacted; a finished run's output only when
/// the admin allows viewers logs.
pub fn redact_task(mut t: Task, logs: bool) -> Task {
    redact_env(&mut t.spec.env);
    if !logs {
        t.output = None;
    }
    t
}

fn secret_view(snap: &Snapshot, s: &StoredSecret) -> SecretView {
    SecretView {
        name: s.name.clone(),
        labels: s.labels.clone(),
        keys: s.data.keys().cloned().collect(),
        generation: s.generation,
        used_by: secrets::used_by(snap, &s.name),
        created_at: s.created_at,
        updated_at: s.updated_at,
    }
}

/// Every Secret, by name: keys, never values.
pub fn secrets_list(snap: &Snapshot) -> Vec<SecretView> {
    snap.secrets
        .values()
        .map(|s| secret_view(snap, &s.value))
        .collect()
}

/// One Secret: keys, never values.
pub fn secret(snap: &Snapshot, name: &str) -> Result<SecretView, DomainError> {
    snap.secrets
        .get(name)
        .map(|s| secret_view(snap, &s.value))
        .ok_or_else(|| DomainError::not_found("secret", name))
}
