//! What the pure core reads and what it hands back: a [`Snapshot`] of everything stored,
//! at one revision, and a [`Change`]: writes, each with what it expects to find, and the
//! events that describe them. The `state` layer turns a change into one store
//! transaction, so a decision made on a snapshot that has moved on fails as a whole and
//! is made again on a fresh one.

use std::collections::BTreeMap;
use std::sync::Arc;

use bramble_api::manifest::Kind;
use bramble_api::rest::{Event, Firing};
use bramble_api::task::Task;

use super::events::Draft;
use super::model::{
    self, event_seq, CronState, KeyKind, StoredEvents, StoredNode, StoredSecret, StoredWorkload,
    Suspicion, Versioned,
};

/// A decoded stored value.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A workload.
    Workload(StoredWorkload),
    /// A task.
    Task(Task),
    /// A node.
    Node(StoredNode),
    /// A CronJob firing record.
    Firing(Firing),
    /// A CronJob's operator state.
    CronState(CronState),
    /// The events of one commit.
    Events(StoredEvents),
    /// A Secret, values sealed.
    Secret(StoredSecret),
    /// The leader's suspicion of a silent node.
    Suspect(Suspicion),
}

impl Item {
    /// Which kind of key may hold this item.
    pub fn key_kind(&self) -> KeyKind {
        match self {
            Item::Workload(_) => KeyKind::Workload,
            Item::Task(_) => KeyKind::Task,
            Item::Node(_) => KeyKind::Node,
            Item::Firing(_) => KeyKind::Firing,
            Item::CronState(_) => KeyKind::CronState,
            Item::Events(_) => KeyKind::Events,
            Item::Secret(_) => KeyKind::Secret,
            Item::Suspect(_) => KeyKind::Suspect,
        }
    }
}

/// Everything stored, decoded, at one revision. Values are shared (`Arc`), so a
/// snapshot is cheap to copy and the copy never changes under its reader.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store revision this is the state at.
    pub revision: u64,
    /// Workloads by (kind, name).
    pub workloads: BTreeMap<(Kind, String), Arc<Versioned<StoredWorkload>>>,
    /// Tasks by id.
    pub tasks: BTreeMap<String, Arc<Versioned<Task>>>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Arc<Versioned<StoredNode>>>,
    /// Firing records by key (`/cronfirings/{job}/{slot}`).
    pub firings: BTreeMap<String, Arc<Versioned<Firing>>>,
    /// CronJob operator state by job name.
    pub cron_state: BTreeMap<String, Arc<Versioned<CronState>>>,
    /// Event records by (revision, key): oldest first.
    pub events: BTreeMap<(u64, String), Arc<StoredEvents>>,
    /// Secrets by name.
    pub secrets: BTreeMap<String, Arc<Versioned<StoredSecret>>>,
    /// The leader's suspicions, by node.
    pub suspects: BTreeMap<String, Arc<Versioned<Suspicion>>>,
}

impl Snapshot {
    /// Puts `item` under `key` as the store holds it at (`created`, `rev`). An item
    /// whose kind does not fit the key is ignored (the `state` layer decodes by key, so
    /// this cannot happen).
    pub fn insert(&mut self, key: &str, item: Item, created: u64, rev: u64) {
        if KeyKind::of(key) != Some(item.key_kind()) {
            return;
        }
        match item {
            Item::Workload(w) => {
                self.workloads.insert(
                    (w.kind(), w.name().to_string()),
                    Arc::new(Versioned {
                        value: w,
                        rev,
                        created,
                    }),
                );
            }
            Item::Task(t) => {
                self.tasks.insert(
                    t.id.clone(),
                    Arc::new(Versioned {
                        value: t,
                        rev,
                        created,
                    }),
                );
            }
            Item::Node(n) => {
                self.nodes.insert(
                    n.info.name.clone(),
                    Arc::new(Versioned {
                        value: n,
                        rev,
                        created,
                    }),
                );
            }
            Item::Firing(f) => {
                self.firings.insert(
                    key.to_string(),
                    Arc::new(Versioned {
                        value: f,
                        rev,
                        created,
                    }),
                );
            }
            Item::CronState(c) => {
                if let Some(job) = key.strip_prefix(model::CRON_STATE) {
                    self.cron_state.insert(
                        job.to_string(),
                        Arc::new(Versioned {
                            value: c,
                            rev,
                            created,
                        }),
                    );
                }
            }
            Item::Events(e) => {
                self.events.retain(|(_, k), _| k != key);
                self.events.insert((created, key.to_string()), Arc::new(e));
            }
            Item::Secret(s) => {
                self.secrets.insert(
                    s.name.clone(),
                    Arc::new(Versioned {
                        value: s,
                        rev,
                        created,
                    }),
                );
            }
            Item::Suspect(s) => {
                if let Some(node) = key.strip_prefix(model::SUSPECTS) {
                    self.suspects.insert(
                        node.to_string(),
                        Arc::new(Versioned {
                            value: s,
                            rev,
                            created,
                        }),
                    );
                }
            }
        }
    }

