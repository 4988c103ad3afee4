//! Docker Swarm on the harness Bramble's cluster tests stand on, so the two can be
//! measured side by side with the same faults: one manager and N workers, each node a
//! network namespace on the test bridge with a Docker Engine of its own
//! ([`crate::engines`]), and no Bramble process anywhere.
//!
//! ```text
//!  namespace brt<id>n0   dockerd (swarm manager, --advertise-addr 10.231.X.10)
//!  namespace brt<id>n<i> dockerd (swarm worker, joined with the worker token)
//! ```
//!
//! Faults are the ones [`crate::netns::NetCluster`] has: [`Swarm::power_off`] kills the
//! node's engine and everything it runs (its Swarm state stays on its disk, so
//! [`Swarm::power_on`] rejoins), [`Swarm::partition`] takes the node's link down while
//! its engine keeps running its containers.
//!
//! Containers are told apart by node through the engine that runs them (Swarm's own
//! labels name node ids, not the harness's node names).
//!
//! Cleanup is by Drop, as for [`crate::netns::NetCluster`]: the manager's engine first,
//! so nothing is scheduled while the workers go, then the workers' engines (their
//! containers, mounts and cgroups), containerd, the namespaces, the bridge and its
//! FORWARD rule. Leaving the swarm is not needed: it lives only on the engines' disks,
//! which go too. A crashed run is swept like any cluster of [`crate::netns`], by its id.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::engines::Engine;
use crate::eventually;
use crate::harness::run;
use crate::netns::{
    ps_engine, sample_engines, Container, Engines, EventRecorder, Link, Network, Sampler,
};

/// How long a node gets to (re)join: a worker's first heartbeat after it comes back.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The port the manager listens on for the swarm's control plane.
const SWARM_PORT: u16 = 2377;

/// One node: its name (also its engine's containerd namespace and cgroup parent), its
/// Swarm node id, its link and its engine.
struct Member {
    name: String,
    id: String,
    link: Link,
    engine: Engine,
}

/// A Docker Swarm of one manager and some workers; see the module docs. Dropping it
/// removes every engine, container, namespace, link and claim it made.
pub struct Swarm {
    // Field order is drop order: engines (the manager's first) before their containerd
    // and files, and all before the network.
    members: Vec<Member>,
    _engines: Engines,
    net: Network,
    standalone_rss: Vec<Option<u64>>,
}

impl Swarm {
    /// Starts `workers + 1` engines with the test image, makes node 0 the manager
    /// (`docker swarm init`), joins the others as workers, and waits until every node is
    /// ready.
    pub async fn start(workers: usize) -> Result<Swarm> {
        let image = crate::ensure_test_image().await?;
        let mut net = Network::create()?;
        let mut links = Vec::with_capacity(workers + 1);
        for i in 0..=workers {
            links.push(net.add_namespace(i)?);
        }
        let engines = Engines::create(&mut net)?;
        let mut members = Vec::with_capacity(workers + 1);
        for (i, link) in links.into_iter().enumerate() {
            let name = net.node_name(i);
            let engine = engines.start(&link, &name, i, &image)?;
            members.push(Member {
                name,
                id: String::new(),
                link,
                engine,
            });
        }
        // Before any swarm exists: what a plain engine takes, for the memory figures.
        let standalone_rss = members
            .iter()
            .map(|m| m.engine.pid().and_then(crate::harness::rss_bytes))
            .collect();
        let mut swarm = Swarm {
            members,
            _engines: engines,
            net,
            standalone_rss,
        };
        swarm.form()?;
        for node in swarm.nodes() {
            swarm.wait_ready(&node).await?;
        }
        Ok(swarm)
    }

    /// `swarm init` on the manager, `swarm join` on every worker, and each node's id.
    fn form(&mut self) -> Result<()> {
        let manager_ip = self.members[0].link.ip;
        let listen = format!("{manager_ip}:{SWARM_PORT}");
        run(self.members[0].engine.docker().args([
            "swarm",
            "init",
            "--advertise-addr",
            &manager_ip.to_string(),
            "--listen-addr",
            &listen,
        ]))
        .context("docker swarm init on the manager")?;
        let token = run(self.docker().args(["swarm", "join-token", "-q", "worker"]))
            .context("the swarm's worker join token")?
            .trim()
            .to_string();
        for m in &self.members[1..] {
            run(m.engine.docker().args([
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &m.link.ip.to_string(),
                &listen,
            ]))
            .with_context(|| format!("docker swarm join on {}", m.name))?;
        }
        for m in &mut self.members {
            m.id = run(m
                .engine
                .docker()
                .args(["info", "--format", "{{.Swarm.NodeID}}"]))
            .with_context(|| format!("the swarm node id of {}", m.name))?
            .trim()
            .to_string();
            if m.id.is_empty() {
                bail!("{} has no swarm node id after joining", m.name);
            }
        }
        Ok(())
    }

