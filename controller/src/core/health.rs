//! Node health as a pure function of the time since a node was last heard, and the
//! timing argument that keeps a Wallet from running twice. The `state` layer keeps the
//! last-heard instants in memory (a heartbeat never touches the store).

use std::time::{Duration, Instant};

use bramble_api::rest::NodeStatus;
use chrono::{DateTime, Utc};

use super::events::Draft;
use super::model::{self, Suspicion};
use super::snapshot::{Change, Expect, Item, Snapshot, Write};

/// How quickly a silent node is given up.
///
/// # Why a Wallet never runs twice
///
/// An agent runs its Wallets only while it is *vouched for*: it has heard, within
/// `fence`, its leader (any frame of the leader's link: the leader pings every
/// `heartbeat`) or a [`Vouch`](bramble_api::wire::ControllerMessage::Vouch) from a
/// follower's standby link. Past that it stops its Wallet containers by itself
/// (SIGTERM, then SIGKILL after a short grace) and starts none until a leader sends it
/// a fresh task set. Every controller measures on its own monotonic clock, every agent
/// on its own, so wall-clock skew does not matter.
///
/// The leader moves a silent node's Wallet in two steps:
/// 1. once it has not heard the node for `not_ready_after` (plus the startup grace for a
///    node not heard since it began to lead), it commits a *suspicion* of the node to
///    the store ([`suspect`]) and closes the node's link, so its own frames stop;
/// 2. it places the Wallet elsewhere only once `fence + fence_margin` has passed since
///    that commit returned, and only while the node is still silent ([`wallets_fenced`]).
///
/// A follower vouches for a node only while it hears the node, knows of no suspicion of
/// it, and its view of the store is *fresh*: it holds every commit completed before an
/// instant at most [`vouch_window`] (two heartbeats) ago, proven by a quorum read of the
/// store's revision sent at that instant and the follower's snapshot having caught up
/// with it ([`may_vouch`]).
///
/// Say the suspicion commit completes at S (so the leader counts from some `t_s >= S`).
/// A follower's vouch sent at v rests on a read sent at `v - R` or later (`R` =
/// [`vouch_window`]); a read sent after S sees the suspicion, so every vouch is sent
/// before `S + R`. The leader's last frame went before `t_s`. With one-way delay d, the
/// agent hears its last vouch before `t_s + R + d` and its Wallet is dead by
/// `t_s + R + d + fence + g + k` (g: the agent's check period, 100 ms; k: the stop, at
/// most about 700 ms with the fencing grace of 500 ms). The new instance starts at
/// `t_s + fence + fence_margin` at the earliest. So the old one is gone first whenever
/// `fence_margin > R + d + g + k`: with the defaults (heartbeat 250 ms, so R = 500 ms,
/// margin 1.5 s) that holds for any one-way delay under about 200 ms.
///
/// A leader that loses the store cannot commit a suspicion or a move, and stops leading
/// (closing every link) before its lease can have expired; a new leader counts from the
/// moment it leads, with the startup grace, so a node it does not hear yet is suspected
/// only after `not_ready_after + startup_grace`. Killing the leader therefore stops no
/// Wallet: its agents go on being vouched for by the followers, which hear them and see
/// no suspicion, until the new leader's link takes over. An agent cut off from every
/// controller (or from all but ones without a fresh view, i.e. the quorum side) hears no
/// vouch and fences.
///
/// A powered-off node's Wallet runs elsewhere `not_ready_after + fence + fence_margin`
/// (4 s with the defaults) after the node's last heartbeat, plus the suspicion commit
/// and the time to start the container. Raise `fence` and `fence_margin` together for
/// flaky links; keep the inequality.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// How often agents send heartbeats (and the controller pings).
    pub heartbeat: Duration,
    /// No heartbeat for this long: NotReady (no new tasks), and a node with a Wallet is
    /// suspected.
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

/// How stale a follower's view of the store may be while it vouches (`R` above).
pub fn vouch_window(cfg: &HealthConfig) -> Duration {
    cfg.heartbeat * 2
}

/// The agent's check period plus the longest fencing stop (SIGTERM, a 500 ms grace,
/// SIGKILL and removal): `g + k` in [`HealthConfig`]'s argument.
pub const FENCE_CHECK_AND_STOP: Duration = Duration::from_millis(800);

/// The least `fence_margin` the argument above allows with a one-way delay of zero:
/// [`vouch_window`] plus the agent's check period and the fencing stop.
pub fn least_margin(cfg: &HealthConfig) -> Duration {
    vouch_window(cfg) + FENCE_CHECK_AND_STOP
}

