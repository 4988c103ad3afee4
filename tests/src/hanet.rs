//! Highly available clusters on one machine with real networking: three etcd members,
//! three controllers and N agents, each in a network namespace of its own on one test
//! bridge, so any of them can lose power or be cut off from some of the others.
//!
//! ```text
//!  namespace n0..n2  etcd member e<i>    http://10.231.X.(10+i):2379, peers on :2380
//!  namespace n3..n5  controller c<i>     https://10.231.X.(13+i):PORT, --etcd e0,e1,e2
//!  namespace n6..    bramble-agent       --controller c0,c1,c2
//!  bridge brt<id>b 10.231.X.1/24, a FORWARD rule so namespaces reach each other
//! ```
//!
//! The test process, in the host namespace, reaches every member through the bridge's
//! address. Agents share the machine's Docker engine (a file), and every container
//! carries `bramble.node=<node>`, which tells nodes apart.
//!
//! Faults:
//! - [`HaCluster::kill_controller`] (SIGKILL), [`HaCluster::stop_controller`] (SIGTERM,
//!   as a service manager stops it), [`HaCluster::start_controller`] (same namespace,
//!   port and data directory);
//! - [`HaCluster::isolate_controller`]: the controller's namespace drops every packet to
//!   and from the etcd members and the other controllers (iptables DROP: requests hang
//!   rather than fail, as on a real partition) while agents and the test still reach it;
//!   [`HaCluster::rejoin_controller`] lifts it;
//! - [`HaCluster::power_off`] / [`HaCluster::power_on`] a node (agent SIGKILLed, its
//!   containers force-removed);
//! - [`HaCluster::kill_etcd`] / [`HaCluster::restart_etcd`] a member.
//!
//! Cleanup is by Drop, also when a test panics: agents and their containers, then the
//! controllers, the etcd members, and the network (namespaces, bridge, FORWARD rule,
//! registry claims). The network's registry also lets a later run remove what a crashed
//! one left behind (see [`crate::netns`]).
//!
//! Needs root, `ip` (iproute2), `iptables` and Debian's `etcd-server`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::eventually;
use crate::harness::{Agent, Controller, ControllerOpts};
use crate::netns::{Link, Network, PREFIX};

/// How many etcd members and controllers.
pub const MEMBERS: usize = 3;

/// How long members get to come up, a leader to be elected, nodes to be Ready.
const WAIT: Duration = Duration::from_secs(40);

const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// One etcd member in its namespace.
struct EtcdMember {
    name: String,
    link: Link,
    child: Option<Child>,
}

impl EtcdMember {
    fn client_url(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.link.ip)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{ETCD_PEER_PORT}", self.link.ip)
    }
}

/// One controller in its namespace.
struct Member {
    controller: Controller,
    link: Link,
    isolated: bool,
}

/// Three etcd members, three controllers and agents, each in its own namespace; see
/// the module docs.
pub struct HaCluster {
    // Field order is drop order: agents (with their containers), controllers, etcd,
    // the etcd data, and last the network they all use.
    nodes: Vec<Agent>,
    members: Vec<Member>,
    etcd: Vec<EtcdMember>,
    etcd_dir: tempfile::TempDir,
    net: Network,
}

fn etcd_binary() -> Result<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "etcd is not installed (looked in /usr/bin and /usr/local/bin); install \
             Debian's etcd-server (apt-get install etcd-server), as .ci/run does",
        )
}

/// Runs `iptables ARGS…` inside namespace `ns`.
fn iptables_in(ns: &str, args: &[&str]) -> Result<()> {
    crate::harness::run(
        Command::new("ip")
            .args(["netns", "exec", ns, "iptables"])
            .args(args),
    )
    .map(drop)
}

