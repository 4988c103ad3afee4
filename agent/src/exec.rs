//! `bramblectl exec`: a command run in one of this node's task containers for the
//! controller (which allows it to the admin token only), its output sent back over the
//! link in [`AgentMessage::ExecData`] chunks and its end in [`AgentMessage::ExecEnd`];
//! stdin and terminal sizes come the other way.

use base64::Engine as _;
use bollard::container::LogOutput;
use bramble_api::wire::{AgentMessage, TermSize, MAX_EXEC_CHUNK};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::runtime::Runtime;

/// What the controller sends an exec after it started.
#[derive(Debug)]
pub enum Input {
    /// Bytes for stdin.
    Data(Vec<u8>),
    /// stdin is done.
    Eof,
    /// The terminal's new size.
    Resize(TermSize),
}

/// A running exec: its input, and the task pumping it.
pub struct Session {
    /// Where its input goes.
    pub input: mpsc::Sender<Input>,
    /// The pump; aborting it drops the exec's streams.
    pub task: tokio::task::JoinHandle<()>,
}

/// What to run.
pub struct Request {
    /// Request id.
    pub request: u64,
    /// Container name of the task.
    pub container: String,
    /// The task (for messages).
    pub task: String,
    /// Command and arguments.
    pub command: Vec<String>,
    /// With a terminal.
    pub tty: bool,
    /// With stdin.
    pub stdin: bool,
    /// Initial terminal size.
    pub size: Option<TermSize>,
}

/// Starts the exec; its messages go to `tx`.
pub fn start(runtime: Runtime, req: Request, tx: mpsc::Sender<AgentMessage>) -> Session {
    let (input, rx) = mpsc::channel(64);
    let task = tokio::spawn(run(runtime, req, rx, tx));
    Session { input, task }
}

/// Splits output into wire-sized, base64 chunks.
pub fn chunks(request: u64, bytes: &[u8], stderr: bool) -> Vec<AgentMessage> {
    bytes
        .chunks(MAX_EXEC_CHUNK)
        .map(|c| AgentMessage::ExecData {
            request,
            data: base64::engine::general_purpose::STANDARD.encode(c),
            stderr,
        })
        .collect()
}

async fn run(
    runtime: Runtime,
    req: Request,
    mut rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<AgentMessage>,
) {
    let request = req.request;
    tracing::info!(request, task = %req.task, command = ?req.command, tty = req.tty, "exec");
    let attached = match runtime
        .exec_attached(&req.container, &req.command, req.tty, req.stdin)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            let error = Some(format!(
                "cannot run {:?} in task {}: {}",
                req.command.join(" "),
                req.task,
                crate::runtime::error_chain(&e)
            ));
            let _ = tx
                .send(AgentMessage::ExecEnd {
                    request,
                    exit_code: None,
                    error,
                })
                .await;
            return;
        }
    };
    if let Some(s) = req.size {
        let _ = runtime.resize_exec(&attached.exec, s.cols, s.rows).await;
    }
    let mut output = attached.output;
    let mut input = Some(attached.input);
    let mut error = None;
    loop {
        tokio::select! {
            out = output.next() => match out {
                Some(Ok(o)) => {
                    let (bytes, stderr) = match o {
                        LogOutput::StdErr { message } => (message, true),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => (message, false),
                        LogOutput::StdIn { .. } => continue,
                    };
                    for m in chunks(request, &bytes, stderr) {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    error = Some(format!("the exec's stream broke: {e}"));
                    break;
                }
                None => break,
            },
            inp = rx.recv() => match inp {
                Some(Input::Data(d)) => {
                    if let Some(w) = input.as_mut() {
                        if w.write_all(&d).await.is_err() || w.flush().await.is_err() {
                            input = None;
                        }
                    }
                }
                Some(Input::Eof) => {
                    if let Some(mut w) = input.take() {
                        let _ = w.shutdown().await;
                    }
                }
                Some(Input::Resize(s)) => {
                    let _ = runtime.resize_exec(&attached.exec, s.cols, s.rows).await;
                }
                // The controller is gone: end it as if cancelled.
                None => return,
            },
        }
    }
    let exit_code = match runtime.exec_finished(&req.container, &attached.exec).await {
        Ok(c) => Some(c),
        Err(e) => {
            error.get_or_insert_with(|| crate::runtime::error_chain(&e));
            None
        }
    };
    tracing::info!(request, task = %req.task, exit_code = ?exit_code, "exec ended");
    let _ = tx
        .send(AgentMessage::ExecEnd {
            request,
            exit_code,
            error,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_to_wire_sized_base64_chunks_that_pass_the_limits() {
        let bytes = vec![0xffu8; MAX_EXEC_CHUNK * 2 + 5];
        let ms = chunks(7, &bytes, true);
        assert_eq!(ms.len(), 3);
        let mut back = Vec::new();
        for m in &ms {
            m.validate().expect("within the limits");
            let AgentMessage::ExecData {
                request,
                data,
                stderr,
            } = m
            else {
                panic!("not data")
            };
            assert_eq!((*request, *stderr), (7, true));
            back.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64"),
            );
        }
        assert_eq!(back, bytes);
    }
}
