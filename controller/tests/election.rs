//! Leader election among controllers sharing a store: one leader at a time, a dead or
//! cut-off leader replaced, and a cut-off leader stopping before anyone else starts.
//! Runs on SQLite (leases and compares are the store contract's) and on a real etcd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bramble_controller::state::leader::{self, Elected, LeaderRecord, Timing};
use bramble_controller::state::Leadership;
use bramble_controller::store::{
    Error, KeyValue, Lease, LeaseId, Listing, Store, Txn, TxnResult, Watch,
};
use chrono::Utc;
use tokio::sync::watch;

#[path = "support/etcd.rs"]
mod support;

/// A store that can be cut off: every call fails while `cut` is set, as when a
/// controller loses its network to etcd.
struct Cuttable {
    inner: Arc<dyn Store>,
    cut: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("cut off")]
struct CutOff;

impl Cuttable {
    fn check(&self) -> Result<(), Error> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Error::Backend {
                location: "test".into(),
                op: "any",
                source: Box::new(CutOff),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for Cuttable {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, u64), Error> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, Error> {
        self.check()?;
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch, Error> {
        self.check()?;
        self.inner.watch(prefix, from).await
    }
    async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        self.check()?;
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        self.check()?;
        self.inner.revoke(lease).await
    }
    async fn revision(&self) -> Result<u64, Error> {
        self.check()?;
        self.inner.revision().await
    }
    fn write_count(&self) -> u64 {
        self.inner.write_count()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

fn me(name: &str) -> LeaderRecord {
    LeaderRecord {
        id: format!("{name}-id"),
        name: name.into(),
        url: Some(format!("https://{name}:7878")),
        since: Utc::now(),
    }
}

const TIMING: Timing = Timing {
    lease: Duration::from_secs(2),
    renew: Duration::from_millis(300),
    margin: Duration::from_millis(800),
};

/// Samples who leads every 10 ms until `until` holds or 30 s pass; fails if two lead
/// at once.
async fn never_two(all: &[&Arc<Elected>], mut until: impl FnMut(&[bool]) -> bool) -> Vec<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now: Vec<bool> = all.iter().map(|e| e.is_leader()).collect();
        assert!(
            now.iter().filter(|l| **l).count() <= 1,
            "two leaders at once: {now:?}"
        );
        if until(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached in 30 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn one_leader_at_a_time_and_a_cut_off_leader_steps_down_first(shared: Arc<dyn Store>) {
    let a_store = Arc::new(Cuttable {
        inner: Arc::clone(&shared),
        cut: AtomicBool::new(false),
    });
    let (stop_a, rx_a) = watch::channel(false);
    let (stop_b, rx_b) = watch::channel(false);
    let (a, _ta) = Elected::start(a_store.clone(), me("a"), TIMING, rx_a);
    let first = never_two(&[&a], |l| l[0]).await;
    assert_eq!(first, [true]);
    let (b, tb) = Elected::start(Arc::clone(&shared), me("b"), TIMING, rx_b);
    // b waits while a renews.
    tokio::time::sleep(TIMING.lease * 2).await;
    assert!(a.is_leader() && !b.is_leader());
    let (record, term_a) = leader::current(shared.as_ref())
        .await
        .expect("read")
        .expect("a leader");
    assert_eq!(record.name, "a");
    assert_eq!(a.compares().len(), 1);

    // a is cut off from the store: it stops leading on its own clock, before its
    // lease ends and b can take over. Sampling never sees both.
    a_store.cut.store(true, Ordering::SeqCst);
    never_two(&[&a, &b], |l| l[1]).await;
    let (record, term_b) = leader::current(shared.as_ref())
        .await
        .expect("read")
        .expect("a leader");
    assert_eq!(record.name, "b");
    assert!(term_b > term_a, "a new term: {term_a} then {term_b}");

    // a comes back: b keeps the lead, a follows.
    a_store.cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(TIMING.lease * 2).await;
    assert!(!a.is_leader() && b.is_leader());

    // b stops (a controller shut down): its lease is revoked as it ends, so the key is
    // free at once and a leads again without waiting the lease out.
    stop_b.send_replace(true);
    tb.await.expect("b's campaign ends");
    assert!(!b.is_leader());
    let after = leader::current(shared.as_ref()).await.expect("read");
    assert!(
        after.as_ref().is_none_or(|(r, _)| r.name == "a"),
        "b's key outlived its stop: {after:?}"
    );
    never_two(&[&a, &b], |l| l[0]).await;
    stop_a.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_leader_at_a_time_and_a_cut_off_leader_steps_down_first() {
    let store: Arc<dyn Store> = Arc::new(
        bramble_controller::store::SqliteStore::open_in_memory().expect("in-memory store"),
    );
    one_leader_at_a_time_and_a_cut_off_leader_steps_down_first(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_one_leader_at_a_time_and_a_cut_off_leader_steps_down_first() {
    let etcd = support::Etcd::start(1).await;
    let store: Arc<dyn Store> = Arc::new(etcd.store("/bramble/").await);
    one_leader_at_a_time_and_a_cut_off_leader_steps_down_first(store).await;
}

#[test]
fn timings_that_cannot_be_safe_are_refused() {
    assert!(Timing::default().check().is_ok());
    assert!(TIMING.check().is_ok());
    let bad = [
        Timing {
            lease: Duration::from_secs(1),
            ..Timing::default()
        },
        Timing {
            margin: Duration::ZERO,
            ..Timing::default()
        },
        Timing {
            margin: Duration::from_secs(6),
            ..Timing::default()
        },
        Timing {
            renew: Duration::from_secs(2),
            ..Timing::default()
        },
    ];
    for t in bad {
        assert!(t.check().is_err(), "{t:?}");
    }
}

#[test]
fn a_leader_acts_only_until_margin_before_the_lease_can_end() {
    let t = Timing::default();
    let sent = std::time::Instant::now();
    assert_eq!(
        t.validity(sent, Duration::from_secs(6)),
        sent + Duration::from_secs(4)
    );
    // A store that granted less than asked shortens validity, never lengthens it.
    assert_eq!(
        t.validity(sent, Duration::from_secs(3)),
        sent + Duration::from_secs(1)
    );
    assert_eq!(t.validity(sent, Duration::from_secs(1)), sent);
}

/// Leadership an operator flips by hand.
struct Manual(watch::Sender<bool>);

impl Leadership for Manual {
    fn is_leader(&self) -> bool {
        *self.0.borrow()
    }
    fn compares(&self) -> Vec<bramble_controller::store::Compare> {
        Vec::new()
    }
    fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_gives_nodes_the_startup_grace_before_its_loops_run() {
    use bramble_api::rest::NodeStatus;
    use bramble_controller::config::HealthConfig;
    use bramble_controller::state::State;

    let store: Arc<dyn Store> = Arc::new(
        bramble_controller::store::SqliteStore::open_in_memory().expect("in-memory store"),
    );
    let health = HealthConfig {
        heartbeat: Duration::from_millis(10),
        not_ready_after: Duration::from_millis(20),
        dead_after: Duration::from_millis(50),
        startup_grace: Duration::from_secs(30),
        ..HealthConfig::default()
    };
    let leader = Arc::new(Manual(watch::channel(false).0));
    let state = State::open(store, health, leader.clone())
        .await
        .expect("state");
    let mut leading = state.leading();
    assert!(!*leading.borrow_and_update());
    // Heard of as a follower (or in an earlier term), then silent for long.
    state.live.seen("pi1", None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state.live.status("pi1"), NodeStatus::Dead);

    leader.0.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), leading.changed())
        .await
        .expect("leading within 10 s")
        .expect("changed");
    // The moment the loops see the lead, the node has its grace: not Dead.
    assert_eq!(state.live.status("pi1"), NodeStatus::NotReady);

    leader.0.send_replace(false);
    tokio::time::timeout(Duration::from_secs(10), leading.changed())
        .await
        .expect("following within 10 s")
        .expect("changed");
    assert!(!state.is_leading());
}
