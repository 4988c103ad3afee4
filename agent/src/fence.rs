//! Fencing: a node that no controller vouches for stops its Wallets by itself, so that
//! a partition never yields two running copies of a wallet.
//!
//! The leader sends every agent a keep-alive (a WebSocket ping or, since it needs no
//! answer, an unsolicited pong) each heartbeat interval and says its fence timeout in
//! Welcome; followers send a Vouch on their standby links every heartbeat while they
//! may (see `link`). The links note every frame of the leader's link (text, ping or
//! pong) and every Vouch in a [`Contact`]; a watcher ([`watch()`]) looks at it every
//! [`CHECK_EVERY`] and, once nothing has arrived for the fence timeout, marks the node
//! fenced through a callback: the link passes one that sets the supervisor's
//! `Desired::fenced`, so this module knows nothing of the supervisor (which depends on
//! it, not the other way round). The supervisor then stops and removes every Wallet
//! container of the node (SIGTERM, [`GRACE`], SIGKILL) and starts none, even before the
//! controller ever sent a task set.
//!
//! The fence is lifted only by a task set (Assign) that arrives on a leader's session
//! welcomed after the node fenced: by then the leader has heard the agent's Hello, and
//! its task set is the truth (it may have placed the wallet elsewhere meanwhile). The
//! task set held from before the fence never brings a wallet back by itself, and a
//! vouch never lifts a fence.
//!
//! The timing argument that makes this safe is in the controller's `HealthConfig`: the
//! leader places a silent node's wallet elsewhere only `fence + fence_margin` after it
//! wrote its suspicion of the node, which stops every vouch within two heartbeats, and
//! the margin covers that, the link delay, [`CHECK_EVERY`] and the stop (about [`GRACE`]
//! plus the removal). Both sides measure on monotonic clocks. For the same reason the
//! agent uses the fence timeout exactly as the controller says it: raising it would
//! break the argument, lowering it only costs availability.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bramble_api::duration::Duration as ApiDuration;
use tracing::warn;

/// The fence timeout before the controller has said one (its default too).
pub const DEFAULT_FENCE: Duration = Duration::from_millis(1500);

/// How often the fence watcher looks at the clock (`g` in `HealthConfig`'s argument).
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How long a fenced wallet gets between SIGTERM and SIGKILL. Short on purpose: the
/// controller's margin assumes the stop ends within about 700 ms.
pub const GRACE: Duration = Duration::from_millis(500);

/// Whether a node that last heard the controller at `last_contact` is fenced at `now`.
pub fn fenced(last_contact: Instant, now: Instant, fence: Duration) -> bool {
    now.saturating_duration_since(last_contact) >= fence
}

/// The link's record of the controller: when it was last heard, the fence timeout, and
/// whether (and during which session) the node fenced. Pure: time is an argument.
///
/// Sessions are numbered when the controller welcomes them; number 0 is the time before
/// the first Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    last: Instant,
    fence: Duration,
    session: u64,
    /// The session that was current when the node fenced; None while not fenced.
    fenced_in: Option<u64>,
}

impl Contact {
    /// The clock at agent start: an agent that never reaches the controller fences too,
    /// [`DEFAULT_FENCE`] after `now`.
    pub fn new(now: Instant) -> Contact {
        Contact {
            last: now,
            fence: DEFAULT_FENCE,
            session: 0,
            fenced_in: None,
        }
    }

    /// A frame (any frame) arrived from the controller.
    pub fn heard(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    /// The controller welcomed a new session with this fence timeout. Returns the
    /// session's number.
    pub fn welcomed(&mut self, now: Instant, fence: Duration) -> u64 {
        self.heard(now);
        self.fence = fence;
        self.session += 1;
        self.session
    }

    /// How many sessions the controller has welcomed.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The fence timeout in force.
    pub fn fence(&self) -> Duration {
        self.fence
    }

    /// Whether the node is fenced.
    pub fn is_fenced(&self) -> bool {
        self.fenced_in.is_some()
    }

    /// How long the controller has been silent at `now`.
    pub fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last)
    }

    /// Looks at the clock; returns true when the node fences now (and was not fenced).
    pub fn check(&mut self, now: Instant) -> bool {
        if self.fenced_in.is_none() && fenced(self.last, now, self.fence) {
            self.fenced_in = Some(self.session);
            true
        } else {
            false
        }
    }

    /// A task set arrived on `session`; returns true when it lifts the fence, which only
    /// a session welcomed after the fence can do.
    pub fn assigned(&mut self, session: u64) -> bool {
        match self.fenced_in {
            Some(f) if session > f => {
                self.fenced_in = None;
                true
            }
            _ => false,
        }
    }

    /// Whether the leader's link `session`, whose last frame came at `last`, must hang
    /// up and dial again: its controller is silent for the fence timeout (whatever
    /// vouches came meanwhile on standby links), or the node fenced while the session
    /// was current (only a new session can lift it).
    pub fn must_redial(&self, session: u64, last: Instant, now: Instant) -> bool {
        fenced(last, now, self.fence) || self.fenced_in.is_some_and(|f| f >= session)
    }
}

