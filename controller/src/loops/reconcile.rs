//! The reconcile loop: node health events, then [`crate::core::reconcile`]'s task
//! writes, committed for the leader. It wakes on every store change, when a node comes
//! or goes, at the exact instant the next silent node crosses a health threshold, when a
//! backing-off task may be placed again, and at least every resync.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::reconcile::{self, NodeState};
use crate::core::{health, Change};
use crate::state::{self, Outcome, Scope, State};

use super::Runner;

/// Runs reconcile passes until `stop`.
pub async fn run(state: Arc<State>, resync: Duration, stop: watch::Receiver<bool>) {
    let runner = Runner {
        name: "reconcile",
        resync,
        leader_only: true,
    };
    let s = Arc::clone(&state);
    runner
        .run(state, stop, move || {
            let s = Arc::clone(&s);
            async move { pass(&s).await }
        })
        .await;
}

/// One pass; returns when the next one is due at the latest.
pub async fn pass(state: &State) -> Result<Option<Instant>, state::Error> {
    let snap = state.snapshot();
    let nodes: Vec<NodeState> = snap
        .nodes
        .values()
        .map(|n| {
            let name = n.value.info.name.as_str();
            NodeState {
                info: n.value.info.clone(),
                status: state.live.status(name),
                cordoned: n.value.cordoned,
                wallets_fenced: state.live.wallets_fenced(name),
            }
        })
        .collect();

    let mut drafts = Vec::new();
    let mut noted = Vec::new();
    for n in &nodes {
        if let Some(prev) = state.live.note_status(&n.info.name, n.status) {
            noted.push((n.info.name.clone(), prev));
            drafts.extend(health::status_event(&n.info.name, prev, n.status));
        }
    }
    if let Err(e) = state.commit(Change::events(drafts), Scope::Leader).await {
        // Announce them again on the next pass.
        for (name, prev) in noted {
            state.live.restore_status(&name, prev);
        }
        return Err(e);
    }

    let now = Utc::now();
    let (changes, retry_at) = reconcile::change(&snap, &nodes, now);
    let mut again = false;
    for change in changes {
        let writes = change.writes.len();
        match state.commit(change, Scope::Leader).await? {
            Outcome::Committed(rev) => {
                tracing::debug!(writes, revision = rev, "reconciled");
            }
            // Another writer got there first; the snapshot's change wakes the next pass.
            Outcome::Conflict(_) => again = true,
        }
    }
    let mut next = state
        .live
        .next_change(nodes.iter().map(|n| n.info.name.as_str()))
        .map(Instant::from_std);
    if let Some(at) = retry_at.and_then(|at| (at - now).to_std().ok()) {
        let at = Instant::now() + at;
        next = Some(next.map_or(at, |n| n.min(at)));
    }
    if again {
        next = Some(Instant::now());
    }
    Ok(next)
}
