//! Grouped commits (`State::update_grouped`, what agents' task reports go through):
//! decisions queued together are written in few transactions, and none is lost or
//! applied on a value another decision of its group changed.

use std::sync::Arc;

use bramble_api::parse::parse_manifests;
use bramble_api::task::TaskPhase;
use bramble_api::wire::TaskStatus;
use bramble_controller::config::HealthConfig;
use bramble_controller::core::model::StoredWorkload;
use bramble_controller::core::ops::{self, Admission};
use bramble_controller::core::snapshot::Write;
use bramble_controller::core::{reconcile, Change};
use bramble_controller::state::{Scope, Solo, State};
use bramble_controller::store::{SqliteStore, Store};
use chrono::Utc;
use futures_util::future::join_all;

#[path = "support/nodes.rs"]
mod nodes;

use nodes::node;

/// A state on a fresh store with node pi1 and `n` tasks scheduled on it.
async fn cluster(n: usize) -> (Arc<State>, Arc<SqliteStore>) {
    let store = Arc::new(SqliteStore::open_in_memory().expect("store"));
    let state = State::open(
        store.clone(),
        HealthConfig::default(),
        Arc::new(Solo::default()),
    )
    .await
    .expect("state");
    let yaml = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec: {image: a}\n";
    let docs = parse_manifests("w.yaml", yaml).expect("valid").workloads;
    let w = StoredWorkload::new(docs[0].manifest.clone(), Utc::now());
    state
        .update("node", Scope::Any, |snap| {
            let c =
                ops::register_node(snap, &node("pi1"), Some("h"), &Admission::Join, Utc::now())?;
            Ok((c.unwrap_or_default(), ()))
        })
        .await
        .expect("node");
    let ids: Vec<String> = (0..n).map(|i| format!("web-abc-{i}")).collect();
    for chunk in ids.chunks(50) {
        state
            .update("tasks", Scope::Any, |_| {
                let writes = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let mut t = reconcile::new_task(&w, id.clone(), i as u32, Utc::now());
                        t.node = Some("pi1".into());
                        t.phase = TaskPhase::Scheduled;
                        Write::task(t, 0)
                    })
                    .collect();
                Ok((Change::new(writes, Vec::new()), ()))
            })
            .await
            .expect("tasks");
    }
    (state, store)
}

fn running(task: &str) -> TaskStatus {
    TaskStatus {
        task: task.into(),
        phase: TaskPhase::Running,
        exit_code: None,
        message: None,
        container_id: Some(format!("c-{task}")),
        restarts: 0,
        ready: None,
        started_at: Some(Utc::now()),
        finished_at: None,
        gave_up: false,
        output: None,
        reason: None,
        restart_at: None,
    }
}

#[tokio::test]
async fn reports_queued_together_are_written_in_few_transactions_and_all_land() {
    let (state, store) = cluster(200).await;
    let before = store.revision().await.expect("revision");
    // All 200 queued before the committer runs: one thread, join_all sends each in
    // turn, and unconstrained so that tokio's cooperative budget (128 per poll) does
    // not hand the thread to the committer halfway through.
    let answers = tokio::task::unconstrained(join_all((0..200).map(|i| {
        let id = format!("web-abc-{i}");
        state.update_grouped(move |snap| {
            ops::task_status(snap, "pi1", &running(&id), Utc::now()).unwrap_or_default()
        })
    })))
    .await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let after = store.revision().await.expect("revision");
    // 96 task writes per transaction at most: 96 + 96 + 8.
    assert_eq!(after - before, 3, "transactions for 200 reports");
    let snap = state.snapshot();
    for i in 0..200 {
        let t = &snap.task(&format!("web-abc-{i}")).expect("task").value;
        assert_eq!(t.phase, TaskPhase::Running, "{}", t.id);
        assert_eq!(
            t.container_id.as_deref(),
            Some(format!("c-{}", t.id).as_str())
        );
    }
    // Every report's event is stored too.
    let started = snap
        .events
        .values()
        .flat_map(|e| e.events.iter())
        .filter(|e| e.object.starts_with("task/web-abc-"))
        .count();
    assert!(
        started >= 200,
        "{started} events for 200 tasks going Running"
    );
}

#[tokio::test]
async fn decisions_on_one_key_are_applied_one_after_another_never_on_a_stale_value() {
    let (state, store) = cluster(1).await;
    let before = store.revision().await.expect("revision");
    // Ten decisions that each add one restart to what they read: grouped blindly, they
    // would all read 0 and the task would end with 1.
    let answers = join_all((0..10).map(|_| {
        state.update_grouped(|snap| {
            let Some(cur) = snap.task("web-abc-0") else {
                return Change::default();
            };
            let mut next = cur.value.clone();
            next.restarts += 1;
            Change::new(vec![Write::task(next, cur.rev)], Vec::new())
        })
    }))
    .await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let snap = state.snapshot();
    assert_eq!(snap.task("web-abc-0").expect("task").value.restarts, 10);
    let after = store.revision().await.expect("revision");
    assert_eq!(after - before, 10, "one transaction each");
}

#[tokio::test]
async fn a_grouped_decision_on_a_task_that_is_gone_writes_nothing() {
    let (state, store) = cluster(1).await;
    let before = store.revision().await.expect("revision");
    state
        .update_grouped(|snap| {
            ops::task_status(snap, "pi1", &running("no-such-task"), Utc::now()).unwrap_or_default()
        })
        .await
        .expect("answered");
    assert_eq!(store.revision().await.expect("revision"), before);
}
