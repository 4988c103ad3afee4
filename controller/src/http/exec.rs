//! `GET /v1/tasks/{id}/exec`, a WebSocket for `bramblectl exec`: the admin token only.
//! The controller relays it over the agent link of the task's node, which runs the
//! command in the task's container.
//!
//! Frames from the client (binary): `[0, bytes…]` stdin, `[1]` stdin closed,
//! `[2, cols (u16 BE), rows (u16 BE)]` the terminal's size. To the client: binary
//! `[1, bytes…]` stdout, `[2, bytes…]` stderr, then one text frame, `{"exitCode": N}`
//! or `{"error": "…"}`, and the close.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use base64::Engine as _;
use bramble_api::task::TaskPhase;
use bramble_api::wire::{ControllerMessage, TermSize, MAX_EXEC_CHUNK};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use super::auth::Role;
use super::{role, ApiError, App, Shared};
use crate::core::views;
use crate::state::logs::ExecEvent;

/// Most arguments of a command, and bytes of each.
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
pub struct ExecQuery {
    /// The command and its arguments, a JSON array of strings.
    command: String,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    stdin: bool,
    cols: Option<u16>,
    rows: Option<u16>,
}

/// The command of a query: a non-empty JSON array of strings within the limits.
pub fn command(text: &str) -> Result<Vec<String>, String> {
    let cmd: Vec<String> = serde_json::from_str(text)
        .map_err(|e| format!("command must be a JSON array of strings: {e}"))?;
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("no command given".into());
    }
    if cmd.len() > MAX_ARGS {
        return Err(format!("{} arguments; at most {MAX_ARGS}", cmd.len()));
    }
    if let Some(a) = cmd.iter().find(|a| a.len() > MAX_ARG_BYTES) {
        return Err(format!(
            "an argument of {} bytes; at most {MAX_ARG_BYTES}",
            a.len()
        ));
    }
    Ok(cmd)
}

/// Upgrades to the exec's WebSocket once the request is one the node can serve.
#[tracing::instrument(skip(app, headers, ws, q))]
pub async fn exec(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Result<axum::response::Response, ApiError> {
    // The auth layer refuses viewers already; a command in a container is the admin's.
    if role(&app, &headers) != Some(Role::Admin) {
        return Err(ApiError::forbidden(
            "exec runs commands in containers: the admin token only",
        ));
    }
    let cmd = command(&q.command).map_err(ApiError::bad_request)?;
    let task = views::task(&app.state.snapshot(), &id)?;
    let node = task
        .node
        .clone()
        .ok_or_else(|| ApiError::conflict(format!("task {id:?} is not placed on a node")))?;
    if task.phase != TaskPhase::Running {
        return Err(ApiError::conflict(format!(
            "task {id:?} is {}, not Running: there is no container to run a command in",
            task.phase
        )));
    }
    if app.state.live.connection(&node).is_none() {
        return Err(if app.state.is_leading() {
            ApiError::unavailable(format!("node {node:?} is not connected"))
        } else {
            ApiError::not_leader(
                "this controller is not the leader: exec goes over the leader's link to the task's node; ask the leader (bramblectl get controllers shows it)",
            )
        });
    }
    let size = match (q.cols, q.rows) {
        (Some(cols), Some(rows)) if q.tty => Some(TermSize { cols, rows }),
        _ => None,
    };
    let start = ControllerMessage::Exec {
        request: 0,
        task: id,
        command: cmd,
        tty: q.tty,
        stdin: q.stdin,
        size,
    };
    Ok(ws
        .max_message_size(MAX_EXEC_CHUNK + 16)
        .on_upgrade(move |socket| relay(app, node, start, socket))
        .into_response())
}

/// Ends the exec on the node when the client goes, whatever the reason.
struct Guard {
    app: Arc<App>,
    node: String,
    request: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.app.state.execs.close(self.request);
        if let Some(conn) = self.app.state.live.connection(&self.node) {
            let _ = conn.tx.try_send(ControllerMessage::CancelExec {
                request: self.request,
            });
        }
    }
}

async fn relay(app: Arc<App>, node: String, mut start: ControllerMessage, socket: WebSocket) {
    let request = app.state.next_id();
    if let ControllerMessage::Exec { request: r, .. } = &mut start {
        *r = request;
    }
    let mut rx = app.state.execs.open(request, &node);
    let _guard = Guard {
        app: Arc::clone(&app),
        node: node.clone(),
        request,
    };
    let (mut sink, mut stream) = socket.split();
    let Some(conn) = app.state.live.connection(&node) else {
        let _ = sink
            .send(Message::text(
                serde_json::json!({"error": format!("node {node:?} went away")}).to_string(),
            ))
            .await;
        return;
    };
    if conn.tx.send(start).await.is_err() {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Binary(b))) => {
                    let msg = match b.first() {
                        Some(0) => ControllerMessage::ExecInput { request, data: b64.encode(&b[1..]), eof: false },
                        Some(1) => ControllerMessage::ExecInput { request, data: String::new(), eof: true },
                        Some(2) if b.len() == 5 => ControllerMessage::ExecResize {
                            request,
                            size: TermSize {
                                cols: u16::from_be_bytes([b[1], b[2]]),
                                rows: u16::from_be_bytes([b[3], b[4]]),
                            },
                        },
                        _ => continue,
                    };
                    let Some(conn) = app.state.live.connection(&node) else { break };
                    if conn.tx.send(msg).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            ev = rx.recv() => match ev {
                Some(ExecEvent::Data(data, stderr)) => {
                    let Ok(bytes) = b64.decode(data.as_bytes()) else { continue };
                    let mut frame = Vec::with_capacity(bytes.len() + 1);
                    frame.push(if stderr { 2 } else { 1 });
                    frame.extend_from_slice(&bytes);
                    if sink.send(Message::Binary(frame.into())).await.is_err() {
                        break;
                    }
                }
                Some(ExecEvent::End(code, error)) => {
                    let end = match (code, error) {
                        (Some(c), _) => serde_json::json!({"exitCode": c}),
                        (None, e) => serde_json::json!({"error": e.unwrap_or_else(|| "the command ended without an exit code".into())}),
                    };
                    let _ = sink.send(Message::text(end.to_string())).await;
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                None => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_json_arrays_within_limits() {
        assert_eq!(
            command(r#"["sh","-c","echo hi"]"#).ok(),
            Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
        );
        for (bad, want) in [
            ("sh -c x", "a JSON array"),
            ("[]", "no command"),
            (r#"[""]"#, "no command"),
            (r#"[1]"#, "a JSON array"),
        ] {
            let e = command(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
        let many = serde_json::to_string(&vec!["a"; 300]).expect("json");
        assert!(command(&many).is_err());
        let long = serde_json::to_string(&vec!["a".repeat(5000)]).expect("json");
        assert!(command(&long).is_err());
    }
}
