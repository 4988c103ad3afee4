//! Two controllers' reconcilers racing on one store: whatever the interleaving, no task
//! is lost and none is duplicated. Each state follows the store through its own watch,
//! as two controllers on one etcd would; both act as leaders at once (the worst case:
//! only compare-and-swap keeps them apart).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bramble_api::manifest::Kind;
use bramble_api::parse::parse_sources;
use bramble_api::rest::Source;
use bramble_api::task::DesiredState;
use bramble_controller::config::HealthConfig;
use bramble_controller::core::{ops, Change};
use bramble_controller::loops::reconcile;
use bramble_controller::state::vault::Vault;
use bramble_controller::state::{Scope, Solo, State};
use bramble_controller::store::{SqliteStore, Store};
use chrono::Utc;
use proptest::prelude::*;

#[path = "support/nodes.rs"]
mod nodes;

use nodes::node;

#[derive(Debug, Clone)]
struct Workload {
    kind: Kind,
    name: String,
    replicas: u32,
    image: u8,
}

fn manifest(w: &Workload) -> String {
    let replicas = if w.kind == Kind::Service {
        format!("  replicas: {}\n", w.replicas)
    } else {
        String::new()
    };
    format!(
        "apiVersion: bramble/v1\nkind: {}\nmetadata: {{name: {}}}\nspec:\n  image: img:{}\n  resources: {{cpu: 100m, memory: 16Mi}}\n{replicas}",
        w.kind, w.name, w.image
    )
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        prop_oneof![Just(Kind::Service), Just(Kind::Wallet)],
        0usize..4,
        0u32..4,
        0u8..2,
    )
        .prop_map(|(kind, n, replicas, image)| Workload {
            kind,
            // Names are unique across kinds.
            name: match kind {
                Kind::Service => format!("s{n}"),
                _ => format!("w{n}"),
            },
            replicas,
            image,
        })
}

/// What the operator does between reconcile rounds.
#[derive(Debug, Clone)]
enum Step {
    Apply(Vec<Workload>),
    Delete(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop::collection::vec(workload(), 1..4).prop_map(Step::Apply),
        1 => (0usize..4).prop_map(Step::Delete),
    ]
}

async fn apply(state: &State, ws: &[Workload]) {
    // One apply per kind and name: the last of a kind and name wins, as a user's file.
    let mut last: BTreeMap<(Kind, String), &Workload> = BTreeMap::new();
    for w in ws {
        last.insert((w.kind, w.name.clone()), w);
    }
    let sources: Vec<Source> = last
        .values()
        .map(|w| Source {
            name: format!("{}.yaml", w.name),
            content: manifest(w),
        })
        .collect();
    let docs = parse_sources(&sources).expect("valid manifests");
    state
        .update("apply", Scope::Any, |snap| {
            ops::apply(snap, &docs, &Vault::from_key(&[7; 32]), false, Utc::now())
        })
        .await
        .expect("apply");
}

async fn delete(state: &State, i: usize) {
    let snap = state.snapshot();
    let Some(((kind, name), _)) = snap.workloads.iter().nth(i) else {
        return;
    };
    let (kind, name) = (*kind, name.clone());
    let _ = state
        .update("delete", Scope::Any, |snap| {
            ops::delete_workload(snap, kind, &name)
        })
        .await;
}

/// Both reconcilers, interleaved, `rounds` times. Errors are part of the race (a lost
/// commit is redone on the next pass), never a loss.
async fn race(a: &State, b: &State, rounds: usize) {
    let (sa, sb) = (Default::default(), Default::default());
    for _ in 0..rounds {
        let (ra, rb) = tokio::join!(reconcile::pass(a, &sa), reconcile::pass(b, &sb));
        let _ = (ra, rb);
    }
}

/// The agents' side of a stopped task: its container is gone, so its record goes.
async fn confirm_removals(state: &State) {
    let snap = state.snapshot();
    for t in snap.tasks.values() {
        let v = &t.value;
        if v.desired == DesiredState::Stopped {
            if let Some(node) = v.node.clone() {
                let id = v.id.clone();
                state
                    .update("removed", Scope::Any, |snap| {
                        Ok((ops::task_removed(snap, &node, &id).unwrap_or_default(), ()))
                    })
                    .await
                    .expect("removal recorded");
            }
        }
    }
}

