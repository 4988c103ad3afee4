//! Bramble benchmarks. Each prints its figures and the command that reruns it.
//! Figures, not assertions: these machines are noisy, so nothing here fails on a number.

mod compare;
mod cpu_start;
mod dashboard;
mod ha;
mod link;
mod names;
mod scale;
mod volumes;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::netns::{self, EventRecorder, NetCluster, Sampler};
use bramble_tests::unique_name;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bramble-bench",
    about = "Bramble benchmarks: figures and how to rerun them"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Clone)]
enum What {
    /// Everything below.
    All,
    /// `apply` → container running, image present (p50/p99).
    ApplyLatency {
        /// Number of applies.
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// Resident memory: agent idle and with 10 tasks, controller with 10 workloads.
    Memory,
    /// Names that follow workloads (2 nodes with their own engines): latency and
    /// throughput through the agents' proxies, an agent's memory with 50 workloads'
    /// endpoints, and wallet started elsewhere -> first call by name. Not in `all`.
    Names {
        /// Wallet moves.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Volumes that follow a wallet: bytes sent by a sync of an unchanged 1 GiB volume,
    /// standby writes per hour for an idle wallet, restore time of 100 MiB, and failover
    /// with and without a copy (3 nodes with their own engines). Not in `all`.
    Volumes {
        /// Failovers with a copy, and as many without.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Failover on a 3-node cluster in network namespaces: node power-off until a
    /// Service replica and a Wallet run elsewhere, a container crash until it runs
    /// again, and partitions watched for two wallets at once.
    Failover {
        /// Rounds of each kind of fault.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Controller memory with 12 agents heartbeating and the dashboard's stream open;
    /// bytes of the first page load and per minute of live updates. Not in `all` (long).
    Dashboard {
        /// How long the stream stays open.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Agents (nodes), one task each.
        #[arg(long, default_value_t = 12)]
        nodes: usize,
    },
    /// CronJob firing lateness: scheduled time -> container started (p50/p99), on a
    /// controller with its local agent and a 6-field every-2-seconds schedule.
    Cron {
        /// Firings to measure.
        #[arg(long, default_value_t = 100)]
        firings: usize,
    },
    /// The agent link over TLS: handshake time, an idle agent's CPU and memory, and
    /// reconnect time after controller restarts.
    Link {
        /// Handshakes (x5) and controller restarts.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// How long the idle agent's CPU is measured.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
    },
    /// Controller memory under fake nodes joining with the join token: 2.7 MB
    /// heartbeats (refused), then heartbeats at every limit.
    FakeNodes {
        /// Fake nodes per phase.
        #[arg(long, default_value_t = 40)]
        nodes: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 20)]
        secs: u64,
    },
    /// Three controllers on a three-member etcd with 12 agents, at rest: etcd writes
    /// (revisions) and database growth, controller and etcd memory. Not in `all` (long).
    EtcdRest {
        /// How long it rests.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Agents (nodes), one task each.
        #[arg(long, default_value_t = 12)]
        nodes: usize,
    },
    /// Three controllers on a three-member etcd, three agents listing all three: the
    /// leader killed (kill -9) round after round: time to a new leader acting, Wallet
    /// and Service restarts (must be 0), apply -> running through a follower, then
    /// node power-offs: Wallet running elsewhere. Not in `all` (long).
    LeaderKill {
        /// Leader kills.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Node power-offs.
        #[arg(long, default_value_t = 5)]
        power_offs: usize,
    },
    /// The controller at rest at scale: simulated agents (the real wire protocol over
    /// TLS, no Docker) heartbeating, Services of ten replicas on them; CPU, RSS, store
    /// writes at rest, and the dashboard stream's bytes per minute. Not in `all`.
    Scale {
        /// Simulated nodes.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Tasks (rounded up to tens).
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
        /// The controller's heartbeat interval in milliseconds; its health thresholds
        /// keep their default ratios to it.
        #[arg(long, default_value_t = 250)]
        heartbeat_ms: u64,
        /// Seconds measured at rest, without and then with a dashboard stream.
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// Bramble and Docker Swarm side by side on the same harness (nodes in network
    /// namespaces, each with its own dockerd): create -> running, crash -> running,
    /// power-off and partition -> replacement, 10 replicas, memory; Swarm at its
    /// defaults and tuned. One table. Not in `all` (about 15 minutes).
    Compare {
        /// Rounds of each scenario.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Docker's create -> start of a container with a CPU limit (10m, 100m, 500m): the
    /// limit with the create against the agent's way, set right after the start; on the
    /// machine's engine.
    CpuStart {
        /// Containers of each way per limit.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Scheduler placements per second on 1,000 nodes.
    Scheduler {
        /// Nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Tasks to place.
        #[arg(long, default_value_t = 10_000)]
        tasks: usize,
    },
}

fn rerun(args: &str) {
    println!("  rerun: cargo run --release -p bramble-bench -- {args}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The benches' tasks ask for 100m CPU: Docker enforces a CPU request as a CFS quota
/// from the container's first instruction, and under a tiny one (10m) even `runc init`
/// is throttled, so a start takes about 2 s instead of 0.25 s on the test machine.
fn manifest(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"sleep\", \"100000\"]\n  resources: {{cpu: 100m, memory: 8Mi}}\n"
    )
}

async fn apply(c: &Controller, name: &str) -> Result<()> {
    apply_yaml(c, name, &manifest(name)).await
}

/// Applies `yaml` as the file `{name}.yaml`.
async fn apply_yaml(c: &Controller, name: &str, yaml: &str) -> Result<()> {
    let body = serde_json::json!({"sources": [{"name": format!("{name}.yaml"), "content": yaml}]});
    let r = bramble_tests::http()
        .post(format!("{}/v1/apply", c.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("apply {name}: {}", r.text().await?);
    }
    Ok(())
}

async fn delete(c: &Controller, name: &str) -> Result<()> {
    bramble_tests::http()
        .delete(format!("{}/v1/workloads/service/{name}", c.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    Ok(())
}

/// A controller with its local agent, once the node is Ready; and the node's name.
async fn local_cluster(prefix: &str) -> Result<(Controller, String)> {
    let node = harness::unique(prefix);
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec![],
    })
    .await?;
    wait_ready(&c, &node).await?;
    Ok((c, node))
}

/// Waits until the node is Ready, or fails after 30 s.
async fn wait_ready(c: &Controller, node: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let ready = c
            .get(&format!("/v1/nodes/{node}"))
            .await
            .map(|n| n["status"] == "Ready")
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("node {node} never became Ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn running_count(c: &Controller, workload: Option<&str>) -> Result<usize> {
    let path = match workload {
        Some(w) => format!("/v1/tasks?workload={w}"),
        None => "/v1/tasks".to_string(),
    };
    let tasks = c.get(&path).await?;
    Ok(tasks
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count()))
}

async fn apply_latency(rounds: usize) -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let (c, node) = local_cluster("bench").await?;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let name = format!("lat-{i}");
        let t0 = Instant::now();
        apply(&c, &name).await?;
        loop {
            if running_count(&c, Some(&name)).await? == 1 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{name} not running after 60s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.push(t0.elapsed());
        // Each apply should meet an idle node. A process signalled within milliseconds of
        // its start may not have its SIGTERM handler yet (testimg runs as PID 1, which
        // ignores unhandled signals) and would take the whole stop grace.
        tokio::time::sleep(Duration::from_millis(300)).await;
        delete(&c, &name).await?;
        let gone = Instant::now();
        while !harness::node_containers(&node, true)?.is_empty() {
            if gone.elapsed() > Duration::from_secs(60) {
                bail!("{name}'s container still there 60s after delete");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    samples.sort();
    println!("apply -> container running (image present), {rounds} applies, controller + local agent, Docker {}:", docker_version());
    println!(
        "  p50 {:.0} ms   p99 {:.0} ms   min {:.0} ms   max {:.0} ms   (budget: 1000 ms)",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.first().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!("  measured: POST /v1/apply until GET /v1/tasks shows the task Running (as reported by the agent)");
    rerun(&format!("apply-latency --rounds {rounds}"));
    Ok(())
}

async fn memory() -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let node = harness::unique("mem");
    let agent = Agent::start(&c, &node)?;
    wait_ready(&c, &node).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let agent_pid = agent.pid().context("agent pid")?;
    let ctl_pid = c.pid().context("controller pid")?;
    let agent_idle = harness::rss_bytes(agent_pid).context("agent RSS")?;
    let ctl_idle = harness::rss_bytes(ctl_pid).context("controller RSS")?;
    for i in 0..10 {
        apply(&c, &format!("mem-{i}")).await?;
    }
    let t = Instant::now();
    while running_count(&c, None).await? < 10 {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("10 tasks not running after 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let a few heartbeats and resyncs pass, so the figure is steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let agent_busy = harness::rss_bytes(agent_pid).context("agent RSS")?;
    let ctl_busy = harness::rss_bytes(ctl_pid).context("controller RSS")?;
    println!(
        "resident memory, {} binaries from target/{}:",
        harness::PROFILE,
        harness::PROFILE
    );
    println!(
        "  agent, idle:                     {}   (budget 10 MiB)",
        mib(agent_idle)
    );
    println!(
        "  agent, 10 tasks:                 {}   (budget 10 MiB)",
        mib(agent_busy)
    );
    println!("  controller, no workloads:        {}", mib(ctl_idle));
    println!(
        "  controller, 10 workloads/tasks:  {}   (budget 40 MiB at 100 nodes / 1,000 tasks)",
        mib(ctl_busy)
    );
    rerun("memory");
    Ok(())
}

/// Scheduled time -> container started over `firings` firings of one CronJob.
async fn cron_lateness(firings: usize) -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let (c, _node) = local_cluster("cronbench").await?;
    let name = unique_name("lateness");
    // testimg's `now` prints the instant its command began: lateness measured from
    // inside the container, where a run's work happens.
    let yaml = format!(
        "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {{name: {name}}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"now\"]\n  resources: {{cpu: 100m, memory: 8Mi}}\n  schedule: \"*/2 * * * * *\"\n  concurrencyPolicy: Allow\n  startingDeadline: 30s\n  history: {{successful: {keep}, failed: {keep}}}\n",
        keep = firings + 20
    );
    c.apply("lateness.yaml", &yaml).await?;
    let t = Instant::now();
    let deadline = Duration::from_secs(firings as u64 * 2 + 120);
    let done: Vec<(String, SystemTime)> = loop {
        let tasks = c.get(&format!("/v1/tasks?workload={name}")).await?;
        let seen: Vec<(String, SystemTime)> = tasks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["phase"] == "Succeeded")
            .filter_map(|t| {
                Some((
                    t["id"].as_str()?.to_string(),
                    netns::parse_time(t["slot"].as_str()?)?,
                ))
            })
            .collect();
        if seen.len() >= firings {
            break seen;
        }
        if t.elapsed() > deadline {
            let phases: Vec<String> = tasks
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{} {} {}", t["id"], t["phase"], t["startedAt"]))
                .collect();
            bail!(
                "only {} of {firings} firings finished after {deadline:?}; tasks:\n{}\n--- controller log:\n{}",
                seen.len(),
                phases.join("\n"),
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    // For each run: how late its command began (its own clock), and how far ahead of
    // its slot Docker made and started its container.
    let (mut late, mut made_ahead, mut started_ahead) = (Vec::new(), Vec::new(), 0);
    let mut early = 0;
    for (id, slot) in &done {
        let out = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=bramble.task={id}")])
            .output()?;
        let Some(cid) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_string)
        else {
            continue;
        };
        let out = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.Created}} {{.State.StartedAt}}", &cid])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if let Some((created, started)) = text.split_once(' ') {
            if let Some(created) = netns::parse_time(created) {
                made_ahead.push(slot.duration_since(created).unwrap_or_default());
            }
            if netns::parse_time(started).is_some_and(|s| s < *slot) {
                started_ahead += 1;
            }
        }
        let out = std::process::Command::new("docker")
            .args(["logs", &cid])
            .output()?;
        let Ok(micros) = String::from_utf8_lossy(&out.stdout).trim().parse::<u64>() else {
            continue;
        };
        let began = UNIX_EPOCH + Duration::from_micros(micros);
        match began.duration_since(*slot) {
            Ok(d) => late.push(d),
            Err(_) => early += 1,
        }
    }
    late.sort();
    made_ahead.sort();
    let floor = docker_start_latency(5)?;
    println!(
        "cron firing lateness, scheduled time -> the run's command began (its own clock), {} firings of \"*/2 * * * * *\", {} binaries:",
        late.len(),
        harness::PROFILE
    );
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (goal: p99 <= 100 ms); began before their slot: {early} (must be 0)",
        percentile(&late, 0.5).as_secs_f64() * 1e3,
        percentile(&late, 0.99).as_secs_f64() * 1e3,
        late.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "  containers made ahead of their slot: {} of {}, by p50 {:.0} ms (min {:.0} ms); started ahead through the cron gate: {started_ahead}",
        made_ahead.iter().filter(|d| !d.is_zero()).count(),
        made_ahead.len(),
        percentile(&made_ahead, 0.5).as_secs_f64() * 1e3,
        made_ahead.first().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "  this engine's docker start of a created container, call -> State.StartedAt: p50 {:.0} ms (the lateness without the gate)",
        floor.as_secs_f64() * 1e3
    );
    rerun(&format!("cron --firings {firings}"));
    Ok(())
}

/// The median time from `docker start` of a created test container to its
/// `State.StartedAt`, over `n` containers on the machine's engine.
fn docker_start_latency(n: usize) -> Result<Duration> {
    let docker = |args: &[&str]| -> Result<String> {
        harness::run(std::process::Command::new("docker").args(args)).map(|o| o.trim().to_string())
    };
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let id = docker(&[
            "create",
            "--label",
            "bramble.bench=start",
            "bramble-testimg:latest",
            "exit",
            "0",
        ])?;
        let before = std::time::SystemTime::now();
        let started = docker(&["start", &id])
            .and_then(|_| docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]));
        let _ = docker(&["rm", "-f", &id]);
        let started = netns::parse_time(&started?).context("StartedAt")?;
        took.push(started.duration_since(before).unwrap_or_default());
    }
    took.sort();
    Ok(percentile(&took, 0.5))
}

fn docker_version() -> String {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn scheduler(nodes: usize, tasks: usize) {
    use bramble_controller::core::scheduler::{bench_snapshot, schedule};
    let snap = bench_snapshot(nodes, tasks);
    // Warm up once, then time a few runs.
    let _ = schedule(&snap);
    let runs = 5;
    let mut best = Duration::MAX;
    let mut placed = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let plan = schedule(&snap);
        best = best.min(t.elapsed());
        placed = plan.placements.len();
    }
    let rate = placed as f64 / best.as_secs_f64();
    println!(
        "scheduler: {placed} of {tasks} tasks placed on {nodes} nodes in {:.1} ms (best of {runs})",
        best.as_secs_f64() * 1e3
    );
    println!("  {:.0} placements/s   (budget: >= 10,000/s)", rate);
    rerun(&format!("scheduler --nodes {nodes} --tasks {tasks}"));
}

/// How often the failover rounds look at `docker ps`.
const POLL: Duration = Duration::from_millis(50);

/// The single running container of a label, once there is exactly one (and, with
/// `alone`, no stopped one beside it either), or an error after 60 s.
async fn the_one(label: &str, alone: bool) -> Result<netns::Container> {
    let t = Instant::now();
    loop {
        let running = netns::running_containers(label)?;
        let all = if alone {
            netns::containers(label, true)?.len()
        } else {
            running.len()
        };
        if let ([c], 1) = (running.as_slice(), all) {
            return Ok(c.clone());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{label}: not exactly one container after 60s: {running:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `docker ps` every [`POLL`] until the label runs on another node than `gone`;
/// the time since `t0`. (Whether it also still runs on `gone` is the samplers' business:
/// a failover time is measured either way.)
async fn running_elsewhere(label: &str, gone: &str, t0: Instant) -> Result<Duration> {
    loop {
        let running = netns::running_containers(label)?;
        if running.iter().any(|c| c.node != gone) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{label}: not running off {gone} after 60s: {running:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One power-off round: the node running the label's container loses power; the time
/// until it runs elsewhere. The node is powered on again and Ready before returning.
async fn power_off_round(cluster: &mut NetCluster, label: &str) -> Result<Duration> {
    let victim = the_one(label, false).await?.node;
    let t0 = Instant::now();
    cluster.power_off(&victim)?;
    let took = running_elsewhere(label, &victim, t0).await?;
    cluster.power_on(&victim)?;
    cluster.wait_ready(&victim).await?;
    Ok(took)
}

/// One crash round: `docker kill` of the label's container; the time from its death to
/// the next start, by Docker's event clock.
async fn crash_round(events: &EventRecorder, label: &str) -> Result<Duration> {
    let victim = the_one(label, false).await?;
    let seen = events.events().len();
    let out = std::process::Command::new("docker")
        .args(["kill", &victim.id])
        .output()
        .context("docker kill")?;
    if !out.status.success() {
        bail!("docker kill: {}", String::from_utf8_lossy(&out.stderr));
    }
    let t = Instant::now();
    loop {
        let new = events.events().split_off(seen);
        let died = new.iter().find(|e| e.action == "die");
        let started = new.iter().find(|e| e.action == "start");
        if let (Some(d), Some(s)) = (died, started) {
            return Ok(s.at.duration_since(d.at).unwrap_or_default());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{label}: not restarted 60s after docker kill");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One partition round: the wallet's node is cut off until the wallet runs elsewhere,
/// then healed until the wallet runs exactly once again with no stale copy. Returns the
/// failover time and how many samples saw two or more wallets running.
async fn partition_round(cluster: &NetCluster, label: &str) -> Result<(Duration, usize)> {
    let victim = the_one(label, true).await?.node;
    let sampler = Sampler::start(label, POLL);
    let t0 = Instant::now();
    cluster.partition(&victim)?;
    let took = running_elsewhere(label, &victim, t0).await;
    cluster.heal(&victim)?;
    let took = took?;
    cluster.wait_ready(&victim).await?;
    the_one(label, true).await?;
    let doubled = sampler
        .stop()
        .iter()
        .filter(|s| s.running.len() > 1)
        .count();
    Ok((took, doubled))
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "median {:>5.0} ms   max {:>5.0} ms",
        percentile(samples, 0.5).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    )
}

async fn failover(rounds: usize) -> Result<()> {
    let mut cluster = NetCluster::start(3, netns::HEALING_FLAGS).await?;
    let spec = "  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  resources: {cpu: 100m, memory: 8Mi}\n";
    let service = unique_name("fo-svc");
    let wallet = unique_name("fo-wallet");
    let crashy = unique_name("fo-crash");
    cluster
        .apply(&format!(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {service}}}\nspec:\n{spec}  replicas: 1\n"
        ))
        .await?;
    cluster
        .apply(&format!(
            "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {{name: {wallet}}}\nspec:\n{spec}"
        ))
        .await?;
    // A short back-off, so the figure is the agent's reaction, not the policy's wait;
    // enough maxFailures that the rounds never make it give up.
    cluster
        .apply(&format!(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {crashy}}}\nspec:\n{spec}  replicas: 1\n  restart: {{policy: Always, backoff: {{initial: 100ms, max: 1s}}, maxFailures: 1000, window: 1m}}\n"
        ))
        .await?;
    let label = |w: &str| format!("bramble.workload={w}");

    let mut service_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        service_times.push(power_off_round(&mut cluster, &label(&service)).await?);
    }
    let mut wallet_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        wallet_times.push(power_off_round(&mut cluster, &label(&wallet)).await?);
    }
    let events = EventRecorder::start(&label(&crashy))?;
    let mut crash_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        crash_times.push(crash_round(&events, &label(&crashy)).await?);
        // A run of 10 x backoff.initial is healthy and resets the back-off, so every
        // round measures a first restart.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    drop(events);
    let mut partition_times = Vec::with_capacity(rounds);
    let mut doubled_rounds = 0;
    let mut doubled_samples = 0;
    for _ in 0..rounds {
        let (took, doubled) = partition_round(&cluster, &label(&wallet)).await?;
        partition_times.push(took);
        doubled_samples += doubled;
        doubled_rounds += usize::from(doubled > 0);
    }

    println!(
        "failover, 3 agents in network namespaces, {} binaries, controller {}:",
        harness::PROFILE,
        netns::HEALING_FLAGS.join(" ")
    );
    println!(
        "  power-off -> Service replica running elsewhere:  {}   ({rounds} rounds)",
        summary(&mut service_times)
    );
    println!(
        "  power-off -> Wallet running elsewhere:           {}   ({rounds} rounds; budget 5000 ms)",
        summary(&mut wallet_times)
    );
    println!(
        "  crash (docker kill) -> running again:            {}   ({rounds} rounds; back-off 100 ms)",
        summary(&mut crash_times)
    );
    println!(
        "  partition -> Wallet running elsewhere:           {}   ({rounds} rounds)",
        summary(&mut partition_times)
    );
    println!(
        "  partitions with two wallets running at once:     {doubled_rounds} of {rounds} ({doubled_samples} samples; must be 0)"
    );
    println!(
        "  measured: docker ps every 50 ms from the fault (crash: Docker die -> start events)"
    );
    rerun(&format!("failover --rounds {rounds}"));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.what {
        What::All => {
            scheduler(1000, 10_000);
            apply_latency(50).await?;
            memory().await?;
            link::link(10, 30).await?;
            link::fake_nodes(40, 20).await?;
            failover(20).await?;
            cron_lateness(100).await?;
            cpu_start::cpu_start(20).await?;
        }
        What::Cron { firings } => cron_lateness(firings).await?,
        What::ApplyLatency { rounds } => apply_latency(rounds).await?,
        What::Memory => memory().await?,
        What::Names { rounds } => names::names(rounds).await?,
        What::Volumes { rounds } => volumes::volumes(rounds).await?,
        What::Link { rounds, idle_secs } => link::link(rounds, idle_secs).await?,
        What::FakeNodes { nodes, secs } => link::fake_nodes(nodes, secs).await?,
        What::Failover { rounds } => failover(rounds).await?,
        What::Compare { rounds } => compare::compare(rounds).await?,
        What::CpuStart { rounds } => cpu_start::cpu_start(rounds).await?,
        What::Scheduler { nodes, tasks } => scheduler(nodes, tasks),
        What::Scale {
            nodes,
            tasks,
            heartbeat_ms,
            secs,
        } => scale::scale(nodes, tasks, heartbeat_ms, secs).await?,
        What::Dashboard { minutes, nodes } => dashboard::dashboard(minutes, nodes).await?,
        What::EtcdRest { minutes, nodes } => ha::etcd_rest(minutes, nodes).await?,
        What::LeaderKill { rounds, power_offs } => ha::leader_kill(rounds, power_offs).await?,
    }
    Ok(())
}
