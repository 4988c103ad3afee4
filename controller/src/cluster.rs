//! The controller's shared state and the operations on it: the store, nodes in memory,
//! tokens and log streams. HTTP handlers and the agent hub call into it; the reconcile
//! loop drives it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bramble_api::manifest::Kind;
use bramble_api::parse::parse_sources;
use bramble_api::rest::{
    ApplyOutcome, ApplyRequest, ApplyResponse, ApplyResult, DeleteResponse, NodeStatus, NodeView,
    WorkloadView,
};
use bramble_api::task::{DesiredState, Task, TaskPhase};
use bramble_api::wire::{Assignment, NodeInfo, TaskStatus};
use chrono::Utc;
use tokio::sync::{mpsc, Notify};

use crate::auth::Tokens;
use crate::events::{self, Draft, Events};
use crate::http::ApiError;
use crate::model::{self, StoredNode, StoredWorkload, Versioned};
use crate::nodes::Nodes;
use crate::reconcile::{self, NodeState};
use crate::store::{Compare, Op, Store, StoreExt};

/// A piece of a log stream on its way from an agent to an HTTP client.
#[derive(Debug)]
pub enum LogEvent {
    /// Text.
    Data(String),
    /// The end; an error text if it ended early.
    End(Option<String>),
}

/// Everything the controller shares between its tasks.
pub struct Cluster {
    /// Desired and observed state.
    pub store: Arc<dyn Store>,
    /// Node health and links.
    pub nodes: Nodes,
    /// Bearer tokens.
    pub tokens: Tokens,
    /// The event log.
    pub events: Events,
    /// When the controller started.
    pub started: std::time::Instant,
    /// An hour of node metrics for the dashboard (memory only).
    pub history: crate::history::History,
    /// REST latency and other counters for `/metrics`.
    pub telemetry: crate::telemetry::Telemetry,
    /// The dashboard's live streams.
    pub feed: crate::feed::Feed,
    /// Event notifications.
    pub webhooks: crate::webhooks::Webhooks,
    wake: Notify,
    logs: Mutex<HashMap<u64, mpsc::Sender<LogEvent>>>,
    next_id: AtomicU64,
}

/// How many times a conflicting apply is retried against fresh state.
const APPLY_ATTEMPTS: usize = 5;

