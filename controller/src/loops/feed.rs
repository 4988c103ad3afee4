//! The dashboard's live feed, as Server-Sent Events (`text/event-stream`; the HTTP
//! side is `GET /v1/stream`). On connect a client gets one `snapshot` event with
//! everything (nodes with their hour of history, tasks, workloads, cron jobs, recent
//! events and its role); then, pushed as they change: `nodes` (every card, when a node
//! comes or goes), `nodedelta` (per node, only the fields that changed: at once when
//! its health, cordon, warnings or history point change, its metrics at most every
//! [`METRICS_EVERY`]), `tasks`, `workloads`, `cronjobs` (full lists, when the store
//! changed) and `events` (new ones only). No polling by the client, no reloads. At rest a
//! node costs the stream one small delta per 10-second history point, whatever its
//! heartbeat rate.
//!
//! One publisher task ([`run`]) computes and serializes every frame once and hands the
//! same bytes to every client, and only while someone is connected. Each client has a
//! small bounded queue; a client that cannot keep up (its queue is full) is dropped
//! rather than buffered for: its browser reconnects and starts over from a snapshot.
//! So the controller's memory does not grow with slow or many tabs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::rest::Event;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};

use super::cards::{self, CronRow, HistoryView, NodeCard, TaskRow, WorkloadRow};
use crate::core::{cron, views, Snapshot};
use crate::state::State;

/// Frames queued per client before it counts as too slow and is dropped.
pub const CLIENT_QUEUE: usize = 32;

/// Streams open at once; more are refused so tabs cannot exhaust a Pi.
pub const MAX_CLIENTS: usize = 32;

/// How often the publisher looks for news.
pub const TICK: Duration = Duration::from_secs(1);

/// A node's metrics (CPU, memory, load, temperature, disks, per-task usage, last
/// seen) are sent at most this often: the sparklines' step, so each delta carries
/// the newest point with the figures it sums up.
pub const METRICS_EVERY: Duration = Duration::from_secs(10);

/// Card fields that change with every heartbeat; see [`METRICS_EVERY`].
const METRIC_FIELDS: [&str; 10] = [
    "lastSeen",
    "cpu",
    "perCore",
    "memUsed",
    "memAvailable",
    "load",
    "temp",
    "dataDisk",
    "dockerDisk",
    "usage",
];

/// Send a comment line after this much silence, so proxies keep the connection.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Events in a snapshot.
const RECENT_EVENTS: usize = 50;

/// An SSE frame: `event: NAME`, one `data:` line of JSON, a blank line.
pub fn frame(event: &str, data: &impl Serialize) -> Bytes {
    // serde_json's compact form never contains a raw newline, so one data line holds it.
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

/// The first event a client gets.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Opening {
    /// `admin` or `viewer`: the page hides actions a viewer may not take.
    pub role: &'static str,
    /// Controller release.
    pub version: &'static str,
    /// Node cards.
    pub nodes: Vec<NodeCard>,
    /// Per node, its hour of history.
    pub history: BTreeMap<String, HistoryView>,
    /// Tasks.
    pub tasks: Vec<TaskRow>,
    /// Workloads.
    pub workloads: Vec<WorkloadRow>,
    /// Cron jobs.
    pub cronjobs: Vec<CronRow>,
    /// The newest events, oldest first.
    pub events: Vec<Event>,
}

/// Why a client cannot join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// [`MAX_CLIENTS`] streams are open.
    #[error("too many dashboard streams open ({MAX_CLIENTS}); close a tab")]
    TooMany,
    /// The stream closed before its first frame.
    #[error("the stream closed at once")]
    Closed,
}

#[derive(Default)]
struct Inner {
    clients: Vec<mpsc::Sender<Bytes>>,
    /// The newest events, kept under the same lock as the clients so a new client's
    /// snapshot and the events published after it never overlap or leave a gap.
    recent: VecDeque<Event>,
}

/// The connected dashboard clients.
#[derive(Default)]
pub struct Feed {
    inner: Mutex<Inner>,
    /// Set when a client joins: resend the lists on the next tick even if unchanged,
    /// since its snapshot may predate a change the others already got.
    resync: AtomicBool,
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams open now.
    pub fn clients(&self) -> usize {
        self.lock().clients.len()
    }

    /// Sends a frame to every client; drops those whose queue is full or gone.
    pub fn broadcast(&self, frame: &Bytes) {
        let mut inner = self.lock();
        let before = inner.clients.len();
        inner
            .clients
            .retain(|tx| tx.try_send(frame.clone()).is_ok());
        let dropped = before - inner.clients.len();
        if dropped > 0 {
            tracing::debug!(
                dropped,
                left = inner.clients.len(),
                "dashboard clients gone or too slow"
            );
        }
    }

