//! Multi-node clusters on one machine with real networking, so faults are real: a
//! controller and N agents, each agent in its own network namespace, sharing the
//! machine's Docker engine ([`NetCluster::start`]) or each with a Docker Engine of its
//! own in its namespace ([`NetCluster::start_with_engines`], [`crate::engines`]): its
//! own containers, port space and disk, as on real Pis. Tests look at containers through
//! the cluster ([`NetCluster::running`], [`NetCluster::record_events`],
//! [`NetCluster::sample`]), which asks whichever engines the nodes use.
//!
//! ```text
//!  host namespace                                   namespace brt<id>n<i>
//!  controller --listen 10.231.X.1:PORT               bramble-agent --node-name brt<id>-<i>
//!  bridge brt<id>b 10.231.X.1/24 ── veth brt<id>h<i> ══ brt<id>p<i> 10.231.X.(10+i)/24
//!  /var/run/docker.sock  <──────────────── a file, so every namespace reaches Docker
//! ```
//!
//! Every container an agent runs carries `bramble.node=<node>`, which is how
//! [`NetCluster::power_off`] finds what to remove and how tests tell nodes apart.
//!
//! Faults:
//! - [`NetCluster::power_off`]: SIGKILL the agent and force-remove its containers, as a
//!   Pi losing power would lose both (with engines: the engine, its shims and its
//!   container processes are killed, and the containers stay on its disk as on a Pi);
//!   [`NetCluster::power_on`] boots it again (same name, data directory and engine).
//! - [`NetCluster::partition`]: the host end of the node's veth goes down; the agent
//!   keeps running and still reaches Docker, it just cannot reach the controller.
//! - [`NetCluster::kill_controller`] / [`NetCluster::restart_controller`]: SIGKILL, and
//!   the same data directory and port again.
//!
//! Names: everything created here starts with [`PREFIX`] followed by a six-hex-digit
//! cluster id (interface names must fit in 15 characters). Each cluster claims its id and
//! its `/24` in a registry directory (`/run/bramble-netcluster`) with exclusive file
//! creation, so clusters of parallel tests, in this or another process, never collide.
//! The registry also records the owning process, so the first cluster of a process
//! removes what crashed earlier runs left behind (namespaces, links, processes,
//! containers) and nothing that belongs to a live run.
//!
//! Cleanup is by Drop, also when a test panics: agents (and their containers), then the
//! controller, then namespaces (which takes their veths along), the bridge and the
//! registry entries.
//!
//! Needs root and `ip` (iproute2).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::engines::{Containerd, Engine};
use crate::eventually;
use crate::harness::{processes, run, signal, Agent, Controller, ControllerOpts};

/// The first characters of every bridge, namespace, veth and node name made here.
pub const PREFIX: &str = "brt";

/// Controller timing for self-healing tests, spelled out so the tests do not move when
/// a default does (they are the defaults): heartbeats every 250 ms, NotReady after 1 s
/// and Dead after 2 s of silence; agents fence (stop their wallets) after 1.5 s without
/// hearing from any controller that vouches for them, and the controller respawns a
/// silent node's wallet only once it has suspected the node (after 1 s of silence) for
/// fence timeout + margin (3 s).
pub const HEALING_FLAGS: &[&str] = &[
    "--heartbeat",
    "250ms",
    "--node-not-ready-after",
    "1s",
    "--node-dead-after",
    "2s",
    "--fence-timeout",
    "1500ms",
    "--fence-margin",
    "1500ms",
];

/// The node-health part of [`HEALING_FLAGS`] only, for tests of the harness itself,
/// which must not depend on the fencing flags.
pub const HEALTH_FLAGS: &[&str] = &[
    "--heartbeat",
    "250ms",
    "--node-not-ready-after",
    "1s",
    "--node-dead-after",
    "2s",
];

/// The first two octets of every cluster's subnet; the third is picked per cluster.
const NET: [u8; 2] = [10, 231];

/// Where clusters claim ids and subnets. Under /run: it is emptied at boot, when
/// namespaces and links are gone too.
const REGISTRY: &str = "/run/bramble-netcluster";

/// How long nodes get to register (and to come back after a fault).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `ip ARGS…`.
fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// The processes running in network namespace `ns`.
pub(crate) fn namespace_pids(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A fresh pseudo-random number (no `rand` in this crate: the hash of pid, time and a
/// counter is random enough to pick names and subnets, and collisions are retried).
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    bramble_api::task::fnv1a64(seed.as_bytes())
}

/// The kernel's start time of a process (field 22 of `/proc/PID/stat`), which tells a
/// process from a later one that got the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the fields after
    // the last ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The cluster id in a name made here (`brt1a2b3cb` → `1a2b3c`), if it is one.
fn id_of(name: &str) -> Option<&str> {
    let id = name.strip_prefix(PREFIX)?.get(..6)?;
    id.chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        .then_some(id)
}

/// Whether the cluster `id` belongs to a live process: its owner file names a process
/// (pid and start time) that still runs. A file too fresh to hold its owner yet counts
/// as live, so a cluster being set up is never mistaken for a leftover.
fn is_live(id: &str) -> bool {
    let path = Path::new(REGISTRY).join(format!("{id}.owner"));
    let Ok(text) = fs::read_to_string(&path) else {
        return false;
    };
    let mut parts = text.split_whitespace();
    let owner = parts.next().and_then(|p| p.parse::<u32>().ok());
    let started = parts.next().and_then(|s| s.parse::<u64>().ok());
    match (owner, started) {
        (Some(pid), Some(started)) => start_time(pid) == Some(started),
        _ => fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(60)),
    }
}

