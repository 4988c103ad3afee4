//! The scheduler: which node each pending task goes to. Pure (no I/O, no clock, no
//! randomness), so the same [`Snapshot`] always gives the same [`Plan`].
//!
//! Modelled on Nomad's scheduler: for each task, first **filter** the nodes, giving
//! every rejected node a reason (the first check it fails, in this order):
//! ready, not cordoned, architecture, node selector labels, free host ports, free CPU,
//! free memory.
//! Then **rank** the feasible nodes, best first:
//! 1. nodes the task should avoid (where it just failed) last, so it goes back there
//!    only if nothing else fits;
//! 2. nodes holding the task's volume data, the newest first (a Wallet restarts where
//!    its data is);
//! 3. fewest tasks of the same workload: replicas spread across nodes;
//! 4. lowest load after placement, load being the larger of the CPU and memory
//!    fractions in use: balance;
//! 5. fewest tasks in all: tasks that request nothing do not change the load, and
//!    without this they would all stack on the first node by name;
//! 6. node name, for determinism.
//!
//! Tasks are placed in the order given, and every placement is charged to its node
//! before the next task is considered, so one plan never overcommits a node nor stacks
//! replicas needlessly. The cost is O(tasks × nodes) with no allocation per node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bramble_api::manifest::{self, Arch, Kind, Protocol, Resources};
use bramble_api::quantity::{Cpu, Memory};

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Unique node name.
    pub name: String,
    /// Heartbeats arrive.
    pub ready: bool,
    /// Kept free of new tasks by the operator.
    pub cordoned: bool,
    /// The node's architecture.
    pub arch: Arch,
    /// The node's labels, matched by node selectors.
    pub labels: BTreeMap<String, String>,
    /// CPU the node offers.
    pub cpu_capacity: Cpu,
    /// Memory the node offers.
    pub memory_capacity: Memory,
    /// CPU requested by the tasks already on the node.
    pub cpu_allocated: Cpu,
    /// Memory requested by the tasks already on the node.
    pub memory_allocated: Memory,
    /// Tasks already on this node, per workload (kind, name).
    pub workload_tasks: BTreeMap<(Kind, String), u32>,
    /// Host ports the tasks already on this node publish.
    pub host_ports: BTreeSet<(u16, Protocol)>,
}

/// A task waiting for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Task id.
    pub task: String,
    /// The owning workload's kind.
    pub kind: Kind,
    /// The owning workload's name.
    pub workload: String,
    /// What the task reserves on its node; absent requests reserve nothing.
    pub resources: Resources,
    /// Architectures and labels the node must have.
    pub placement: manifest::Placement,
    /// Nodes to avoid (where it just failed); used only if no other node fits.
    pub avoid: Vec<String>,
    /// Never use the nodes in `avoid`, even if nothing else fits (the task is backing off
    /// after they gave it up).
    pub avoid_strictly: bool,
    /// Host ports the task publishes: a node where one is taken cannot run it.
    pub host_ports: Vec<(u16, Protocol)>,
    /// Nodes holding the task's volume data, newest first: the first that fits wins.
    pub prefer: Vec<String>,
}

/// Everything one scheduling pass looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every known node, in any order.
    pub nodes: Vec<NodeInfo>,
    /// Tasks to place, in the order they should be considered (oldest first, say).
    pub pending: Vec<Request>,
}

/// Why a node cannot take a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The node's heartbeats stopped.
    NotReady,
    /// The operator cordoned the node.
    Cordoned,
    /// The node gave the task up recently; it waits before going back there.
    GaveUp,
    /// The task's image needs another architecture.
    Architecture {
        /// The architectures the task accepts.
        want: Vec<Arch>,
        /// The node's.
        have: Arch,
    },
    /// A node selector label is missing or different.
    Labels {
        /// The label.
        key: String,
        /// The value the task wants.
        want: String,
        /// The node's value, if it has the label.
        have: Option<String>,
    },
    /// A host port the task publishes is taken on the node.
    PortInUse {
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// Not enough CPU left.
    InsufficientCpu {
        /// What the task requests.
        requested: Cpu,
        /// What is left on the node.
        free: Cpu,
    },
    /// Not enough memory left.
    InsufficientMemory {
        /// What the task requests.
        requested: Memory,
        /// What is left on the node.
        free: Memory,
    },
}

impl Rejection {
    /// The reason without node-specific figures, for grouping in [`Unplaced::summary`].
    fn summary_phrase(&self) -> String {
        match self {
            Rejection::NotReady
            | Rejection::Cordoned
            | Rejection::GaveUp
            | Rejection::Architecture { .. }
            | Rejection::PortInUse { .. } => self.to_string(),
            Rejection::Labels { key, want, .. } => format!("without label {key}={want}"),
            Rejection::InsufficientCpu { requested, .. } => {
                format!("insufficient cpu (requested {requested})")
            }
            Rejection::InsufficientMemory { requested, .. } => {
                format!("insufficient memory (requested {requested})")
            }
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotReady => f.write_str("not ready"),
            Rejection::Cordoned => f.write_str("cordoned"),
            Rejection::GaveUp => f.write_str("gave the task up recently"),
            Rejection::Architecture { want, have } => {
                write!(f, "architecture {have} not in [")?;
                for (i, a) in want.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str("]")
            }
            Rejection::Labels {
                key,
                want,
                have: Some(have),
            } => {
                write!(f, "label {key} is {have}, not {want}")
            }
            Rejection::Labels {
                key,
                want,
                have: None,
            } => {
                write!(f, "label {key} is missing (want {want})")
            }
            Rejection::PortInUse { port, protocol } => match protocol {
                Protocol::Tcp => write!(f, "port {port} in use"),
                Protocol::Udp => write!(f, "port {port}/udp in use"),
            },
            Rejection::InsufficientCpu { requested, free } => {
                write!(f, "insufficient cpu: requested {requested}, {free} free")
            }
            Rejection::InsufficientMemory { requested, free } => {
                write!(
                    f,
                    "insufficient memory: requested {requested}, {} free",
                    free.human()
                )
            }
        }
    }
}

