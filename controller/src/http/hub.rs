//! The `/v1/agent` WebSocket: one per node, opened by the agent. See `bramble_api::wire`.
//!
//! Per connection, three tasks:
//! - the reader notes every frame (a heartbeat touches memory only), hands log frames to
//!   their streams and queues task reports in order;
//! - the reporter writes the reports through the state layer, each retried until it is
//!   written: a report is never dropped. If they back up (the store is down), the link
//!   is closed, and the agent's next Hello carries every task's state again;
//! - the writer sends keep-alives (an agent that hears nothing fences its Wallets), the
//!   controller's requests, and the node's task set whenever it changes in the snapshot
//!   (level-triggered: every controller sharing the store serves its agents the same
//!   way).
//!
//! A controller that does not lead serves *standby* links to agents that ask for one
//! (the [`STANDBY_HEADER`] and Hello's `standby`): no task set and no reports, only the
//! agent's heartbeats one way and, every heartbeat, a Vouch the other while
//! `core::health::may_vouch` allows it. That is what keeps a node's Wallets running
//! while the leader is lost. When the follower becomes the leader it closes them, and
//! the agents dial again for a leader's link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bramble_api::backoff::{Backoff, Retry};
use bramble_api::wire::{
    self, AgentMessage, ControllerMessage, NodeInfo, TaskStatus, MAX_FRAME_BYTES,
};
use chrono::{DateTime, Utc};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::auth::{credential_hash, Role};
use super::App;
use crate::core::ops::Admission;
use crate::core::{health, ops, reconcile, volumes, Change, DomainError};
use crate::state::history::Sample;
use crate::state::live::Connection;
use crate::state::logs::{ExecEvent, LogEvent};
use crate::state::vault::Vault;
use crate::state::{Scope, State as ClusterState};

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Read and write buffer of an agent link (frames larger than it still pass).
const LINK_BUFFER: usize = 8 << 10;

/// What a controller sends an agent every heartbeat to show it is there: an
/// unsolicited Pong, which RFC 6455 (5.5.3) allows as a one-way heartbeat. A Ping would
/// do as much for the agent's fence, which counts every frame of the link (every agent
/// version has), but each agent's WebSocket answers a Ping with a Pong: a third frame
/// per heartbeat that the Pi encrypted and sent and the controller read and dropped.
const KEEP_ALIVE: Message = Message::Pong(axum::body::Bytes::new());

/// Reports queued per node before the link is closed for the agent to resend.
const REPORT_QUEUE: usize = 1024;

/// How a report that cannot be written is retried.
const REPORT_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The upgrade request header by which an agent asks a follower for a standby link
/// rather than a refusal (an older agent, which would count any frame against its
/// fence, does not send it).
pub const STANDBY_HEADER: &str = "x-bramble-standby";

/// The most agent links served at once: the node cap, and room for reconnects that
/// overlap the links they replace.
pub const MAX_AGENT_LINKS: usize = crate::core::ops::MAX_NODES + 32;

/// Upgrades to the agent protocol. The bearer is the join token (a first join) or the
/// node's own credential: which node that is is settled here, before the upgrade.
pub async fn agent(
    State(app): State<Arc<App>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let admission = match super::role(&app, &headers) {
        Some(Role::Node) => match super::node_of(&app, &headers) {
            Some(name) => Admission::Node(name),
            None => return super::ApiError::unauthorized().into_response(),
        },
        _ => Admission::Join,
    };
    // Only the leader hears agents for node health, and so every decision to move a
    // Wallet rests on one controller's view of the links. Followers serve standby
    // links, to agents that ask for them.
    let wants_standby = headers
        .get(STANDBY_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if !app.state.is_leading() && !wants_standby {
        return super::ApiError::not_leader(
            "this controller is not the leader; agents try the next controller (--controller URL,URL)",
        )
        .into_response();
    }
    // Each link may hold a frame of up to MAX_FRAME_BYTES while it arrives: links are
    // capped so that what they can hold at once is bounded.
    let Ok(permit) = Arc::clone(&app.links).try_acquire_owned() else {
        tracing::warn!(peer = %addr, "too many agent links; refusing one");
        return super::ApiError::unavailable(format!(
            "this controller serves at most {MAX_AGENT_LINKS} agent links at once"
        ))
        .into_response();
    };
    // Small buffers: a link carries heartbeats of a few KiB, and the 128 KiB defaults,
    // allocated per link, were most of a controller's memory with a hundred nodes.
    ws.max_message_size(MAX_FRAME_BYTES)
        .read_buffer_size(LINK_BUFFER)
        .write_buffer_size(LINK_BUFFER)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            serve(socket, app, addr, admission, wants_standby).await
        })
}