/// Names of network namespaces made here.
fn our_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| id_of(n).is_some())
        .map(str::to_string)
        .collect()
}

/// Names of links (bridges, host veth ends) made here, in the host namespace.
fn our_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| id_of(n).is_some())
        .map(str::to_string)
        .collect()
}

/// `(container id, node)` of every container of a node made here.
fn our_containers() -> Vec<(String, String)> {
    let out = run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        "label=bramble.node",
        "--format",
        "{{.ID}}\t{{.Label \"bramble.node\"}}",
    ]))
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, node)| id_of(node).is_some())
        .map(|(id, node)| (id.to_string(), node.to_string()))
        .collect()
}

/// Removes what crashed earlier runs left behind: everything with a cluster id whose
/// owner is gone. Once per process is enough, since a live process cleans up after
/// itself through Drop.
fn remove_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let namespaces = our_namespaces();
        let links = our_links();
        let containers = our_containers();
        let mut subnets: BTreeMap<String, String> = BTreeMap::new();
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for entry in fs::read_dir(REGISTRY).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".owner") {
                ids.insert(id.to_string());
            } else if name.starts_with("subnet-") {
                let owner = fs::read_to_string(entry.path()).unwrap_or_default();
                subnets.insert(name, owner.trim().to_string());
            }
        }
        ids.extend(
            namespaces
                .iter()
                .chain(&links)
                .chain(containers.iter().map(|(_, n)| n))
                .filter_map(|n| id_of(n).map(str::to_string)),
        );
        let stale: BTreeSet<String> = ids.into_iter().filter(|id| !is_live(id)).collect();
        if stale.is_empty() {
            return;
        }
        eprintln!("netns: removing leftovers of crashed runs: {stale:?}");
        let stale_of = |name: &str| id_of(name).is_some_and(|id| stale.contains(id));
        // Processes first, so nothing recreates containers while they are removed.
        let mut pids: BTreeSet<u32> = BTreeSet::new();
        for ns in namespaces.iter().filter(|n| stale_of(n)) {
            pids.extend(namespace_pids(ns));
        }
        let stale_addrs: Vec<String> = subnets
            .iter()
            .filter(|(_, owner)| stale.contains(owner.as_str()))
            .filter_map(|(file, _)| file.strip_prefix("subnet-"))
            .map(|x| format!("{}.{}.{x}.1:", NET[0], NET[1]))
            .collect();
        pids.extend(stale_processes(&stale, &stale_addrs));
        pids.extend(crate::engines::stale_processes(&|arg: &str| {
            id_of(arg).is_some_and(|id| stale.contains(id))
        }));
        for pid in pids {
            signal(pid, "KILL");
        }
        let ids: Vec<&String> = containers
            .iter()
            .filter(|(_, node)| stale_of(node))
            .map(|(id, _)| id)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(ids).output();
        }
        for ns in namespaces.iter().filter(|n| stale_of(n)) {
            let _ = ip(&["netns", "del", ns]);
        }
        for link in links.iter().filter(|n| stale_of(n)) {
            let _ = ip(&["link", "del", link]);
        }
        for bridge in links.iter().filter(|n| stale_of(n) && n.ends_with('b')) {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(forward_rule(bridge));
            // Absent unless that cluster allowed forwarding; nothing to report then.
            let _ = run(Command::new("iptables").args(&args));
        }
        for (file, owner) in &subnets {
            if stale.contains(owner.as_str()) {
                let _ = fs::remove_file(Path::new(REGISTRY).join(file));
            }
        }
        for id in &stale {
            let _ = fs::remove_file(Path::new(REGISTRY).join(format!("{id}.owner")));
        }
    });
}

/// Bramble processes of stale clusters: agents whose command line names a stale
/// cluster's node, controllers listening on a stale cluster's bridge address. The
/// command line is checked (not only a recorded pid), so a reused pid is never killed.
fn stale_processes(stale: &BTreeSet<String>, addrs: &[String]) -> Vec<u32> {
    let mut pids = processes("bramble-agent", |a| {
        id_of(a).is_some_and(|id| stale.contains(id))
    });
    pids.extend(processes("bramble-controller", |a| {
        addrs.iter().any(|addr| a.starts_with(addr.as_str()))
    }));
    pids
}

/// A node's namespace and link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) ns: String,
    pub(crate) host_veth: String,
    /// The veth end inside the namespace.
    pub(crate) peer: String,
    pub(crate) ip: Ipv4Addr,
}

impl Link {
    /// Cuts the namespace off the bridge: the host end of its veth goes down. What runs
    /// inside keeps running and keeps reaching whatever it reaches through files (a
    /// Docker socket); only the network is lost, both ways.
    pub(crate) fn cut(&self) -> Result<()> {
        ip(&["link", "set", &self.host_veth, "down"]).map(drop)
    }

    /// Ends a [`Link::cut`].
    pub(crate) fn mend(&self) -> Result<()> {
        ip(&["link", "set", &self.host_veth, "up"]).map(drop)
    }
}

/// The bridge, the namespaces and the registry entries of one cluster; removed on drop.
pub(crate) struct Network {
    pub(crate) id: String,
    subnet: u8,
    pub(crate) bridge: String,
    pub(crate) namespaces: Vec<String>,
    files: Vec<PathBuf>,
    /// The FORWARD rule letting namespaces reach each other, once added.
    forwarding: bool,
}

