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

/// Changes decided on one snapshot, joined into one (see [`group`]).
#[derive(Debug, Default, PartialEq)]
pub struct Group {
    /// The joined change.
    pub change: Change,
    /// For each change given, in order: whether it is part of `change`.
    pub taken: Vec<bool>,
}

/// Joins changes that were decided independently on one snapshot into one change, for
/// one transaction. Taken in order, each change that writes no key an earlier taken one
/// writes and keeps the total within `max_writes`; the others are left, to be decided
/// again on the snapshot that follows. The first change is always taken (alone, it is
/// what a commit of its own would write).
///
/// Why joining is sound: every write compares the revision it was decided on, so a
/// change whose decision read a key another write of the group moves fails as a whole
/// and is decided again; and no two taken changes write one key, so none overwrites
/// another's write unseen. The joined change is what committing them one by one in any
/// order would store, as long as each decision reads only keys it writes — which holds
/// for agents' task reports, the changes grouped this way.
pub fn group(changes: Vec<Change>, max_writes: usize) -> Group {
    let mut out = Group {
        change: Change::default(),
        taken: Vec::with_capacity(changes.len()),
    };
    let mut keys: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (i, c) in changes.into_iter().enumerate() {
        let fits = i == 0
            || (out.change.writes.len() + c.writes.len() <= max_writes
                && c.writes.iter().all(|w| !keys.contains(&w.key))
                // A change writing one key twice is left to itself too.
                && c.writes.len()
                    == c.writes
                        .iter()
                        .map(|w| w.key.as_str())
                        .collect::<std::collections::HashSet<_>>()
                        .len());
        out.taken.push(fits);
        if fits {
            keys.extend(c.writes.iter().map(|w| w.key.clone()));
            out.change.extend(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::events::Draft;

    fn put(key: &str, rev: u64) -> Write {
        Write {
            key: key.into(),
            expect: Expect::of(rev),
            value: None,
        }
    }

    fn change(keys: &[&str]) -> Change {
        Change::new(keys.iter().map(|k| put(k, 7)).collect(), Vec::new())
    }

    #[test]
    fn changes_on_other_keys_are_joined_in_order_with_their_events() {
        let mut a = change(&["/tasks/a"]);
        a.drafts.push(Draft::normal("task/a", "Started", "a"));
        let b = change(&["/tasks/b", "/tasks/c"]);
        let events_only = Change::events(vec![Draft::normal("node/pi1", "Volumes", "v")]);
        let g = group(
            vec![a.clone(), b.clone(), Change::default(), events_only.clone()],
            96,
        );
        assert_eq!(g.taken, vec![true, true, true, true]);
        let mut want = a;
        want.extend(b);
        want.extend(events_only);
        assert_eq!(g.change, want);
    }

    #[test]
    fn a_change_on_a_key_already_written_is_left_for_the_next_group() {
        let g = group(
            vec![
                change(&["/tasks/a"]),
                change(&["/tasks/b", "/tasks/a"]),
                change(&["/tasks/b"]),
                change(&["/tasks/a"]),
                change(&["/tasks/c"]),
            ],
            96,
        );
        // The second is left (it writes a); so b stays free for the third.
        assert_eq!(g.taken, vec![true, false, true, false, true]);
        let keys: Vec<&str> = g.change.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["/tasks/a", "/tasks/b", "/tasks/c"]);
    }

    #[test]
    fn the_group_stays_within_the_write_limit_but_always_takes_the_first() {
        let big = change(&["/k1", "/k2", "/k3"]);
        let g = group(vec![big.clone(), change(&["/k4"])], 2);
        assert_eq!(
            g.taken,
            vec![true, false],
            "the first goes even alone over the limit"
        );
        assert_eq!(g.change, big);

        let g = group(
            vec![
                change(&["/a"]),
                change(&["/b", "/c"]),
                change(&["/d"]),
                change(&["/e"]),
            ],
            3,
        );
        // b+c fits (3); d would make 4; e neither.
        assert_eq!(g.taken, vec![true, true, false, false]);
        assert_eq!(g.change.writes.len(), 3);
    }

    #[test]
    fn a_later_change_writing_one_key_twice_is_left_alone() {
        let g = group(vec![change(&["/a"]), change(&["/b", "/b"])], 96);
        assert_eq!(g.taken, vec![true, false]);
        // First, it goes (as its own commit would).
        let g = group(vec![change(&["/b", "/b"]), change(&["/a"])], 96);
        assert_eq!(g.taken, vec![true, true]);
    }

    #[test]
    fn nothing_given_is_an_empty_group() {
        assert_eq!(group(Vec::new(), 96), Group::default());
    }
}
