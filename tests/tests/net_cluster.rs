//! The multi-node harness itself ([`bramble_tests::netns::NetCluster`]): agents in their
//! own network namespaces register over real TCP, spread work, and the faults it
//! injects (power loss, partition) are seen by the controller. Uses only the node-health
//! flags, so it holds whatever the self-healing work has reached.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};
use bramble_tests::eventually;
use bramble_tests::netns::{self, NetCluster, HEALTH_FLAGS};

const WAIT: Duration = Duration::from_secs(30);

fn service(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  resources: {{cpu: 100m, memory: 16Mi}}
  replicas: {replicas}
"
    )
}

fn ip_output(args: &[&str]) -> String {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_namespaces_register_spread_replicas_and_are_seen_powered_off_and_partitioned() {
    let mut cluster = NetCluster::start(2, HEALTH_FLAGS)
        .await
        .expect("the cluster starts");
    // A panic while the cluster exists makes its Drop print the processes' logs.
    if let Err(e) = smoke(&mut cluster).await {
        panic!("{e:#}");
    }
}

async fn smoke(cluster: &mut NetCluster) -> Result<()> {
    let (a, b) = (cluster.node(0).to_string(), cluster.node(1).to_string());

    // Each agent really is in its namespace, talking over the bridge.
    for node in [&a, &b] {
        let addr = cluster.address(node)?.expect("a netns node has an address");
        let view = cluster.get(&format!("/v1/nodes/{node}")).await?;
        // The controller reports the peer address, with or without its port.
        let remote = view["address"].as_str().unwrap_or_default();
        let host = remote.split(':').next().unwrap_or_default();
        assert!(
            host == addr.to_string(),
            "{node} connects from {addr}, the controller saw {remote:?}"
        );
    }

    let web = bramble_tests::unique_name("web");
    cluster.apply(&service(&web, 2)).await?;
    let label = format!("bramble.workload={web}");
    let placed = eventually(WAIT, "one replica running on each node", || async {
        let running = netns::running_containers(&label)?;
        let nodes: BTreeSet<String> = running.iter().map(|c| c.node.clone()).collect();
        if running.len() == 2 && nodes.len() == 2 {
            Ok(Some(nodes))
        } else {
            bail!(
                "running on {:?}",
                running.iter().map(|c| &c.node).collect::<Vec<_>>()
            )
        }
    })
    .await?;
    assert_eq!(placed, BTreeSet::from([a.clone(), b.clone()]));

    // A partition: the agent lives on, the controller stops hearing it; healed, it is
    // back.
    cluster.partition(&b)?;
    cluster.wait_status(&b, "NotReady", WAIT).await?;
    assert!(cluster.agent(&b)?.is_running(), "partitioned agent exited");
    cluster.heal(&b)?;
    cluster.wait_ready(&b).await?;

    // Power loss: the agent and the node's containers are gone, and the node goes
    // NotReady, then Dead.
    cluster.power_off(&a)?;
    assert!(!cluster.agent(&a)?.is_running());
    assert!(netns::containers(&format!("bramble.node={a}"), true)?.is_empty());
    cluster.wait_status(&a, "Dead", WAIT).await?;
    cluster.power_on(&a)?;
    cluster.wait_ready(&a).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_cluster_removes_its_namespaces_links_and_containers() -> Result<()> {
    let cluster = NetCluster::start(1, HEALTH_FLAGS).await?;
    let node = cluster.node(0).to_string();
    let namespaces = cluster.namespaces();
    let bridge = cluster.bridge().to_string();
    let web = bramble_tests::unique_name("web");
    cluster.apply(&service(&web, 1)).await?;
    let label = format!("bramble.workload={web}");
    eventually(WAIT, "the replica running", || async {
        Ok((netns::running_containers(&label)?.len() == 1).then_some(()))
    })
    .await?;

    drop(cluster);
    let listed = ip_output(&["netns", "list"]);
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind");
    }
    assert!(
        !ip_output(&["-o", "link", "show"]).contains(&bridge),
        "{bridge} left behind"
    );
    assert!(netns::containers(&format!("bramble.node={node}"), true)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_controller_url_finds_it_over_mdns_and_runs_work() -> Result<()> {
    // The controller advertises `_bramble._tcp.local.` on the bridge only, and the agent
    // browses on its own link only: multicast never leaves the test network.
    let mut args = vec!["--mdns-interface", "{bridge}"];
    args.extend_from_slice(HEALTH_FLAGS);
    let mut cluster = NetCluster::start(0, &args).await?;
    let node = cluster.add_discovering_node()?;
    if let Err(e) = cluster.wait_status(&node, "Ready", WAIT).await {
        bail!(
            "{e:#}\n--- agent log:\n{}",
            cluster.agent(&node).map(|a| a.logs()).unwrap_or_default()
        );
    }
    let logs = cluster.agent(&node)?.logs();
    assert!(
        logs.contains("found the controller over mDNS"),
        "the agent did not log a discovery:\n{logs}"
    );
    let web = bramble_tests::unique_name("mdns-web");
    cluster.apply(&service(&web, 1)).await?;
    let label = format!("bramble.workload={web}");
    eventually(
        WAIT,
        "the replica running on the discovered node",
        || async {
            Ok(netns::running_containers(&label)?
                .iter()
                .any(|c| c.node == node)
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_their_own_engines_have_their_own_containers_ports_and_power() -> Result<()> {
    let mut cluster = NetCluster::start_with_engines(2, HEALTH_FLAGS).await?;
    let (a, b) = (cluster.node(0).to_string(), cluster.node(1).to_string());
    let web = bramble_tests::unique_name("web");
    let label = format!("bramble.workload={web}");
    // One host port for both replicas: two machines can, one engine cannot.
    cluster
        .apply(&format!(
            "apiVersion: bramble/v1
kind: Service
metadata: {{name: {web}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\", \"hello\"]
  resources: {{cpu: 100m, memory: 16Mi}}
  replicas: 2
  ports: [{{container: 8080, host: 8080}}]
"
        ))
        .await?;
    let running = eventually(WAIT, "a replica on each node", || async {
        let now = cluster.running(&label)?;
        let nodes: BTreeSet<&str> = now.iter().map(|c| c.node.as_str()).collect();
        Ok((now.len() == 2 && nodes.len() == 2).then_some(now))
    })
    .await?;

    // Each engine runs only its node's containers; the machine's engine none of them.
    for node in [&a, &b] {
        let engine = cluster.engine(node)?.expect("a node engine");
        let out = engine
            .docker()
            .args(["ps", "--format", "{{.Label \"bramble.node\"}}"])
            .output()?;
        let owners: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(
            owners,
            BTreeSet::from([node.to_string()]),
            "{node}'s engine"
        );
    }
    assert!(
        netns::running_containers(&label)?.is_empty(),
        "on the machine's engine"
    );

    // Both nodes serve the same port, reached over the bridge.
    let client = reqwest::Client::new();
    let addrs: std::collections::BTreeMap<String, std::net::Ipv4Addr> = [&a, &b]
        .into_iter()
        .filter_map(|n| Some((n.clone(), cluster.address(n).ok().flatten()?)))
        .collect();
    let get = |node: &str| {
        let addr = addrs.get(node).copied();
        let client = client.clone();
        async move {
            let addr = addr.ok_or_else(|| anyhow::anyhow!("no address"))?;
            let r = client
                .get(format!("http://{addr}:8080/"))
                .timeout(Duration::from_secs(3))
                .send()
                .await?;
            anyhow::Ok(r.text().await?)
        }
    };
    for node in [&a, &b] {
        let body = eventually(WAIT, &format!("{node}:8080 answers"), || async {
            Ok(get(node).await.ok())
        })
        .await?;
        assert!(body.contains("hello"), "{node}: {body}");
    }

    // a loses power: its engine and containers with it; b's replica runs on untouched.
    let b_replica = running.iter().find(|c| c.node == b).map(|c| c.id.clone());
    cluster.power_off(&a)?;
    assert!(get(&a).await.is_err(), "a powered-off node still serves");
    cluster.wait_status(&a, "Dead", WAIT).await?;
    let now = cluster.running(&label)?;
    assert_eq!(
        now.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        b_replica.into_iter().collect::<Vec<_>>(),
        "only b's replica runs, the same container"
    );
    assert!(get(&b).await?.contains("hello"));

    // Power back: the same engine and data; the replica runs on a again.
    cluster.power_on(&a)?;
    cluster.wait_ready(&a).await?;
    eventually(WAIT, "a replica on each node again", || async {
        let now = cluster.running(&label)?;
        let nodes: BTreeSet<&str> = now.iter().map(|c| c.node.as_str()).collect();
        Ok((now.len() == 2 && nodes.len() == 2).then_some(()))
    })
    .await?;
    Ok(())
}