/// Whether the leader suspects a node it last heard at `last_seen`: silent for
/// `not_ready_after` (plus the startup grace for a node not heard since it began to
/// lead at `controller_start`).
pub fn suspect(
    last_seen: Option<Instant>,
    controller_start: Instant,
    now: Instant,
    cfg: &HealthConfig,
) -> bool {
    now.saturating_duration_since(last_seen.unwrap_or(controller_start))
        > cfg.not_ready_after + grace(last_seen, cfg)
}

/// Whether a node has surely fenced its Wallets: silent for `fence + fence_margin`
/// (counted from the controller's start for a node not heard since), and suspected
/// (the suspicion committed at `suspected`, on this controller's clock) for
/// `fence + fence_margin`.
pub fn wallets_fenced(
    last_seen: Option<Instant>,
    controller_start: Instant,
    suspected: Option<Instant>,
    now: Instant,
    cfg: &HealthConfig,
) -> bool {
    let wait = cfg.fence + cfg.fence_margin;
    now.saturating_duration_since(last_seen.unwrap_or(controller_start))
        > wait + grace(last_seen, cfg)
        && suspected.is_some_and(|s| now.saturating_duration_since(s) > wait)
}

/// Whether a follower may vouch for a node now: its view of the store was fresh at
/// `fresh_at` (see [`HealthConfig`]), no more than [`vouch_window`] ago; it heard the
/// node at `heard`, within `not_ready_after`; and its view holds no suspicion of it.
pub fn may_vouch(
    fresh_at: Option<Instant>,
    heard: Instant,
    suspected: bool,
    now: Instant,
    cfg: &HealthConfig,
) -> bool {
    !suspected
        && fresh_at.is_some_and(|f| now.saturating_duration_since(f) <= vouch_window(cfg))
        && now.saturating_duration_since(heard) <= cfg.not_ready_after
}

/// The extra wait for a node not heard from since the controller started.
fn grace(last_seen: Option<Instant>, cfg: &HealthConfig) -> Duration {
    if last_seen.is_some() {
        Duration::ZERO
    } else {
        cfg.startup_grace
    }
}

/// The next instant after `now` at which a node last heard of at `last_seen` (and
/// suspected since `suspected`) changes status, becomes suspect or has its Wallets
/// surely fenced, so the controller acts on a silent node at that moment rather than
/// at its next periodic pass. `None` once nothing is left to change.
pub fn next_change(
    last_seen: Option<Instant>,
    controller_start: Instant,
    suspected: Option<Instant>,
    now: Instant,
    cfg: &HealthConfig,
) -> Option<Instant> {
    let from = last_seen.unwrap_or(controller_start);
    // The predicates above flip just *after* their threshold.
    let tick = Duration::from_millis(1);
    let grace = grace(last_seen, cfg);
    let wait = cfg.fence + cfg.fence_margin;
    [
        from.checked_add(cfg.not_ready_after + tick),
        from.checked_add(cfg.not_ready_after + grace + tick),
        from.checked_add(cfg.dead_after + grace + tick),
        from.checked_add(wait + grace + tick),
        suspected.and_then(|s| s.checked_add(wait + tick)),
    ]
    .into_iter()
    .flatten()
    .filter(|t| *t > now)
    .min()
}

/// What the leader knows of one node for [`suspicions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// The node.
    pub node: String,
    /// Silent long enough to be suspected ([`suspect`]).
    pub suspect: bool,
    /// Heard lately, on a link to this leader: a suspicion of it is over.
    pub back: bool,
}

