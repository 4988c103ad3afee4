//! `logs TASK|WORKLOAD [-f] [--tail N] [--all]`.

use std::io::Write;

use anyhow::{bail, Result};
use bramble_api::task::{Task, TaskPhase};
use futures_util::StreamExt;

use super::get::sort_tasks;
use crate::args::LogsArgs;
use crate::client::{self, Client};

/// Streams logs to stdout as they arrive.
pub async fn run(client: &Client, args: &LogsArgs, out: &mut dyn Write) -> Result<()> {
    let target = match (&args.target, &args.selector) {
        (Some(t), _) => t.clone(),
        (None, Some(sel)) => {
            // Every task of the matching workloads, each line marked with its task.
            let chosen: std::collections::HashSet<(bramble_api::manifest::Kind, String)> = client
                .workloads(None)
                .await?
                .into_iter()
                .filter(|w| sel.matches(&w.manifest.metadata.labels))
                .map(|w| (w.manifest.kind, w.manifest.metadata.name.to_string()))
                .collect();
            let mut tasks = client.tasks(None, None).await?;
            tasks.retain(|t| chosen.contains(&(t.kind, t.workload.clone())));
            if tasks.is_empty() {
                bail!("no task of a workload matching {sel}");
            }
            sort_tasks(&mut tasks);
            return all(client, &tasks, args, out).await;
        }
        (None, None) => bail!("name a task or workload, or give -l SELECTOR"),
    };
    let tasks = match client.task(&target).await {
        Ok(t) => vec![t],
        Err(e) if e.is_not_found() => {
            let mut tasks = client.tasks(Some(&target), None).await?;
            if tasks.is_empty() {
                bail!("no task or workload named {target:?}");
            }
            sort_tasks(&mut tasks);
            tasks
        }
        Err(e) => return Err(e.into()),
    };
    if args.all && tasks.len() > 1 {
        return all(client, &tasks, args, out).await;
    }
    let chosen = pick(&tasks);
    if tasks.len() > 1 {
        let others: Vec<&str> = tasks
            .iter()
            .filter(|t| t.id != chosen.id)
            .map(|t| t.id.as_str())
            .collect();
        let _ = writeln!(
            std::io::stderr(),
            "note: {:?} has {} tasks; showing {} (others: {}; use --all for every task)",
            target,
            tasks.len(),
            chosen.id,
            others.join(", ")
        );
    }
    let mut logs = client.logs(&chosen.id, args.follow, args.tail).await?;
    while let Some(chunk) = logs.chunk().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// The task whose logs a workload's name stands for. `tasks` is not empty.
///
/// Runs of a Job or CronJob: the newest running one, else the newest run, newest by slot
/// then attempt (a retry is created after the run it retries, but a late retry of an
/// old slot is not the latest news). Replicas of a Service or Wallet: the first running
/// one, else the newest. The first of equals either way.
pub fn pick(tasks: &[Task]) -> &Task {
    let running = |t: &&Task| t.phase == TaskPhase::Running;
    // `max_by_key` keeps the last of equals; reversed, that is the first.
    let picked = if tasks.iter().all(|t| t.kind.runs_to_completion()) {
        let newest = |t: &&Task| (t.slot, t.attempt, t.created_at);
        tasks
            .iter()
            .rev()
            .filter(running)
            .max_by_key(newest)
            .or_else(|| tasks.iter().rev().max_by_key(newest))
    } else {
        tasks
            .iter()
            .find(running)
            .or_else(|| tasks.iter().rev().max_by_key(|t| t.created_at))
    };
    picked.expect("pick is called with at least one task")
}

/// Every task's logs at once, each line prefixed with `[task id] `.
async fn all(client: &Client, tasks: &[Task], args: &LogsArgs, out: &mut dyn Write) -> Result<()> {
    let mut streams = Vec::new();
    for t in tasks {
        let logs = client.logs(&t.id, args.follow, args.tail).await?;
        let i = streams.len();
        streams.push(
            futures_util::stream::unfold(Some(logs), move |state| async move {
                let mut logs = state?;
                match logs.chunk().await {
                    Ok(Some(b)) => Some((Ok((i, Some(b))), Some(logs))),
                    Ok(None) => Some((Ok((i, None)), None)),
                    Err(e) => Some((Err::<_, client::Error>(e), None)),
                }
            })
            .boxed_local(),
        );
    }
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); tasks.len()];
    let mut merged = futures_util::stream::select_all(streams);
    while let Some(item) = merged.next().await {
        let (i, chunk) = item?;
        let prefix = format!("[{}] ", tasks[i].id);
        let buf = &mut partial[i];
        match chunk {
            Some(bytes) => {
                buf.extend_from_slice(&bytes);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    out.write_all(prefix.as_bytes())?;
                    out.write_all(&line)?;
                }
            }
            None if !buf.is_empty() => {
                out.write_all(prefix.as_bytes())?;
                out.write_all(buf)?;
                out.write_all(b"\n")?;
                buf.clear();
            }
            None => {}
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::describe::fixtures::{pending_task, running_task};

    fn run(
        id: &str,
        kind: &str,
        slot: Option<&str>,
        attempt: u32,
        phase: &str,
        created: &str,
    ) -> Task {
        let mut v = serde_json::json!({
            "id": id,
            "kind": kind,
            "workload": "payout",
            "replica": 0,
            "specHash": "0a1b2c3d4e5f6789",
            "spec": {
                "image": "pool/payout:1",
                "restart": {"policy": "Never", "backoff": {"initial": "1s", "max": "5m"}, "maxFailures": 5, "window": "10m"}
            },
            "desired": "Running",
            "phase": phase,
            "attempt": attempt,
            "restarts": 0,
            "createdAt": created
        });
        if let Some(s) = slot {
            v["slot"] = s.into();
        }
        serde_json::from_value(v).expect("valid task")
    }

    #[test]
    fn the_newest_run_of_a_cronjob_is_picked_by_slot_then_attempt() {
        let old_slot = "2026-11-10T10:00:00Z";
        let new_slot = "2026-11-10T11:00:00Z";
        let tasks = [
            run(
                "payout-20261110t100000z",
                "CronJob",
                Some(old_slot),
                0,
                "Failed",
                "2026-11-10T10:00:00Z",
            ),
            run(
                "payout-20261110t110000z",
                "CronJob",
                Some(new_slot),
                0,
                "Failed",
                "2026-11-10T11:00:00Z",
            ),
            // Retried late: created last, but for the older slot.
            run(
                "payout-20261110t100000z-r1",
                "CronJob",
                Some(old_slot),
                1,
                "Succeeded",
                "2026-11-10T11:05:00Z",
            ),
            run(
                "payout-20261110t110000z-r1",
                "CronJob",
                Some(new_slot),
                1,
                "Failed",
                "2026-11-10T11:01:00Z",
            ),
        ];
        assert_eq!(pick(&tasks).id, "payout-20261110t110000z-r1");
    }

    #[test]
    fn the_newest_running_run_is_picked_before_finished_ones() {
        let tasks = [
            run(
                "payout-20261110t100000z",
                "CronJob",
                Some("2026-11-10T10:00:00Z"),
                0,
                "Running",
                "2026-11-10T10:00:00Z",
            ),
            run(
                "payout-20261110t110000z",
                "CronJob",
                Some("2026-11-10T11:00:00Z"),
                0,
                "Running",
                "2026-11-10T11:00:00Z",
            ),
            run(
                "payout-20261110t120000z",
                "CronJob",
                Some("2026-11-10T12:00:00Z"),
                0,
                "Failed",
                "2026-11-10T12:00:00Z",
            ),
        ];
        assert_eq!(pick(&tasks).id, "payout-20261110t110000z");
        // Jobs have no slot: the newest attempt.
        let tasks = [
            run(
                "payout-0a1b2c-0",
                "Job",
                None,
                0,
                "Failed",
                "2026-11-10T10:00:00Z",
            ),
            run(
                "payout-0a1b2c-0-r1",
                "Job",
                None,
                1,
                "Succeeded",
                "2026-11-10T10:01:00Z",
            ),
        ];
        assert_eq!(pick(&tasks).id, "payout-0a1b2c-0-r1");
    }

    #[test]
    fn a_running_task_is_picked_before_newer_ones() {
        let tasks = [pending_task(), running_task()];
        assert_eq!(pick(&tasks).id, "web-0a1b2c-1");
        let tasks = [pending_task()];
        assert_eq!(pick(&tasks).id, "ltc-wallet-0a1b2c-0");
    }
}
