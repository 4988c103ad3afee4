//! The store conformance suite: what every backend of `bramble_controller::store::Store`
//! must do, checked the same way on each. A backend joins by adding one line to
//! `backends!` at the bottom.

use std::sync::Arc;
use std::time::Duration;

use bramble_controller::store::{
    Compare, Error, EventKind, Op, Store, Txn, WatchBatch, MAX_TXN_OPS,
};
use futures_util::StreamExt;

#[path = "support/etcd.rs"]
mod support;

fn put(key: &str, value: &str) -> Op {
    Op::put(key, value.as_bytes().to_vec())
}

fn modrev(key: &str, rev: u64) -> Compare {
    Compare::ModRevision {
        key: key.into(),
        rev,
    }
}

async fn txn(s: &dyn Store, compares: Vec<Compare>, ops: Vec<Op>) -> (bool, u64) {
    let r = s.txn(Txn { compares, ops }).await.expect("txn");
    (r.succeeded, r.revision)
}

async fn value(s: &dyn Store, key: &str) -> Option<String> {
    s.get(key)
        .await
        .expect("get")
        .0
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

async fn keys(s: &dyn Store, prefix: &str) -> Vec<String> {
    s.list(prefix)
        .await
        .expect("list")
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// The next batch of a watch, within a bound.
async fn next(w: &mut bramble_controller::store::Watch) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a change within 10 s")
        .expect("the watch goes on")
        .expect("no watch error")
}

/// The store's revision before a test writes: a new SQLite store is at 0, a new etcd
/// cluster at 1, a shared one anywhere.
async fn base(s: &dyn Store) -> u64 {
    s.revision().await.expect("revision")
}

fn summary(b: &WatchBatch) -> Vec<(EventKind, String)> {
    b.events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone()))
        .collect()
}

pub async fn creating_an_absent_key_succeeds_once(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let b = base(s).await;
    assert_eq!(
        txn(s, vec![modrev("/a", 0)], vec![put("/a", "1")]).await,
        (true, b + 1)
    );
    assert_eq!(
        txn(s, vec![modrev("/a", 0)], vec![put("/a", "2")]).await,
        (false, b + 1)
    );
    let (kv, at) = s.get("/a").await.expect("get");
    let kv = kv.expect("present");
    assert_eq!(kv.value, b"1");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, at),
        (b + 1, b + 1, b + 1)
    );
}

pub async fn a_stale_compare_fails_the_whole_transaction_and_changes_nothing(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let b = base(s).await;
    txn(s, vec![], vec![put("/a", "1"), put("/b", "1")]).await;
    txn(s, vec![], vec![put("/a", "2")]).await;
    let a = s.get("/a").await.expect("get").0.expect("present");
    assert_eq!((a.create_revision, a.mod_revision), (b + 1, b + 2));
    let r = txn(
        s,
        vec![modrev("/b", b + 1), modrev("/a", b + 1)],
        vec![put("/a", "3"), put("/b", "3")],
    )
    .await;
    assert_eq!(
        r,
        (false, b + 2),
        "the failed txn reports the current revision"
    );
    assert_eq!(value(s, "/a").await.as_deref(), Some("2"));
    assert_eq!(value(s, "/b").await.as_deref(), Some("1"));
    assert_eq!(
        txn(s, vec![modrev("/a", b + 2)], vec![put("/a", "3")]).await,
        (true, b + 3)
    );
}

pub async fn compares_on_create_revision_and_value(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let b = base(s).await;
    txn(s, vec![], vec![put("/owner", "n1")]).await;
    txn(s, vec![], vec![put("/owner", "n2")]).await;
    let create = |rev| Compare::CreateRevision {
        key: "/owner".into(),
        rev,
    };
    let val = |v: &str| Compare::Value {
        key: "/owner".into(),
        value: v.as_bytes().to_vec(),
    };
    assert!(!txn(s, vec![create(b + 2)], vec![put("/x", "1")]).await.0);
    assert!(txn(s, vec![create(b + 1)], vec![put("/x", "1")]).await.0);
    assert!(!txn(s, vec![val("n1")], vec![put("/x", "2")]).await.0);
    assert!(txn(s, vec![val("n2")], vec![put("/x", "2")]).await.0);
    // Deleted and created again: a new create revision (a new fencing epoch).
    txn(s, vec![], vec![Op::delete("/owner")]).await;
    assert!(
        !txn(s, vec![val("n2")], vec![put("/x", "3")]).await.0,
        "absent is no value"
    );
    assert!(txn(s, vec![create(0)], vec![put("/owner", "n3")]).await.0);
    let kv = s.get("/owner").await.expect("get").0.expect("present");
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert!(kv.create_revision > b + 2);
}

