//! Who may run the loops (reconcile, scheduling, node health, cron, webhooks).
//!
//! The loops run only while [`Leadership::is_leader`], and every commit they make
//! carries [`Leadership::compares`], so a controller that has lost the lead cannot write
//! on its behalf even if it has not noticed yet. One controller alone on its own store
//! is always the leader ([`Solo`]); controllers sharing an etcd elect one ([`Elected`]).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bramble_api::backoff::{Backoff, Retry};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{self, Compare, Op, Store, Txn};

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

/// The key whose holder leads: created with the holder's lease, so it disappears when
/// the lease ends. Its create revision is the leader's term: commits made for the
/// leader compare it, so a controller that lost the key cannot write as leader.
pub const LEADER_KEY: &str = "/leader";

/// Where each controller sharing the store says it is alive: `/controllers/<id>`, on
/// its own lease (renewing a lease writes nothing, so this costs no write at rest).
pub const MEMBERS: &str = "/controllers/";

/// What the leader key says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderRecord {
    /// The controller's id (random per process).
    pub id: String,
    /// Its name (host name or `--name`).
    pub name: String,
    /// The URL agents and `bramblectl` reach it at, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When it took the lead.
    pub since: DateTime<Utc>,
}

/// Timings of the election; see [`Timing::validity`] for how they relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The lease's TTL: a dead leader is replaced about this long after its last
    /// renewal (etcd grants at least 2 s).
    pub lease: Duration,
    /// How often the leader renews.
    pub renew: Duration,
    /// How long before the lease can have expired the leader stops acting.
    pub margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing::for_lease(Duration::from_secs(6))
    }
}

impl Timing {
    /// The timings for a lease: renewals every sixth of it, a margin of a third.
    pub fn for_lease(lease: Duration) -> Timing {
        Timing {
            lease,
            renew: lease / 6,
            margin: lease / 3,
        }
    }

    /// Checks the timings against each other, in terms of their flags.
    pub fn check(&self) -> Result<(), String> {
        if self.lease < Duration::from_secs(2) {
            return Err("--leader-lease must be at least 2s (etcd's shortest lease)".into());
        }
        if self.margin.is_zero() || self.margin >= self.lease {
            return Err(
                "the leader's safety margin must be above 0 and below --leader-lease".into(),
            );
        }
        if self.renew.is_zero() || self.renew + self.renew >= self.lease - self.margin {
            return Err(format!(
                "the leader renews every {:?}: at least two renewals must fit in --leader-lease minus the {:?} margin",
                self.renew, self.margin
            ));
        }
        Ok(())
    }

    /// Until when a leader may act after a renewal sent at `sent` that the store
    /// answered with `ttl`.
    ///
    /// The store ends a lease no earlier than `ttl` after it received the renewal,
    /// which is after `sent`; so the lease lives at least until `sent + ttl` on any
    /// clock that runs at the rate of ours. The leader stops `margin` before that:
    /// the margin covers the time its loops need to notice and a monotonic clock
    /// running slow. A new leader can only create the key once the lease has ended,
    /// so two leaders never act at once. (A renewal the store never answered proves
    /// nothing and extends nothing.)
    pub fn validity(&self, sent: Instant, ttl: Duration) -> Instant {
        sent + ttl.saturating_sub(self.margin)
    }
}

/// Leadership won through the store: a key created only if absent, attached to this
/// controller's lease ([`LEADER_KEY`]).
pub struct Elected {
    tx: watch::Sender<bool>,
    term: AtomicU64,
    /// The lease of the term this controller holds (0: none), revoked when it stops so
    /// the next leader need not wait the lease out.
    lease: AtomicI64,
}

impl Leadership for Elected {
    fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    fn compares(&self) -> Vec<Compare> {
        vec![Compare::CreateRevision {
            key: LEADER_KEY.to_string(),
            rev: self.term.load(Ordering::SeqCst),
        }]
    }

    fn watch(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// How campaigns retry after the store failed.
const CAMPAIGN_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));

impl Elected {
    /// Starts campaigning for `me` on `store` until `stop` changes; the returned
    /// leadership follows the outcome.
    pub fn start(
        store: Arc<dyn Store>,
        me: LeaderRecord,
        timing: Timing,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Elected>, tokio::task::JoinHandle<()>) {
        let elected = Arc::new(Elected {
            tx: watch::channel(false).0,
            // 0 compares as "absent": a commit made before any win fails if anyone leads.
            term: AtomicU64::new(0),
            lease: AtomicI64::new(0),
        });
        tokio::spawn(presence(
            Arc::clone(&store),
            me.clone(),
            timing,
            stop.clone(),
        ));
        let task = tokio::spawn(campaign(Arc::clone(&elected), store, me, timing, stop));
        (elected, task)
    }

    fn lead(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    fn follow(&self) {
        self.tx.send_replace(false);
        self.term.store(0, Ordering::SeqCst);
    }
}

/// The leader record in the store, if any.
pub async fn current(store: &dyn Store) -> Result<Option<(LeaderRecord, u64)>, store::Error> {
    let (kv, _) = store.get(LEADER_KEY).await?;
    Ok(kv.and_then(|kv| {
        serde_json::from_slice::<LeaderRecord>(&kv.value)
            .ok()
            .map(|r| (r, kv.create_revision))
    }))
}

/// Every controller whose presence lives in the store, by id.
pub async fn members(store: &dyn Store) -> Result<Vec<LeaderRecord>, store::Error> {
    Ok(store
        .list(MEMBERS)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<LeaderRecord>(&kv.value).ok())
        .collect())
}