/// The FORWARD rule that lets traffic cross the bridge from one namespace to another.
/// Needed on machines whose FORWARD policy is DROP while bridged packets go through
/// iptables (`bridge-nf-call-iptables`, which Docker turns on): without it, two
/// namespaces on the bridge cannot reach each other (only the host).
fn forward_rule(bridge: &str) -> [&str; 6] {
    ["-i", bridge, "-o", bridge, "-j", "ACCEPT"]
}

impl Network {
    /// Claims an id and a free `/24`, and creates the bridge with its `.1` address.
    pub(crate) fn create() -> Result<Network> {
        fs::create_dir_all(REGISTRY).with_context(|| format!("creating {REGISTRY}"))?;
        remove_leftovers();
        let (id, owner) = Self::claim_id()?;
        let mut net = Network {
            bridge: format!("{PREFIX}{id}b"),
            id,
            subnet: 0,
            namespaces: Vec::new(),
            files: vec![owner],
            forwarding: false,
        };
        net.subnet = net.claim_subnet()?;
        let gateway = format!("{}/24", net.gateway());
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &gateway, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// A fresh id, its owner file written before anything else carries the id, so no
    /// other process ever takes our links for leftovers.
    fn claim_id() -> Result<(String, PathBuf)> {
        let me = std::process::id();
        let started = start_time(me).context("reading this process's start time")?;
        for _ in 0..100 {
            let id = format!("{:06x}", random() & 0xff_ffff);
            let path = Path::new(REGISTRY).join(format!("{id}.owner"));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{me} {started}").context("writing the owner file")?;
                    return Ok((id, path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("no free cluster id after 100 tries")
    }

    /// A third octet X whose 10.231.X.0/24 no other cluster has claimed and no address
    /// or route of this machine overlaps. The claim (an exclusively created file) comes
    /// first: two processes checking `ip` at once would otherwise both pick the same X.
    fn claim_subnet(&mut self) -> Result<u8> {
        for _ in 0..64 {
            let x = (random() % 254 + 1) as u8;
            let path = Path::new(REGISTRY).join(format!("subnet-{x}"));
            let mut f = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            };
            writeln!(f, "{}", self.id).context("writing the subnet claim")?;
            if subnet_in_use(x)? {
                let _ = fs::remove_file(&path);
                continue;
            }
            self.files.push(path);
            return Ok(x);
        }
        bail!("no free subnet {}.{}.X.0/24 after 64 tries", NET[0], NET[1])
    }

    /// The name of the `i`-th node (`brt<id>-<i>`): its agent's, its engine's, and what
    /// the leftover sweep recognizes in its containerd shims.
    pub(crate) fn node_name(&self, i: usize) -> String {
        format!("{PREFIX}{}-{i}", self.id)
    }

    pub(crate) fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], self.subnet, 1)
    }

    /// Lets the namespaces on the bridge reach each other (see [`forward_rule`]); the
    /// rule goes with the network.
    pub(crate) fn allow_forwarding(&mut self) -> Result<()> {
        let mut args = vec!["-I", "FORWARD"];
        args.extend(forward_rule(&self.bridge));
        run(Command::new("iptables").args(&args)).context(
            "adding a FORWARD rule for the test bridge (needs iptables, \
             Debian's iptables package)",
        )?;
        self.forwarding = true;
        Ok(())
    }

    /// Creates namespace `i` with its veth pair: the host end joins the bridge, the
    /// other end gets `.(10+i)`.
    pub(crate) fn add_namespace(&mut self, i: usize) -> Result<Link> {
        let host_octet = u8::try_from(10 + i)
            .ok()
            .filter(|o| *o < 255)
            .context("too many nodes for one /24")?;
        let ns = format!("{PREFIX}{}n{i}", self.id);
        let host_veth = format!("{PREFIX}{}h{i}", self.id);
        let peer = format!("{PREFIX}{}p{i}", self.id);
        let addr = Ipv4Addr::new(NET[0], NET[1], self.subnet, host_octet);
        ip(&["netns", "add", &ns])?;
        // Recorded at once: Drop deletes the namespace, and the veth pair with it.
        self.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ])?;
        ip(&["link", "set", &host_veth, "master", &self.bridge, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Link {
            ns,
            host_veth,
            peer,
            ip: addr,
        })
    }
}

/// Whether 10.231.X.0/24 overlaps an address or a route of the host.
fn subnet_in_use(x: u8) -> Result<bool> {
    let prefix = format!("{}.{}.{x}.", NET[0], NET[1]);
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    if addrs.contains(&format!("inet {prefix}")) {
        return Ok(true);
    }
    // `match` lists every route covering the subnet; the default route always does.
    let routes = ip(&["-4", "route", "show", "match", &format!("{prefix}0/24")])?;
    Ok(routes
        .lines()
        .any(|l| !l.trim().is_empty() && !l.starts_with("default")))
}