    /// Publishes new events: remembered for snapshots, then sent.
    fn publish_events(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let f = frame("events", &events);
        let mut inner = self.lock();
        for e in events {
            if inner.recent.len() == RECENT_EVENTS {
                inner.recent.pop_front();
            }
            inner.recent.push_back(e);
        }
        inner.clients.retain(|tx| tx.try_send(f.clone()).is_ok());
    }

    /// Adds a client whose first frame is the opening `build` makes with the recent
    /// events; refuses when [`MAX_CLIENTS`] are connected.
    pub fn join(
        &self,
        build: impl FnOnce(Vec<Event>) -> Bytes,
    ) -> Result<mpsc::Receiver<Bytes>, JoinError> {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let mut inner = self.lock();
        if inner.clients.len() >= MAX_CLIENTS {
            return Err(JoinError::TooMany);
        }
        let opening = build(inner.recent.iter().cloned().collect());
        tx.try_send(opening).map_err(|_| JoinError::Closed)?;
        inner.clients.push(tx);
        drop(inner);
        self.resync.store(true, Ordering::Relaxed);
        Ok(rx)
    }

    /// Ends every stream (on shutdown: an open stream would hold the server's
    /// graceful shutdown forever).
    pub fn close_all(&self) {
        self.lock().clients.clear();
    }
}

/// Node cards with their newest history points.
pub fn node_cards(state: &State, snap: &Snapshot) -> Vec<NodeCard> {
    views::nodes(snap, |n| state.live.view(n))
        .iter()
        .map(|n| cards::node_card(n, state.history.last(&n.info.name)))
        .collect()
}

/// The lists every client shows, computed once per change for all of them.
pub struct Lists {
    /// Task rows.
    pub tasks: Vec<TaskRow>,
    /// Workload rows.
    pub workloads: Vec<WorkloadRow>,
    /// Cron job rows.
    pub cronjobs: Vec<CronRow>,
}

/// The lists of a snapshot.
pub fn lists(snap: &Snapshot) -> Lists {
    let now = chrono::Utc::now();
    let tasks = views::tasks(snap, None, None, None);
    Lists {
        tasks: cards::task_rows(&tasks, now),
        workloads: cards::workload_rows(&views::workloads(snap, None)),
        cronjobs: cards::cron_rows(&cron::views(snap, now), &tasks),
    }
}

/// The opening frame for a client with `role`.
pub fn opening(state: &State, role: &'static str, recent: Vec<Event>) -> Bytes {
    let snap = state.snapshot();
    let nodes = node_cards(state, &snap);
    let history = nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                cards::history_view(&state.history.points(&n.name)),
            )
        })
        .collect();
    let l = lists(&snap);
    frame(
        "snapshot",
        &Opening {
            role,
            version: bramble_api::VERSION,
            nodes,
            history,
            tasks: l.tasks,
            workloads: l.workloads,
            cronjobs: l.cronjobs,
            events: recent,
        },
    )
}

/// A node card as JSON fields, as the client holds it.
pub type CardFields = serde_json::Map<String, serde_json::Value>;

/// What the clients hold of one node, and when its metrics were last sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentCard {
    /// The card's fields as last sent.
    pub fields: CardFields,
    /// When its metrics were last sent.
    pub metrics_at: tokio::time::Instant,
}

/// What to send about the nodes this tick.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeNews {
    /// Nothing changed that is due.
    Nothing,
    /// Every card (a node came or went): the `nodes` event.
    All(Vec<CardFields>),
    /// Per changed node, its name and the fields that changed (null: the field is
    /// gone): the `nodedelta` event.
    Deltas(Vec<CardFields>),
}

