//! The only caller of [`Store::txn`]: everything else reads [`Snapshot`]s and hands
//! back [`Change`]s.
//!
//! - **Snapshots at one revision.** A reflector (as kube-runtime's) lists the whole
//!   store once, then follows its watch: the decoded [`Snapshot`] in memory is always
//!   exactly the store at some revision. Reads (the API, the loops, the agent links)
//!   cost no store read at all, and every controller sharing a store sees every write,
//!   its own and the others', the same way.
//! - **Commits carry their events.** [`State::commit`] turns a change into one
//!   transaction: each write compared against the revision it was decided on, plus the
//!   change's events under a key no other writer can pick (this controller's random id
//!   and a counter), so two controllers never overwrite each other's events. After a
//!   commit, it waits until the snapshot shows it, so the next decision sees it.
//! - **Conflicts are decided again.** [`State::update`] runs a decision on a fresh
//!   snapshot until its commit goes through: a request never acts on stale state, and
//!   none is lost to a race.
//! - **The leader hook.** A commit made for the leader's loops ([`Scope::Leader`]) also
//!   carries the [`Leadership`]'s compares, so a controller that lost leadership cannot
//!   write on its behalf.
//!
//! Memory-only state lives here too: node liveness ([`live`]), metric history
//! ([`history`]) and log streams ([`logs`]).
//!
//! # Layout
//! - [`live`]: node health and agent links, in memory.
//! - [`history`]: an hour of node metrics per node, in ring buffers.
//! - [`logs`]: log streams from agents to HTTP clients.
//! - [`leader`]: who may run the loops.
//! - [`identity`]: the CA and Secrets key every controller of a store must share.
//! - [`vault`]: the key Secrets are sealed with, kept 0600 in the data dir.

pub mod history;
pub mod identity;
pub mod leader;
pub mod live;
pub mod logs;
pub mod vault;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bramble_api::backoff::{Backoff, Retry};
use bramble_api::rest::Event;
use chrono::Utc;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::core::error::DomainError;
use crate::core::health::HealthConfig;
use crate::core::model::{self, event_seq, KeyKind, StoredEvent, StoredEvents};
use crate::core::snapshot::{Expect, Item};
use crate::core::{Change, Snapshot};
use crate::store::{self, Compare, EventKind, KeyValue, Op, Store, Txn, WatchBatch};

pub use leader::{Leadership, Solo};

/// How many events are kept in the store (the oldest go first).
pub const RETAIN_EVENTS: usize = 1000;

/// Events beyond [`RETAIN_EVENTS`] before a commit prunes them, so pruning is an
/// occasional extra op rather than one on every commit.
const PRUNE_SLACK: usize = 100;

/// How many times [`State::update`] decides again after losing a race.
const UPDATE_ATTEMPTS: usize = 10;

/// The most writes one grouped commit ([`State::update_grouped`]) joins: room under
/// [`store::MAX_TXN_OPS`] for the events record and the pruning of old ones.
const GROUP_WRITES: usize = 96;

/// Grouped decisions queued at most (each agent link has one in flight at a time).
const GROUP_QUEUE: usize = 2048;

/// How long a commit waits for the snapshot to show it.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How the reflector retries after losing the store.
const RELIST: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Why the state layer failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error("store")]
    Store(#[from] store::Error),
    /// The request is refused by the cluster's state.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A leader-only commit by a controller that is not (or no longer) the leader.
    #[error("this controller is not the leader")]
    NotLeader,
    /// The store's revision could not be read, or the snapshot did not catch up with
    /// it, within this long.
    #[error("the view of the store could not be proven fresh within {0:?}")]
    Stale(Duration),
    /// A value does not encode (a map with non-string keys, say): a bug, named.
    #[error("value for {key} does not encode")]
    Encode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The controller is shutting down: what was asked was not written.
    #[error("the controller is shutting down")]
    Closed,
}

/// Who a commit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A request any controller serves (apply, an agent's report).
    Any,
    /// The leader's loops: the commit fails unless this controller still leads.
    Leader,
}