impl Drop for Network {
    fn drop(&mut self) {
        if self.forwarding {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(forward_rule(&self.bridge));
            if let Err(e) = run(Command::new("iptables").args(&args)) {
                eprintln!("netns cleanup: {e:#}");
            }
        }
        for ns in &self.namespaces {
            // Anything still running in it (an agent a test started by hand) goes first.
            for pid in namespace_pids(ns) {
                signal(pid, "KILL");
            }
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e:#}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            // Absent when setup failed before creating it; nothing to report then.
            if !format!("{e:#}").contains("Cannot find device") {
                eprintln!("netns cleanup: {e:#}");
            }
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// What the node engines of one cluster share: a containerd and a directory named with
/// the cluster id (so the leftover sweep recognizes a crashed run's containerd). Field
/// order is drop order: containerd before the directory it keeps its files in. Its
/// engines must be dropped before it.
pub(crate) struct Engines {
    containerd: Containerd,
    dir: tempfile::TempDir,
}

impl Engines {
    /// Lets the cluster's namespaces reach each other (engines talk to each other, and
    /// agents to each other's mesh endpoints) and starts the shared containerd.
    pub(crate) fn create(net: &mut Network) -> Result<Engines> {
        net.allow_forwarding()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-engines-", net.id))
            .tempdir()
            .context("a directory for the node engines")?;
        let containerd = Containerd::start(&dir.path().join("containerd"))?;
        Ok(Engines { containerd, dir })
    }

    /// Starts the engine of the `i`-th node, named `node`, in its namespace, and loads
    /// `image` into it. Each node's containers get a bridge of their own
    /// (`172.30.(10+i).1/24`), distinct from every other node's and from the test subnet.
    pub(crate) fn start(&self, link: &Link, node: &str, i: usize, image: &str) -> Result<Engine> {
        let engine = Engine::start(
            &self.containerd,
            &link.ns,
            node,
            &self.dir.path().join(node),
            &format!("172.30.{}.1/24", 10 + i),
        )?;
        engine.load(image)?;
        Ok(engine)
    }
}

/// `docker ps` of the containers carrying `label` with `extra` on one node's engine. A
/// container that does not name its node (one Bramble did not start) is the engine's
/// node's.
pub(crate) fn ps_engine(
    node: &str,
    engine: &Engine,
    label: &str,
    extra: &[&str],
) -> Result<Vec<Container>> {
    ps_host(node, &engine.host(), label, extra)
}

fn ps_host(node: &str, host: &str, label: &str, extra: &[&str]) -> Result<Vec<Container>> {
    let mut docker = Command::new("docker");
    docker.args(["-H", host]);
    let mut found = ps_on(docker, label, extra)?;
    for c in &mut found {
        if c.node.is_empty() {
            c.node = node.to_string();
        }
    }
    Ok(found)
}

/// Samples the running containers carrying `label` on the engines `hosts` (node name,
/// `DOCKER_HOST`) every `every`; a powered-off engine does not answer: it runs nothing.
pub(crate) fn sample_engines(
    hosts: Vec<(String, String)>,
    label: &str,
    every: Duration,
) -> Sampler {
    let label = label.to_string();
    Sampler::start_with(every, move || {
        let mut all = Vec::new();
        for (node, host) in &hosts {
            if let Ok(some) = ps_host(node, host, &label, &["--filter", "status=running"]) {
                all.extend(some);
            }
        }
        Ok(all)
    })
}

/// One node: its agent, its namespace unless it runs in the host's, and its own
/// Docker Engine when the cluster gives nodes one. Field order is drop order: the
/// agent before its engine.
struct Node {
    agent: Agent,
    link: Option<Link>,
    engine: Option<Engine>,
}

/// A controller and agents on one machine; see the module docs. Dropping it removes
/// every process, container, namespace, link and claim it made.
pub struct NetCluster {
    // Field order is drop order: agents (with their containers and engines) before the
    // controller, the engines' containerd and files, and all before the network.
    nodes: Vec<Node>,
    controller: Controller,
    engines: Option<Engines>,
    net: Network,
}

impl NetCluster {
    /// Starts a controller (no local agent, listening on the bridge address, with
    /// `controller_args` such as [`HEALING_FLAGS`]) and `agents` agents, each in its own
    /// namespace, and waits until every node is Ready. Makes sure the test image exists.
    pub async fn start(agents: usize, controller_args: &[&str]) -> Result<NetCluster> {
        NetCluster::start_with(agents, controller_args, false).await
    }

    /// Like [`NetCluster::start`], but every node gets a Docker Engine of its own in its
    /// namespace ([`crate::engines`]): its own containers, port space and disk, as on
    /// real Pis. Nodes reach each other (a FORWARD rule for the bridge), and the test
    /// image is loaded into every engine.
    pub async fn start_with_engines(agents: usize, controller_args: &[&str]) -> Result<NetCluster> {
        NetCluster::start_with(agents, controller_args, true).await
    }

    async fn start_with(
        agents: usize,
        controller_args: &[&str],
        engines: bool,
    ) -> Result<NetCluster> {
        let image = crate::ensure_test_image().await?;
        let mut net = Network::create()?;
        let mut links = Vec::with_capacity(agents);
        for i in 0..agents {
            links.push(net.add_namespace(i)?);
        }
        let controller = Controller::start_on(
            ControllerOpts {
                local_node: None,
                // `{bridge}` stands for the bridge's name, which is made here.
                args: controller_args
                    .iter()
                    .map(|a| a.replace("{bridge}", &net.bridge))
                    .collect(),
            },
            &net.gateway().to_string(),
        )
        .await?;
        let engines = if engines {
            Some(Engines::create(&mut net)?)
        } else {
            None
        };
        let mut nodes = Vec::with_capacity(agents);
        for (i, link) in links.into_iter().enumerate() {
            let name = net.node_name(i);
            let (agent, engine) = match &engines {
                Some(engines) => {
                    let engine = engines.start(&link, &name, i, &image)?;
                    let agent =
                        Agent::start_on_engine_in(&link.ns, &controller, &name, &engine.host())?;
                    (agent, Some(engine))
                }
                None => (Agent::start_in(&link.ns, &controller, &name)?, None),
            };
            nodes.push(Node {
                agent,
                link: Some(link),
                engine,
            });
        }
        let cluster = NetCluster {
            nodes,
            controller,
            engines,
            net,
        };
        for node in cluster.nodes() {
            cluster.wait_ready(&node).await?;
        }
        Ok(cluster)
    }

    /// Adds a node in a namespace of its own whose agent is given no controller URL: it
    /// must find the controller over mDNS on its link. The controller must advertise
    /// on the bridge (`--mdns-interface {bridge}` in the start arguments). Does not wait.
    pub fn add_discovering_node(&mut self) -> Result<String> {
        let i = self.nodes.len();
        let link = self.net.add_namespace(i)?;
        let name = self.net.node_name(i);
        let peer = format!("{PREFIX}{}p{i}", self.net.id);
        let agent = Agent::start_discovering_in(&link.ns, &peer, &self.controller, &name)?;
        self.nodes.push(Node {
            agent,
            link: Some(link),
            engine: None,
        });
        Ok(name)
    }

    /// Adds a node whose agent runs in the host namespace, and waits until it is Ready.
    /// For what only works there: HTTP and TCP probes connect to the container's address
    /// on Docker's bridge, which other namespaces cannot reach. It can be powered off and
    /// on, but not partitioned.
    pub async fn add_host_node(&mut self) -> Result<String> {
        let name = format!("{PREFIX}{}-h{}", self.net.id, self.nodes.len());
        let agent = Agent::start(&self.controller, &name)?;
        self.nodes.push(Node {
            agent,
            link: None,
            engine: None,
        });
        self.wait_ready(&name).await?;
        Ok(name)
    }

    /// The node names, in start order.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.agent.node.clone()).collect()
    }

    /// The `i`-th node's name.
    pub fn node(&self, i: usize) -> &str {
        &self.nodes[i].agent.node
    }

    /// The controller (its URL, logs, `bramblectl`).
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// The controller's base URL, on the bridge address.
    pub fn url(&self) -> String {
        self.controller.url()
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.net.bridge
    }

    /// The names of the network namespaces (one per netns node).
    pub fn namespaces(&self) -> Vec<String> {
        self.net.namespaces.clone()
    }

    /// A node's address on the bridge (`None` for a host node).
    pub fn address(&self, node: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self.find(node)?.link.as_ref().map(|l| l.ip))
    }

    fn find(&self, node: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.agent.node == node)
            .ok_or_else(|| anyhow!("no node {node} in this cluster"))
    }

