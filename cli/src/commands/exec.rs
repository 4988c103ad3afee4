//! `exec TASK|WORKLOAD [-i] [-t] -- CMD…`: a command in a task's container, through the
//! controller and the agent link of the task's node (the admin token only). Exits with
//! the command's exit code.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::get::sort_tasks;
use crate::args::ExecArgs;
use crate::client::Client;
use crate::error::{Failure, EXIT_FAILURE};

/// Most bytes of stdin per frame (the controller refuses bigger ones).
const CHUNK: usize = 32 * 1024;

/// The terminal in raw mode while it lives, as it was after.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The terminal's size, when stdout is one.
fn term_size() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

fn resize_frame(cols: u16, rows: u16) -> Vec<u8> {
    let mut f = vec![2u8];
    f.extend_from_slice(&cols.to_be_bytes());
    f.extend_from_slice(&rows.to_be_bytes());
    f
}

/// Runs the command; its exit code becomes bramblectl's.
pub async fn run(client: &Client, args: &ExecArgs, out: &mut dyn Write) -> Result<()> {
    if args.command.is_empty() {
        bail!("name the command to run after --: bramblectl exec TASK -- sh");
    }
    let task = target(client, &args.target).await?;
    let tty = args.tty;
    let stdin = args.stdin;
    if tty && !std::io::stdin().is_terminal() && stdin {
        let _ = writeln!(
            std::io::stderr(),
            "note: stdin is not a terminal; -t gives the command one anyway"
        );
    }
    let command = serde_json::to_string(&args.command)?;
    let size = if tty { term_size() } else { None };
    let (cols, rows) = size.map(|(c, r)| (c.to_string(), r.to_string())).unzip();
    let mut query = vec![
        ("command", command.as_str()),
        ("tty", if tty { "true" } else { "false" }),
        ("stdin", if stdin { "true" } else { "false" }),
    ];
    if let (Some(c), Some(r)) = (&cols, &rows) {
        query.push(("cols", c.as_str()));
        query.push(("rows", r.as_str()));
    }
    let ws = client.exec_socket(&task, &query).await?;
    let (mut sink, mut stream) = ws.split();

    // stdin is read on a thread (a blocking read cannot be cancelled), chunk by chunk.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    if stdin {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut input = std::io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = in_tx.blocking_send(None);
                        break;
                    }
                    Ok(n) => {
                        if in_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(in_tx);
    }
    let _raw = if tty && stdin && std::io::stdin().is_terminal() {
        RawMode::enter()
    } else {
        None
    };
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut input_open = stdin;
    let mut stderr = std::io::stderr();
    let end: serde_json::Value = loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(1) => {
                        out.write_all(&b[1..])?;
                        out.flush()?;
                    }
                    Some(2) => {
                        stderr.write_all(&b[1..])?;
                        stderr.flush()?;
                    }
                    _ => {}
                },
                Some(Ok(Message::Text(t))) => break serde_json::from_str(t.as_str()).unwrap_or_default(),
                Some(Ok(Message::Close(_))) | None => break serde_json::json!({"error": "the controller closed the stream before the command ended"}),
                Some(Ok(_)) => {}
                Some(Err(e)) => break serde_json::json!({"error": format!("the stream broke: {e}")}),
            },
            chunk = in_rx.recv(), if input_open => {
                let frame = match chunk {
                    Some(Some(bytes)) => {
                        let mut f = Vec::with_capacity(bytes.len() + 1);
                        f.push(0u8);
                        f.extend_from_slice(&bytes);
                        f
                    }
                    Some(None) | None => {
                        input_open = false;
                        vec![1u8]
                    }
                };
                sink.send(Message::Binary(frame.into())).await?;
            },
            Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } }, if tty => {
                if let Some((c, r)) = term_size() {
                    sink.send(Message::Binary(resize_frame(c, r).into())).await?;
                }
            },
        }
    };
    let _ = sink.close().await;
    drop(_raw);
    if let Some(code) = end.get("exitCode").and_then(serde_json::Value::as_i64) {
        if code == 0 {
            return Ok(());
        }
        return Err(Failure::Reported(u8::try_from(code).unwrap_or(EXIT_FAILURE)).into());
    }
    let why = end
        .get("error")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("the command ended without an exit code");
    bail!("{why}")
}

/// The task a name stands for: a task id, or a running task of the workload.
async fn target(client: &Client, name: &str) -> Result<String> {
    match client.task(name).await {
        Ok(t) => Ok(t.id),
        Err(e) if e.is_not_found() => {
            let mut tasks = client.tasks(Some(name), None).await?;
            tasks.retain(|t| t.phase == bramble_api::task::TaskPhase::Running);
            sort_tasks(&mut tasks);
            match tasks.first() {
                Some(t) => {
                    if tasks.len() > 1 {
                        let _ = writeln!(
                            std::io::stderr(),
                            "note: {name:?} has {} running tasks; using {}",
                            tasks.len(),
                            t.id
                        );
                    }
                    Ok(t.id.clone())
                }
                None => bail!("no task or workload named {name:?} with a running task"),
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_frames_carry_columns_then_rows() {
        assert_eq!(resize_frame(300, 40), vec![2, 1, 44, 0, 40]);
    }
}
