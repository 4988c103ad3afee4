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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::{assignment, Call, Fake};
    use std::time::Duration;

    /// A node with a running Wallet and a running Service; the sweeper watching it.
    struct Node {
        fake: Fake,
        wallet: String,
        service: String,
        desired: watch::Sender<Desired>,
        gate: Gate,
        sweeper: tokio::task::JoinHandle<()>,
    }

    impl Node {
        fn new() -> Node {
            let fake = Fake::new("pi-1");
            let wallet = fake.running(&assignment("ltc-0", Kind::Wallet));
            let service = fake.running(&assignment("web-0", Kind::Service));
            let (desired, rx) = watch::channel(Desired::default());
            let gate = Gate::default();
            let sweeper = tokio::spawn(enforce_fence(fake.clone(), rx, gate.clone()));
            Node {
                fake,
                wallet,
                service,
                desired,
                gate,
                sweeper,
            }
        }

        fn fence(&self, fenced: bool) {
            self.desired.send_modify(|d| d.fenced = fenced);
        }

        /// The containers stopped so far.
        fn terminated(&self) -> Vec<String> {
            self.fake
                .calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::Terminate(id, grace) if grace == fence::GRACE => Some(id),
                    _ => None,
                })
                .collect()
        }

        fn listings(&self) -> usize {
            self.fake
                .calls()
                .iter()
                .filter(|c| matches!(c, Call::ListKind(Kind::Wallet)))
                .count()
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.sweeper.abort();
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_stops_the_wallets_at_once_and_leaves_other_containers_alone() {
        let node = Node::new();
        tokio::time::sleep(RESYNC_INTERVAL * 3).await;
        assert_eq!(node.fake.calls(), [], "unfenced: the sweeper only waits");

        node.fence(true);
        tokio::time::sleep(ms(1)).await;
        assert_eq!(node.terminated(), [node.wallet.as_str()]);
        assert!(node.fake.has(&node.service));
        assert_eq!(node.fake.containers().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn while_docker_fails_the_sweeper_retries_every_check_interval() {
        let node = Node::new();
        node.fake.failing_lists(2);

        node.fence(true);
        tokio::time::sleep(fence::CHECK_EVERY + fence::CHECK_EVERY / 2).await;
        assert_eq!(node.listings(), 2, "two failed attempts so far");
        assert!(node.fake.has(&node.wallet));

        tokio::time::sleep(fence::CHECK_EVERY).await;
        assert_eq!(node.listings(), 3);
        assert_eq!(node.terminated(), [node.wallet.as_str()]);
    }

    #[tokio::test(start_paused = true)]
    async fn while_fenced_the_sweeper_looks_again_every_resync_interval() {
        let node = Node::new();
        node.fence(true);
        tokio::time::sleep(ms(1)).await;
        assert_eq!(node.terminated(), [node.wallet.as_str()]);

        // A wallet that appears anyway (started by hand, say) goes at the next look.
        let again = node.fake.running(&assignment("ltc-0", Kind::Wallet));
        tokio::time::sleep(RESYNC_INTERVAL - ms(10)).await;
        assert!(node.fake.has(&again));
        tokio::time::sleep(ms(20)).await;
        assert!(!node.fake.has(&again));
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_fence_is_lifted_the_sweeper_leaves_wallets_alone() {
        let node = Node::new();
        node.fence(true);
        tokio::time::sleep(ms(1)).await;
        node.fence(false);
        let again = node.fake.running(&assignment("ltc-0", Kind::Wallet));

        tokio::time::sleep(RESYNC_INTERVAL * 3).await;
        assert!(node.fake.has(&again));
        assert_eq!(node.listings(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_waits_for_a_wallet_start_under_way_and_then_stops_that_wallet() {
        let node = Node::new();
        let (_tx, latest) = watch::channel(Desired::default());
        let start = node.gate.admit(&latest).await.expect("unfenced: admitted");

        node.fence(true);
        tokio::time::sleep(RESYNC_INTERVAL).await;
        assert_eq!(node.listings(), 0, "the sweep waits at the gate");

        // The start completes (a second wallet container, say) and leaves the gate.
        let started = node.fake.running(&assignment("btc-0", Kind::Wallet));
        drop(start);
        tokio::time::sleep(ms(1)).await;
        let mut stopped = node.terminated();
        stopped.sort();
        let mut want = vec![node.wallet.clone(), started];
        want.sort();
        assert_eq!(stopped, want);
    }
}