    fn find_mut(&mut self, node: &str) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.agent.node == node)
            .ok_or_else(|| anyhow!("no node {node} in this cluster"))
    }

    /// A node's agent data directory (its own disk: managed volumes, copies, data set
    /// aside).
    pub fn data_dir(&self, node: &str) -> Result<std::path::PathBuf> {
        Ok(self.find(node)?.agent.data_dir().to_path_buf())
    }

    /// The agent process of a node (pid, logs, whether it still runs).
    pub fn agent(&mut self, node: &str) -> Result<&mut Agent> {
        Ok(&mut self.find_mut(node)?.agent)
    }

    /// Power loss: SIGKILL the agent and force-remove every container of the node; with
    /// an engine of its own, the engine and everything it runs are killed instead.
    pub fn power_off(&mut self, node: &str) -> Result<()> {
        let n = self.find_mut(node)?;
        n.agent.kill9();
        match &mut n.engine {
            Some(engine) => engine.power_off(),
            None => crate::harness::remove_node_containers(node),
        }
        Ok(())
    }

    /// Boots a powered-off node: its engine (if it has one) and its agent start again
    /// with the same name and data (in its namespace). Does not wait for it to be Ready.
    pub fn power_on(&mut self, node: &str) -> Result<()> {
        let n = self.find_mut(node)?;
        if let Some(engine) = &mut n.engine {
            engine.boot()?;
        }
        n.agent.restart()
    }

    /// The node name and `DOCKER_HOST` of every node engine (none when nodes share the
    /// machine's).
    fn engine_hosts(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.agent.node.clone(), n.engine.as_ref()?.host())))
            .collect()
    }

    /// Records container events carrying `label` on every node's engine.
    pub fn record_events(&self, label: &str) -> Result<EventRecorder> {
        let hosts: Vec<String> = self.engine_hosts().into_iter().map(|(_, h)| h).collect();
        EventRecorder::start_on(&hosts, label)
    }

    /// Samples the running containers carrying `label` on every node, every `every`
    /// (see [`Sampler`]); a powered-off node runs none.
    pub fn sample(&self, label: &str, every: Duration) -> Sampler {
        let hosts = self.engine_hosts();
        if hosts.is_empty() {
            return Sampler::start(label, every);
        }
        sample_engines(hosts, label, every)
    }

    /// The containers carrying `label` on every running node (stopped ones too when
    /// `all`): each node engine's view, or the machine's when nodes share it.
    pub fn containers(&self, label: &str, all: bool) -> Result<Vec<Container>> {
        if self.engines.is_none() {
            return containers(label, all);
        }
        self.on_engines(label, if all { &["-a"] } else { &[] })
    }

    /// A node's own Docker Engine, when the cluster gives nodes one.
    pub fn engine(&self, node: &str) -> Result<Option<&Engine>> {
        Ok(self.find(node)?.engine.as_ref())
    }

    /// The running containers carrying `label` on every node: each node engine's view
    /// (a powered-off node runs none), or the machine's engine when nodes share it.
    pub fn running(&self, label: &str) -> Result<Vec<Container>> {
        if self.engines.is_none() {
            return running_containers(label);
        }
        self.on_engines(label, &["--filter", "status=running"])
    }

    /// The running containers of `workload`, as (node, container id).
    pub fn instances(&self, workload: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .running(&format!("bramble.workload={workload}"))?
            .into_iter()
            .map(|k| (k.node, k.id))
            .collect())
    }

    /// When container `id` on `node` last started, in Unix milliseconds, by its engine.
    pub fn started_ms(&self, node: &str, id: &str) -> Result<u128> {
        let engine = self
            .engine(node)?
            .ok_or_else(|| anyhow!("{node} has no engine of its own"))?;
        let out = engine
            .docker()
            .args(["inspect", "--format", "{{.State.StartedAt}}", id])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let at = chrono::DateTime::parse_from_rfc3339(&text)
            .with_context(|| format!("StartedAt of {id} on {node}: {text:?}"))?;
        Ok(u128::try_from(at.timestamp_millis()).unwrap_or_default())
    }

    /// The output (stdout and stderr) of container `id` on `node`'s own engine.
    pub fn logs(&self, node: &str, id: &str) -> Result<String> {
        let engine = self
            .engine(node)?
            .ok_or_else(|| anyhow!("{node} has no engine of its own"))?;
        let out = engine.docker().args(["logs", id]).output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Runs `cmd` in container `id` on `node`'s own engine: its exit status and output.
    pub fn exec(&self, node: &str, id: &str, cmd: &[&str]) -> Result<(bool, String)> {
        let engine = self
            .engine(node)?
            .ok_or_else(|| anyhow!("{node} has no engine of its own"))?;
        let out = engine.docker().args(["exec", id]).args(cmd).output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// `docker ps` of `label` with `extra` on every running node engine.
    fn on_engines(&self, label: &str, extra: &[&str]) -> Result<Vec<Container>> {
        let mut found = Vec::new();
        for node in &self.nodes {
            if let Some(engine) = node.engine.as_ref().filter(|e| e.is_on()) {
                found.extend(ps_engine(&node.agent.node, engine, label, extra)?);
            }
        }
        Ok(found)
    }

    fn link(&self, node: &str) -> Result<&Link> {
        self.find(node)?
            .link
            .as_ref()
            .ok_or_else(|| anyhow!("{node} runs in the host namespace; it cannot be partitioned"))
    }

    /// Cuts the node off the network: the host end of its veth goes down. The agent keeps
    /// running and keeps reaching Docker (a file), so only the link to the controller is
    /// lost, both ways.
    pub fn partition(&self, node: &str) -> Result<()> {
        self.link(node)?.cut()
    }

    /// Ends a [`NetCluster::partition`].
    pub fn heal(&self, node: &str) -> Result<()> {
        self.link(node)?.mend()
    }

    /// SIGKILLs the controller (agents keep running).
    pub fn kill_controller(&mut self) {
        self.controller.kill9();
    }

    /// Starts the controller again on the same address, port and data directory, and
    /// waits until its API answers (not until nodes are back: see [`Self::wait_ready`]).
    pub async fn restart_controller(&mut self) -> Result<()> {
        self.controller.restart().await
    }

    /// A node's status as the controller reports it (`Ready`, `NotReady`, `Dead`).
    pub async fn node_status(&self, node: &str) -> Result<String> {
        let v = self.get(&format!("/v1/nodes/{node}")).await?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("node {node} without a status: {v}"))
    }

    /// Waits until the controller reports `node` with `status`.
    pub async fn wait_status(&self, node: &str, status: &str, timeout: Duration) -> Result<()> {
        eventually(timeout, &format!("node {node} {status}"), || async {
            let now = self.node_status(node).await?;
            if now == status {
                Ok(Some(()))
            } else {
                bail!("{node} is {now}")
            }
        })
        .await
    }

    /// Waits (up to 30 s) until the node is Ready.
    pub async fn wait_ready(&self, node: &str) -> Result<()> {
        self.wait_status(node, "Ready", READY_TIMEOUT).await
    }

    /// GET a JSON document from the API.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.controller.get(path).await
    }

    /// POST without a body to the API; the answer as JSON.
    pub async fn post(&self, path: &str) -> Result<Value> {
        self.controller.post(path).await
    }

    /// Applies a manifest text (one or more YAML documents) through `POST /v1/apply`.
    pub async fn apply(&self, manifest: &str) -> Result<Value> {
        self.controller.apply("test.yaml", manifest).await
    }

    /// `POST /v1/nodes/{node}/cordon`: the node gets no new tasks.
    pub async fn cordon(&self, node: &str) -> Result<Value> {
        self.post(&format!("/v1/nodes/{node}/cordon")).await
    }

    /// `POST /v1/nodes/{node}/uncordon`.
    pub async fn uncordon(&self, node: &str) -> Result<Value> {
        self.post(&format!("/v1/nodes/{node}/uncordon")).await
    }

    /// `POST /v1/nodes/{node}/drain?timeout=…`: moves every task away; answers when the
    /// node is empty or the timeout passed.
    pub async fn drain(&self, node: &str, timeout: &str) -> Result<Value> {
        self.post(&format!("/v1/nodes/{node}/drain?timeout={timeout}"))
            .await
    }

    /// `GET /v1/events`.
    pub async fn events(&self) -> Result<Vec<Value>> {
        list(self.get("/v1/events").await?)
    }

    /// The tasks of a workload.
    pub async fn tasks(&self, workload: &str) -> Result<Vec<Value>> {
        list(self.get(&format!("/v1/tasks?workload={workload}")).await?)
    }
}