async fn send_error(socket: &mut WebSocket, code: &str, message: String) {
    tracing::warn!(code = %code, message = %message, "refusing agent");
    let frame = wire::encode(&ControllerMessage::Error {
        code: code.into(),
        message,
    });
    let _ = socket.send(Message::Text(frame.into())).await;
    let _ = socket.close().await;
}

/// What a Hello says.
struct Hello {
    node: NodeInfo,
    /// The tasks it has.
    tasks: Vec<TaskStatus>,
    /// The hash of its credential.
    credential: Option<String>,
    /// Whether the agent can keep a standby link.
    standby: bool,
    /// Its certificate request.
    csr: Option<String>,
    /// What it can take.
    wants: Wants,
}

async fn hello(socket: &mut WebSocket) -> Result<Hello, (String, String)> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, socket.recv())
        .await
        .map_err(|_| ("timeout".to_string(), "no hello within 10s".to_string()))?;
    let text = match first {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(_)) => {
            return Err((
                "bad_message".into(),
                "expected a text frame with hello".into(),
            ))
        }
        Some(Err(e)) => return Err(("bad_message".into(), e.to_string())),
        None => return Err(("closed".into(), "closed before hello".into())),
    };
    match wire::decode_agent(text.as_str()) {
        // A bad name has its own code: the agent tells its operator to rename the node.
        Err(wire::WireError::Invalid(f)) if f.field == "node.name" => {
            Err(("bad_node_name".into(), format!("node name: {}", f.problem)))
        }
        Ok(AgentMessage::Hello {
            node,
            tasks,
            credential,
            standby,
            csr,
            not_before,
            endpoint_changes,
        }) => Ok(Hello {
            node,
            tasks,
            credential: credential.map(|c| credential_hash(&c.0)),
            standby,
            csr,
            wants: Wants {
                waits: not_before,
                endpoint_changes,
            },
        }),
        Ok(_) => Err((
            "bad_message".into(),
            "the first message must be hello".into(),
        )),
        Err(e @ wire::WireError::Version { .. }) => {
            Err(("unsupported_version".into(), e.to_string()))
        }
        Err(e) => Err(("bad_message".into(), e.to_string())),
    }
}

/// What an agent reports about its tasks, written in the order it came.
#[derive(Debug)]
enum Report {
    /// A task's state.
    Status(TaskStatus),
    /// A task's container is gone.
    Removed(String),
    /// After Hello: stopped tasks the node no longer has are gone for good.
    Present(Vec<TaskStatus>),
    /// What a volume report means.
    Events(Vec<crate::core::events::Draft>),
}

