//! `bramble-bench scale`: the controller at rest with many nodes and tasks.
//!
//! Simulated agents speak the real wire protocol over TLS (join token, Hello, Welcome,
//! heartbeats at the controller's interval, task reports) but run nothing: a task they
//! are assigned is reported Running at once, with a container id, and its container's
//! CPU and memory appear in the next heartbeats as a real agent's would. So what is
//! measured is the controller alone: its CPU and memory at rest, its store writes at
//! rest, and what the dashboard's stream sends while nothing changes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bramble_agent::link::{metrics_due, METRICS_EVERY};
use bramble_agent::metrics::CONTAINER_STATS_EVERY;
use bramble_api::health::ContainerUsage;
use bramble_api::task::TaskPhase;
use bramble_api::token::JoinToken;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeMetrics, TaskStatus};
use bramble_tests::harness::{self, Controller, ControllerOpts};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::dashboard::store_writes;
use crate::link::{cpu_seconds, join, tls_config, Ws};
use crate::{mib, rerun};

/// Workloads per apply (the controller takes at most 100 changes in one).
const APPLY_BATCH: usize = 100;

/// Replicas per Service.
const REPLICAS: usize = 10;

/// What the simulated agents did, for the report.
#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    reports: AtomicU64,
    assigns: AtomicU64,
}

/// The figures of one window at rest.
struct Window {
    cpu_percent: f64,
    rss: u64,
    writes: u64,
    heartbeats: u64,
    reports: u64,
    assigns: u64,
    stream_bytes: Option<u64>,
    secs: f64,
}

/// A node's metrics as a lightly loaded Pi's would vary, with its tasks' containers:
/// measurement `tick`, one a [`METRICS_EVERY`], its containers' usage new every
/// [`CONTAINER_STATS_EVERY`] as the real agent's.
fn metrics(tick: u64, seed: u64, tasks: &BTreeSet<String>) -> NodeMetrics {
    // Deterministic jitter: every measurement differs, as a real node's do.
    let jitter = |tick: u64, k: u64| {
        ((tick.wrapping_mul(2654435761) ^ seed ^ k.wrapping_mul(97)) % 1000) as f32 / 100.0
    };
    let j = |k: u64| jitter(tick, k);
    let per_stats = (CONTAINER_STATS_EVERY.as_millis() / METRICS_EVERY.as_millis()).max(1);
    let stats_tick = tick / per_stats as u64;
    let js = |k: u64| jitter(stats_tick, k);
    NodeMetrics {
        at: chrono::Utc::now(),
        cpu_percent: 5.0 + j(1),
        memory_used_bytes: (300 << 20) + (f64::from(j(2)) * 1e6) as u64,
        memory_total_bytes: 1 << 30,
        load1: 0.2 + j(3) / 10.0,
        cores_percent: Some(vec![5.0 + j(4), 4.0 + j(5), 6.0 + j(6), 3.0 + j(7)]),
        memory_available_bytes: Some((600 << 20) - (f64::from(j(2)) * 1e6) as u64),
        load5: Some(0.3),
        load15: Some(0.3),
        data_disk: None,
        docker_disk: None,
        temperature_celsius: Some(48.0 + j(8) / 5.0),
        throttled: Some(0),
        containers: Some(
            tasks
                .iter()
                .enumerate()
                .map(|(i, t)| ContainerUsage {
                    task: t.clone(),
                    cpu_percent: Some(0.1 + js(10 + i as u64) / 10.0),
                    memory_bytes: Some((4 << 20) + (f64::from(js(40 + i as u64)) * 1e4) as u64),
                })
                .collect(),
        ),
    }
}

fn running(task: &str, seed: u64) -> TaskStatus {
    TaskStatus {
        container_id: Some(format!(
            "{:016x}{:016x}{:016x}{:016x}",
            seed,
            bramble_api::task::fnv1a64(task.as_bytes()),
            seed ^ 0x5a5a,
            1
        )),
        started_at: Some(chrono::Utc::now()),
        ..TaskStatus::new(task, TaskPhase::Running)
    }
}

