//! The reconcile loop: node health events, then [`crate::core::reconcile`]'s task
//! writes, committed for the leader. It wakes on every store change, when a node comes
//! or goes, at the exact instant the next silent node crosses a health threshold, when a
//! backing-off task may be placed again, and at least every resync.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::endpoints::{Table, DEFAULT_RANGE as RANGE};

use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::reconcile::{self, NodeState};
use crate::core::{endpoints, health, Change};
use crate::state::{self, Outcome, Scope, State};

use super::Runner;

/// The endpoints table whose transitions were last announced, with its snapshot's
/// revision.
type Announced = Option<(u64, Arc<Table>)>;

/// Runs reconcile passes until `stop`.
pub async fn run(state: Arc<State>, resync: Duration, stop: watch::Receiver<bool>) {
    let runner = Runner {
        name: "reconcile",
        resync,
        leader_only: true,
    };
    let s = Arc::clone(&state);
    let last: Arc<Mutex<Announced>> = Arc::default();
    let settled: Arc<Mutex<Option<reconcile::Settled>>> = Arc::default();
    runner
        .run(state, stop, move || {
            let s = Arc::clone(&s);
            let last = Arc::clone(&last);
            let settled = Arc::clone(&settled);
            async move {
                let next = pass(&s, &settled).await?;
                addresses(&s, &last).await?;
                Ok::<_, state::Error>(next)
            }
        })
        .await;
}

/// Gives new workloads their addresses, and records a workload losing its last Ready
/// instance (or getting one back) since the previous pass of this leader. Nothing to
/// do for a snapshot it has seen (`last` holds its revision).
async fn addresses(state: &State, last: &Mutex<Announced>) -> Result<(), state::Error> {
    let snap = state.snapshot();
    let seen = last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|(rev, _)| *rev == snap.revision);
    if seen {
        return Ok(());
    }
    let (change, waiting) = endpoints::allocate(&snap, RANGE);
    if waiting > 0 {
        tracing::warn!(waiting, range = %RANGE, "the workload address range is full: some workloads get no address (and no name) until others are deleted");
    }
    if !change.is_empty() {
        // A conflict (an apply in between) is redone by the pass its commit wakes.
        state.commit(change, Scope::Leader).await?;
    }
    let table = state.routes(&snap).table;
    let before = last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace((snap.revision, Arc::clone(&table)))
        .map(|(_, t)| t);
    if let Some(before) = before {
        let drafts = endpoints::transitions(&before, &table);
        if !drafts.is_empty() {
            if let Err(e) = state.commit(Change::events(drafts), Scope::Leader).await {
                // Said again on the next pass (which the old revision lets run).
                *last.lock().unwrap_or_else(|p| p.into_inner()) = Some((0, before));
                return Err(e);
            }
        }
    }
    Ok(())
}

/// One pass; returns when the next one is due at the latest. `settled` remembers the
/// inputs of the last pass that changed nothing (see [`reconcile::settled`]).
pub async fn pass(
    state: &State,
    settled: &Mutex<Option<reconcile::Settled>>,
) -> Result<Option<Instant>, state::Error> {
    let mut again = suspect(state).await?;
    let snap = state.snapshot();
    let reports = state.live.volumes();
    let nodes: Vec<NodeState> = snap
        .nodes
        .values()
        .map(|n| {
            let name = n.value.info.name.as_str();
            NodeState {
                info: n.value.info.clone(),
                status: state.live.status(name),
                cordoned: n.value.cordoned,
                wallets_fenced: state
                    .live
                    .wallets_fenced(name, snap.suspects.contains_key(name)),
                volumes: reports.get(name).cloned().unwrap_or_default(),
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
    let mut memo = settled.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (changes, retry_at) = if reconcile::settled(memo.as_ref(), &snap, &nodes) {
        (Vec::new(), None)
    } else {
        memo = None;
        reconcile::change(&snap, &nodes, now)
    };
    if changes.is_empty() && retry_at.is_none() {
        *settled.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(memo.unwrap_or(reconcile::Settled {
                revision: snap.revision,
                nodes: nodes.clone(),
            }));
    }
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
        .next_change(nodes.iter().map(|n| {
            let name = n.info.name.as_str();
            (name, snap.suspects.contains_key(name))
        }))
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

/// Writes the leader's suspicions of silent nodes and clears those of nodes heard
/// again ([`health::suspicions`]); closes the links of nodes it has just suspected, so
/// that from then on only a vouch could keep their Wallets running, and no controller
/// gives one. Returns whether a race calls for another pass at once.
async fn suspect(state: &State) -> Result<bool, state::Error> {
    let snap = state.snapshot();
    let heard: Vec<health::Heard> = snap
        .nodes
        .keys()
        .map(|name| health::Heard {
            node: name.clone(),
            suspect: state.live.suspect(name),
            back: state.live.connection(name).is_some()
                && state.live.status(name) == bramble_api::rest::NodeStatus::Ready,
        })
        .collect();
    let (change, newly) =
        health::suspicions(&snap, &heard, state.id(), Utc::now(), state.live.config());
    if change.is_empty() {
        return Ok(false);
    }
    match state.commit(change, Scope::Leader).await? {
        Outcome::Committed(rev) => {
            for node in &newly {
                state.live.close_link(node);
                tracing::warn!(node = %node, revision = rev, "node suspected: silent, its link closed; its Wallets count as stopped once fence + margin has passed");
            }
            Ok(false)
        }
        Outcome::Conflict(_) => Ok(true),
    }
}