/// Keeps `/controllers/<id>` alive on its own lease while the controller runs, and
/// puts it back if the lease ended (the store was out of reach too long).
async fn presence(
    store: Arc<dyn Store>,
    me: LeaderRecord,
    timing: Timing,
    mut stop: watch::Receiver<bool>,
) {
    let key = format!("{MEMBERS}{}", me.id);
    let value = serde_json::to_vec(&me).unwrap_or_default();
    let mut retry = Retry::new(CAMPAIGN_RETRY);
    let mut lease: Option<store::LeaseId> = None;
    loop {
        let step = async {
            match lease {
                Some(id) => match store.keep_alive(id).await {
                    Ok(_) => Ok(timing.renew),
                    Err(store::Error::LeaseNotFound(_)) => {
                        lease = None;
                        Ok(Duration::ZERO)
                    }
                    Err(e) => Err(e),
                },
                None => {
                    let l = store.grant(timing.lease).await?;
                    store
                        .txn(Txn {
                            compares: vec![],
                            ops: vec![Op::Put {
                                key: key.clone(),
                                value: value.clone(),
                                lease: l.id,
                            }],
                        })
                        .await?;
                    lease = Some(l.id);
                    Ok(timing.renew)
                }
            }
        };
        let wait = tokio::select! {
            r = step => match r {
                Ok(w) => {
                    retry.succeeded();
                    w
                }
                Err(e) => {
                    let w = retry.failed();
                    tracing::debug!(error = %e, retry_in = ?w, "controller presence: store failed");
                    w
                }
            },
            _ = stop.changed() => break,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    // Leaving: others see it gone at once rather than a lease later.
    if let Some(id) = lease {
        let _ = tokio::time::timeout(timing.renew, store.revoke(id)).await;
    }
}

async fn campaign(
    me_elected: Arc<Elected>,
    store: Arc<dyn Store>,
    me: LeaderRecord,
    timing: Timing,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Retry::new(CAMPAIGN_RETRY);
    loop {
        let outcome = tokio::select! {
            r = term(&me_elected, store.as_ref(), &me, timing) => r,
            _ = stop.changed() => {
                me_elected.follow();
                // A controller shut down hands the lead over at once.
                let lease = me_elected.lease.swap(0, Ordering::SeqCst);
                if lease != 0 {
                    let _ = tokio::time::timeout(timing.renew, store.revoke(lease)).await;
                }
                return;
            }
        };
        me_elected.follow();
        match outcome {
            Ok(()) => retry.succeeded(),
            Err(e) => {
                let wait = retry.failed();
                tracing::warn!(error = %e, retry_in = ?wait, "leader election: store failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// One term: wait until the key is free, take it, lead while renewals hold, and give
/// it back. Returns when this controller no longer leads (or never did and the key
/// is to be tried again).
async fn term(
    elected: &Elected,
    store: &dyn Store,
    me: &LeaderRecord,
    timing: Timing,
) -> Result<(), store::Error> {
    // Wait for a free key: watch it from the revision it was read at, so a deletion
    // between the read and the watch is not missed.
    let (kv, rev) = store.get(LEADER_KEY).await?;
    if kv.is_some() {
        let mut w = store.watch(LEADER_KEY, rev + 1).await?;
        loop {
            match w.next().await {
                Some(Ok(b)) => {
                    if b.events
                        .iter()
                        .any(|e| e.kv.key == LEADER_KEY && e.kind == store::EventKind::Delete)
                    {
                        break;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    }
    let sent = Instant::now();
    let lease = store.grant(timing.lease).await?;
    let record = LeaderRecord {
        since: Utc::now(),
        ..me.clone()
    };
    let value = serde_json::to_vec(&record).unwrap_or_default();
    let won = store
        .txn(Txn {
            compares: vec![Compare::CreateRevision {
                key: LEADER_KEY.to_string(),
                rev: 0,
            }],
            ops: vec![Op::Put {
                key: LEADER_KEY.to_string(),
                value,
                lease: lease.id,
            }],
        })
        .await;
    let won = match won {
        Ok(r) => r,
        Err(e) => {
            let _ = store.revoke(lease.id).await;
            return Err(e);
        }
    };
    if !won.succeeded {
        // Someone else was faster; their key is watched on the next round.
        let _ = store.revoke(lease.id).await;
        return Ok(());
    }
    let mut valid_until = timing.validity(sent, lease.ttl);
    elected.lease.store(lease.id, Ordering::SeqCst);
    elected.lead(won.revision);
    tracing::info!(
        term = won.revision,
        lease = lease.ttl.as_secs(),
        "this controller leads"
    );
    let mut next_renewal = Instant::now() + timing.renew;
    let reason = loop {
        let deadline = valid_until.min(next_renewal);
        tokio::time::sleep_until(deadline.into()).await;
        if Instant::now() >= valid_until {
            break "no renewal in time";
        }
        let sent = Instant::now();
        // A renewal that outlives the validity proves nothing: stop waiting for it.
        let renewal = tokio::time::timeout(
            valid_until.saturating_duration_since(sent),
            store.keep_alive(lease.id),
        )
        .await;
        match renewal {
            Ok(Ok(ttl)) => {
                valid_until = timing.validity(sent, ttl);
                next_renewal = sent + timing.renew;
            }
            Ok(Err(store::Error::LeaseNotFound(_))) => break "the lease ended",
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader: renewal failed; retrying");
                next_renewal = Instant::now() + timing.renew / 4;
            }
            Err(_) => break "no renewal in time",
        }
    };
    elected.follow();
    tracing::warn!(
        term = won.revision,
        reason,
        "this controller stopped leading"
    );
    // Best effort: a revoked lease frees the key at once for another controller.
    elected.lease.store(0, Ordering::SeqCst);
    let _ = tokio::time::timeout(timing.renew, store.revoke(lease.id)).await;
    Ok(())
}