/// The suspicions to write and delete (see [`HealthConfig`]): a suspect node not yet
/// suspected gets one; a suspicion of a node that is back, or no longer exists, goes.
/// Each write expects what the snapshot holds, so a pass that raced another writer
/// decides again. Returns the change and the nodes newly suspected, whose links the
/// leader closes once it is committed.
pub fn suspicions(
    snap: &Snapshot,
    heard: &[Heard],
    by: &str,
    now: DateTime<Utc>,
    cfg: &HealthConfig,
) -> (Change, Vec<String>) {
    let mut writes = Vec::new();
    let mut drafts = Vec::new();
    let mut newly = Vec::new();
    for h in heard {
        let held = snap.suspects.get(&h.node);
        match held {
            None if h.suspect && snap.nodes.contains_key(&h.node) => {
                writes.push(Write {
                    key: model::suspect_key(&h.node),
                    expect: Expect::Absent,
                    value: Some(Item::Suspect(Suspicion {
                        node: h.node.clone(),
                        by: by.to_string(),
                        at: now,
                    })),
                });
                drafts.push(Draft::warning(
                    format!("node/{}", h.node),
                    "NodeSuspected",
                    format!(
                        "silent; no controller vouches for it now, and its Wallets count as stopped in {}",
                        bramble_api::duration::Duration::from(cfg.fence + cfg.fence_margin)
                    ),
                ));
                newly.push(h.node.clone());
            }
            Some(v) if h.back => writes.push(Write {
                key: model::suspect_key(&h.node),
                expect: Expect::Rev(v.rev),
                value: None,
            }),
            _ => {}
        }
    }
    // Suspicions of nodes that were deleted.
    for (node, v) in &snap.suspects {
        if !snap.nodes.contains_key(node) {
            writes.push(Write {
                key: model::suspect_key(node),
                expect: Expect::Rev(v.rev),
                value: None,
            });
        }
    }
    (Change::new(writes, drafts), newly)
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
        assert!(!wallets_fenced(None, t0, Some(t0), t0 + fenced, &cfg));
        assert!(wallets_fenced(
            None,
            t0,
            Some(t0),
            t0 + fenced + Duration::from_millis(1),
            &cfg
        ));
        // Suspected only after the grace too.
        let suspect_at = cfg.not_ready_after + cfg.startup_grace;
        assert!(!suspect(None, t0, t0 + suspect_at, &cfg));
        assert!(suspect(
            None,
            t0,
            t0 + suspect_at + Duration::from_millis(1),
            &cfg
        ));
    }

    #[test]
    fn wallets_count_as_fenced_only_after_fence_plus_margin_of_silence_and_of_suspicion() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Silent since 0, suspected at 1001 (the first instant it may be).
        assert!(!suspect(Some(t0), t0, at(1000), &cfg));
        assert!(suspect(Some(t0), t0, at(1001), &cfg));
        let s = Some(at(1001));
        assert!(
            !wallets_fenced(Some(t0), t0, s, at(3001), &cfg),
            "silence alone is not enough"
        );
        assert!(!wallets_fenced(Some(t0), t0, s, at(4001), &cfg));
        assert!(wallets_fenced(Some(t0), t0, s, at(4002), &cfg));
        // Never without a suspicion, however long the silence.
        assert!(!wallets_fenced(Some(t0), t0, None, at(60_000), &cfg));
        // A suspicion of a node heard again lately: not fenced.
        assert!(!wallets_fenced(Some(at(9000)), t0, s, at(9500), &cfg));
        // After a controller restart the clock starts at the restart.
        assert!(!wallets_fenced(
            None,
            at(10_000),
            Some(at(10_000)),
            at(12_000),
            &cfg
        ));
    }

    #[test]
    fn a_follower_vouches_only_with_a_fresh_view_a_heard_node_and_no_suspicion() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(may_vouch(Some(t0), t0, false, at(500), &cfg));
        assert!(
            !may_vouch(Some(t0), t0, false, at(501), &cfg),
            "view too old"
        );
        assert!(!may_vouch(None, t0, false, at(0), &cfg), "never fresh");
        assert!(!may_vouch(Some(t0), t0, true, at(0), &cfg), "suspected");
        assert!(
            !may_vouch(Some(at(1500)), t0, false, at(1500), &cfg),
            "node silent"
        );
        assert!(may_vouch(Some(at(1500)), at(500), false, at(1500), &cfg));
    }

    #[test]
    fn the_last_vouch_is_heard_before_the_wallet_moves() {
        // The timeline of the argument on HealthConfig, worst case, for delays up to
        // 150 ms: the suspicion commit returns at S; a follower's last vouch rests on
        // a read sent just before S and goes out at S + R; the agent hears it d later
        // and is stopped g + k after its fence ran out.
        let cfg = HealthConfig::default();
        let (g, k) = (Duration::from_millis(100), Duration::from_millis(700));
        for d_ms in [0u64, 50, 100, 150] {
            let d = Duration::from_millis(d_ms);
            let stopped = vouch_window(&cfg) + d + cfg.fence + g + k;
            let moved = cfg.fence + cfg.fence_margin;
            assert!(stopped < moved, "d = {d_ms} ms");
        }
        assert!(cfg.fence_margin > least_margin(&cfg));
    }

    #[test]
    fn defaults_fail_over_within_the_budgets() {
        let cfg = HealthConfig::default();
        // Services move when the node is Dead, Wallets when surely fenced; both leave
        // room for detection and a container start within 5 s.
        assert!(cfg.dead_after <= Duration::from_secs(2));
        assert!(cfg.fence + cfg.fence_margin <= Duration::from_secs(3));
        assert!(cfg.fence + cfg.fence_margin > cfg.dead_after);
        // A powered-off node's Wallet: suspected, then fence + margin.
        assert!(cfg.not_ready_after + cfg.fence + cfg.fence_margin <= Duration::from_secs(4));
    }

    #[test]
    fn the_next_change_is_the_next_threshold_crossed() {
        let cfg = HealthConfig::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let next = |now: u64, s: Option<Instant>| next_change(Some(t0), t0, s, at(now), &cfg);
        assert_eq!(next(0, None), Some(at(1001)), "NotReady and suspect first");
        assert_eq!(next(1001, None), Some(at(2001)), "then Dead");
        assert_eq!(next(2001, None), Some(at(3001)), "then silent long enough");
        assert_eq!(next(3001, None), None, "then nothing without a suspicion");
        assert_eq!(
            next(3001, Some(at(1010))),
            Some(at(4011)),
            "the suspicion's end"
        );
        assert_eq!(next(4011, Some(at(1010))), None);
        // At each instant returned, something has just changed.
        assert_eq!(status(Some(t0), t0, at(1001), &cfg), NodeStatus::NotReady);
        assert!(suspect(Some(t0), t0, at(1001), &cfg));
        assert_eq!(status(Some(t0), t0, at(2001), &cfg), NodeStatus::Dead);
        assert!(wallets_fenced(Some(t0), t0, Some(at(1010)), at(4011), &cfg));
        // A node not heard from since the controller started counts from the start,
        // with the startup grace.
        let grace = u64::try_from(cfg.startup_grace.as_millis()).expect("small");
        assert_eq!(
            next_change(None, at(500), None, at(600), &cfg),
            Some(at(1501))
        );
        assert_eq!(
            next_change(None, at(500), None, at(1501), &cfg),
            Some(at(1501 + grace))
        );
        assert_eq!(
            next_change(None, at(500), None, at(1501 + grace), &cfg),
            Some(at(2501 + grace))
        );
    }

    #[test]
    fn a_silent_node_is_suspected_once_and_cleared_when_back_or_gone() {
        use crate::core::model::{StoredNode, Versioned};
        use std::sync::Arc;
        let cfg = HealthConfig::default();
        let now = Utc::now();
        let mut snap = Snapshot::default();
        for n in ["pi1", "pi2"] {
            let stored = StoredNode {
                info: bramble_api::wire::NodeInfo {
                    mesh: None,
                    name: n.into(),
                    arch: bramble_api::manifest::Arch::Arm64,
                    cores: 4,
                    memory_bytes: 1 << 30,
                    docker_version: "24".into(),
                    labels: Default::default(),
                    agent_version: "0".into(),
                    os: String::new(),
                    machine_id: None,
                    memory_limits: None,
                    warnings: Vec::new(),
                },
                cordoned: false,
                registered_at: now,
                credential: None,
            };
            snap.nodes.insert(
                n.into(),
                Arc::new(Versioned {
                    value: stored,
                    rev: 3,
                    created: 3,
                }),
            );
        }
        let heard = |node: &str, suspect: bool, back: bool| Heard {
            node: node.into(),
            suspect,
            back,
        };
        // pi1 silent, pi2 fine: one suspicion, with an event, expecting no key yet.
        let (c, newly) = suspicions(
            &snap,
            &[heard("pi1", true, false), heard("pi2", false, true)],
            "ctl",
            now,
            &cfg,
        );
        assert_eq!(newly, ["pi1"]);
        assert_eq!(c.writes.len(), 1);
        assert_eq!(c.writes[0].key, "/suspects/pi1");
        assert!(matches!(c.writes[0].expect, Expect::Absent));
        assert_eq!(c.drafts[0].reason, "NodeSuspected");
        // Once stored, nothing more while it stays silent: no writes at rest.
        let susp = Suspicion {
            node: "pi1".into(),
            by: "ctl".into(),
            at: now,
        };
        snap.suspects.insert(
            "pi1".into(),
            Arc::new(Versioned {
                value: susp,
                rev: 7,
                created: 7,
            }),
        );
        let (c, newly) = suspicions(&snap, &[heard("pi1", true, false)], "ctl", now, &cfg);
        assert!(c.is_empty() && newly.is_empty());
        // Heard again: the suspicion goes, compared on its revision.
        let (c, _) = suspicions(&snap, &[heard("pi1", false, true)], "ctl", now, &cfg);
        assert_eq!(c.writes.len(), 1);
        assert!(c.writes[0].value.is_none());
        assert!(matches!(c.writes[0].expect, Expect::Rev(7)));
        // Not silent long enough but not back either (NotReady between the two): kept.
        let (c, _) = suspicions(&snap, &[heard("pi1", false, false)], "ctl", now, &cfg);
        assert!(c.is_empty());
        // The node was deleted: its suspicion goes too; an unknown node is never suspected.
        snap.nodes.remove("pi1");
        let (c, newly) = suspicions(&snap, &[heard("ghost", true, false)], "ctl", now, &cfg);
        assert!(newly.is_empty());
        assert_eq!(c.writes.len(), 1);
        assert_eq!(c.writes[0].key, "/suspects/pi1");
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
    fn default_margin_covers_the_vouch_window_check_and_stop() {
        // The inequality documented on HealthConfig, with a one-way delay of 100 ms.
        let cfg = HealthConfig::default();
        let needed = vouch_window(&cfg) + Duration::from_millis(100 + 100 + 700);
        assert!(cfg.fence_margin > needed);
    }
}
