//! What is known of each node in memory only: when it was last heard, its last
//! metrics and the agent's link. A heartbeat touches nothing else: no store read, no
//! store write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bramble_api::rest::NodeStatus;
use bramble_api::wire::{ControllerMessage, NodeMetrics};
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

use crate::core::events::Draft;
use crate::core::health::{self, HealthConfig};
use crate::core::views::Liveness;
use crate::core::volumes;

/// The open link to one agent.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Distinguishes a reconnect from the connection it replaces.
    pub id: u64,
    /// Frames to send.
    pub tx: mpsc::Sender<ControllerMessage>,
    /// Remote address.
    pub address: String,
}

/// What is known in memory of one node.
#[derive(Debug, Default)]
struct Entry {
    conn: Option<Connection>,
    last_seen: Option<Instant>,
    last_seen_at: Option<DateTime<Utc>>,
    metrics: Option<NodeMetrics>,
    /// The status last announced as an event.
    noted: Option<NodeStatus>,
    /// The first instant this controller knew the store held a suspicion of the node:
    /// when its own commit of it returned, or when it first looked and found one
    /// (written by an earlier leader, or by the leader while this one follows). Never
    /// before the commit, so counting from it errs on the safe side.
    suspected: Option<Instant>,
}

impl Entry {
    /// Notes a frame from the node, now.
    fn heard(&mut self) {
        self.last_seen = Some(Instant::now());
        self.last_seen_at = Some(Utc::now());
    }
}

/// All nodes' in-memory state.
pub struct Live {
    /// When this controller started counting node health: its start, or when it last
    /// became the leader (a follower hears no agent).
    started: Mutex<Instant>,
    cfg: HealthConfig,
    nodes: Mutex<HashMap<String, Entry>>,
    /// Every node's last volume report (kept for nodes that went away: their data is
    /// still what a failover would want).
    volumes: Mutex<volumes::Reports>,
    /// Bumped whenever a volume report changes.
    volumes_changed: watch::Sender<u64>,
}

impl Live {
    /// Empty, counting health from now.
    pub fn new(cfg: HealthConfig) -> Live {
        Live {
            started: Mutex::new(Instant::now()),
            cfg,
            nodes: Mutex::new(HashMap::new()),
            volumes: Mutex::new(volumes::Reports::new()),
            volumes_changed: watch::channel(0).0,
        }
    }

    /// The health settings.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    fn started(&self) -> Instant {
        *self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts every node's health from now, as at a start: this controller just became
    /// the leader, and what it heard before (as a follower, or in an earlier term) says
    /// nothing of the nodes now. Nodes get the startup grace to dial it.
    pub fn count_from_now(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        for entry in self.lock().values_mut() {
            if entry.conn.is_none() {
                entry.last_seen = None;
            }
            // A suspicion found in the store counts from now (see `Entry::suspected`).
            entry.suspected = None;
        }
    }

