//! The cron loop around [`crate::core::cron`]: fires CronJob slots exactly once,
//! records missed and skipped ones, retries failed runs of Jobs and CronJobs, prunes run
//! history, each job's decisions committed for the leader in one transaction (the
//! firing record created only if absent: see the core module for the argument).
//!
//! It wakes at every slot (to the millisecond), on every change, and at least every
//! second: a clock may jump.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::cron;
use crate::state::{self, Outcome, Scope, State};

use super::Runner;

/// Runs cron passes until `stop`.
pub async fn run(state: Arc<State>, stop: watch::Receiver<bool>) {
    let runner = Runner {
        name: "cron",
        resync: Duration::from_secs(1),
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

/// One pass; returns when the next slot or retry is due.
pub async fn pass(state: &State) -> Result<Option<Instant>, state::Error> {
    let snap = state.snapshot();
    let now = Utc::now();
    let (changes, next) = cron::pass(&snap, now);
    let mut again = false;
    for change in changes {
        if let Outcome::Conflict(_) = state.commit(change, Scope::Leader).await? {
            // Another controller (or a concurrent pass) decided first; decide again on
            // what it wrote.
            tracing::debug!("cron decision raced another writer");
            again = true;
        }
    }
    if again {
        return Ok(Some(Instant::now() + Duration::from_millis(10)));
    }
    Ok(next.map(|n| {
        let wait = (n - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Instant::now() + wait.max(Duration::from_millis(1))
    }))
}
