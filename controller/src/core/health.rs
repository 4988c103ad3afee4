//! Node health as a pure function of the time since a node was last heard, and the
//! timing argument that keeps a Wallet from running twice. The `state` layer keeps the
//! last-heard instants in memory (a heartbeat never touches the store).

use std::time::{Duration, Instant};

use bramble_api::rest::NodeStatus;

use super::events::Draft;

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

/// The event a node's change of health means: `prev` the status last announced (`None`
/// before the first), `now` the current one. A controller that just started and does
/// not hear a node yet has no news to tell.
pub fn status_event(node: &str, prev: Option<NodeStatus>, now: NodeStatus) -> Option<Draft> {
    let obj = format!("node/{node}");
    match (prev, now) {
        (p, n) if p == Some(n) => None,
        (None, NodeStatus::NotReady) => None,
        (None, NodeStatus::Ready) => Some(Draft::normal(obj, "NodeReady", "agent connected")),
        (Some(_), NodeStatus::Ready) => Some(Draft::normal(obj, "NodeBack", "heartbeats again")),
        (_, NodeStatus::NotReady) => Some(Draft::warning(
            obj,
            "NodeNotReady",
            "heartbeats late; no new tasks",
        )),
        (_, NodeStatus::Dead) => Some(Draft::warning(
            obj,
            "NodeDead",
            "silent too long; its tasks go elsewhere",
        )),
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
    fn health_changes_make_events_only_when_there_is_news() {
        use NodeStatus::*;
        let reason = |p, n| status_event("pi1", p, n).map(|d| d.reason);
        assert_eq!(
            reason(None, NotReady),
            None,
            "a fresh controller knows nothing"
        );
        assert_eq!(reason(None, Ready), Some("NodeReady"));
        assert_eq!(reason(Some(Dead), Ready), Some("NodeBack"));
        assert_eq!(reason(Some(Ready), NotReady), Some("NodeNotReady"));
        assert_eq!(reason(Some(NotReady), Dead), Some("NodeDead"));
        assert_eq!(reason(None, Dead), Some("NodeDead"));
        assert_eq!(reason(Some(Ready), Ready), None);
    }

    #[test]
    fn default_margin_covers_heartbeat_check_and_stop() {
        // The inequality documented on HealthConfig, with a one-way delay of 100 ms.
        let cfg = HealthConfig::default();
        let needed = cfg.heartbeat + Duration::from_millis(2 * 100 + 100 + 700);
        assert!(cfg.fence_margin > needed);
    }
}