    /// The node names, manager first.
    pub fn nodes(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The manager's node name.
    pub fn manager(&self) -> &str {
        &self.members[0].name
    }

    /// The workers' node names.
    pub fn workers(&self) -> Vec<String> {
        self.members[1..].iter().map(|m| m.name.clone()).collect()
    }

    /// `docker -H <the manager's engine>`: where services are created and nodes listed.
    pub fn docker(&self) -> Command {
        self.members[0].engine.docker()
    }

    /// A node's engine.
    pub fn engine(&self, node: &str) -> Result<&Engine> {
        Ok(&self.find(node)?.engine)
    }

    /// A node's address on the bridge.
    pub fn address(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.find(node)?.link.ip)
    }

    /// The resident memory of a node's dockerd before the swarm was formed (engine
    /// started, test image loaded).
    pub fn standalone_rss(&self, node: &str) -> Result<Option<u64>> {
        let i = self
            .members
            .iter()
            .position(|m| m.name == node)
            .ok_or_else(|| anyhow!("no node {node} in this swarm"))?;
        Ok(self.standalone_rss[i])
    }

    fn find(&self, node: &str) -> Result<&Member> {
        self.members
            .iter()
            .find(|m| m.name == node)
            .ok_or_else(|| anyhow!("no node {node} in this swarm"))
    }

    fn find_mut(&mut self, node: &str) -> Result<&mut Member> {
        self.members
            .iter_mut()
            .find(|m| m.name == node)
            .ok_or_else(|| anyhow!("no node {node} in this swarm"))
    }

    /// `docker swarm update ARGS…` on the manager (e.g. `--dispatcher-heartbeat 1s`).
    /// Workers learn a new heartbeat period at their next heartbeat.
    pub fn update(&self, args: &[&str]) -> Result<()> {
        run(self.docker().args(["swarm", "update"]).args(args))
            .map(drop)
            .context("docker swarm update")
    }

    /// A node's state as the manager reports it (`ready`, `down`, `unknown`).
    pub fn node_state(&self, node: &str) -> Result<String> {
        let id = &self.find(node)?.id;
        Ok(run(self
            .docker()
            .args(["node", "inspect", "--format", "{{.Status.State}}", id]))?
        .trim()
        .to_string())
    }

    /// Waits until the manager reports `node` ready.
    pub async fn wait_ready(&self, node: &str) -> Result<()> {
        eventually(
            READY_TIMEOUT,
            &format!("swarm node {node} ready"),
            || async {
                let state = self.node_state(node)?;
                if state == "ready" {
                    Ok(Some(()))
                } else {
                    bail!("{node} is {state}")
                }
            },
        )
        .await
    }

    /// Power loss: the node's engine and everything it runs are killed at once.
    pub fn power_off(&mut self, node: &str) -> Result<()> {
        self.find_mut(node)?.engine.power_off();
        Ok(())
    }

    /// Boots a powered-off node's engine again (same data: it rejoins the swarm). Does
    /// not wait for the manager to see it ready.
    pub fn power_on(&mut self, node: &str) -> Result<()> {
        self.find_mut(node)?.engine.boot()
    }

    /// Cuts the node off the network; its engine keeps running its containers.
    pub fn partition(&self, node: &str) -> Result<()> {
        self.find(node)?.link.cut()
    }

    /// Ends a [`Swarm::partition`].
    pub fn heal(&self, node: &str) -> Result<()> {
        self.find(node)?.link.mend()
    }

    /// The running containers carrying `label` on every running engine, each with the
    /// node whose engine runs it.
    pub fn running(&self, label: &str) -> Result<Vec<Container>> {
        self.on_engines(label, &["--filter", "status=running"])
    }

    /// The containers carrying `label` on every running engine, stopped ones too.
    pub fn containers(&self, label: &str) -> Result<Vec<Container>> {
        self.on_engines(label, &["-a"])
    }

    fn on_engines(&self, label: &str, extra: &[&str]) -> Result<Vec<Container>> {
        let mut found = Vec::new();
        for m in self.members.iter().filter(|m| m.engine.is_on()) {
            found.extend(ps_engine(&m.name, &m.engine, label, extra)?);
        }
        Ok(found)
    }

    fn hosts(&self) -> Vec<(String, String)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.engine.host()))
            .collect()
    }

    /// Records container events carrying `label` on every engine.
    pub fn record_events(&self, label: &str) -> Result<EventRecorder> {
        let hosts: Vec<String> = self.hosts().into_iter().map(|(_, h)| h).collect();
        EventRecorder::start_on(&hosts, label)
    }

    /// Samples the running containers carrying `label` on every engine, every `every`
    /// (see [`Sampler`]); a powered-off engine runs none.
    pub fn sample(&self, label: &str, every: Duration) -> Sampler {
        sample_engines(self.hosts(), label, every)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.net.bridge
    }
}
