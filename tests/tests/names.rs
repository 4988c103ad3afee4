//! Workloads reach each other by name, on nodes with their own Docker engines in their
//! own network namespaces ([`NetCluster::start_with_engines`]): `NAME` and
//! `NAME.bramble` resolve in every container to the workload's stable address, and the
//! agents' proxies carry a connection to a Ready instance wherever it runs, through the
//! agent-to-agent port between nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bramble_tests::eventually;
use bramble_tests::netns::{NetCluster, HEALING_FLAGS};

const WAIT: Duration = Duration::from_secs(40);

fn service(name: &str, replicas: u32, args: &str, extra: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [{args}]
  resources: {{cpu: 50m, memory: 16Mi}}
  replicas: {replicas}
{extra}"
    )
}

fn wallet(name: &str, port: u16) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Wallet
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"{port}\"]
  ports: [{{container: {port}}}]
  resources: {{cpu: 50m, memory: 16Mi}}
"
    )
}

/// A poller of `target` (`HOST:PORT`) asking each answering instance its host name
/// (the container id's start).
fn poller(name: &str, replicas: u32, target: &str) -> String {
    service(
        name,
        replicas,
        &format!("\"poll\", \"{target}\", \"/env/HOSTNAME\", \"100\""),
        "",
    )
}

/// One line of `testimg poll`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Try {
    at_ms: u128,
    /// The answering container's host name, or `None` for a failed try.
    answer: Option<String>,
}

fn tries(log: &str) -> Vec<Try> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            let at_ms = w.next()?.parse().ok()?;
            match w.next()? {
                "ok" => Some(Try {
                    at_ms,
                    answer: Some(w.next().unwrap_or_default().trim().to_string()),
                }),
                "fail" => Some(Try {
                    at_ms,
                    answer: None,
                }),
                _ => None,
            }
        })
        .collect()
}

/// Every running container of `workload`: (node, id).
fn running(c: &NetCluster, workload: &str) -> Result<Vec<(String, String)>> {
    Ok(c.running(&format!("bramble.workload={workload}"))?
        .into_iter()
        .map(|k| (k.node, k.id))
        .collect())
}

/// The tries of every running poller container, by (node, container).
fn poll_logs(c: &NetCluster, workload: &str) -> Result<BTreeMap<(String, String), Vec<Try>>> {
    let mut out = BTreeMap::new();
    for (node, id) in running(c, workload)? {
        let log = c.logs(&node, &id)?;
        out.insert((node, id), tries(&log));
    }
    Ok(out)
}

