//! `bramble-bench etcd-rest`: three controllers on a three-member etcd with a dozen
//! agents heartbeating, at rest: how many etcd writes (revisions) and how much etcd
//! database growth that costs, and what the controllers and etcd members hold in memory.
//!
//! `bramble-bench leader-kill`: the same cluster with three agents, the leader killed
//! again and again: how long until a new leader acts, whether any Wallet or Service
//! container restarts meanwhile, apply latency through a follower, and a node's
//! power-off with three controllers.
//!
//! Everything is real and local: etcd members on loopback (Debian's etcd-server),
//! controller and agent processes, one Docker for the agents' containers.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts};

use super::{apply, apply_yaml, delete, mib, rerun, running_count, summary, wait_ready};

#[path = "../../controller/tests/support/etcd.rs"]
mod etcd;

/// (revision, database size in bytes) as etcd reports them.
async fn etcd_state(client: &mut etcd_client::Client) -> Result<(i64, i64)> {
    let status = client.status().await.context("etcd status")?;
    let revision = status
        .header()
        .map(|h| h.revision())
        .context("etcd status has no header")?;
    Ok((revision, status.db_size()))
}

/// Runs the benchmark for `minutes` with `nodes` agents and three controllers.
pub async fn etcd_rest(minutes: u64, nodes: usize) -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let store = etcd::Etcd::start(3).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("bench"));
    let first = Controller::start(ControllerOpts::etcd(&endpoints, &prefix)).await?;
    let mut controllers = vec![first];
    for _ in 0..2 {
        let c =
            Controller::start_sharing(ControllerOpts::etcd(&endpoints, &prefix), &controllers[0])
                .await?;
        controllers.push(c);
    }
    let urls = controllers
        .iter()
        .map(Controller::url)
        .collect::<Vec<_>>()
        .join(",");
    // The leader hears the agents; any controller answers the API.
    let leader = {
        let t = Instant::now();
        loop {
            let mut found = None;
            for (i, c) in controllers.iter().enumerate() {
                let list = c.get("/v1/controllers").await?;
                let me_leads = list.as_array().is_some_and(|l| {
                    l.iter()
                        .any(|m| m["answering"] == true && m["leader"] == true)
                });
                if me_leads {
                    found = Some(i);
                }
            }
            if let Some(i) = found {
                break i;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("no controller leads after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let c = &controllers[leader];
    let token = c.join_token()?;
    let name = harness::unique("rest");
    let mut agents = Vec::with_capacity(nodes);
    for i in 0..nodes {
        agents.push(Agent::start_with(&urls, &token, &format!("{name}-{i}"))?);
    }
    for a in &agents {
        wait_ready(c, &a.node).await?;
    }
    for i in 0..nodes {
        apply(c, &format!("rest-{i}")).await?;
    }
    let t = Instant::now();
    while running_count(c, None).await? < nodes {
        if t.elapsed() > Duration::from_secs(180) {
            bail!("{nodes} tasks not running after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(15)).await;

    let mut client = store.client().await;
    let (rev_before, db_before) = etcd_state(&mut client).await?;
    let start = Instant::now();
    let run = Duration::from_secs(minutes * 60);
    let mut rss_max = vec![0u64; controllers.len()];
    while start.elapsed() < run {
        for (i, c) in controllers.iter().enumerate() {
            if let Some(rss) = c.pid().and_then(harness::rss_bytes) {
                rss_max[i] = rss_max[i].max(rss);
            }
        }
        tokio::time::sleep(Duration::from_secs(10).min(run.saturating_sub(start.elapsed()))).await;
    }
    let (rev_after, db_after) = etcd_state(&mut client).await?;
    let elapsed = start.elapsed().as_secs_f64() / 60.0;
    println!(
        "etcd at rest: 3 etcd members, 3 controllers, {nodes} agents heartbeating every 250 ms, {nodes} tasks, {minutes} min, {} binaries:",
        harness::PROFILE
    );
    println!(
        "  etcd writes (revisions): {} ({:.2} per minute; budget 0)",
        rev_after - rev_before,
        (rev_after - rev_before) as f64 / elapsed
    );
    println!("  etcd database: {db_before} bytes before, {db_after} after");
    for (i, c) in controllers.iter().enumerate() {
        let role = if i == leader { "leader" } else { "follower" };
        let now = c.pid().and_then(harness::rss_bytes).unwrap_or(0);
        println!(
            "  controller {i} ({role}) RSS: {} now, {} max",
            mib(now),
            mib(rss_max[i])
        );
    }
    let members = store.pids();
    for (i, pid) in members.iter().enumerate() {
        if let Some(rss) = harness::rss_bytes(*pid) {
            println!("  etcd member {i} RSS: {}", mib(rss));
        }
    }
    rerun(&format!("etcd-rest --minutes {minutes} --nodes {nodes}"));
    drop(agents);
    for a in 0..nodes {
        harness::remove_node_containers(&format!("{name}-{a}"));
    }
    Ok(())
}

/// Three controllers on `endpoints` under `prefix`, the first one's identity shared.
async fn three_controllers(endpoints: &str, prefix: &str) -> Result<Vec<Controller>> {
    let first = Controller::start(ControllerOpts::etcd(endpoints, prefix)).await?;
    let mut controllers = vec![first];
    for _ in 0..2 {
        let c = Controller::start_sharing(ControllerOpts::etcd(endpoints, prefix), &controllers[0])
            .await?;
        controllers.push(c);
    }
    Ok(controllers)
}

/// Which of `controllers` (skipping `down`) says it leads, if any.
async fn leader_of(controllers: &[Controller], down: Option<usize>) -> Option<usize> {
    for (i, c) in controllers.iter().enumerate() {
        if Some(i) == down {
            continue;
        }
        let Ok(list) = c.get("/v1/controllers").await else {
            continue;
        };
        let leads = list.as_array().is_some_and(|l| {
            l.iter()
                .any(|m| m["answering"] == true && m["leader"] == true)
        });
        if leads {
            return Some(i);
        }
    }
    None
}

/// Whether every node is Ready on `c`.
async fn all_ready(c: &Controller, nodes: &[String]) -> bool {
    for n in nodes {
        let ready = c
            .get(&format!("/v1/nodes/{n}"))
            .await
            .is_ok_and(|v| v["status"] == "Ready");
        if !ready {
            return false;
        }
    }
    true
}

/// The running containers of a workload on the machine's Docker: (id, node).
fn containers_of(workload: &str) -> Result<Vec<(String, String)>> {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=bramble.workload={workload}"),
            "--format",
            "{{.ID}} {{.Label \"bramble.node\"}}",
        ])
        .output()
        .context("docker ps")?;
    if !out.status.success() {
        bail!("docker ps: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, node)| (id.to_string(), node.to_string()))
        .collect())
}

fn wallet_manifest(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {{name: {name}}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  resources: {{cpu: 100m, memory: 8Mi}}\n"
    )
}

/// Runs `rounds` leader kills, then `power_offs` node power-offs.
pub async fn leader_kill(rounds: usize, power_offs: usize) -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let store = etcd::Etcd::start(3).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("bench"));
    let mut controllers = three_controllers(&endpoints, &prefix).await?;
    let urls = controllers
        .iter()
        .map(Controller::url)
        .collect::<Vec<_>>()
        .join(",");
    let t = Instant::now();
    let mut leader = loop {
        if let Some(i) = leader_of(&controllers, None).await {
            break i;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no controller leads after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let token = controllers[leader].join_token()?;
    let name = harness::unique("kill");
    let nodes: Vec<String> = (0..3).map(|i| format!("{name}-{i}")).collect();
    let mut agents = Vec::new();
    for n in &nodes {
        agents.push(Agent::start_with(&urls, &token, n)?);
    }
    for n in &nodes {
        wait_ready(&controllers[leader], n).await?;
    }
    let wallet = harness::unique("kw");
    let service = harness::unique("ks");
    apply_yaml(&controllers[leader], &wallet, &wallet_manifest(&wallet)).await?;
    apply(&controllers[leader], &service).await?;
    let t = Instant::now();
    let (wallet_id, service_id) = loop {
        let (w, s) = (containers_of(&wallet)?, containers_of(&service)?);
        if let ([w], [s]) = (w.as_slice(), s.as_slice()) {
            break (w.0.clone(), s.0.clone());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the wallet and the service did not start");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut takeovers = Vec::with_capacity(rounds);
    let mut follower_applies = Vec::with_capacity(rounds);
    let mut wallet_gaps = 0usize;
    let mut wallet_changes = 0usize;
    let mut service_changes = 0usize;
    let mut doubled = 0usize;
    for round in 0..rounds {
        let killed = leader;
        let t0 = Instant::now();
        controllers[killed].kill9();
        let took = loop {
            let w = containers_of(&wallet)?;
            match w.as_slice() {
                [] => wallet_gaps += 1,
                [one] if one.0 != wallet_id => wallet_changes += 1,
                [_] => {}
                _ => doubled += 1,
            }
            if containers_of(&service)?
                .first()
                .is_none_or(|s| s.0 != service_id)
            {
                service_changes += 1;
            }
            if let Some(i) = leader_of(&controllers, Some(killed)).await {
                if all_ready(&controllers[i], &nodes).await {
                    leader = i;
                    break t0.elapsed();
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: no new leader acting after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        takeovers.push(took);
        // A write through a follower (the third controller is down): apply -> running.
        let follower = (0..3)
            .find(|i| *i != leader && *i != killed)
            .unwrap_or(leader);
        let probe = format!("{service}-p{round}");
        let t1 = Instant::now();
        apply(&controllers[follower], &probe).await?;
        while containers_of(&probe)?.is_empty() {
            if t1.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: {probe} not running after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        follower_applies.push(t1.elapsed());
        delete(&controllers[follower], &probe).await?;
        controllers[killed].restart().await?;
        // Back as a follower, and listed by the leader.
        let t2 = Instant::now();
        loop {
            let listed = controllers[leader]
                .get("/v1/controllers")
                .await
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            if listed == 3 {
                break;
            }
            if t2.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: the restarted controller never came back");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Agents dial the restarted controller again for their standby links.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let mut power_off_times = Vec::with_capacity(power_offs);
    let mut power_off_doubled = 0usize;
    for round in 0..power_offs {
        let w = containers_of(&wallet)?;
        let Some((_, node)) = w.first().cloned() else {
            bail!("power-off round {round}: no wallet running");
        };
        let i = nodes
            .iter()
            .position(|n| *n == node)
            .context("the wallet's node is one of ours")?;
        let t0 = Instant::now();
        // Power off: the agent dies and its containers with it.
        agents[i].kill9();
        harness::remove_node_containers(&node);
        let took = loop {
            let w = containers_of(&wallet)?;
            if w.len() > 1 {
                power_off_doubled += 1;
            }
            if w.iter().any(|(_, n)| *n != node) {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("power-off round {round}: the wallet did not run elsewhere in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        power_off_times.push(took);
        agents[i].restart()?;
        wait_ready(&controllers[leader], &node).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    println!(
        "leader kill: 3 etcd members, 3 controllers (lease 6 s, defaults), 3 agents listing all three, {} binaries:",
        harness::PROFILE
    );
    println!(
        "  kill -9 leader -> new leader acting (all nodes Ready on it): {}   ({rounds} rounds)",
        summary(&mut takeovers)
    );
    println!(
        "  Wallet during the kills: {wallet_gaps} samples with none running, {wallet_changes} with another container, {doubled} with two (every 50 ms; all must be 0)"
    );
    println!("  Service replica restarted during the kills: {service_changes} samples (must be 0)");
    println!(
        "  apply -> running through a follower (one controller down): {}   ({rounds} rounds)",
        summary(&mut follower_applies)
    );
    if power_offs > 0 {
        println!(
            "  node power-off -> Wallet running elsewhere: {}   ({power_offs} rounds; {power_off_doubled} samples with two)",
            summary(&mut power_off_times)
        );
    }
    for (i, c) in controllers.iter().enumerate() {
        let role = if i == leader { "leader" } else { "follower" };
        let rss = c.pid().and_then(harness::rss_bytes).unwrap_or(0);
        println!("  controller {i} ({role}) RSS: {}", mib(rss));
    }
    for (i, pid) in store.pids().iter().enumerate() {
        if let Some(rss) = harness::rss_bytes(*pid) {
            println!("  etcd member {i} RSS: {}", mib(rss));
        }
    }
    // Each agent keeps a TLS link to every controller.
    for (i, a) in agents.iter().enumerate() {
        if let Some(rss) = a.pid().and_then(harness::rss_bytes) {
            println!(
                "  agent {i} (a link to each of 3 controllers) RSS: {}",
                mib(rss)
            );
        }
    }
    rerun(&format!(
        "leader-kill --rounds {rounds} --power-offs {power_offs}"
    ));
    drop(agents);
    for n in &nodes {
        harness::remove_node_containers(n);
    }
    Ok(())
}