fn list(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => bail!("expected a list, got {other}"),
    }
}

/// A Bramble container as `docker ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Full container id.
    pub id: String,
    /// `bramble.node` label.
    pub node: String,
    /// `bramble.task` label.
    pub task: String,
    /// `running`, `exited`, `created`, …
    pub state: String,
}

/// The containers carrying `label` (`key=value`, e.g. `bramble.workload=w`), including
/// stopped ones when `all`.
pub fn containers(label: &str, all: bool) -> Result<Vec<Container>> {
    ps(label, if all { &["-a"] } else { &[] })
}

/// The running containers carrying `label`, as `docker ps --filter label=… --filter
/// status=running` sees them (Docker's view, not the controller's).
pub fn running_containers(label: &str) -> Result<Vec<Container>> {
    ps(label, &["--filter", "status=running"])
}

fn ps(label: &str, extra: &[&str]) -> Result<Vec<Container>> {
    ps_on(Command::new("docker"), label, extra)
}

/// `docker ps` of the containers carrying `label` through `docker` (a `docker` command,
/// perhaps with `-H` for a node engine).
fn ps_on(mut docker: Command, label: &str, extra: &[&str]) -> Result<Vec<Container>> {
    let out = run(docker
        .args(["ps", "--no-trunc", "--filter"])
        .arg(format!("label={label}"))
        .args(extra)
        .args([
            "--format",
            "{{.ID}}\t{{.Label \"bramble.node\"}}\t{{.Label \"bramble.task\"}}\t{{.State}}",
        ]))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Container {
                id: f.next()?.to_string(),
                node: f.next()?.to_string(),
                task: f.next()?.to_string(),
                state: f.next()?.to_string(),
            })
        })
        .collect())
}

