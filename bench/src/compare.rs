//! `compare`: Bramble and Docker Swarm side by side, the same scenarios measured the same
//! way, one table.
//!
//! Both stand on the same harness: nodes in network namespaces on one bridge, each with a
//! Docker Engine of its own ([`bramble_tests::engines`]). Bramble: a controller on the
//! bridge (not on a node) and 3 agents, with [`netns::HEALING_FLAGS`]. Swarm: a manager
//! node and 3 workers ([`bramble_tests::swarm`]); every service is pinned to the workers
//! (`node.role==worker`), so faults hit nodes that run tasks while the manager stays up,
//! as Bramble's controller does. Swarm runs twice on the same swarm: at its defaults,
//! then tuned (`docker swarm update --dispatcher-heartbeat 1s`, services created with
//! `--restart-delay 0s`).
//!
//! Every figure comes from Docker, never from the orchestrator's own account: `start`
//! and `die` events on every engine (the machine's clock), or `docker ps` on every
//! engine every 50 ms from the fault, as the `failover` bench does. Swarm services
//! publish no ports and join no overlay network: this kernel has no IPVS, which the
//! routing mesh and a service's virtual IP need.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, ADMIN_TOKEN};
use bramble_tests::netns::{self, Container, EventRecorder, NetCluster, Sampler};
use bramble_tests::swarm::Swarm;
use bramble_tests::{eventually_every, unique_name, TEST_IMAGE};

use crate::{mib, percentile, POLL};

/// How long any one wait of a round may take before the bench gives up on the setup.
const ROUND_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a partition is held once the workload runs elsewhere, so that what the
/// partitioned node does meanwhile (fence, or keep running) shows in the samples.
const PARTITION_HOLD: Duration = Duration::from_secs(5);

/// Agents and workers: both systems run tasks on three nodes.
const NODES: usize = 3;

/// What the scenarios ask for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A replicated service at the orchestrator's defaults.
    Service,
    /// At most one copy, fenced on a lost node (Bramble only).
    Wallet,
}

/// What both systems are driven and watched through, so every round is the same code.
trait System {
    /// The label every container of `workload` carries.
    fn label(&self, workload: &str) -> String;
    /// Asks for `workload`; returns once the request was accepted.
    async fn create(&self, kind: Kind, workload: &str, replicas: usize) -> Result<()>;
    /// Removes `workload`; returns once the request was accepted.
    async fn remove(&self, kind: Kind, workload: &str) -> Result<()>;
    /// The running containers of a label on every running node.
    fn running(&self, label: &str) -> Result<Vec<Container>>;
    /// The containers of a label on every running node, stopped ones too.
    fn containers(&self, label: &str) -> Result<Vec<Container>>;
    fn record_events(&self, label: &str) -> Result<EventRecorder>;
    fn sample(&self, label: &str) -> Sampler;
    /// `docker kill` of a container on its node's engine.
    fn kill(&self, c: &Container) -> Result<()>;
    fn power_off(&mut self, node: &str) -> Result<()>;
    fn power_on(&mut self, node: &str) -> Result<()>;
    fn partition(&self, node: &str) -> Result<()>;
    fn heal(&self, node: &str) -> Result<()>;
    /// Waits until the orchestrator counts the node in again.
    async fn wait_ready(&self, node: &str) -> Result<()>;
}

/// `docker kill` through `docker` (a node engine's command).
fn docker_kill(mut docker: std::process::Command, id: &str) -> Result<()> {
    harness::run(docker.args(["kill", id])).map(drop)
}

struct Bramble {
    cluster: NetCluster,
}

impl System for Bramble {
    fn label(&self, workload: &str) -> String {
        format!("bramble.workload={workload}")
    }

    async fn create(&self, kind: Kind, workload: &str, replicas: usize) -> Result<()> {
        let spec = format!(
            "  image: {TEST_IMAGE}\n  args: [\"serve\", \"8080\"]\n  resources: {{cpu: 100m, memory: 8Mi}}\n"
        );
        let yaml = match kind {
            Kind::Service => format!(
                "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {workload}}}\nspec:\n{spec}  replicas: {replicas}\n"
            ),
            Kind::Wallet => format!(
                "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {{name: {workload}}}\nspec:\n{spec}"
            ),
        };
        self.cluster
            .apply(&yaml)
            .await
            .with_context(|| format!("applying {workload}"))?;
        Ok(())
    }