/// A [`Contact`] shared by the link's session and the fence watcher.
pub type SharedContact = Arc<Mutex<Contact>>;

/// Locks a shared contact. Its updates are single assignments, so a panic elsewhere
/// cannot leave it half-updated: a poisoned lock is still usable.
pub fn lock(contact: &SharedContact) -> MutexGuard<'_, Contact> {
    contact.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current time as the fence clock counts it (tokio's clock, so tests can pause it).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Calls `on_fence` once the controller has been silent for the fence timeout (once per
/// fence: the next call needs a lift in between); checks every [`CHECK_EVERY`]. Runs
/// until aborted.
///
/// `on_fence` runs while the contact is locked, as the link lifts the fence, so the flag
/// it sets and the contact can never disagree (see `link`).
pub async fn watch(contact: SharedContact, mut on_fence: impl FnMut() + Send) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut c = lock(&contact);
        let now = now();
        if c.check(now) {
            on_fence();
            let fence = ApiDuration::from(c.fence());
            let silent_ms = u64::try_from(c.silence(now).as_millis()).unwrap_or(u64::MAX);
            drop(c);
            warn!(
                fence_ms = fence.as_millis(),
                silent_ms, "wallets fenced: no word from the controller for {fence}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn fences_after_the_timeout_of_silence() {
        let t0 = Instant::now();
        let fence = Duration::from_secs(2);
        assert!(!fenced(t0, t0, fence));
        assert!(!fenced(t0, at(t0, 1999), fence));
        assert!(fenced(t0, at(t0, 2000), fence));
        assert!(
            !fenced(at(t0, 10), t0, fence),
            "a contact after now is no silence"
        );
    }

    #[test]
    fn an_agent_that_never_reaches_the_controller_fences_after_the_default() {
        let t0 = Instant::now();
        let mut c = Contact::new(t0);
        let f = u64::try_from(DEFAULT_FENCE.as_millis()).expect("small");
        assert!(!c.check(at(t0, f - 1)));
        assert!(c.check(at(t0, f)));
        assert!(c.is_fenced());
        assert!(!c.check(at(t0, f + 1000)), "fencing is reported once");
    }

    #[test]
    fn any_frame_keeps_the_node_unfenced_and_welcome_sets_the_timeout() {
        let t0 = Instant::now();
        let mut c = Contact::new(t0);
        let s = c.welcomed(at(t0, 500), Duration::from_secs(1));
        for ms in (600..5000).step_by(500) {
            c.heard(at(t0, ms));
            assert!(!c.check(at(t0, ms + 999)), "{ms}");
            assert!(!c.must_redial(s, at(t0, ms), at(t0, ms + 999)));
        }
        // The last frame at 4600 ms; silence from then on.
        assert!(
            c.must_redial(s, at(t0, 4600), at(t0, 5600)),
            "the session hangs up"
        );
        assert!(c.check(at(t0, 5600)));
    }

    #[test]
    fn only_a_task_set_of_a_later_session_lifts_the_fence() {
        let t0 = Instant::now();
        let mut c = Contact::new(t0);
        let first = c.welcomed(t0, DEFAULT_FENCE);
        assert!(!c.assigned(first), "not fenced: nothing to lift");
        assert!(c.check(at(t0, 2000)));
        // A late frame and task set on the session that was current at the fence.
        c.heard(at(t0, 2050));
        assert!(!c.assigned(first));
        assert!(c.is_fenced());
        assert!(
            c.must_redial(first, at(t0, 2050), at(t0, 2060)),
            "that session must make way for a new one"
        );
        // Frames of a new session before its task set do not lift it either.
        let second = c.welcomed(at(t0, 2500), DEFAULT_FENCE);
        assert!(c.is_fenced());
        assert!(!c.must_redial(second, at(t0, 2500), at(t0, 2600)));
        assert!(c.assigned(second));
        assert!(!c.is_fenced());
        assert!(!c.assigned(second), "lifted once");
    }

    #[test]
    fn vouches_keep_the_node_unfenced_but_not_a_silent_leaders_link() {
        let t0 = Instant::now();
        let mut c = Contact::new(t0);
        let s = c.welcomed(t0, DEFAULT_FENCE);
        // The leader goes silent at 0; a follower vouches every 250 ms.
        for ms in (250..10_000).step_by(250) {
            c.heard(at(t0, ms));
            assert!(!c.check(at(t0, ms + 100)), "vouched at {ms}");
        }
        assert!(
            c.must_redial(s, t0, at(t0, 1500)),
            "the leader's link hangs up on its own silence"
        );
        // The vouches stop: the node fences a fence timeout after the last one.
        assert!(!c.check(at(t0, 9750 + 1499)));
        assert!(c.check(at(t0, 9750 + 1500)));
    }

    #[test]
    fn a_fence_before_any_welcome_is_lifted_by_the_first_session() {
        let t0 = Instant::now();
        let mut c = Contact::new(t0);
        assert!(c.check(at(t0, 5000)));
        let s = c.welcomed(at(t0, 6000), DEFAULT_FENCE);
        assert!(c.assigned(s));
    }
}
