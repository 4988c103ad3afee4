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

use bramble_api::manifest::Kind;
use bramble_api::parse::{Document, ManifestError};
use bramble_api::rest::{
    ApplyOutcome, ApplyResponse, ApplyResult, DeleteResponse, PendingTask, RestartResponse,
};
use bramble_api::task::{DesiredState, Task};
use bramble_api::wire::{NodeInfo, TaskStatus};
use chrono::{DateTime, Utc};

use super::error::DomainError;
use super::events::{self, Draft};
use super::model::{self, StoredNode, StoredWorkload};
use super::reconcile;
use super::snapshot::{Change, Expect, Item, Snapshot, Write};

/// The most workloads one apply may create or change: its writes and its events go in
/// one transaction, and a store takes at most 128 ops in one.
pub const MAX_APPLY_CHANGES: usize = 100;

/// Creates or updates every workload in `docs`, all or nothing. With `dry_run` the
/// answer says what would happen and the change is empty.
pub fn apply(
    snap: &Snapshot,
    docs: &[Document],
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<(Change, ApplyResponse), DomainError> {
    let taken: Vec<ManifestError> = docs
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
    let mut writes = Vec::new();
    let mut drafts = Vec::new();
    let mut results = Vec::new();
    for d in docs {
        let m = &d.manifest;
        let name = m.metadata.name.as_str();
        let existing = snap.workload(m.kind, name);
        let (outcome, new, rev) = match existing {
            None => (
                ApplyOutcome::Created,
                Some(StoredWorkload::new(m.clone(), now)),
                0,
            ),
            Some(v) => match v.value.updated(m.clone(), now) {
                None => (ApplyOutcome::Unchanged, None, v.rev),
                Some(n) => (ApplyOutcome::Configured, Some(n), v.rev),
            },
        };
        if let Some(new) = new {
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
        results.push(ApplyResult {
            kind: m.kind,
            name: name.to_string(),
            outcome,
        });
    }
    if writes.len() > MAX_APPLY_CHANGES {
        return Err(DomainError::BadRequest(format!(
            "{} workloads would change in one apply; at most {MAX_APPLY_CHANGES}: apply them in parts",
            writes.len()
        )));
    }
    let change = if dry_run {
        Change::default()
    } else {
        Change::new(writes, drafts)
    };
    Ok((change, ApplyResponse { results }))
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
        let mut next = t.value.clone();
        next.desired = DesiredState::Evicting;
        change.drafts.push(Draft::normal(
            format!("task/{}", t.value.id),
            "Evicting",
            format!("restart of {object} requested"),
        ));
        change.writes.push(Write::task(next, t.rev));
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

/// Records what a connecting agent reports; `None` when it is what is stored already.
pub fn register_node(snap: &Snapshot, info: &NodeInfo, now: DateTime<Utc>) -> Option<Change> {
    let cur = snap.nodes.get(&info.name);
    let (next, rev) = match cur {
        Some(v) if v.value.info == *info => return None,
        Some(v) => (
            StoredNode {
                info: info.clone(),
                ..v.value.clone()
            },
            v.rev,
        ),
        None => (
            StoredNode {
                info: info.clone(),
                cordoned: false,
                registered_at: now,
            },
            0,
        ),
    };
    Some(Change::new(
        vec![Write {
            key: model::node_key(&info.name),
            expect: Expect::of(rev),
            value: Some(Item::Node(next)),
        }],
        Vec::new(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::task::TaskPhase;
    use std::sync::Arc;

    use crate::core::model::Versioned;

    fn manifest(kind: Kind, name: &str) -> bramble_api::manifest::Manifest {
        let yaml = format!(
            "apiVersion: bramble/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {{image: a}}\n"
        );
        bramble_api::parse::parse_manifests("t.yaml", &yaml).expect("valid")[0]
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

    #[test]
    fn applying_the_same_manifest_twice_changes_nothing_the_second_time() {
        let docs = vec![Document {
            file: "w.yaml".into(),
            line: 1,
            name_at: (3, 11),
            manifest: manifest(Kind::Service, "web"),
        }];
        let snap = Snapshot::default();
        let (c, r) = apply(&snap, &docs, false, Utc::now()).expect("applies");
        assert_eq!(r.results[0].outcome, ApplyOutcome::Created);
        assert_eq!(c.writes.len(), 1);
        assert_eq!(c.writes[0].expect, Expect::Absent);
        let (dry, _) = apply(&snap, &docs, true, Utc::now()).expect("dry run");
        assert!(dry.is_empty(), "a dry run writes nothing");

        let mut after = Snapshot::default();
        let Some(Item::Workload(w)) = c.writes[0].value.clone() else {
            panic!("a workload write");
        };
        after.insert(&c.writes[0].key, Item::Workload(w), 3, 3);
        let (c, r) = apply(&after, &docs, false, Utc::now()).expect("applies");
        assert_eq!(r.results[0].outcome, ApplyOutcome::Unchanged);
        assert!(c.is_empty());
    }

    #[test]
    fn a_name_taken_by_another_kind_is_refused_where_it_is_written() {
        let wallet = Document {
            file: "w.yaml".into(),
            line: 1,
            name_at: (3, 11),
            manifest: manifest(Kind::Wallet, "ltc"),
        };
        let (c, _) = apply(
            &Snapshot::default(),
            std::slice::from_ref(&wallet),
            false,
            Utc::now(),
        )
        .expect("applies");
        let mut snap = Snapshot::default();
        let Some(Item::Workload(w)) = c.writes[0].value.clone() else {
            panic!("a workload write");
        };
        snap.insert(&c.writes[0].key, Item::Workload(w), 2, 2);
        let service = Document {
            file: "s.yaml".into(),
            line: 5,
            name_at: (7, 9),
            manifest: manifest(Kind::Service, "ltc"),
        };
        let err = apply(&snap, &[service], false, Utc::now()).expect_err("refused");
        let DomainError::InvalidManifest(details) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            details[0].to_string(),
            "s.yaml:7:9: metadata.name: the name \"ltc\" is already used by wallet \"ltc\"; workload names are unique across kinds (delete that one first)"
        );
        // The same kind is an update, as before.
        assert!(apply(&snap, &[wallet], false, Utc::now()).is_ok());
    }

    #[test]
    fn too_many_workloads_in_one_apply_is_refused_with_the_limit() {
        let docs: Vec<Document> = (0..=MAX_APPLY_CHANGES)
            .map(|i| Document {
                file: "w.yaml".into(),
                line: 1,
                name_at: (3, 11),
                manifest: manifest(Kind::Service, &format!("w{i}")),
            })
            .collect();
        let err = apply(&Snapshot::default(), &docs, false, Utc::now()).expect_err("refused");
        assert!(err.to_string().contains("at most 100"), "{err}");
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

    #[test]
    fn reports_from_another_node_change_nothing() {
        let t = task(Kind::Service, "web", Some("pi1"), TaskPhase::Scheduled);
        let id = t.id.clone();
        let snap = with_tasks(vec![t]);
        let s = TaskStatus {
            task: id.clone(),
            phase: TaskPhase::Running,
            exit_code: None,
            message: None,
            container_id: Some("c".into()),
            restarts: 0,
            ready: None,
            started_at: None,
            finished_at: None,
            gave_up: false,
            output: None,
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
