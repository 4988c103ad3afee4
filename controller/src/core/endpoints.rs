//! Workload addresses and the routing table agents get ([`bramble_api::endpoints`]).
//!
//! - [`allocate`]: the leader gives each workload without an address the lowest free
//!   one of the range, once. The address is kept in the stored workload through every
//!   update, so it never changes while the workload exists: clients that resolve a name
//!   once and cache it forever keep reaching it after it moves.
//! - [`table`]: every address with the instances behind it, from one snapshot.
//! - [`transitions`]: the events of a workload losing its last Ready instance, or
//!   getting one back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bramble_api::endpoints::{AddressRange, Backend, Endpoint, Table};
use bramble_api::manifest::{Kind, Protocol};
use bramble_api::task::{DesiredState, TaskPhase};

use super::events::Draft;
use super::model::{self, Versioned};
use super::snapshot::{Change, Expect, Item, Snapshot, Write};

/// Gives every workload that has no address the lowest free one of `range`, oldest
/// workload first. Each write expects the workload as read, so an apply in between
/// makes the pass fail and run again. Addresses outside `range` (given under another
/// range) are kept and stay taken. When the range is full, the rest wait, and the
/// caller is told how many.
pub fn allocate(snap: &Snapshot, range: AddressRange) -> (Change, usize) {
    let taken: BTreeSet<Ipv4Addr> = snap
        .workloads
        .values()
        .filter_map(|w| w.value.address)
        .collect();
    let mut waiting: Vec<&Versioned<model::StoredWorkload>> = snap
        .workloads
        .values()
        .filter(|w| w.value.address.is_none())
        .map(|w| &**w)
        .collect();
    waiting.sort_by_key(|w| (w.created, w.value.kind(), w.value.name().to_string()));
    let mut free = range.workload_addresses().filter(|a| !taken.contains(a));
    let mut change = Change::default();
    let mut left = 0;
    for w in waiting {
        let Some(address) = free.next() else {
            left += 1;
            continue;
        };
        let mut new = w.value.clone();
        new.address = Some(address);
        let (kind, name) = (new.kind(), new.name().to_string());
        change.writes.push(Write {
            key: model::workload_key(kind, &name),
            expect: Expect::Rev(w.rev),
            value: Some(Item::Workload(new)),
        });
        change.drafts.push(Draft::normal(
            format!("{}/{name}", kind.path()),
            "AddressAssigned",
            format!(
                "{name} and {name}.bramble resolve to {address} in every container, on every node"
            ),
        ));
    }
    (change, left)
}

/// The routing table at `snap`: every workload with an address, its TCP ports and its
/// running instances, each marked ready when it runs and passes its readiness probe
/// (if it has one). An instance counts only while it should run and its node has a
/// mesh address to reach it at.
pub fn table(snap: &Snapshot, range: AddressRange) -> Table {
    let mut by_workload: BTreeMap<(Kind, &str), Vec<Backend>> = BTreeMap::new();
    for t in snap.tasks.values().map(|t| &t.value) {
        if t.desired != DesiredState::Running || t.phase != TaskPhase::Running {
            continue;
        }
        let Some(node) = t.node.as_deref() else {
            continue;
        };
        let mesh = snap.nodes.get(node).and_then(|n| n.value.info.mesh.clone());
        by_workload
            .entry((t.kind, t.workload.as_str()))
            .or_default()
            .push(Backend {
                task: t.id.clone(),
                node: node.to_string(),
                ready: mesh.is_some() && t.ready != Some(false),
                mesh,
            });
    }
    let endpoints = snap
        .workloads
        .values()
        .filter_map(|w| {
            let w = &w.value;
            let address = w.address?;
            let mut ports: Vec<u16> = w
                .manifest
                .spec
                .ports
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.container)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            Some(Endpoint {
                kind: w.kind(),
                name: w.name().to_string(),
                address,
                ports,
                backends: by_workload
                    .remove(&(w.kind(), w.name()))
                    .unwrap_or_default(),
            })
        })
        .collect::<Vec<_>>();
    // By kind then name, the order an agent that applies `Changes` keeps: the
    // snapshot's workloads are keyed so.
    debug_assert!(endpoints.is_sorted_by(|a, b| (a.kind, &a.name) < (b.kind, &b.name)));
    Table { range, endpoints }
}

