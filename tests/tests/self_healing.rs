//! Self-healing, end to end: a controller and agents in their own network namespaces
//! ([`NetCluster`]), real Docker, real faults. Crash loops back off and move, hung
//! tasks are restarted by their liveness probe, powered-off nodes are replaced, a
//! partition never yields two wallets, a dead controller leaves containers alone, and
//! drain and cordon steer tasks.
//!
//! Timing comes from [`HEALING_FLAGS`]: heartbeat 500 ms, NotReady 1.5 s, Dead 2.5 s,
//! fence timeout 2 s and margin 2 s.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use bramble_tests::netns::{self, Container, ContainerEvent, NetCluster, Sample, HEALING_FLAGS};
use bramble_tests::{eventually, harness, unique_name};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// NotReady (when the leader suspects the node) + fence timeout + fence margin
/// ([`HEALING_FLAGS`]): how long after a silent node's last heartbeat the controller
/// may start its wallet elsewhere.
const WALLET_GRACE: Duration = Duration::from_secs(4);

/// How often the "never two wallets" samplers look.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A Service; `extra` is more of its spec, indented by two spaces.
fn service(name: &str, replicas: u32, args: &str, extra: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: {args}
  resources: {{cpu: 100m, memory: 16Mi}}
  replicas: {replicas}
{extra}"
    )
}

fn workload(name: &str) -> String {
    format!("bramble.workload={name}")
}