/// What the clients should be sent about the nodes, given what they hold (`sent`,
/// updated to what they will hold) and the cards now, in order. Pure: the clock is an
/// argument.
pub fn node_news(
    sent: &mut BTreeMap<String, SentCard>,
    cards: Vec<CardFields>,
    now: tokio::time::Instant,
) -> NodeNews {
    let name = |c: &CardFields| {
        c.get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let same_nodes = cards.len() == sent.len() && cards.iter().all(|c| sent.contains_key(&name(c)));
    if !same_nodes {
        sent.clear();
        for c in &cards {
            sent.insert(
                name(c),
                SentCard {
                    fields: c.clone(),
                    metrics_at: now,
                },
            );
        }
        return NodeNews::All(cards);
    }
    let mut deltas = Vec::new();
    for card in cards {
        let Some(last) = sent.get_mut(&name(&card)) else {
            continue;
        };
        let changed = |k: &str| card.get(k) != last.fields.get(k);
        let keys: BTreeSet<&String> = card.keys().chain(last.fields.keys()).collect();
        let urgent = keys
            .iter()
            .any(|k| !METRIC_FIELDS.contains(&k.as_str()) && changed(k));
        let metrics_due = now.duration_since(last.metrics_at) >= METRICS_EVERY;
        let metrics = METRIC_FIELDS.iter().any(|k| changed(k));
        if !(urgent || (metrics && metrics_due)) {
            continue;
        }
        let mut delta = CardFields::new();
        delta.insert("name".into(), name(&card).into());
        for k in keys {
            if changed(k) {
                delta.insert(
                    k.clone(),
                    card.get(k).cloned().unwrap_or(serde_json::Value::Null),
                );
            }
        }
        if metrics {
            last.metrics_at = now;
        }
        last.fields = card;
        deltas.push(delta);
    }
    if deltas.is_empty() {
        NodeNews::Nothing
    } else {
        NodeNews::Deltas(deltas)
    }
}

/// What the publisher last sent, to skip unchanged lists.
#[derive(Default)]
struct Sent {
    revision: u64,
    nodes: BTreeMap<String, SentCard>,
    tasks: Bytes,
    workloads: Bytes,
    cronjobs: Bytes,
}

/// The publisher: once per [`TICK`], while clients are connected, sends node cards if
/// they changed (a silent node's status changes without any heartbeat), the lists if
/// the store changed, and the events recorded since the last tick. Ends all streams on
/// `stop`.
pub async fn run(state: Arc<State>, feed: Arc<Feed>, mut stop: watch::Receiver<bool>) {
    let mut events = state.subscribe_events();
    // Seed the snapshot's recent events from the store, so a fresh controller's first
    // visitor still sees what happened before it started.
    {
        let stored: Vec<Event> = state.snapshot().events().collect();
        let from = stored.len().saturating_sub(RECENT_EVENTS);
        feed.lock().recent = stored[from..].iter().cloned().collect();
    }
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<Event> = Vec::new();
    let mut sent = Sent::default();
    let mut quiet = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            e = events.recv() => match e {
                Ok(e) => pending.push(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "dashboard feed missed events");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = ticker.tick() => {
                feed.publish_events(std::mem::take(&mut pending));
                if feed.clients() == 0 {
                    sent = Sent::default();
                    continue;
                }
                if publish(&state, &feed, &mut sent) {
                    quiet = tokio::time::Instant::now();
                }
                if quiet.elapsed() >= KEEPALIVE {
                    feed.broadcast(&Bytes::from_static(b": keepalive\n\n"));
                    quiet = tokio::time::Instant::now();
                }
            }
        }
    }
    feed.close_all();
}

