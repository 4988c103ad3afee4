//! Node health, kept in memory only: last heartbeat, metrics, the agent's connection and
//! what was last sent to it. A heartbeat never touches the store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bramble_api::rest::NodeStatus;
use bramble_api::wire::{Assignment, ControllerMessage, NodeMetrics};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

/// How quickly a silent node is given up.
///
/// # Why a Wallet never runs twice
///
/// The controller pings every agent every `heartbeat`; an agent that has received
/// nothing from the controller for `fence` stops its Wallet containers by itself
/// (SIGTERM, then SIGKILL after a short grace). The controller places a silent node's
/// Wallet elsewhere only once `fence + fence_margin` has passed since it last heard
/// from that node. Both sides measure elapsed time on their own monotonic clocks, so
/// wall-clock skew does not matter.
///
/// Say the link breaks at time P, with one-way delay d. The controller last heard the
/// node at `T_c >= P - heartbeat - d` (the last heartbeat before the break); the agent
/// last heard the controller at `T_a <= P + d`. The agent's wallet is dead by
/// `T_a + fence + g + k` (g: the agent's check period, 100 ms; k: the stop, at most
/// about 700 ms with the fencing grace of 500 ms). The controller starts a new one at
/// `T_c + fence + fence_margin`. So the old one is gone first whenever
/// `fence_margin > heartbeat + 2d + g + k`: with the defaults (heartbeat 250 ms,
/// margin 1.5 s) that holds for any delay under about 225 ms. A powered-off node's
/// wallet thus runs elsewhere `fence + fence_margin` (3 s) after its last heartbeat,
/// plus the time to start the container. Raise both for flaky links; keep the
/// inequality.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// How often agents send heartbeats (and the controller pings).
    pub heartbeat: Duration,
    /// No heartbeat for this long: NotReady (no new tasks).
    pub not_ready_after: Duration,
    /// No heartbeat for this long: Dead; its Services and Jobs are placed elsewhere.
    pub dead_after: Duration,
    /// An agent that hears nothing for this long stops its Wallets.
    pub fence: Duration,
    /// Extra wait on the controller's side before a silent node's Wallet is placed
    /// elsewhere (see above).
    pub fence_margin: Duration,
    /// After a controller (re)start, how much longer than usual a node that has not
    /// reconnected yet is given before it counts as Dead or fenced: agents redial with
    /// back-off (up to 5 s), and a restart must not move work off live nodes.
    pub startup_grace: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat: Duration::from_millis(250),
            not_ready_after: Duration::from_secs(1),
            dead_after: Duration::from_secs(2),
            fence: Duration::from_millis(1500),
            fence_margin: Duration::from_millis(1500),
            startup_grace: Duration::from_secs(6),
        }
    }
}

/// Whether a node has surely fenced its Wallets: silent for `fence + fence_margin`.
/// Counts from the controller's start for a node not heard from since.
pub fn wallets_fenced(
    last_seen: Option<Instant>,
    controller_start: Instant,
    now: Instant,
    cfg: &HealthConfig,
) -> bool {
    now.saturating_duration_since(last_seen.unwrap_or(controller_start))
        > cfg.fence + cfg.fence_margin + grace(last_seen, cfg)
}

/// The extra wait for a node not heard from since the controller started.
fn grace(last_seen: Option<Instant>, cfg: &HealthConfig) -> Duration {
    if last_seen.is_some() {
        Duration::ZERO
    } else {
        cfg.startup_grace
    }
}

/// The next instant after `now` at which a node last heard of at `last_seen` changes
/// status or has its Wallets surely fenced, so the controller acts on a silent node at
/// that moment rather than at its next periodic pass. `None` once nothing is left to
/// change.
pub fn next_change(
    last_seen: Option<Instant>,
    controller_start: Instant,
    now: Instant,
    cfg: &HealthConfig,
) -> Option<Instant> {
    let from = last_seen.unwrap_or(controller_start);
    // Both predicates above flip just *after* their threshold.
    let tick = Duration::from_millis(1);
    let grace = grace(last_seen, cfg);
    [
        cfg.not_ready_after,
        cfg.dead_after + grace,
        cfg.fence + cfg.fence_margin + grace,
    ]
    .into_iter()
    .filter_map(|d| from.checked_add(d + tick))
    .filter(|t| *t > now)
    .min()
}