#[tracing::instrument(skip_all, fields(addr = %addr))]
async fn serve(
    mut socket: WebSocket,
    app: Arc<App>,
    addr: SocketAddr,
    admission: Admission,
    wants_standby: bool,
) {
    let state = Arc::clone(&app.state);
    let Hello {
        node,
        tasks,
        credential,
        standby: standby_ok,
        csr,
        wants,
    } = match hello(&mut socket).await {
        Ok(h) => h,
        Err((code, msg)) => return send_error(&mut socket, &code, msg).await,
    };
    let name = node.name.clone();
    // Decided once, here: leadership may have changed since the upgrade.
    let standby = !state.is_leading();
    if standby && !(wants_standby && standby_ok) {
        return send_error(
            &mut socket,
            "not_leader",
            "this controller is not the leader; agents try the next controller (--controller URL,URL)".into(),
        )
        .await;
    }
    let registered = state
        .snapshot()
        .nodes
        .get(&name)
        .and_then(|n| n.value.info.machine_id.clone());
    if let Some(msg) = name_in_use(
        &name,
        !standby && state.live.connection(&name).is_some(),
        registered.as_deref(),
        node.machine_id.as_deref(),
    ) {
        return send_error(&mut socket, "name_in_use", msg).await;
    }
    // Heard now, before the registration commit wakes the loops: a node joining (or
    // back) must not look silent since this controller's start to the pass that the
    // commit triggers (it would be suspected and its link closed at once). Only for
    // the node's own credential or a name not yet taken: a join token must not keep
    // someone else's silent node alive.
    let known = state.snapshot().nodes.contains_key(&name);
    if !known || matches!(&admission, Admission::Node(n) if *n == name) {
        state.live.seen(&name, None);
    }
    let now = Utc::now();
    let registering = state
        .update("node registration", Scope::Any, |snap| {
            let change = ops::register_node(snap, &node, credential.as_deref(), &admission, now)?;
            Ok((change.unwrap_or_default(), ()))
        })
        .await;
    if registering.is_err() && !known {
        state.live.forget(&name);
    }
    match registering {
        Ok(()) => {}
        Err(crate::state::Error::Domain(DomainError::Conflict(msg))) => {
            return send_error(&mut socket, "name_taken", msg).await
        }
        Err(crate::state::Error::Domain(DomainError::Unavailable(msg))) => {
            return send_error(&mut socket, "cluster_full", msg).await
        }
        Err(crate::state::Error::Domain(e)) => {
            return send_error(&mut socket, "refused", e.to_string()).await
        }
        Err(e) => {
            return send_error(
                &mut socket,
                "internal",
                format!("cannot register node: {}", super::error::chain(&e)),
            )
            .await
        }
    }
    tracing::info!(node = %name, arch = %node.arch, cores = node.cores, memory = node.memory_bytes, "node registered");
    let health = *state.live.config();
    // Signed for the name just admitted (with the node's credential or the join
    // token), whatever the request asks.
    let certificate = csr.and_then(|csr| match app.nodes.sign(&csr, &name) {
        Ok(cert) => Some(cert),
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "cannot sign the node's agent-to-agent certificate request");
            None
        }
    });
    let welcome = ControllerMessage::Welcome {
        node: name.clone(),
        heartbeat_ms: u64::try_from(health.heartbeat.as_millis()).unwrap_or(u64::MAX),
        fence_ms: u64::try_from(health.fence.as_millis()).unwrap_or(u64::MAX),
        standby,
        ca: certificate.as_ref().map(|_| app.nodes.ca_pem().to_string()),
        certificate,
    };
    if socket
        .send(Message::Text(wire::encode(&welcome).into()))
        .await
        .is_err()
    {
        return;
    }
    if standby {
        return serve_standby(socket, &state, &name).await;
    }

    let (tx, rx) = mpsc::channel::<ControllerMessage>(256);
    let conn_id = state.next_id();
    state.live.connect(
        &name,
        Connection {
            id: conn_id,
            tx: tx.clone(),
            address: addr.ip().to_string(),
        },
    );
    drop(tx);
    tracing::info!(node = %name, tasks = tasks.len(), "agent connected");

    let (reports, report_rx) = mpsc::channel::<Report>(REPORT_QUEUE);
    let present = tasks.clone();
    for s in tasks {
        // The queue is empty and larger than any Hello the frame limit allows.
        let _ = reports.try_send(Report::Status(s));
    }
    let _ = reports.try_send(Report::Present(present));
    let reporter = tokio::spawn(reporter(
        Arc::clone(&state),
        name.clone(),
        conn_id,
        report_rx,
    ));
    state.wake();

    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(writer(
        Arc::clone(&state),
        Arc::clone(&app.vault),
        name.clone(),
        wants,
        sink,
        rx,
    ));

    // A link that stays silent past the dead timeout is dead even if TCP has not
    // noticed (a partition sends no reset). One timer, moved on only when it fires,
    // rather than one armed and dropped for every frame.
    let silence = health.dead_after;
    let mut heard = tokio::time::Instant::now();
    let mut last_beat: Option<LastBeat> = None;
    let quiet = tokio::time::sleep(silence);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            () = &mut quiet => {
                let due = heard + silence;
                if due > tokio::time::Instant::now() {
                    quiet.as_mut().reset(due);
                    continue;
                }
                tracing::info!(node = %name, "agent link silent; closing it");
                break;
            }
            frame = stream.next() => {
                heard = tokio::time::Instant::now();
                match frame {
                    Some(Ok(Message::Text(t))) => {
                        if repeated_beat(&state, &name, last_beat.as_ref(), &t) {
                            continue;
                        }
                        if !handle(&state, &name, &t, &reports, &mut last_beat) {
                            tracing::warn!(node = %name, "task reports backed up; closing the link so the agent resends them");
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => state.live.seen(&name, None),
                    Some(Ok(Message::Binary(_))) => tracing::warn!(node = %name, "ignoring binary frame"),
                    Some(Err(e)) => {
                        tracing::info!(node = %name, error = %e, "agent link failed");
                        break;
                    }
                }
            }
            _ = &mut writer => break,
        }
    }
    writer.abort();
    drop(reports);
    // Reports already queued are still written; the reporter ends when they are.
    drop(reporter);
    state.live.disconnect(&name, conn_id);
    tracing::info!(node = %name, "agent disconnected");
    state.wake();
}

