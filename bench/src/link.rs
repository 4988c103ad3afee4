//! The agent link over TLS: what the handshake costs, what an idle agent spends on its
//! link, how soon an agent is back after its controller restarts; and the controller's
//! memory under a flood of fake nodes (the join token is on every SD card, so anyone
//! with one can try).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bramble_api::manifest::Arch;
use bramble_api::token::{JoinToken, Secret};
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo, NodeMetrics};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::{mib, percentile, rerun, wait_ready};

pub(crate) fn tls_config(c: &Controller) -> Result<Arc<rustls::ClientConfig>> {
    bramble_tls::install_provider();
    let fp = c.ca_fingerprint()?.parse()?;
    Ok(Arc::new(bramble_tls::client_config(
        bramble_tls::Pins::one(fp),
    )))
}

async fn tls_connect(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    Ok(tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?)
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux Bramble runs on.
    Some((utime + stime) / 100.0)
}

/// TLS handshake time, an idle agent's CPU and memory, and reconnect time after a
/// controller restart.
pub async fn link(rounds: usize, idle_secs: u64) -> Result<()> {
    let mut c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let addr = format!("127.0.0.1:{}", c.port);
    let tls = tls_config(&c)?;
    // The handshake alone, as a client does it (the controller's side is the same work).
    let _ = tls_connect(&addr, &tls).await?;
    let mut handshakes = Vec::with_capacity(rounds * 5);
    for _ in 0..rounds * 5 {
        let t = Instant::now();
        let s = tls_connect(&addr, &tls).await?;
        handshakes.push(t.elapsed());
        drop(s);
    }
    handshakes.sort();

    let node = harness::unique("link");
    let agent = Agent::start(&c, &node)?;
    wait_ready(&c, &node).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = agent.pid().context("agent pid")?;
    let rss = harness::rss_bytes(pid).context("agent RSS")?;
    let cpu0 = cpu_seconds(pid).context("agent CPU")?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let cpu1 = cpu_seconds(pid).context("agent CPU")?;
    let idle_cpu = (cpu1 - cpu0) / idle_secs as f64 * 100.0;

    let mut reconnects = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        c.restart().await?;
        let t = Instant::now();
        loop {
            let connected = c
                .get(&format!("/v1/nodes/{node}"))
                .await
                .map(|n| n["address"].is_string() && n["status"] == "Ready")
                .unwrap_or(false);
            if connected {
                reconnects.push(t.elapsed());
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not reconnect within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    reconnects.sort();
    let rss_after = harness::rss_bytes(pid).context("agent RSS")?;

    println!(
        "agent link over TLS (rustls, ring), {} binaries, controller and agent on one machine:",
        harness::PROFILE
    );
    println!(
        "  TLS handshake to the controller (client side): p50 {:.2} ms   p99 {:.2} ms   ({} handshakes)",
        percentile(&handshakes, 0.5).as_secs_f64() * 1e3,
        percentile(&handshakes, 0.99).as_secs_f64() * 1e3,
        handshakes.len()
    );
    println!(
        "  agent, idle, connected: {}   CPU {:.2}% of one core over {idle_secs} s (heartbeat 250 ms)",
        mib(rss),
        idle_cpu
    );
    println!(
        "  controller restart -> agent connected and Ready again: p50 {} ms   max {} ms   ({rounds} restarts); agent after them: {}",
        percentile(&reconnects, 0.5).as_millis(),
        reconnects.last().copied().unwrap_or_default().as_millis(),
        mib(rss_after)
    );
    rerun(&format!("link --rounds {rounds} --idle-secs {idle_secs}"));
    Ok(())
}

fn fake_info(name: &str) -> NodeInfo {
    NodeInfo {
        mesh: None,
        name: name.into(),
        arch: Arch::Arm64,
        cores: 4,
        memory_bytes: 1 << 30,
        docker_version: "20.10.24".into(),
        labels: Default::default(),
        agent_version: bramble_api::VERSION.into(),
        os: "fake".into(),
        machine_id: None,
        memory_limits: Some(true),
        warnings: vec![],
    }
}

/// A heartbeat at every limit the controller allows.
fn heartbeat_at_the_limits() -> String {
    let disk = |p: &str| bramble_api::health::DiskUsage {
        path: p.repeat(wire::MAX_INFO_TEXT / p.len()),
        free_bytes: 1 << 30,
        total_bytes: 1 << 34,
    };
    let metrics = NodeMetrics {
        at: chrono::Utc::now(),
        cpu_percent: 12.5,
        memory_used_bytes: 1 << 29,
        memory_total_bytes: 1 << 30,
        load1: 0.5,
        cores_percent: Some(vec![12.5; wire::MAX_CORES]),
        memory_available_bytes: Some(1 << 29),
        load5: Some(0.5),
        load15: Some(0.5),
        data_disk: Some(disk("/d")),
        docker_disk: Some(disk("/k")),
        temperature_celsius: Some(50.0),
        throttled: Some(0),
        containers: Some(
            (0..wire::MAX_CONTAINERS)
                .map(|i| bramble_api::health::ContainerUsage {
                    task: format!("{i:0>width$}", width = wire::MAX_TASK_ID),
                    cpu_percent: Some(1.0),
                    memory_bytes: Some(1 << 20),
                })
                .collect(),
        ),
    };
    wire::encode(&AgentMessage::Heartbeat { metrics })
}

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Joins as a new node with the join token; the link once welcomed, and the heartbeat
/// interval the controller asked for.
pub(crate) async fn join(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    secret: &str,
    name: &str,
) -> Result<(Ws, Duration)> {
    let stream = tls_connect(addr, tls).await?;
    let mut req = format!("wss://{addr}/v1/agent").into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {secret}"))?,
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    let hello = AgentMessage::Hello {
        csr: None,
        node: fake_info(name),
        tasks: vec![],
        credential: Some(Secret(format!("{:064x}", rand_u128(name)))),
        standby: false,
        not_before: true,
        endpoint_changes: true,
    };
    ws.send(Message::text(wire::encode(&hello))).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str())? {
                ControllerMessage::Welcome { heartbeat_ms, .. } => {
                    return Ok((ws, Duration::from_millis(heartbeat_ms.max(1))))
                }
                ControllerMessage::Error { code, message } => bail!("{name}: {code}: {message}"),
                _ => {}
            },
            Some(Ok(_)) => {}
            other => bail!("{name}: no welcome: {other:?}"),
        }
    }
}