impl HaCluster {
    /// Starts three etcd members, then three controllers on them (the first one leads,
    /// the others share its identity files; each with `controller_args` on top of the
    /// etcd flags), then `agents` agents that know all three controllers, and waits
    /// until every node is Ready. Makes sure the test image exists.
    pub async fn start(agents: usize, controller_args: &[&str]) -> Result<HaCluster> {
        let etcd_bin = etcd_binary()?;
        let mut cluster = HaCluster::empty().await?;
        for i in 0..MEMBERS {
            let link = cluster.net.add_namespace(i)?;
            cluster.etcd.push(EtcdMember {
                name: format!("e{i}"),
                link,
                child: None,
            });
        }
        for i in 0..MEMBERS {
            cluster.spawn_etcd(i, &etcd_bin)?;
        }
        cluster.wait_etcd_healthy().await?;

        let endpoints = cluster
            .etcd
            .iter()
            .map(EtcdMember::client_url)
            .collect::<Vec<_>>()
            .join(",");
        let prefix = format!("/{}/", crate::harness::unique("hanet"));
        for i in 0..MEMBERS {
            let link = cluster.net.add_namespace(MEMBERS + i)?;
            let mut opts = ControllerOpts::etcd(&endpoints, &prefix);
            opts.args.push("--etcd-allow-plain-http".into());
            // `{iface}` stands for the controller's interface in its namespace (for
            // `--mdns-interface`).
            opts.args.extend(
                controller_args
                    .iter()
                    .map(|a| a.replace("{iface}", &link.peer)),
            );
            let peer = cluster.members.first().map(|m| &m.controller);
            let controller =
                Controller::start_in(opts, &link.ns, &link.ip.to_string(), peer).await?;
            cluster.members.push(Member {
                controller,
                link,
                isolated: false,
            });
            if i == 0 {
                // The first leads before the others start: they join its cluster.
                cluster.wait_leader(None).await?;
            }
        }
        cluster.add_agents(agents).await?;
        Ok(cluster)
    }

    /// Like [`HaCluster::start`], but every controller runs and supervises its own etcd
    /// member (`--etcd-cluster`), as three Pis would with one command each: three
    /// namespaces (controller and member together), then the agents. The first
    /// controller makes the identity files (the etcd CA among them) while it waits for
    /// a quorum; they are copied to the others before those start, as the README says.
    pub async fn start_with_members(agents: usize, controller_args: &[&str]) -> Result<HaCluster> {
        let etcd_bin = etcd_binary()?;
        let mut cluster = HaCluster::empty().await?;
        let mut links = Vec::new();
        for i in 0..MEMBERS {
            links.push(cluster.net.add_namespace(i)?);
        }
        let list = links
            .iter()
            .enumerate()
            .map(|(i, l)| format!("c{i}={}", l.ip))
            .collect::<Vec<_>>()
            .join(",");
        for (i, link) in links.into_iter().enumerate() {
            let mut args: Vec<String> = vec![
                "--etcd-cluster".into(),
                list.clone(),
                "--etcd-name".into(),
                format!("c{i}"),
                "--etcd-binary".into(),
                etcd_bin.display().to_string(),
            ];
            args.extend(controller_args.iter().map(|a| a.to_string()));
            let opts = ControllerOpts {
                local_node: None,
                args,
            };
            let peer = cluster.members.first().map(|m| &m.controller);
            let controller = Controller::launch_in(opts, &link.ns, &link.ip.to_string(), peer)?;
            cluster.members.push(Member {
                controller,
                link,
                isolated: false,
            });
            if i == 0 {
                // The etcd CA is made last of the identity files.
                let first = &cluster.members[0].controller;
                let ca = first.data_dir.path().join("etcd-ca.crt");
                eventually(WAIT, "the first controller's identity files", || async {
                    Ok(ca.exists().then_some(()))
                })
                .await
                .with_context(|| first.logs())?;
            }
        }
        for m in &mut cluster.members {
            m.controller.serving().await?;
        }
        cluster.wait_leader(None).await?;
        cluster.add_agents(agents).await?;
        Ok(cluster)
    }

    /// Adds a node whose agent is given no controller URL: it finds the controllers over
    /// mDNS on its link (start the controllers with `--mdns-interface {iface}`). Does
    /// not wait for it to be Ready.
    pub fn add_discovering_node(&mut self) -> Result<String> {
        let link = self.net.add_namespace(self.net.namespaces.len())?;
        let name = format!("{PREFIX}{}-{}", self.net.id, self.nodes.len());
        let agent =
            Agent::start_discovering_in(&link.ns, &link.peer, &self.members[0].controller, &name)?;
        self.nodes.push(agent);
        Ok(name)
    }

    /// The address of controller `i`'s machine (its namespace).
    pub fn controller_address(&self, i: usize) -> Ipv4Addr {
        self.members[i].link.ip
    }

    /// Power loss of controller `i`'s machine: every process in its namespace (the
    /// controller, and its etcd member if it runs one) gets SIGKILL.
    pub fn power_off_controller(&mut self, i: usize) -> Result<()> {
        self.members[i].controller.kill9();
        for pid in crate::netns::namespace_pids(&self.members[i].link.ns) {
            crate::harness::signal(pid, "KILL");
        }
        Ok(())
    }

