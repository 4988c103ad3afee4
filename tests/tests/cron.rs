//! CronJobs and Jobs on a real one-node cluster: slots fire exactly once, also while
//! the controller is killed and restarted; Forbid never overlaps runs; Replace stops
//! the running one; a failing Job is retried and then recorded as failed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bramble_tests::harness::{self, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

async fn cluster(prefix: &str) -> Result<(Controller, String)> {
    ensure_test_image().await?;
    let node = harness::unique(prefix);
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec![],
    })
    .await?;
    Ok((c, node))
}

async fn apply(c: &Controller, yaml: &str) -> Result<()> {
    let body = serde_json::json!({"sources": [{"name": "job.yaml", "content": yaml}]});
    let r = bramble_tests::http()
        .post(format!("{}/v1/apply", c.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "apply: {}", r.text().await?);
    Ok(())
}

fn cronjob(name: &str, args: &str, policy: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: CronJob
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: {args}
  schedule: \"*/5 * * * * *\"
  concurrencyPolicy: {policy}
  startingDeadline: 30s
  history: {{successful: 100, failed: 100}}
"
    )
}

/// Running containers of a workload on a node.
fn running(node: &str, workload: &str) -> Result<usize> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=bramble.node={node}"),
            "--filter",
            &format!("label=bramble.workload={workload}"),
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_fires_exactly_once_while_the_controller_is_killed_and_restarted() -> Result<()>
{
    let (mut c, _node) = cluster("cr").await?;
    apply(&c, &cronjob("tick", "[\"exit\", \"0\", \"1\"]", "Allow")).await?;
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(70) {
        tokio::time::sleep(Duration::from_millis(9_000 + (kills * 1_700) % 4_000)).await;
        if kills < 5 {
            c.kill9();
            // Down for a moment, less than one 5 s period: every slot must still fire.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            c.restart().await?;
            kills += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Firings are listed newest first, at most 20: enough for the last 100 s at 5 s.
    let fired = harness::every_slot_once(&c, "tick", 5).await?;
    assert!(fired >= 12, "only {fired} slots recorded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbid_never_overlaps_runs_and_skips_busy_slots() -> Result<()> {
    let (c, node) = cluster("cf").await?;
    apply(&c, &cronjob("slow", "[\"sleep\", \"8\"]", "Forbid")).await?;
    let start = Instant::now();
    let mut max_running = 0;
    while start.elapsed() < Duration::from_secs(25) {
        max_running = max_running.max(running(&node, "slow")?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(max_running, 1, "Forbid must never run two at once");
    let view = c.get("/v1/cronjobs/slow").await?;
    let outcomes: BTreeSet<String> = view["firings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f["outcome"].as_str().map(str::to_string))
        .collect();
    assert!(
        outcomes.contains("Skipped") && outcomes.contains("Fired"),
        "{view}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_stops_the_running_run_before_the_next() -> Result<()> {
    let (c, node) = cluster("cp").await?;
    apply(&c, &cronjob("long", "[\"sleep\", \"100\"]", "Replace")).await?;
    // Several slots pass; each replaces the previous run.
    let fired_runs = || async {
        let view = c.get("/v1/cronjobs/long").await?;
        Ok::<_, anyhow::Error>(
            view["firings"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|f| f["outcome"] == "Fired").count()),
        )
    };
    eventually(Duration::from_secs(40), "three slots fired", || async {
        Ok((fired_runs().await? >= 3).then_some(()))
    })
    .await?;
    let view = c.get("/v1/cronjobs/long").await?;
    let fired = view["firings"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|f| f["outcome"] == "Fired").count());
    assert!(fired >= 3, "{view}");
    // Never more than a moment of overlap: sample for 12 s.
    let start = Instant::now();
    let mut overlaps = 0;
    while start.elapsed() < Duration::from_secs(12) {
        if running(&node, "long")? > 1 {
            overlaps += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        overlaps <= 3,
        "runs overlapped in {overlaps} samples of 100 ms"
    );
    assert!(running(&node, "long")? <= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_then_recorded_failed() -> Result<()> {
    let (c, _node) = cluster("jb").await?;
    apply(
        &c,
        "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: flaky}\nspec:\n  image: bramble-testimg:latest\n  args: [\"exit\", \"3\"]\n  retries: 2\n",
    )
    .await?;
    let tasks: Vec<Value> =
        eventually(Duration::from_secs(60), "three failed attempts", || async {
            let tasks = c.get("/v1/tasks?workload=flaky").await?;
            let all = tasks.as_array().cloned().unwrap_or_default();
            let failed = all.iter().filter(|t| t["phase"] == "Failed").count();
            Ok((failed == 3).then_some(all))
        })
        .await?;
    let attempts: BTreeSet<u64> = tasks
        .iter()
        .map(|t| t["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(attempts, BTreeSet::from([0, 1, 2]));
    assert!(tasks.iter().all(|t| t["exitCode"] == 3), "{tasks:?}");
    // No fourth attempt comes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = c.get("/v1/tasks?workload=flaky").await?;
    assert_eq!(again.as_array().map(Vec::len), Some(3), "{again}");
    Ok(())
}

/// A finished run's container on `node`: Docker's `Created` and `State.StartedAt`, and
/// what its command printed (testimg's `now`: the instant it began, in microseconds).
struct RunContainer {
    created: SystemTime,
    started: SystemTime,
    began: SystemTime,
}

fn run_container(node: &str, task: &str) -> Result<RunContainer> {
    use bramble_tests::netns::parse_time;
    let docker = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("docker").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let ids = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=bramble.node={node}"),
        "--filter",
        &format!("label=bramble.task={task}"),
    ])?;
    let id = ids
        .lines()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no container for {task}"))?;
    let times = docker(&["inspect", "-f", "{{.Created}} {{.State.StartedAt}}", id])?;
    let (created, started) = times
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("inspect said {times:?}"))?;
    let when = |s: &str| parse_time(s).ok_or_else(|| anyhow::anyhow!("bad time {s}"));
    let printed = docker(&["logs", id])?;
    let micros: u64 = printed
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{task} printed {printed:?}, not its start instant"))?;
    Ok(RunContainer {
        created: when(created)?,
        started: when(started)?,
        began: UNIX_EPOCH + Duration::from_micros(micros),
    })
}

/// The finished runs of `workload`: (task id, slot), once there are `n`.
async fn finished_runs(
    c: &Controller,
    workload: &str,
    n: usize,
) -> Result<Vec<(String, SystemTime)>> {
    use bramble_tests::netns::parse_time;
    eventually(Duration::from_secs(40), "runs finished", || async {
        let tasks = c.get(&format!("/v1/tasks?workload={workload}")).await?;
        let done: Vec<(String, SystemTime)> = tasks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["phase"] == "Succeeded")
            .filter_map(|t| {
                Some((
                    t["id"].as_str()?.to_string(),
                    parse_time(t["slot"].as_str()?)?,
                ))
            })
            .collect();
        Ok((done.len() >= n).then_some(done))
    })
    .await
}

/// With the cron gate (the harness gives every agent the static one), a run's container
/// is made and started ahead of its slot and its command begins at the slot, never
/// before, by the command's own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slots_container_is_created_ahead_and_started_at_the_slot_never_before() -> Result<()> {
    let (c, node) = cluster("ca").await?;
    apply(&c, &cronjob("early", "[\"now\"]", "Allow")).await?;
    let runs = finished_runs(&c, "early", 3).await?;
    let (mut created_ahead, mut started_ahead) = (0, 0);
    for (task, slot) in &runs {
        let run = run_container(&node, task)?;
        assert!(
            run.began >= *slot,
            "{task}'s command began at {:?}, before its slot {slot:?}",
            run.began
        );
        created_ahead += usize::from(run.created < *slot);
        started_ahead += usize::from(run.started < *slot);
    }
    // Made and started ahead unless the machine was too slow to within the lead (2 s).
    assert!(
        created_ahead * 3 >= runs.len() * 2 && started_ahead * 3 >= runs.len() * 2,
        "of {} runs, {created_ahead} containers were made and {started_ahead} started ahead of their slot",
        runs.len()
    );
    Ok(())
}

/// A gate that passes every check but cannot run in a container (here cut short, so it
/// crashes at once) is found out on the first run: that run is made again without it
/// and still begins at its slot, as do all later ones, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_cannot_run_is_dropped_and_runs_still_start_at_their_slot() -> Result<()> {
    ensure_test_image().await?;
    let good = bramble_tests::cron_gate()?;
    let dir = tempfile::tempdir()?;
    let broken = dir.path().join("bramble-gate");
    let bytes = std::fs::read(&good)?;
    std::fs::write(&broken, &bytes[..2000.min(bytes.len())])?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755))?;
    let node = harness::unique("cg");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec!["--cron-gate".into(), broken.display().to_string()],
    })
    .await?;
    apply(&c, &cronjob("fallback", "[\"now\"]", "Allow")).await?;
    let runs = finished_runs(&c, "fallback", 3).await?;
    for (task, slot) in &runs {
        let run = run_container(&node, task)?;
        assert!(run.began >= *slot, "{task} began before its slot");
        assert!(
            run.started >= *slot,
            "{task} was started ahead, by the broken gate"
        );
    }
    let slots: BTreeSet<_> = runs.iter().map(|(_, s)| *s).collect();
    assert_eq!(slots.len(), runs.len(), "a slot ran twice: {runs:?}");
    let logs = c.logs();
    assert!(
        logs.contains("containers cannot run the cron gate"),
        "no word of the broken gate in the log"
    );
    Ok(())
}
