//! The sync loop: every task of this node whose managed volumes sync, and whose
//! container runs, gets a round every `sync.every` (none while the node is fenced): its
//! `before` command in the container, then a push of each volume to each standby
//! ([`crate::sync`]), and the outcome recorded for the controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bramble_api::glob::Glob;
use bramble_api::manifest::VolumeSync;
use bramble_api::wire::{Assignment, SyncOutcome};
use chrono::Utc;
use tokio::sync::watch;

use crate::mesh::Mesh;
use crate::runtime::Runtime;
use crate::supervisor::Desired;
use crate::sync::{push, SyncError};
use crate::volumes::Store;

/// A `before` command taking longer has failed.
const BEFORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the syncs of this node's tasks until aborted: every task whose managed volumes
/// sync and whose container runs gets a round every `sync.every` (none while the node
/// is fenced).
pub struct Syncer {
    /// The node's volumes.
    pub store: Arc<Store>,
    /// The node's mesh identity.
    pub mesh: Arc<Mesh>,
    /// The engine (for `before` and to know the container runs).
    pub runtime: Runtime,
    /// Bytes a second per copy sent (0: no cap).
    pub rate: u64,
}

impl Syncer {
    /// The loop.
    pub async fn run(self, mut desired: watch::Receiver<Desired>) {
        let mut next: BTreeMap<String, Instant> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = desired.changed() => if r.is_err() { return },
            }
            let d = desired.borrow().clone();
            if d.fenced {
                continue;
            }
            let tasks: Vec<Assignment> = d
                .tasks
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.spec.sync.is_some() && !a.sync_to.is_empty())
                .collect();
            next.retain(|t, _| tasks.iter().any(|a| &a.task == t));
            for a in tasks {
                let Some(rule) = a.spec.sync.clone() else {
                    continue;
                };
                let now = Instant::now();
                if next.get(&a.task).is_some_and(|at| *at > now) {
                    continue;
                }
                let name = bramble_api::task::container_name(self.runtime.node(), &a.task);
                let running = matches!(self.runtime.inspect(&name).await, Ok(c) if c.state == crate::runtime::ContainerState::Running);
                if !running {
                    continue;
                }
                next.insert(a.task.clone(), now + rule.every.std());
                // The fence may have fallen while this looked: a fenced node sends nothing.
                if desired.borrow().fenced {
                    continue;
                }
                self.round(&a, &rule, &name).await;
            }
        }
    }

    async fn round(&self, a: &Assignment, rule: &VolumeSync, container: &str) {
        let started = Instant::now();
        let epoch = a.epoch.unwrap_or(0);
        let before_error = if rule.before.is_empty() {
            None
        } else {
            match tokio::time::timeout(BEFORE_TIMEOUT, self.runtime.exec(container, &rule.before))
                .await
            {
                Ok(Ok(0)) => None,
                Ok(Ok(code)) => Some(format!(
                    "the before command {:?} exited with {code}; no copy made this round",
                    rule.before
                )),
                Ok(Err(e)) => Some(format!(
                    "the before command {:?} could not run: {}; no copy made this round",
                    rule.before,
                    bramble_api::error_chain(&e)
                )),
                Err(_) => Some(format!(
                    "the before command {:?} took longer than {}; no copy made this round",
                    rule.before,
                    bramble_api::duration::Duration::from(BEFORE_TIMEOUT)
                )),
            }
        };
        let globs: Vec<Glob> = rule
            .exclude
            .iter()
            .filter_map(|g| Glob::new(g).ok())
            .collect();
        for v in a.spec.volumes.iter().filter_map(|v| v.managed()) {
            if let Some(e) = &before_error {
                tracing::warn!(task = %a.task, volume = v, error = %e, "sync skipped");
                self.store.record_sync(
                    v,
                    SyncOutcome {
                        at: Utc::now(),
                        done: Vec::new(),
                        sent_bytes: 0,
                        error: Some(e.clone()),
                    },
                );
                continue;
            }
            let root = self.store.volume_dir(v);
            let mut done = Vec::new();
            let mut sent = 0;
            let mut errors = Vec::new();
            let mut kept: BTreeSet<String> = BTreeSet::new();
            for peer in &a.sync_to {
                let mut tries = 0;
                let pushed = loop {
                    tries += 1;
                    let r = push(
                        &self.mesh,
                        &peer.mesh,
                        &peer.node,
                        (&a.workload, v, epoch),
                        &root,
                        &globs,
                        self.rate,
                    )
                    .await;
                    match r {
                        // A standby just named learns so from its own task set, which
                        // may reach it a moment after this node's.
                        Err(SyncError::Mesh(crate::mesh::MeshError::Refused { .. }))
                            if tries < 4 =>
                        {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        r => break r,
                    }
                };
                match pushed {
                    Ok(p) => {
                        sent += p.sent;
                        kept.extend(p.kept_old);
                        done.push(peer.node.clone());
                    }
                    Err(e) => errors.push(format!("{}: {e}", peer.node)),
                }
            }
            if !kept.is_empty() {
                errors.push(format!(
                    "changed at every reading, their previous copy kept: {}",
                    kept.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            let error = (!errors.is_empty()).then(|| errors.join("; "));
            tracing::info!(task = %a.task, volume = v, epoch, done = ?done, sent_bytes = sent, ms = started.elapsed().as_millis() as u64, error = error.as_deref().unwrap_or(""), "volume synced");
            self.store.record_sync(
                v,
                SyncOutcome {
                    at: Utc::now(),
                    done,
                    sent_bytes: sent,
                    error,
                },
            );
        }
    }
}
