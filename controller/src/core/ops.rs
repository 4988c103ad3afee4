//! The operations on the cluster, as pure functions from a snapshot and a request to a
//! [`Change`] (and an answer) or a [`DomainError`]: apply, delete, cordon, drain,
//! restart, and what agents report (task status, removal, registration). The `state`
//! layer commits the change in one transaction that re-checks everything it read; if
//! the snapshot has moved on meanwhile, the operation runs again on a fresh one.
//!
//! A restart and a drain work through eviction: each task is marked
//! `desired: Evicting`; its agent stops the container and reports it Removed; only then
//! is the task placed again and started afresh, so a Wallet never runs twice during
//! either. A restart stops all of a workload's tasks at once (not rolling): a Service is
//! briefly down, as with `docker restart`.

use std::collections::{BTreeMap, BTreeSet};

use bramble_api::manifest::Kind;
use bramble_api::parse::{ManifestError, Parsed};
use bramble_api::rest::{
    ApplyOutcome, ApplyResponse, ApplyResult, DeleteResponse, PendingTask, RestartResponse,
    ScaleResponse, SecretApplyResult,
};
use bramble_api::task::{DesiredState, Task};
use bramble_api::wire::{NodeInfo, TaskStatus};
use chrono::{DateTime, Utc};

use super::error::DomainError;
use super::events::{self, Draft};
use super::model::{self, StoredNode, StoredSecret, StoredWorkload, Versioned};
use super::reconcile;
use super::secrets::{self, Sealer, SecretApply};
use super::snapshot::{Change, Expect, Item, Snapshot, Write};

/// The most nodes a cluster takes (the budgets are set for 100 and measured at 1,000
/// with `bramble-bench scale`): a join beyond is refused until nodes are deleted.
pub const MAX_NODES: usize = 1024;

/// The most workloads one apply may create or change: its writes and its events go in
/// one transaction, and a store takes at most 128 ops in one.
pub const MAX_APPLY_CHANGES: usize = 100;

/// A managed volume belongs to one workload (its copies and set-aside data are that
/// workload's): a name another workload mounts, stored or in the same apply, is refused.
fn shared_volumes(snap: &Snapshot, docs: &Parsed) -> Vec<ManifestError> {
    let applied: BTreeSet<&str> = docs
        .workloads
        .iter()
        .map(|d| d.manifest.metadata.name.as_str())
        .collect();
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for w in snap.workloads.values().map(|w| &w.value) {
        if applied.contains(w.name()) {
            continue;
        }
        for v in w.manifest.spec.volumes.iter().filter_map(|v| v.managed()) {
            owner.insert(v, w.name());
        }
    }
    let mut errors = Vec::new();
    for d in &docs.workloads {
        let name = d.manifest.metadata.name.as_str();
        for (i, v) in d.manifest.spec.volumes.iter().enumerate() {
            let Some(vol) = v.managed() else { continue };
            match owner.get(vol) {
                Some(other) if *other != name => errors.push(ManifestError {
                    file: d.file.clone(),
                    line: d.name_at.0,
                    column: d.name_at.1,
                    field: format!("spec.volumes[{i}].name"),
                    message: format!(
                        "volume {vol:?} belongs to workload {other:?}: a managed volume has one workload (name this one differently)"
                    ),
                }),
                _ => {
                    owner.insert(vol, name);
                }
            }
        }
    }
    errors
}