/// One simulated agent: heartbeats at the Welcome's interval, measuring as the real
/// agent does (every [`METRICS_EVERY`], the heartbeats between repeating the last
/// measurement); each task assigned is reported Running once, each task unassigned is
/// reported removed.
async fn agent(
    mut ws: Ws,
    every: Duration,
    seed: u64,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut tasks: BTreeSet<String> = BTreeSet::new();
    // Spread the nodes' heartbeats over the interval, as real nodes' are.
    let offset = Duration::from_micros(seed % every.as_micros().max(1) as u64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut sampled: Option<(Instant, String)> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let hb = match &sampled {
                    Some((at, hb)) if !metrics_due(Some(at.elapsed()), every) => hb.clone(),
                    _ => {
                        n += 1;
                        let hb = wire::encode(&AgentMessage::Heartbeat { metrics: metrics(n, seed, &tasks) });
                        sampled = Some((Instant::now(), hb.clone()));
                        hb
                    }
                };
                ws.send(Message::text(hb)).await?;
                counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("link: {e}"),
                    None => bail!("the controller closed the link"),
                };
                if let ControllerMessage::Assign { tasks: set, .. } = wire::decode::<ControllerMessage>(text.as_str())? {
                    counters.assigns.fetch_add(1, Ordering::Relaxed);
                    let want: BTreeSet<String> = set.into_iter().map(|a| a.task).collect();
                    for t in want.difference(&tasks) {
                        let msg = AgentMessage::Status { status: running(t, seed) };
                        ws.send(Message::text(wire::encode(&msg))).await?;
                        counters.reports.fetch_add(1, Ordering::Relaxed);
                    }
                    for t in tasks.difference(&want) {
                        let msg = AgentMessage::Removed { task: t.clone() };
                        ws.send(Message::text(wire::encode(&msg))).await?;
                        counters.reports.fetch_add(1, Ordering::Relaxed);
                    }
                    tasks = want;
                }
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Simulated agents whose link ended, with why and when.
type Failures = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// Fails if a simulated agent's link ended, with the controller's log lines about it.
fn all_linked(failures: &Failures, c: &Controller) -> Result<()> {
    let failed = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some((first, _)) = failed.first() else {
        return Ok(());
    };
    let log = c.logs();
    let about: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(first.as_str()) && !l.contains("DEBUG"))
        .collect();
    let tail = about.len().saturating_sub(20);
    bail!(
        "{} simulated agents lost their link: {}\n--- the controller's log about {first} (last 20 lines):\n{}",
        failed.len(),
        failed
            .iter()
            .take(5)
            .map(|(n, why)| format!("{n} {why}"))
            .collect::<Vec<_>>()
            .join("; "),
        about[tail..].join("\n")
    )
}

async fn count_ready(c: &Controller) -> Result<usize> {
    let nodes = c.get("/v1/nodes").await?;
    Ok(nodes
        .as_array()
        .map_or(0, |a| a.iter().filter(|n| n["status"] == "Ready").count()))
}

async fn count_running(c: &Controller) -> Result<usize> {
    let tasks = c.get("/v1/tasks").await?;
    Ok(tasks
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count()))
}

fn service(name: &str) -> String {
    format!(
        "---\napiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"sleep\", \"100000\"]\n  resources: {{cpu: 10m, memory: 8Mi}}\n  replicas: {REPLICAS}\n"
    )
}