/// Waits until exactly `n` containers of the workload run, and returns them.
async fn running(
    cluster: &NetCluster,
    name: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Container>> {
    let label = workload(name);
    eventually(
        timeout,
        &format!("{n} running containers of {name}"),
        || async {
            let running = cluster.running(&label)?;
            if running.len() == n {
                Ok(Some(running))
            } else {
                bail!("running: {:?}", nodes_of(&running))
            }
        },
    )
    .await
}

fn nodes_of(cs: &[Container]) -> Vec<&str> {
    cs.iter().map(|c| c.node.as_str()).collect()
}

/// The one task of a single-task workload, as the controller sees it.
async fn only_task(cluster: &NetCluster, name: &str) -> Result<Value> {
    let mut tasks = cluster.tasks(name).await?;
    ensure!(tasks.len() == 1, "{name} has {} tasks", tasks.len());
    Ok(tasks.swap_remove(0))
}

/// The node's last heartbeat, by the controller's clock (this machine's).
async fn last_seen(cluster: &NetCluster, node: &str) -> Result<SystemTime> {
    let view = cluster.get(&format!("/v1/nodes/{node}")).await?;
    view["lastSeen"]
        .as_str()
        .and_then(netns::parse_time)
        .with_context(|| format!("node {node} without a lastSeen: {view}"))
}

/// Fails, with a timeline around the first offence, if any sample shows more than one
/// running container.
fn assert_never_two(samples: &[Sample], what: &str) {
    let start = samples.first().map(|s| s.at);
    let since = |at: SystemTime| {
        start
            .and_then(|s| at.duration_since(s).ok())
            .unwrap_or_default()
            .as_secs_f64()
    };
    if let Some(i) = samples.iter().position(|s| s.running.len() > 1) {
        let timeline: Vec<String> = samples[i.saturating_sub(10)..(i + 5).min(samples.len())]
            .iter()
            .map(|s| format!("  +{:.2}s {:?}", since(s.at), nodes_of(&s.running)))
            .collect();
        panic!(
            "{what}: two running at once at +{:.2}s:\n{}",
            since(samples[i].at),
            timeline.join("\n")
        );
    }
}

fn gap(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

fn on(events: &[ContainerEvent], node: &str) -> Vec<ContainerEvent> {
    events.iter().filter(|e| e.node == node).cloned().collect()
}

/// Whether `GET /v1/events` holds an event with this reason about this object.
async fn has_event(cluster: &NetCluster, object: &str, reason: &str) -> Result<bool> {
    Ok(cluster
        .events()
        .await?
        .iter()
        .any(|e| e["object"] == object && e["reason"] == reason))
}

/// Fails the test with a panic while the cluster still exists, so its Drop prints the
/// controller's and agents' logs (an `Err` returned from the test would drop it
/// quietly first).
fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_service_backs_off_gives_up_and_moves_to_another_node() {
    let mut cluster = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(crash_loop(&mut cluster).await);
}

async fn crash_loop(cluster: &mut NetCluster) -> Result<()> {
    let name = unique_name("crash");
    let events = cluster.record_events(&workload(&name))?;
    let restart =
        "  restart: {policy: Always, backoff: {initial: 1s, max: 4s}, maxFailures: 3, window: 1m}\n";
    cluster
        .apply(&service(&name, 1, "[\"exit\", \"1\", \"0.2\"]", restart))
        .await?;

    let first = eventually(WAIT, "the first start", || async {
        Ok(events.with_action("start").first().cloned())
    })
    .await?;
    // Same task, new node, and the node where it gave up is remembered.
    let moved = eventually(
        Duration::from_secs(45),
        "the task moved to the other node",
        || async {
            let t = only_task(cluster, &name).await?;
            let avoid: Vec<&str> = t["avoid"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let node = t["node"].as_str().unwrap_or_default();
            if !node.is_empty() && node != first.node && avoid.contains(&first.node.as_str()) {
                Ok(Some(t.clone()))
            } else {
                bail!("node {node:?}, avoid {avoid:?}, restarts {}", t["restarts"])
            }
        },
    )
    .await?;
    assert_eq!(moved["id"], first.task.as_str(), "the same task moves");
    let second = moved["node"].as_str().unwrap_or_default().to_string();
    // And it runs (and crash-loops) there.
    eventually(WAIT, "a start on the second node", || async {
        Ok(on(&events.with_action("start"), &second)
            .iter()
            .any(|e| e.task == first.task)
            .then_some(()))
    })
    .await?;

    // On the first node: maxFailures runs, each restart after a growing back-off
    // (1 s, then 2 s), counted from the exit.
    let starts = on(&events.with_action("start"), &first.node);
    let dies = on(&events.with_action("die"), &first.node);
    assert_eq!(
        starts.len(),
        3,
        "maxFailures = 3 runs on {} before giving up: {starts:#?}",
        first.node
    );
    assert!(dies.len() >= 2, "{dies:#?}");
    assert!(dies.iter().all(|d| d.exit_code == Some(1)), "{dies:#?}");
    let delays: Vec<Duration> = (0..2).map(|k| gap(dies[k].at, starts[k + 1].at)).collect();
    assert!(
        delays[0] >= Duration::from_millis(900),
        "first restart after {delays:?}, back-off starts at 1s"
    );
    assert!(
        delays[1] >= Duration::from_millis(1800)
            && delays[1] >= delays[0] + Duration::from_millis(500),
        "back-off must grow (1s, 2s): {delays:?}"
    );
    assert!(
        has_event(cluster, &format!("task/{}", first.task), "GaveUp").await?,
        "a GaveUp event for task/{}",
        first.task
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_service_failing_its_liveness_probe_is_restarted() {
    // HTTP probes reach the container on Docker's bridge, which only the host
    // namespace can: this node's agent runs there.
    let mut cluster = NetCluster::start(0, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(hung_task(&mut cluster).await);
}

async fn hung_task(cluster: &mut NetCluster) -> Result<()> {
    let node = cluster.add_host_node().await?;
    let name = unique_name("hung");
    let events = cluster.record_events(&workload(&name))?;
    let extra =
        "  restart: {policy: Always, backoff: {initial: 1s, max: 4s}, maxFailures: 10, window: 1m}
  probes:
    liveness: {http: {port: 8080, path: /healthz}, period: 1s, timeout: 1s, failureThreshold: 2}
";
    // Answers /healthz for 3 s, then accepts connections but never answers: alive, hung.
    cluster
        .apply(&service(&name, 1, "[\"hang\", \"8080\", \"3\"]", extra))
        .await?;

    let task = eventually(
        Duration::from_secs(60),
        "two restarts by the probe",
        || async {
            let t = only_task(cluster, &name).await?;
            let starts = events.with_action("start").len();
            if t["restarts"].as_u64().unwrap_or(0) >= 2 && starts >= 3 {
                Ok(Some(t))
            } else {
                bail!("restarts {}, {starts} starts", t["restarts"])
            }
        },
    )
    .await?;
    assert_eq!(task["node"], node.as_str(), "restarted in place");
    // testimg never exits by itself in `hang`: every exit was the agent stopping it,
    // and never before the hang began (3 s) and was seen twice.
    let starts = events.with_action("start");
    let dies = events.with_action("die");
    assert!(dies.len() >= 2, "{dies:#?}");
    for (start, die) in starts.iter().zip(&dies) {
        let ran = gap(start.at, die.at);
        assert!(
            ran >= Duration::from_secs(3),
            "a healthy container was stopped after {ran:?}"
        );
    }
    assert!(
        has_event(
            cluster,
            &format!("task/{}", task["id"].as_str().unwrap_or_default()),
            "ProbeFailed"
        )
        .await?,
        "a ProbeFailed event"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_on_a_powered_off_node_runs_on_another_node_after_the_fence_grace() {
    let mut cluster = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(wallet_power_off(&mut cluster).await);
}

async fn wallet_power_off(cluster: &mut NetCluster) -> Result<()> {
    let name = unique_name("wallet");
    let events = cluster.record_events(&workload(&name))?;
    cluster.apply(&harness::wallet(&name)).await?;
    let before = running(cluster, &name, 1, WAIT).await?.remove(0);

    let sampler = cluster.sample(&workload(&name), SAMPLE_EVERY);
    let off = Instant::now();
    cluster.power_off(&before.node)?;
    let after = eventually(WAIT, "the wallet running on another node", || async {
        let running = cluster.running(&workload(&name))?;
        match running.as_slice() {
            [c] if c.node != before.node => Ok(Some(c.clone())),
            _ => bail!("running: {:?}", nodes_of(&running)),
        }
    })
    .await?;
    let took = off.elapsed();
    assert_never_two(&sampler.stop(), "wallet after power-off");
    assert_eq!(after.task, before.task, "the same task, on a new node");
    eprintln!("wallet running on {} {took:?} after power-off", after.node);

    // Not before fence timeout + margin since the lost node's last heartbeat.
    let seen = last_seen(cluster, &before.node).await?;
    let started = on(&events.with_action("start"), &after.node);
    let started = started.first().context("a start event on the new node")?;
    assert!(
        gap(seen, started.at) >= WALLET_GRACE,
        "wallet started {:?} after the last heartbeat, before the {WALLET_GRACE:?} grace",
        gap(seen, started.at)
    );
    cluster
        .wait_status(&before.node, "Dead", Duration::from_secs(10))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_replicas_of_a_powered_off_node_are_replaced_on_the_others() {
    let mut cluster = NetCluster::start_with_engines(3, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(service_power_off(&mut cluster).await);
}

async fn service_power_off(cluster: &mut NetCluster) -> Result<()> {
    let name = unique_name("web");
    cluster
        .apply(&service(&name, 3, "[\"serve\", \"8080\"]", ""))
        .await?;
    let before = running(cluster, &name, 3, WAIT).await?;
    let spread: BTreeSet<&str> = nodes_of(&before).into_iter().collect();
    assert_eq!(spread.len(), 3, "one replica per node: {spread:?}");
    let tasks: BTreeSet<String> = before.iter().map(|c| c.task.clone()).collect();

    let lost = cluster.node(0).to_string();
    cluster.power_off(&lost)?;
    let after = eventually(WAIT, "3 replicas on the remaining nodes", || async {
        let running = cluster.running(&workload(&name))?;
        if running.len() == 3 && running.iter().all(|c| c.node != lost) {
            Ok(Some(running))
        } else {
            bail!("running: {:?}", nodes_of(&running))
        }
    })
    .await?;
    let moved: BTreeSet<String> = after.iter().map(|c| c.task.clone()).collect();
    assert_eq!(moved, tasks, "the same tasks, replaced, not new ones");
    cluster.wait_status(&lost, "Dead", WAIT).await?;
    assert!(has_event(cluster, &format!("node/{lost}"), "NodeDead").await?);

    // The node comes back: it is Ready and gets its (now empty) task set; the replicas
    // stay where they are, and none is doubled.
    cluster.power_on(&lost)?;
    cluster.wait_ready(&lost).await?;
    let back = running(cluster, &name, 3, WAIT).await?;
    assert!(back.iter().all(|c| c.node != lost), "{:?}", nodes_of(&back));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_wallet_node_never_yields_two_running_wallets_and_heals_to_one() {
    let mut cluster = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(partition(&mut cluster).await);
}

async fn partition(cluster: &mut NetCluster) -> Result<()> {
    let name = unique_name("wallet");
    let label = workload(&name);
    let events = cluster.record_events(&label)?;
    cluster.apply(&harness::wallet(&name)).await?;
    let before = running(cluster, &name, 1, WAIT).await?.remove(0);
    let cut = before.node.clone();

    let sampler = cluster.sample(&label, SAMPLE_EVERY);
    let partitioned = Instant::now();
    let partitioned_at = SystemTime::now();
    cluster.partition(&cut)?;
    // During the partition: the cut-off agent stops its wallet itself (fence), and the
    // controller starts it on the other node.
    let moved = eventually(
        Duration::from_secs(19),
        "the wallet running on the other node",
        || async {
            let running = cluster.running(&label)?;
            match running.as_slice() {
                [c] if c.node != cut => Ok(Some(c.clone())),
                _ => bail!("running: {:?}", nodes_of(&running)),
            }
        },
    )
    .await;
    // Missing the move is a failure; two at once meanwhile is the worse one, so it is
    // reported first, with its timeline.
    let moved = match moved {
        Ok(c) => c,
        Err(e) => {
            assert_never_two(&sampler.stop(), "wallet during a partition");
            return Err(e);
        }
    };
    // The partition lasts 20 s whatever happens inside it: the length of the fault,
    // not a wait for something.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(partitioned.elapsed())).await;
    cluster.heal(&cut)?;
    cluster.wait_ready(&cut).await?;
    // Healed: one wallet, where the controller put it, and no stale copy left on the
    // node that came back (not even a stopped one).
    eventually(
        WAIT,
        "exactly one wallet and nothing left on the healed node",
        || async {
            let all = cluster.containers(&label, true)?;
            let running = cluster.running(&label)?;
            if running.len() == 1 && running[0].node == moved.node && all.len() == 1 {
                Ok(Some(()))
            } else {
                bail!("running {:?}, all {:?}", nodes_of(&running), nodes_of(&all))
            }
        },
    )
    .await?;
    let samples = sampler.stop();
    assert!(
        samples.len() >= 100,
        "only {} samples in over 20 s",
        samples.len()
    );
    assert_never_two(&samples, "wallet during and after a partition");

    // Exactly, by Docker's clock: the old copy died before the new one started, and
    // the new one started no earlier than the grace after the last heartbeat.
    let died = on(&events.with_action("die"), &cut);
    let died = died.first().context("the fenced wallet's exit")?;
    let started = on(&events.with_action("start"), &moved.node);
    let started = started.first().context("the new wallet's start")?;
    assert!(died.at <= started.at, "{died:?} after {started:?}");
    eprintln!(
        "fenced {:?} and respawned {:?} after the partition began",
        gap(partitioned_at, died.at),
        gap(partitioned_at, started.at)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_containers_run_untouched_while_the_controller_is_down_and_are_not_copied() {
    let mut cluster = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(controller_outage(&mut cluster).await);
}

async fn controller_outage(cluster: &mut NetCluster) -> Result<()> {
    let name = unique_name("web");
    let label = workload(&name);
    let events = cluster.record_events(&label)?;
    cluster
        .apply(&service(&name, 2, "[\"serve\", \"8080\"]", ""))
        .await?;
    let ids = |cs: &[Container]| cs.iter().map(|c| c.id.clone()).collect::<BTreeSet<_>>();
    let before = ids(&running(cluster, &name, 2, WAIT).await?);
    let tasks_before: BTreeSet<String> = cluster
        .tasks(&name)
        .await?
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect();
    let settled = events.events().len();

    cluster.kill_controller();
    let down = Instant::now();
    // The outage lasts 30 s; look every half second that the same containers run.
    while down.elapsed() < Duration::from_secs(30) {
        let now = ids(&cluster.running(&label)?);
        assert_eq!(
            now,
            before,
            "containers changed {:?} into the outage",
            down.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.restart_controller().await?;
    for node in cluster.nodes() {
        cluster.wait_ready(&node).await?;
    }
    eventually(WAIT, "both tasks Running again", || async {
        let tasks = cluster.tasks(&name).await?;
        let running = tasks.iter().filter(|t| t["phase"] == "Running").count();
        Ok((running == 2).then_some(()))
    })
    .await?;
    let tasks_after: BTreeSet<String> = cluster
        .tasks(&name)
        .await?
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(tasks_after, tasks_before);
    assert_eq!(ids(&cluster.containers(&label, true)?), before, "no copies");
    let changes: Vec<ContainerEvent> = events.events().split_off(settled);
    assert!(
        changes.is_empty(),
        "nothing may happen to the containers: {changes:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_task_off_a_node_and_cordon_keeps_new_tasks_off_it() {
    let mut cluster = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    check(drain_and_cordon(&mut cluster).await);
}

async fn drain_and_cordon(cluster: &mut NetCluster) -> Result<()> {
    let web = unique_name("web");
    let coin = unique_name("wallet");
    cluster
        .apply(&service(&web, 2, "[\"serve\", \"8080\"]", ""))
        .await?;
    cluster.apply(&harness::wallet(&coin)).await?;
    let spread: BTreeSet<String> = running(cluster, &web, 2, WAIT)
        .await?
        .into_iter()
        .map(|c| c.node)
        .collect();
    assert_eq!(spread.len(), 2, "one replica per node");
    // Drain the wallet's node, so the wallet has to move too.
    let drained = running(cluster, &coin, 1, WAIT).await?.remove(0).node;
    let other = cluster
        .nodes()
        .into_iter()
        .find(|n| *n != drained)
        .context("a second node")?;

    let sampler = cluster.sample(&workload(&coin), SAMPLE_EVERY);
    let answer = cluster.drain(&drained, "60s").await?;
    assert_never_two(&sampler.stop(), "wallet while draining");
    assert_eq!(answer["node"], drained.as_str(), "{answer}");
    assert_eq!(answer["moved"], 2, "a replica and the wallet: {answer}");
    assert_eq!(answer["remaining"], 0, "{answer}");
    assert!(
        cluster
            .containers(&format!("bramble.node={drained}"), true)?
            .is_empty(),
        "nothing left on the drained node"
    );
    let moved = running(cluster, &web, 2, WAIT).await?;
    assert!(
        moved.iter().all(|c| c.node == other),
        "{:?}",
        nodes_of(&moved)
    );
    assert_eq!(running(cluster, &coin, 1, WAIT).await?[0].node, other);
    let view = cluster.get(&format!("/v1/nodes/{drained}")).await?;
    assert_eq!(
        view["cordoned"], true,
        "a drained node stays cordoned: {view}"
    );

    // Cordoned: new tasks go elsewhere even though spreading would pick this node.
    let later = unique_name("web");
    cluster
        .apply(&service(&later, 2, "[\"serve\", \"8080\"]", ""))
        .await?;
    let placed = running(cluster, &later, 2, WAIT).await?;
    assert!(
        placed.iter().all(|c| c.node == other),
        "{:?}",
        nodes_of(&placed)
    );

    // Uncordoned: it takes new tasks again.
    let view = cluster.uncordon(&drained).await?;
    assert_eq!(view["cordoned"], false, "{view}");
    let last = unique_name("web");
    cluster
        .apply(&service(&last, 2, "[\"serve\", \"8080\"]", ""))
        .await?;
    let kept = running(cluster, &last, 2, WAIT).await?;
    assert!(
        kept.iter().any(|c| c.node == drained),
        "{:?}",
        nodes_of(&kept)
    );

    // And cordon by itself (no drain, and this time through bramblectl) keeps new tasks
    // off without moving old ones.
    let out = cluster.controller().ctl(&["cordon", &drained]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("node/{drained} cordoned")),
        "bramblectl cordon: {out:?}"
    );
    let view = cluster.get(&format!("/v1/nodes/{drained}")).await?;
    assert_eq!(view["cordoned"], true, "{view}");
    let one_more = unique_name("web");
    cluster
        .apply(&service(&one_more, 2, "[\"serve\", \"8080\"]", ""))
        .await?;
    let placed = running(cluster, &one_more, 2, WAIT).await?;
    assert!(
        placed.iter().all(|c| c.node == other),
        "{:?}",
        nodes_of(&placed)
    );
    let ids = |cs: &[Container]| cs.iter().map(|c| c.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&running(cluster, &last, 2, WAIT).await?),
        ids(&kept),
        "cordon alone moves nothing"
    );
    assert!(has_event(cluster, &format!("node/{drained}"), "Drained").await?);
    let out = cluster
        .controller()
        .ctl(&["events", "--for", &format!("node/{drained}")]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Drained"),
        "bramblectl events: {out:?}"
    );
    Ok(())
}
