//! What a new user ran into, on a real one-node cluster: a run that cannot start must
//! not hold its CronJob's slots hostage; a task its node gave up must stay visible and
//! be retried; two replicas asking for one host port must not land on one node; a drain
//! of the only node must say its tasks found no other node; and a manifest nested
//! thousands of levels deep must be refused, not kill the controller.

use std::time::Duration;

use anyhow::{Context, Result};
use bramble_tests::harness::{self, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

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

async fn apply(c: &Controller, name: &str, yaml: &str) -> Result<reqwest::Response> {
    let body = serde_json::json!({"sources": [{"name": name, "content": yaml}]});
    Ok(bramble_tests::http()
        .post(format!("{}/v1/apply", c.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await?)
}

async fn tasks_of(c: &Controller, workload: &str) -> Result<Vec<Value>> {
    let all = c.get(&format!("/v1/tasks?workload={workload}")).await?;
    Ok(all.as_array().cloned().unwrap_or_default())
}

fn phase(t: &Value) -> &str {
    t["phase"].as_str().unwrap_or("")
}

fn message(t: &Value) -> &str {
    t["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_run_that_cannot_start_fails_at_its_deadline_and_frees_the_next_slots() -> Result<()>
{
    let (c, _node) = cluster("cronpull").await?;
    // Every 5 s, Forbid, a 3 s timeout, an image that cannot be pulled (no registry).
    let yaml = "apiVersion: bramble/v1
kind: CronJob
metadata: {name: payout}
spec:
  image: registry.invalid/pool/payout:1
  schedule: \"*/5 * * * * *\"
  concurrencyPolicy: Forbid
  startingDeadline: 30s
  timeout: 3s
  history: {successful: 10, failed: 10}
";
    let r = apply(&c, "payout.yaml", yaml).await?;
    anyhow::ensure!(r.status().is_success(), "apply: {}", r.text().await?);
    // Three slots fire, each run fails by its deadline, none is skipped as busy.
    let runs = eventually(WAIT, "three failed runs", || async {
        let ts = tasks_of(&c, "payout").await?;
        let failed: Vec<Value> = ts.into_iter().filter(|t| phase(t) == "Failed").collect();
        Ok((failed.len() >= 3).then_some(failed))
    })
    .await?;
    for t in &runs {
        let m = message(t);
        assert!(
            m.starts_with("timed out") || m.starts_with("failed on node"),
            "a run that never started says so: {t}"
        );
    }
    let job = c.get("/v1/cronjobs/payout").await?;
    let skipped = job["firings"]
        .as_array()
        .map(|f| f.iter().filter(|f| f["outcome"] == "Skipped").count())
        .unwrap_or(0);
    assert_eq!(skipped, 0, "no slot held hostage by a stuck run: {job}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_its_only_node_gave_up_is_visible_and_retried_with_backoff() -> Result<()> {
    let (c, node) = cluster("giveup").await?;
    // Crashes at once, every time: the agent gives up after 2 failures in the window.
    let yaml = "apiVersion: bramble/v1
kind: Service
metadata: {name: flaky}
spec:
  image: bramble-testimg:latest
  args: [\"exit\", \"3\"]
  restart: {policy: Always, backoff: {initial: 100ms, max: 200ms}, maxFailures: 2, window: 1m}
";
    let r = apply(&c, "flaky.yaml", yaml).await?;
    anyhow::ensure!(r.status().is_success(), "apply: {}", r.text().await?);
    let waiting = eventually(WAIT, "the give-up shown with its next try", || async {
        let ts = tasks_of(&c, "flaky").await?;
        Ok(ts
            .into_iter()
            .find(|t| message(t).starts_with("gave up on node")))
    })
    .await?;
    let m = message(&waiting);
    assert!(
        m.contains(&format!("gave up on node {node}: ")) && m.contains("retrying there at"),
        "the reason and the next try: {waiting}"
    );
    assert!(waiting["retryAt"].is_string(), "{waiting}");
    // Back on the node after the back-off: it is tried again (and gives up again),
    // never left Scheduled with nothing happening.
    let first_retry = waiting["retryAt"].as_str().unwrap_or_default().to_string();
    eventually(WAIT, "a second give-up, later", || async {
        let ts = tasks_of(&c, "flaky").await?;
        Ok(ts
            .into_iter()
            .find(|t| t["giveUps"].as_u64().is_some_and(|n| n >= 2))
            .filter(|t| t["retryAt"].as_str().is_some_and(|r| r != first_retry)))
    })
    .await?;
    let events = c.get("/v1/events?object=task/flaky").await?;
    let gave_up = events
        .as_array()
        .map(|es| es.iter().filter(|e| e["reason"] == "GaveUp").count())
        .unwrap_or(0);
    assert!(gave_up >= 2, "each give-up is an event: {events}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_host_port_do_not_share_the_only_node() -> Result<()> {
    let (c, node) = cluster("ports").await?;
    let port = harness::free_port();
    let yaml = format!(
        "apiVersion: bramble/v1
kind: Service
metadata: {{name: stratum}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"3333\"]
  ports: [{{container: 3333, host: {port}}}]
  replicas: 2
"
    );
    let r = apply(&c, "stratum.yaml", &yaml).await?;
    anyhow::ensure!(r.status().is_success(), "apply: {}", r.text().await?);
    let ts = eventually(WAIT, "one running, one waiting with the reason", || async {
        let ts = tasks_of(&c, "stratum").await?;
        let running = ts.iter().filter(|t| phase(t) == "Running").count();
        let waiting = ts
            .iter()
            .filter(|t| t["node"].is_null() && message(t).contains(&format!("port {port} in use")))
            .count();
        Ok((running == 1 && waiting == 1).then_some(ts))
    })
    .await?;
    // Nothing was started only to fail on the taken port.
    assert!(
        ts.iter().all(|t| !message(t).contains("already allocated")),
        "{ts:?}"
    );
    assert_eq!(harness::node_containers(&node, true)?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_the_only_node_says_its_tasks_found_no_other_node() -> Result<()> {
    let (c, node) = cluster("drain1").await?;
    let yaml = "apiVersion: bramble/v1
kind: Service
metadata: {name: web}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  replicas: 2
";
    let r = apply(&c, "web.yaml", yaml).await?;
    anyhow::ensure!(r.status().is_success(), "apply: {}", r.text().await?);
    eventually(WAIT, "two replicas running", || async {
        let ts = tasks_of(&c, "web").await?;
        Ok((ts.iter().filter(|t| phase(t) == "Running").count() == 2).then_some(()))
    })
    .await?;
    let out = c.ctl(&["drain", &node, "--timeout", "60s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!(
            "node/{node} drained: 2 tasks left it; 0 placed on other nodes, 2 waiting for a node (not running):"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("1 cordoned"), "with the reason: {stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_nested_thousands_deep_is_refused_and_the_controller_lives_on() -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let pid = c.pid().context("the controller runs")?;
    for deep in ["- ".repeat(4096), "[".repeat(8192), "{a: ".repeat(2048)] {
        let r = apply(&c, "deep.yaml", &deep).await?;
        assert_eq!(r.status().as_u16(), 422);
        let err: Value = r.json().await?;
        assert_eq!(err["code"], "invalid_manifest", "{err}");
        let detail = &err["details"][0];
        assert!(
            detail["message"]
                .as_str()
                .is_some_and(|m| m.contains("nested too deeply")),
            "{err}"
        );
        assert_eq!(detail["file"], "deep.yaml");
        assert!(detail["line"].as_u64().is_some_and(|l| l >= 1), "{err}");
    }
    // Still the same process, still answering.
    assert_eq!(c.pid(), Some(pid));
    let v = c.get("/v1/version").await?;
    assert!(v["version"].is_string());
    assert_eq!(c.get("/v1/workloads").await?, serde_json::json!([]));
    Ok(())
}
