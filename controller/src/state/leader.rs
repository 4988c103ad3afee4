//! Who may run the loops (reconcile, scheduling, node health, cron, webhooks).
//!
//! The loops run only while [`Leadership::is_leader`], and every commit they make
//! carries [`Leadership::compares`], so a controller that has lost the lead cannot write
//! on its behalf even if it has not noticed yet. One controller alone on its own store
//! is always the leader ([`Solo`]).

use tokio::sync::watch;

use crate::store::Compare;

/// Who leads.
pub trait Leadership: Send + Sync + 'static {
    /// Whether this controller leads now.
    fn is_leader(&self) -> bool;
    /// Compares a leader's commit must carry (the election key still being ours).
    fn compares(&self) -> Vec<Compare>;
    /// Whether this controller leads, as it changes.
    fn watch(&self) -> watch::Receiver<bool>;
}

/// The only controller on its store: always the leader.
pub struct Solo {
    tx: watch::Sender<bool>,
}

impl Default for Solo {
    fn default() -> Self {
        Solo {
            tx: watch::channel(true).0,
        }
    }
}

impl Leadership for Solo {
    fn is_leader(&self) -> bool {
        true
    }

    fn compares(&self) -> Vec<Compare> {
        Vec::new()
    }

    fn watch(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}