    async fn remove(&self, kind: Kind, workload: &str) -> Result<()> {
        let kind = if kind == Kind::Wallet {
            "wallet"
        } else {
            "service"
        };
        let r = bramble_tests::http()
            .delete(format!(
                "{}/v1/workloads/{kind}/{workload}",
                self.cluster.url()
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("deleting {workload}: {}", r.text().await?);
        }
        Ok(())
    }

    fn running(&self, label: &str) -> Result<Vec<Container>> {
        self.cluster.running(label)
    }

    fn containers(&self, label: &str) -> Result<Vec<Container>> {
        self.cluster.containers(label, true)
    }

    fn record_events(&self, label: &str) -> Result<EventRecorder> {
        self.cluster.record_events(label)
    }

    fn sample(&self, label: &str) -> Sampler {
        self.cluster.sample(label, POLL)
    }

    fn kill(&self, c: &Container) -> Result<()> {
        let engine = self
            .cluster
            .engine(&c.node)?
            .context("Bramble nodes have engines of their own here")?;
        docker_kill(engine.docker(), &c.id)
    }

    fn power_off(&mut self, node: &str) -> Result<()> {
        self.cluster.power_off(node)
    }

    fn power_on(&mut self, node: &str) -> Result<()> {
        self.cluster.power_on(node)
    }

    fn partition(&self, node: &str) -> Result<()> {
        self.cluster.partition(node)
    }

    fn heal(&self, node: &str) -> Result<()> {
        self.cluster.heal(node)
    }

    async fn wait_ready(&self, node: &str) -> Result<()> {
        self.cluster.wait_ready(node).await
    }
}

struct DockerSwarm {
    swarm: Swarm,
    /// Services are created with `--restart-delay 0s`.
    tuned: bool,
}

impl System for DockerSwarm {
    fn label(&self, workload: &str) -> String {
        format!("com.docker.swarm.service.name={workload}")
    }

    async fn create(&self, kind: Kind, workload: &str, replicas: usize) -> Result<()> {
        if kind == Kind::Wallet {
            bail!("Swarm has no Wallet kind");
        }
        let mut docker = self.swarm.docker();
        // --detach: answer once the service is accepted, as Bramble's apply does, not
        // once it converged. --no-resolve-image: the image is on every node and in no
        // registry. The same CPU and memory limits as Bramble's tasks.
        docker.args([
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            workload,
            "--replicas",
            &replicas.to_string(),
            "--constraint",
            "node.role==worker",
            "--limit-cpu",
            "0.1",
            "--limit-memory",
            "8M",
        ]);
        if self.tuned {
            docker.args(["--restart-delay", "0s"]);
        }
        docker.args([TEST_IMAGE, "serve", "8080"]);
        harness::run(&mut docker).map(drop)
    }

    async fn remove(&self, _kind: Kind, workload: &str) -> Result<()> {
        harness::run(self.swarm.docker().args(["service", "rm", workload])).map(drop)
    }

    fn running(&self, label: &str) -> Result<Vec<Container>> {
        self.swarm.running(label)
    }

    fn containers(&self, label: &str) -> Result<Vec<Container>> {
        self.swarm.containers(label)
    }

    fn record_events(&self, label: &str) -> Result<EventRecorder> {
        self.swarm.record_events(label)
    }

    fn sample(&self, label: &str) -> Sampler {
        self.swarm.sample(label, POLL)
    }

    fn kill(&self, c: &Container) -> Result<()> {
        docker_kill(self.swarm.engine(&c.node)?.docker(), &c.id)
    }

    fn power_off(&mut self, node: &str) -> Result<()> {
        self.swarm.power_off(node)
    }

    fn power_on(&mut self, node: &str) -> Result<()> {
        self.swarm.power_on(node)
    }

    fn partition(&self, node: &str) -> Result<()> {
        self.swarm.partition(node)
    }

    fn heal(&self, node: &str) -> Result<()> {
        self.swarm.heal(node)
    }