async fn start(nodes: usize) -> Result<NetCluster> {
    NetCluster::start_with_engines(nodes, HEALING_FLAGS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_reached_by_name_from_every_node_and_spread_over_its_replicas() {
    let c = start(3).await.expect("the cluster starts");
    if let Err(e) = by_name(&c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn by_name(c: &NetCluster) -> Result<()> {
    let web = bramble_tests::harness::unique("web");
    let client = bramble_tests::harness::unique("client");
    c.apply(&service(
        &web,
        2,
        "\"serve\", \"8080\"",
        "  ports: [{container: 8080}]\n",
    ))
    .await?;
    c.apply(&poller(&client, 3, &format!("{web}:8080"))).await?;
    let webs = eventually(WAIT, "two web replicas running", || async {
        let r = running(c, &web)?;
        Ok((r.len() == 2).then_some(r))
    })
    .await?;
    let clients = eventually(WAIT, "three clients running", || async {
        let r = running(c, &client)?;
        Ok((r.len() == 3).then_some(r))
    })
    .await?;
    let web_nodes: BTreeSet<&str> = webs.iter().map(|(n, _)| n.as_str()).collect();
    let lonely: Vec<&(String, String)> = clients
        .iter()
        .filter(|(n, _)| !web_nodes.contains(n.as_str()))
        .collect();
    ensure!(
        !lonely.is_empty(),
        "some client should run on a node without a web replica: webs {webs:?}, clients {clients:?}"
    );
    // Host names are the container ids' first 12 characters.
    let replicas: BTreeSet<String> = webs.iter().map(|(_, id)| id[..12].to_string()).collect();
    eventually(
        WAIT,
        "every client answered by both web replicas",
        || async {
            let logs = poll_logs(c, &client)?;
            for ((node, id), t) in &logs {
                let seen: BTreeSet<String> = t.iter().filter_map(|t| t.answer.clone()).collect();
                if seen != replicas {
                    bail!(
                        "client {id:.12} on {node} saw {seen:?} of {replicas:?}; last tries {:?}",
                        t.iter().rev().take(3).collect::<Vec<_>>()
                    );
                }
            }
            Ok(Some(()))
        },
    )
    .await?;

    // The names resolve to one address, the same on every node, in the range.
    let endpoint = c.get(&format!("/v1/endpoints/{web}")).await?;
    let address = endpoint["address"]
        .as_str()
        .ok_or_else(|| anyhow!("no address: {endpoint}"))?
        .to_string();
    ensure!(address.starts_with("169.254.10"), "{endpoint}");
    for (node, id) in &clients {
        for name in [web.clone(), format!("{web}.bramble")] {
            let (ok, out) = c.exec(
                node,
                id,
                &["/testimg", "get", &format!("{name}:8080"), "/healthz"],
            )?;
            ensure!(ok && out.trim() == "ok", "GET {name}:8080 on {node}: {out}");
        }
    }
    let ready = endpoint["backends"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(ready == 2, "two instances behind {web}: {endpoint}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_cut_off_is_reached_by_name_on_its_new_node_and_old_connections_close() {
    let c = start(3).await.expect("the cluster starts");
    if let Err(e) = wallet_moves(&c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn wallet_moves(c: &NetCluster) -> Result<()> {
    let coin = bramble_tests::harness::unique("coin");
    let client = bramble_tests::harness::unique("client");
    let holder = bramble_tests::harness::unique("holder");
    c.apply(&wallet(&coin, 9332)).await?;
    let (first_node, first) = eventually(WAIT, "the wallet running", || async {
        Ok(running(c, &coin)?.into_iter().next())
    })
    .await?;
    // Clients on every node; the ones on other nodes go on through the move.
    c.apply(&poller(&client, 3, &format!("{coin}:9332")))
        .await?;
    c.apply(&service(
        &holder,
        3,
        &format!("\"hold\", \"{coin}:9332\""),
        "",
    ))
    .await?;
    eventually(WAIT, "every client answered by the wallet", || async {
        let logs = poll_logs(c, &client)?;
        let all = logs.len() == 3
            && logs
                .values()
                .all(|t| t.iter().any(|t| t.answer.as_deref() == Some(&first[..12])));
        Ok(all.then_some(()))
    })
    .await?;
    let holders = eventually(WAIT, "three holders connected", || async {
        let mut held = Vec::new();
        for (node, id) in running(c, &holder)? {
            if c.logs(&node, &id)?.contains("connected") {
                held.push((node, id));
            }
        }
        Ok((held.len() == 3).then_some(held))
    })
    .await?;

    // The wallet's node is cut off (no reset reaches anyone): it fences its wallet, the
    // controller places it elsewhere, and the name follows.
    c.partition(&first_node)?;
    let (second_node, second) = eventually(WAIT, "the wallet running on another node", || async {
        Ok(running(c, &coin)?
            .into_iter()
            .find(|(n, _)| *n != first_node))
    })
    .await?;
    let started = started_ms(c, &second_node, &second)?;
    let survivors: Vec<(String, String)> = running(c, &client)?
        .into_iter()
        .filter(|(n, _)| *n != first_node)
        .collect();
    let mut gaps = Vec::new();
    for (node, id) in &survivors {
        let t = eventually(WAIT, "a client answered by the new wallet", || async {
            let t = tries(&c.logs(node, id)?);
            Ok(t.iter()
                .find(|t| t.answer.as_deref() == Some(&second[..12]))
                .map(|t| t.at_ms))
        })
        .await?;
        gaps.push(t.saturating_sub(started));
        // Once answered by the new one, never by the old one again.
        let t2 = tries(&c.logs(node, id)?);
        let after: Vec<&Try> = t2.iter().filter(|x| x.at_ms > t).collect();
        ensure!(
            after
                .iter()
                .all(|x| x.answer.as_deref() != Some(&first[..12])),
            "the old wallet answered after the new one: {after:?}"
        );
    }
    eprintln!("wallet started -> first answer by name on each other node: {gaps:?} ms ({} survivors, first on {first_node}, now on {second_node})", survivors.len());
    // Clients that resolved once keep working: poll resolved the name at its start.
    ensure!(
        gaps.iter().all(|g| *g <= 5_000),
        "a client waited over 5 s after the new wallet started: {gaps:?} ms"
    );
    // Connections held to the old instance (from nodes still connected) were closed.
    for (node, id) in holders.iter().filter(|(n, _)| *n != first_node) {
        let log = eventually(WAIT, "the held connection closed", || async {
            let log = c.logs(node, id)?;
            Ok(log.contains("closed").then_some(log))
        })
        .await
        .with_context(|| format!("holder on {node}"))?;
        eprintln!("holder on {node}: {log:?}");
    }
    Ok(())
}

/// When a container started, in Unix milliseconds, by its engine.
fn started_ms(c: &NetCluster, node: &str, id: &str) -> Result<u128> {
    let engine = c
        .engine(node)?
        .ok_or_else(|| anyhow!("{node} has no engine"))?;
    let out = engine
        .docker()
        .args(["inspect", "--format", "{{.State.StartedAt}}", id])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let at = chrono::DateTime::parse_from_rfc3339(&text)
        .with_context(|| format!("StartedAt {text:?}"))?;
    Ok(u128::try_from(at.timestamp_millis()).unwrap_or_default())
}
