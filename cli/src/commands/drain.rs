//! `drain NODE [--timeout 5m]`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bramble_api::rest::DrainResponse;

use super::not_found;
use crate::args::DrainArgs;
use crate::client::Client;

/// How often the progress line is redrawn.
const TICK: Duration = Duration::from_millis(100);
const SPINNER: [char; 4] = ['|', '/', '-', '\\'];

/// Asks the controller to drain the node and waits for its answer, with a progress line
/// on stderr when that is a terminal.
pub async fn run(client: &Client, args: &DrainArgs, out: &mut dyn Write) -> Result<()> {
    let node = args.node.as_str();
    let request = client.drain(node, args.timeout);
    let mut stderr = std::io::stderr();
    let answer = if stderr.is_terminal() {
        let started = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tokio::pin!(request);
        let mut frame = 0;
        let answer = loop {
            tokio::select! {
                a = &mut request => break a,
                _ = tick.tick() => {
                    // Progress is a nicety: a failing stderr must not fail the drain.
                    let _ = write!(stderr, "\r{}", progress(frame, node, started.elapsed()));
                    let _ = stderr.flush();
                    frame += 1;
                }
            }
        };
        // Erase the progress line, so what follows starts on a clean line.
        let _ = write!(stderr, "\r\x1b[2K");
        let _ = stderr.flush();
        answer
    } else {
        request.await
    };
    let answer = answer.map_err(|e| not_found(e, "node", node))?;
    outcome(&answer, args.timeout, out)
}

/// `| draining node/pi-1… 12s`.
pub fn progress(frame: usize, node: &str, elapsed: Duration) -> String {
    format!(
        "{} draining node/{node}… {}s",
        SPINNER[frame % SPINNER.len()],
        elapsed.as_secs()
    )
}

fn tasks(n: u32) -> String {
    if n == 1 {
        "1 task".into()
    } else {
        format!("{n} tasks")
    }
}

/// The drain's one line: success on stdout, or an error when tasks are left.
pub fn outcome(
    answer: &DrainResponse,
    timeout: bramble_api::duration::Duration,
    out: &mut dyn Write,
) -> Result<()> {
    if answer.remaining > 0 {
        bail!(
            "node/{}: {} still on the node after {timeout}",
            answer.node,
            tasks(answer.remaining)
        );
    }
    if answer.pending.is_empty() {
        writeln!(
            out,
            "node/{} drained ({} moved)",
            answer.node,
            tasks(answer.moved)
        )?;
        return Ok(());
    }
    // Tasks that found no other node are not running: say so, and why, rather than
    // count them as moved.
    writeln!(
        out,
        "node/{} drained: {} left it; {} placed on other nodes, {} waiting for a node (not running):",
        answer.node,
        tasks(answer.moved),
        answer.placed,
        answer.pending.len()
    )?;
    for p in &answer.pending {
        writeln!(out, "  {}: {}", p.task, p.reason)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(moved: u32, remaining: u32) -> DrainResponse {
        DrainResponse {
            node: "pi-1".into(),
            moved,
            remaining,
            placed: moved,
            pending: Vec::new(),
        }
    }

    #[test]
    fn a_drain_whose_tasks_found_no_node_says_they_are_not_running() {
        let a = DrainResponse {
            node: "pi-1".into(),
            moved: 2,
            remaining: 0,
            placed: 0,
            pending: vec![
                bramble_api::rest::PendingTask {
                    task: "hello-abc-0".into(),
                    reason: "0/1 node fit: 1 cordoned".into(),
                },
                bramble_api::rest::PendingTask {
                    task: "w-abc-0".into(),
                    reason: "0/1 node fit: 1 cordoned".into(),
                },
            ],
        };
        let mut out = Vec::new();
        outcome(&a, "5m".parse().expect("duration"), &mut out).expect("drained");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "node/pi-1 drained: 2 tasks left it; 0 placed on other nodes, 2 waiting for a node (not running):\n  hello-abc-0: 0/1 node fit: 1 cordoned\n  w-abc-0: 0/1 node fit: 1 cordoned\n"
        );
    }

    #[test]
    fn a_drained_node_says_how_many_tasks_moved() {
        let mut out = Vec::new();
        outcome(&answer(3, 0), "5m".parse().expect("duration"), &mut out).expect("drained");
        assert_eq!(out, b"node/pi-1 drained (3 tasks moved)\n");
        let mut out = Vec::new();
        outcome(&answer(1, 0), "5m".parse().expect("duration"), &mut out).expect("drained");
        assert_eq!(out, b"node/pi-1 drained (1 task moved)\n");
    }

    #[test]
    fn tasks_left_after_the_timeout_are_an_error() {
        let mut out = Vec::new();
        let err = outcome(&answer(1, 2), "90s".parse().expect("duration"), &mut out)
            .expect_err("not drained");
        assert_eq!(
            err.to_string(),
            "node/pi-1: 2 tasks still on the node after 1m30s"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn the_progress_line_spins_and_counts_seconds() {
        assert_eq!(
            progress(0, "pi-1", Duration::from_millis(12_900)),
            "| draining node/pi-1… 12s"
        );
        assert!(progress(5, "pi-1", Duration::ZERO).starts_with("/ "));
    }
}
