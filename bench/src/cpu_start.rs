//! `cpu-start`: Docker's create -> start of a container with a CPU limit, the limit given
//! with the create (Docker's way, and Swarm's) against the agent's way, set right after
//! the start; through the agent's own runtime, on the machine's engine, for a tiny, a
//! small and a mid-sized limit. Docker applies a CFS quota from the container's first
//! instruction, and runc's set-up in the container counts against it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use bramble_agent::runtime::Runtime;
use bramble_api::manifest::{Kind, Restart};
use bramble_api::quantity::{Cpu, Memory};
use bramble_api::task::{labels, TaskSpec};
use bramble_api::wire::Assignment;
use bramble_tests::netns::EventRecorder;
use bramble_tests::{ensure_test_image, unique_name, ContainerGuard, TEST_IMAGE};

use crate::{percentile, rerun};

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The limits measured, in millicores.
const LIMITS: [u64; 3] = [10, 100, 500];

fn assignment(task: &str, cpu: u64) -> Assignment {
    let spec = TaskSpec {
        sync: None,
        image: TEST_IMAGE.to_string(),
        command: None,
        args: Some(vec!["serve".into(), "8080".into()]),
        env: Default::default(),
        ports: vec![],
        volumes: vec![],
        resources: bramble_api::manifest::Resources {
            cpu: Some(Cpu(cpu)),
            memory: Some(Memory::mib(16)),
        },
        restart: Restart::default_for(Kind::Service),
        probes: Default::default(),
        timeout: None,
    };
    Assignment {
        restore_from: None,
        not_before: None,
        sync_to: Vec::new(),
        task: task.to_string(),
        kind: Kind::Service,
        workload: "cpu-start".into(),
        spec_hash: spec.hash(),
        spec,
        deadline: None,
        secrets: Default::default(),
        epoch: None,
    }
}

/// Create event -> start event of every container `events` saw, by container id.
fn gaps(events: &EventRecorder) -> HashMap<String, Duration> {
    let created: HashMap<String, _> = events
        .with_action("create")
        .into_iter()
        .map(|e| (e.id, e.at))
        .collect();
    events
        .with_action("start")
        .into_iter()
        .filter_map(|e| {
            let at = created.get(&e.id)?;
            Some((e.id, e.at.duration_since(*at).ok()?))
        })
        .collect()
}

pub async fn cpu_start(rounds: usize) -> Result<()> {
    ensure_test_image().await?;
    let node = unique_name("cpu-start");
    let _guard = ContainerGuard::node(&node);
    let rt = Runtime::connect(&node)
        .await
        .context("connecting to the machine's Docker engine")?;
    let events = EventRecorder::start(&format!("{}={node}", labels::NODE))?;
    // Per limit: the container ids of each way.
    let mut ids: Vec<(u64, Vec<String>, Vec<String>)> = Vec::new();
    for cpu in LIMITS {
        let (mut at_create, mut after_start) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Taken in turns, so that both ways see the same machine.
            let a = assignment(&format!("c{cpu}-{round}-create"), cpu);
            let id = rt.create(&a).await?;
            rt.start(&id).await?;
            rt.remove(&id).await?;
            at_create.push(id);
            let a = assignment(&format!("c{cpu}-{round}-after"), cpu);
            let id = rt.create_and_start(&a).await?;
            rt.remove(&id).await?;
            after_start.push(id);
        }
        println!("cpu-start: {cpu}m done");
        ids.push((cpu, at_create, after_start));
    }
    // The last start event may still be on its way from the engine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gaps = gaps(&events);
    let times = |ids: &[String]| -> Result<Vec<Duration>> {
        let mut t = ids
            .iter()
            .map(|id| gaps.get(id).copied().context("no create and start events"))
            .collect::<Result<Vec<_>>>()?;
        t.sort();
        Ok(t)
    };
    println!(
        "\nDocker create event -> start event of a container with a CPU limit, {rounds} rounds (median, p99):"
    );
    println!("  limit | limit with the create | limit after the start (the agent) | ratio");
    for (cpu, at_create, after_start) in &ids {
        let (a, b) = (times(at_create)?, times(after_start)?);
        let (pa, pb) = (percentile(&a, 0.5), percentile(&b, 0.5));
        let way = |t: &[Duration]| {
            format!(
                "{:>5} ms (p99 {:>5})",
                ms(percentile(t, 0.5)),
                ms(percentile(t, 0.99))
            )
        };
        println!(
            "  {:>4}m | {:<21} | {:<33} | {:.2}",
            cpu,
            way(&a),
            way(&b),
            pb.as_secs_f64() / pa.as_secs_f64().max(1e-9)
        );
    }
    rerun(&format!("cpu-start --rounds {rounds}"));
    Ok(())
}
