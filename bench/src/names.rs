//! Names that follow workloads, on two nodes with their own Docker engines in network
//! namespaces: the latency and throughput the agents' proxies add (direct to the
//! container, by name on the same node, by name through the other node's agent), an
//! agent's memory with 50 workloads' endpoints, and a Wallet's move: new instance
//! started -> first successful call by name from the other node.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bramble_tests::eventually;
use bramble_tests::netns::{NetCluster, HEALING_FLAGS};

use crate::{percentile, rerun};

const WAIT: Duration = Duration::from_secs(60);

fn service(name: &str, replicas: u32, args: &str, port: Option<u16>) -> String {
    let ports = port
        .map(|p| format!("  ports: [{{container: {p}}}]\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [{args}]
  resources: {{cpu: 100m, memory: 32Mi}}
  replicas: {replicas}
{ports}"
    )
}

async fn wait_running(c: &NetCluster, workload: &str, n: usize) -> Result<Vec<(String, String)>> {
    eventually(WAIT, &format!("{n} of {workload} running"), || async {
        let r = c.instances(workload)?;
        Ok((r.len() == n).then_some(r))
    })
    .await
}

/// The container's address on its node's Docker bridge.
fn container_ip(c: &NetCluster, node: &str, id: &str) -> Result<String> {
    let engine = c.engine(node)?.ok_or_else(|| anyhow!("no engine"))?;
    let out = engine
        .docker()
        .args([
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            id,
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn exec(c: &NetCluster, node: &str, id: &str, cmd: &[&str]) -> Result<String> {
    let (ok, out) = c.exec(node, id, cmd)?;
    if !ok {
        bail!("{cmd:?} on {node}: {out}");
    }
    Ok(out.trim().to_string())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// Runs the whole measurement; `rounds` Wallet moves.
pub async fn names(rounds: usize) -> Result<()> {
    let mut c = NetCluster::start_with_engines(2, HEALING_FLAGS).await?;
    let r = run(&mut c, rounds).await;
    if r.is_err() {
        eprintln!("{}", c.controller().logs());
    }
    r
}

async fn run(c: &mut NetCluster, rounds: usize) -> Result<()> {
    println!(
        "names: proxy latency and throughput, agent memory, a wallet's move (2 nodes, own engines)"
    );
    c.apply(&service("web", 1, "\"serve\", \"8080\"", Some(8080)))
        .await?;
    c.apply(&service("sink", 1, "\"sink\", \"9000\"", Some(9000)))
        .await?;
    c.apply(&service("client", 2, "\"sleep\", \"100000\"", None))
        .await?;
    let (web_node, web_id) = wait_running(c, "web", 1).await?.remove(0);
    let (sink_node, sink_id) = wait_running(c, "sink", 1).await?.remove(0);
    let clients = wait_running(c, "client", 2).await?;
    let local = clients
        .iter()
        .find(|(n, _)| *n == web_node)
        .ok_or_else(|| anyhow!("no client beside web on {web_node}: {clients:?}"))?;
    let remote = clients
        .iter()
        .find(|(n, _)| *n != web_node)
        .ok_or_else(|| anyhow!("no client away from web: {clients:?}"))?;
    let web_ip = container_ip(c, &web_node, &web_id)?;
    // Warm up (names resolved, certificates, connections).
    exec(
        c,
        &remote.0,
        &remote.1,
        &["/testimg", "rtt", "web:8080", "20"],
    )?;
    let n = "1000";
    for (what, (node, id), target) in [
        (
            "direct to the container (same node)",
            local,
            format!("{web_ip}:8080"),
        ),
        (
            "by name, instance on the same node",
            local,
            "web:8080".to_string(),
        ),
        (
            "by name, instance on the other node",
            remote,
            "web:8080".to_string(),
        ),
    ] {
        let out = exec(c, node, id, &["/testimg", "rtt", &target, n])?;
        let v: Vec<&str> = out.split_whitespace().collect();
        println!(
            "  request on a new connection, {what}: p50 {} µs, p99 {} µs, mean {} µs ({n} requests)",
            v.first().unwrap_or(&"?"),
            v.get(1).unwrap_or(&"?"),
            v.get(2).unwrap_or(&"?")
        );
    }
    let sink_ip = container_ip(c, &sink_node, &sink_id)?;
    let beside = clients
        .iter()
        .find(|(n, _)| *n == sink_node)
        .ok_or_else(|| anyhow!("no client beside sink"))?;
    let away = clients
        .iter()
        .find(|(n, _)| *n != sink_node)
        .ok_or_else(|| anyhow!("no client away from sink"))?;
    for (what, (node, id), target) in [
        (
            "direct to the container (same node)",
            beside,
            format!("{sink_ip}:9000"),
        ),
        ("by name, same node", beside, "sink:9000".to_string()),
        (
            "by name, through the other node's agent (TLS)",
            away,
            "sink:9000".to_string(),
        ),
    ] {
        let out = exec(c, node, id, &["/testimg", "blast", &target, "200"])?;
        println!("  throughput {what}: {out} MiB/s (200 MiB, one connection)");
    }

    // Memory with 50 workloads' endpoints (each address and port listened on).
    let node = c.node(0).to_string();
    let pid = c
        .agent(&node)?
        .pid()
        .ok_or_else(|| anyhow!("agent not running"))?;
    let before = rss_kib(pid)?;
    for i in 0..47 {
        c.apply(&service(
            &format!("idle-{i}"),
            0,
            "\"sleep\", \"1\"",
            Some(8080),
        ))
        .await?;
    }
    eventually(WAIT, "50 endpoints", || async {
        let e = c.get("/v1/endpoints").await?;
        Ok((e.as_array().map(Vec::len) == Some(50)).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(pid)?;
    println!(
        "  agent RSS: {:.1} MiB with 3 workloads, {:.1} MiB with 50 workloads' endpoints",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );

    // A Wallet moved by a partition of its node; a client on the other node polls it.
    c.apply(
        "apiVersion: bramble/v1
kind: Wallet
metadata: {name: coin}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"9332\"]
  ports: [{container: 9332}]
  resources: {cpu: 100m, memory: 32Mi}
",
    )
    .await?;
    c.apply(&service(
        "poller",
        2,
        "\"poll\", \"coin:9332\", \"/env/HOSTNAME\", \"50\"",
        None,
    ))
    .await?;
    wait_running(c, "poller", 2).await?;
    let mut gaps = Vec::new();
    for round in 0..rounds {
        let (old_node, _) = wait_running(c, "coin", 1).await?.remove(0);
        c.partition(&old_node)?;
        let (new_node, new_id) = eventually(WAIT, "the wallet on the other node", || async {
            Ok(c.instances("coin")?
                .into_iter()
                .find(|(n, _)| *n != old_node))
        })
        .await?;
        let started = c.started_ms(&new_node, &new_id)?;
        let (pn, pid) = c
            .instances("poller")?
            .into_iter()
            .find(|(n, _)| *n == new_node)
            .ok_or_else(|| anyhow!("no poller on {new_node}"))?;
        let first = eventually(WAIT, "an answer from the new wallet", || async {
            let log = c.logs(&pn, &pid)?;
            Ok(log.lines().find_map(|l| {
                let mut w = l.splitn(3, ' ');
                let at: u128 = w.next()?.parse().ok()?;
                (w.next()? == "ok" && w.next()?.trim() == &new_id[..12] && at >= started)
                    .then_some(at)
            }))
        })
        .await?;
        let gap = Duration::from_millis(u64::try_from(first - started).unwrap_or(u64::MAX));
        println!(
            "  round {}: wallet started on {new_node} -> first call by name answered: {} ms",
            round + 1,
            gap.as_millis()
        );
        gaps.push(gap);
        c.heal(&old_node)?;
        c.wait_ready(&old_node)
            .await
            .with_context(|| format!("{old_node} back"))?;
        // The fenced node's old container is gone before the next round starts.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    gaps.sort();
    println!(
        "  wallet Ready elsewhere -> first successful call by name: median {} ms, max {} ms ({} moves; the poller calls every 50 ms)",
        percentile(&gaps, 0.5).as_millis(),
        gaps.last().copied().unwrap_or_default().as_millis(),
        gaps.len()
    );
    rerun(&format!("names --rounds {rounds}"));
    Ok(())
}
