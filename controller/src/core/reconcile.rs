//! The reconcile decision: from workloads (desired) and tasks (observed), which tasks to
//! create, stop, delete and place. Pure and level-triggered: it re-reads everything on
//! each pass and running it twice on its own output changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bramble_api::backoff::Backoff;
use bramble_api::manifest::Kind;
use bramble_api::rest::NodeStatus;
use bramble_api::task::{task_id, DesiredState, Task, TaskPhase};
use bramble_api::wire::{Assignment, NodeInfo, TaskStatus};
use chrono::{DateTime, SecondsFormat, Utc};

use super::events;
use super::model::{StoredWorkload, Versioned};
use super::scheduler;
use super::secrets::{self, Sealer};
use super::snapshot::{self, Change, Snapshot};

/// How long a task waits before it may go back to a node that gave it up, doubling
/// with each give-up in a row. A task that fails on every node is retried, slowly,
/// for as long as its workload exists (never given up for good, never in a tight
/// loop), and tells why and when it tries next.
pub const GIVE_UP_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));

/// A task that ran this long after its last give-up starts a fresh back-off.
pub const GIVE_UP_FORGOTTEN_AFTER: Duration = Duration::from_secs(600);

/// A node as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    /// What the agent reported.
    pub info: NodeInfo,
    /// Health now.
    pub status: NodeStatus,
    /// Kept free of new tasks.
    pub cordoned: bool,
    /// Silent long enough that its agent has surely stopped its Wallets.
    pub wallets_fenced: bool,
    /// What it last reported of its managed volumes, copies and data set aside: a task
    /// goes where the newest data of its volumes is, if it fits (see
    /// [`super::volumes::holders`]).
    pub volumes: Vec<bramble_api::wire::VolumeReport>,
}

/// The inputs of a pass that changed nothing and waits for no instant (see
/// [`settled`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    /// The snapshot's revision.
    pub revision: u64,
    /// The nodes as the pass saw them.
    pub nodes: Vec<NodeState>,
}

/// Whether [`change`] over `snap` and `nodes` would again change nothing, because the
/// last pass (`last`) saw the same snapshot and nodes, changed nothing, and no task
/// waits for a node (only such a task's give-up back-off and run deadline depend on the
/// clock). A controller at rest is woken often (a heartbeat moves each node's health
/// thresholds); this keeps those wake-ups from re-planning every task.
pub fn settled(last: Option<&Settled>, snap: &Snapshot, nodes: &[NodeState]) -> bool {
    last.is_some_and(|l| l.revision == snap.revision && l.nodes == nodes)
        && !snap.tasks.values().any(|t| {
            t.value.node.is_none()
                && t.value.desired == DesiredState::Running
                && !t.value.phase.is_terminal()
        })
}

/// One store write: put `value` at task `id` if its revision is still `rev` (0 = absent),
/// or delete it when `value` is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Task id.
    pub id: String,
    /// Expected mod revision (0 = must not exist).
    pub rev: u64,
    /// New value, or `None` to delete.
    pub value: Option<Task>,
}

/// Computes every task write that brings observed state closer to desired state.
pub fn plan(
    workloads: &[StoredWorkload],
    tasks: &[Versioned<Task>],
    nodes: &[NodeState],
    now: DateTime<Utc>,
) -> Vec<Write> {
    let mut work: BTreeMap<String, Task> = tasks
        .iter()
        .map(|v| (v.value.id.clone(), v.value.clone()))
        .collect();

    rescue_from_lost_nodes(&mut work, nodes, now);

    for w in workloads {
        converge_workload(w, &mut work, now);
    }

    // Tasks of deleted workloads go.
    let live: HashSet<(Kind, &str)> = workloads.iter().map(|w| (w.kind(), w.name())).collect();
    for t in work.values_mut() {
        if t.desired != DesiredState::Stopped && !live.contains(&(t.kind, t.workload.as_str())) {
            stop(t, "workload deleted");
        }
        // An evicted task whose node never got it is simply placed again.
        if t.desired == DesiredState::Evicting && t.node.is_none() {
            t.desired = DesiredState::Running;
        }
    }
    // A stopped task that never reached a node has nothing to clean up.
    work.retain(|_, t| !(t.desired == DesiredState::Stopped && t.node.is_none()));

    fail_runs_past_their_deadline(&mut work, now);
    place(&mut work, nodes, now);

    let mut writes = Vec::new();
    let before: BTreeMap<&str, &Versioned<Task>> =
        tasks.iter().map(|v| (v.value.id.as_str(), v)).collect();
    for v in tasks {
        match work.get(&v.value.id) {
            None => writes.push(Write {
                id: v.value.id.clone(),
                rev: v.rev,
                value: None,
            }),
            Some(t) if *t != v.value => writes.push(Write {
                id: t.id.clone(),
                rev: v.rev,
                value: Some(t.clone()),
            }),
            Some(_) => {}
        }
    }
    for (id, t) in &work {
        if !before.contains_key(id.as_str()) {
            writes.push(Write {
                id: id.clone(),
                rev: 0,
                value: Some(t.clone()),
            });
        }
    }
    writes
}

/// The most task writes one reconcile commit carries: with its events and their
/// pruning it stays under the 128 ops a store takes in one transaction.
pub const MAX_WRITES_PER_COMMIT: usize = 100;

/// The reconcile pass over a snapshot: the task writes [`plan`] decides, in commits of
/// at most [`MAX_WRITES_PER_COMMIT`] writes each with the events that describe them, and
/// the earliest instant at which a waiting task (one backing off after a give-up)
/// becomes placeable, so the caller can wake then. Each write is compared against the
/// snapshot on its own, so the commits are independent: one that loses a race leaves
/// the others valid, and the next pass redoes it.
pub fn change(
    snap: &Snapshot,
    nodes: &[NodeState],
    now: DateTime<Utc>,
) -> (Vec<Change>, Option<DateTime<Utc>>) {
    let workloads: Vec<StoredWorkload> = snap.workloads.values().map(|w| w.value.clone()).collect();
    let tasks: Vec<Versioned<Task>> = snap.tasks.values().map(|t| (**t).clone()).collect();
    let mut writes = plan(&workloads, &tasks, nodes, now);
    stamp_epochs(&mut writes, snap);
    let mut changes: Vec<Change> = Vec::new();
    for chunk in writes.chunks(MAX_WRITES_PER_COMMIT) {
        let mut c = Change::default();
        for w in chunk {
            let before = snap.task(&w.id).map(|t| &t.value);
            c.drafts
                .extend(events::task_change(before, w.value.as_ref()));
            c.writes.push(match &w.value {
                Some(t) => snapshot::Write::task(t.clone(), w.rev),
                None => snapshot::Write::delete_task(&w.id, w.rev),
            });
        }
        changes.push(c);
    }
    let next = snap
        .tasks
        .values()
        .filter(|t| t.value.node.is_none() && t.value.desired == DesiredState::Running)
        .filter_map(|t| t.value.retry_at)
        .filter(|at| *at > now)
        .min();
    (changes, next)
}