    /// Forgets what is stored under `key`.
    pub fn remove(&mut self, key: &str) {
        let Some(kind) = KeyKind::of(key) else { return };
        match kind {
            KeyKind::Workload => {
                self.workloads
                    .retain(|(k, n), _| model::workload_key(*k, n) != key);
            }
            KeyKind::Task => {
                if let Some(id) = key.strip_prefix(model::TASKS) {
                    self.tasks.remove(id);
                }
            }
            KeyKind::Node => {
                if let Some(name) = key.strip_prefix(model::NODES) {
                    self.nodes.remove(name);
                }
            }
            KeyKind::Firing => {
                self.firings.remove(key);
            }
            KeyKind::CronState => {
                if let Some(job) = key.strip_prefix(model::CRON_STATE) {
                    self.cron_state.remove(job);
                }
            }
            KeyKind::Events => self.events.retain(|(_, k), _| k != key),
            KeyKind::Secret => {
                if let Some(name) = key.strip_prefix(model::SECRETS) {
                    self.secrets.remove(name);
                }
            }
            KeyKind::Suspect => {
                if let Some(node) = key.strip_prefix(model::SUSPECTS) {
                    self.suspects.remove(node);
                }
            }
        }
    }

    /// One workload.
    pub fn workload(&self, kind: Kind, name: &str) -> Option<&Arc<Versioned<StoredWorkload>>> {
        self.workloads.get(&(kind, name.to_string()))
    }

    /// One task.
    pub fn task(&self, id: &str) -> Option<&Arc<Versioned<Task>>> {
        self.tasks.get(id)
    }

    /// The tasks of one workload.
    pub fn tasks_of<'a>(
        &'a self,
        kind: Kind,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Versioned<Task>>> + 'a {
        self.tasks
            .values()
            .filter(move |t| t.value.kind == kind && t.value.workload == name)
    }

    /// One CronJob's firing records, oldest slot first.
    pub fn firings_of(&self, job: &str) -> Vec<&Arc<Versioned<Firing>>> {
        let prefix = model::firings_prefix(job);
        let mut out: Vec<&Arc<Versioned<Firing>>> = self
            .firings
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .collect();
        out.sort_by_key(|f| f.value.slot);
        out
    }

    /// A CronJob's operator state (the default when none is stored).
    pub fn cron_state(&self, job: &str) -> CronState {
        self.cron_state
            .get(job)
            .map(|v| v.value.clone())
            .unwrap_or_default()
    }

    /// Every stored event with its sequence number, oldest first.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.events.iter().flat_map(|((rev, _), stored)| {
            stored.events.iter().enumerate().map(move |(i, e)| Event {
                seq: event_seq(*rev, i),
                at: e.at,
                severity: e.severity,
                object: e.object.clone(),
                reason: e.reason.clone(),
                message: e.message.clone(),
            })
        })
    }

    /// How many events are stored.
    pub fn event_count(&self) -> usize {
        self.events.values().map(|e| e.events.len()).sum()
    }
}

/// What a write expects to find before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key is absent.
    Absent,
    /// The key is at this mod revision (as read in the snapshot).
    Rev(u64),
    /// Whatever is there (for writes that cannot conflict, such as deletes of history).
    Any,
}

impl Expect {
    /// What a value read at mod revision `rev` expects (`rev` 0: absent).
    pub fn of(rev: u64) -> Expect {
        if rev == 0 {
            Expect::Absent
        } else {
            Expect::Rev(rev)
        }
    }
}

/// One write of a [`Change`].
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The key.
    pub key: String,
    /// What must be there for the change to apply.
    pub expect: Expect,
    /// The new value; `None` deletes the key.
    pub value: Option<Item>,
}

impl Write {
    /// Puts a task read at `rev` (0: new).
    pub fn task(task: Task, rev: u64) -> Write {
        Write {
            key: model::task_key(&task.id),
            expect: Expect::of(rev),
            value: Some(Item::Task(task)),
        }
    }

    /// Deletes a task read at `rev`.
    pub fn delete_task(id: &str, rev: u64) -> Write {
        Write {
            key: model::task_key(id),
            expect: Expect::of(rev),
            value: None,
        }
    }
}

/// Writes that apply all together or not at all, and the events that say what they did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// The writes.
    pub writes: Vec<Write>,
    /// Events to record with them, in the same transaction.
    pub drafts: Vec<Draft>,
}

impl Change {
    /// A change with these writes and events.
    pub fn new(writes: Vec<Write>, drafts: Vec<Draft>) -> Change {
        Change { writes, drafts }
    }

    /// Only events (a decision that changes nothing stored, such as a node going quiet).
    pub fn events(drafts: Vec<Draft>) -> Change {
        Change {
            writes: Vec::new(),
            drafts,
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.drafts.is_empty()
    }

    /// Adds another change's writes and events.
    pub fn extend(&mut self, other: Change) {
        self.writes.extend(other.writes);
        self.drafts.extend(other.drafts);
    }
}