pub async fn listing_by_prefix_is_sorted_exact_and_says_its_revision(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let all = [
        "/tasks/b",
        "/tasks/a",
        "/tasks/a/1",
        "/tasks/ab",
        "/tasks0",
        "/task",
    ];
    let (_, rev) = txn(s, vec![], all.iter().map(|k| put(k, "v")).collect()).await;
    assert_eq!(keys(s, "/tasks/a/").await, ["/tasks/a/1"]);
    assert_eq!(
        keys(s, "/tasks/").await,
        ["/tasks/a", "/tasks/a/1", "/tasks/ab", "/tasks/b"]
    );
    assert!(keys(s, "/nodes/").await.is_empty());
    let listing = s.list("/").await.expect("list");
    assert_eq!(listing.kvs.len(), all.len());
    assert_eq!(listing.revision, rev);
    assert_eq!(s.revision().await.expect("revision"), rev);
}

pub async fn deletes_count_only_when_they_delete(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let before = s.write_count();
    let (ok, rev) = txn(
        s,
        vec![],
        vec![put("/t/a/1", "v"), put("/t/a/2", "v"), put("/t/ab", "v")],
    )
    .await;
    assert!(ok);
    // Deleting nothing is no change: no revision, no write.
    assert_eq!(txn(s, vec![], vec![Op::delete("/none")]).await, (true, rev));
    assert_eq!(txn(s, vec![], vec![]).await, (true, rev));
    assert_eq!(s.write_count(), before + 1);
    let (_, rev2) = txn(
        s,
        vec![],
        vec![Op::DeletePrefix {
            prefix: "/t/a/".into(),
        }],
    )
    .await;
    assert_eq!(rev2, rev + 1);
    assert_eq!(keys(s, "/").await, ["/t/ab"]);
    assert_eq!(s.write_count(), before + 2);
    // An identical value is still a write: callers must not do it at rest.
    txn(s, vec![], vec![put("/t/ab", "v")]).await;
    assert_eq!(s.write_count(), before + 3);
}

pub async fn refuses_transactions_every_backend_must_refuse(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let b = base(s).await;
    let too_many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| put(&format!("/k/{i}"), "v"))
        .collect();
    for ops in [
        vec![put("/a", "1"), put("/a", "2")],
        vec![put("/a", "1"), Op::delete("/a")],
        vec![Op::DeletePrefix {
            prefix: String::new(),
        }],
        too_many,
    ] {
        let r = s
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidTxn(_))), "{r:?}");
    }
    assert_eq!(s.revision().await.expect("revision"), b);
}