/// One Docker container event (`docker events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// `create`, `start`, `die`, `kill`, `stop`, `destroy`, …
    pub action: String,
    /// Container id.
    pub id: String,
    /// `bramble.node` label.
    pub node: String,
    /// `bramble.task` label.
    pub task: String,
    /// The exit code, on `die`.
    pub exit_code: Option<i64>,
    /// When, by the Docker daemon's clock (the same machine's).
    pub at: SystemTime,
}

/// Records Docker's container events for a label from the moment it is created until
/// it is dropped: the exact times of starts and exits, which polling would miss or blur.
/// A stream rather than `docker events --since` afterwards, because the daemon keeps
/// only its last 256 events, and parallel tests overflow that.
///
/// On node engines ([`EventRecorder::start_on`]) it follows each engine, and follows
/// one again when it comes back after a power-off (from where it left off).
pub struct EventRecorder {
    stop: Arc<AtomicBool>,
    children: Vec<Arc<Mutex<Option<Child>>>>,
    events: Arc<Mutex<Vec<ContainerEvent>>>,
}

impl EventRecorder {
    /// Starts recording container events carrying `label` (`key=value`) on the
    /// machine's engine.
    pub fn start(label: &str) -> Result<EventRecorder> {
        EventRecorder::start_on(&[], label)
    }

    /// Starts recording container events carrying `label` on every engine of `hosts`
    /// (`DOCKER_HOST` values; none means the machine's engine).
    pub fn start_on(hosts: &[String], label: &str) -> Result<EventRecorder> {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs_f64();
        let mut rec = EventRecorder {
            stop: Arc::new(AtomicBool::new(false)),
            children: Vec::new(),
            events: Arc::new(Mutex::new(Vec::new())),
        };
        let hosts: Vec<Option<String>> = if hosts.is_empty() {
            vec![None]
        } else {
            hosts.iter().cloned().map(Some).collect()
        };
        for host in hosts {
            let slot = Arc::new(Mutex::new(None));
            // The first stream is up before this returns: no event is missed.
            let first = spawn_events(host.as_deref(), label, since)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
            rec.children.push(Arc::clone(&slot));
            let (stop, sink, label) = (
                Arc::clone(&rec.stop),
                Arc::clone(&rec.events),
                label.to_string(),
            );
            std::thread::spawn(move || follow(host, label, since, slot, sink, stop));
        }
        Ok(rec)
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<ContainerEvent> {
        let mut all = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.sort_by_key(|e| e.at);
        all
    }

    /// The events so far with this action (`start`, `die`, …), oldest first.
    pub fn with_action(&self, action: &str) -> Vec<ContainerEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.action == action)
            .collect()
    }
}