/// Events for workloads (with ports) that lost their last Ready instance between
/// `before` and `after` (a warning: nothing answers at the address), or got one back.
pub fn transitions(before: &Table, after: &Table) -> Vec<Draft> {
    let ready = |t: &Table| -> BTreeMap<(Kind, String), usize> {
        t.endpoints
            .iter()
            .filter(|e| !e.ports.is_empty())
            .map(|e| ((e.kind, e.name.clone()), e.ready().count()))
            .collect()
    };
    let (was, now) = (ready(before), ready(after));
    let mut drafts = Vec::new();
    for ((kind, name), n) in &now {
        let Some(before) = was.get(&(*kind, name.clone())) else {
            continue;
        };
        let object = format!("{}/{name}", kind.path());
        if *before > 0 && *n == 0 {
            drafts.push(Draft::warning(
                object,
                "NoReadyEndpoint",
                format!("no Ready instance behind {name}: connections to it are refused until one is Ready"),
            ));
        } else if *before == 0 && *n > 0 {
            drafts.push(Draft::normal(
                object,
                "EndpointReady",
                format!("{name} has {n} Ready instance(s) again"),
            ));
        }
    }
    drafts
}

#[cfg(test)]
mod tests {
    use bramble_api::endpoints::DEFAULT_RANGE;
    use chrono::Utc;

    use super::*;
    use crate::core::model::{StoredNode, StoredWorkload};

    fn workload(kind: &str, name: &str, ports: &str) -> StoredWorkload {
        let yaml = format!(
            "apiVersion: bramble/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n  image: testimg\n{ports}"
        );
        let docs = bramble_api::parse::parse_manifests("t.yaml", &yaml)
            .expect("valid manifest")
            .workloads;
        StoredWorkload::new(docs[0].manifest.clone(), Utc::now())
    }

    fn put(snap: &mut Snapshot, w: StoredWorkload, created: u64) {
        let key = model::workload_key(w.kind(), w.name());
        snap.insert(&key, Item::Workload(w), created, created);
    }

    fn node(snap: &mut Snapshot, name: &str, mesh: Option<&str>) {
        let info = bramble_api::wire::NodeInfo {
            name: name.into(),
            arch: bramble_api::manifest::Arch::Arm64,
            cores: 4,
            memory_bytes: 1 << 30,
            docker_version: "24".into(),
            labels: Default::default(),
            agent_version: "0".into(),
            os: String::new(),
            machine_id: None,
            memory_limits: None,
            warnings: Vec::new(),
            mesh: mesh.map(str::to_string),
        };
        let n = StoredNode {
            info,
            cordoned: false,
            registered_at: Utc::now(),
            credential: None,
        };
        snap.insert(&model::node_key(name), Item::Node(n), 1, 1);
    }

    fn task(
        snap: &mut Snapshot,
        w: &StoredWorkload,
        replica: u32,
        node: &str,
        phase: TaskPhase,
        ready: Option<bool>,
    ) {
        let id = bramble_api::task::task_id(w.name(), &w.spec_hash, replica);
        let mut t = crate::core::reconcile::new_task(w, id, replica, Utc::now());
        t.node = Some(node.into());
        t.phase = phase;
        t.ready = ready;
        let id = t.id.clone();
        snap.insert(&model::task_key(&id), Item::Task(t), 5, 5);
    }

    fn addresses(snap: &Snapshot) -> BTreeMap<String, Option<Ipv4Addr>> {
        snap.workloads
            .values()
            .map(|w| (w.value.name().to_string(), w.value.address))
            .collect()
    }

    fn apply(snap: &mut Snapshot, change: &Change) {
        for w in &change.writes {
            if let Some(item) = w.value.clone() {
                snap.insert(&w.key, item, 1, 99);
            }
        }
    }