/// The scheduler's choice of a node for a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Task id.
    pub task: String,
    /// Node name.
    pub node: String,
}

/// A task no node can take, with every node's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// Task id.
    pub task: String,
    /// One reason per node, in snapshot order.
    pub rejections: Vec<(String, Rejection)>,
}

impl Unplaced {
    /// One line in the manner of kubectl, for a Pending task's message:
    /// `0/3 nodes fit: 2 insufficient memory (requested 512Mi), 1 architecture arm64 not in [amd64]`,
    /// most common reason first; `no nodes registered` when there are no nodes.
    pub fn summary(&self) -> String {
        if self.rejections.is_empty() {
            return "no nodes registered".to_string();
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, r) in &self.rejections {
            *counts.entry(r.summary_phrase()).or_default() += 1;
        }
        let mut groups: Vec<(String, usize)> = counts.into_iter().collect();
        // Stable sort over the phrase order: ties stay alphabetical.
        groups.sort_by_key(|g| std::cmp::Reverse(g.1));
        let reasons: Vec<String> = groups.iter().map(|(p, n)| format!("{n} {p}")).collect();
        format!(
            "0/{} {} fit: {}",
            self.rejections.len(),
            if self.rejections.len() == 1 {
                "node"
            } else {
                "nodes"
            },
            reasons.join(", ")
        )
    }
}

/// The outcome of one scheduling pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Tasks placed, in request order.
    pub placements: Vec<Placement>,
    /// Tasks that fit nowhere, in request order.
    pub unplaced: Vec<Unplaced>,
}

/// What a node has taken on during this pass.
#[derive(Debug, Clone, Copy, Default)]
struct Charged {
    cpu: u64,
    memory: u64,
    tasks: u32,
}

/// A reason a node is infeasible, borrowed from the inputs: building the full
/// [`Rejection`] allocates, and is only needed when the task ends up unplaced.
enum Misfit<'a> {
    NotReady,
    Cordoned,
    GaveUp,
    Architecture,
    Label { key: &'a str, want: &'a str },
    Port { port: u16, protocol: Protocol },
    Cpu { requested: u64, free: u64 },
    Memory { requested: u64, free: u64 },
}

impl Misfit<'_> {
    fn rejection(&self, node: &NodeInfo, req: &Request) -> Rejection {
        match *self {
            Misfit::NotReady => Rejection::NotReady,
            Misfit::Cordoned => Rejection::Cordoned,
            Misfit::GaveUp => Rejection::GaveUp,
            Misfit::Architecture => Rejection::Architecture {
                want: req.placement.architectures.clone(),
                have: node.arch,
            },
            Misfit::Label { key, want } => Rejection::Labels {
                key: key.to_string(),
                want: want.to_string(),
                have: node.labels.get(key).cloned(),
            },
            Misfit::Port { port, protocol } => Rejection::PortInUse { port, protocol },
            Misfit::Cpu { requested, free } => Rejection::InsufficientCpu {
                requested: Cpu(requested),
                free: Cpu(free),
            },
            Misfit::Memory { requested, free } => Rejection::InsufficientMemory {
                requested: Memory(requested),
                free: Memory(free),
            },
        }
    }
}

fn requested(req: &Request) -> (u64, u64) {
    (
        req.resources.cpu.map_or(0, Cpu::millis),
        req.resources.memory.map_or(0, Memory::bytes),
    )
}

/// The first filter `node` fails for `req`, given what this pass already charged to it
/// (resources, and the host ports of the tasks it placed there).
fn misfit<'a>(
    node: &NodeInfo,
    charged: Charged,
    ports: &BTreeSet<(u16, Protocol)>,
    req: &'a Request,
) -> Option<Misfit<'a>> {
    if !node.ready {
        return Some(Misfit::NotReady);
    }
    if node.cordoned {
        return Some(Misfit::Cordoned);
    }
    if req.avoid_strictly && req.avoid.contains(&node.name) {
        return Some(Misfit::GaveUp);
    }
    let archs = &req.placement.architectures;
    if !archs.is_empty() && !archs.contains(&node.arch) {
        return Some(Misfit::Architecture);
    }
    for (key, want) in &req.placement.node_selector {
        if node.labels.get(key) != Some(want) {
            return Some(Misfit::Label { key, want });
        }
    }
    for &(port, protocol) in &req.host_ports {
        if node.host_ports.contains(&(port, protocol)) || ports.contains(&(port, protocol)) {
            return Some(Misfit::Port { port, protocol });
        }
    }
    let (cpu, memory) = requested(req);
    // Saturating: a node may report less capacity than is already allocated (after a
    // reboot with less memory, say); it then has nothing free, not a negative amount.
    let free_cpu = node
        .cpu_capacity
        .millis()
        .saturating_sub(node.cpu_allocated.millis())
        .saturating_sub(charged.cpu);
    if cpu > free_cpu {
        return Some(Misfit::Cpu {
            requested: cpu,
            free: free_cpu,
        });
    }
    let free_memory = node
        .memory_capacity
        .bytes()
        .saturating_sub(node.memory_allocated.bytes())
        .saturating_sub(charged.memory);
    if memory > free_memory {
        return Some(Misfit::Memory {
            requested: memory,
            free: free_memory,
        });
    }
    None
}

