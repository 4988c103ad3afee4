//! The `/v1/agent` WebSocket: one per node, opened by the agent. See `bramble_api::wire`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bramble_api::manifest::Name;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo, MAX_FRAME_BYTES};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::cluster::{Cluster, LogEvent};
use crate::nodes::Connection;

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Upgrades to the agent protocol.
pub async fn agent(
    State(c): State<Arc<Cluster>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve(socket, c, addr))
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

async fn hello(
    socket: &mut WebSocket,
) -> Result<(NodeInfo, Vec<bramble_api::wire::TaskStatus>), (String, String)> {
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
    match wire::decode::<AgentMessage>(text.as_str()) {
        Ok(AgentMessage::Hello { node, tasks }) => {
            if let Err(e) = node.name.parse::<Name>() {
                return Err(("bad_node_name".into(), format!("node name: {e}")));
            }
            Ok((node, tasks))
        }
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

#[tracing::instrument(skip_all, fields(addr = %addr))]
async fn serve(mut socket: WebSocket, c: Arc<Cluster>, addr: SocketAddr) {
    let (node, tasks) = match hello(&mut socket).await {
        Ok(h) => h,
        Err((code, msg)) => return send_error(&mut socket, &code, msg).await,
    };
    let name = node.name.clone();
    if let Some(msg) = name_in_use(
        &name,
        c.nodes.connection(&name).is_some(),
        connected_machine(&c, &name).as_deref(),
        node.machine_id.as_deref(),
    ) {
        return send_error(&mut socket, "name_in_use", msg).await;
    }
    if let Err(e) = c.register_node(&node) {
        return send_error(
            &mut socket,
            "internal",
            format!("cannot register node: {e}"),
        )
        .await;
    }
    let welcome = ControllerMessage::Welcome {
        node: name.clone(),
        heartbeat_ms: u64::try_from(c.nodes.config().heartbeat.as_millis()).unwrap_or(u64::MAX),
        fence_ms: u64::try_from(c.nodes.config().fence.as_millis()).unwrap_or(u64::MAX),
    };
    if socket
        .send(Message::Text(wire::encode(&welcome).into()))
        .await
        .is_err()
    {
        return;
    }

    let (tx, mut rx) = mpsc::channel::<ControllerMessage>(256);
    let conn_id = c.next_id();
    c.nodes.connect(
        &name,
        Connection {
            id: conn_id,
            tx: tx.clone(),
            address: addr.ip().to_string(),
        },
    );
    drop(tx);
    tracing::info!(node = %name, tasks = tasks.len(), "agent connected");
    for s in &tasks {
        if let Err(e) = c.task_status(&name, s) {
            tracing::warn!(node = %name, task = %s.task, error = %e, "could not record adopted task");
        }
    }
    if let Err(e) = c.forget_missing(&name, &tasks) {
        tracing::warn!(node = %name, error = %e, "could not reconcile the node's task list");
    }
    c.wake();

    let (mut sink, mut stream) = socket.split();
    let ping_every = c.nodes.config().heartbeat;
    let mut writer = tokio::spawn(async move {
        // Pings tell the agent the controller is there: an agent that hears nothing for
        // the fence timeout stops its Wallets (see HealthConfig).
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => Message::Text(wire::encode(&m).into()),
                    // The connection was replaced or dropped (all senders gone).
                    None => break,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    // A link that stays silent past the dead timeout is dead even if TCP has not
    // noticed (a partition sends no reset).
    let silence = c.nodes.config().dead_after;
    loop {
        tokio::select! {
            frame = tokio::time::timeout(silence, stream.next()) => match frame.unwrap_or_else(|_| {
                tracing::info!(node = %name, "agent link silent; closing it");
                None
            }) {
                Some(Ok(Message::Text(t))) => handle(&c, &name, t.as_str()),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => c.nodes.seen(&name, None),
                Some(Ok(Message::Binary(_))) => tracing::warn!(node = %name, "ignoring binary frame"),
                Some(Err(e)) => {
                    tracing::info!(node = %name, error = %e, "agent link failed");
                    break;
                }
            },
            _ = &mut writer => break,
        }
    }
    writer.abort();
    c.nodes.disconnect(&name, conn_id);
    tracing::info!(node = %name, "agent disconnected");
    c.wake();
}

/// The machine id the node registered with last, which is the connected agent's
/// while the node is connected (a refused Hello registers nothing). A store error
/// counts as unknown: it must not lock agents out.
fn connected_machine(c: &Cluster, name: &str) -> Option<String> {
    let stored = crate::model::get::<crate::model::StoredNode>(
        c.store.as_ref(),
        &crate::model::node_key(name),
    );
    stored.ok().flatten().and_then(|v| v.value.info.machine_id)
}

/// Why a Hello for node `name` must be refused: the name is connected now from an
/// agent on another machine (both machine ids known and different). Boards flashed
/// from one image would otherwise take turns being one node, each Hello replacing the
/// other's connection and task set. An unknown id on either side (an older agent)
/// gives the benefit of the doubt: the new connection replaces the old one, as before.
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
            "node name {name} is in use by another machine (machine id {theirs}); give this one --node-name"
        )),
        _ => None,
    }
}

fn handle(c: &Cluster, node: &str, text: &str) {
    let msg = match wire::decode::<AgentMessage>(text) {
        Ok(m) => m,
        Err(e) => {
            // One bad frame is reported back and skipped; the link stays up.
            tracing::warn!(node = %node, error = %e, "bad frame from agent");
            if let Some(conn) = c.nodes.connection(node) {
                let _ = conn.tx.try_send(ControllerMessage::Error {
                    code: "bad_message".into(),
                    message: e.to_string(),
                });
            }
            return;
        }
    };
    match msg {
        AgentMessage::Heartbeat { metrics } => {
            c.history.record(node, &metrics);
            c.nodes.seen(node, Some(metrics));
        }
        AgentMessage::Status { status } => {
            c.nodes.seen(node, None);
            if let Err(e) = c.task_status(node, &status) {
                tracing::warn!(node = %node, task = %status.task, error = %e, "could not record task status");
            }
        }
        AgentMessage::Removed { task } => {
            c.nodes.seen(node, None);
            if let Err(e) = c.task_removed(node, &task) {
                tracing::warn!(node = %node, task = %task, error = %e, "could not record task removal");
            }
        }
        AgentMessage::LogData { request, data } => c.log_event(request, LogEvent::Data(data)),
        AgentMessage::LogEnd { request, error } => c.log_event(request, LogEvent::End(error)),
        AgentMessage::Hello { .. } => tracing::warn!(node = %node, "ignoring a second hello"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_name_is_refused_to_another_machine_only() {
        let refused = |connected, current, hello| name_in_use("pi1", connected, current, hello);
        assert_eq!(
            refused(true, Some("aaa111"), Some("bbb222")).as_deref(),
            Some("node name pi1 is in use by another machine (machine id aaa111); give this one --node-name")
        );
        // The same machine reconnecting, a name nobody holds, unknown ids: welcome.
        assert_eq!(refused(true, Some("aaa111"), Some("aaa111")), None);
        assert_eq!(refused(false, Some("aaa111"), Some("bbb222")), None);
        assert_eq!(refused(true, None, Some("bbb222")), None);
        assert_eq!(refused(true, Some("aaa111"), None), None);
        assert_eq!(refused(true, Some(""), Some("bbb222")), None);
    }
}