    #[test]
    fn addresses_go_lowest_first_oldest_first_and_are_never_moved() {
        let mut snap = Snapshot::default();
        put(&mut snap, workload("Service", "web", ""), 3);
        put(&mut snap, workload("Wallet", "coin", ""), 2);
        let (change, left) = allocate(&snap, DEFAULT_RANGE);
        assert_eq!(left, 0);
        assert_eq!(change.writes.len(), 2);
        assert!(change
            .writes
            .iter()
            .all(|w| matches!(w.expect, Expect::Rev(_))));
        apply(&mut snap, &change);
        let a = addresses(&snap);
        assert_eq!(a["coin"], Some(Ipv4Addr::new(169, 254, 100, 2)));
        assert_eq!(a["web"], Some(Ipv4Addr::new(169, 254, 100, 3)));
        // Nothing more to do: a second pass writes nothing.
        assert!(allocate(&snap, DEFAULT_RANGE).0.is_empty());

        // The first one deleted, a new one takes its address; the other keeps its own.
        snap.remove(&model::workload_key(Kind::Wallet, "coin"));
        put(&mut snap, workload("Job", "later", ""), 7);
        let (change, _) = allocate(&snap, DEFAULT_RANGE);
        apply(&mut snap, &change);
        let a = addresses(&snap);
        assert_eq!(a["later"], Some(Ipv4Addr::new(169, 254, 100, 2)));
        assert_eq!(a["web"], Some(Ipv4Addr::new(169, 254, 100, 3)));
    }

    #[test]
    fn an_update_keeps_the_address() {
        let mut w = workload("Service", "web", "");
        w.address = Some(Ipv4Addr::new(169, 254, 100, 9));
        let changed = workload("Service", "web", "  replicas: 3\n");
        let new = w
            .updated(changed.manifest, "other".into(), Utc::now())
            .expect("changed");
        assert_eq!(new.address, w.address);
    }