/// A node's health from the time since it was last heard of. A node the controller has
/// not heard from since it started counts from the controller's start, so a controller
/// restart does not declare every node dead at once.
pub fn status(
    last_seen: Option<Instant>,
    controller_start: Instant,
    now: Instant,
    cfg: &HealthConfig,
) -> NodeStatus {
    let since = now.saturating_duration_since(last_seen.unwrap_or(controller_start));
    if since <= cfg.not_ready_after && last_seen.is_some() {
        NodeStatus::Ready
    } else if since <= cfg.dead_after + grace(last_seen, cfg) {
        NodeStatus::NotReady
    } else {
        NodeStatus::Dead
    }
}

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
pub struct Live {
    /// The agent's link, if connected.
    pub conn: Option<Connection>,
    /// Last frame received.
    pub last_seen: Option<Instant>,
    /// The same, in wall-clock time for display.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Last heartbeat's metrics.
    pub metrics: Option<NodeMetrics>,
    /// The task set last sent, so an unchanged set is not sent again.
    pub sent: Option<Vec<Assignment>>,
    /// The status last announced as an event.
    pub noted: Option<NodeStatus>,
}

/// All nodes' in-memory state.
pub struct Nodes {
    started: Instant,
    cfg: HealthConfig,
    live: Mutex<HashMap<String, Live>>,
}

impl Nodes {
    /// Empty, counting health from now.
    pub fn new(cfg: HealthConfig) -> Nodes {
        Nodes {
            started: Instant::now(),
            cfg,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The health settings.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, replacing (and so closing) any older one.
    pub fn connect(&self, node: &str, conn: Connection) {
        let mut live = self.lock();
        let entry = live.entry(node.to_string()).or_default();
        entry.conn = Some(conn);
        entry.sent = None;
        entry.last_seen = Some(Instant::now());
        entry.last_seen_at = Some(Utc::now());
    }

    /// Forgets a connection, unless a newer one already replaced it.
    pub fn disconnect(&self, node: &str, conn_id: u64) {
        let mut live = self.lock();
        if let Some(entry) = live.get_mut(node) {
            if entry.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                entry.conn = None;
                entry.sent = None;
            }
        }
    }

    /// Notes that a frame arrived from the node.
    pub fn seen(&self, node: &str, metrics: Option<NodeMetrics>) {
        let mut live = self.lock();
        let entry = live.entry(node.to_string()).or_default();
        entry.last_seen = Some(Instant::now());
        entry.last_seen_at = Some(Utc::now());
        if metrics.is_some() {
            entry.metrics = metrics;
        }
    }

    /// Health of one node now.
    pub fn status(&self, node: &str) -> NodeStatus {
        let live = self.lock();
        let last = live.get(node).and_then(|l| l.last_seen);
        status(last, self.started, Instant::now(), &self.cfg)
    }

    /// Whether the node has surely stopped its Wallets (see [`HealthConfig`]).
    pub fn wallets_fenced(&self, node: &str) -> bool {
        let live = self.lock();
        let last = live.get(node).and_then(|l| l.last_seen);
        wallets_fenced(last, self.started, Instant::now(), &self.cfg)
    }

    /// The earliest instant at which any known node's status or fencing changes. Every
    /// stored node is known here once a reconcile pass has noted its status.
    pub fn next_change(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter_map(|l| next_change(l.last_seen, self.started, now, &self.cfg))
            .min()
    }

    /// Records the status last reported in events; returns the previous one if it changed.
    pub fn note_status(&self, node: &str, now: NodeStatus) -> Option<Option<NodeStatus>> {
        let mut live = self.lock();
        let entry = live.entry(node.to_string()).or_default();
        if entry.noted == Some(now) {
            None
        } else {
            Some(entry.noted.replace(now))
        }
    }

    /// Health, last-seen time, metrics and address of one node.
    pub fn view(
        &self,
        node: &str,
    ) -> (
        NodeStatus,
        Option<DateTime<Utc>>,
        Option<NodeMetrics>,
        Option<String>,
    ) {
        let live = self.lock();
        let l = live.get(node);
        let st = status(
            l.and_then(|l| l.last_seen),
            self.started,
            Instant::now(),
            &self.cfg,
        );
        (
            st,
            l.and_then(|l| l.last_seen_at),
            l.and_then(|l| l.metrics.clone()),
            l.and_then(|l| l.conn.as_ref().map(|c| c.address.clone())),
        )
    }

    /// The connection to a node, if it has one.
    pub fn connection(&self, node: &str) -> Option<Connection> {
        self.lock().get(node).and_then(|l| l.conn.clone())
    }

    /// Sends `tasks` to the node if it is connected and they differ from what it last got.
    /// Returns whether something was sent.
    pub fn push(&self, node: &str, tasks: Vec<Assignment>, revision: u64) -> bool {
        let mut live = self.lock();
        let Some(entry) = live.get_mut(node) else {
            return false;
        };
        let Some(conn) = entry.conn.clone() else {
            return false;
        };
        if entry.sent.as_ref() == Some(&tasks) {
            return false;
        }
        match conn.tx.try_send(ControllerMessage::Assign {
            revision,
            tasks: tasks.clone(),
        }) {
            Ok(()) => {
                entry.sent = Some(tasks);
                true
            }
            Err(e) => {
                // A full queue means a stuck link; the next pass retries, so nothing is lost.
                tracing::warn!(node = %node, error = %e, "could not queue task set for node");
                false
            }
        }
    }

    /// Names of connected nodes.
    pub fn connected(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.conn.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_moves_ready_notready_dead() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(status(Some(t0), t0, at(0), &cfg), NodeStatus::Ready);
        assert_eq!(status(Some(t0), t0, at(1000), &cfg), NodeStatus::Ready);
        assert_eq!(status(Some(t0), t0, at(1001), &cfg), NodeStatus::NotReady);
        assert_eq!(status(Some(t0), t0, at(2000), &cfg), NodeStatus::NotReady);
        assert_eq!(status(Some(t0), t0, at(2001), &cfg), NodeStatus::Dead);
    }

    #[test]
    fn a_node_not_yet_heard_from_after_a_restart_is_not_ready_then_dead() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        assert_eq!(status(None, t0, t0, &cfg), NodeStatus::NotReady);
        // Agents redial with back-off: a node gets the startup grace to come back.
        let dead = cfg.dead_after + cfg.startup_grace;
        assert_eq!(status(None, t0, t0 + dead, &cfg), NodeStatus::NotReady);
        assert_eq!(
            status(None, t0, t0 + dead + Duration::from_millis(1), &cfg),
            NodeStatus::Dead
        );
        let fenced = cfg.fence + cfg.fence_margin + cfg.startup_grace;
        assert!(!wallets_fenced(None, t0, t0 + fenced, &cfg));
        assert!(wallets_fenced(
            None,
            t0,
            t0 + fenced + Duration::from_millis(1),
            &cfg
        ));
    }