/// A fraction `num / den` compared exactly (no floats, so no platform-dependent ties).
#[derive(Debug, Clone, Copy)]
struct Fraction {
    num: u64,
    den: u64,
}

impl Fraction {
    /// `used / capacity`; a node with no capacity counts as full once anything is used.
    fn of(used: u64, capacity: u64) -> Fraction {
        match (used, capacity) {
            (0, _) => Fraction { num: 0, den: 1 },
            (_, 0) => Fraction { num: 1, den: 1 },
            _ => Fraction {
                num: used,
                den: capacity,
            },
        }
    }

    fn cmp(self, other: Fraction) -> std::cmp::Ordering {
        // Cross-multiplied in u128: exact for any u64 numerators and denominators.
        (u128::from(self.num) * u128::from(other.den))
            .cmp(&(u128::from(other.num) * u128::from(self.den)))
    }

    fn max(self, other: Fraction) -> Fraction {
        if self.cmp(other).is_ge() {
            self
        } else {
            other
        }
    }
}

/// How good a feasible node is for a task; smaller is better.
#[derive(Debug, Clone, Copy)]
struct Rank {
    avoided: bool,
    /// Position in the request's `prefer` (`usize::MAX`: not there).
    preferred: usize,
    same_workload: u32,
    load: Fraction,
    tasks: u32,
}

impl Rank {
    /// Whether `self` beats `other`; `self_name`/`other_name` break the final tie.
    fn better_than(&self, self_name: &str, other: &Rank, other_name: &str) -> bool {
        self.avoided
            .cmp(&other.avoided)
            .then(self.preferred.cmp(&other.preferred))
            .then(self.same_workload.cmp(&other.same_workload))
            .then(self.load.cmp(other.load))
            .then(self.tasks.cmp(&other.tasks))
            .then(self_name.cmp(other_name))
            .is_lt()
    }
}

/// Places `snapshot.pending` on `snapshot.nodes`, in request order. See the module
/// documentation for the rules.
pub fn schedule(snapshot: &Snapshot) -> Plan {
    let nodes = &snapshot.nodes;
    let mut charged = vec![Charged::default(); nodes.len()];
    let mut ports: Vec<BTreeSet<(u16, Protocol)>> = vec![BTreeSet::new(); nodes.len()];
    let total_tasks: Vec<u32> = nodes
        .iter()
        .map(|n| {
            n.workload_tasks
                .values()
                .fold(0u32, |a, b| a.saturating_add(*b))
        })
        .collect();
    // Per workload, its task count on each node (indexed like `nodes`); built the first
    // time a workload is seen, so the per-node lookup is not repeated for each replica.
    let mut spread: BTreeMap<(Kind, &str), Vec<u32>> = BTreeMap::new();
    let mut plan = Plan::default();

    for req in &snapshot.pending {
        let counts = spread
            .entry((req.kind, req.workload.as_str()))
            .or_insert_with(|| {
                let key = (req.kind, req.workload.clone());
                nodes
                    .iter()
                    .map(|n| n.workload_tasks.get(&key).copied().unwrap_or(0))
                    .collect()
            });
        let (cpu, memory) = requested(req);

        let mut best: Option<(usize, Rank)> = None;
        for (i, node) in nodes.iter().enumerate() {
            if misfit(node, charged[i], &ports[i], req).is_some() {
                continue;
            }
            let used_cpu = node
                .cpu_allocated
                .millis()
                .saturating_add(charged[i].cpu)
                .saturating_add(cpu);
            let used_memory = node
                .memory_allocated
                .bytes()
                .saturating_add(charged[i].memory)
                .saturating_add(memory);
            let rank = Rank {
                avoided: req.avoid.contains(&node.name),
                preferred: req
                    .prefer
                    .iter()
                    .position(|p| *p == node.name)
                    .unwrap_or(usize::MAX),
                same_workload: counts[i],
                load: Fraction::of(used_cpu, node.cpu_capacity.millis())
                    .max(Fraction::of(used_memory, node.memory_capacity.bytes())),
                tasks: total_tasks[i].saturating_add(charged[i].tasks),
            };
            let better = match &best {
                None => true,
                Some((j, b)) => rank.better_than(&node.name, b, &nodes[*j].name),
            };
            if better {
                best = Some((i, rank));
            }
        }

        match best {
            Some((i, _)) => {
                charged[i].cpu += cpu;
                charged[i].memory += memory;
                charged[i].tasks += 1;
                counts[i] += 1;
                ports[i].extend(req.host_ports.iter().copied());
                plan.placements.push(Placement {
                    task: req.task.clone(),
                    node: nodes[i].name.clone(),
                });
            }
            None => {
                // Rare path: only now spend allocations on the reasons.
                let rejections = nodes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, node)| {
                        misfit(node, charged[i], &ports[i], req)
                            .map(|m| (node.name.clone(), m.rejection(node, req)))
                    })
                    .collect();
                plan.unplaced.push(Unplaced {
                    task: req.task.clone(),
                    rejections,
                });
            }
        }
    }
    plan
}