/// Gives every Wallet placed on a node by `writes` (one that had no node, or another)
/// its epoch: one above the snapshot's revision, so above the revision every earlier
/// placement was committed at, whichever controller made it. Each write is compared
/// against the snapshot, so no other placement can commit in between.
pub fn stamp_epochs(writes: &mut [Write], snap: &Snapshot) {
    for w in writes.iter_mut() {
        let Some(t) = w.value.as_mut() else { continue };
        if !super::volumes::carries_epoch(t) || t.node.is_none() {
            continue;
        }
        let before = snap.task(&w.id).and_then(|v| v.value.node.clone());
        if before != t.node {
            t.epoch = snap.revision + 1;
        }
    }
}

/// The deadline of a Job or CronJob run: `timeout` after its firing (a CronJob's slot,
/// a Job's creation), whether or not it has started by then.
pub fn run_deadline(t: &Task) -> Option<DateTime<Utc>> {
    if !t.kind.runs_to_completion() {
        return None;
    }
    let timeout = chrono::Duration::from_std(t.spec.timeout?.std()).ok()?;
    t.slot.unwrap_or(t.created_at).checked_add_signed(timeout)
}

/// [`assignments_placed`] by a scan of every task: the reference the index is checked
/// against, and the tests' way to ask for a node's set.
#[cfg(test)]
pub fn assignments(snap: &Snapshot, node: &str, sealer: &dyn Sealer) -> Vec<Assignment> {
    let tasks = snap
        .tasks
        .values()
        .filter(|t| t.value.node.as_deref() == Some(node));
    assignments_of(snap, tasks, sealer)
}

/// Each node's placed tasks, in id order: computed once per snapshot, so that the
/// links of a thousand nodes do not each scan every task whenever anything changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    /// Task ids by node.
    pub by_node: BTreeMap<String, Vec<String>>,
    /// Whether any task has a managed volume (only then are copy duties worked out).
    pub managed_volumes: bool,
}

/// Where `snap`'s tasks are placed.
pub fn placed(snap: &Snapshot) -> Placed {
    let mut out = Placed::default();
    for t in snap.tasks.values().map(|t| &t.value) {
        out.managed_volumes |= t.spec.volumes.iter().any(|v| v.name.is_some());
        if let Some(node) = &t.node {
            out.by_node
                .entry(node.clone())
                .or_default()
                .push(t.id.clone());
        }
    }
    out
}

/// What `node` should run: its placed tasks meant to run, sorted by id, each with its
/// deadline and the values of its Secret references (this node's tasks' only), read
/// from the index [`placed`]. Sent to the node's agent whenever it changes.
pub fn assignments_placed(
    snap: &Snapshot,
    placed: &Placed,
    node: &str,
    sealer: &dyn Sealer,
) -> Vec<Assignment> {
    let ids = placed.by_node.get(node).map_or(&[][..], Vec::as_slice);
    let tasks = ids.iter().filter_map(|id| snap.tasks.get(id));
    assignments_of(snap, tasks, sealer)
}

/// The assignments of `tasks` (one node's, in id order) meant to run.
fn assignments_of<'a>(
    snap: &Snapshot,
    tasks: impl Iterator<Item = &'a Arc<Versioned<Task>>>,
    sealer: &dyn Sealer,
) -> Vec<Assignment> {
    tasks
        .map(|t| &t.value)
        .filter(|t| t.desired == DesiredState::Running)
        .map(|t| Assignment {
            restore_from: None,
            sync_to: Vec::new(),
            task: t.id.clone(),
            kind: t.kind,
            workload: t.workload.clone(),
            spec_hash: t.spec_hash.clone(),
            spec: t.spec.clone(),
            deadline: run_deadline(t),
            secrets: secrets::resolve(snap, t, sealer),
            epoch: super::volumes::carries_epoch(t).then_some(t.epoch),
            not_before: not_before(t),
        })
        .collect()
}

/// When a run may start at the earliest: a CronJob's first attempt at its slot (the
/// cron loop fires a slot [`super::cron::LEAD`] ahead, so that its node readies the
/// container meanwhile). Retries and other tasks start when they can.
pub fn not_before(t: &Task) -> Option<DateTime<Utc>> {
    t.slot.filter(|_| t.kind == Kind::CronJob && t.attempt == 0)
}

/// Takes the runs that must not start before a later instant than `now` out of a task
/// set meant for an agent that would start them on receipt (one older than
/// [`Assignment::not_before`]); returns when the first of them is due, to send the set
/// again then.
pub fn hold_back(tasks: &mut Vec<Assignment>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut due: Option<DateTime<Utc>> = None;
    tasks.retain(|a| match a.not_before {
        Some(at) if at > now => {
            due = Some(due.map_or(at, |d| d.min(at)));
            false
        }
        _ => true,
    });
    due
}

/// Job and CronJob runs still waiting for a node when their deadline passes have
/// failed: a run that cannot start must not hold its slot (or, under `Forbid`, the
/// next slots) hostage. Runs on a node are ended by their agent at the same deadline.
fn fail_runs_past_their_deadline(work: &mut BTreeMap<String, Task>, now: DateTime<Utc>) {
    for t in work.values_mut() {
        if t.node.is_some() || t.desired != DesiredState::Running || t.phase.is_terminal() {
            continue;
        }
        let Some(deadline) = run_deadline(t) else {
            continue;
        };
        if deadline <= now {
            let why = t
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            t.phase = TaskPhase::Failed;
            t.finished_at = Some(now);
            t.message = Some(format!(
                "timed out: not started by its deadline {}{why}",
                deadline.to_rfc3339_opts(SecondsFormat::Secs, true)
            ));
        }
    }
}

