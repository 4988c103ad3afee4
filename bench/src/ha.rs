//! `bramble-bench etcd-rest`: three controllers on a three-member etcd with a dozen
//! agents heartbeating, at rest: how many etcd writes (revisions) and how much etcd
//! database growth that costs, and what the controllers and etcd members hold in memory.
//!
//! Everything is real and local: etcd members on loopback (Debian's etcd-server),
//! controller and agent processes, one Docker for the agents' containers.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts};

use super::{apply, mib, rerun, running_count, wait_ready};

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