    async fn wait_ready(&self, node: &str) -> Result<()> {
        self.swarm.wait_ready(node).await
    }
}

/// Polls every [`POLL`] (a round's figure is when the first look sees it) until
/// `check` gives a value, or fails after [`ROUND_TIMEOUT`].
async fn poll<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    eventually_every(ROUND_TIMEOUT, POLL, what, || std::future::ready(check())).await
}

/// The one running container of a label, once exactly one runs.
async fn the_one(sys: &impl System, label: &str) -> Result<Container> {
    poll(&format!("exactly one {label} running"), || {
        let running = sys.running(label)?;
        Ok(match running.as_slice() {
            [c] => Some(c.clone()),
            _ => None,
        })
    })
    .await
}

/// The time from `t0` until the label runs on another node than `gone`.
async fn running_elsewhere(
    sys: &impl System,
    label: &str,
    gone: &str,
    t0: Instant,
) -> Result<Duration> {
    poll(&format!("{label} running off {gone}"), || {
        let running = sys.running(label)?;
        Ok(running.iter().any(|c| c.node != gone).then(|| t0.elapsed()))
    })
    .await
}

/// Creates a workload and waits until `replicas` copies run.
async fn create_running(sys: &impl System, kind: Kind, name: &str, replicas: usize) -> Result<()> {
    sys.create(kind, name, replicas).await?;
    let label = sys.label(name);
    poll(&format!("{replicas} of {name} running"), || {
        Ok((sys.running(&label)?.len() == replicas).then_some(()))
    })
    .await
}

/// Removes a workload and waits until none of its containers is left on any node.
async fn remove_gone(sys: &impl System, kind: Kind, name: &str) -> Result<()> {
    sys.remove(kind, name).await?;
    let label = sys.label(name);
    poll(&format!("{name}'s containers gone"), || {
        Ok(sys.containers(&label)?.is_empty().then_some(()))
    })
    .await
}

/// Request sent -> the `replicas`-th container started (Docker's `start` events), each
/// round with a fresh service, removed (and its containers gone) before the next.
/// Also returns, per round, the part of it inside Docker: from the first container's
/// `create` event to the last `start`, which no orchestrator can shorten.
async fn create_rounds(
    sys: &impl System,
    replicas: usize,
    rounds: usize,
    what: &str,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut took = Vec::with_capacity(rounds);
    let mut in_docker = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let name = unique_name("cmp-new");
        let label = sys.label(&name);
        let events = sys.record_events(&label)?;
        let t0 = SystemTime::now();
        sys.create(Kind::Service, &name, replicas).await?;
        let last = poll(&format!("{replicas} starts of {name}"), || {
            let mut starts = events.with_action("start");
            starts.dedup_by(|a, b| a.id == b.id);
            Ok(starts.get(replicas - 1).map(|e| e.at))
        })
        .await?;
        let created = events.with_action("create").first().map_or(last, |e| e.at);
        took.push(last.duration_since(t0).unwrap_or_default());
        in_docker.push(last.duration_since(created).unwrap_or_default());
        remove_gone(sys, Kind::Service, &name).await?;
        progress(what, round, rounds, took.last());
    }
    Ok((took, in_docker))
}

/// `docker kill` of the one container -> the next start, by Docker's `die` and `start`
/// events; `settle` between rounds, so every round meets a healthy workload.
async fn crash_rounds(
    sys: &impl System,
    kind: Kind,
    rounds: usize,
    settle: Duration,
    what: &str,
) -> Result<Vec<Duration>> {
    let name = unique_name("cmp-crash");
    let label = sys.label(&name);
    create_running(sys, kind, &name, 1).await?;
    let events = sys.record_events(&label)?;
    let mut took = Vec::with_capacity(rounds);
    for round in 0..rounds {
        tokio::time::sleep(settle).await;
        let victim = the_one(sys, &label).await?;
        let seen = events.events().len();
        sys.kill(&victim)?;
        let delta = poll(&format!("{name} started again"), || {
            let new = events.events().split_off(seen);
            let died = new.iter().find(|e| e.action == "die" && e.id == victim.id);
            Ok(died.and_then(|d| {
                let started = new.iter().find(|e| e.action == "start" && e.at >= d.at)?;
                Some(started.at.duration_since(d.at).unwrap_or_default())
            }))
        })
        .await?;
        took.push(delta);
        progress(what, round, rounds, Some(&delta));
    }
    drop(events);
    remove_gone(sys, kind, &name).await?;
    Ok(took)
}