/// Creates or updates every workload and Secret in `docs`, all or nothing. With
/// `dry_run` the answer says what would happen and the change is empty.
///
/// Every Secret reference must resolve once the apply is done: a workload cannot name a
/// Secret or key that is not there (or in the same apply), and a Secret cannot lose a
/// key a stored workload uses. Workloads referencing a Secret whose values change get a
/// new spec hash, so their tasks are replaced and start with the new values.
pub fn apply(
    snap: &Snapshot,
    docs: &Parsed,
    sealer: &dyn Sealer,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<(Change, ApplyResponse), DomainError> {
    let taken: Vec<ManifestError> = docs
        .workloads
        .iter()
        .filter_map(|d| {
            let name = d.manifest.metadata.name.as_str();
            let other = snap
                .workloads
                .keys()
                .find(|(k, n)| n == name && *k != d.manifest.kind)?;
            Some(ManifestError {
                file: d.file.clone(),
                line: d.name_at.0,
                column: d.name_at.1,
                field: "metadata.name".into(),
                message: format!(
                    "the name {name:?} is already used by {} {name:?}; workload names are unique across kinds (delete that one first)",
                    other.0.path()
                ),
            })
        })
        .collect();
    if !taken.is_empty() {
        return Err(DomainError::InvalidManifest(taken));
    }
    let shared = shared_volumes(snap, docs);
    if !shared.is_empty() {
        return Err(DomainError::InvalidManifest(shared));
    }
    let mut writes = Vec::new();
    let mut drafts = Vec::new();
    let mut results = Vec::new();
    let mut secret_results = Vec::new();

    // Secrets first: the workloads' hashes and references are checked against them as
    // they will be.
    let mut after: BTreeMap<String, StoredSecret> = snap
        .secrets
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for d in &docs.secrets {
        let name = d.secret.metadata.name.as_str();
        let existing = snap.secrets.get(name);
        let outcome =
            match secrets::apply_secret(existing.map(|v| &v.value), &d.secret, sealer, now)? {
                SecretApply::Unchanged => ApplyOutcome::Unchanged,
                SecretApply::Store(s) => {
                    let outcome = if existing.is_some() {
                        ApplyOutcome::Configured
                    } else {
                        ApplyOutcome::Created
                    };
                    writes.push(Write {
                        key: model::secret_key(name),
                        expect: Expect::of(existing.map_or(0, |v| v.rev)),
                        value: Some(Item::Secret((*s).clone())),
                    });
                    // Which keys, never a value.
                    drafts.push(Draft::normal(
                        format!("secret/{name}"),
                        "Applied",
                        format!(
                            "{outcome}: keys {}",
                            s.data.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                    after.insert(name.to_string(), *s);
                    changed.insert(name.to_string());
                    outcome
                }
            };
        secret_results.push(SecretApplyResult {
            name: name.to_string(),
            outcome,
        });
    }

    let keys: BTreeMap<&str, Vec<&str>> = after
        .iter()
        .map(|(n, s)| (n.as_str(), s.data.keys().map(String::as_str).collect()))
        .collect();
    let applied: BTreeSet<(Kind, &str)> = docs
        .workloads
        .iter()
        .map(|d| (d.manifest.kind, d.manifest.metadata.name.as_str()))
        .collect();
    let mut dangling = Vec::new();
    for d in &docs.workloads {
        for dg in secrets::dangling(&d.manifest, &keys) {
            let at = d.env_at.get(&dg.var).copied().unwrap_or(d.name_at);
            dangling.push(ManifestError {
                file: d.file.clone(),
                line: at.0,
                column: at.1,
                field: format!("spec.env.{}", dg.var),
                message: dg.message(),
            });
        }
    }
    for w in snap.workloads.values() {
        if applied.contains(&(w.value.kind(), w.value.name())) {
            continue;
        }
        for dg in secrets::dangling(&w.value.manifest, &keys) {
            let Some(d) = docs
                .secrets
                .iter()
                .find(|d| d.secret.metadata.name.as_str() == dg.reference.secret.as_str())
            else {
                continue;
            };
            dangling.push(ManifestError {
                file: d.file.clone(),
                line: d.line,
                column: 1,
                field: "data".into(),
                message: format!(
                    "key {:?} is used by {}/{} (spec.env.{}): keep it, or change that workload in the same apply",
                    dg.reference.key,
                    w.value.kind().path(),
                    w.value.name(),
                    dg.var
                ),
            });
        }
    }
    if !dangling.is_empty() {
        return Err(DomainError::InvalidManifest(dangling));
    }

    for d in &docs.workloads {
        let m = &d.manifest;
        let name = m.metadata.name.as_str();
        let hash = secrets::spec_hash(m, &after);
        let existing = snap.workload(m.kind, name);
        let (outcome, new, rev) = match existing {
            None => (
                ApplyOutcome::Created,
                Some(StoredWorkload::new(m.clone(), now).with_spec_hash(hash)),
                0,
            ),
            Some(v) => match v.value.updated(m.clone(), hash, now) {
                None => (ApplyOutcome::Unchanged, None, v.rev),
                Some(n) => (ApplyOutcome::Configured, Some(n), v.rev),
            },
        };
        let mut result = ApplyResult {
            kind: m.kind,
            name: name.to_string(),
            outcome,
            changes: Vec::new(),
            replaced: Vec::new(),
            added: 0,
            removed: Vec::new(),
            note: None,
        };
        if let Some(new) = new {
            effects(snap, existing.map(|v| &v.value), &new, &mut result);
            writes.push(Write {
                key: model::workload_key(m.kind, name),
                expect: Expect::of(rev),
                value: Some(Item::Workload(new)),
            });
            drafts.push(Draft::normal(
                format!("{}/{name}", m.kind.path()),
                "Applied",
                outcome.to_string(),
            ));
        }
        results.push(result);
    }
    // Stored workloads whose Secrets changed: new values mean new tasks.
    for w in snap.workloads.values() {
        let (kind, name) = (w.value.kind(), w.value.name());
        if applied.contains(&(kind, name))
            || !changed.iter().any(|s| secrets::references(&w.value, s))
        {
            continue;
        }
        let hash = secrets::spec_hash(&w.value.manifest, &after);
        let Some(new) = w.value.updated(w.value.manifest.clone(), hash, now) else {
            continue;
        };
        let mut result = ApplyResult {
            kind,
            name: name.to_string(),
            outcome: ApplyOutcome::Configured,
            changes: Vec::new(),
            replaced: Vec::new(),
            added: 0,
            removed: Vec::new(),
            note: Some("a Secret it references changed".into()),
        };
        effects(snap, Some(&w.value), &new, &mut result);
        writes.push(Write {
            key: model::workload_key(kind, name),
            expect: Expect::Rev(w.rev),
            value: Some(Item::Workload(new)),
        });
        drafts.push(Draft::normal(
            format!("{}/{name}", kind.path()),
            "SecretChanged",
            "a referenced Secret changed: tasks are replaced to use its new values",
        ));
        results.push(result);
    }
    if writes.len() > MAX_APPLY_CHANGES {
        return Err(DomainError::BadRequest(format!(
            "{} objects would change in one apply; at most {MAX_APPLY_CHANGES}: apply them in parts",
            writes.len()
        )));
    }
    let change = if dry_run {
        Change::default()
    } else {
        Change::new(writes, drafts)
    };
    Ok((
        change,
        ApplyResponse {
            results,
            secrets: secret_results,
        },
    ))
}

/// Deletes a Secret that no workload references.
pub fn delete_secret(snap: &Snapshot, name: &str) -> Result<Change, DomainError> {
    let s = snap
        .secrets
        .get(name)
        .ok_or_else(|| DomainError::not_found("secret", name))?;
    let users = secrets::used_by(snap, name);
    if !users.is_empty() {
        return Err(DomainError::Conflict(format!(
            "secret {name:?} is used by {}: change or delete those first",
            users.join(", ")
        )));
    }
    Ok(Change::new(
        vec![Write {
            key: model::secret_key(name),
            expect: Expect::Rev(s.rev),
            value: None,
        }],
        vec![Draft::normal(
            format!("secret/{name}"),
            "Deleted",
            "deleted",
        )],
    ))
}

/// Deletes a workload; the reconcile loop stops its tasks.
pub fn delete_workload(
    snap: &Snapshot,
    kind: Kind,
    name: &str,
) -> Result<(Change, DeleteResponse), DomainError> {
    let w = snap
        .workload(kind, name)
        .ok_or_else(|| DomainError::not_found(kind.path(), name))?;
    let stopped = snap
        .tasks_of(kind, name)
        .filter(|t| t.value.desired == DesiredState::Running)
        .count();
    let change = Change::new(
        vec![Write {
            key: model::workload_key(kind, name),
            expect: Expect::Rev(w.rev),
            value: None,
        }],
        vec![Draft::normal(
            format!("{}/{name}", kind.path()),
            "Deleted",
            match stopped {
                1 => "1 task to stop".to_string(),
                n => format!("{n} tasks to stop"),
            },
        )],
    );
    Ok((
        change,
        DeleteResponse {
            kind,
            name: name.to_string(),
            tasks_stopped: u32::try_from(stopped).unwrap_or(u32::MAX),
        },
    ))
}

/// Marks a node (un)schedulable; an empty change when it already is.
pub fn cordon(snap: &Snapshot, name: &str, cordoned: bool) -> Result<Change, DomainError> {
    let cur = snap
        .nodes
        .get(name)
        .ok_or_else(|| DomainError::not_found("node", name))?;
    if cur.value.cordoned == cordoned {
        return Ok(Change::default());
    }
    let next = StoredNode {
        cordoned,
        ..cur.value.clone()
    };
    let (reason, msg) = if cordoned {
        ("Cordoned", "no new tasks")
    } else {
        ("Uncordoned", "schedulable again")
    };
    Ok(Change::new(
        vec![Write {
            key: model::node_key(name),
            expect: Expect::Rev(cur.rev),
            value: Some(Item::Node(next)),
        }],
        vec![Draft::normal(format!("node/{name}"), reason, msg)],
    ))
}

/// Whether a task still occupies its node for a drain: everything but finished runs
/// (kept for their history, they have exited).
fn occupies(t: &Task) -> bool {
    !(t.phase.is_terminal() && t.kind.runs_to_completion())
}

/// Cordons a node and evicts its tasks (stopped there first, then placed elsewhere).
/// Returns the change and the ids of the tasks told to move.
pub fn drain(snap: &Snapshot, name: &str) -> Result<(Change, Vec<String>), DomainError> {
    let mut change = cordon(snap, name, true)?;
    let mut moving = Vec::new();
    for t in snap.tasks.values() {
        let v = &t.value;
        if v.node.as_deref() == Some(name) && v.desired == DesiredState::Running && occupies(v) {
            let mut next = v.clone();
            next.desired = DesiredState::Evicting;
            change
                .drafts
                .extend(events::task_change(Some(v), Some(&next)));
            change.writes.push(Write::task(next, t.rev));
            moving.push(v.id.clone());
        }
    }
    Ok((change, moving))
}

/// Tasks still on a node that a drain waits for.
pub fn drain_remaining(snap: &Snapshot, name: &str) -> u32 {
    let n = snap
        .tasks
        .values()
        .filter(|t| t.value.node.as_deref() == Some(name) && occupies(&t.value))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Where the tasks a drain moved are now: how many run (or are placed) on other
/// nodes, and which wait for a node, with why.
pub fn drain_outcome(snap: &Snapshot, node: &str, moved: &[String]) -> (u32, Vec<PendingTask>) {
    let mut placed = 0u32;
    let mut pending = Vec::new();
    for id in moved {
        match snap.task(id).map(|t| &t.value) {
            Some(t) if t.node.as_deref().is_some_and(|n| n != node) => placed += 1,
            Some(t) if t.node.is_none() && t.desired == DesiredState::Running => {
                pending.push(PendingTask {
                    task: id.clone(),
                    reason: t
                        .message
                        .clone()
                        .unwrap_or_else(|| "waiting for a node".into()),
                })
            }
            _ => {}
        }
    }
    (placed, pending)
}

/// Whether a restart moves this task: placed, meant to run, not finished.
fn restartable(t: &Task, kind: Kind, name: &str) -> bool {
    t.kind == kind
        && t.workload == name
        && t.desired == DesiredState::Running
        && t.node.is_some()
        && !t.phase.is_terminal()
}

/// Stops and starts again every running task of a Service or Wallet, through eviction.
pub fn restart(
    snap: &Snapshot,
    kind: Kind,
    name: &str,
) -> Result<(Change, RestartResponse), DomainError> {
    if kind.runs_to_completion() {
        return Err(DomainError::BadRequest(format!(
            "{} runs to completion and cannot be restarted; for a CronJob use `bramblectl cron run`",
            kind.path()
        )));
    }
    snap.workload(kind, name)
        .ok_or_else(|| DomainError::not_found(kind.path(), name))?;
    let object = format!("{}/{name}", kind.path());
    let moving: Vec<_> = snap
        .tasks
        .values()
        .filter(|t| restartable(&t.value, kind, name))
        .collect();
    let mut change = Change::default();
    if !moving.is_empty() {
        change.drafts.push(Draft::normal(
            &object,
            "Restarting",
            match moving.len() {
                1 => "1 task stops, then starts again".to_string(),
                n => format!("{n} tasks stop, then start again"),
            },
        ));
    }
    for t in &moving {
        evict(&mut change, t, format!("restart of {object} requested"));
    }
    Ok((
        change,
        RestartResponse {
            kind,
            name: name.to_string(),
            tasks_restarted: u32::try_from(moving.len()).unwrap_or(u32::MAX),
        },
    ))
}

/// What storing `new` over `old` does: the fields that change, and the workload's tasks
/// it replaces (a new container), adds and removes.
fn effects(
    snap: &Snapshot,
    old: Option<&StoredWorkload>,
    new: &StoredWorkload,
    r: &mut ApplyResult,
) {
    if let Some(old) = old {
        r.changes = bramble_api::diff::changes(&old.manifest, &new.manifest);
    }
    let kind = new.kind();
    if kind.runs_to_completion() {
        // A new Job runs once; a CronJob's runs come from its schedule.
        r.added = u32::from(old.is_none() && kind == Kind::Job);
        return;
    }
    let mut live: Vec<&Task> = snap
        .tasks
        .values()
        .map(|t| &t.value)
        .filter(|t| {
            t.kind == kind && t.workload == new.name() && t.desired == DesiredState::Running
        })
        .collect();
    live.sort_by(|a, b| (a.replica, &a.id).cmp(&(b.replica, &b.id)));
    let replicas = new.manifest.replicas();
    let kept = live.iter().filter(|t| t.replica < replicas).count();
    r.added = replicas.saturating_sub(u32::try_from(kept).unwrap_or(u32::MAX));
    for t in live {
        if t.replica >= replicas {
            r.removed.push(t.id.clone());
        } else if t.spec_hash != new.spec_hash {
            r.replaced.push(t.id.clone());
        }
    }
}

/// `kind/name` with `replicas` replicas: its manifest changed as `apply` would change
/// it (validated the same way, a new generation, an `Applied` event), so `get -o yaml`
/// shows it and the next `apply -f` of the file sets it back, as with `kubectl scale`.
pub fn scale(
    snap: &Snapshot,
    kind: Kind,
    name: &str,
    replicas: u32,
    sealer: &dyn Sealer,
    now: DateTime<Utc>,
) -> Result<(Change, ScaleResponse), DomainError> {
    if kind != Kind::Service {
        return Err(DomainError::BadRequest(match kind {
            Kind::Wallet => {
                "a Wallet runs exactly one task and cannot be scaled; delete it to stop it"
                    .to_string()
            }
            k => format!("a {k} runs to completion and has no replicas"),
        }));
    }
    let w = snap
        .workload(kind, name)
        .ok_or_else(|| DomainError::not_found(kind.path(), name))?;
    let previous = w.value.manifest.replicas();
    let mut manifest = w.value.manifest.clone();
    manifest.spec.replicas = Some(replicas);
    let answer = ScaleResponse {
        kind,
        name: name.to_string(),
        previous,
        replicas,
    };
    if previous == replicas {
        return Ok((Change::default(), answer));
    }
    let text = serde_yaml::to_string(&manifest)
        .map_err(|e| DomainError::BadRequest(format!("cannot write the manifest: {e}")))?;
    let source = bramble_api::parse::Source {
        name: format!("scale {}/{name}", kind.path()),
        content: text,
    };
    let docs = bramble_api::parse::parse_sources(std::slice::from_ref(&source))
        .map_err(DomainError::InvalidManifest)?;
    let (change, _) = apply(snap, &docs, sealer, false, now)?;
    Ok((change, answer))
}

/// Restarts one task: it stops on its node and is then placed and started afresh, as a
/// workload's restart does with each of its tasks. `rollout restart` goes through a
/// Service's replicas with it, one at a time.
pub fn restart_task(snap: &Snapshot, id: &str) -> Result<(Change, ()), DomainError> {
    let t = snap
        .task(id)
        .ok_or_else(|| DomainError::not_found("task", id))?;
    if t.value.kind.runs_to_completion() {
        return Err(DomainError::BadRequest(format!(
            "task {id} is a run of a {}: runs are not restarted; start a new one (bramblectl cron run)",
            t.value.kind
        )));
    }
    if !restartable(&t.value, t.value.kind, &t.value.workload) {
        return Err(DomainError::Conflict(format!(
            "task {id} is not running on a node (it is {}): nothing to restart",
            t.value.phase
        )));
    }
    let mut change = Change::default();
    evict(&mut change, t, "restart of the task requested".to_string());
    Ok((change, ()))
}

/// Marks `t` for a restart through eviction (its node stops it, then it is placed and
/// started again), with an `Evicting` event saying `why`.
fn evict(change: &mut Change, t: &Versioned<Task>, why: String) {
    let mut next = t.value.clone();
    next.desired = DesiredState::Evicting;
    change.drafts.push(Draft::normal(
        format!("task/{}", t.value.id),
        "Evicting",
        why,
    ));
    change.writes.push(Write::task(next, t.rev));
}

/// Records a task state reported by `node`; `None` when nothing changes (or the task is
/// not that node's: the next task set tells its agent to remove it).
pub fn task_status(
    snap: &Snapshot,
    node: &str,
    s: &TaskStatus,
    now: DateTime<Utc>,
) -> Option<Change> {
    let cur = snap.task(&s.task)?;
    let next = reconcile::apply_status(&cur.value, node, s, now)?;
    let drafts = events::task_change(Some(&cur.value), Some(&next));
    Some(Change::new(vec![Write::task(next, cur.rev)], drafts))
}

/// A node confirmed a task's container is gone: a stopped task's record goes too, and
/// an evicted one is placed again (elsewhere: its node is cordoned, or it restarts).
pub fn task_removed(snap: &Snapshot, node: &str, id: &str) -> Option<Change> {
    let cur = snap.task(id)?;
    let v = &cur.value;
    if v.node.as_deref() != Some(node) {
        return None;
    }
    match v.desired {
        DesiredState::Evicting => {
            let mut next = v.clone();
            reconcile::reset_to_pending(&mut next, format!("evicted from node {node}"));
            let drafts = events::task_change(Some(v), Some(&next));
            Some(Change::new(vec![Write::task(next, cur.rev)], drafts))
        }
        DesiredState::Stopped => Some(Change::new(
            vec![Write::delete_task(id, cur.rev)],
            events::task_change(Some(v), None),
        )),
        DesiredState::Running => None,
    }
}

/// After a node's Hello: tasks no longer meant to run that it no longer has are gone
/// for good (their Removed report may have been lost with the previous link).
pub fn forget_missing(snap: &Snapshot, node: &str, present: &[TaskStatus]) -> Change {
    let mut change = Change::default();
    for t in snap.tasks.values() {
        let v = &t.value;
        if v.node.as_deref() == Some(node)
            && v.desired != DesiredState::Running
            && !present.iter().any(|p| p.task == v.id)
        {
            if let Some(c) = task_removed(snap, node, &v.id) {
                change.extend(c);
            }
        }
    }
    change
}

/// How an agent's connection was admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// With the join token: it may only join a name that has no credential yet.
    Join,
    /// With the credential of this node.
    Node(String),
}

/// Records what a connecting agent reports, and its credential at its first join;
/// `Ok(None)` when that is what is stored already. `credential` is the hash of the
/// credential the agent's Hello carries. No refusal names another node's identity.
pub fn register_node(
    snap: &Snapshot,
    info: &NodeInfo,
    credential: Option<&str>,
    admission: &Admission,
    now: DateTime<Utc>,
) -> Result<Option<Change>, DomainError> {
    let name = info.name.as_str();
    let cur = snap.nodes.get(name);
    match admission {
        Admission::Node(owner) if owner != name => {
            return Err(DomainError::BadRequest(format!(
                "the credential this agent presented is not node {name}'s"
            )))
        }
        Admission::Node(_) => {}
        Admission::Join => {
            let known = cur.and_then(|n| n.value.credential.as_deref());
            if known.is_some() && known != credential {
                return Err(DomainError::Conflict(format!(
                    "node {name} has already joined this cluster and connects with its own credential; to give the name to another machine, delete the node first (bramblectl delete node {name})"
                )));
            }
            if credential.is_none() {
                return Err(DomainError::BadRequest(
                    "this agent sent no node credential with its join token: upgrade it".into(),
                ));
            }
        }
    }
    let (next, rev) = match cur {
        Some(v) => {
            let keep = v.value.credential.clone();
            let next = StoredNode {
                info: info.clone(),
                credential: keep.or_else(|| credential.map(str::to_string)),
                ..v.value.clone()
            };
            if next == v.value {
                return Ok(None);
            }
            (next, v.rev)
        }
        None => {
            // The join token is on every SD card: joins must not grow the store and the
            // controller's memory without end.
            if snap.nodes.len() >= MAX_NODES {
                return Err(DomainError::Unavailable(format!(
                    "the cluster has {} nodes, the most it takes: delete nodes it no longer has (bramblectl delete node NAME) before new ones join",
                    snap.nodes.len()
                )));
            }
            (
                StoredNode {
                    info: info.clone(),
                    cordoned: false,
                    registered_at: now,
                    credential: credential.map(str::to_string),
                },
                0,
            )
        }
    };
    Ok(Some(Change::new(
        vec![Write {
            key: model::node_key(name),
            expect: Expect::of(rev),
            value: Some(Item::Node(next)),
        }],
        if rev == 0 {
            vec![Draft::normal(
                format!("node/{name}"),
                "Joined",
                "a new node joined the cluster",
            )]
        } else {
            Vec::new()
        },
    )))
}

/// The node whose credential hashes to `hash`, if any.
pub fn node_of_credential<'a>(snap: &'a Snapshot, hash: &str) -> Option<&'a str> {
    snap.nodes
        .values()
        .find(|n| n.value.credential.as_deref() == Some(hash))
        .map(|n| n.value.info.name.as_str())
}

/// Deletes a node and its credential (the name can then be joined again). Refused
/// while the node's agent is connected or its Wallets are not surely fenced yet: its
/// tasks are placed elsewhere as for a lost node, and a Wallet must not run twice.
pub fn delete_node(
    snap: &Snapshot,
    name: &str,
    connected: bool,
    fenced: bool,
) -> Result<Change, DomainError> {
    let cur = snap
        .nodes
        .get(name)
        .ok_or_else(|| DomainError::not_found("node", name))?;
    if connected || !fenced {
        return Err(DomainError::Conflict(format!(
            "node {name} is connected (or was, too recently for its Wallets to have stopped); stop its agent or power it off, then delete it"
        )));
    }
    let tasks = snap
        .tasks
        .values()
        .filter(|t| {
            t.value.node.as_deref() == Some(name) && t.value.desired == DesiredState::Running
        })
        .count();
    Ok(Change::new(
        vec![Write {
            key: model::node_key(name),
            expect: Expect::Rev(cur.rev),
            value: None,
        }],
        vec![Draft::warning(
            format!("node/{name}"),
            "Deleted",
            match tasks {
                0 => "node and its credential deleted".to_string(),
                n => format!("node and its credential deleted; its {n} tasks go elsewhere"),
            },
        )],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::task::TaskPhase;
    use std::sync::Arc;

    use crate::core::model::Versioned;
    use crate::core::secrets::tests::Mirror;
    use bramble_api::manifest::Manifest;
    use bramble_api::parse::Document;

    fn manifest(kind: Kind, name: &str) -> bramble_api::manifest::Manifest {
        let yaml = format!(
            "apiVersion: bramble/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {{image: a}}\n"
        );
        bramble_api::parse::parse_manifests("t.yaml", &yaml)
            .expect("valid")
            .workloads[0]
            .manifest
            .clone()
    }

    fn task(kind: Kind, workload: &str, node: Option<&str>, phase: TaskPhase) -> Task {
        let w = StoredWorkload::new(manifest(kind, workload), Utc::now());
        Task {
            node: node.map(str::to_string),
            phase,
            ..crate::core::reconcile::new_task(&w, format!("{workload}-abc-0"), 0, Utc::now())
        }
    }

    fn with_tasks(tasks: Vec<Task>) -> Snapshot {
        let mut snap = Snapshot::default();
        for (i, t) in tasks.into_iter().enumerate() {
            let rev = i as u64 + 1;
            snap.tasks.insert(
                t.id.clone(),
                Arc::new(Versioned {
                    value: t,
                    rev,
                    created: rev,
                }),
            );
        }
        snap
    }

    #[test]
    fn restarts_only_placed_running_tasks_of_the_workload() {
        let web = |node, phase| task(Kind::Service, "web", node, phase);
        assert!(restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Service,
            "web"
        ));
        assert!(restartable(
            &web(Some("pi1"), TaskPhase::Starting),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(None, TaskPhase::Pending),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Failed),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Service,
            "api"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Wallet,
            "web"
        ));
        let mut stopping = web(Some("pi1"), TaskPhase::Running);
        stopping.desired = DesiredState::Stopped;
        assert!(!restartable(&stopping, Kind::Service, "web"));
    }

    fn doc(file: &str, line: usize, name_at: (usize, usize), manifest: Manifest) -> Document {
        Document {
            file: file.into(),
            line,
            name_at,
            env_at: Default::default(),
            manifest,
        }
    }

    fn of(workloads: Vec<Document>) -> Parsed {
        Parsed {
            workloads,
            secrets: vec![],
        }
    }

    /// The snapshot after `c`'s writes, at revision `rev`.
    fn commit(mut snap: Snapshot, c: &Change, rev: u64) -> Snapshot {
        for w in &c.writes {
            match &w.value {
                Some(item) => snap.insert(&w.key, item.clone(), rev, rev),
                None => snap.remove(&w.key),
            }
        }
        snap.revision = rev;
        snap
    }

    #[test]
    fn applying_the_same_manifest_twice_changes_nothing_the_second_time() {
        let docs = of(vec![doc(
            "w.yaml",
            1,
            (3, 11),
            manifest(Kind::Service, "web"),
        )]);
        let snap = Snapshot::default();
        let (c, r) = apply(&snap, &docs, &Mirror, false, Utc::now()).expect("applies");
        assert_eq!(r.results[0].outcome, ApplyOutcome::Created);
        assert_eq!(c.writes.len(), 1);
        assert_eq!(c.writes[0].expect, Expect::Absent);
        let (dry, _) = apply(&snap, &docs, &Mirror, true, Utc::now()).expect("dry run");
        assert!(dry.is_empty(), "a dry run writes nothing");

        let after = commit(Snapshot::default(), &c, 3);
        let (c, r) = apply(&after, &docs, &Mirror, false, Utc::now()).expect("applies");
        assert_eq!(r.results[0].outcome, ApplyOutcome::Unchanged);
        assert!(c.is_empty());
    }

    #[test]
    fn scaling_changes_the_manifest_as_apply_would_and_only_services() {
        let mut with_env = manifest(Kind::Service, "web");
        with_env.spec.env.insert(
            "A".into(),
            bramble_api::manifest::EnvValue::Text("1".into()),
        );
        let docs = of(vec![doc("w.yaml", 1, (3, 11), with_env)]);
        let (c, _) =
            apply(&Snapshot::default(), &docs, &Mirror, false, Utc::now()).expect("applies");
        let snap = commit(Snapshot::default(), &c, 3);
        let hash = snap
            .workload(Kind::Service, "web")
            .map(|w| w.value.spec_hash.clone());

        let (c, r) = scale(&snap, Kind::Service, "web", 3, &Mirror, Utc::now()).expect("scales");
        assert_eq!((r.previous, r.replicas), (1, 3));
        let after = commit(snap.clone(), &c, 4);
        let w = &after.workload(Kind::Service, "web").expect("kept").value;
        assert_eq!(w.manifest.replicas(), 3);
        assert_eq!(w.generation, 2);
        assert_eq!(Some(w.spec_hash.clone()), hash, "scaling replaces no task");
        assert_eq!(
            w.manifest.spec.env.len(),
            1,
            "the rest of the manifest is kept"
        );

        let (c, r) = scale(&after, Kind::Service, "web", 3, &Mirror, Utc::now()).expect("no-op");
        assert!(c.is_empty() && r.previous == 3);
        for (kind, name, n, want) in [
            (Kind::Service, "web", 1001, "more than the limit of 1000"),
            (Kind::Service, "nope", 2, "NotFound"),
            (Kind::Wallet, "web", 2, "exactly one task"),
            (Kind::Job, "web", 2, "no replicas"),
        ] {
            let err = scale(&after, kind, name, n, &Mirror, Utc::now()).expect_err(name);
            assert!(
                format!("{err:?}").contains(want),
                "{kind} {name} {n}: {err:?}"
            );
        }
    }

    #[test]
    fn a_dry_run_says_which_fields_change_and_which_tasks_are_replaced_added_or_removed() {
        let web = |image: &str, replicas: u32| {
            let yaml = format!("apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{image: '{image}', replicas: {replicas}}}\n");
            of(vec![doc(
                "w.yaml",
                1,
                (3, 11),
                bramble_api::parse::parse_manifests("w.yaml", &yaml)
                    .expect("valid")
                    .workloads[0]
                    .manifest
                    .clone(),
            )])
        };
        let (c, _) = apply(
            &Snapshot::default(),
            &web("a:1", 2),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        let mut snap = commit(Snapshot::default(), &c, 3);
        let stored = snap
            .workload(Kind::Service, "web")
            .expect("stored")
            .value
            .clone();
        for replica in 0..2u32 {
            let t = crate::core::reconcile::new_task(
                &stored,
                format!("web-abc-{replica}"),
                replica,
                Utc::now(),
            );
            snap.tasks.insert(
                t.id.clone(),
                Arc::new(Versioned {
                    value: t,
                    rev: 4 + u64::from(replica),
                    created: 4,
                }),
            );
        }
        let (c, r) = apply(&snap, &web("a:2", 3), &Mirror, true, Utc::now()).expect("dry run");
        assert!(c.is_empty(), "a dry run writes nothing");
        let r = &r.results[0];
        let paths: Vec<&str> = r.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, vec!["spec.image", "spec.replicas"]);
        assert_eq!(r.replaced, vec!["web-abc-0", "web-abc-1"]);
        assert_eq!((r.added, r.removed.len()), (1, 0));

        let (_, r) = apply(&snap, &web("a:1", 1), &Mirror, true, Utc::now()).expect("dry run");
        let r = &r.results[0];
        assert!(r.replaced.is_empty(), "same image: nothing replaced");
        assert_eq!(
            (r.added, r.removed.clone()),
            (0, vec!["web-abc-1".to_string()])
        );

        let (_, r) = apply(&snap, &web("a:1", 2), &Mirror, true, Utc::now()).expect("dry run");
        assert_eq!(r.results[0].outcome, ApplyOutcome::Unchanged);
        assert!(r.results[0].changes.is_empty() && r.results[0].replaced.is_empty());
    }

    #[test]
    fn restarting_one_task_evicts_it_alone() {
        let snap = with_tasks(vec![
            task(Kind::Service, "web", Some("pi1"), TaskPhase::Running),
            Task {
                id: "web-abc-1".into(),
                replica: 1,
                ..task(Kind::Service, "web", Some("pi2"), TaskPhase::Running)
            },
        ]);
        let (c, ()) = restart_task(&snap, "web-abc-0").expect("restarts");
        assert_eq!(c.writes.len(), 1);
        let after = commit(snap.clone(), &c, 9);
        assert_eq!(
            after.task("web-abc-0").map(|t| t.value.desired),
            Some(DesiredState::Evicting)
        );
        assert_eq!(
            after.task("web-abc-1").map(|t| t.value.desired),
            Some(DesiredState::Running)
        );
        assert!(restart_task(&snap, "nope").is_err());
        let pending = with_tasks(vec![task(Kind::Service, "web", None, TaskPhase::Pending)]);
        let err = restart_task(&pending, "web-abc-0").expect_err("not placed");
        assert!(
            format!("{err:?}").contains("not running on a node"),
            "{err:?}"
        );
    }

    #[test]
    fn a_name_taken_by_another_kind_is_refused_where_it_is_written() {
        let wallet = doc("w.yaml", 1, (3, 11), manifest(Kind::Wallet, "ltc"));
        let (c, _) = apply(
            &Snapshot::default(),
            &of(vec![wallet.clone()]),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        let snap = commit(Snapshot::default(), &c, 2);
        let service = doc("s.yaml", 5, (7, 9), manifest(Kind::Service, "ltc"));
        let err =
            apply(&snap, &of(vec![service]), &Mirror, false, Utc::now()).expect_err("refused");
        let DomainError::InvalidManifest(details) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            details[0].to_string(),
            "s.yaml:7:9: metadata.name: the name \"ltc\" is already used by wallet \"ltc\"; workload names are unique across kinds (delete that one first)"
        );
        // The same kind is an update, as before.
        assert!(apply(&snap, &of(vec![wallet]), &Mirror, false, Utc::now()).is_ok());
    }

    #[test]
    fn too_many_workloads_in_one_apply_is_refused_with_the_limit() {
        let docs: Vec<Document> = (0..=MAX_APPLY_CHANGES)
            .map(|i| {
                doc(
                    "w.yaml",
                    1,
                    (3, 11),
                    manifest(Kind::Service, &format!("w{i}")),
                )
            })
            .collect();
        let err = apply(&Snapshot::default(), &of(docs), &Mirror, false, Utc::now())
            .expect_err("refused");
        assert!(err.to_string().contains("at most 100"), "{err}");
    }

    const SECRET: &str = "apiVersion: bramble/v1\nkind: Secret\nmetadata: {name: ltc-rpc}\ndata: {password: hunter2, user: pool}\n";
    const WALLET: &str = "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: ltc}\nspec:\n  image: w:1\n  env:\n    RPC_PASSWORD: {secret: ltc-rpc, key: password}\n";

    fn parsed(text: &str) -> Parsed {
        bramble_api::parse::parse_manifests("a.yaml", text).expect("valid")
    }

    #[test]
    fn a_reference_must_resolve_after_the_apply() {
        // Alone, the wallet names a Secret that is not there: refused at the reference.
        let err = apply(
            &Snapshot::default(),
            &parsed(WALLET),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect_err("refused");
        let DomainError::InvalidManifest(d) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            d[0].to_string(),
            "a.yaml:7:5: spec.env.RPC_PASSWORD: no Secret \"ltc-rpc\" (apply it first, or in the same apply)"
        );
        // Together: both stored, the value sealed.
        let (c, r) = apply(
            &Snapshot::default(),
            &parsed(&format!("{SECRET}---\n{WALLET}")),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        assert_eq!(r.secrets[0].outcome, ApplyOutcome::Created);
        assert_eq!(r.results[0].outcome, ApplyOutcome::Created);
        let snap = commit(Snapshot::default(), &c, 2);
        let s = &snap.secrets["ltc-rpc"].value;
        assert!(!s.data["password"].0.ends_with("hunter2"), "sealed");
        // A missing key, in a later apply.
        let other_key = WALLET.replace("key: password", "key: pass");
        let err =
            apply(&snap, &parsed(&other_key), &Mirror, false, Utc::now()).expect_err("refused");
        assert!(
            err.to_string()
                .contains("Secret \"ltc-rpc\" has no key \"pass\""),
            "{err}"
        );
    }

    #[test]
    fn a_changed_value_replaces_the_tasks_of_stored_workloads_that_use_it() {
        let (c, _) = apply(
            &Snapshot::default(),
            &parsed(&format!("{SECRET}---\n{WALLET}")),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        let snap = commit(Snapshot::default(), &c, 2);
        let before = snap
            .workload(Kind::Wallet, "ltc")
            .expect("stored")
            .value
            .clone();
        // The same values: nothing changes.
        let (c, r) = apply(&snap, &parsed(SECRET), &Mirror, false, Utc::now()).expect("applies");
        assert!(c.is_empty());
        assert_eq!(r.secrets[0].outcome, ApplyOutcome::Unchanged);
        assert!(r.results.is_empty());
        // A new value: the Secret and the wallet that uses it, a new spec hash.
        let (c, r) = apply(
            &snap,
            &parsed(&SECRET.replace("hunter2", "hunter3")),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        assert_eq!(r.secrets[0].outcome, ApplyOutcome::Configured);
        assert_eq!(r.results[0].outcome, ApplyOutcome::Configured);
        assert_eq!(
            (r.results[0].kind, r.results[0].name.as_str()),
            (Kind::Wallet, "ltc")
        );
        let after = commit(snap.clone(), &c, 3);
        let w = &after.workload(Kind::Wallet, "ltc").expect("stored").value;
        assert_ne!(w.spec_hash, before.spec_hash);
        assert_eq!(w.generation, before.generation + 1);
        assert_eq!(w.manifest, before.manifest);
        assert!(
            c.drafts.iter().all(|d| !d.message.contains("hunter")),
            "no value in events"
        );
        // Removing the key the wallet uses is refused, and names the wallet.
        let err = apply(
            &snap,
            &parsed(&SECRET.replace("password: hunter2, ", "")),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect_err("refused");
        assert!(
            err.to_string()
                .contains("key \"password\" is used by wallet/ltc (spec.env.RPC_PASSWORD)"),
            "{err}"
        );
        // ...unless the wallet stops using it in the same apply.
        let plain = WALLET.replace("{secret: ltc-rpc, key: password}", "x");
        assert!(apply(
            &snap,
            &parsed(&format!(
                "{}---\n{plain}",
                SECRET.replace("password: hunter2, ", "")
            )),
            &Mirror,
            false,
            Utc::now()
        )
        .is_ok());
    }

    #[test]
    fn a_secret_in_use_cannot_be_deleted() {
        let (c, _) = apply(
            &Snapshot::default(),
            &parsed(&format!("{SECRET}---\n{WALLET}")),
            &Mirror,
            false,
            Utc::now(),
        )
        .expect("applies");
        let snap = commit(Snapshot::default(), &c, 2);
        let err = delete_secret(&snap, "ltc-rpc").expect_err("in use");
        assert!(matches!(err, DomainError::Conflict(_)), "{err:?}");
        assert!(err.to_string().contains("wallet/ltc"), "{err}");
        let (c, _) = delete_workload(&snap, Kind::Wallet, "ltc").expect("deleted");
        let snap = commit(snap, &c, 3);
        let c = delete_secret(&snap, "ltc-rpc").expect("no longer used");
        assert_eq!(c.writes[0].key, "/secrets/ltc-rpc");
        assert!(matches!(
            delete_secret(&Snapshot::default(), "x"),
            Err(DomainError::NotFound { .. })
        ));
    }

    #[test]
    fn a_drain_says_where_the_tasks_went() {
        let mut moved = task(Kind::Service, "web", Some("pi2"), TaskPhase::Running);
        moved.id = "web-a-0".into();
        let mut stuck = task(Kind::Wallet, "w", None, TaskPhase::Pending);
        stuck.id = "w-a-0".into();
        stuck.message = Some("0/1 node fit: 1 cordoned".into());
        let snap = with_tasks(vec![moved, stuck]);
        let (placed, pending) = drain_outcome(
            &snap,
            "pi1",
            &["web-a-0".into(), "w-a-0".into(), "gone".into()],
        );
        assert_eq!(placed, 1);
        assert_eq!(
            pending,
            vec![PendingTask {
                task: "w-a-0".into(),
                reason: "0/1 node fit: 1 cordoned".into()
            }]
        );
    }

    fn info(name: &str) -> NodeInfo {
        NodeInfo {
            mesh: None,
            name: name.into(),
            arch: bramble_api::manifest::Arch::Arm64,
            cores: 4,
            memory_bytes: 1 << 30,
            docker_version: "20.10".into(),
            labels: Default::default(),
            agent_version: "0".into(),
            os: String::new(),
            machine_id: None,
            memory_limits: None,
            warnings: Vec::new(),
        }
    }

    fn with_change(snap: &Snapshot, c: &Change) -> Snapshot {
        let mut next = snap.clone();
        for w in &c.writes {
            match &w.value {
                Some(item) => next.insert(&w.key, item.clone(), 9, 9),
                None => next.remove(&w.key),
            }
        }
        next
    }

    #[test]
    fn a_join_token_joins_a_new_name_once_and_never_takes_a_joined_one() {
        let now = Utc::now();
        let empty = Snapshot::default();
        let join = Admission::Join;
        let first = register_node(&empty, &info("pi1"), Some("h1"), &join, now)
            .expect("joins")
            .expect("a change");
        assert_eq!(first.drafts[0].reason, "Joined");
        let joined = with_change(&empty, &first);
        assert_eq!(node_of_credential(&joined, "h1"), Some("pi1"));
        assert_eq!(node_of_credential(&joined, "h2"), None);

        // Another machine with the join token, under the same name: refused, and the
        // refusal names no identity.
        let err =
            register_node(&joined, &info("pi1"), Some("h2"), &join, now).expect_err("refused");
        assert!(matches!(err, DomainError::Conflict(_)), "{err}");
        assert!(!err.to_string().contains("h1"));
        // Without a credential: refused.
        assert!(register_node(&empty, &info("pi9"), None, &join, now).is_err());
        // The node itself, with its credential: welcome, nothing to write.
        let own = Admission::Node("pi1".into());
        assert_eq!(
            register_node(&joined, &info("pi1"), Some("h1"), &own, now),
            Ok(None)
        );
        // Its credential under another name: refused.
        assert!(register_node(&joined, &info("pi2"), Some("h1"), &own, now).is_err());
        // A changed report is recorded, the credential kept.
        let mut relabelled = info("pi1");
        relabelled.labels.insert("disk".into(), "ssd".into());
        let c = register_node(&joined, &relabelled, Some("h1"), &own, now)
            .expect("ok")
            .expect("a change");
        let Some(Item::Node(n)) = &c.writes[0].value else {
            panic!("a node write");
        };
        assert_eq!(n.credential.as_deref(), Some("h1"));
    }

    #[test]
    fn joins_stop_at_the_node_cap_and_joined_nodes_still_connect() {
        let now = Utc::now();
        let mut snap = Snapshot::default();
        for i in 0..MAX_NODES {
            let c = register_node(
                &snap,
                &info(&format!("n{i}")),
                Some(&format!("h{i}")),
                &Admission::Join,
                now,
            )
            .expect("joins")
            .expect("a change");
            snap = with_change(&snap, &c);
        }
        let err = register_node(&snap, &info("one-more"), Some("hx"), &Admission::Join, now)
            .expect_err("full");
        assert!(matches!(err, DomainError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("bramblectl delete node"), "{err}");
        // A joined node reconnecting is not a join.
        assert_eq!(
            register_node(
                &snap,
                &info("n7"),
                Some("h7"),
                &Admission::Node("n7".into()),
                now
            ),
            Ok(None)
        );
    }

    #[test]
    fn a_node_from_before_credentials_takes_its_first_one() {
        let now = Utc::now();
        let empty = Snapshot::default();
        let mut legacy = with_change(
            &empty,
            &register_node(&empty, &info("pi1"), Some("h1"), &Admission::Join, now)
                .expect("ok")
                .expect("change"),
        );
        let mut stored = legacy.nodes["pi1"].value.clone();
        stored.credential = None;
        legacy.insert(&model::node_key("pi1"), Item::Node(stored), 9, 9);
        let c = register_node(&legacy, &info("pi1"), Some("h7"), &Admission::Join, now)
            .expect("adopted")
            .expect("a change");
        let Some(Item::Node(n)) = &c.writes[0].value else {
            panic!("a node write");
        };
        assert_eq!(n.credential.as_deref(), Some("h7"));
    }

    #[test]
    fn a_connected_or_unfenced_node_cannot_be_deleted() {
        let now = Utc::now();
        let empty = Snapshot::default();
        let snap = with_change(
            &empty,
            &register_node(&empty, &info("pi1"), Some("h1"), &Admission::Join, now)
                .expect("ok")
                .expect("change"),
        );
        assert!(matches!(
            delete_node(&snap, "pi1", true, true),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            delete_node(&snap, "pi1", false, false),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            delete_node(&snap, "pi9", false, true),
            Err(DomainError::NotFound { .. })
        ));
        let c = delete_node(&snap, "pi1", false, true).expect("deleted");
        let gone = with_change(&snap, &c);
        assert!(gone.nodes.is_empty());
        assert_eq!(
            node_of_credential(&gone, "h1"),
            None,
            "its credential went with it"
        );
    }

    #[test]
    fn reports_from_another_node_change_nothing() {
        let t = task(Kind::Service, "web", Some("pi1"), TaskPhase::Scheduled);
        let id = t.id.clone();
        let snap = with_tasks(vec![t]);
        let s = TaskStatus {
            container_id: Some("c".into()),
            ..TaskStatus::new(id.clone(), TaskPhase::Running)
        };
        assert!(task_status(&snap, "pi2", &s, Utc::now()).is_none());
        assert!(task_removed(&snap, "pi2", &id).is_none());
        let c = task_status(&snap, "pi1", &s, Utc::now()).expect("a change");
        assert_eq!(c.writes[0].expect, Expect::Rev(1));
        assert!(task_status(
            &snap,
            "pi1",
            &TaskStatus {
                task: "nope".into(),
                ..s
            },
            Utc::now()
        )
        .is_none());
    }
}