impl Cluster {
    /// A cluster over `store`.
    pub fn new(
        store: Arc<dyn Store>,
        nodes: Nodes,
        tokens: Tokens,
    ) -> Result<Cluster, crate::Error> {
        let events = Events::open(store.as_ref())?;
        Ok(Cluster {
            store,
            nodes,
            tokens,
            events,
            started: std::time::Instant::now(),
            history: Default::default(),
            telemetry: Default::default(),
            feed: Default::default(),
            webhooks: Default::default(),
            wake: Notify::new(),
            logs: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Records events now.
    pub fn record(&self, drafts: Vec<Draft>) {
        self.events.record(&self.store, drafts, Utc::now());
    }

    /// A fresh id for connections and log requests.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the reconcile loop for a pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for [`Cluster::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    // ---- workloads ----

    /// Creates or updates every workload in the request, all or nothing.
    pub fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApiError> {
        let docs = parse_sources(&req.sources).map_err(ApiError::invalid_manifest)?;
        for _ in 0..APPLY_ATTEMPTS {
            let now = Utc::now();
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            let mut results = Vec::new();
            for d in &docs {
                let m = &d.manifest;
                let key = model::workload_key(m.kind, m.metadata.name.as_str());
                let existing: Option<Versioned<StoredWorkload>> =
                    model::get(self.store.as_ref(), &key)?;
                let (outcome, new, rev) = match &existing {
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
                    compares.push(Compare::ModRevision {
                        key: key.clone(),
                        rev,
                    });
                    ops.push(Op::Put {
                        key,
                        value: model::encode(&new),
                    });
                }
                results.push(ApplyResult {
                    kind: m.kind,
                    name: m.metadata.name.to_string(),
                    outcome,
                });
            }
            if req.dry_run || ops.is_empty() {
                return Ok(ApplyResponse { results });
            }
            if self.store.txn(&compares, &ops)?.succeeded {
                let drafts = results
                    .iter()
                    .filter(|r| r.outcome != ApplyOutcome::Unchanged)
                    .map(|r| {
                        Draft::normal(
                            format!("{}/{}", r.kind.path(), r.name),
                            "Applied",
                            r.outcome.to_string(),
                        )
                    })
                    .collect();
                self.record(drafts);
                self.wake();
                return Ok(ApplyResponse { results });
            }
            tracing::debug!("apply raced another writer; retrying on fresh state");
        }
        Err(ApiError::conflict(
            "the workloads changed while applying; try again",
        ))
    }

    fn view(&self, w: &StoredWorkload, tasks: &[Versioned<Task>]) -> WorkloadView {
        let running = tasks
            .iter()
            .filter(|t| {
                t.value.kind == w.kind()
                    && t.value.workload == w.name()
                    && t.value.desired == DesiredState::Running
                    && t.value.phase == TaskPhase::Running
            })
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
    pub fn workloads(&self, kind: Option<Kind>) -> Result<Vec<WorkloadView>, ApiError> {
        let prefix = match kind {
            Some(k) => format!("{}{}/", model::WORKLOADS, k.path()),
            None => model::WORKLOADS.to_string(),
        };
        let ws: Vec<Versioned<StoredWorkload>> = model::list(self.store.as_ref(), &prefix)?;
        let tasks = model::list(self.store.as_ref(), model::TASKS)?;
        Ok(ws.iter().map(|w| self.view(&w.value, &tasks)).collect())
    }

    /// One workload.
    pub fn workload(&self, kind: Kind, name: &str) -> Result<WorkloadView, ApiError> {
        let w: Versioned<StoredWorkload> =
            model::get(self.store.as_ref(), &model::workload_key(kind, name))?.ok_or_else(
                || ApiError::not_found(format!("{} {name:?} not found", kind.path())),
            )?;
        let tasks = model::list(self.store.as_ref(), model::TASKS)?;
        Ok(self.view(&w.value, &tasks))
    }

    /// Deletes a workload; the reconcile loop stops its tasks.
    pub fn delete_workload(&self, kind: Kind, name: &str) -> Result<DeleteResponse, ApiError> {
        let key = model::workload_key(kind, name);
        let w: Versioned<StoredWorkload> = model::get(self.store.as_ref(), &key)?
            .ok_or_else(|| ApiError::not_found(format!("{} {name:?} not found", kind.path())))?;
        let res = self.store.txn(
            &[Compare::ModRevision {
                key: key.clone(),
                rev: w.rev,
            }],
            &[Op::Delete { key }],
        )?;
        if !res.succeeded {
            return Err(ApiError::conflict(
                "the workload changed while deleting; try again",
            ));
        }
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        let stopped = tasks
            .iter()
            .filter(|t| {
                t.value.kind == kind
                    && t.value.workload == name
                    && t.value.desired == DesiredState::Running
            })
            .count();
        self.record(vec![Draft::normal(
            format!("{}/{name}", kind.path()),
            "Deleted",
            match stopped {
                1 => "1 task to stop".to_string(),
                n => format!("{n} tasks to stop"),
            },
        )]);
        self.wake();
        Ok(DeleteResponse {
            kind,
            name: name.to_string(),
            tasks_stopped: u32::try_from(stopped).unwrap_or(u32::MAX),
        })
    }

    // ---- tasks ----

    /// Tasks, filtered.
    pub fn tasks(
        &self,
        workload: Option<&str>,
        node: Option<&str>,
        kind: Option<Kind>,
    ) -> Result<Vec<Task>, ApiError> {
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        Ok(tasks
            .into_iter()
            .map(|t| t.value)
            .filter(|t| workload.is_none_or(|w| t.workload == w))
            .filter(|t| node.is_none_or(|n| t.node.as_deref() == Some(n)))
            .filter(|t| kind.is_none_or(|k| t.kind == k))
            .collect())
    }

    /// One task.
    pub fn task(&self, id: &str) -> Result<Task, ApiError> {
        let t: Versioned<Task> = model::get(self.store.as_ref(), &model::task_key(id))?
            .ok_or_else(|| ApiError::not_found(format!("task {id:?} not found")))?;
        Ok(t.value)
    }

    /// Records a task state reported by `node`. Writes only when something changed.
    pub fn task_status(&self, node: &str, s: &TaskStatus) -> Result<(), crate::Error> {
        let key = model::task_key(&s.task);
        for _ in 0..3 {
            let Some(cur) = model::get::<Task>(self.store.as_ref(), &key)? else {
                // Not ours (any more): the next task set tells the agent to remove it.
                return Ok(());
            };
            let Some(next) = reconcile::apply_status(&cur.value, node, s) else {
                return Ok(());
            };
            let ok = self.store.cas_json(&key, cur.rev, &next)?;
            if ok {
                tracing::debug!(task = %s.task, node = %node, phase = %s.phase, exit_code = ?s.exit_code, message = ?s.message, "task status");
                self.record(events::task_change(Some(&cur.value), Some(&next)));
                self.wake();
                return Ok(());
            }
        }
        Ok(())
    }

    /// A node confirmed a task's container is gone: a stopped task's record goes too,
    /// and an evicted one is placed again (elsewhere: its node is cordoned).
    pub fn task_removed(&self, node: &str, id: &str) -> Result<(), crate::Error> {
        let key = model::task_key(id);
        let Some(cur) = model::get::<Task>(self.store.as_ref(), &key)? else {
            return Ok(());
        };
        if cur.value.node.as_deref() == Some(node) && cur.value.desired == DesiredState::Evicting {
            let mut next = cur.value.clone();
            reconcile::reset_to_pending(&mut next, format!("evicted from node {node}"));
            let ok = self
                .store
                .txn(
                    &[Compare::ModRevision {
                        key: key.clone(),
                        rev: cur.rev,
                    }],
                    &[Op::Put {
                        key,
                        value: model::encode(&next),
                    }],
                )?
                .succeeded;
            if ok {
                self.record(events::task_change(Some(&cur.value), Some(&next)));
                self.wake();
            }
            return Ok(());
        }
        if cur.value.node.as_deref() == Some(node) && cur.value.desired == DesiredState::Stopped {
            let ok = self
                .store
                .txn(
                    &[Compare::ModRevision {
                        key: key.clone(),
                        rev: cur.rev,
                    }],
                    &[Op::Delete { key }],
                )?
                .succeeded;
            if ok {
                self.record(events::task_change(Some(&cur.value), None));
                self.wake();
            }
        }
        Ok(())
    }

    /// After a node's Hello: stopped tasks it no longer has are gone for good (their
    /// Removed report may have been lost with the previous link).
    pub fn forget_missing(&self, node: &str, present: &[TaskStatus]) -> Result<(), crate::Error> {
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        for t in tasks {
            let v = &t.value;
            if v.node.as_deref() == Some(node)
                && v.desired != DesiredState::Running
                && !present.iter().any(|p| p.task == v.id)
            {
                self.task_removed(node, &v.id)?;
            }
        }
        Ok(())
    }

    // ---- nodes ----

    /// Records what a connecting agent reports, writing only if it changed.
    pub fn register_node(&self, info: &NodeInfo) -> Result<(), crate::Error> {
        let key = model::node_key(&info.name);
        let cur: Option<Versioned<StoredNode>> = model::get(self.store.as_ref(), &key)?;
        let (next, rev) = match &cur {
            Some(v) if v.value.info == *info => return Ok(()),
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
                    registered_at: Utc::now(),
                },
                0,
            ),
        };
        self.store.txn(
            &[Compare::ModRevision {
                key: key.clone(),
                rev,
            }],
            &[Op::Put {
                key,
                value: model::encode(&next),
            }],
        )?;
        tracing::info!(node = %info.name, arch = %info.arch, cores = info.cores, memory = info.memory_bytes, "node registered");
        Ok(())
    }

    /// All nodes with health and allocation.
    pub fn node_views(&self) -> Result<Vec<NodeView>, ApiError> {
        let nodes: Vec<Versioned<StoredNode>> = model::list(self.store.as_ref(), model::NODES)?;
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        let mut per_node: BTreeMap<&str, (u32, u64, u64)> = BTreeMap::new();
        for t in &tasks {
            if let Some(n) = t.value.node.as_deref() {
                let e = per_node.entry(n).or_default();
                e.0 += 1;
                e.1 += t.value.spec.resources.cpu.map_or(0, |c| c.millis());
                e.2 += t.value.spec.resources.memory.map_or(0, |m| m.bytes());
            }
        }
        Ok(nodes
            .into_iter()
            .map(|n| {
                let (status, last_seen, metrics, address) = self.nodes.view(&n.value.info.name);
                let (count, cpu, mem) = per_node
                    .get(n.value.info.name.as_str())
                    .copied()
                    .unwrap_or_default();
                NodeView {
                    info: n.value.info,
                    status,
                    cordoned: n.value.cordoned,
                    last_seen,
                    metrics,
                    tasks: count,
                    allocated_cpu_millis: cpu,
                    allocated_memory_bytes: mem,
                    address,
                    registered_at: n.value.registered_at,
                }
            })
            .collect())
    }

    /// One node.
    pub fn node_view(&self, name: &str) -> Result<NodeView, ApiError> {
        self.node_views()?
            .into_iter()
            .find(|n| n.info.name == name)
            .ok_or_else(|| ApiError::not_found(format!("node {name:?} not found")))
    }

    // ---- reconcile ----

    /// One reconcile pass: plan task changes, write them in one transaction, and send
    /// every connected node its task set. Returns how many task writes were made.
    pub fn reconcile_once(&self) -> Result<usize, crate::Error> {
        let mut written = 0;
        for _ in 0..3 {
            let workloads: Vec<StoredWorkload> =
                model::list(self.store.as_ref(), model::WORKLOADS)?
                    .into_iter()
                    .map(|v| v.value)
                    .collect();
            let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
            let nodes: Vec<NodeState> =
                model::list::<StoredNode>(self.store.as_ref(), model::NODES)?
                    .into_iter()
                    .map(|n| NodeState {
                        status: self.nodes.status(&n.value.info.name),
                        wallets_fenced: self.nodes.wallets_fenced(&n.value.info.name),
                        cordoned: n.value.cordoned,
                        info: n.value.info,
                    })
                    .collect();
            self.note_node_statuses(&nodes);
            let writes = reconcile::plan(&workloads, &tasks, &nodes, Utc::now());
            if writes.is_empty() {
                self.push_all(&tasks)?;
                return Ok(written);
            }
            let compares: Vec<Compare> = writes
                .iter()
                .map(|w| Compare::ModRevision {
                    key: model::task_key(&w.id),
                    rev: w.rev,
                })
                .collect();
            let ops: Vec<Op> = writes
                .iter()
                .map(|w| match &w.value {
                    Some(t) => Op::Put {
                        key: model::task_key(&w.id),
                        value: model::encode(t),
                    },
                    None => Op::Delete {
                        key: model::task_key(&w.id),
                    },
                })
                .collect();
            if self.store.txn(&compares, &ops)?.succeeded {
                let before: HashMap<&str, &Task> = tasks
                    .iter()
                    .map(|t| (t.value.id.as_str(), &t.value))
                    .collect();
                let drafts = writes
                    .iter()
                    .flat_map(|w| {
                        events::task_change(before.get(w.id.as_str()).copied(), w.value.as_ref())
                    })
                    .collect();
                self.record(drafts);
                written += writes.len();
                // Push right away with the state just written, then loop to settle.
                let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
                self.push_all(&tasks)?;
            }
        }
        Ok(written)
    }

    /// Announces node health changes as events (in memory until something changes).
    fn note_node_statuses(&self, nodes: &[NodeState]) {
        let mut drafts = Vec::new();
        for n in nodes {
            let name = &n.info.name;
            let Some(prev) = self.nodes.note_status(name, n.status) else {
                continue;
            };
            let obj = format!("node/{name}");
            match (prev, n.status) {
                // A controller that just started knows nothing yet: no news.
                (None, NodeStatus::NotReady) => {}
                (None, NodeStatus::Ready) => {
                    drafts.push(Draft::normal(obj, "NodeReady", "agent connected"))
                }
                (Some(_), NodeStatus::Ready) => {
                    drafts.push(Draft::normal(obj, "NodeBack", "heartbeats again"))
                }
                (_, NodeStatus::NotReady) => drafts.push(Draft::warning(
                    obj,
                    "NodeNotReady",
                    "heartbeats late; no new tasks",
                )),
                (_, NodeStatus::Dead) => drafts.push(Draft::warning(
                    obj,
                    "NodeDead",
                    "silent too long; its tasks go elsewhere",
                )),
            }
        }
        self.record(drafts);
    }

    /// Marks a node (un)schedulable.
    pub fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeView, ApiError> {
        let key = model::node_key(name);
        for _ in 0..5 {
            let cur: Versioned<StoredNode> = model::get(self.store.as_ref(), &key)?
                .ok_or_else(|| ApiError::not_found(format!("node {name:?} not found")))?;
            if cur.value.cordoned == cordoned {
                return self.node_view(name);
            }
            let next = StoredNode {
                cordoned,
                ..cur.value
            };
            let ok = self.store.cas_json(&key, cur.rev, &next)?;
            if ok {
                let (reason, msg) = if cordoned {
                    ("Cordoned", "no new tasks")
                } else {
                    ("Uncordoned", "schedulable again")
                };
                self.record(vec![Draft::normal(format!("node/{name}"), reason, msg)]);
                self.wake();
                return self.node_view(name);
            }
        }
        Err(ApiError::conflict("the node changed meanwhile; try again"))
    }

    /// Cordons a node and evicts its tasks (stopped there first, then placed
    /// elsewhere). Returns how many tasks were told to move.
    pub fn start_drain(&self, name: &str) -> Result<u32, ApiError> {
        self.cordon(name, true)?;
        for _ in 0..5 {
            let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
            let moving: Vec<&Versioned<Task>> = tasks
                .iter()
                .filter(|t| {
                    t.value.node.as_deref() == Some(name)
                        && t.value.desired == DesiredState::Running
                        && !(t.value.phase.is_terminal() && t.value.kind.runs_to_completion())
                })
                .collect();
            if moving.is_empty() {
                return Ok(0);
            }
            let compares: Vec<Compare> = moving
                .iter()
                .map(|t| Compare::ModRevision {
                    key: model::task_key(&t.value.id),
                    rev: t.rev,
                })
                .collect();
            let mut drafts = Vec::new();
            let ops: Vec<Op> = moving
                .iter()
                .map(|t| {
                    let mut next = t.value.clone();
                    next.desired = DesiredState::Evicting;
                    drafts.extend(events::task_change(Some(&t.value), Some(&next)));
                    Op::Put {
                        key: model::task_key(&t.value.id),
                        value: model::encode(&next),
                    }
                })
                .collect();
            if self.store.txn(&compares, &ops)?.succeeded {
                self.record(drafts);
                self.wake();
                return Ok(u32::try_from(moving.len()).unwrap_or(u32::MAX));
            }
        }
        Err(ApiError::conflict(
            "the node's tasks changed meanwhile; try again",
        ))
    }

    /// Tasks still on a node that a drain waits for.
    pub fn drain_remaining(&self, name: &str) -> Result<u32, ApiError> {
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        let n = tasks
            .iter()
            .filter(|t| {
                t.value.node.as_deref() == Some(name)
                    && !(t.value.phase.is_terminal() && t.value.kind.runs_to_completion())
            })
            .count();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Sends each connected node the tasks it should run, if changed since last sent.
    fn push_all(&self, tasks: &[Versioned<Task>]) -> Result<(), crate::Error> {
        let revision = self.store.revision()?;
        for node in self.nodes.connected() {
            let mut set: Vec<Assignment> = tasks
                .iter()
                .map(|t| &t.value)
                .filter(|t| {
                    t.node.as_deref() == Some(node.as_str()) && t.desired == DesiredState::Running
                })
                .map(|t| Assignment {
                    task: t.id.clone(),
                    kind: t.kind,
                    workload: t.workload.clone(),
                    spec_hash: t.spec_hash.clone(),
                    spec: t.spec.clone(),
                })
                .collect();
            set.sort_by(|a, b| a.task.cmp(&b.task));
            if self.nodes.push(&node, set, revision) {
                tracing::debug!(node = %node, revision, "task set sent");
            }
        }
        Ok(())
    }

    /// Whether a node is Ready now.
    pub fn node_ready(&self, node: &str) -> bool {
        self.nodes.status(node) == NodeStatus::Ready
    }

    // ---- logs ----

    /// Registers a log stream; agent frames for `request` go to the returned receiver.
    pub fn open_logs(&self) -> (u64, mpsc::Receiver<LogEvent>) {
        let id = self.next_id();
        let (tx, rx) = mpsc::channel(1024);
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        (id, rx)
    }

    /// Forgets a log stream.
    pub fn close_logs(&self, request: u64) {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
    }

    /// Hands an agent's log frame to its HTTP client. A client too slow to keep up loses
    /// chunks rather than stalling the agent's link (and with it, its heartbeats).
    pub fn log_event(&self, request: u64, ev: LogEvent) {
        let tx = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request)
            .cloned();
        if let Some(tx) = tx {
            if tx.try_send(ev).is_err() {
                tracing::warn!(request, "log client too slow; dropping a chunk");
            }
        }
    }
}