/// The node running the one copy loses power -> a copy runs on another node (`docker
/// ps` every 50 ms); the node is powered on and counted in again before the next round.
async fn power_off_rounds(
    sys: &mut impl System,
    kind: Kind,
    rounds: usize,
    what: &str,
) -> Result<Vec<Duration>> {
    let name = unique_name("cmp-off");
    let label = sys.label(&name);
    create_running(&*sys, kind, &name, 1).await?;
    let mut took = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let victim = the_one(&*sys, &label).await?.node;
        let t0 = Instant::now();
        sys.power_off(&victim)?;
        let elsewhere = running_elsewhere(&*sys, &label, &victim, t0).await;
        sys.power_on(&victim)?;
        took.push(elsewhere?);
        sys.wait_ready(&victim).await?;
        progress(what, round, rounds, took.last());
    }
    remove_gone(&*sys, kind, &name).await?;
    Ok(took)
}

/// What the partition rounds saw.
struct Partitions {
    /// Partition -> a copy running on another node.
    failover: Vec<Duration>,
    /// Time with two copies running at once, per partition (sample to next sample).
    doubled: Vec<Duration>,
    /// Samples with two copies, and samples in all.
    doubled_samples: usize,
    samples: usize,
}

/// The node running the one copy is cut off; held [`PARTITION_HOLD`] past the copy
/// running elsewhere, then healed until exactly one copy runs again. Samples every
/// engine's running copies all along.
async fn partition_rounds(
    sys: &impl System,
    kind: Kind,
    rounds: usize,
    what: &str,
) -> Result<Partitions> {
    let name = unique_name("cmp-cut");
    let label = sys.label(&name);
    create_running(sys, kind, &name, 1).await?;
    let mut seen = Partitions {
        failover: Vec::with_capacity(rounds),
        doubled: Vec::with_capacity(rounds),
        doubled_samples: 0,
        samples: 0,
    };
    for round in 0..rounds {
        let victim = the_one(sys, &label).await?.node;
        let sampler = sys.sample(&label);
        let t0 = Instant::now();
        sys.partition(&victim)?;
        let elsewhere = running_elsewhere(sys, &label, &victim, t0).await;
        if elsewhere.is_ok() {
            tokio::time::sleep(PARTITION_HOLD).await;
        }
        sys.heal(&victim)?;
        seen.failover.push(elsewhere?);
        sys.wait_ready(&victim).await?;
        the_one(sys, &label).await?;
        let samples = sampler.stop();
        let mut doubled = Duration::ZERO;
        for pair in samples.windows(2) {
            if pair[0].running.len() > 1 {
                doubled += pair[1].at.duration_since(pair[0].at).unwrap_or_default();
            }
        }
        seen.doubled.push(doubled);
        seen.doubled_samples += samples.iter().filter(|s| s.running.len() > 1).count();
        seen.samples += samples.len();
        progress(what, round, rounds, seen.failover.last());
    }
    remove_gone(sys, kind, &name).await?;
    Ok(seen)
}

