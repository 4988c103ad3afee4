//! The loops that act on the cluster: one [`Runner`] drives each store-driven loop with
//! the same rules (kube-runtime's): run on every change of the snapshot, on every
//! wake-up, at the instant the pass asks for and at least every `resync`; a failed pass
//! is logged and retried with jittered, capped back-off and never ends the loop; a
//! leader-only loop runs only while this controller leads.
//!
//! # Layout
//! - [`reconcile`]: workloads into tasks, tasks onto nodes, node health.
//! - [`cron`]: CronJob firings, retries and history.
//! - [`feed`]: the dashboard's live stream publisher, and its views ([`cards`]).
//! - [`webhooks`]: event notifications.
//! - [`vouch`]: the proof of a fresh view of the store that followers vouch with.

pub mod cards;
pub mod cron;
pub mod feed;
pub mod reconcile;
pub mod vouch;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bramble_api::backoff::{Backoff, Retry};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::state::State;

/// The back-off of a failed pass: 100 ms, doubling, at most 5 s, with jitter.
pub const PASS_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// How one loop runs.
#[derive(Debug, Clone, Copy)]
pub struct Runner {
    /// Its name, in logs.
    pub name: &'static str,
    /// A pass at least this often, whatever happens (the safety net for a missed change).
    pub resync: Duration,
    /// Only while this controller leads.
    pub leader_only: bool,
}

impl Runner {
    /// Runs `pass` until `stop` changes. A pass returns when it wants to run again at
    /// the latest (besides the resync), or an error to retry after.
    pub async fn run<F, Fut, E>(
        self,
        state: Arc<State>,
        mut stop: watch::Receiver<bool>,
        mut pass: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<Instant>, E>>,
        E: std::fmt::Display,
    {
        let mut world = state.subscribe();
        let mut wake = state.wake_signal();
        let mut leader = state.leading();
        let mut retry = Retry::new(PASS_RETRY);
        loop {
            if self.leader_only && !*leader.borrow_and_update() {
                tokio::select! {
                    _ = leader.changed() => continue,
                    _ = stop.changed() => return,
                }
            }
            // Mark what this pass will see as seen, so only later changes wake it again.
            world.borrow_and_update();
            wake.borrow_and_update();
            let next = match pass().await {
                Ok(next) => {
                    retry.succeeded();
                    next
                }
                Err(e) => {
                    let wait = retry.failed_jittered(0.2, rand::random::<f64>());
                    tracing::warn!(r#loop = self.name, error = %e, retry_in = ?wait, "pass failed");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            let mut deadline = Instant::now() + self.resync;
            if let Some(at) = next {
                deadline = deadline.min(at);
            }
            tokio::select! {
                _ = world.changed() => {}
                _ = wake.changed() => {}
                _ = leader.changed() => {}
                () = tokio::time::sleep_until(deadline) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