    #[test]
    fn wallets_count_as_fenced_only_after_fence_plus_margin() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(
            !wallets_fenced(Some(t0), t0, at(2500), &cfg),
            "dead is not yet fenced"
        );
        assert!(!wallets_fenced(Some(t0), t0, at(3000), &cfg));
        assert!(wallets_fenced(Some(t0), t0, at(3001), &cfg));
        // After a controller restart the clock starts at the restart.
        assert!(!wallets_fenced(None, at(10_000), at(12_000), &cfg));
    }

    #[test]
    fn defaults_fail_over_within_the_budgets() {
        let cfg = HealthConfig::default();
        // Services move when the node is Dead, Wallets when surely fenced; both leave
        // room for detection and a container start within 5 s.
        assert!(cfg.dead_after <= Duration::from_secs(2));
        assert!(cfg.fence + cfg.fence_margin <= Duration::from_secs(3));
        assert!(cfg.fence + cfg.fence_margin > cfg.dead_after);
    }

    #[test]
    fn the_next_change_is_the_next_threshold_crossed() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let next = |now: u64| next_change(Some(t0), t0, at(now), &cfg);
        assert_eq!(next(0), Some(at(1001)), "NotReady first");
        assert_eq!(next(1001), Some(at(2001)), "then Dead");
        assert_eq!(next(2001), Some(at(3001)), "then fenced");
        assert_eq!(next(3001), None, "then nothing");
        // At each instant returned, the status or fencing has just changed.
        assert_eq!(status(Some(t0), t0, at(1001), &cfg), NodeStatus::NotReady);
        assert_eq!(status(Some(t0), t0, at(2001), &cfg), NodeStatus::Dead);
        assert!(wallets_fenced(Some(t0), t0, at(3001), &cfg));
        // A node not heard from since the controller started counts from the start,
        // with the startup grace.
        let grace = u64::try_from(cfg.startup_grace.as_millis()).expect("small");
        assert_eq!(next_change(None, at(500), at(600), &cfg), Some(at(1501)));
        assert_eq!(
            next_change(None, at(500), at(1501), &cfg),
            Some(at(2501 + grace))
        );
    }

    #[test]
    fn default_margin_covers_heartbeat_check_and_stop() {
        // The inequality documented on HealthConfig, with a one-way delay of 100 ms.
        let cfg = HealthConfig::default();
        let needed = cfg.heartbeat + Duration::from_millis(2 * 100 + 100 + 700);
        assert!(cfg.fence_margin > needed);
    }
}