/// One line on stderr per round, so a long run shows where it is.
fn progress(what: &str, round: usize, rounds: usize, took: Option<&Duration>) {
    let took = took.map_or(String::new(), |d| format!(": {:.0} ms", ms(*d)));
    eprintln!("compare: {what} {}/{rounds}{took}", round + 1);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Resident memory, in bytes, of what an orchestrator costs.
#[derive(Default, Clone, Copy)]
struct Memory {
    /// Per node, the orchestrator's own part: Bramble's agent; the growth of a Swarm
    /// worker's dockerd from a plain engine to a joined, idle one.
    node: Option<u64>,
    /// Per node, the node's dockerd with the 10-replica service running.
    dockerd: Option<u64>,
    /// Bramble's controller; Swarm's manager's dockerd (it runs no task).
    manager: Option<u64>,
}

fn mean(values: &[Option<u64>]) -> Option<u64> {
    let known: Vec<u64> = values.iter().flatten().copied().collect();
    (!known.is_empty()).then(|| known.iter().sum::<u64>() / known.len() as u64)
}

/// The figures of one column.
#[derive(Default)]
struct Column {
    create: Vec<Duration>,
    /// Of `create`, the time from Docker's create event to its start event.
    create_in_docker: Vec<Duration>,
    ten: Vec<Duration>,
    crash: Vec<Duration>,
    off_service: Vec<Duration>,
    off_wallet: Vec<Duration>,
    partition: Option<Partitions>,
    memory: Memory,
}

/// Creates a 10-replica service and waits until it runs and has settled, for the memory
/// figures; its name.
async fn with_ten_running(sys: &impl System) -> Result<String> {
    let name = unique_name("cmp-mem");
    create_running(sys, Kind::Service, &name, 10).await?;
    // Steady state: a few heartbeats and resyncs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(name)
}

async fn measure_bramble(rounds: usize) -> Result<Column> {
    eprintln!("compare: starting Bramble (controller + {NODES} agents, each node its own dockerd)");
    let mut sys = Bramble {
        cluster: NetCluster::start_with_engines(NODES, netns::HEALING_FLAGS)
            .await
            .context("starting the Bramble cluster")?,
    };
    let (create, create_in_docker) =
        create_rounds(&sys, 1, rounds, "Bramble create -> running").await?;
    let mut col = Column {
        create,
        create_in_docker,
        ten: create_rounds(&sys, 10, rounds, "Bramble 10 replicas -> running")
            .await?
            .0,
        ..Column::default()
    };
    // A run of 10 x the initial back-off (1 s by default) is healthy and resets it:
    // each round measures the first crash after a healthy run, which Bramble restarts
    // at once (the back-off is for crash loops).
    col.crash = crash_rounds(
        &sys,
        Kind::Service,
        rounds,
        Duration::from_secs(11),
        "Bramble crash",
    )
    .await?;
    col.off_service = power_off_rounds(
        &mut sys,
        Kind::Service,
        rounds,
        "Bramble power-off (Service)",
    )
    .await?;
    col.off_wallet =
        power_off_rounds(&mut sys, Kind::Wallet, rounds, "Bramble power-off (Wallet)").await?;
    col.partition =
        Some(partition_rounds(&sys, Kind::Wallet, rounds, "Bramble partition (Wallet)").await?);
    let name = with_ten_running(&sys).await?;
    let c = &mut sys.cluster;
    let nodes = c.nodes();
    let mut agents = Vec::new();
    let mut dockerds = Vec::new();
    for node in &nodes {
        agents.push(c.agent(node)?.pid().and_then(harness::rss_bytes));
        dockerds.push(
            c.engine(node)?
                .and_then(|e| e.pid())
                .and_then(harness::rss_bytes),
        );
    }
    col.memory = Memory {
        node: mean(&agents),
        dockerd: mean(&dockerds),
        manager: c.controller().pid().and_then(harness::rss_bytes),
    };
    remove_gone(&sys, Kind::Service, &name).await?;
    eprintln!("compare: stopping Bramble");
    Ok(col)
}

/// Both Swarm columns, default then tuned, on one swarm.
async fn measure_swarm(rounds: usize) -> Result<(Column, Column)> {
    eprintln!("compare: starting Docker Swarm (1 manager + {NODES} workers, each its own dockerd)");
    let swarm = Swarm::start(NODES)
        .await
        .context("starting the Docker Swarm")?;
    // Joined and idle, before any service: the swarm's own cost on each engine.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut growth = Vec::new();
    for node in swarm.workers() {
        let before = swarm.standalone_rss(&node)?;
        let now = swarm.engine(&node)?.pid().and_then(harness::rss_bytes);
        growth.push(before.zip(now).map(|(b, n)| n.saturating_sub(b)));
    }
    let joined_growth = mean(&growth);
    let mut sys = DockerSwarm {
        swarm,
        tuned: false,
    };
    let default = swarm_column(&mut sys, rounds, "Swarm default", joined_growth).await?;
    sys.swarm.update(&["--dispatcher-heartbeat", "1s"])?;
    sys.tuned = true;
    // Workers learn the new period at their next heartbeat (5 s at the default).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let tuned = swarm_column(&mut sys, rounds, "Swarm tuned", joined_growth).await?;
    eprintln!("compare: stopping Docker Swarm");
    Ok((default, tuned))
}

async fn swarm_column(
    sys: &mut DockerSwarm,
    rounds: usize,
    what: &str,
    joined_growth: Option<u64>,
) -> Result<Column> {
    let (create, create_in_docker) =
        create_rounds(&*sys, 1, rounds, &format!("{what} create -> running")).await?;
    let mut col = Column {
        create,
        create_in_docker,
        ten: create_rounds(&*sys, 10, rounds, &format!("{what} 10 replicas -> running"))
            .await?
            .0,
        ..Column::default()
    };
    col.crash = crash_rounds(
        &*sys,
        Kind::Service,
        rounds,
        Duration::from_millis(1500),
        &format!("{what} crash"),
    )
    .await?;
    col.off_service =
        power_off_rounds(sys, Kind::Service, rounds, &format!("{what} power-off")).await?;
    col.partition =
        Some(partition_rounds(&*sys, Kind::Service, rounds, &format!("{what} partition")).await?);
    let name = with_ten_running(&*sys).await?;
    let s = &sys.swarm;
    let mut dockerds = Vec::new();
    for node in s.workers() {
        dockerds.push(s.engine(&node)?.pid().and_then(harness::rss_bytes));
    }
    col.memory = Memory {
        node: joined_growth,
        dockerd: mean(&dockerds),
        manager: s.engine(s.manager())?.pid().and_then(harness::rss_bytes),
    };
    remove_gone(&*sys, Kind::Service, &name).await?;
    Ok(col)
}

/// A table cell: a time (median, and p99 when there are several), a size, or a dash.
enum Cell {
    Time(Vec<Duration>),
    Bytes(Option<u64>),
    None(&'static str),
}

impl Cell {
    fn time(samples: &[Duration]) -> Cell {
        let mut s = samples.to_vec();
        s.sort();
        Cell::Time(s)
    }

    /// The figure the ratio is taken of: the median, or the size.
    fn value(&self) -> Option<f64> {
        match self {
            Cell::Time(s) if !s.is_empty() => Some(ms(percentile(s, 0.5))),
            Cell::Bytes(Some(b)) => Some(*b as f64),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Cell::Time(s) if s.is_empty() => "-".to_string(),
            Cell::Time(s) => format!(
                "{:.0} ms (p99 {:.0})",
                ms(percentile(s, 0.5)),
                ms(percentile(s, 0.99))
            ),
            Cell::Bytes(Some(b)) => mib(*b),
            Cell::Bytes(None) => "-".to_string(),
            Cell::None(why) => why.to_string(),
        }
    }
}

/// Bramble / Swarm, of the medians or sizes.
fn ratio(bramble: &Cell, swarm: &Cell) -> String {
    match (bramble.value(), swarm.value()) {
        (Some(b), Some(s)) if s > 0.0 => format!("{:.2}", b / s),
        _ => "-".to_string(),
    }
}

fn doubled(p: &Option<Partitions>) -> Cell {
    p.as_ref()
        .map_or(Cell::None("-"), |p| Cell::time(&p.doubled))
}

fn failover_of(p: &Option<Partitions>) -> Cell {
    p.as_ref()
        .map_or(Cell::None("-"), |p| Cell::time(&p.failover))
}

pub async fn compare(rounds: usize) -> Result<()> {
    let rounds = rounds.max(1);
    // Builds first (the test image, and the Bramble binaries, which cargo may relink
    // for this run), so the time printed is the bench's own.
    bramble_tests::ensure_test_image().await?;
    harness::bin("bramble-controller");
    let started = Instant::now();
    let bramble = measure_bramble(rounds).await?;
    let (default, tuned) = measure_swarm(rounds).await?;
    let cols = [&bramble, &default, &tuned];
    let row = |f: &dyn Fn(&Column) -> Cell| -> [Cell; 3] { cols.map(f) };
    let rows: Vec<(&str, [Cell; 3])> = vec![
        (
            "create -> running, 1 replica",
            row(&|c| Cell::time(&c.create)),
        ),
        (
            "  of which in Docker (its create -> start events)",
            row(&|c| Cell::time(&c.create_in_docker)),
        ),
        ("10 replicas -> all running", row(&|c| Cell::time(&c.ten))),
        ("crash -> running", row(&|c| Cell::time(&c.crash))),
        (
            "power-off -> replacement running, Service",
            row(&|c| Cell::time(&c.off_service)),
        ),
        (
            "power-off -> replacement running, Wallet",
            [
                Cell::time(&bramble.off_wallet),
                Cell::None("no Wallet kind"),
                Cell::None("no Wallet kind"),
            ],
        ),
        (
            "partition -> replacement running (Wallet | service)",
            row(&|c| failover_of(&c.partition)),
        ),
        (
            "partition: two copies running, per partition",
            row(&|c| doubled(&c.partition)),
        ),
        (
            "memory per node: orchestrator",
            row(&|c| Cell::Bytes(c.memory.node)),
        ),
        (
            "memory per node: dockerd, 10 replicas running",
            row(&|c| Cell::Bytes(c.memory.dockerd)),
        ),
        (
            "memory per manager",
            row(&|c| Cell::Bytes(c.memory.manager)),
        ),
    ];

    println!(
        "Bramble vs Docker Swarm {}, {NODES} task nodes in network namespaces, each with its own dockerd; {rounds} rounds; {} binaries:",
        crate::docker_version(),
        harness::PROFILE
    );
    let header = [
        "scenario",
        "Bramble",
        "Swarm default",
        "Swarm tuned",
        "ratio B/default",
        "ratio B/tuned",
    ];
    let lines: Vec<[String; 6]> = rows
        .iter()
        .map(|(name, [b, d, t])| {
            [
                name.to_string(),
                b.text(),
                d.text(),
                t.text(),
                ratio(b, d),
                ratio(b, t),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.len());
        }
    }
    let print = |cells: [&str; 6]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("  {}", parts.join(" | ").trim_end());
    };
    print(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("  {}", rule.join("-|-"));
    for l in &lines {
        print([&l[0], &l[1], &l[2], &l[3], &l[4], &l[5]]);
    }
    let doubled_samples = |c: &Column| {
        c.partition.as_ref().map_or("-".to_string(), |p| {
            format!("{} of {}", p.doubled_samples, p.samples)
        })
    };
    println!(
        "  samples with two copies running during partitions: Bramble {}, Swarm default {}, Swarm tuned {}",
        doubled_samples(&bramble),
        doubled_samples(&default),
        doubled_samples(&tuned)
    );
    println!("  times: median (p99) over the rounds; ratios of the medians (below 1: Bramble is faster or smaller)");
    println!(
        "  Bramble: controller on the bridge, not on a node, with {}; Swarm: 1 manager + {NODES} workers, services pinned to workers (node.role==worker), no published ports; tuned: swarm update --dispatcher-heartbeat 1s, services --restart-delay 0s",
        netns::HEALING_FLAGS.join(" ")
    );
    println!("  create, 10 replicas: from sending the request (Bramble POST /v1/apply; Swarm spawning docker service create --detach) to the Docker start event of the last replica");
    println!("  in Docker: from the container's create event to its start event on its node's engine (the same engines for all three); the rest of create -> running is the orchestrator's");
    println!("  crash: docker kill of the one container after a healthy run (Bramble restarts a first crash at once; its back-off, 1 s doubling by default, is for crash loops; Swarm waits its restart-delay, 5 s by default); its die event -> the next start event");
    println!("  power-off (dockerd, shims and containers of the node killed) and partition (node's link down): docker ps on every engine every 50 ms from the fault until a copy runs on another node");
    println!("  partition: held {} s past the replacement running, then healed; two copies = time between a sample seeing two copies and the next sample", PARTITION_HOLD.as_secs());
    println!("  memory: RSS; per node: Bramble agent, Swarm: a worker's dockerd after joining (idle) minus the same dockerd before; dockerd: node engines with a 10-replica service running (Swarm's includes its agent); manager: Bramble controller, Swarm manager's dockerd");
    println!(
        "  took {:.1} min (builds excluded)",
        started.elapsed().as_secs_f64() / 60.0
    );
    crate::rerun(&format!("compare --rounds {rounds}"));
    Ok(())
}