/// A follower's standby link (see the module documentation): a keep-alive every
/// heartbeat ([`KEEP_ALIVE`]), so the agent knows the link is up, and a Vouch instead
/// whenever `health::may_vouch` allows.
/// Ends when the agent goes silent or closes, or when this controller becomes the
/// leader (the agent then dials it again for a leader's link).
async fn serve_standby(socket: WebSocket, state: &ClusterState, name: &str) {
    let cfg = *state.live.config();
    let (mut sink, mut stream) = socket.split();
    let mut leading = state.leading();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = std::time::Instant::now();
    let vouch = wire::encode(&ControllerMessage::Vouch);
    let mut vouching = false;
    tracing::info!(node = %name, "standby link up");
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = std::time::Instant::now();
                if now.saturating_duration_since(heard) > cfg.dead_after {
                    break "the agent went silent";
                }
                let suspected = state.snapshot().suspects.contains_key(name);
                let may = health::may_vouch(state.fresh_at(), heard, suspected, now, &cfg);
                if may != vouching {
                    vouching = may;
                    tracing::info!(node = %name, vouching, suspected, "standby link: vouching changed");
                }
                let frame = if may {
                    Message::Text(vouch.clone().into())
                } else {
                    KEEP_ALIVE
                };
                match tokio::time::timeout(cfg.fence, sink.send(frame)).await {
                    Ok(Ok(())) => {}
                    _ => break "the agent cannot be reached",
                }
            }
            changed = leading.changed() => {
                if changed.is_err() || *leading.borrow() {
                    break "this controller leads now: the agent dials again for a leader's link";
                }
            }
            frame = stream.next() => match frame {
                Some(Ok(Message::Close(_))) | None => break "closed by the agent",
                Some(Err(_)) => break "the link failed",
                // Heartbeats, reports (ignored: the leader takes them), pongs. Noted
                // in this follower's view of node health too (shown by its API and
                // dashboard; it decides nothing with it, and forgets it on leading).
                Some(Ok(_)) => {
                    heard = std::time::Instant::now();
                    state.live.seen(name, None);
                }
            },
        }
    };
    let _ = tokio::time::timeout(cfg.fence, sink.close()).await;
    tracing::info!(node = %name, why, "standby link closed");
}

/// A node's task set with its copy duties, as last sent.
#[derive(Debug, PartialEq)]
struct Assigned {
    tasks: Vec<bramble_api::wire::Assignment>,
    standby: Vec<bramble_api::wire::StandbyDuty>,
    epochs: std::collections::BTreeMap<String, u64>,
}

/// Who keeps copies of what (see [`volumes::duties`]), from the snapshot, the nodes'
/// health and their volume reports.
fn copy_duties(
    state: &ClusterState,
    snap: &crate::core::Snapshot,
    placed: &reconcile::Placed,
) -> volumes::Duties {
    if !placed.managed_volumes {
        return volumes::Duties::default();
    }
    let candidates: Vec<volumes::Candidate> = snap
        .nodes
        .values()
        .map(|n| volumes::Candidate {
            name: n.value.info.name.clone(),
            // Cordoned nodes keep copies: cordoning stops new tasks, and a standby that
            // holds a wallet's newest copy is worth most when the wallet must move.
            usable: state.live.status(&n.value.info.name) == bramble_api::rest::NodeStatus::Ready,
            arch: n.value.info.arch,
            labels: n.value.info.labels.clone(),
            mesh: n.value.info.mesh.clone(),
        })
        .collect();
    volumes::duties(snap, &candidates, &state.live.volumes())
}

/// What an agent's Hello says it can take.
#[derive(Debug, Clone, Copy)]
struct Wants {
    /// It waits for a run's `notBefore` (see [`reconcile::hold_back`]).
    waits: bool,
    /// It applies `EndpointChanges` to the table it was sent last.
    endpoint_changes: bool,
}