    /// Closes every agent link (this controller stopped leading: agents must go to the
    /// new leader, and fence if they find none).
    pub fn close_links(&self) {
        for entry in self.lock().values_mut() {
            entry.conn = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, replacing (and so closing) any older one.
    pub fn connect(&self, node: &str, conn: Connection) {
        let mut nodes = self.lock();
        let entry = nodes.entry(node.to_string()).or_default();
        entry.conn = Some(conn);
        entry.heard();
    }

    /// Forgets a connection, unless a newer one already replaced it.
    pub fn disconnect(&self, node: &str, conn_id: u64) {
        let mut nodes = self.lock();
        if let Some(entry) = nodes.get_mut(node) {
            if entry.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                entry.conn = None;
            }
        }
    }

    /// Forgets a node entirely (it was deleted).
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
        if self
            .volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node)
            .is_some()
        {
            self.volumes_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Takes a node's volume report; the events it means (see
    /// [`volumes::report_events`]).
    pub fn set_volumes(
        &self,
        node: &str,
        report: Vec<bramble_api::wire::VolumeReport>,
    ) -> Vec<Draft> {
        let mut all = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let old = all.get(node).cloned().unwrap_or_default();
        if old == report {
            return Vec::new();
        }
        let drafts = volumes::report_events(node, &old, &report, |w| {
            all.iter()
                .any(|(n, rs)| n != node && rs.iter().any(|r| r.workload == w))
        });
        all.insert(node.to_string(), report);
        drop(all);
        self.volumes_changed.send_modify(|n| *n = n.wrapping_add(1));
        drafts
    }

    /// Every node's last volume report.
    pub fn volumes(&self) -> volumes::Reports {
        self.volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes whenever a volume report does.
    pub fn volumes_changed(&self) -> watch::Receiver<u64> {
        self.volumes_changed.subscribe()
    }

    /// Notes that a frame arrived from the node.
    pub fn seen(&self, node: &str, metrics: Option<NodeMetrics>) {
        let note = |entry: &mut Entry| {
            entry.heard();
            if metrics.is_some() {
                entry.metrics = metrics;
            }
        };
        let mut nodes = self.lock();
        // Looked up before inserting: a heartbeat's node is almost always known, and
        // `entry` would allocate its name every time.
        match nodes.get_mut(node) {
            Some(entry) => note(entry),
            None => note(nodes.entry(node.to_string()).or_default()),
        }
    }

    /// Notes a heartbeat that repeats the node's last one (see `hub::repeated_beat`):
    /// as [`Live::seen`] with the same metrics again. False, noting nothing, when the
    /// node has no metrics here (it was forgotten since): the heartbeat must be taken
    /// whole.
    pub fn seen_again(&self, node: &str) -> bool {
        let mut nodes = self.lock();
        let Some(entry) = nodes.get_mut(node).filter(|e| e.metrics.is_some()) else {
            return false;
        };
        entry.heard();
        true
    }

    /// Health of one node now.
    pub fn status(&self, node: &str) -> NodeStatus {
        let nodes = self.lock();
        let last = nodes.get(node).and_then(|l| l.last_seen);
        health::status(last, self.started(), Instant::now(), &self.cfg)
    }

    /// Since when the node counts as suspected, given whether the store holds a
    /// suspicion of it (`in_store`; see `Entry::suspected`).
    fn suspected_at(
        nodes: &mut HashMap<String, Entry>,
        node: &str,
        in_store: bool,
    ) -> Option<Instant> {
        if !in_store {
            if let Some(e) = nodes.get_mut(node) {
                e.suspected = None;
            }
            return None;
        }
        let e = nodes.entry(node.to_string()).or_default();
        Some(*e.suspected.get_or_insert_with(Instant::now))
    }

    /// Whether the leader should suspect the node now (see [`HealthConfig`]).
    pub fn suspect(&self, node: &str) -> bool {
        let last = self.lock().get(node).and_then(|l| l.last_seen);
        health::suspect(last, self.started(), Instant::now(), &self.cfg)
    }

    /// Closes the link to one node (it is suspected: the leader's frames must stop, so
    /// that only a vouch could keep its Wallets running, and none comes).
    pub fn close_link(&self, node: &str) {
        if let Some(e) = self.lock().get_mut(node) {
            e.conn = None;
        }
    }

    /// Whether the node has surely stopped its Wallets (see [`HealthConfig`]);
    /// `suspected`: whether the store holds a suspicion of it.
    pub fn wallets_fenced(&self, node: &str, suspected: bool) -> bool {
        let started = self.started();
        let mut nodes = self.lock();
        let since = Self::suspected_at(&mut nodes, node, suspected);
        let last = nodes.get(node).and_then(|l| l.last_seen);
        health::wallets_fenced(last, started, since, Instant::now(), &self.cfg)
    }

    /// The earliest instant at which the status, suspicion or fencing of one of
    /// `nodes` (each with whether the store holds a suspicion of it) changes.
    pub fn next_change<'a>(&self, nodes: impl Iterator<Item = (&'a str, bool)>) -> Option<Instant> {
        let now = Instant::now();
        let started = self.started();
        let mut live = self.lock();
        nodes
            .filter_map(|(n, suspected)| {
                let since = Self::suspected_at(&mut live, n, suspected);
                let last = live.get(n).and_then(|l| l.last_seen);
                health::next_change(last, started, since, now, &self.cfg)
            })
            .min()
    }

    /// Records the status last announced in events; returns the previous one if it
    /// changed.
    pub fn note_status(&self, node: &str, now: NodeStatus) -> Option<Option<NodeStatus>> {
        let mut nodes = self.lock();
        let entry = nodes.entry(node.to_string()).or_default();
        if entry.noted == Some(now) {
            None
        } else {
            Some(entry.noted.replace(now))
        }
    }

    /// Puts back the status last announced (its announcement could not be stored).
    pub fn restore_status(&self, node: &str, prev: Option<NodeStatus>) {
        if let Some(entry) = self.lock().get_mut(node) {
            entry.noted = prev;
        }
    }

    /// Health, last-seen time, metrics and address of one node.
    pub fn view(&self, node: &str) -> Liveness {
        let nodes = self.lock();
        let l = nodes.get(node);
        Liveness {
            status: health::status(
                l.and_then(|l| l.last_seen),
                self.started(),
                Instant::now(),
                &self.cfg,
            ),
            last_seen: l.and_then(|l| l.last_seen_at),
            metrics: l.and_then(|l| l.metrics.clone()),
            address: l.and_then(|l| l.conn.as_ref().map(|c| c.address.clone())),
        }
    }

    /// The connection to a node, if it has one.
    pub fn connection(&self, node: &str) -> Option<Connection> {
        self.lock().get(node).and_then(|l| l.conn.clone())
    }

    /// Nodes connected now.
    pub fn connected(&self) -> usize {
        self.lock().values().filter(|l| l.conn.is_some()).count()
    }
}