fn check(state: &State) -> Result<(), TestCaseError> {
    let snap = state.snapshot();
    let mut by_replica: BTreeMap<(Kind, String, u32), Vec<String>> = BTreeMap::new();
    let mut per_node_cpu: BTreeMap<String, u64> = BTreeMap::new();
    for t in snap.tasks.values() {
        let v = &t.value;
        if v.desired == DesiredState::Running {
            by_replica
                .entry((v.kind, v.workload.clone(), v.replica))
                .or_default()
                .push(v.id.clone());
            let node = v.node.clone();
            prop_assert!(node.is_some(), "a running task without a node: {v:?}");
            *per_node_cpu.entry(node.unwrap_or_default()).or_default() +=
                v.spec.resources.cpu.map_or(0, |c| c.millis());
        }
        prop_assert!(
            snap.workload(v.kind, &v.workload).is_some() || v.desired == DesiredState::Stopped,
            "a live task of a deleted workload: {v:?}"
        );
    }
    for (key, ids) in &by_replica {
        prop_assert_eq!(ids.len(), 1, "replica {:?} runs twice: {:?}", key, ids);
    }
    for w in snap.workloads.values() {
        let w = &w.value;
        let running: BTreeSet<u32> = by_replica
            .keys()
            .filter(|(k, n, _)| *k == w.kind() && n == w.name())
            .map(|(_, _, r)| *r)
            .collect();
        let want: BTreeSet<u32> = (0..w.manifest.replicas()).collect();
        prop_assert_eq!(running, want, "workload {} lost or gained tasks", w.name());
        if w.kind() == Kind::Wallet {
            let alive = snap
                .tasks_of(Kind::Wallet, w.name())
                .filter(|t| t.value.desired != DesiredState::Stopped)
                .count();
            prop_assert_eq!(alive, 1, "wallet {} is not exactly one", w.name());
        }
    }
    for (node, cpu) in per_node_cpu {
        prop_assert!(cpu <= 4000, "node {node} overcommitted: {cpu}m");
    }
    Ok(())
}

async fn scenario(steps: Vec<Step>, interleave: usize) -> Result<(), TestCaseError> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("store"));
    let open = || {
        State::open(
            Arc::clone(&store),
            HealthConfig::default(),
            Arc::new(Solo::default()),
        )
    };
    let a = open().await.expect("first controller");
    let b = open().await.expect("second controller");
    for name in ["n1", "n2", "n3"] {
        let info = node(name);
        a.update("register", Scope::Any, |snap| {
            Ok((
                ops::register_node(
                    snap,
                    &info,
                    Some(&format!("credential-of-{name}")),
                    &ops::Admission::Join,
                    Utc::now(),
                )?
                .unwrap_or_default(),
                (),
            ))
        })
        .await
        .expect("node registered");
        a.live.seen(name, None);
        b.live.seen(name, None);
    }
    for s in steps {
        match s {
            Step::Apply(ws) => apply(&a, &ws).await,
            Step::Delete(i) => delete(&b, i).await,
        }
        race(&a, &b, interleave).await;
        confirm_removals(&a).await;
    }
    // Settle: both reconcile until nothing changes, the agents confirming removals.
    for _ in 0..20 {
        race(&a, &b, 1).await;
        confirm_removals(&b).await;
        let before = a.snapshot().revision;
        race(&a, &b, 1).await;
        b.catch_up(a.snapshot().revision).await;
        a.catch_up(b.snapshot().revision).await;
        if a.snapshot().revision == before {
            break;
        }
    }
    check(&a)?;
    check(&b)?;
    prop_assert_eq!(a.snapshot().revision, b.snapshot().revision);
    // An empty change is no write: the settled cluster stays settled.
    let writes = store.write_count();
    race(&a, &b, 2).await;
    prop_assert_eq!(
        store.write_count(),
        writes,
        "a settled cluster writes nothing"
    );
    let _ = a.commit(Change::default(), Scope::Any).await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn two_reconcilers_racing_lose_no_task_and_duplicate_none(
        steps in prop::collection::vec(step(), 1..6),
        interleave in 1usize..3,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(scenario(steps, interleave))?;
    }
}