    /// The test image, the network (forwarding allowed) and a directory for etcd's
    /// data; no member yet.
    async fn empty() -> Result<HaCluster> {
        crate::ensure_test_image().await?;
        let mut net = Network::create()?;
        net.allow_forwarding()?;
        // tmpfs when there is one: etcd fsyncs every write, and tests need no durability.
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|d| Path::new(d).is_dir())
            .unwrap_or("/tmp");
        let etcd_dir = tempfile::Builder::new()
            .prefix("bramble-hanet-")
            .tempdir_in(base)
            .context("a directory for etcd's data")?;
        Ok(HaCluster {
            nodes: Vec::new(),
            members: Vec::new(),
            etcd: Vec::new(),
            etcd_dir,
            net,
        })
    }

    /// Starts `n` agents, each in a namespace of its own, that know every controller,
    /// and waits until each is Ready.
    async fn add_agents(&mut self, n: usize) -> Result<()> {
        let urls = self.controller_urls();
        let token = self.members[0].controller.join_token()?;
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            let link = self.net.add_namespace(self.net.namespaces.len())?;
            let name = format!("{PREFIX}{}-{}", self.net.id, self.nodes.len());
            self.nodes
                .push(Agent::start_with_in(&link.ns, &urls, &token, &name)?);
            names.push(name);
        }
        for node in names {
            self.wait_ready(&node).await?;
        }
        Ok(())
    }

    fn spawn_etcd(&mut self, i: usize, bin: &Path) -> Result<()> {
        let initial = self
            .etcd
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.etcd[i];
        let dir = self.etcd_dir.path();
        // Appended to, so a member started again keeps its earlier lines.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", m.name)))
            .context("an etcd log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &m.link.ns])
            .arg(bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(dir.join(&m.name))
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("bramble-{}", self.net.id),
            ])
            // Faster elections than the defaults (100/1000 ms): tests wait less.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // As controllers run their own members (and as docs/ha.md asks of an etcd
            // one runs): a rejoining member must not unseat the etcd leader.
            .args(["--pre-vote=true"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.etcd[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running member reports itself healthy (it has a leader).
    async fn wait_etcd_healthy(&self) -> Result<()> {
        let client = crate::http();
        let result = eventually(WAIT, "etcd members healthy", || async {
            for m in self.etcd.iter().filter(|m| m.child.is_some()) {
                let ok = match client
                    .get(format!("{}/health", m.client_url()))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    Ok(r) => r.text().await.unwrap_or_default().contains("\"true\""),
                    Err(_) => false,
                };
                if !ok {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await;
        result.with_context(|| self.etcd_logs())
    }

    /// Every controller's URL, comma-separated (what agents and `bramblectl` are given).
    pub fn controller_urls(&self) -> String {
        self.members
            .iter()
            .map(|m| m.controller.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Controller `i`.
    pub fn controller(&self, i: usize) -> &Controller {
        &self.members[i].controller
    }

    /// The node names, in start order.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|a| a.node.clone()).collect()
    }

    /// The agent of a node.
    pub fn agent(&self, node: &str) -> Result<&Agent> {
        self.nodes
            .iter()
            .find(|a| a.node == node)
            .ok_or_else(|| anyhow!("no node {node} in this cluster"))
    }

    fn agent_mut(&mut self, node: &str) -> Result<&mut Agent> {
        self.nodes
            .iter_mut()
            .find(|a| a.node == node)
            .ok_or_else(|| anyhow!("no node {node} in this cluster"))
    }

    /// Which controller leads, as the controllers that are running and not isolated
    /// say: the index of one that answers that it leads itself.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.isolated || m.controller.pid().is_none() {
                continue;
            }
            let Ok(list) = m.controller.get("/v1/controllers").await else {
                continue;
            };
            let me_leads = list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|c| c["answering"] == true && c["leader"] == true)
            });
            if me_leads {
                return Some(i);
            }
        }
        None
    }

    /// Waits until a controller other than `not` leads; its index.
    pub async fn wait_leader(&self, not: Option<usize>) -> Result<usize> {
        let what = match not {
            Some(i) => format!("a controller other than c{i} leads"),
            None => "a controller leads".to_string(),
        };
        eventually(WAIT, &what, || async {
            Ok(self.leader().await.filter(|l| Some(*l) != not))
        })
        .await
        .with_context(|| self.logs())
    }

    /// A controller to talk to: the first one running and not isolated.
    pub fn api(&self) -> Result<&Controller> {
        self.members
            .iter()
            .find(|m| !m.isolated && m.controller.pid().is_some())
            .map(|m| &m.controller)
            .context("no controller is running and reachable")
    }

    /// Waits until controller `via` reports `node` Ready.
    pub async fn wait_ready_on(&self, via: usize, node: &str) -> Result<()> {
        let c = self.controller(via);
        eventually(WAIT, &format!("{node} Ready on c{via}"), || async {
            let v = c.get(&format!("/v1/nodes/{node}")).await.ok();
            Ok(v.filter(|v| v["status"] == "Ready").map(|_| ()))
        })
        .await
        .with_context(|| self.logs())
    }

    /// Waits until the leader reports `node` Ready.
    pub async fn wait_ready(&self, node: &str) -> Result<()> {
        let leader = self.wait_leader(None).await?;
        self.wait_ready_on(leader, node).await
    }

    /// SIGKILL to controller `i` (power loss of its Pi).
    pub fn kill_controller(&mut self, i: usize) {
        self.members[i].controller.kill9();
    }

    /// SIGTERM to controller `i`, as `systemctl stop` does; whether it exited within
    /// 10 s on its own.
    pub async fn stop_controller(&mut self, i: usize) -> bool {
        self.members[i]
            .controller
            .terminate(Duration::from_secs(10))
            .await
    }

    /// Starts controller `i` again (same namespace, port, data) and waits until its API
    /// answers.
    pub async fn start_controller(&mut self, i: usize) -> Result<()> {
        self.members[i].controller.start_again().await
    }

    /// Cuts controller `i` off the etcd members and the other controllers, both ways,
    /// by dropping their packets in its namespace. Agents and the test still reach it.
    pub fn isolate_controller(&mut self, i: usize) -> Result<()> {
        let peers: Vec<Ipv4Addr> = self
            .etcd
            .iter()
            .map(|m| m.link.ip)
            .chain(
                self.members
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, m)| m.link.ip),
            )
            .collect();
        let ns = self.members[i].link.ns.clone();
        self.members[i].isolated = true;
        for ip in peers {
            let ip = ip.to_string();
            iptables_in(&ns, &["-I", "INPUT", "-s", &ip, "-j", "DROP"])?;
            iptables_in(&ns, &["-I", "OUTPUT", "-d", &ip, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Ends [`HaCluster::isolate_controller`].
    pub fn rejoin_controller(&mut self, i: usize) -> Result<()> {
        let ns = self.members[i].link.ns.clone();
        iptables_in(&ns, &["-F", "INPUT"])?;
        iptables_in(&ns, &["-F", "OUTPUT"])?;
        self.members[i].isolated = false;
        Ok(())
    }

    /// Power loss of a node: SIGKILL its agent and force-remove its containers.
    pub fn power_off(&mut self, node: &str) -> Result<()> {
        self.agent_mut(node)?.kill9();
        crate::harness::remove_node_containers(node);
        Ok(())
    }

    /// Boots a powered-off node again (same name and data). Does not wait.
    pub fn power_on(&mut self, node: &str) -> Result<()> {
        self.agent_mut(node)?.restart()
    }

    /// SIGKILL to etcd member `i`.
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd member `i` again on its data, and waits until every running member
    /// is healthy.
    pub async fn restart_etcd(&mut self, i: usize) -> Result<()> {
        if self.etcd[i].child.is_none() {
            self.spawn_etcd(i, &etcd_binary()?)?;
        }
        self.wait_etcd_healthy().await
    }

    /// The last lines of every etcd member's log.
    pub fn etcd_logs(&self) -> String {
        let mut out = String::new();
        for m in &self.etcd {
            let path = self.etcd_dir.path().join(format!("{}.log", m.name));
            out.push_str(&format!("--- etcd {}:\n", m.name));
            out.push_str(&crate::harness::tail(
                &fs::read_to_string(path).unwrap_or_default(),
                15,
            ));
            out.push('\n');
        }
        out
    }

    /// The last lines of every controller's and agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            out.push_str(&format!("--- controller c{i}:\n"));
            out.push_str(&crate::harness::tail(&m.controller.logs(), 40));
            out.push('\n');
        }
        for a in &self.nodes {
            out.push_str(&format!("--- agent {}:\n", a.node));
            out.push_str(&crate::harness::tail(&a.logs(), 40));
            out.push('\n');
        }
        out
    }

    /// GET from a reachable controller.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.api()?.get(path).await
    }

    /// Applies a manifest through controller `via`.
    pub async fn apply_via(&self, via: usize, manifest: &str) -> Result<Value> {
        self.controller(via).apply("test.yaml", manifest).await
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.etcd_logs());
        }
        // Agents and controllers go by their own Drop (fields, in order); etcd here,
        // before its data directory.
        self.nodes.clear();
        self.members.clear();
        for i in 0..self.etcd.len() {
            self.kill_etcd(i);
        }
    }
}