pub async fn a_watch_sees_every_change_under_its_prefix_in_order(s: Arc<dyn Store>) {
    let st = s.as_ref();
    let mut w = st.watch("/w/", 0).await.expect("watch");
    let (_, r1) = txn(st, vec![], vec![put("/w/a", "1"), put("/other", "x")]).await;
    let (_, r2) = txn(st, vec![], vec![put("/w/a", "2"), put("/w/b", "1")]).await;
    txn(st, vec![], vec![put("/other", "y")]).await;
    let (_, r4) = txn(
        st,
        vec![],
        vec![Op::DeletePrefix {
            prefix: "/w/".into(),
        }],
    )
    .await;

    let b = next(&mut w).await;
    assert_eq!(
        (b.revision, summary(&b)),
        (r1, vec![(EventKind::Put, "/w/a".into())])
    );
    assert_eq!(b.events[0].kv.value, b"1");
    assert_eq!(b.events[0].kv.create_revision, r1);
    let b = next(&mut w).await;
    assert_eq!(
        (b.revision, summary(&b)),
        (
            r2,
            vec![
                (EventKind::Put, "/w/a".into()),
                (EventKind::Put, "/w/b".into())
            ]
        )
    );
    assert_eq!(
        (b.events[0].kv.create_revision, b.events[0].kv.mod_revision),
        (r1, r2)
    );
    let b = next(&mut w).await;
    assert_eq!(
        b.revision, r4,
        "a revision that did not touch the prefix is skipped"
    );
    let mut deleted = summary(&b);
    deleted.sort();
    assert_eq!(
        deleted,
        vec![
            (EventKind::Delete, "/w/a".into()),
            (EventKind::Delete, "/w/b".into())
        ]
    );
    assert!(b.events.iter().all(|e| e.kv.mod_revision == r4));
}

pub async fn a_listing_and_a_watch_from_its_next_revision_miss_nothing(s: Arc<dyn Store>) {
    let st = s.as_ref();
    txn(st, vec![], vec![put("/l/a", "1")]).await;
    let listing = st.list("/l/").await.expect("list");
    // Changes after the listing but before the watch is opened are still delivered.
    let (_, r) = txn(st, vec![], vec![put("/l/b", "1")]).await;
    let mut w = st.watch("/l/", listing.revision + 1).await.expect("watch");
    let b = next(&mut w).await;
    assert_eq!(
        (b.revision, summary(&b)),
        (r, vec![(EventKind::Put, "/l/b".into())])
    );
}

pub async fn two_watchers_see_the_same_history(s: Arc<dyn Store>) {
    let st = s.as_ref();
    let mut a = st.watch("/", 0).await.expect("watch");
    let mut b = st.watch("/x/", 0).await.expect("watch");
    for i in 0..20 {
        txn(st, vec![], vec![put(&format!("/x/{i:02}"), "v")]).await;
    }
    for i in 0..20 {
        let (ba, bb) = (next(&mut a).await, next(&mut b).await);
        assert_eq!(ba, bb);
        assert_eq!(summary(&ba), vec![(EventKind::Put, format!("/x/{i:02}"))]);
    }
}

pub async fn a_lease_keeps_its_keys_while_kept_alive_and_deletes_them_when_it_ends(
    s: Arc<dyn Store>,
) {
    let st = s.as_ref();
    let lease = st.grant(Duration::from_millis(1500)).await.expect("grant");
    assert_eq!(
        lease.ttl,
        Duration::from_secs(2),
        "rounded up to whole seconds"
    );
    let mut w = st.watch("/owner/", 0).await.expect("watch");
    let r = st
        .txn(Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/owner/w".into(),
                value: b"n1".to_vec(),
                lease: lease.id,
            }],
        })
        .await
        .expect("put with lease");
    assert!(r.succeeded);
    let kv = st.get("/owner/w").await.expect("get").0.expect("present");
    assert_eq!(kv.lease, lease.id);
    next(&mut w).await;
    // Kept alive past its TTL: the key stays.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(st.keep_alive(lease.id).await.expect("alive"), lease.ttl);
    }
    assert!(value(st, "/owner/w").await.is_some());
    // Left alone, it ends: the key goes in one revision that watchers see.
    let b = next(&mut w).await;
    assert_eq!(summary(&b), vec![(EventKind::Delete, "/owner/w".into())]);
    assert!(value(st, "/owner/w").await.is_none());
    assert!(matches!(
        st.keep_alive(lease.id).await,
        Err(Error::LeaseNotFound(id)) if id == lease.id
    ));
    // A put with an ended lease changes nothing.
    let r = st
        .txn(Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/owner/w".into(),
                value: b"n2".to_vec(),
                lease: lease.id,
            }],
        })
        .await;
    assert!(matches!(r, Err(Error::LeaseNotFound(_))), "{r:?}");
    assert!(value(st, "/owner/w").await.is_none());
}