    #[test]
    fn a_full_range_leaves_the_rest_waiting_and_foreign_addresses_are_kept() {
        // Two workload addresses: .2 and .3.
        let tiny: AddressRange = "10.9.0.0/29".parse().expect("valid");
        let mut snap = Snapshot::default();
        let mut old = workload("Service", "old", "");
        old.address = Some(Ipv4Addr::new(169, 254, 100, 2));
        put(&mut snap, old, 1);
        put(&mut snap, workload("Service", "a", ""), 2);
        put(&mut snap, workload("Service", "b", ""), 3);
        put(&mut snap, workload("Service", "c", ""), 4);
        let (change, left) = allocate(&snap, tiny);
        assert_eq!((change.writes.len(), left), (2, 1));
        apply(&mut snap, &change);
        let a = addresses(&snap);
        assert_eq!(a["old"], Some(Ipv4Addr::new(169, 254, 100, 2)));
        assert_eq!(a["a"], Some(Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(a["b"], Some(Ipv4Addr::new(10, 9, 0, 3)));
        assert_eq!(a["c"], None);
    }

    #[test]
    fn the_table_lists_endpoints_by_kind_then_name_as_agents_keep_them() {
        let mut snap = Snapshot::default();
        // Stored in an order neither by kind nor by name (nor by their store keys).
        for (i, (kind, name, spec)) in [
            ("Wallet", "a", ""),
            ("CronJob", "b", "  schedule: \"0 * * * *\"\n"),
            ("Service", "zz", ""),
            ("Service", "b", ""),
        ]
        .into_iter()
        .enumerate()
        {
            let mut w = workload(kind, name, spec);
            w.address = Some(Ipv4Addr::new(169, 254, 100, 2 + i as u8));
            put(&mut snap, w, 1 + i as u64);
        }
        let t = table(&snap, DEFAULT_RANGE);
        let listed: Vec<(Kind, &str)> = t
            .endpoints
            .iter()
            .map(|e| (e.kind, e.name.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                (Kind::Service, "b"),
                (Kind::Service, "zz"),
                (Kind::Wallet, "a"),
                (Kind::CronJob, "b"),
            ]
        );
        // What an agent makes of the changes from an empty table is the same table.
        let mut applied = Table::default();
        applied.apply(Table::default().changes_to(&t));
        assert_eq!(applied, t);
    }

    #[test]
    fn the_table_lists_running_instances_ready_or_not() {
        let mut snap = Snapshot::default();
        node(&mut snap, "pi1", Some("10.0.0.1:7947"));
        node(&mut snap, "pi2", Some("10.0.0.2:7947"));
        node(&mut snap, "old", None);
        let ports = "  replicas: 4\n  ports:\n    - container: 80\n    - container: 53\n      protocol: udp\n    - container: 443\n";
        let mut web = workload("Service", "web", ports);
        web.address = Some(Ipv4Addr::new(169, 254, 100, 2));
        put(&mut snap, web.clone(), 1);
        let mut unaddressed = workload("Service", "new", "");
        unaddressed.address = None;
        put(&mut snap, unaddressed, 2);
        task(&mut snap, &web, 0, "pi1", TaskPhase::Running, None);
        task(&mut snap, &web, 1, "pi2", TaskPhase::Running, Some(false));
        task(&mut snap, &web, 2, "pi2", TaskPhase::Starting, None);
        task(&mut snap, &web, 3, "old", TaskPhase::Running, Some(true));
        let t = table(&snap, DEFAULT_RANGE);
        assert_eq!(
            t.endpoints.len(),
            1,
            "a workload without an address is not served yet"
        );
        let e = &t.endpoints[0];
        assert_eq!(e.ports, vec![80, 443], "UDP is not proxied");
        let seen: Vec<(&str, bool)> = e
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.ready))
            .collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.contains(&("pi1", true)));
        assert!(seen.contains(&("pi2", false)), "failing readiness");
        assert!(
            seen.contains(&("old", false)),
            "a node that serves no mesh port"
        );
        assert_eq!(e.ready().count(), 1);
        // A stopped (desired) instance is gone from the table.
        let id = e
            .backends
            .iter()
            .find(|b| b.node == "pi1")
            .map(|b| b.task.clone())
            .expect("pi1");
        let mut t0 = snap.task(&id).expect("task").value.clone();
        t0.desired = DesiredState::Stopped;
        snap.insert(&model::task_key(&id), Item::Task(t0), 5, 6);
        assert_eq!(table(&snap, DEFAULT_RANGE).endpoints[0].ready().count(), 0);
    }

    #[test]
    fn losing_the_last_ready_instance_is_a_warning_and_getting_one_back_is_noted() {
        let e = |ready: &[bool]| Endpoint {
            kind: Kind::Wallet,
            name: "coin".into(),
            address: Ipv4Addr::new(169, 254, 100, 2),
            ports: vec![9332],
            backends: ready
                .iter()
                .enumerate()
                .map(|(i, r)| Backend {
                    task: format!("t{i}"),
                    node: "pi1".into(),
                    mesh: None,
                    ready: *r,
                })
                .collect(),
        };
        let t = |ready: &[bool]| Table {
            range: DEFAULT_RANGE,
            endpoints: vec![e(ready)],
        };
        let d = transitions(&t(&[true]), &t(&[]));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, "NoReadyEndpoint");
        assert_eq!(d[0].object, "wallet/coin");
        let d = transitions(&t(&[false]), &t(&[true, false]));
        assert_eq!(d[0].reason, "EndpointReady");
        assert!(transitions(&t(&[true]), &t(&[true, true])).is_empty());
        assert!(transitions(&t(&[]), &t(&[])).is_empty());
        // New in the table: no event (it has never had one to lose).
        let empty = Table::default();
        assert!(transitions(&empty, &t(&[])).is_empty());
        // Without ports nothing is served: no event.
        let mut portless = t(&[true]);
        portless.endpoints[0].ports.clear();
        let mut gone = portless.clone();
        gone.endpoints[0].backends.clear();
        assert!(transitions(&portless, &gone).is_empty());
    }
}