/// Tasks on a node that is gone are placed elsewhere: Services once the node is Dead,
/// Wallets only once the node has surely fenced them (see `nodes::HealthConfig`). Job
/// and CronJob runs stay where they ran, as history; one that was still running counts
/// as failed (retries decide what follows). Stopped tasks have nothing left to stop.
fn rescue_from_lost_nodes(
    work: &mut BTreeMap<String, Task>,
    nodes: &[NodeState],
    now: DateTime<Utc>,
) {
    let by_name: HashMap<&str, &NodeState> =
        nodes.iter().map(|n| (n.info.name.as_str(), n)).collect();
    for t in work.values_mut() {
        let Some(node) = t.node.clone() else { continue };
        let state = by_name.get(node.as_str());
        let gone = match t.kind {
            Kind::Wallet => state.is_none_or(|n| n.wallets_fenced),
            _ => state.is_none_or(|n| n.status == NodeStatus::Dead),
        };
        if !gone || (t.phase.is_terminal() && t.kind.runs_to_completion()) {
            continue;
        }
        // A run lost half-way is a failed attempt, not a fresh start: running it again
        // (a payout!) is for the retry policy to decide.
        if t.kind.runs_to_completion() && t.desired == DesiredState::Running {
            t.phase = TaskPhase::Failed;
            t.finished_at = Some(now);
            t.message = Some(format!("node {node} lost during the run"));
            continue;
        }
        match t.desired {
            DesiredState::Stopped => t.node = None,
            DesiredState::Running | DesiredState::Evicting => {
                let why = if t.kind == Kind::Wallet {
                    format!("node {node} lost and fenced; failing over")
                } else {
                    format!("node {node} lost; placing elsewhere")
                };
                reset_to_pending(t, why);
            }
        }
    }
}

/// Takes a task off its node so the scheduler places it again.
pub fn reset_to_pending(t: &mut Task, why: String) {
    t.node = None;
    t.desired = DesiredState::Running;
    t.phase = TaskPhase::Pending;
    t.container_id = None;
    t.ready = None;
    t.restart_at = None;
    t.message = Some(why);
}

fn stop(t: &mut Task, why: &str) {
    t.desired = DesiredState::Stopped;
    t.message = Some(why.to_string());
}

/// How many tasks of a workload should run, by kind.
fn wanted(w: &StoredWorkload) -> u32 {
    w.manifest.replicas()
}

fn converge_workload(w: &StoredWorkload, work: &mut BTreeMap<String, Task>, now: DateTime<Utc>) {
    let (kind, name) = (w.kind(), w.name());
    // A CronJob's tasks are its firings, created and retired by the cron loop.
    if kind == Kind::CronJob {
        return;
    }
    let replicas = wanted(w);
    let mine: Vec<String> = work
        .values()
        .filter(|t| t.kind == kind && t.workload == name)
        .map(|t| t.id.clone())
        .collect();

    for id in &mine {
        let Some(t) = work.get_mut(id) else { continue };
        if t.desired == DesiredState::Stopped {
            continue;
        }
        if t.spec_hash != w.spec_hash {
            stop(t, &format!("replaced by generation {}", w.generation));
        } else if t.replica >= replicas {
            stop(t, "scaled down");
        }
    }

    for i in 0..replicas {
        let id = task_id(name, &w.spec_hash, i);
        if let Some(t) = work.get_mut(&id) {
            if t.desired == DesiredState::Stopped {
                // Re-applied before the old container was gone: keep it instead of a copy.
                t.desired = DesiredState::Running;
                t.message = None;
            }
            continue;
        }
        // A Job that already ran this spec to the end is done.
        if kind == Kind::Job
            && mine.iter().any(|o| {
                work.get(o)
                    .is_some_and(|t| t.spec_hash == w.spec_hash && t.phase.is_terminal())
            })
        {
            continue;
        }
        // A Wallet never runs twice: its next task waits until every older one is gone
        // from its node (confirmed removed), not merely told to stop.
        if kind == Kind::Wallet && work.values().any(|t| t.kind == kind && t.workload == name) {
            continue;
        }
        let task = new_task(w, id.clone(), i, now);
        work.insert(id, task);
    }
}

/// A pending, unplaced task of the workload.
pub fn new_task(w: &StoredWorkload, id: String, replica: u32, now: DateTime<Utc>) -> Task {
    Task::pending(id, &w.manifest, w.spec_hash.clone(), replica, now)
}

/// Places pending tasks with the scheduler and records why the others cannot be placed.
/// A task backing off after a give-up (`retry_at` in the future) may go to any other
/// node at once, but not back to the nodes that gave it up; while it waits, its message
/// keeps saying why it failed and when it tries again.
fn place(work: &mut BTreeMap<String, Task>, nodes: &[NodeState], now: DateTime<Utc>) {
    let mut pending: Vec<&Task> = work
        .values()
        .filter(|t| {
            t.desired == DesiredState::Running && t.node.is_none() && !t.phase.is_terminal()
        })
        .collect();
    if pending.is_empty() {
        return;
    }
    pending.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

    let sched_nodes = nodes
        .iter()
        .map(|n| {
            let mut cpu = 0u64;
            let mut mem = 0u64;
            let mut per_workload: BTreeMap<(Kind, String), u32> = BTreeMap::new();
            let mut host_ports = BTreeSet::new();
            // Tasks still on a node hold their resources until confirmed gone; a finished
            // Job or CronJob run (kept for its history) has exited and holds nothing.
            for t in work.values().filter(|t| {
                t.node.as_deref() == Some(n.info.name.as_str())
                    && !(t.phase.is_terminal() && t.kind.runs_to_completion())
            }) {
                cpu += t.spec.resources.cpu.map_or(0, |c| c.millis());
                mem += t.spec.resources.memory.map_or(0, |m| m.bytes());
                host_ports.extend(host_ports_of(t));
                if t.desired == DesiredState::Running {
                    *per_workload
                        .entry((t.kind, t.workload.clone()))
                        .or_default() += 1;
                }
            }
            scheduler::NodeInfo {
                name: n.info.name.clone(),
                ready: n.status == NodeStatus::Ready,
                cordoned: n.cordoned,
                arch: n.info.arch,
                labels: n.info.labels.clone(),
                cpu_capacity: bramble_api::quantity::Cpu::cores(u64::from(n.info.cores)),
                memory_capacity: bramble_api::quantity::Memory(n.info.memory_bytes),
                cpu_allocated: bramble_api::quantity::Cpu(cpu),
                memory_allocated: bramble_api::quantity::Memory(mem),
                workload_tasks: per_workload,
                host_ports,
            }
        })
        .collect();
    let requests = pending
        .iter()
        .map(|t| scheduler::Request {
            task: t.id.clone(),
            kind: t.kind,
            workload: t.workload.clone(),
            resources: t.spec.resources,
            placement: t.placement.clone(),
            avoid: t.avoid.clone(),
            avoid_strictly: backing_off(t, now),
            host_ports: host_ports_of(t).collect(),
            prefer: preferred(t, nodes),
        })
        .collect();
    let result = scheduler::schedule(&scheduler::Snapshot {
        nodes: sched_nodes,
        pending: requests,
    });
    for p in result.placements {
        if let Some(t) = work.get_mut(&p.task) {
            t.node = Some(p.node);
            t.phase = TaskPhase::Scheduled;
            t.message = None;
            // Said by the last node about the last placement.
            t.reason = None;
            t.restart_at = None;
        }
    }
    for u in result.unplaced {
        if let Some(t) = work.get_mut(&u.task) {
            if !backing_off(t, now) {
                t.message = Some(u.summary());
            }
        }
    }
}