/// What became of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written at this revision (or nothing to write at this one).
    Committed(u64),
    /// Something it read had changed; the store was at this revision. Decide again.
    Conflict(u64),
}

/// A snapshot's endpoints table, and the `Endpoints` frame that sends it to agents.
#[derive(Debug, Clone)]
pub struct Routes {
    /// The table.
    pub table: Arc<bramble_api::endpoints::Table>,
    /// [`bramble_api::wire::ControllerMessage::Endpoints`] with it, encoded.
    pub frame: bytes::Bytes,
    /// The revision it was computed at.
    revision: u64,
    /// [`bramble_api::wire::ControllerMessage::EndpointChanges`] frames to this table,
    /// from the tables links sent before it: links are mostly one table behind, the
    /// same one, so each is encoded once for all of them.
    changes: Arc<Mutex<Vec<ChangesFrame>>>,
}

/// An `EndpointChanges` frame, and the table it is from.
type ChangesFrame = (Arc<bramble_api::endpoints::Table>, bytes::Bytes);

/// How many older tables [`Routes::changes_frame`] keeps frames from.
const CHANGES_KEPT: usize = 4;

impl Routes {
    /// The `EndpointChanges` frame that turns `last` into this table.
    pub fn changes_frame(&self, last: &Arc<bramble_api::endpoints::Table>) -> bytes::Bytes {
        let mut kept = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, frame)) = kept.iter().find(|(t, _)| Arc::ptr_eq(t, last)) {
            return frame.clone();
        }
        let frame = bytes::Bytes::from(bramble_api::wire::encode(
            &bramble_api::wire::ControllerMessage::EndpointChanges {
                revision: self.revision,
                changes: last.changes_to(&self.table),
            },
        ));
        if kept.len() == CHANGES_KEPT {
            kept.remove(0);
        }
        kept.push((Arc::clone(last), frame.clone()));
        frame
    }
}

/// Everything the controller keeps, in the store and in memory.
pub struct State {
    store: Arc<dyn Store>,
    world: watch::Sender<Arc<Snapshot>>,
    /// This controller's id in event keys: random, so keys never collide.
    writer: String,
    next_events: AtomicU64,
    events: broadcast::Sender<Event>,
    counts: Mutex<BTreeMap<(String, &'static str), u64>>,
    leader: Arc<dyn Leadership>,
    /// [`State::leading`]'s sender.
    leading: watch::Sender<bool>,
    wake: watch::Sender<u64>,
    /// Bumped once every heartbeat ([`State::beats`]).
    beat: watch::Sender<u64>,
    started: Instant,
    ids: AtomicU64,
    reflector: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When a quorum read of the store's revision was last sent that the snapshot has
    /// caught up with since: the snapshot holds every commit completed before then.
    fresh: Mutex<Option<Instant>>,
    /// The endpoints of the newest snapshot asked for, by its revision: every agent
    /// link sends the same table, so it is computed, encoded and held once, not per
    /// node.
    routes: PerRevision<Routes>,
    /// Where the newest snapshot asked for places its tasks, by its revision: every
    /// agent link reads its own node's share of the same index.
    placed: PerRevision<Arc<crate::core::reconcile::Placed>>,
    /// Decisions waiting for a grouped commit ([`State::update_grouped`]).
    grouped: mpsc::Sender<Grouped>,
    /// Node health and links, in memory.
    pub live: live::Live,
    /// Node metrics history, in memory.
    pub history: history::History,
    /// Log streams.
    pub logs: logs::LogStreams,
    /// Open `bramblectl exec` streams.
    pub execs: logs::ExecStreams,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(h) = self
            .reflector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&kv.value)
}

/// Decodes a stored value by its key's kind; `None` (logged) for one that does not
/// decode or a key Bramble does not own. One bad value cannot stop the controller; it
/// stays in the store untouched.
fn decode_item(kv: &KeyValue) -> Option<Item> {
    let kind = KeyKind::of(&kv.key)?;
    let item = match kind {
        KeyKind::Workload => decode(kv).map(Item::Workload),
        KeyKind::Task => decode(kv).map(Item::Task),
        KeyKind::Node => decode(kv).map(Item::Node),
        KeyKind::Firing => decode(kv).map(Item::Firing),
        KeyKind::CronState => decode(kv).map(Item::CronState),
        KeyKind::Events => decode(kv).map(Item::Events),
        KeyKind::Secret => decode(kv).map(Item::Secret),
        KeyKind::Suspect => decode(kv).map(Item::Suspect),
    };
    match item {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::error!(key = %kv.key, error = %e, "skipping undecodable store value");
            None
        }
    }
}