fn rand_u128(seed: &str) -> u128 {
    bramble_api::task::fnv1a64(seed.as_bytes()) as u128 * 0x9e37_79b9_7f4a_7c15
}

/// Sends `frame` every `every` on each link for `how_long`, reading (and dropping)
/// what comes back; the controller's peak RSS meanwhile.
async fn flood(
    links: Vec<Ws>,
    frame: String,
    every: Duration,
    how_long: Duration,
    pid: u32,
) -> u64 {
    let stop = Instant::now() + how_long;
    let mut tasks = Vec::new();
    for ws in links {
        let frame = frame.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            while Instant::now() < stop {
                if tx.send(Message::text(frame.clone())).await.is_err() {
                    break;
                }
                tokio::time::sleep(every).await;
            }
            reader.abort();
        }));
    }
    let mut peak = 0;
    while Instant::now() < stop {
        peak = peak.max(harness::rss_bytes(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    peak
}

/// The audit's attack (40 fake nodes sending 2.7 MB heartbeats), then 40 fake nodes
/// sending the largest heartbeats the limits allow; the controller's RSS throughout.
pub async fn fake_nodes(nodes: usize, secs: u64) -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let addr = format!("127.0.0.1:{}", c.port);
    let tls = tls_config(&c)?;
    let token: JoinToken = c.join_token()?.parse()?;
    let pid = c.pid().context("controller pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = harness::rss_bytes(pid).context("controller RSS")?;

    let huge = format!(
        "{{\"v\":{},\"type\":\"heartbeat\",\"metrics\":{{\"at\":\"2026-12-01T00:00:00Z\",\"cpuPercent\":1,\"memoryUsedBytes\":1,\"memoryTotalBytes\":1,\"load1\":0,\"coresPercent\":[{}]}}}}",
        wire::PROTOCOL_VERSION,
        vec!["12.5"; 2_700_000 / 5].join(",")
    );
    let mut links = Vec::new();
    for i in 0..nodes {
        links.push(
            join(&addr, &tls, &token.secret, &format!("fake-a{i}"))
                .await?
                .0,
        );
    }
    let joined = harness::rss_bytes(pid).unwrap_or(0);
    let peak_huge = flood(
        links,
        huge.clone(),
        Duration::from_secs(1),
        Duration::from_secs(secs),
        pid,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_huge = harness::rss_bytes(pid).unwrap_or(0);

    let at_limits = heartbeat_at_the_limits();
    let mut links = Vec::new();
    for i in 0..nodes {
        links.push(
            join(&addr, &tls, &token.secret, &format!("fake-b{i}"))
                .await?
                .0,
        );
    }
    let peak_limits = flood(
        links,
        at_limits.clone(),
        Duration::from_millis(250),
        Duration::from_secs(secs),
        pid,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_limits = harness::rss_bytes(pid).unwrap_or(0);

    println!(
        "controller under a fake-node flood ({} binaries; {nodes} fake nodes joined with the join token):",
        harness::PROFILE
    );
    println!(
        "  controller at start:                              {}",
        mib(baseline)
    );
    println!(
        "  after {nodes} fake nodes joined:                      {}",
        mib(joined)
    );
    println!(
        "  {nodes} nodes x {:.1} MB heartbeats every 1 s, {secs} s (refused unread): peak {}   after {}",
        huge.len() as f64 / 1e6,
        mib(peak_huge),
        mib(after_huge)
    );
    println!(
        "  {nodes} more nodes x {:.0} KB heartbeats (every limit at its maximum) every 250 ms, {secs} s: peak {}   after {}",
        at_limits.len() as f64 / 1e3,
        mib(peak_limits),
        mib(after_limits)
    );
    rerun(&format!("fake-nodes --nodes {nodes} --secs {secs}"));
    Ok(())
}