/// One tick's frames; whether anything was sent.
fn publish(state: &State, feed: &Feed, sent: &mut Sent) -> bool {
    let resync = feed.resync.swap(false, Ordering::Relaxed);
    let snap = state.snapshot();
    let cards: Vec<CardFields> = node_cards(state, &snap)
        .iter()
        .filter_map(|c| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect();
    if resync {
        // A new client's snapshot may predate what the others hold: everyone gets all.
        sent.nodes.clear();
    }
    let mut any = false;
    match node_news(&mut sent.nodes, cards, tokio::time::Instant::now()) {
        NodeNews::Nothing => {}
        NodeNews::All(cards) => {
            feed.broadcast(&frame("nodes", &cards));
            any = true;
        }
        NodeNews::Deltas(deltas) => {
            feed.broadcast(&frame("nodedelta", &deltas));
            any = true;
        }
    }
    if snap.revision == sent.revision && !resync {
        return any;
    }
    sent.revision = snap.revision;
    let l = lists(&snap);
    for (name, bytes, last) in [
        ("tasks", frame("tasks", &l.tasks), &mut sent.tasks),
        (
            "workloads",
            frame("workloads", &l.workloads),
            &mut sent.workloads,
        ),
        (
            "cronjobs",
            frame("cronjobs", &l.cronjobs),
            &mut sent.cronjobs,
        ),
    ] {
        if resync || bytes != *last {
            tracing::trace!(list = name, bytes = bytes.len(), "dashboard list changed");
            feed.broadcast(&bytes);
            *last = bytes;
            any = true;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_one_event_with_one_data_line() {
        let f = frame("tasks", &serde_json::json!({"a": "x\ny"}));
        assert_eq!(&f[..], b"event: tasks\ndata: {\"a\":\"x\\ny\"}\n\n");
    }

    fn card(name: &str, status: &str, cpu: f64, point: i64) -> CardFields {
        match serde_json::json!({"name": name, "status": status, "cpu": cpu, "lastSeen": cpu.to_string(), "point": [point, 1.0, 1, null]})
        {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        }
    }

    #[test]
    fn node_news_sends_all_cards_when_nodes_come_or_go_and_deltas_otherwise() {
        let t0 = tokio::time::Instant::now();
        let mut sent = BTreeMap::new();
        let first = vec![card("a", "Ready", 1.0, 0), card("b", "Ready", 2.0, 0)];
        assert_eq!(
            node_news(&mut sent, first.clone(), t0),
            NodeNews::All(first)
        );
        // Same cards: nothing.
        let same = vec![card("a", "Ready", 1.0, 0), card("b", "Ready", 2.0, 0)];
        assert_eq!(node_news(&mut sent, same, t0), NodeNews::Nothing);
        // Metrics changed one second later: not due yet.
        let t1 = t0 + Duration::from_secs(1);
        let busier = vec![card("a", "Ready", 9.0, 0), card("b", "Ready", 2.0, 0)];
        assert_eq!(node_news(&mut sent, busier.clone(), t1), NodeNews::Nothing);
        // A health change goes at once, with the metrics that changed meanwhile.
        let suspect = vec![card("a", "Ready", 9.0, 0), card("b", "Suspect", 2.0, 0)];
        assert_eq!(
            node_news(&mut sent, suspect.clone(), t1),
            NodeNews::Deltas(vec![
                match serde_json::json!({"name": "b", "status": "Suspect"}) {
                    serde_json::Value::Object(m) => m,
                    _ => unreachable!(),
                }
            ])
        );
        // Metrics are due after METRICS_EVERY: only a's changed fields go.
        let t2 = t0 + METRICS_EVERY;
        match node_news(&mut sent, suspect.clone(), t2) {
            NodeNews::Deltas(d) => {
                assert_eq!(d.len(), 1);
                assert_eq!(d[0]["name"], "a");
                assert_eq!(d[0]["cpu"], 9.0);
                assert_eq!(d[0]["lastSeen"], "9");
                assert!(!d[0].contains_key("status") && !d[0].contains_key("point"));
            }
            other => panic!("a delta for a: {other:?}"),
        }
        // A new history point is not held back, and a field that went is sent as null.
        let mut pointed = card("a", "Ready", 9.0, 10);
        pointed.remove("lastSeen");
        let next = vec![pointed, card("b", "Suspect", 2.0, 0)];
        match node_news(&mut sent, next, t2 + Duration::from_millis(10)) {
            NodeNews::Deltas(d) => {
                assert_eq!(d[0]["point"], serde_json::json!([10, 1.0, 1, null]));
                assert_eq!(d[0]["lastSeen"], serde_json::Value::Null);
            }
            other => panic!("a delta for a's point: {other:?}"),
        }
        // A node gone: every card again.
        let fewer = vec![card("a", "Ready", 9.0, 10)];
        assert!(matches!(node_news(&mut sent, fewer, t2), NodeNews::All(c) if c.len() == 1));
        assert_eq!(sent.len(), 1);
    }

    #[tokio::test]
    async fn slow_clients_are_dropped_not_buffered_for() {
        let feed = Feed::default();
        let mut fast = feed.join(|_| frame("snapshot", &1)).expect("joins");
        let slow = feed.join(|_| frame("snapshot", &1)).expect("joins");
        assert_eq!(feed.clients(), 2);
        let f = frame("nodes", &[1, 2, 3]);
        for _ in 0..CLIENT_QUEUE + 5 {
            feed.broadcast(&f);
            // The fast client reads as frames come.
            while fast.try_recv().is_ok() {}
        }
        assert_eq!(feed.clients(), 1, "the slow client is dropped");
        drop(slow);
        drop(fast);
        feed.broadcast(&f);
        assert_eq!(feed.clients(), 0, "closed clients are forgotten");
    }

    #[tokio::test]
    async fn a_new_client_gets_recent_events_then_only_newer_ones() {
        let feed = Feed::default();
        let ev = |seq| Event {
            seq,
            at: chrono::DateTime::UNIX_EPOCH,
            severity: bramble_api::rest::Severity::Normal,
            object: "node/pi1".into(),
            reason: "Cordoned".into(),
            message: String::new(),
        };
        feed.publish_events((1..=60).map(ev).collect());
        let mut rx = feed
            .join(|events| {
                assert_eq!(events.len(), RECENT_EVENTS);
                assert_eq!(events.first().map(|e| e.seq), Some(11));
                frame("snapshot", &events.len())
            })
            .expect("joins");
        feed.publish_events(vec![ev(61)]);
        let first = rx.try_recv().expect("snapshot");
        assert!(first.starts_with(b"event: snapshot\n"));
        let next = rx.try_recv().expect("events");
        assert!(
            next.starts_with(b"event: events\n") && next.windows(8).any(|w| w == b"\"seq\":61")
        );
        for _ in 0..MAX_CLIENTS {
            let _ = feed.join(|_| Bytes::new());
        }
        assert_eq!(
            feed.join(|_| Bytes::new()).expect_err("bounded"),
            JoinError::TooMany
        );
    }
}