pub async fn revoking_a_lease_deletes_its_keys_at_once(s: Arc<dyn Store>) {
    let st = s.as_ref();
    let lease = st.grant(Duration::from_secs(60)).await.expect("grant");
    let other = st.grant(Duration::from_secs(60)).await.expect("grant");
    assert_ne!(lease.id, other.id);
    let with = |key: &str, id| Op::Put {
        key: key.into(),
        value: b"v".to_vec(),
        lease: id,
    };
    txn(
        st,
        vec![],
        vec![
            with("/l/a", lease.id),
            with("/l/b", lease.id),
            with("/l/c", other.id),
            put("/l/d", "v"),
        ],
    )
    .await;
    // A put without a lease detaches a key from its lease.
    txn(st, vec![], vec![put("/l/b", "v")]).await;
    st.revoke(lease.id).await.expect("revoke");
    assert_eq!(keys(st, "/l/").await, ["/l/b", "/l/c", "/l/d"]);
    assert!(matches!(
        st.revoke(lease.id).await,
        Err(Error::LeaseNotFound(_))
    ));
    let r = st.keep_alive(lease.id).await;
    assert!(matches!(r, Err(Error::LeaseNotFound(_))), "{r:?}");
    st.revoke(other.id).await.expect("revoke");
    assert_eq!(keys(st, "/l/").await, ["/l/b", "/l/d"]);
}

pub async fn racing_writers_each_win_or_lose_whole(s: Arc<dyn Store>) {
    // Many tasks bump one counter with compare-and-swap: no update is lost, none doubled.
    let mut handles = Vec::new();
    txn(s.as_ref(), vec![], vec![put("/counter", "0")]).await;
    for _ in 0..8 {
        let s = Arc::clone(&s);
        handles.push(tokio::spawn(async move {
            let mut won = 0;
            while won < 10 {
                let kv = s.get("/counter").await.expect("get").0.expect("present");
                let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
                let r = s
                    .txn(Txn {
                        compares: vec![modrev("/counter", kv.mod_revision)],
                        ops: vec![put("/counter", &(n + 1).to_string())],
                    })
                    .await
                    .expect("txn");
                if r.succeeded {
                    won += 1;
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    assert_eq!(value(s.as_ref(), "/counter").await.as_deref(), Some("80"));
}

/// Whatever keeps a backend alive for one test (an etcd process), dropped after it.
type Guard = Box<dyn std::any::Any + Send>;

macro_rules! backends {
    ($($backend:ident => $make:expr),* $(,)?) => {$(
        mod $backend {
            use super::*;
            async fn make() -> (Arc<dyn Store>, Guard) {
                $make.await
            }
            backends!(@tests
                creating_an_absent_key_succeeds_once,
                a_stale_compare_fails_the_whole_transaction_and_changes_nothing,
                compares_on_create_revision_and_value,
                listing_by_prefix_is_sorted_exact_and_says_its_revision,
                deletes_count_only_when_they_delete,
                refuses_transactions_every_backend_must_refuse,
                a_watch_sees_every_change_under_its_prefix_in_order,
                a_listing_and_a_watch_from_its_next_revision_miss_nothing,
                two_watchers_see_the_same_history,
                a_lease_keeps_its_keys_while_kept_alive_and_deletes_them_when_it_ends,
                revoking_a_lease_deletes_its_keys_at_once,
                racing_writers_each_win_or_lose_whole,
            );
        }
    )*};
    (@tests $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (store, _guard) = make().await;
            super::$name(store).await;
        }
    )*};
}

backends! {
    sqlite => async {
        let store: Arc<dyn Store> = Arc::new(
            bramble_controller::store::SqliteStore::open_in_memory().expect("in-memory store"),
        );
        (store, Box::new(()) as Guard)
    },
    // A new etcd for each test: revisions are the whole cluster's, so tests that count
    // them cannot share one.
    etcd => async {
        let etcd = support::Etcd::start(1).await;
        let store: Arc<dyn Store> = Arc::new(etcd.store("/bramble/").await);
        (store, Box::new(etcd) as Guard)
    },
}
