//! The fence's side of the supervisor: while the node is fenced, its Wallets are stopped
//! and removed, and no Wallet start slips past the fence.
//!
//! [`enforce_fence`] runs beside the converge loop (see `shell`), which may be busy for
//! minutes (an image pull, a slow stop): the fence must not wait for it, and must hold
//! before the first task set too. The converge loop still starts Wallets, but only
//! through the [`Gate`], which the sweep also holds: a start that raced a fence has
//! finished before the sweep looks, and a start planned before a fence (or before a
//! newer task set) does not happen.

use std::sync::Arc;

use bramble_api::manifest::Kind;
use tokio::sync::{watch, Mutex, MutexGuard};
use tracing::warn;

use super::{Desired, RESYNC_INTERVAL};
use crate::fence;
use crate::runtime::{self, error_chain, Engine};

/// Held while a Wallet is created or started, and while the sweeper stops Wallets.
#[derive(Debug, Clone, Default)]
pub(super) struct Gate(Arc<Mutex<()>>);

impl Gate {
    /// Waits for the gate; then lets a Wallet start that was planned earlier through
    /// unless it is barred now (see [`wallets_barred`]). The guard is held until the
    /// start is done; None means: skip the start, the next round plans again.
    pub(super) async fn admit(
        &self,
        latest: &watch::Receiver<Desired>,
    ) -> Option<MutexGuard<'_, ()>> {
        let guard = self.0.lock().await;
        (!wallets_barred(latest)).then_some(guard)
    }

    /// Waits for the gate and holds it, for a sweep: no Wallet start is under way then.
    pub(super) async fn hold(&self) -> MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// Whether a Wallet start planned earlier must not happen now: the node is fenced, or a
/// newer desired state (a fence, or a task set) arrived since the plan; the next round
/// plans again with it.
fn wallets_barred(latest: &watch::Receiver<Desired>) -> bool {
    latest.borrow().fenced || latest.has_changed().unwrap_or(false)
}

/// Keeps the node's Wallets stopped while it is fenced, with or without a task set: stops
/// them as soon as the fence falls, retries every [`fence::CHECK_EVERY`] while Docker
/// fails, and looks again every [`RESYNC_INTERVAL`] as a safety net. Runs beside the
/// converge loop, which may be busy (an image pull, a slow stop), until aborted.
pub(super) async fn enforce_fence<R: Engine>(
    runtime: R,
    mut desired: watch::Receiver<Desired>,
    gate: Gate,
) {
    loop {
        let closed = desired.wait_for(|d| d.fenced).await.is_err();
        if closed {
            return;
        }
        let swept = {
            let _gate = gate.hold().await;
            stop_wallets(&runtime).await
        };
        let again = match swept {
            Ok(()) => RESYNC_INTERVAL,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot stop the node's wallets while fenced; retrying");
                fence::CHECK_EVERY
            }
        };
        let lifted = async { desired.wait_for(|d| !d.fenced).await.is_err() };
        tokio::select! {
            closed = lifted => if closed { return },
            () = tokio::time::sleep(again) => {}
        }
    }
}

/// Stops and removes every Wallet container of the node, all at once (the timing
/// argument allows one grace period, not one per wallet).
async fn stop_wallets<R: Engine>(runtime: &R) -> runtime::Result<()> {
    let wallets = runtime.list_kind(Kind::Wallet).await?;
    let stops = wallets.iter().map(|w| async move {
        let r = runtime.terminate(&w.id, fence::GRACE).await;
        if r.is_ok() {
            warn!(task = %w.task, container = %w.id, "wallet stopped and removed: the node is fenced");
        }
        r
    });
    futures_util::future::join_all(stops)
        .await
        .into_iter()
        .collect()
}
