//! Log and exec streams from agents to HTTP clients. Each request is bound to the node
//! it was sent to: a frame from any other node is refused, so one node cannot write
//! into another node's stream.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

/// A piece of a log stream on its way from an agent to an HTTP client.
#[derive(Debug)]
pub enum LogEvent {
    /// Text.
    Data(String),
    /// The end; an error text if it ended early.
    End(Option<String>),
}

/// A piece of an exec's output on its way from an agent to `bramblectl exec`.
#[derive(Debug)]
pub enum ExecEvent {
    /// Bytes, base64 as on the wire; from stderr or not.
    Data(String, bool),
    /// The end: the exit code, or why there is none.
    End(Option<i64>, Option<String>),
}

/// Chunks queued per stream before a slow client loses some.
const QUEUE: usize = 1024;

/// The open log streams, by request id.
pub type LogStreams = Streams<LogEvent>;

/// The open exec streams, by request id.
pub type ExecStreams = Streams<ExecEvent>;

type Open<E> = HashMap<u64, (String, mpsc::Sender<E>)>;

/// Open streams of events `E`, by request id.
pub struct Streams<E> {
    open: Mutex<Open<E>>,
}

impl<E> Default for Streams<E> {
    fn default() -> Self {
        Streams {
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl<E> Streams<E> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open<E>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers stream `request`, asked of `node`; its frames go to the receiver.
    pub fn open(&self, request: u64, node: &str) -> mpsc::Receiver<E> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.lock().insert(request, (node.to_string(), tx));
        rx
    }

    /// Forgets a stream.
    pub fn close(&self, request: u64) {
        self.lock().remove(&request);
    }

    /// Hands a frame from `node` to its client. Returns false (and delivers nothing)
    /// when the request was not sent to that node. A client too slow to keep up loses
    /// chunks rather than stalling the agent's link (and with it, its heartbeats).
    pub fn deliver(&self, node: &str, request: u64, ev: E) -> bool {
        let tx = match self.lock().get(&request) {
            Some((n, tx)) if n == node => tx.clone(),
            Some(_) => return false,
            // Closed already (the client left): nothing to do, nothing wrong.
            None => return true,
        };
        if tx.try_send(ev).is_err() {
            tracing::warn!(request, "stream client too slow; dropping a chunk");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_from_another_node_are_refused() {
        let logs = LogStreams::default();
        let mut rx = logs.open(7, "pi1");
        assert!(!logs.deliver("pi2", 7, LogEvent::Data("forged".into())));
        assert!(rx.try_recv().is_err(), "nothing delivered");
        assert!(logs.deliver("pi1", 7, LogEvent::Data("real".into())));
        assert!(matches!(rx.try_recv(), Ok(LogEvent::Data(d)) if d == "real"));
        logs.close(7);
        assert!(
            logs.deliver("pi1", 7, LogEvent::End(None)),
            "a closed stream is no offence"
        );
    }
}