/// A large, deterministic snapshot for the scheduler benchmark: `nodes` Pi-like nodes
/// (4 cores, 1 GiB; mostly arm64, some 32-bit arm; a third with an SSD label) and
/// `tasks` pending tasks from 10-replica workloads with small requests, some wanting
/// arm64 or an SSD. With 1,000 nodes, 10,000 tasks all fit.
#[doc(hidden)]
pub fn bench_snapshot(nodes: usize, tasks: usize) -> Snapshot {
    let nodes = (0..nodes)
        .map(|i| NodeInfo {
            name: format!("pi-{i:05}"),
            ready: i % 97 != 13,
            cordoned: i % 101 == 7,
            arch: if i % 4 == 3 { Arch::Arm } else { Arch::Arm64 },
            labels: if i % 3 == 0 {
                BTreeMap::from([("disk".to_string(), "ssd".to_string())])
            } else {
                BTreeMap::new()
            },
            cpu_capacity: Cpu::cores(4),
            memory_capacity: Memory::mib(1024),
            cpu_allocated: Cpu((i as u64 % 5) * 100),
            memory_allocated: Memory::mib((i as u64 % 7) * 16),
            workload_tasks: BTreeMap::new(),
            host_ports: BTreeSet::new(),
        })
        .collect();
    let pending = (0..tasks)
        .map(|t| {
            let w = t / 10;
            let mut placement = manifest::Placement::default();
            if w % 5 == 1 {
                placement.architectures = vec![Arch::Arm64];
            }
            if w % 7 == 2 {
                placement
                    .node_selector
                    .insert("disk".to_string(), "ssd".to_string());
            }
            Request {
                prefer: Vec::new(),
                task: format!("w{w}-{:02}", t % 10),
                kind: if w % 9 == 0 {
                    Kind::Wallet
                } else {
                    Kind::Service
                },
                workload: format!("w{w}"),
                resources: Resources {
                    cpu: Some(Cpu(50 + (w as u64 % 4) * 25)),
                    memory: Some(Memory::mib(16 + (w as u64 % 3) * 16)),
                },
                placement,
                avoid: Vec::new(),
                avoid_strictly: false,
                host_ports: Vec::new(),
            }
        })
        .collect();
    Snapshot { nodes, pending }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            ready: true,
            cordoned: false,
            arch: Arch::Arm64,
            labels: BTreeMap::new(),
            cpu_capacity: Cpu::cores(4),
            memory_capacity: Memory::mib(1024),
            cpu_allocated: Cpu(0),
            memory_allocated: Memory(0),
            workload_tasks: BTreeMap::new(),
            host_ports: BTreeSet::new(),
        }
    }

    fn req(task: &str, workload: &str) -> Request {
        Request {
            prefer: Vec::new(),
            task: task.to_string(),
            kind: Kind::Service,
            workload: workload.to_string(),
            resources: Resources::default(),
            placement: manifest::Placement::default(),
            avoid: Vec::new(),
            avoid_strictly: false,
            host_ports: Vec::new(),
        }
    }

    fn with_port(mut r: Request, port: u16, protocol: Protocol) -> Request {
        r.host_ports.push((port, protocol));
        r
    }

    fn with_resources(mut r: Request, cpu: u64, mib: u64) -> Request {
        r.resources = Resources {
            cpu: Some(Cpu(cpu)),
            memory: Some(Memory::mib(mib)),
        };
        r
    }

    fn nodes_of(plan: &Plan) -> Vec<&str> {
        plan.placements.iter().map(|p| p.node.as_str()).collect()
    }

    /// One task, several nodes: which node it lands on, or the rejections.
    fn place_one(nodes: Vec<NodeInfo>, r: Request) -> Result<String, Vec<(String, Rejection)>> {
        let plan = schedule(&Snapshot {
            nodes,
            pending: vec![r],
        });
        match (plan.placements.first(), plan.unplaced.first()) {
            (Some(p), None) => Ok(p.node.clone()),
            (None, Some(u)) => Err(u.rejections.clone()),
            _ => panic!("one task gives one outcome: {plan:?}"),
        }
    }

    #[test]
    fn filters_each_rule_with_its_reason() {
        let arm = Arch::Arm;
        struct Case {
            name: &'static str,
            node: NodeInfo,
            req: Request,
            want: Option<Rejection>,
        }
        let mut not_ready = node("n");
        not_ready.ready = false;
        let mut cordoned = node("n");
        cordoned.cordoned = true;
        let mut arm_node = node("n");
        arm_node.arch = arm;
        let mut wants_arm64 = req("t", "w");
        wants_arm64.placement.architectures = vec![Arch::Amd64, Arch::Arm64];
        let mut wants_ssd = req("t", "w");
        wants_ssd
            .placement
            .node_selector
            .insert("disk".into(), "ssd".into());
        let mut hdd = node("n");
        hdd.labels.insert("disk".into(), "hdd".into());
        let mut ssd = node("n");
        ssd.labels.insert("disk".into(), "ssd".into());
        ssd.labels.insert("zone".into(), "shelf".into());
        let mut busy = node("n");
        busy.cpu_allocated = Cpu(3800);
        busy.memory_allocated = Memory::mib(1000);
        let mut over = node("n");
        over.memory_allocated = Memory::mib(2048);
        let mut stratum = node("n");
        stratum.host_ports.insert((3333, Protocol::Tcp));

        let cases = vec![
            Case {
                name: "host port taken",
                node: stratum.clone(),
                req: with_port(req("t", "w"), 3333, Protocol::Tcp),
                want: Some(Rejection::PortInUse {
                    port: 3333,
                    protocol: Protocol::Tcp,
                }),
            },
            Case {
                name: "same number, other protocol",
                node: stratum.clone(),
                req: with_port(req("t", "w"), 3333, Protocol::Udp),
                want: None,
            },
            Case {
                name: "other port",
                node: stratum,
                req: with_port(req("t", "w"), 3334, Protocol::Tcp),
                want: None,
            },
            Case {
                name: "not ready",
                node: not_ready,
                req: req("t", "w"),
                want: Some(Rejection::NotReady),
            },
            Case {
                name: "cordoned",
                node: cordoned,
                req: req("t", "w"),
                want: Some(Rejection::Cordoned),
            },
            Case {
                name: "wrong architecture",
                node: arm_node.clone(),
                req: wants_arm64.clone(),
                want: Some(Rejection::Architecture {
                    want: vec![Arch::Amd64, Arch::Arm64],
                    have: arm,
                }),
            },
            Case {
                name: "no architectures means any",
                node: arm_node,
                req: req("t", "w"),
                want: None,
            },
            Case {
                name: "listed architecture",
                node: node("n"),
                req: wants_arm64,
                want: None,
            },
            Case {
                name: "label missing",
                node: node("n"),
                req: wants_ssd.clone(),
                want: Some(Rejection::Labels {
                    key: "disk".into(),
                    want: "ssd".into(),
                    have: None,
                }),
            },
            Case {
                name: "label different",
                node: hdd,
                req: wants_ssd.clone(),
                want: Some(Rejection::Labels {
                    key: "disk".into(),
                    want: "ssd".into(),
                    have: Some("hdd".into()),
                }),
            },
            Case {
                name: "label equal, extra labels fine",
                node: ssd,
                req: wants_ssd,
                want: None,
            },
            Case {
                name: "insufficient cpu",
                node: busy.clone(),
                req: with_resources(req("t", "w"), 500, 1),
                want: Some(Rejection::InsufficientCpu {
                    requested: Cpu(500),
                    free: Cpu(200),
                }),
            },
            Case {
                name: "insufficient memory",
                node: busy.clone(),
                req: with_resources(req("t", "w"), 100, 64),
                want: Some(Rejection::InsufficientMemory {
                    requested: Memory::mib(64),
                    free: Memory::mib(24),
                }),
            },
            Case {
                name: "exact fit",
                node: busy.clone(),
                req: with_resources(req("t", "w"), 200, 24),
                want: None,
            },
            Case {
                name: "no requests always fit",
                node: over.clone(),
                req: req("t", "w"),
                want: None,
            },
            Case {
                name: "overallocated node has nothing free",
                node: over,
                req: with_resources(req("t", "w"), 0, 1),
                want: Some(Rejection::InsufficientMemory {
                    requested: Memory::mib(1),
                    free: Memory(0),
                }),
            },
        ];
        for c in cases {
            let got = place_one(vec![c.node], c.req);
            match c.want {
                None => assert_eq!(got, Ok("n".to_string()), "{}", c.name),
                Some(want) => assert_eq!(got, Err(vec![("n".to_string(), want)]), "{}", c.name),
            }
        }
    }

    #[test]
    fn the_first_failing_filter_is_the_reason() {
        let mut n = node("n");
        n.ready = false;
        n.cordoned = true;
        n.arch = Arch::Amd64;
        let mut r = with_resources(req("t", "w"), 100_000, 100_000);
        r.placement.architectures = vec![Arch::Arm64];
        assert_eq!(
            place_one(vec![n], r),
            Err(vec![("n".to_string(), Rejection::NotReady)])
        );
    }

    #[test]
    fn ranks_spread_then_balance_then_task_count_then_name() {
        let mut has_replica = node("a");
        has_replica
            .workload_tasks
            .insert((Kind::Service, "web".into()), 1);
        let mut loaded = node("b");
        loaded.cpu_allocated = Cpu(2000);
        let idle = node("c");
        // Spread beats balance: "a" is idle but already runs a web replica.
        assert_eq!(
            place_one(
                vec![has_replica.clone(), loaded.clone(), idle.clone()],
                req("t", "web")
            ),
            Ok("c".into())
        );
        // Same workload name under another kind is another workload.
        let mut wallet = req("t", "web");
        wallet.kind = Kind::Wallet;
        assert_eq!(
            place_one(vec![has_replica.clone(), loaded.clone()], wallet),
            Ok("a".into())
        );
        // Balance: the larger fraction counts; "b" is at 50% CPU, "m" at 75% memory.
        let mut mem_heavy = node("m");
        mem_heavy.memory_allocated = Memory::mib(768);
        assert_eq!(
            place_one(vec![mem_heavy, loaded.clone()], req("t", "web")),
            Ok("b".into())
        );
        // Balance counts the task's own request: 1 core on "x" (4 cores, 1 used) gives
        // 50%, on "y" (8 cores, 3 used) 50% too; then fewer tasks wins.
        let mut x = node("x");
        x.cpu_allocated = Cpu(1000);
        x.workload_tasks.insert((Kind::Job, "j".into()), 2);
        let mut y = node("y");
        y.cpu_capacity = Cpu::cores(8);
        y.cpu_allocated = Cpu(3000);
        y.workload_tasks.insert((Kind::Job, "j".into()), 1);
        assert_eq!(
            place_one(vec![x, y], with_resources(req("t", "w"), 1000, 0)),
            Ok("y".into())
        );
        // All equal: the name decides.
        assert_eq!(
            place_one(vec![node("q"), node("p")], req("t", "w")),
            Ok("p".into())
        );
    }

    #[test]
    fn avoided_nodes_are_used_only_when_nothing_else_fits() {
        let mut r = req("t", "w");
        r.avoid = vec!["a".into()];
        assert_eq!(
            place_one(vec![node("a"), node("b")], r.clone()),
            Ok("b".into())
        );
        let mut b = node("b");
        b.cordoned = true;
        assert_eq!(place_one(vec![node("a"), b], r.clone()), Ok("a".into()));
        // Avoidance outranks spread.
        let mut a = node("a");
        a.workload_tasks.insert((Kind::Service, "other".into()), 3);
        let mut b = node("b");
        b.workload_tasks.insert((Kind::Service, "w".into()), 3);
        assert_eq!(place_one(vec![a, b], r.clone()), Ok("b".into()));
        // Backing off: an avoided node is not used at all, and says why.
        let mut strict = r;
        strict.avoid_strictly = true;
        assert_eq!(
            place_one(vec![node("a"), node("b")], strict.clone()),
            Ok("b".into())
        );
        assert_eq!(
            place_one(vec![node("a")], strict),
            Err(vec![("a".to_string(), Rejection::GaveUp)])
        );
    }

    #[test]
    fn a_task_goes_where_its_newest_data_is_when_that_node_fits() {
        let mut r = req("t", "w");
        r.prefer = vec!["c".into(), "b".into()];
        // The newest holder wins over a lighter, emptier node.
        let mut c = node("c");
        c.workload_tasks.insert((Kind::Service, "other".into()), 5);
        assert_eq!(
            place_one(vec![node("a"), node("b"), c.clone()], r.clone()),
            Ok("c".into())
        );
        // It does not fit: the next holder.
        let mut full = c;
        full.cordoned = true;
        assert_eq!(
            place_one(vec![node("a"), node("b"), full.clone()], r.clone()),
            Ok("b".into())
        );
        // No holder fits: anywhere, by the usual rules.
        let mut b = node("b");
        b.ready = false;
        assert_eq!(
            place_one(vec![node("a"), b, full], r.clone()),
            Ok("a".into())
        );
        // A node the task just failed on is avoided even if it holds the data.
        r.avoid = vec!["c".into()];
        assert_eq!(place_one(vec![node("a"), node("c")], r), Ok("a".into()));
    }

    #[test]
    fn one_plan_never_overcommits_and_spreads_replicas() {
        let nodes = vec![node("a"), node("b"), node("c")];
        // 1 GiB each: three 400Mi tasks per node would not fit, two do.
        let pending: Vec<Request> = (0..7)
            .map(|i| with_resources(req(&format!("t{i}"), "web"), 100, 400))
            .collect();
        let plan = schedule(&Snapshot { nodes, pending });
        assert_eq!(nodes_of(&plan), ["a", "b", "c", "a", "b", "c"]);
        assert_eq!(plan.unplaced.len(), 1);
        let u = &plan.unplaced[0];
        assert_eq!(u.task, "t6");
        assert_eq!(
            u.summary(),
            "0/3 nodes fit: 3 insufficient memory (requested 400Mi)"
        );
    }

    #[test]
    fn two_replicas_wanting_one_host_port_never_share_a_node() {
        // The example stratum.yaml: two replicas publish 3333. With one node, the second
        // waits with a reason instead of failing at run time.
        let pending: Vec<Request> = (0..2)
            .map(|i| with_port(req(&format!("t{i}"), "stratum"), 3333, Protocol::Tcp))
            .collect();
        let plan = schedule(&Snapshot {
            nodes: vec![node("a"), node("b")],
            pending: pending.clone(),
        });
        assert_eq!(nodes_of(&plan), ["a", "b"]);
        let plan = schedule(&Snapshot {
            nodes: vec![node("a")],
            pending,
        });
        assert_eq!(nodes_of(&plan), ["a"]);
        assert_eq!(
            plan.unplaced[0].summary(),
            "0/1 node fit: 1 port 3333 in use"
        );
        let udp = Rejection::PortInUse {
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(udp.to_string(), "port 53/udp in use");
    }

    #[test]
    fn tasks_without_requests_spread_over_nodes() {
        let pending: Vec<Request> = (0..4)
            .map(|i| req(&format!("t{i}"), &format!("wallet{i}")))
            .collect();
        let plan = schedule(&Snapshot {
            nodes: vec![node("a"), node("b")],
            pending,
        });
        assert_eq!(nodes_of(&plan), ["a", "b", "a", "b"]);
    }

    #[test]
    fn summary_groups_reasons_like_kubectl() {
        let mut amd = node("x86");
        amd.arch = Arch::Amd64;
        let mut full1 = node("pi1");
        full1.memory_allocated = Memory::mib(900);
        let mut full2 = node("pi2");
        full2.memory_allocated = Memory::mib(1000);
        let mut r = with_resources(req("t", "w"), 100, 512);
        r.placement.architectures = vec![Arch::Arm64];
        let plan = schedule(&Snapshot {
            nodes: vec![amd, full1, full2],
            pending: vec![r],
        });
        let u = &plan.unplaced[0];
        assert_eq!(
            u.summary(),
            "0/3 nodes fit: 2 insufficient memory (requested 512Mi), 1 architecture amd64 not in [arm64]"
        );
        assert_eq!(
            u.rejections[1].1.to_string(),
            "insufficient memory: requested 512Mi, 124Mi free"
        );

        let lone = Unplaced {
            task: "t".into(),
            rejections: vec![("n".into(), Rejection::Cordoned)],
        };
        assert_eq!(lone.summary(), "0/1 node fit: 1 cordoned");
        let none = schedule(&Snapshot {
            nodes: vec![],
            pending: vec![req("t", "w")],
        });
        assert_eq!(none.unplaced[0].summary(), "no nodes registered");
    }

    #[test]
    fn label_rejections_read_plainly() {
        let missing = Rejection::Labels {
            key: "disk".into(),
            want: "ssd".into(),
            have: None,
        };
        let other = Rejection::Labels {
            key: "disk".into(),
            want: "ssd".into(),
            have: Some("hdd".into()),
        };
        assert_eq!(missing.to_string(), "label disk is missing (want ssd)");
        assert_eq!(other.to_string(), "label disk is hdd, not ssd");
        let u = Unplaced {
            task: "t".into(),
            rejections: vec![("a".into(), missing), ("b".into(), other)],
        };
        assert_eq!(u.summary(), "0/2 nodes fit: 2 without label disk=ssd");
    }

    #[test]
    fn bench_snapshot_places_everything() {
        let snap = bench_snapshot(100, 1000);
        let plan = schedule(&snap);
        assert_eq!(
            plan.placements.len(),
            1000,
            "{:?}",
            plan.unplaced.first().map(Unplaced::summary)
        );
    }

    // ---- invariants ----

    fn arb_node(i: usize) -> impl Strategy<Value = NodeInfo> {
        (
            any::<bool>(),
            prop::bool::weighted(0.2),
            prop::sample::select(vec![Arch::Arm64, Arch::Arm, Arch::Amd64]),
            prop::option::of(prop::sample::select(vec!["ssd", "hdd"])),
            0u64..5000,
            0u64..2048,
            0u64..5000,
            0u64..2048,
            prop::collection::btree_map((0usize..3).prop_map(|w| format!("w{w}")), 0u32..3, 0..3),
            prop::collection::btree_set(3330u16..3334, 0..2),
        )
            .prop_map(
                move |(
                    not_ready,
                    cordoned,
                    arch,
                    disk,
                    cpu_cap,
                    mem_cap,
                    cpu_alloc,
                    mem_alloc,
                    on,
                    ports,
                )| NodeInfo {
                    name: format!("n{i:02}"),
                    ready: !not_ready || i.is_multiple_of(2),
                    cordoned,
                    arch,
                    labels: disk
                        .map(|d| ("disk".to_string(), d.to_string()))
                        .into_iter()
                        .collect(),
                    cpu_capacity: Cpu(cpu_cap),
                    memory_capacity: Memory::mib(mem_cap),
                    cpu_allocated: Cpu(cpu_alloc),
                    memory_allocated: Memory::mib(mem_alloc),
                    workload_tasks: on
                        .into_iter()
                        .map(|(w, n)| ((Kind::Service, w), n))
                        .collect(),
                    host_ports: ports.into_iter().map(|p| (p, Protocol::Tcp)).collect(),
                },
            )
    }

    fn arb_request(i: usize) -> impl Strategy<Value = Request> {
        (
            0usize..3,
            prop::option::of(0u64..1500),
            prop::option::of(0u64..512),
            prop::collection::vec(
                prop::sample::select(vec![Arch::Arm64, Arch::Arm, Arch::Amd64]),
                0..2,
            ),
            prop::option::of(prop::sample::select(vec!["ssd", "hdd"])),
            prop::option::of(0usize..8),
            prop::option::of(3330u16..3334),
        )
            .prop_map(move |(w, cpu, mib, archs, disk, avoid, port)| Request {
                prefer: Vec::new(),
                task: format!("t{i:03}"),
                kind: Kind::Service,
                workload: format!("w{w}"),
                resources: Resources {
                    cpu: cpu.map(Cpu),
                    memory: mib.map(Memory::mib),
                },
                placement: manifest::Placement {
                    node_selector: disk
                        .map(|d| ("disk".to_string(), d.to_string()))
                        .into_iter()
                        .collect(),
                    architectures: archs,
                },
                avoid: avoid.map(|n| format!("n{n:02}")).into_iter().collect(),
                avoid_strictly: false,
                host_ports: port.map(|p| (p, Protocol::Tcp)).into_iter().collect(),
            })
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (0usize..8, 0usize..30).prop_flat_map(|(n, t)| {
            let nodes: Vec<_> = (0..n).map(arb_node).collect();
            let pending: Vec<_> = (0..t).map(arb_request).collect();
            (nodes, pending).prop_map(|(nodes, pending)| Snapshot { nodes, pending })
        })
    }

    proptest! {
        #[test]
        fn placements_respect_every_filter_and_never_overcommit(snap in arb_snapshot()) {
            let plan = schedule(&snap);
            let by_name: BTreeMap<&str, &NodeInfo> = snap.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
            let by_task: BTreeMap<&str, &Request> = snap.pending.iter().map(|r| (r.task.as_str(), r)).collect();
            let mut cpu: BTreeMap<&str, u64> = BTreeMap::new();
            let mut mem: BTreeMap<&str, u64> = BTreeMap::new();
            let mut ports: BTreeSet<(&str, (u16, Protocol))> = BTreeSet::new();
            for p in &plan.placements {
                let n = by_name[p.node.as_str()];
                let r = by_task[p.task.as_str()];
                prop_assert!(n.ready && !n.cordoned);
                for port in &r.host_ports {
                    prop_assert!(!n.host_ports.contains(port), "port {:?} already used on {}", port, n.name);
                    prop_assert!(ports.insert((p.node.as_str(), *port)), "port {:?} placed twice on {}", port, n.name);
                }
                prop_assert!(r.placement.architectures.is_empty() || r.placement.architectures.contains(&n.arch));
                for (k, v) in &r.placement.node_selector {
                    prop_assert_eq!(n.labels.get(k), Some(v));
                }
                *cpu.entry(&p.node).or_default() += r.resources.cpu.map_or(0, Cpu::millis);
                *mem.entry(&p.node).or_default() += r.resources.memory.map_or(0, Memory::bytes);
            }
            for (name, used) in &cpu {
                let n = by_name[name];
                prop_assert!(*used <= n.cpu_capacity.0.saturating_sub(n.cpu_allocated.0), "cpu overcommitted on {}", name);
            }
            for (name, used) in &mem {
                let n = by_name[name];
                prop_assert!(*used <= n.memory_capacity.0.saturating_sub(n.memory_allocated.0), "memory overcommitted on {}", name);
            }
        }

        #[test]
        fn every_task_has_one_outcome_and_every_unplaced_task_a_reason_per_node(snap in arb_snapshot()) {
            let plan = schedule(&snap);
            let mut seen: Vec<&str> = plan.placements.iter().map(|p| p.task.as_str())
                .chain(plan.unplaced.iter().map(|u| u.task.as_str())).collect();
            seen.sort_unstable();
            let mut want: Vec<&str> = snap.pending.iter().map(|r| r.task.as_str()).collect();
            want.sort_unstable();
            prop_assert_eq!(seen, want);
            let names: Vec<&str> = snap.nodes.iter().map(|n| n.name.as_str()).collect();
            for u in &plan.unplaced {
                let rejected: Vec<&str> = u.rejections.iter().map(|(n, _)| n.as_str()).collect();
                prop_assert_eq!(&rejected, &names);
                prop_assert!(!u.summary().is_empty());
            }
        }

        #[test]
        fn the_plan_does_not_depend_on_node_order(snap in arb_snapshot()) {
            let plan = schedule(&snap);
            prop_assert_eq!(&plan, &schedule(&snap));
            let mut reversed = snap.clone();
            reversed.nodes.reverse();
            let other = schedule(&reversed);
            prop_assert_eq!(&plan.placements, &other.placements);
            // Same reasons; only their order (snapshot order) differs.
            let sets = |p: &Plan| -> Vec<BTreeSet<(String, String)>> {
                p.unplaced.iter().map(|u| u.rejections.iter().map(|(n, r)| (n.clone(), r.to_string())).collect()).collect()
            };
            prop_assert_eq!(sets(&plan), sets(&other));
        }

        #[test]
        fn replicas_spread_evenly_over_identical_nodes(nodes in 1usize..12, replicas in 0usize..60, cpu in 0u64..50) {
            let nodes: Vec<NodeInfo> = (0..nodes).map(|i| node(&format!("n{i}"))).collect();
            let pending = (0..replicas).map(|i| with_resources(req(&format!("t{i}"), "web"), cpu, 1)).collect();
            let plan = schedule(&Snapshot { nodes: nodes.clone(), pending });
            prop_assert!(plan.unplaced.is_empty());
            let mut per_node: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
            for p in &plan.placements {
                *per_node.get_mut(p.node.as_str()).expect("a known node") += 1;
            }
            let max = per_node.values().max().copied().unwrap_or(0);
            let min = per_node.values().min().copied().unwrap_or(0);
            prop_assert!(max - min <= 1, "{:?}", per_node);
        }
    }
}