/// The nodes holding data of `t`'s managed volumes, newest first.
fn preferred(t: &Task, nodes: &[NodeState]) -> Vec<String> {
    let volumes = super::volumes::managed(t);
    super::volumes::holders(
        nodes
            .iter()
            .map(|n| (n.info.name.as_str(), n.volumes.as_slice())),
        &t.workload,
        &volumes,
    )
}

/// Whether `t` is waiting out its give-up back-off at `now`.
fn backing_off(t: &Task, now: DateTime<Utc>) -> bool {
    t.retry_at.is_some_and(|at| at > now)
}

/// The host ports a task publishes.
fn host_ports_of(t: &Task) -> impl Iterator<Item = (u16, bramble_api::manifest::Protocol)> + '_ {
    t.spec
        .ports
        .iter()
        .filter_map(|p| p.host.map(|h| (h, p.protocol)))
}

/// The task after its node reported `s` at `now`, or `None` if nothing changes or the
/// report comes from a node the task is not on (a stale agent must not rewrite history).
///
/// A node that gave a task up (too many failures there): a Service or Wallet task is
/// placed again, on another node at once if one fits, back on a node that gave it up
/// only after [`GIVE_UP_BACKOFF`]; a Job or CronJob run has failed, and its retries
/// decide what follows.
pub fn apply_status(task: &Task, node: &str, s: &TaskStatus, now: DateTime<Utc>) -> Option<Task> {
    if task.node.as_deref() != Some(node) {
        return None;
    }
    let mut t = task.clone();
    t.phase = s.phase;
    t.exit_code = s.exit_code.or(if s.phase == TaskPhase::Running {
        None
    } else {
        t.exit_code
    });
    if s.phase == TaskPhase::Running {
        t.exit_code = None;
    }
    t.message = s.message.clone();
    t.reason = s.reason;
    t.restart_at = s.restart_at;
    if s.container_id.is_some() {
        t.container_id = s.container_id.clone();
    }
    t.restarts = s.restarts;
    t.ready = s.ready;
    if s.output.is_some() {
        t.output = s.output.clone();
    }
    if s.started_at.is_some() {
        t.started_at = s.started_at;
    }
    if s.finished_at.is_some() || s.phase == TaskPhase::Running {
        t.finished_at = s.finished_at;
    }
    // The desired state is the controller's, never the agent's.
    if t.desired == DesiredState::Stopped {
        t.message = task.message.clone().or(t.message);
    }
    // Running well long after its last give-up: the next give-up starts over.
    if s.phase == TaskPhase::Running
        && t.retry_at.is_some_and(|at| {
            (now - at)
                .to_std()
                .is_ok_and(|d| d >= GIVE_UP_FORGOTTEN_AFTER)
        })
    {
        t.retry_at = None;
        t.give_ups = 0;
    }
    if s.gave_up && t.desired == DesiredState::Running {
        let cause = s.message.as_deref().unwrap_or("too many failures");
        if t.kind.runs_to_completion() {
            // A run that cannot start (or keeps failing) on its node has failed; its
            // retries, not the scheduler, decide whether it runs again.
            t.phase = TaskPhase::Failed;
            t.finished_at = Some(s.finished_at.unwrap_or(now));
            t.message = Some(format!("failed on node {node}: {cause}"));
        } else {
            // Its old container has exited and will not be restarted there, so even a
            // Wallet can move right away.
            if !t.avoid.iter().any(|n| n == node) {
                t.avoid.push(node.to_string());
            }
            t.give_ups = t.give_ups.saturating_add(1);
            let wait = chrono::Duration::from_std(GIVE_UP_BACKOFF.delay(t.give_ups))
                .unwrap_or_else(|_| chrono::Duration::seconds(300));
            let retry_at = now + wait;
            let why = format!(
                "gave up on node {node}: {cause}; retrying there at {} unless another node takes it first",
                retry_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
            reset_to_pending(&mut t, why);
            t.retry_at = Some(retry_at);
            t.restarts = 0;
        }
    }
    (t != *task).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::manifest::Arch;
    use bramble_api::parse::parse_manifests;

    fn workload(yaml: &str) -> StoredWorkload {
        let docs = parse_manifests("t.yaml", yaml)
            .expect("valid manifest")
            .workloads;
        StoredWorkload::new(docs[0].manifest.clone(), Utc::now())
    }

    fn service(name: &str, replicas: u32, image: &str) -> StoredWorkload {
        workload(&format!(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  image: {image}\n  replicas: {replicas}\n  resources: {{cpu: 500m, memory: 64Mi}}\n"
        ))
    }

    fn wallet(image: &str) -> StoredWorkload {
        workload(&format!("apiVersion: bramble/v1\nkind: Wallet\nmetadata: {{name: w}}\nspec:\n  image: {image}\n"))
    }

    fn node(name: &str) -> NodeState {
        NodeState {
            volumes: Vec::new(),
            info: NodeInfo {
                mesh: None,
                name: name.into(),
                arch: Arch::Arm64,
                cores: 4,
                memory_bytes: 1 << 30,
                docker_version: "20.10".into(),
                labels: BTreeMap::new(),
                agent_version: "0".into(),
                os: String::new(),
                machine_id: None,
                memory_limits: None,
                warnings: Vec::new(),
            },
            status: NodeStatus::Ready,
            cordoned: false,
            wallets_fenced: false,
        }
    }

    /// Applies writes to a task list the way the store would, bumping revisions.
    fn apply(tasks: &mut Vec<Versioned<Task>>, writes: &[Write]) {
        for w in writes {
            tasks.retain(|t| t.value.id != w.id);
            if let Some(v) = &w.value {
                tasks.push(Versioned {
                    value: v.clone(),
                    rev: w.rev + 1,
                    created: w.rev + 1,
                });
            }
        }
    }

    fn run_to_fixpoint(
        ws: &[StoredWorkload],
        tasks: &mut Vec<Versioned<Task>>,
        nodes: &[NodeState],
    ) {
        for _ in 0..10 {
            let writes = plan(ws, tasks, nodes, Utc::now());
            if writes.is_empty() {
                return;
            }
            apply(tasks, &writes);
        }
        panic!("reconcile did not settle");
    }

    #[test]
    fn creates_and_places_one_task_per_replica_spread_over_nodes() {
        let ws = [service("web", 3, "a:1")];
        let nodes = [node("n1"), node("n2"), node("n3")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        assert_eq!(tasks.len(), 3);
        let placed: HashSet<_> = tasks.iter().filter_map(|t| t.value.node.clone()).collect();
        assert_eq!(placed.len(), 3, "replicas spread: {tasks:?}");
        assert!(tasks.iter().all(|t| t.value.phase == TaskPhase::Scheduled));
    }

    #[test]
    fn reconcile_twice_is_a_no_op() {
        let ws = [service("web", 2, "a:1"), wallet("w:1")];
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        assert!(plan(&ws, &tasks, &nodes, Utc::now()).is_empty());
    }

    #[test]
    fn pending_tasks_say_why() {
        let ws = [service("web", 1, "a:1")];
        let writes = plan(&ws, &[], &[], Utc::now());
        assert_eq!(writes.len(), 1);
        let t = writes[0].value.as_ref().expect("created");
        assert_eq!(t.phase, TaskPhase::Pending);
        assert!(t.message.as_deref().is_some_and(|m| !m.is_empty()), "{t:?}");
    }

    #[test]
    fn a_changed_image_replaces_tasks_and_unchanged_keeps_them() {
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&[service("web", 2, "a:1")], &mut tasks, &nodes);
        let old: Vec<String> = tasks.iter().map(|t| t.value.id.clone()).collect();
        run_to_fixpoint(&[service("web", 2, "a:1")], &mut tasks, &nodes);
        assert_eq!(
            old,
            tasks.iter().map(|t| t.value.id.clone()).collect::<Vec<_>>()
        );

        run_to_fixpoint(&[service("web", 2, "a:2")], &mut tasks, &nodes);
        let stopped: Vec<_> = tasks
            .iter()
            .filter(|t| t.value.desired == DesiredState::Stopped)
            .collect();
        let running: Vec<_> = tasks
            .iter()
            .filter(|t| t.value.desired == DesiredState::Running)
            .collect();
        assert_eq!(stopped.len(), 2);
        assert_eq!(running.len(), 2);
        assert!(stopped.iter().all(|t| old.contains(&t.value.id)));
    }

    #[test]
    fn scaling_down_stops_the_highest_replicas() {
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&[service("web", 3, "a:1")], &mut tasks, &nodes);
        run_to_fixpoint(&[service("web", 1, "a:1")], &mut tasks, &nodes);
        let running: Vec<u32> = tasks
            .iter()
            .filter(|t| t.value.desired == DesiredState::Running)
            .map(|t| t.value.replica)
            .collect();
        assert_eq!(running, [0]);
    }

    #[test]
    fn deleting_a_workload_stops_its_tasks_and_unplaced_ones_vanish() {
        let mut tasks = Vec::new();
        run_to_fixpoint(&[service("web", 1, "a:1")], &mut tasks, &[node("n1")]);
        let mut cordoned = node("n1");
        cordoned.cordoned = true;
        let nodes = [cordoned];
        run_to_fixpoint(&[service("db", 1, "a:1")], &mut tasks, &nodes);
        // web is told to stop on its node; db was never placed.
        let web: Vec<_> = tasks.iter().filter(|t| t.value.workload == "web").collect();
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].value.desired, DesiredState::Stopped);
        run_to_fixpoint(&[], &mut tasks, &nodes);
        assert!(
            tasks.iter().all(|t| t.value.workload == "web"),
            "unplaced db task deleted: {tasks:?}"
        );
    }

    #[test]
    fn a_changed_wallet_waits_until_the_old_one_is_gone() {
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&[wallet("w:1")], &mut tasks, &nodes);
        run_to_fixpoint(&[wallet("w:2")], &mut tasks, &nodes);
        assert_eq!(
            tasks.len(),
            1,
            "no second wallet while the first is not confirmed gone"
        );
        assert_eq!(tasks[0].value.desired, DesiredState::Stopped);
        // The node confirms removal: the record goes, then the new wallet is created.
        tasks.clear();
        run_to_fixpoint(&[wallet("w:2")], &mut tasks, &nodes);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].value.spec.image, "w:2");
    }

    #[test]
    fn a_finished_job_is_not_run_again() {
        let job = workload(
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: j:1\n",
        );
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(std::slice::from_ref(&job), &mut tasks, &nodes);
        tasks[0].value.phase = TaskPhase::Succeeded;
        assert!(plan(&[job], &tasks, &nodes, Utc::now()).is_empty());
    }

    #[test]
    fn finished_runs_kept_for_history_hold_no_capacity() {
        // Each run asks for the whole node; the first is done, so the second fits.
        let job = |name: &str| {
            workload(&format!(
                "apiVersion: bramble/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  image: j:1\n  resources: {{cpu: 4, memory: 512Mi}}\n"
            ))
        };
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&[job("a")], &mut tasks, &nodes);
        assert_eq!(placed_on(&tasks), [Some("n1".to_string())]);
        for (phase, fits) in [
            (TaskPhase::Running, false),
            (TaskPhase::Succeeded, true),
            (TaskPhase::Failed, true),
        ] {
            let mut ts = tasks.clone();
            ts[0].value.phase = phase;
            run_to_fixpoint(&[job("a"), job("b")], &mut ts, &nodes);
            let b = ts
                .iter()
                .find(|t| t.value.workload == "b")
                .expect("b's task");
            assert_eq!(b.value.node.is_some(), fits, "first run {phase:?}");
        }
    }

    #[test]
    fn status_reports_from_another_node_are_ignored() {
        let mut tasks = Vec::new();
        run_to_fixpoint(&[service("web", 1, "a:1")], &mut tasks, &[node("n1")]);
        let t = &tasks[0].value;
        let s = TaskStatus {
            task: t.id.clone(),
            phase: TaskPhase::Running,
            exit_code: None,
            message: None,
            container_id: Some("c1".into()),
            restarts: 0,
            ready: None,
            started_at: Some(Utc::now()),
            finished_at: None,
            gave_up: false,
            output: None,
            reason: None,
            restart_at: None,
        };
        assert!(apply_status(t, "n2", &s, Utc::now()).is_none());
        let updated = apply_status(t, "n1", &s, Utc::now()).expect("changes");
        assert_eq!(updated.phase, TaskPhase::Running);
        assert!(
            apply_status(&updated, "n1", &s, Utc::now()).is_none(),
            "same report twice writes nothing"
        );
    }

    fn placed_on(tasks: &[Versioned<Task>]) -> Vec<Option<String>> {
        tasks.iter().map(|t| t.value.node.clone()).collect()
    }

    #[test]
    fn a_dead_nodes_service_tasks_move_but_a_wallet_waits_for_the_fence() {
        let ws = [service("web", 1, "a:1"), wallet("w:1")];
        let mut nodes = vec![node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        assert!(placed_on(&tasks).iter().all(|n| n.as_deref() == Some("n1")));

        nodes[0].status = NodeStatus::Dead;
        nodes.push(node("n2"));
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let web = tasks
            .iter()
            .find(|t| t.value.workload == "web")
            .expect("web");
        let w = tasks
            .iter()
            .find(|t| t.value.workload == "w")
            .expect("wallet");
        assert_eq!(
            web.value.node.as_deref(),
            Some("n2"),
            "service moved once the node is dead"
        );
        assert_eq!(
            w.value.node.as_deref(),
            Some("n1"),
            "wallet stays until the node has surely fenced it"
        );

        nodes[0].wallets_fenced = true;
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let w = tasks
            .iter()
            .find(|t| t.value.workload == "w")
            .expect("wallet");
        assert_eq!(w.value.node.as_deref(), Some("n2"));
        assert_eq!(tasks.len(), 2, "moved, not copied");
    }

    #[test]
    fn finished_jobs_stay_on_a_dead_node_as_history() {
        let job = workload(
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: j:1\n",
        );
        let mut nodes = vec![node("n1"), node("n2")];
        let mut tasks = Vec::new();
        run_to_fixpoint(std::slice::from_ref(&job), &mut tasks, &nodes);
        let on = tasks[0].value.node.clone();
        tasks[0].value.phase = TaskPhase::Succeeded;
        for n in &mut nodes {
            n.status = NodeStatus::Dead;
            n.wallets_fenced = true;
        }
        run_to_fixpoint(&[job], &mut tasks, &nodes);
        assert_eq!(tasks[0].value.node, on);
    }

    #[test]
    fn a_task_given_up_moves_to_another_node_and_avoids_the_old_one() {
        let ws = [service("web", 1, "a:1")];
        let nodes = [node("n1"), node("n2")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let t = tasks[0].value.clone();
        let first = t.node.clone().expect("placed");
        let s = TaskStatus {
            task: t.id.clone(),
            phase: TaskPhase::Failed,
            exit_code: Some(1),
            message: Some("gave up after 3 failures in 1m".into()),
            container_id: None,
            restarts: 2,
            ready: None,
            started_at: None,
            finished_at: None,
            gave_up: true,
            output: None,
            reason: None,
            restart_at: None,
        };
        let moved = apply_status(&t, &first, &s, Utc::now()).expect("changes");
        assert_eq!(moved.node, None);
        assert_eq!(moved.avoid, std::slice::from_ref(&first));
        tasks[0].value = moved;
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        assert_ne!(tasks[0].value.node.as_deref(), Some(first.as_str()));
        assert!(tasks[0].value.node.is_some());
    }

    #[test]
    fn an_evicting_task_keeps_its_node_until_confirmed_gone() {
        let ws = [wallet("w:1")];
        let mut nodes = vec![node("n1"), node("n2")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let on = tasks[0].value.node.clone();
        tasks[0].value.desired = DesiredState::Evicting;
        nodes
            .iter_mut()
            .filter(|n| Some(&n.info.name) == on.as_ref())
            .for_each(|n| n.cordoned = true);
        assert!(
            plan(&ws, &tasks, &nodes, Utc::now()).is_empty(),
            "nothing happens until the node confirms"
        );
        // Confirmed: the cluster resets it to pending; the scheduler avoids the cordoned node.
        reset_to_pending(&mut tasks[0].value, "evicted".into());
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        assert!(tasks[0].value.node.is_some());
        assert_ne!(tasks[0].value.node, on);
    }

    /// What `node`'s agent reports when it gives `t` up.
    fn gave_up(t: &Task, node: &str, message: &str) -> TaskStatus {
        assert_eq!(
            t.node.as_deref(),
            Some(node),
            "a report from the task's node"
        );
        TaskStatus {
            task: t.id.clone(),
            phase: TaskPhase::Failed,
            exit_code: None,
            message: Some(message.into()),
            container_id: None,
            restarts: 0,
            ready: None,
            started_at: None,
            finished_at: None,
            gave_up: true,
            output: None,
            reason: None,
            restart_at: None,
        }
    }

    #[test]
    fn a_task_given_up_on_the_only_node_waits_visibly_then_goes_back_with_backoff() {
        let ws = [service("web", 1, "missing:1")];
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let t0 = Utc::now();
        let mut waits = Vec::new();
        for round in 1..=4u32 {
            let t = tasks[0].value.clone();
            let s = gave_up(&t, "n1", "image missing:1 not found");
            let now = t0 + chrono::Duration::seconds(1000 * i64::from(round));
            let next = apply_status(&t, "n1", &s, now).expect("a change");
            assert_eq!(next.give_ups, round);
            let retry_at = next.retry_at.expect("a retry time");
            waits.push((retry_at - now).num_seconds());
            tasks[0].value = next;
            // Before the retry time: not placed, and it says why and when.
            let writes = plan(&ws, &tasks, &nodes, now + chrono::Duration::seconds(1));
            assert!(writes.is_empty(), "waits: {writes:?}");
            let msg = tasks[0].value.message.clone().expect("a message");
            assert!(
                msg.starts_with(
                    "gave up on node n1: image missing:1 not found; retrying there at "
                ),
                "{msg}"
            );
            assert_eq!(tasks[0].value.phase, TaskPhase::Pending);
            // The pass that wakes at the retry time places it back on the node.
            let (changes, wake) = change(&snapshot_of(&ws, &tasks), &nodes, now);
            assert!(changes.is_empty());
            assert_eq!(wake, Some(retry_at));
            let writes = plan(&ws, &tasks, &nodes, retry_at);
            assert_eq!(writes.len(), 1);
            let placed = writes[0].value.clone().expect("placed");
            assert_eq!(placed.node.as_deref(), Some("n1"));
            assert_eq!(placed.phase, TaskPhase::Scheduled);
            tasks[0].value = placed;
        }
        assert_eq!(waits, [5, 10, 20, 40], "exponential back-off from 5 s");
        // Running well for longer than the window: the next give-up starts over.
        let running = TaskStatus {
            phase: TaskPhase::Running,
            gave_up: false,
            message: None,
            ..gave_up(&tasks[0].value, "n1", "")
        };
        let later = tasks[0].value.retry_at.expect("set") + chrono::Duration::minutes(11);
        let healthy = apply_status(&tasks[0].value, "n1", &running, later).expect("a change");
        assert_eq!((healthy.give_ups, healthy.retry_at), (0, None));
    }

    #[test]
    fn a_run_that_cannot_start_fails_instead_of_moving() {
        let job = workload(
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: missing:1\n  retries: 2\n",
        );
        let nodes = [node("n1"), node("n2")];
        let mut tasks = Vec::new();
        run_to_fixpoint(std::slice::from_ref(&job), &mut tasks, &nodes);
        let t = tasks[0].value.clone();
        let node = t.node.clone().expect("placed");
        let now = Utc::now();
        let next =
            apply_status(&t, &node, &gave_up(&t, &node, "image not found"), now).expect("a change");
        assert_eq!(next.phase, TaskPhase::Failed);
        assert_eq!(
            next.node.as_deref(),
            Some(node.as_str()),
            "stays as history"
        );
        assert_eq!(next.finished_at, Some(now));
        assert_eq!(
            next.message.as_deref(),
            Some(format!("failed on node {node}: image not found").as_str())
        );
    }

    #[test]
    fn an_unplaced_run_past_its_deadline_fails_and_frees_its_slot() {
        let job = workload(
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: a:1\n  timeout: 10m\n  resources: {memory: 900Gi}\n",
        );
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(std::slice::from_ref(&job), &mut tasks, &nodes);
        let t = &tasks[0].value;
        assert_eq!(t.node, None, "nothing fits");
        let deadline = run_deadline(t).expect("a deadline");
        assert_eq!(deadline, t.created_at + chrono::Duration::minutes(10));
        assert!(plan(
            std::slice::from_ref(&job),
            &tasks,
            &nodes,
            deadline - chrono::Duration::seconds(1)
        )
        .is_empty());
        let writes = plan(std::slice::from_ref(&job), &tasks, &nodes, deadline);
        let failed = writes[0].value.clone().expect("a write");
        assert_eq!(failed.phase, TaskPhase::Failed);
        let msg = failed.message.expect("why");
        assert!(
            msg.starts_with("timed out: not started by its deadline "),
            "{msg}"
        );
        assert!(
            msg.contains("0/1 node fit"),
            "keeps the reason it never started: {msg}"
        );
    }

    #[test]
    fn the_placed_index_gives_every_node_the_same_set_as_a_full_scan() {
        let ws = [
            service("web", 5, "a:1"),
            service("api", 3, "b:1"),
            workload(
                "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: a:1\n",
            ),
        ];
        let nodes = [node("n1"), node("n2"), node("n3")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        // One task stopped on its node, one not placed at all.
        tasks[0].value.desired = DesiredState::Stopped;
        tasks[1].value.node = None;
        let snap = snapshot_of(&ws, &tasks);
        let placed = placed(&snap);
        assert!(!placed.managed_volumes);
        let sealer = crate::core::secrets::tests::Mirror;
        let mut seen = 0;
        for n in ["n1", "n2", "n3", "n4"] {
            let full = assignments(&snap, n, &sealer);
            assert_eq!(assignments_placed(&snap, &placed, n, &sealer), full, "{n}");
            seen += full.len();
        }
        assert_eq!(seen, tasks.len() - 2, "every placed running task, once");
        // A task that is gone from the snapshot but still in an older index is skipped.
        let mut fewer = snap.clone();
        let gone = tasks[2].value.id.clone();
        fewer.tasks.remove(&gone);
        let n = tasks[2].value.node.clone().expect("placed");
        let set = assignments_placed(&fewer, &placed, &n, &sealer);
        assert!(set.iter().all(|a| a.task != gone));
    }

    #[test]
    fn assignments_carry_the_deadline_of_runs_only() {
        let job = workload(
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  image: a:1\n  timeout: 90s\n",
        );
        let ws = [job, service("web", 1, "a:1")];
        let nodes = [node("n1")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let set = assignments(
            &snapshot_of(&ws, &tasks),
            "n1",
            &crate::core::secrets::tests::Mirror,
        );
        assert_eq!(set.len(), 2);
        for a in &set {
            let t = tasks.iter().find(|t| t.value.id == a.task).expect("a task");
            match a.kind {
                Kind::Job => assert_eq!(
                    a.deadline,
                    Some(t.value.created_at + chrono::Duration::seconds(90))
                ),
                _ => assert_eq!(a.deadline, None),
            }
        }
        assert!(assignments(
            &snapshot_of(&ws, &tasks),
            "n2",
            &crate::core::secrets::tests::Mirror
        )
        .is_empty());
    }

    #[test]
    fn two_replicas_wanting_one_host_port_wait_for_a_second_node() {
        let stratum = workload(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: stratum}\nspec:\n  image: s:1\n  replicas: 2\n  ports: [{container: 3333, host: 3333}]\n",
        );
        let mut tasks = Vec::new();
        run_to_fixpoint(std::slice::from_ref(&stratum), &mut tasks, &[node("n1")]);
        let placed: Vec<_> = tasks.iter().filter(|t| t.value.node.is_some()).collect();
        assert_eq!(placed.len(), 1);
        let waiting = tasks
            .iter()
            .find(|t| t.value.node.is_none())
            .expect("one waits");
        assert_eq!(
            waiting.value.message.as_deref(),
            Some("0/1 node fit: 1 port 3333 in use")
        );
        run_to_fixpoint(
            std::slice::from_ref(&stratum),
            &mut tasks,
            &[node("n1"), node("n2")],
        );
        let nodes: HashSet<_> = tasks.iter().filter_map(|t| t.value.node.clone()).collect();
        assert_eq!(nodes.len(), 2, "one replica per node");
    }

    #[test]
    fn a_wallet_placed_anew_gets_an_epoch_above_every_earlier_placement() {
        let ws = [service("web", 1, "a:1"), wallet("w:1")];
        let mut nodes = vec![node("n1")];
        let mut tasks = Vec::new();
        let epoch_of = |tasks: &[Versioned<Task>], w: &str| {
            tasks
                .iter()
                .find(|t| t.value.workload == w)
                .map(|t| t.value.epoch)
        };
        let mut snap = snapshot_of(&ws, &tasks);
        snap.revision = 41;
        let mut writes = plan(&ws, &tasks, &nodes, Utc::now());
        stamp_epochs(&mut writes, &snap);
        apply(&mut tasks, &writes);
        // Creation and placement are decided in one pass here.
        if epoch_of(&tasks, "w") == Some(0) {
            snap = snapshot_of(&ws, &tasks);
            snap.revision = 41;
            let mut writes = plan(&ws, &tasks, &nodes, Utc::now());
            stamp_epochs(&mut writes, &snap);
            apply(&mut tasks, &writes);
        }
        assert_eq!(
            epoch_of(&tasks, "w"),
            Some(42),
            "one above the decision's revision"
        );
        assert_eq!(epoch_of(&tasks, "web"), Some(0), "only Wallets carry one");

        // Nothing moves: the epoch stays, whatever the store's revision now.
        let mut snap = snapshot_of(&ws, &tasks);
        snap.revision = 50;
        let mut writes = plan(&ws, &tasks, &nodes, Utc::now());
        stamp_epochs(&mut writes, &snap);
        assert!(writes.iter().all(|w| w
            .value
            .as_ref()
            .is_none_or(|t| t.epoch == 0 || t.epoch == 42)));

        // Moved off a fenced node: a new, higher epoch, and the assignment says it.
        nodes[0].status = NodeStatus::Dead;
        nodes[0].wallets_fenced = true;
        nodes.push(node("n2"));
        let mut snap = snapshot_of(&ws, &tasks);
        snap.revision = 60;
        let mut writes = plan(&ws, &tasks, &nodes, Utc::now());
        stamp_epochs(&mut writes, &snap);
        apply(&mut tasks, &writes);
        assert_eq!(epoch_of(&tasks, "w"), Some(61));
        let set = assignments(
            &snapshot_of(&ws, &tasks),
            "n2",
            &crate::core::secrets::tests::Mirror,
        );
        let epochs: Vec<_> = set.iter().map(|a| (a.kind, a.epoch)).collect();
        assert!(epochs.contains(&(Kind::Wallet, Some(61))), "{epochs:?}");
        assert!(epochs.contains(&(Kind::Service, None)), "{epochs:?}");
    }

    #[test]
    fn a_task_with_synced_volumes_carries_an_epoch_and_goes_where_its_data_is() {
        let synced = workload(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: db}\nspec:\n  image: db:1\n  volumes: [{name: db-data, path: /d}]\n  sync: {copies: 1}\n",
        );
        let ws = [synced];
        let mut n1 = node("n1");
        let mut n2 = node("n2");
        let mut n3 = node("n3");
        let report = |workload: &str, volume: &str, epoch, role| bramble_api::wire::VolumeReport {
            workload: workload.into(),
            volume: volume.into(),
            role,
            epoch,
            at: None,
            bytes: 0,
            files: 0,
            origin: None,
            last_sync: None,
            path: None,
        };
        use bramble_api::wire::VolumeRole::{Copy, InUse};
        n1.volumes.push(report("db", "db-data", 3, Copy));
        n3.volumes.push(report("db", "db-data", 5, Copy));
        n2.volumes.push(report("other", "other-data", 9, InUse));
        let nodes = vec![n1, n2, n3];
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let mut snap = snapshot_of(&ws, &tasks);
            snap.revision = 70;
            let mut writes = plan(&ws, &tasks, &nodes, Utc::now());
            stamp_epochs(&mut writes, &snap);
            apply(&mut tasks, &writes);
        }
        let t = &tasks[0].value;
        assert_eq!(
            t.node.as_deref(),
            Some("n3"),
            "the node with the newest copy"
        );
        assert_eq!(t.epoch, 71);
        let set = assignments(
            &snapshot_of(&ws, &tasks),
            "n3",
            &crate::core::secrets::tests::Mirror,
        );
        assert_eq!(set[0].epoch, Some(71));
    }

    #[test]
    fn a_settled_pass_is_skipped_only_while_nothing_it_reads_has_changed() {
        let ws = vec![service("web", 2, "nginx:1")];
        let nodes = vec![node("n1"), node("n2")];
        let mut tasks = Vec::new();
        run_to_fixpoint(&ws, &mut tasks, &nodes);
        let snap = snapshot_of(&ws, &tasks);
        assert!(
            change(&snap, &nodes, Utc::now()).0.is_empty(),
            "placed: nothing to do"
        );
        let last = Settled {
            revision: snap.revision,
            nodes: nodes.clone(),
        };
        assert!(!settled(None, &snap, &nodes), "no pass yet");
        assert!(settled(Some(&last), &snap, &nodes));

        let mut suspect = nodes.clone();
        suspect[1].status = NodeStatus::NotReady;
        assert!(
            !settled(Some(&last), &snap, &suspect),
            "a node's health changed"
        );
        let mut fenced = nodes.clone();
        fenced[0].wallets_fenced = true;
        assert!(!settled(Some(&last), &snap, &fenced));
        let other = Settled {
            revision: snap.revision + 1,
            nodes: nodes.clone(),
        };
        assert!(!settled(Some(&other), &snap, &nodes), "the store changed");

        // A task waiting for a node depends on the clock (back-off, deadline).
        let mut waiting = tasks.clone();
        waiting[0].value.node = None;
        let snap = snapshot_of(&ws, &waiting);
        let last = Settled {
            revision: snap.revision,
            nodes: nodes.clone(),
        };
        assert!(!settled(Some(&last), &snap, &nodes));
    }

    fn snapshot_of(ws: &[StoredWorkload], tasks: &[Versioned<Task>]) -> Snapshot {
        let mut snap = Snapshot::default();
        for (i, w) in ws.iter().enumerate() {
            let key = crate::core::model::workload_key(w.kind(), w.name());
            snap.insert(
                &key,
                crate::core::snapshot::Item::Workload(w.clone()),
                i as u64 + 1,
                i as u64 + 1,
            );
        }
        for t in tasks {
            let key = crate::core::model::task_key(&t.value.id);
            snap.insert(
                &key,
                crate::core::snapshot::Item::Task(t.value.clone()),
                t.created,
                t.rev,
            );
        }
        snap
    }

    #[test]
    fn only_a_cronjobs_first_attempt_waits_for_its_slot_and_old_agents_get_it_at_the_slot() {
        let job = workload("apiVersion: bramble/v1\nkind: CronJob\nmetadata: {name: tick}\nspec:\n  image: busybox\n  schedule: \"* * * * *\"\n");
        let now = Utc::now();
        let slot = now + chrono::Duration::seconds(2);
        let run = |id: &str, attempt| Task {
            slot: Some(slot),
            attempt,
            ..new_task(&job, id.into(), 0, now)
        };
        assert_eq!(not_before(&run("tick-a", 0)), Some(slot));
        assert_eq!(
            not_before(&run("tick-a-r1", 1)),
            None,
            "a retry starts when due"
        );
        let svc = new_task(&service("web", 1, "nginx"), "web-0".into(), 0, now);
        assert_eq!(
            not_before(&Task {
                slot: Some(slot),
                ..svc
            }),
            None
        );

        let assigned = |id: &str, at: Option<DateTime<Utc>>| {
            let t = run(id, 0);
            Assignment {
                task: t.id,
                kind: t.kind,
                workload: t.workload,
                spec_hash: t.spec_hash,
                spec: t.spec,
                deadline: None,
                secrets: Default::default(),
                epoch: None,
                sync_to: Vec::new(),
                restore_from: None,
                not_before: at,
            }
        };
        let mut tasks = vec![
            assigned("later", Some(slot + chrono::Duration::seconds(5))),
            assigned("now", Some(now)),
            assigned("soon", Some(slot)),
            assigned("any", None),
        ];
        assert_eq!(
            hold_back(&mut tasks, now),
            Some(slot),
            "sent again at the first slot"
        );
        let ids: Vec<&str> = tasks.iter().map(|a| a.task.as_str()).collect();
        assert_eq!(ids, ["now", "any"]);
        assert_eq!(hold_back(&mut tasks, now), None);
    }
}