/// Sends keep-alives (on the shared beat, [`ClusterState::beats`]), the controller's
/// requests, and the node's task set when it changes.
async fn writer(
    state: Arc<ClusterState>,
    vault: Arc<Vault>,
    node: String,
    wants: Wants,
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<ControllerMessage>,
) {
    // Keep-alives tell the agent the controller is there: an agent that hears nothing
    // for the fence timeout stops its Wallets (see HealthConfig).
    let mut beats = state.beats();
    let mut world = state.subscribe();
    let mut sent: Option<Assigned> = None;
    let mut routed: Option<Arc<bramble_api::endpoints::Table>> = None;
    let mut volumes_changed = state.live.volumes_changed();
    // Whether the snapshot or the volume reports changed since the task set and the
    // endpoints were last computed. Only then are they computed again: pings and
    // requests go out every heartbeat, and recomputing a node's share of the whole
    // cluster for each of them made the controller's work at rest grow with nodes ×
    // tasks × heartbeat rate.
    let mut dirty = true;
    // When a run held back from an agent that would start it early is due.
    let mut held: Option<tokio::time::Instant> = None;
    let link = Link {
        state: &state,
        vault: &vault,
        node: &node,
        wants,
    };
    loop {
        if dirty {
            dirty = false;
            let snap = world.borrow_and_update().clone();
            volumes_changed.borrow_and_update();
            let Some(due) = link
                .send_changes(&snap, &mut sent, &mut routed, &mut sink)
                .await
            else {
                break;
            };
            held = due.map(|at| {
                let wait = (at - Utc::now()).to_std().unwrap_or_default();
                tokio::time::Instant::now() + wait
            });
        }
        let frame = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Message::Text(wire::encode(&m).into()),
                // The connection was replaced or dropped (all senders gone).
                None => break,
            },
            r = beats.changed() => match r {
                Ok(()) => KEEP_ALIVE,
                Err(_) => break,
            },
            r = world.changed() => match r {
                Ok(()) => {
                    dirty = true;
                    continue;
                }
                Err(_) => break,
            },
            r = volumes_changed.changed() => match r {
                Ok(()) => {
                    dirty = true;
                    continue;
                }
                Err(_) => break,
            },
            () = tokio::time::sleep_until(held.unwrap_or_else(tokio::time::Instant::now)), if held.is_some() => {
                held = None;
                dirty = true;
                continue;
            }
        };
        if sink.send(frame).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// One node's leader link, as its writer sees it.
struct Link<'a> {
    state: &'a ClusterState,
    vault: &'a Vault,
    node: &'a str,
    wants: Wants,
}

impl Link<'_> {
    /// Sends the node its task set and the endpoints table of `snap` if they differ
    /// from what it was last sent (`sent`, `routed`). `None` when the link is gone;
    /// else when a run held back from the task set is due (then it must be sent again).
    async fn send_changes(
        &self,
        snap: &crate::core::Snapshot,
        sent: &mut Option<Assigned>,
        routed: &mut Option<Arc<bramble_api::endpoints::Table>>,
        sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    ) -> Option<Option<DateTime<Utc>>> {
        let (state, vault, node) = (self.state, self.vault, self.node);
        let placed = state.placed(snap);
        let duties = copy_duties(state, snap, &placed);
        let mut tasks = reconcile::assignments_placed(snap, &placed, node, vault);
        let held = if self.wants.waits {
            None
        } else {
            reconcile::hold_back(&mut tasks, Utc::now())
        };
        for a in &mut tasks {
            a.sync_to = duties.sync_to.get(&a.task).cloned().unwrap_or_default();
            a.restore_from = duties.restore_from.get(&a.task).cloned();
        }
        let set = Assigned {
            tasks,
            standby: duties.standby.get(node).cloned().unwrap_or_default(),
            epochs: duties.epochs,
        };
        if sent.as_ref() != Some(&set) {
            let frame = wire::encode(&ControllerMessage::Assign {
                revision: snap.revision,
                tasks: set.tasks.clone(),
                standby: set.standby.clone(),
                epochs: set.epochs.clone(),
            });
            if sink.send(Message::Text(frame.into())).await.is_err() {
                return None;
            }
            tracing::debug!(node = %node, revision = snap.revision, tasks = set.tasks.len(), "task set sent");
            *sent = Some(set);
        }
        let routes = state.routes(snap);
        if !routed
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &routes.table))
        {
            // Encoded once for every link (see `State::routes`): the whole table on a
            // new link, else what changed since the table this link sent last.
            let frame = match routed.as_ref().filter(|_| self.wants.endpoint_changes) {
                Some(last) => routes.changes_frame(last),
                None => routes.frame.clone(),
            };
            let frame = Utf8Bytes::try_from(frame).expect("an encoded frame is UTF-8");
            if sink.send(Message::Text(frame)).await.is_err() {
                return None;
            }
            *routed = Some(routes.table);
        }
        Some(held)
    }
}