fn encode_item(key: &str, item: &Item) -> Result<Vec<u8>, Error> {
    fn enc<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(v).map_err(|source| Error::Encode {
            key: key.to_string(),
            source,
        })
    }
    match item {
        Item::Workload(v) => enc(key, v),
        Item::Task(v) => enc(key, v),
        Item::Node(v) => enc(key, v),
        Item::Firing(v) => enc(key, v),
        Item::CronState(v) => enc(key, v),
        Item::Events(v) => enc(key, v),
        Item::Secret(v) => enc(key, v),
        Item::Suspect(v) => enc(key, v),
    }
}

/// The events a stored record holds, with their sequence numbers.
fn events_of(revision: u64, stored: &StoredEvents) -> impl Iterator<Item = Event> + '_ {
    stored.events.iter().enumerate().map(move |(i, e)| Event {
        seq: event_seq(revision, i),
        at: e.at,
        severity: e.severity,
        object: e.object.clone(),
        reason: e.reason.clone(),
        message: e.message.clone(),
    })
}

/// What changes with leadership in memory, done before the loops hear of it (they
/// follow [`State::leading`], which this publishes): a new leader counts node health
/// from now (it heard no agent as a follower, so the nodes get the startup grace to
/// dial it before any is Dead); a controller that stops leading closes its agent links,
/// so agents go to the new leader, or fence when they find none.
async fn follow_leadership(state: Weak<State>, mut rx: watch::Receiver<bool>) {
    loop {
        let now = *rx.borrow_and_update();
        {
            let Some(s) = state.upgrade() else { return };
            let was = *s.leading.borrow();
            if now && !was {
                s.live.count_from_now();
                s.leading.send_replace(true);
                s.wake();
            } else if !now && was {
                s.leading.send_replace(false);
                s.live.close_links();
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Ticks [`State::beats`] every `period` while the state lives.
async fn beat(state: Weak<State>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        s.beat.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl State {
    /// Reads the whole store into a snapshot and starts following its changes.
    pub async fn open(
        store: Arc<dyn Store>,
        health: HealthConfig,
        leader: Arc<dyn Leadership>,
    ) -> Result<Arc<State>, Error> {
        let listing = store.list("/").await?;
        let mut snap = Snapshot {
            revision: listing.revision,
            ..Snapshot::default()
        };
        for kv in &listing.kvs {
            if let Some(item) = decode_item(kv) {
                snap.insert(&kv.key, item, kv.create_revision, kv.mod_revision);
            }
        }
        let from = snap.revision;
        let (world, _) = watch::channel(Arc::new(snap));
        let (events, _) = broadcast::channel(1024);
        let writer = format!("{:016x}", rand::random::<u64>());
        let leader_rx = leader.watch();
        let (grouped, grouped_rx) = mpsc::channel(GROUP_QUEUE);
        let state = Arc::new(State {
            store: Arc::clone(&store),
            world,
            writer,
            next_events: AtomicU64::new(1),
            events,
            counts: Mutex::new(BTreeMap::new()),
            leading: watch::channel(leader_rx.borrow().to_owned()).0,
            leader,
            wake: watch::channel(0).0,
            beat: watch::channel(0).0,
            started: Instant::now(),
            ids: AtomicU64::new(1),
            reflector: Mutex::new(None),
            fresh: Mutex::new(None),
            routes: PerRevision::default(),
            placed: PerRevision::default(),
            grouped,
            live: live::Live::new(health),
            history: history::History::default(),
            logs: logs::LogStreams::default(),
            execs: logs::ExecStreams::default(),
        });
        tokio::spawn(follow_leadership(Arc::downgrade(&state), leader_rx));
        tokio::spawn(beat(Arc::downgrade(&state), health.heartbeat));
        tokio::spawn(commit_groups(Arc::downgrade(&state), grouped_rx));
        let handle = tokio::spawn(reflect(Arc::downgrade(&state), store, from));
        *state.reflector.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        tracing::info!(revision = from, writer = %state.writer, "state loaded");
        Ok(state)
    }

    /// The store (for its counters and location; writes go through [`State::commit`]).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.world.borrow().clone()
    }

    /// The endpoints of `snap` ([`crate::core::endpoints::table`]) and their frame for
    /// the agents, computed once per snapshot revision for all the agent links.
    pub fn routes(&self, snap: &Snapshot) -> Routes {
        self.routes.get(snap.revision, |last| {
            let table = crate::core::endpoints::table(snap, bramble_api::endpoints::DEFAULT_RANGE);
            // Most revisions change no endpoint: the links then see the very table they
            // sent last and compare pointers, not a thousand tables each.
            if let Some(last) = last.filter(|r| *r.table == table) {
                return last.clone();
            }
            let frame =
                bramble_api::wire::encode(&bramble_api::wire::ControllerMessage::Endpoints {
                    revision: snap.revision,
                    table: table.clone(),
                });
            Routes {
                table: Arc::new(table),
                frame: bytes::Bytes::from(frame),
                revision: snap.revision,
                changes: Arc::default(),
            }
        })
    }

    /// Where `snap` places its tasks ([`crate::core::reconcile::placed`]), computed once
    /// per snapshot revision for all the agent links.
    pub fn placed(&self, snap: &Snapshot) -> Arc<crate::core::reconcile::Placed> {
        self.placed.get(snap.revision, |_| {
            Arc::new(crate::core::reconcile::placed(snap))
        })
    }

    /// Snapshots as they change (for loops and agent links that act on every change).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.world.subscribe()
    }

    /// New events as they are stored (by any controller sharing the store).
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Events seen since this controller started, by (reason, severity).
    pub fn event_counts(&self) -> Vec<((String, &'static str), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// How many events with `reason` were seen since this controller started.
    pub fn event_count(&self, reason: &str) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((r, _), _)| r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// Who may run the loops (the election itself; loops follow [`State::leading`]).
    pub fn leadership(&self) -> &dyn Leadership {
        self.leader.as_ref()
    }

    /// Whether this controller leads, as the loops and the agent link see it: changed
    /// only after what memory holds was made ready for it (see `follow_leadership`).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Whether this controller leads now (see [`State::leading`]).
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// When this controller started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// This controller's random id (its event keys and suspicions name it).
    pub fn id(&self) -> &str {
        &self.writer
    }

    /// A fresh id for connections and log requests.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the loops for a pass soon (a node came or went).
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// One tick every heartbeat, the same for every agent link: their keep-alives go
    /// out together, in one wake-up of the runtime, rather than each link's own timer
    /// waking it at its own phase (at rest, timer wake-ups were half of all of them,
    /// and waking a thread costs more than the frame it sends).
    pub fn beats(&self) -> watch::Receiver<u64> {
        self.beat.subscribe()
    }

    /// Wake-ups as they are asked for; a loop that is busy when one comes sees it as
    /// soon as it looks (a watch never loses the latest value).
    pub fn wake_signal(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// The last instant the snapshot was proven fresh by [`State::prove_fresh`].
    pub fn fresh_at(&self) -> Option<Instant> {
        *self.fresh.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Proves the snapshot fresh as of now: reads the store's revision (on etcd a
    /// linearizable read, answered only by the quorum side) and waits until the
    /// snapshot has caught up with it, each within `within`. On success the snapshot
    /// holds every commit that completed before the read was sent, and that instant
    /// becomes [`State::fresh_at`]. What a follower's vouch rests on (see
    /// `core::health::HealthConfig`).
    pub async fn prove_fresh(&self, within: Duration) -> Result<(), Error> {
        let sent = Instant::now();
        let revision = tokio::time::timeout(within, self.store.revision())
            .await
            .map_err(|_| Error::Stale(within))??;
        let mut rx = self.world.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| s.revision >= revision))
            .await
            .map_err(|_| Error::Stale(within))?
            .map_err(|_| Error::Stale(within))?;
        let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        *fresh = Some(fresh.map_or(sent, |f| f.max(sent)));
        Ok(())
    }

    /// Waits until the snapshot is at `revision` or later (at most [`CATCH_UP`]).
    pub async fn catch_up(&self, revision: u64) {
        let mut rx = self.world.subscribe();
        let caught = tokio::time::timeout(CATCH_UP, rx.wait_for(|s| s.revision >= revision)).await;
        if caught.is_err() {
            tracing::warn!(revision, "the snapshot did not reach the revision in time");
        }
    }

    /// Writes `change` in one transaction (see the module documentation). An empty
    /// change writes nothing.
    pub async fn commit(&self, change: Change, scope: Scope) -> Result<Outcome, Error> {
        if change.is_empty() {
            return Ok(Outcome::Committed(self.snapshot().revision));
        }
        if scope == Scope::Leader && !self.leader.is_leader() {
            return Err(Error::NotLeader);
        }
        let mut txn = Txn::default();
        for w in &change.writes {
            match w.expect {
                Expect::Absent => txn.compares.push(Compare::ModRevision {
                    key: w.key.clone(),
                    rev: 0,
                }),
                Expect::Rev(rev) => txn.compares.push(Compare::ModRevision {
                    key: w.key.clone(),
                    rev,
                }),
                Expect::Any => {}
            }
            txn.ops.push(match &w.value {
                Some(item) => Op::put(w.key.clone(), encode_item(&w.key, item)?),
                None => Op::delete(w.key.clone()),
            });
        }
        if !change.drafts.is_empty() {
            let at = Utc::now();
            let stored = StoredEvents {
                events: change
                    .drafts
                    .iter()
                    .map(|d| StoredEvent {
                        at,
                        severity: d.severity,
                        object: d.object.clone(),
                        reason: d.reason.to_string(),
                        message: d.message.clone(),
                    })
                    .collect(),
            };
            let key = format!(
                "{}{}-{:012}",
                model::EVENTS,
                self.writer,
                self.next_events.fetch_add(1, Ordering::Relaxed)
            );
            txn.compares.push(Compare::ModRevision {
                key: key.clone(),
                rev: 0,
            });
            let value = encode_item(&key, &Item::Events(stored))?;
            txn.ops.push(Op::put(key, value));
            txn.ops.extend(self.prune_events(change.drafts.len()));
        }
        if scope == Scope::Leader {
            txn.compares.extend(self.leader.compares());
        }
        let r = self.store.txn(txn).await?;
        if !r.succeeded {
            return Ok(Outcome::Conflict(r.revision));
        }
        self.catch_up(r.revision).await;
        self.wake();
        Ok(Outcome::Committed(r.revision))
    }

    /// Deletes of the oldest event records once more than [`RETAIN_EVENTS`] (plus the
    /// slack) would be stored.
    fn prune_events(&self, adding: usize) -> Vec<Op> {
        let snap = self.snapshot();
        let total = snap.event_count() + adding;
        if total <= RETAIN_EVENTS + PRUNE_SLACK {
            return Vec::new();
        }
        let mut excess = total - RETAIN_EVENTS;
        let mut ops = Vec::new();
        for ((_, key), stored) in &snap.events {
            if excess == 0 || ops.len() >= 16 {
                break;
            }
            excess = excess.saturating_sub(stored.events.len());
            ops.push(Op::delete(key.clone()));
        }
        ops
    }

    /// Runs `decide` on the newest snapshot and commits its change, deciding again on
    /// a fresh snapshot whenever the commit loses a race; `what` names the request in
    /// the error when it keeps losing.
    pub async fn update<R>(
        &self,
        what: &str,
        scope: Scope,
        mut decide: impl FnMut(&Snapshot) -> Result<(Change, R), DomainError>,
    ) -> Result<R, Error> {
        for _ in 0..UPDATE_ATTEMPTS {
            let snap = self.snapshot();
            let (change, answer) = decide(&snap)?;
            match self.commit(change, scope).await? {
                Outcome::Committed(_) => return Ok(answer),
                Outcome::Conflict(rev) => {
                    tracing::debug!(what, revision = rev, "lost a race; deciding again");
                    self.catch_up(rev.max(snap.revision + 1)).await;
                }
            }
        }
        Err(DomainError::Conflict(format!(
            "the cluster kept changing during {what}; try again"
        ))
        .into())
    }

    /// As [`State::update`] for a decision that reads only the keys it writes (an
    /// agent's task report), committed in one transaction together with such decisions
    /// of other callers queued meanwhile (see [`crate::core::snapshot::group`]).
    ///
    /// Why: a thousand nodes placing their tasks report thousands of changes in a few
    /// seconds. One transaction each was one store revision each, and every revision
    /// is a new snapshot for every agent link, the reconcile loop and the dashboard to
    /// read; the controller fell so far behind that it stopped hearing heartbeats and
    /// declared healthy nodes dead. Grouped, the revisions grow with the bursts, not
    /// with the reports in them.
    pub async fn update_grouped(
        &self,
        decide: impl FnMut(&Snapshot) -> Change + Send + 'static,
    ) -> Result<(), Error> {
        let (done, answer) = oneshot::channel();
        let job = Grouped {
            decide: Box::new(decide),
            done,
        };
        match self.grouped.send(job).await {
            Ok(()) => answer.await.unwrap_or(Err(Error::Closed)),
            Err(mpsc::error::SendError(mut job)) => self.update_alone(&mut job).await,
        }
    }

    /// Commits what `jobs` decide in one transaction, the ones [`group`] takes; the
    /// rest are handed back for the next group. A group that keeps losing races, or
    /// that the store refuses, is committed one decision at a time instead, so each
    /// caller gets its own answer.
    ///
    /// [`group`]: crate::core::snapshot::group
    async fn commit_group(&self, mut jobs: Vec<Grouped>) -> Vec<Grouped> {
        for _ in 0..UPDATE_ATTEMPTS {
            let snap = self.snapshot();
            let changes = jobs.iter_mut().map(|j| (j.decide)(&snap)).collect();
            let group = crate::core::snapshot::group(changes, GROUP_WRITES);
            match self.commit(group.change, Scope::Any).await {
                Ok(Outcome::Committed(_)) => {
                    let mut left = Vec::new();
                    for (job, taken) in jobs.into_iter().zip(group.taken) {
                        if taken {
                            // The caller may have given up waiting: nothing to tell.
                            let _ = job.done.send(Ok(()));
                        } else {
                            left.push(job);
                        }
                    }
                    return left;
                }
                Ok(Outcome::Conflict(rev)) => {
                    tracing::debug!(
                        revision = rev,
                        jobs = jobs.len(),
                        "a grouped commit lost a race; deciding again"
                    );
                    self.catch_up(rev.max(snap.revision + 1)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, jobs = jobs.len(), "a grouped commit failed; committing one by one");
                    break;
                }
            }
        }
        for mut job in jobs {
            let r = self.update_alone(&mut job).await;
            let _ = job.done.send(r);
        }
        Vec::new()
    }

    /// Commits one grouped decision on its own, as [`State::update`] does.
    async fn update_alone(&self, job: &mut Grouped) -> Result<(), Error> {
        self.update("a grouped change", Scope::Any, |snap| {
            Ok(((job.decide)(snap), ()))
        })
        .await
    }

    /// Applies one watched batch to the snapshot and announces its new events.
    fn apply(&self, batch: &WatchBatch) {
        let mut new_events: Vec<Event> = Vec::new();
        self.world.send_modify(|arc| {
            let snap = Arc::make_mut(arc);
            for e in &batch.events {
                match e.kind {
                    EventKind::Put => match decode_item(&e.kv) {
                        Some(item) => {
                            if let Item::Events(stored) = &item {
                                new_events.extend(events_of(e.kv.create_revision, stored));
                            }
                            snap.insert(&e.kv.key, item, e.kv.create_revision, e.kv.mod_revision);
                        }
                        None => snap.remove(&e.kv.key),
                    },
                    EventKind::Delete => snap.remove(&e.kv.key),
                }
            }
            snap.revision = snap.revision.max(batch.revision);
        });
        self.announce(new_events);
    }

    /// Replaces the snapshot with a fresh listing (after a lost watch), announcing the
    /// events stored meanwhile.
    fn replace(&self, listing: store::Listing) {
        let mut snap = Snapshot {
            revision: listing.revision,
            ..Snapshot::default()
        };
        for kv in &listing.kvs {
            if let Some(item) = decode_item(kv) {
                snap.insert(&kv.key, item, kv.create_revision, kv.mod_revision);
            }
        }
        let old = self.snapshot();
        let new_events: Vec<Event> = snap
            .events
            .iter()
            .filter(|(k, _)| !old.events.contains_key(*k))
            .flat_map(|((rev, _), stored)| events_of(*rev, stored).collect::<Vec<_>>())
            .collect();
        self.world.send_replace(Arc::new(snap));
        self.announce(new_events);
    }

    fn announce(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            for e in &events {
                let severity = match e.severity {
                    bramble_api::rest::Severity::Normal => "Normal",
                    bramble_api::rest::Severity::Warning => "Warning",
                };
                *counts.entry((e.reason.clone(), severity)).or_default() += 1;
            }
        }
        for e in events {
            tracing::info!(object = %e.object, reason = %e.reason, message = %e.message, "event");
            // No subscriber is fine: nobody is listening.
            let _ = self.events.send(e);
        }
    }
}

/// A value worked out from a snapshot, held for the newest revision asked about: every
/// agent link asks for the same one, and it is computed once for them all.
struct PerRevision<T>(Mutex<Option<(u64, T)>>);

impl<T> Default for PerRevision<T> {
    fn default() -> Self {
        PerRevision(Mutex::new(None))
    }
}

impl<T: Clone> PerRevision<T> {
    /// The value for `revision`; `compute` makes it (given the value held for an earlier
    /// revision, if any) when it is not held yet.
    fn get(&self, revision: u64, compute: impl FnOnce(Option<&T>) -> T) -> T {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*held {
            Some((rev, value)) if *rev == revision => value.clone(),
            earlier => {
                let value = compute(earlier.as_ref().map(|(_, v)| v));
                *held = Some((revision, value.clone()));
                value
            }
        }
    }
}

/// A decision waiting for a grouped commit, and who waits for its answer.
struct Grouped {
    decide: Box<dyn FnMut(&Snapshot) -> Change + Send>,
    done: oneshot::Sender<Result<(), Error>>,
}

/// Commits the queued decisions of [`State::update_grouped`], as many at once as
/// [`crate::core::snapshot::group`] joins; what it leaves goes first in the next group.
async fn commit_groups(state: Weak<State>, mut rx: mpsc::Receiver<Grouped>) {
    let mut jobs: Vec<Grouped> = Vec::new();
    loop {
        if jobs.is_empty() {
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let Some(state) = state.upgrade() else { return };
        jobs = state.commit_group(std::mem::take(&mut jobs)).await;
    }
}

/// Follows the store's changes into the snapshot; lists again after a lost watch.
async fn reflect(state: Weak<State>, store: Arc<dyn Store>, mut from: u64) {
    let mut retry = Retry::new(RELIST);
    loop {
        match store.watch("/", from + 1).await {
            Ok(mut changes) => {
                while let Some(item) = changes.next().await {
                    match item {
                        Ok(batch) => {
                            let Some(state) = state.upgrade() else { return };
                            state.apply(&batch);
                            from = batch.revision;
                            retry.succeeded();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "store watch lost; listing again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the store; listing again"),
        }
        if state.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(retry.failed_jittered(0.2, rand::random::<f64>())).await;
        match store.list("/").await {
            Ok(listing) => {
                let Some(state) = state.upgrade() else { return };
                from = listing.revision;
                state.replace(listing);
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the store; retrying"),
        }
    }
}
