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

/// The tries of every running poller container, by (node, container).
fn poll_logs(c: &NetCluster, workload: &str) -> Result<BTreeMap<(String, String), Vec<Try>>> {
    let mut out = BTreeMap::new();
    for (node, id) in c.instances(workload)? {
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
        let r = c.instances(&web)?;
        Ok((r.len() == 2).then_some(r))
    })
    .await?;
    let clients = eventually(WAIT, "three clients running", || async {
        let r = c.instances(&client)?;
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
        Ok(c.instances(&coin)?.into_iter().next())
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
        for (node, id) in c.instances(&holder)? {
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
        Ok(c.instances(&coin)?
            .into_iter()
            .find(|(n, _)| *n != first_node))
    })
    .await?;
    let started = c.started_ms(&second_node, &second)?;
    let survivors: Vec<(String, String)> = c
        .instances(&client)?
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

/// A Service of two replicas whose readiness is a file (`/ready`) the test makes and
/// removes.
fn switchable(name: &str) -> String {
    service(
        name,
        2,
        "\"serve\", \"8080\"",
        "  ports: [{container: 8080}]
  probes:
    readiness: {exec: [\"/testimg\", \"exists\", \"/ready\"], period: 1s, failureThreshold: 1}
",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_late_workloads_and_restarts_keep_routing_and_outsiders_are_refused() {
    let mut c = start(2).await.expect("the cluster starts");
    if let Err(e) = routing(&mut c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn routing(c: &mut NetCluster) -> Result<()> {
    let web = bramble_tests::harness::unique("web");
    let client = bramble_tests::harness::unique("client");
    let late = bramble_tests::harness::unique("late");
    c.apply(&switchable(&web)).await?;
    let webs = eventually(WAIT, "two web replicas running", || async {
        let r = c.instances(&web)?;
        Ok((r.len() == 2).then_some(r))
    })
    .await?;
    // One client per node: it was started before `late` exists.
    c.apply(&poller(&client, 2, &format!("{web}:8080"))).await?;
    c.apply(&poller(
        &format!("{client}-late"),
        1,
        &format!("{late}:8080"),
    ))
    .await?;

    // Not ready: nothing answers, though both run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = poll_logs(c, &client)?;
    ensure!(
        logs.values().flatten().all(|t| t.answer.is_none()),
        "an instance failing readiness answered: {logs:?}"
    );
    for (node, id) in &webs {
        let (ok, out) = c.exec(node, id, &["/testimg", "touch", "/ready"])?;
        ensure!(ok, "touch /ready: {out}");
    }
    let both: BTreeSet<String> = webs.iter().map(|(_, id)| id[..12].to_string()).collect();
    eventually(WAIT, "every client answered by both replicas", || async {
        let logs = poll_logs(c, &client)?;
        let ok = logs.len() == 2
            && logs.values().all(|t| {
                let seen: BTreeSet<String> = t.iter().filter_map(|t| t.answer.clone()).collect();
                seen == both
            });
        Ok(ok.then_some(()))
    })
    .await?;

    // One replica fails readiness: it gets no new connections.
    let (off_node, off) = webs[0].clone();
    let (ok, out) = c.exec(&off_node, &off, &["/testimg", "rm", "/ready"])?;
    ensure!(ok, "rm /ready: {out}");
    let not_ready_at = eventually(WAIT, "the replica reported not ready", || async {
        let e = c.get(&format!("/v1/endpoints/{web}")).await?;
        let ready = e["backends"]
            .as_array()
            .map(|b| b.iter().filter(|b| b["ready"] == true).count());
        Ok((ready == Some(1)).then(now_ms))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ((node, _), t) in poll_logs(c, &client)? {
        // A try already under way when the table changed may still land on it.
        let late_hits: Vec<&Try> = t
            .iter()
            .filter(|t| t.at_ms > not_ready_at + 500 && t.answer.as_deref() == Some(&off[..12]))
            .collect();
        ensure!(
            late_hits.is_empty(),
            "the replica failing readiness got new connections from {node}: {late_hits:?}"
        );
        ensure!(
            t.iter()
                .any(|t| t.at_ms > not_ready_at + 500 && t.answer.is_some()),
            "the ready replica stopped answering {node}"
        );
    }

    // A workload applied after the client started is reached within 5 s of running.
    c.apply(&service(
        &late,
        1,
        "\"serve\", \"8080\"",
        "  ports: [{container: 8080}]\n",
    ))
    .await?;
    let (late_node, late_id) = eventually(WAIT, "the late workload running", || async {
        Ok(c.instances(&late)?.into_iter().next())
    })
    .await?;
    let late_started = c.started_ms(&late_node, &late_id)?;
    let (poller_node, poller_id) = c
        .instances(&format!("{client}-late"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the late workload's poller is not running"))?;
    let first = eventually(WAIT, "the late workload reached by name", || async {
        let t = tries(&c.logs(&poller_node, &poller_id)?);
        Ok(t.iter().find(|t| t.answer.is_some()).map(|t| t.at_ms))
    })
    .await?;
    let gap = first.saturating_sub(late_started);
    eprintln!("late workload started -> first answer by name: {gap} ms");
    ensure!(gap <= 5_000, "reached {gap} ms after it started");

    // The controller away: agents route with the table they have, and an agent
    // restarted meanwhile routes with the one it kept.
    let task = c.tasks(&web).await?[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.kill_controller();
    let before = now_ms();
    // The node whose own replica is not ready: its clients are answered only through
    // the other node's agent, so this restart also needs the kept mesh certificate.
    let restart_node = off_node.clone();
    ensure!(
        c.instances(&client)?
            .iter()
            .any(|(n, _)| *n == restart_node),
        "no client on {restart_node}"
    );
    c.agent(&restart_node)?.kill9();
    c.agent(&restart_node)?.restart()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = now_ms();
    eventually(
        WAIT,
        "clients answered with the controller away",
        || async {
            let logs = poll_logs(c, &client)?;
            let ok = logs.len() == 2
                && logs.values().all(|t| {
                    t.iter()
                        .filter(|t| t.at_ms > restarted && t.answer.is_some())
                        .count()
                        >= 5
                });
            Ok(ok.then_some(()))
        },
    )
    .await
    .with_context(|| format!("controller killed at {before}"))?;

    // An outsider on the agent-to-agent port gets nowhere.
    let ip = c
        .address(&restart_node)?
        .ok_or_else(|| anyhow!("no address"))?;
    let ca = std::fs::read(c.controller().data_dir.path().join("ca.crt"))?;
    outsider_refused(ip, &ca, &restart_node, &task).await?;
    c.restart_controller().await?;

    // The last Ready replica fails readiness: a warning says nothing answers.
    eventually(WAIT, "the controller hearing the ready replica", || async {
        let e = c.get(&format!("/v1/endpoints/{web}")).await?;
        let ready = e["backends"]
            .as_array()
            .map(|b| b.iter().filter(|b| b["ready"] == true).count());
        Ok((ready == Some(1)).then_some(()))
    })
    .await?;
    // Its leader's first passes have seen it ready.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (last_node, last) = &webs[1];
    let (ok, out) = c.exec(last_node, last, &["/testimg", "rm", "/ready"])?;
    ensure!(ok, "rm /ready: {out}");
    eventually(WAIT, "a NoReadyEndpoint warning", || async {
        let events = c.events().await?;
        Ok(events
            .iter()
            .find(|e| e["reason"] == "NoReadyEndpoint" && e["object"] == format!("service/{web}"))
            .cloned())
    })
    .await?;
    Ok(())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Connections to a node's agent-to-agent port that must all fail before any byte of a
/// container is reached: plain TCP with a valid request line, TLS without a client
/// certificate, TLS with a certificate of another CA.
async fn outsider_refused(
    ip: std::net::Ipv4Addr,
    cluster_ca: &[u8],
    node: &str,
    task: &str,
) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let addr = (ip, bramble_api::endpoints::MESH_PORT);
    let request = format!("BRAMBLE/1 {task} 8080\n");

    // Plain TCP: the request line is not TLS; the connection ends with nothing served.
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    ensure!(
        !String::from_utf8_lossy(&got).contains("OK"),
        "plain TCP was served: {got:?}"
    );

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cluster_ca) {
        roots.add(c?)?;
    }
    let roots = std::sync::Arc::new(roots);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = || {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(std::sync::Arc::clone(&roots)))
    };
    // A certificate for the node's name, from a CA of the outsider's own.
    let other_ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = ca_params.self_signed(&other_ca_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(other_ca.der(), other_ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf =
        rcgen::CertificateParams::new(vec![node.to_string()])?.signed_by(&leaf_key, &issuer)?;
    let configs = [
        ("no client certificate", builder()?.with_no_client_auth()),
        (
            "a certificate of another CA",
            builder()?.with_client_auth_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())?,
            )?,
        ),
    ];
    for (what, config) in configs {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from(node.to_string())?;
        let outcome = async {
            let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await?;
            tls.write_all(request.as_bytes()).await?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await?;
            anyhow::Ok(got)
        };
        let result = tokio::time::timeout(Duration::from_secs(5), outcome).await;
        if let Ok(Ok(got)) = &result {
            ensure!(
                !String::from_utf8_lossy(got).contains("OK"),
                "{what} was served: {got:?}"
            );
        }
        let said = match &result {
            Ok(Ok(got)) => format!("closed after {} bytes", got.len()),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "no answer in 5 s".to_string(),
        };
        eprintln!("agent-to-agent port, {what}: {said}");
    }
    Ok(())
}

/// The repository's example manifests, with the test image in place of the pool's
/// images and everything that needs a real pool (volumes, probes, placement) left out,
/// keeping the names, ports and `WALLET_RPC` as written.
fn example(file: &str) -> Result<(Option<String>, bramble_api::manifest::Manifest)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(file);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let parsed =
        bramble_api::parse::parse_manifests(file, &text).map_err(|e| anyhow!("{file}: {e:?}"))?;
    // The Secret is applied as written (its document comes first).
    let secret = (!parsed.secrets.is_empty())
        .then(|| text.split("\n---\n").next().unwrap_or_default().to_string());
    let mut m = parsed
        .workloads
        .first()
        .ok_or_else(|| anyhow!("{file} has no workload"))?
        .manifest
        .clone();
    m.spec.image = "bramble-testimg:latest".into();
    m.spec.command = Some(vec!["/testimg".into()]);
    m.spec.volumes.clear();
    m.spec.sync = None;
    m.spec.placement = Default::default();
    m.spec.probes = Default::default();
    m.spec.resources = Default::default();
    Ok((secret, m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_stratum_pool_reaches_ltc_wallet_by_name() {
    let c = start(2).await.expect("the cluster starts");
    if let Err(e) = example_pool(&c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn example_pool(c: &NetCluster) -> Result<()> {
    let (secret, mut wallet) = example("ltc-wallet.yaml")?;
    let (_, mut stratum) = example("stratum.yaml")?;
    let rpc = match stratum.spec.env.get("WALLET_RPC") {
        Some(bramble_api::manifest::EnvValue::Text(t)) => t.clone(),
        other => bail!("stratum's WALLET_RPC: {other:?}"),
    };
    let target = rpc
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("WALLET_RPC {rpc:?} is not http://HOST:PORT"))?
        .to_string();
    ensure!(target == "ltc-wallet:9332", "{target}");
    wallet.spec.args = Some(vec!["serve".into(), "9332".into()]);
    stratum.spec.args = Some(
        ["poll", &target, "/env/HOSTNAME", "200"]
            .map(String::from)
            .to_vec(),
    );
    if let Some(s) = secret {
        c.apply(&s).await?;
    }
    c.apply(&serde_json::to_string(&wallet)?).await?;
    c.apply(&serde_json::to_string(&stratum)?).await?;
    let (_, wallet_id) = eventually(WAIT, "ltc-wallet running", || async {
        Ok(c.instances("ltc-wallet")?.into_iter().next())
    })
    .await?;
    eventually(
        WAIT,
        "both stratum replicas answered by ltc-wallet",
        || async {
            let logs = poll_logs(c, "stratum")?;
            let ok = logs.len() == 2
                && logs.values().all(|t| {
                    t.iter()
                        .any(|t| t.answer.as_deref() == Some(&wallet_id[..12]))
                });
            Ok(ok.then_some(()))
        },
    )
    .await?;
    Ok(())
}