/// Writes a node's reports in order, each until it is written, while the connection
/// that made them is the node's current one (a newer connection's Hello carries every
/// task's state again).
async fn reporter(
    state: Arc<ClusterState>,
    node: String,
    conn_id: u64,
    mut reports: mpsc::Receiver<Report>,
) {
    while let Some(r) = reports.recv().await {
        let r = Arc::new(r);
        let mut retry = Retry::new(REPORT_RETRY);
        loop {
            // Grouped with other nodes' reports (each reads only the task it writes),
            // and in order for this node: the next is sent only once this one is in.
            let (report, node_) = (Arc::clone(&r), node.clone());
            let written = state
                .update_grouped(move |snap| decide_report(snap, &node_, &report, Utc::now()))
                .await;
            match written {
                Ok(()) => break,
                Err(e) => {
                    let current = state
                        .live
                        .connection(&node)
                        .is_some_and(|c| c.id == conn_id);
                    if !current && reports.is_closed() {
                        tracing::info!(node = %node, report = ?r, "dropping a report of a replaced link; the agent resends it");
                        break;
                    }
                    let wait = retry.failed_jittered(0.2, rand::random::<f64>());
                    tracing::warn!(node = %node, report = ?r, error = %super::error::chain(&e), retry_in = ?wait, "could not record a task report; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// What a node's report changes in the store.
fn decide_report(
    snap: &crate::core::Snapshot,
    node: &str,
    report: &Report,
    now: DateTime<Utc>,
) -> Change {
    let change = match report {
        Report::Status(s) => ops::task_status(snap, node, s, now),
        Report::Removed(id) => ops::task_removed(snap, node, id),
        Report::Present(present) => Some(ops::forget_missing(snap, node, present)),
        Report::Events(drafts) => Some(Change::events(drafts.clone())),
    };
    change.unwrap_or_default()
}

/// Why a Hello for node `name` must be refused: the name is connected now from an
/// agent on another machine (both machine ids known and different). Boards flashed
/// from one image would otherwise take turns being one node, each Hello replacing the
/// other's connection and task set. An unknown id on either side (an older agent)
/// gives the benefit of the doubt: the new connection replaces the old one, as before.
/// The answer never names the other machine's identity.
pub fn name_in_use(
    name: &str,
    connected: bool,
    current: Option<&str>,
    hello: Option<&str>,
) -> Option<String> {
    let current = current.filter(|s| !s.is_empty());
    let hello = hello.filter(|s| !s.is_empty());
    match (connected, current, hello) {
        (true, Some(theirs), Some(ours)) if theirs != ours => Some(format!(
            "node name {name} is in use by another machine; give this one --node-name"
        )),
        _ => None,
    }
}

/// A node's last heartbeat on its link, as sent and what it added to the history.
struct LastBeat {
    /// A copy: the frame as read may be a view of the link's whole read buffer, which
    /// it would keep alive.
    frame: Box<str>,
    /// Only what a repeat adds to the history: a clone of the whole measurement, its
    /// containers' usage with it, was an allocation per container per heartbeat.
    sample: Sample,
}

/// Takes a heartbeat that repeats the link's last one byte for byte without decoding it
/// again: an agent measures once a second and repeats the measurement in the heartbeats
/// between (its `at` with it), and the same frame decodes to the same metrics. Decoding
/// them, with each task's usage, was about a tenth of the controller's work at rest. False
/// when the frame is not such a repeat, or the node's metrics were forgotten since: the
/// frame is then handled whole.
fn repeated_beat(
    state: &ClusterState,
    node: &str,
    last: Option<&LastBeat>,
    frame: &Utf8Bytes,
) -> bool {
    let Some(beat) = last.filter(|b| *b.frame == *frame.as_str()) else {
        return false;
    };
    if !state.live.seen_again(node) {
        return false;
    }
    state.history.record(node, beat.sample);
    true
}

/// Handles one text frame from a node's agent; false when its reports back up and the
/// link must close. A heartbeat is kept in `last_beat`.
fn handle(
    state: &ClusterState,
    node: &str,
    frame: &Utf8Bytes,
    reports: &mpsc::Sender<Report>,
    last_beat: &mut Option<LastBeat>,
) -> bool {
    // Checked against the wire's limits: an oversized heartbeat is refused unread, and
    // nothing beyond a limit reaches memory or the store.
    let msg = match wire::decode_agent(frame.as_str()) {
        Ok(m) => m,
        Err(e) => {
            // One bad frame is reported back and skipped; the link stays up.
            tracing::warn!(node = %node, error = %e, "bad frame from agent");
            if let Some(conn) = state.live.connection(node) {
                let _ = conn.tx.try_send(ControllerMessage::Error {
                    code: "bad_message".into(),
                    message: e.to_string(),
                });
            }
            return true;
        }
    };
    let report = match msg {
        AgentMessage::Heartbeat { metrics } => {
            let sample = Sample::from(&metrics);
            state.history.record(node, sample);
            *last_beat = Some(LastBeat {
                frame: frame.as_str().into(),
                sample,
            });
            state.live.seen(node, Some(metrics));
            return true;
        }
        AgentMessage::Status { status } => Report::Status(status),
        AgentMessage::Removed { task } => Report::Removed(task),
        AgentMessage::LogData { request, data } => {
            state.live.seen(node, None);
            if !state.logs.deliver(node, request, LogEvent::Data(data)) {
                tracing::warn!(node = %node, request, "refusing a log frame for another node's request");
            }
            return true;
        }
        AgentMessage::LogEnd { request, error } => {
            state.live.seen(node, None);
            if !state.logs.deliver(node, request, LogEvent::End(error)) {
                tracing::warn!(node = %node, request, "refusing a log frame for another node's request");
            }
            return true;
        }
        AgentMessage::ExecData {
            request,
            data,
            stderr,
        } => {
            state.live.seen(node, None);
            if !state
                .execs
                .deliver(node, request, ExecEvent::Data(data, stderr))
            {
                tracing::warn!(node = %node, request, "refusing an exec frame for another node's request");
            }
            return true;
        }
        AgentMessage::ExecEnd {
            request,
            exit_code,
            error,
        } => {
            state.live.seen(node, None);
            if !state
                .execs
                .deliver(node, request, ExecEvent::End(exit_code, error))
            {
                tracing::warn!(node = %node, request, "refusing an exec frame for another node's request");
            }
            return true;
        }
        AgentMessage::Hello { .. } => {
            tracing::warn!(node = %node, "ignoring a second hello");
            return true;
        }
        AgentMessage::Volumes { volumes } => {
            let drafts = state.live.set_volumes(node, volumes);
            if drafts.is_empty() {
                state.live.seen(node, None);
                return true;
            }
            Report::Events(drafts)
        }
    };
    state.live.seen(node, None);
    reports.try_send(report).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bramble_api::manifest::Arch;
    use bramble_api::task::TaskPhase;
    use bramble_api::wire::NodeMetrics;

    use crate::config::HealthConfig;
    use crate::state::Solo;
    use crate::store::{self, Lease, LeaseId, Listing, SqliteStore, Store, Txn, TxnResult, Watch};

    /// A store whose next `failures` transactions fail, as a disk or a link might.
    struct Flaky {
        inner: SqliteStore,
        failures: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        async fn get(&self, key: &str) -> store::Result<(Option<store::KeyValue>, u64)> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> store::Result<Listing> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, txn: Txn) -> store::Result<TxnResult> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(store::Error::Backend {
                    location: "flaky".into(),
                    op: "write",
                    source: "disk I/O error".into(),
                });
            }
            self.inner.txn(txn).await
        }
        async fn watch(&self, prefix: &str, from: u64) -> store::Result<Watch> {
            self.inner.watch(prefix, from).await
        }
        async fn grant(&self, ttl: Duration) -> store::Result<Lease> {
            self.inner.grant(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> store::Result<Duration> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> store::Result<()> {
            self.inner.revoke(lease).await
        }
        async fn revision(&self) -> store::Result<u64> {
            self.inner.revision().await
        }
        fn write_count(&self) -> u64 {
            self.inner.write_count()
        }
        fn location(&self) -> String {
            "flaky".into()
        }
    }

    #[tokio::test]
    async fn a_heartbeat_repeated_byte_for_byte_is_taken_as_the_one_it_repeats() {
        let state = ClusterState::open(
            Arc::new(SqliteStore::open_in_memory().expect("store")),
            HealthConfig::default(),
            Arc::new(Solo::default()),
        )
        .await
        .expect("state");
        let (reports, _queued) = mpsc::channel(8);
        let beat = |cpu: f32| -> Utf8Bytes {
            wire::encode(&AgentMessage::Heartbeat {
                metrics: NodeMetrics {
                    cpu_percent: cpu,
                    memory_used_bytes: 300 << 20,
                    ..Default::default()
                },
            })
            .into()
        };
        let (a, b) = (beat(10.0), beat(50.0));
        let cpu = |state: &ClusterState| state.live.view("pi1").metrics.map(|m| m.cpu_percent);
        // All of it within one 10 s point of the node's history.
        while Utc::now()
            .timestamp()
            .rem_euclid(crate::state::history::STEP_SECS)
            == crate::state::history::STEP_SECS - 1
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let mut last = None;
        assert!(
            !repeated_beat(&state, "pi1", last.as_ref(), &a),
            "nothing to repeat yet"
        );
        assert!(handle(&state, "pi1", &a, &reports, &mut last));
        assert_eq!(cpu(&state), Some(10.0));
        for _ in 0..2 {
            assert!(repeated_beat(&state, "pi1", last.as_ref(), &a));
        }
        assert_eq!(cpu(&state), Some(10.0));
        assert!(
            !repeated_beat(&state, "pi1", last.as_ref(), &b),
            "a new measurement is not a repeat"
        );
        assert!(handle(&state, "pi1", &b, &reports, &mut last));
        assert_eq!(cpu(&state), Some(50.0));
        // Each repeat counts in the node's history as the heartbeat it repeats:
        // (3 × 10 + 50) / 4, where skipping them would give (10 + 50) / 2.
        state
            .history
            .record_at("pi1", &NodeMetrics::default(), i64::MAX / 2);
        let points = state.history.points("pi1");
        assert_eq!(points.len(), 1, "{points:?}");
        assert_eq!(points[0].cpu, 20.0);
        assert!(state.live.view("pi1").last_seen.is_some());

        // A node forgotten in between (deleted) has no metrics to repeat: the
        // heartbeat must be taken whole, and is.
        assert!(repeated_beat(&state, "pi1", last.as_ref(), &b));
        state.live.forget("pi1");
        assert!(!repeated_beat(&state, "pi1", last.as_ref(), &b));
        assert_eq!(cpu(&state), None, "nothing noted by the refused repeat");
        assert!(handle(&state, "pi1", &b, &reports, &mut last));
        assert_eq!(cpu(&state), Some(50.0));
    }

    #[tokio::test]
    async fn a_task_report_is_retried_until_the_store_takes_it() {
        let flaky = Arc::new(Flaky {
            inner: SqliteStore::open_in_memory().expect("store"),
            failures: AtomicUsize::new(0),
        });
        let state = ClusterState::open(
            flaky.clone(),
            HealthConfig::default(),
            Arc::new(Solo::default()),
        )
        .await
        .expect("state");
        // A node and a task placed on it, as the reconcile loop would leave them.
        let info = NodeInfo {
            mesh: None,
            name: "pi1".into(),
            arch: Arch::Arm64,
            cores: 4,
            memory_bytes: 1 << 30,
            docker_version: "20.10".into(),
            labels: Default::default(),
            agent_version: "0".into(),
            os: String::new(),
            machine_id: None,
            memory_limits: None,
            warnings: Vec::new(),
        };
        let yaml =
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec: {image: a}\n";
        let docs = bramble_api::parse::parse_manifests("w.yaml", yaml)
            .expect("valid")
            .workloads;
        let w = crate::core::model::StoredWorkload::new(docs[0].manifest.clone(), Utc::now());
        let mut task = reconcile::new_task(&w, "web-abc-0".into(), 0, Utc::now());
        task.node = Some("pi1".into());
        task.phase = TaskPhase::Scheduled;
        state
            .update("setup", Scope::Any, |snap| {
                let mut c =
                    ops::register_node(snap, &info, Some("h"), &Admission::Join, Utc::now())
                        .expect("joins")
                        .unwrap_or_default();
                c.writes
                    .push(crate::core::snapshot::Write::task(task.clone(), 0));
                Ok((c, ()))
            })
            .await
            .expect("setup");

        // The node's link is up (a report of a link that is gone is left to the agent's
        // next Hello, which carries every task's state).
        let (link, _frames) = mpsc::channel(8);
        state.live.connect(
            "pi1",
            Connection {
                id: 1,
                tx: link,
                address: "10.0.0.11".into(),
            },
        );
        // The store fails the next writes; the report still gets through.
        flaky.failures.store(5, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(8);
        let running = TaskStatus {
            task: "web-abc-0".into(),
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
        tx.send(Report::Status(running)).await.expect("queued");
        drop(tx);
        let done = tokio::spawn(reporter(Arc::clone(&state), "pi1".into(), 1, rx));
        tokio::time::timeout(Duration::from_secs(60), done)
            .await
            .expect("written within the back-off")
            .expect("reporter");
        assert_eq!(
            flaky.failures.load(Ordering::SeqCst),
            0,
            "every failure was met"
        );
        let t = state
            .snapshot()
            .task("web-abc-0")
            .expect("task")
            .value
            .clone();
        assert_eq!(t.phase, TaskPhase::Running);
        assert_eq!(t.container_id.as_deref(), Some("c1"));
    }

    #[test]
    fn a_connected_name_is_refused_to_another_machine_only() {
        let refused = |connected, current, hello| name_in_use("pi1", connected, current, hello);
        assert_eq!(
            refused(true, Some("aaa111"), Some("bbb222")).as_deref(),
            Some("node name pi1 is in use by another machine; give this one --node-name")
        );
        // The same machine reconnecting, a name nobody holds, unknown ids: welcome.
        assert_eq!(refused(true, Some("aaa111"), Some("aaa111")), None);
        assert_eq!(refused(false, Some("aaa111"), Some("bbb222")), None);
        assert_eq!(refused(true, None, Some("bbb222")), None);
        assert_eq!(refused(true, Some("aaa111"), None), None);
        assert_eq!(refused(true, Some(""), Some("bbb222")), None);
    }
}
