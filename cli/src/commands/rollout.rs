//! `rollout restart KIND/NAME`: a Service one replica at a time, each back and Ready
//! before the next goes; a Wallet (one task) stops, then starts again.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bramble_api::manifest::Kind;
use bramble_api::task::{DesiredState, Task, TaskPhase};

use super::get::sort_tasks;
use super::not_found;
use crate::args::{RolloutArgs, RolloutCommand};
use crate::client::Client;
use crate::error::usage;
use crate::output::Resource;

/// How often the tasks are looked at while waiting.
const POLL: Duration = Duration::from_millis(250);

/// Runs `rollout …`.
pub async fn run(client: &Client, cmd: &RolloutCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        RolloutCommand::Restart(a) => restart(client, a, out).await,
    }
}

/// Whether a task serves: running, on a node, and Ready if it has a readiness probe.
pub fn serving(t: &Task) -> bool {
    t.desired == DesiredState::Running
        && t.node.is_some()
        && t.phase == TaskPhase::Running
        && t.ready != Some(false)
}

async fn restart(client: &Client, a: &RolloutArgs, out: &mut dyn Write) -> Result<()> {
    let name = a
        .target
        .with_name(&a.name)?
        .ok_or_else(|| usage("name what to restart: rollout restart service/NAME"))?;
    let kind = match a.target.resource {
        Resource::Workloads(Some(k @ (Kind::Service | Kind::Wallet))) => k,
        other => {
            return Err(usage(format!(
                "rollout restart takes a service or a wallet, not {other}"
            )))
        }
    };
    client
        .workload(kind, &name)
        .await
        .map_err(|e| not_found(e, kind.path(), &name))?;
    let what = format!("{}/{name}", kind.path());
    let mut tasks = tasks_of(client, kind, &name).await?;
    sort_tasks(&mut tasks);
    tasks.retain(|t| t.desired == DesiredState::Running && t.node.is_some());
    if tasks.is_empty() {
        bail!("{what} has no task on a node to restart");
    }
    let timeout = a.timeout.std();
    let n = tasks.len();
    for (i, old) in tasks.iter().enumerate() {
        // Never take one down while another is not serving: the rollout keeps n - 1
        // replicas up (Wallets have one, which a restart stops by nature).
        if n > 1 {
            wait(
                client,
                kind,
                &name,
                timeout,
                "the other replicas to be Ready",
                |ts| ts.iter().filter(|t| t.id != old.id).all(serving),
            )
            .await?;
        }
        let started = Instant::now();
        client.restart_task(&old.id).await?;
        let before = old.container_id.clone();
        let back = wait(
            client,
            kind,
            &name,
            timeout,
            &format!("{} to run again", old.id),
            |ts| {
                ts.iter()
                    .find(|t| t.id == old.id)
                    .filter(|t| serving(t) && t.container_id.is_some() && t.container_id != before)
                    .cloned()
            },
        )
        .await?;
        writeln!(
            out,
            "{what}: {}/{n} {} restarted on {} (serving after {:.1}s)",
            i + 1,
            back.id,
            back.node.as_deref().unwrap_or("?"),
            started.elapsed().as_secs_f64()
        )?;
        out.flush()?;
    }
    writeln!(
        out,
        "{what} restarted{}",
        if n > 1 {
            " (one replica at a time)"
        } else {
            ""
        }
    )?;
    Ok(())
}

async fn tasks_of(client: &Client, kind: Kind, name: &str) -> Result<Vec<Task>> {
    let mut ts = client.tasks(Some(name), None).await?;
    ts.retain(|t| t.kind == kind);
    Ok(ts)
}

/// Polls the workload's tasks until `done` gives a value, or fails after `timeout`
/// saying what it waited for.
async fn wait<T>(
    client: &Client,
    kind: Kind,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Task]) -> T,
) -> Result<T::Output>
where
    T: Outcome,
{
    let deadline = Instant::now() + timeout;
    loop {
        let ts = tasks_of(client, kind, name).await?;
        if let Some(v) = done(&ts).outcome() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            let states: Vec<String> = ts
                .iter()
                .map(|t| {
                    format!(
                        "{} {}",
                        t.id,
                        crate::describe::status_line(t, chrono::Utc::now())
                    )
                })
                .collect();
            bail!(
                "timed out after {}s waiting for {what}; the tasks: {} (the rollout stopped here; nothing else was restarted)",
                timeout.as_secs(),
                states.join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What a wait's condition gives: `true`, or a value found.
trait Outcome {
    type Output;
    fn outcome(self) -> Option<Self::Output>;
}

impl Outcome for bool {
    type Output = ();
    fn outcome(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Output = T;
    fn outcome(self) -> Option<T> {
        self
    }
}