/// `docker [-H host] events --since SINCE` for container events carrying `label`.
fn spawn_events(host: Option<&str>, label: &str, since: f64) -> Result<Child> {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    // --since: events between the start of the process and its subscription are
    // replayed from the daemon's buffer instead of lost.
    cmd.args(["events", "--since", &format!("{since:.3}")])
        .args(["--filter", "type=container", "--filter"])
        .arg(format!("label={label}"))
        .args(["--format", "{{json .}}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting docker events")
}

/// Reads one engine's event stream into `sink` until `stop`; when the stream ends (its
/// engine lost power), subscribes again from the last event seen once it is back.
fn follow(
    host: Option<String>,
    label: String,
    mut since: f64,
    slot: Arc<Mutex<Option<Child>>>,
    sink: Arc<Mutex<Vec<ContainerEvent>>>,
    stop: Arc<AtomicBool>,
) {
    loop {
        let stdout = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|c| c.stdout.take());
        if let Some(stdout) = stdout {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(event) = parse_event(&line) else {
                    continue;
                };
                if let Ok(d) = event.at.duration_since(UNIX_EPOCH) {
                    since = since.max(d.as_secs_f64());
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(event);
            }
        }
        if let Some(mut c) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if stop.load(Ordering::Relaxed) || host.is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
        // Just after the last event seen: it is not recorded twice.
        if let Ok(c) = spawn_events(host.as_deref(), &label, since + 0.000_001) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        }
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for slot in &self.children {
            if let Some(mut c) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn parse_event(line: &str) -> Option<ContainerEvent> {
    let v: Value = serde_json::from_str(line).ok()?;
    let attrs = &v["Actor"]["Attributes"];
    let label = |k: &str| attrs[k].as_str().unwrap_or_default().to_string();
    let nanos = v["timeNano"].as_u64()?;
    Some(ContainerEvent {
        action: v["Action"].as_str()?.to_string(),
        id: v["Actor"]["ID"].as_str()?.to_string(),
        node: label(bramble_api::task::labels::NODE),
        task: label(bramble_api::task::labels::TASK),
        exit_code: attrs["exitCode"].as_str().and_then(|c| c.parse().ok()),
        at: UNIX_EPOCH + Duration::from_nanos(nanos),
    })
}

/// One look at the running containers of a label.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When `docker ps` answered.
    pub at: SystemTime,
    /// What was running.
    pub running: Vec<Container>,
}

/// Samples `docker ps` for a label in a background thread until stopped: the way to
/// check "never two at once" over a whole fault, which a final look cannot.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    /// Starts sampling the running containers carrying `label` every `every` (plus the
    /// time `docker ps` takes). A failed `docker ps` is skipped, not recorded.
    pub fn start(label: &str, every: Duration) -> Sampler {
        let label = label.to_string();
        Sampler::start_with(every, move || running_containers(&label))
    }

    /// Samples what `look` returns every `every` (plus the time it takes), skipping
    /// failed looks.
    pub fn start_with(
        every: Duration,
        look: impl Fn() -> Result<Vec<Container>> + Send + 'static,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(running) = look() {
                    samples.push(Sample {
                        at: SystemTime::now(),
                        running,
                    });
                }
                std::thread::sleep(every);
            }
            samples
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the samples, oldest first.
    pub fn stop(mut self) -> Vec<Sample> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Parses an RFC 3339 time as the API writes it (`2026-11-21T16:55:20.190903Z`, or
/// with a `+HH:MM` offset), so tests can compare the controller's times with Docker's.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let zone_at = rest.find(['Z', 'z', '+', '-'])?;
    let (time, zone) = rest.split_at(zone_at);
    let offset: i64 = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':')?;
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
        }
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let m: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next()?.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos: u32 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec - offset;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_only_from_our_names() {
        assert_eq!(id_of("brt1a2b3cb"), Some("1a2b3c"));
        assert_eq!(id_of("brt1a2b3c-0"), Some("1a2b3c"));
        assert_eq!(id_of("brt1a2b3ch12"), Some("1a2b3c"));
        assert_eq!(id_of("brtzzzzzzb"), None);
        assert_eq!(id_of("br-1a2b3c"), None);
        assert_eq!(id_of("brt1A2B3Cb"), None);
        assert_eq!(id_of("brt12"), None);
    }

    #[test]
    fn longest_names_fit_in_an_interface_name() {
        // IFNAMSIZ is 16 with the NUL: 15 characters at most.
        for name in ["brtffffffb", "brtffffffh255", "brtffffffp255"] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn start_time_is_known_for_live_processes_only() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn parses_a_docker_event() {
        let line = r#"{"status":"die","id":"abc","Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{"bramble.node":"n1","bramble.task":"t-0","exitCode":"1"}},"time":1,"timeNano":1500000000}"#;
        let e = parse_event(line).expect("parses");
        assert_eq!(e.action, "die");
        assert_eq!(e.node, "n1");
        assert_eq!(e.task, "t-0");
        assert_eq!(e.exit_code, Some(1));
        assert_eq!(e.at, UNIX_EPOCH + Duration::from_millis(1500));
    }

    #[test]
    fn parses_api_times() {
        let at = |secs: u64, nanos: u32| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), at(0, 0));
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), at(951_868_800, 0));
        assert_eq!(
            parse_time("2026-11-21T16:55:20.190903Z"),
            at(1_795_280_120, 190_903_000)
        );
        assert_eq!(
            parse_time("2026-11-21T18:55:20.5+02:00"),
            at(1_795_280_120, 500_000_000)
        );
        assert_eq!(parse_time("yesterday"), None);
    }
}
