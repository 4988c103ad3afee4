//! Keeps this controller's proof of a fresh view of the store (see
//! [`State::prove_fresh`]): every heartbeat, on every controller. A follower vouches
//! for the nodes on its standby links only while the proof is recent, so a controller
//! cut off from the store's quorum stops vouching within two heartbeats. Reads only:
//! nothing is written.

use std::sync::Arc;

use tokio::sync::watch;

use crate::core::health;
use crate::state::State;

/// Proves the view fresh every heartbeat until `stop`.
pub async fn run(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let cfg = *state.live.config();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match state.prove_fresh(health::vouch_window(&cfg)).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the view of the store is fresh again; vouching for nodes again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot prove the view of the store fresh; vouching for no node until it is");
            }
            Err(_) => {}
        }
    }
}