/// Measures `secs` of rest: the controller's CPU and RSS, store writes, what the agents
/// sent and got, and with `stream` the bytes the dashboard's stream sent after its
/// opening snapshot.
async fn window(
    c: &Controller,
    pid: u32,
    secs: u64,
    stream: bool,
    counters: &Counters,
) -> Result<Window> {
    let http = bramble_tests::http();
    let mut live = None;
    let mut bytes = 0u64;
    if stream {
        let (s, _, live_bytes) = crate::dashboard::open_stream(&http, &c.url()).await?;
        bytes = live_bytes;
        live = Some(s);
    }
    let writes0 = store_writes(c).await?;
    let cpu0 = cpu_seconds(pid).context("controller CPU")?;
    let (hb0, rep0, asg0) = (
        counters.heartbeats.load(Ordering::Relaxed),
        counters.reports.load(Ordering::Relaxed),
        counters.assigns.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    let run = Duration::from_secs(secs);
    let mut rss = 0;
    let mut next_sample = start;
    while start.elapsed() < run {
        if Instant::now() >= next_sample {
            rss = rss.max(harness::rss_bytes(pid).unwrap_or(0));
            next_sample += Duration::from_secs(5);
        }
        let left = run
            .saturating_sub(start.elapsed())
            .min(Duration::from_millis(500));
        match &mut live {
            Some(s) => match tokio::time::timeout(left, s.chunk()).await {
                Ok(Ok(Some(chunk))) => bytes += chunk.len() as u64,
                Ok(Ok(None)) => bail!("the controller closed the stream"),
                Ok(Err(e)) => bail!("stream: {e}"),
                Err(_) => {}
            },
            None => tokio::time::sleep(left).await,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(pid).context("controller CPU")?;
    Ok(Window {
        cpu_percent: (cpu1 - cpu0) / secs * 100.0,
        rss: rss.max(harness::rss_bytes(pid).unwrap_or(0)),
        writes: store_writes(c).await? - writes0,
        heartbeats: counters.heartbeats.load(Ordering::Relaxed) - hb0,
        reports: counters.reports.load(Ordering::Relaxed) - rep0,
        assigns: counters.assigns.load(Ordering::Relaxed) - asg0,
        stream_bytes: live.map(|_| bytes),
        secs,
    })
}

/// Runs the benchmark: `nodes` simulated agents heartbeating every `heartbeat`, `tasks`
/// tasks (Services of ten replicas) on them, then `secs` at rest without and `secs`
/// with a dashboard stream open.
pub async fn scale(nodes: usize, tasks: usize, heartbeat_ms: u64, secs: u64) -> Result<()> {
    // The defaults' ratios to the 250 ms heartbeat: NotReady after 4, Dead after 8, the
    // fence and its margin 6 heartbeats.
    let ms = |n: u64| format!("{}ms", heartbeat_ms * n);
    let args = [
        ("--heartbeat", ms(1)),
        ("--node-not-ready-after", ms(4)),
        ("--node-dead-after", ms(8)),
        ("--fence-timeout", ms(6)),
        ("--fence-margin", ms(6)),
    ];
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: args
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.clone()])
            .collect(),
    })
    .await?;
    let heartbeat = ms(1);
    let pid = c.pid().context("controller pid")?;
    let addr = format!("127.0.0.1:{}", c.port);
    let tls = tls_config(&c)?;
    let token: JoinToken = c.join_token()?.parse()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = harness::rss_bytes(pid).context("controller RSS")?;

    let counters = Arc::new(Counters::default());
    let failures: Failures = Arc::default();
    let started = Instant::now();
    let (stop_tx, stop) = watch::channel(false);
    let prefix = harness::unique("sim");
    let t = Instant::now();
    let mut agents = Vec::with_capacity(nodes);
    // Joins a few at a time: a burst of a thousand TLS handshakes at once would be a
    // different benchmark (and the controller drops the oldest beyond its limit).
    for chunk in (0..nodes).collect::<Vec<_>>().chunks(32) {
        let joins = chunk.iter().map(|i| {
            let name = format!("{prefix}-{i}");
            let (addr, tls, secret) = (addr.clone(), tls.clone(), token.secret.clone());
            async move { join(&addr, &tls, &secret, &name).await }
        });
        for (i, joined) in futures_util::future::join_all(joins)
            .await
            .into_iter()
            .enumerate()
        {
            let (ws, every) = joined?;
            let name = format!("{prefix}-{}", chunk[i]);
            let seed = bramble_api::task::fnv1a64(name.as_bytes());
            let run = agent(ws, every, seed, counters.clone(), stop.clone());
            let failures = Arc::clone(&failures);
            agents.push(tokio::spawn(async move {
                let r = run.await;
                if let Err(e) = &r {
                    let at = started.elapsed().as_secs_f64();
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((name, format!("after {at:.1} s: {e:#}")));
                }
                r
            }));
        }
    }
    while count_ready(&c).await? < nodes {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{nodes} simulated nodes not Ready after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let joined_in = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    all_linked(&failures, &c)?;
    let rss_nodes = harness::rss_bytes(pid).context("controller RSS")?;

    let workloads = tasks.div_ceil(REPLICAS);
    let t = Instant::now();
    for batch in (0..workloads).collect::<Vec<_>>().chunks(APPLY_BATCH) {
        let yaml: String = batch
            .iter()
            .map(|i| service(&format!("scale-{i}")))
            .collect();
        crate::apply_yaml(&c, &format!("scale-{}", batch[0]), &yaml).await?;
    }
    let total = workloads * REPLICAS;
    loop {
        let n = count_running(&c).await?;
        if n >= total {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {n} of {total} tasks Running after 600 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let placed_in = t.elapsed();
    // Settle: the last reports written, the first full minute of history buckets.
    tokio::time::sleep(Duration::from_secs(10)).await;
    all_linked(&failures, &c)?;

    // A window with a simulated agent gone would measure a smaller cluster than asked.
    let quiet = window(&c, pid, secs, false, &counters).await?;
    all_linked(&failures, &c)?;
    let watched = window(&c, pid, secs, true, &counters).await?;
    all_linked(&failures, &c)?;
    let _ = stop_tx.send(true);
    for a in agents {
        match a.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("a simulated agent failed: {e:#}"),
            Err(e) => bail!("a simulated agent panicked: {e}"),
        }
    }

    println!(
        "controller at scale ({} binaries, SQLite store), {nodes} simulated nodes heartbeating every {heartbeat}, {total} tasks:",
        harness::PROFILE
    );
    println!(
        "  RSS: {} empty, {} with {nodes} nodes joined (in {:.1} s), {} with {total} tasks (placed and Running in {:.1} s)",
        mib(rss_empty),
        mib(rss_nodes),
        joined_in.as_secs_f64(),
        mib(quiet.rss),
        placed_in.as_secs_f64()
    );
    for (what, w) in [
        ("at rest", &quiet),
        ("at rest, dashboard stream open", &watched),
    ] {
        println!(
            "  {what}, {:.0} s: CPU {:.1}% of one core   RSS max {}   store writes {}   heartbeats {:.0}/s   task reports {}   task sets sent {}",
            w.secs,
            w.cpu_percent,
            mib(w.rss),
            w.writes,
            w.heartbeats as f64 / w.secs,
            w.reports,
            w.assigns
        );
        if let Some(b) = w.stream_bytes {
            println!(
                "    dashboard stream: {:.1} KiB per minute after its snapshot",
                b as f64 * 60.0 / w.secs / 1024.0
            );
        }
    }
    rerun(&format!(
        "scale --nodes {nodes} --tasks {tasks} --heartbeat-ms {heartbeat_ms} --secs {secs}"
    ));
    Ok(())
}
