//! What only the etcd backend has: a prefix shared with other data, several members,
//! endpoints that die. The contract itself is checked by `store.rs` on every backend.

use std::time::Duration;

use bramble_controller::store::etcd::TlsFiles;
use bramble_controller::store::{Error, EtcdStore, Op, Store, Txn};
use futures_util::StreamExt;

#[path = "support/etcd.rs"]
mod support;

use support::Etcd;

async fn put(s: &dyn Store, key: &str, value: &str) -> u64 {
    let r = s
        .txn(Txn {
            compares: vec![],
            ops: vec![Op::put(key, value.as_bytes().to_vec())],
        })
        .await
        .expect("txn");
    assert!(r.succeeded);
    r.revision
}

/// A put as the controller's callers make it while etcd fails over: a write whose
/// outcome is unknown (it went to a member that lost its leader) fails, saying so,
/// and is sent again.
async fn put_until_done(s: &dyn Store, key: &str, value: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut tries = 0;
    loop {
        tries += 1;
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            s.txn(Txn {
                compares: vec![],
                ops: vec![Op::put(key, value.as_bytes().to_vec())],
            }),
        )
        .await
        .expect("an answer, not a hang");
        match r {
            Ok(r) => {
                assert!(r.succeeded);
                return r.revision;
            }
            Err(e @ Error::Backend { .. }) if tokio::time::Instant::now() < deadline => {
                eprintln!("try {tries}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put {key} after {tries} tries: {e:?}"),
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_holding_other_data_is_refused_and_two_clusters_share_one_etcd() {
    let etcd = Etcd::start(1).await;
    let mut raw = etcd.client().await;
    raw.put("/theirs/config", "x", None).await.expect("put");
    raw.put("/newer", "bramble-store 99", None)
        .await
        .expect("put");

    let e = EtcdStore::open(&etcd.endpoints(), "/theirs/", None)
        .await
        .expect_err("someone else's keys");
    assert!(matches!(e, Error::Foreign { .. }), "{e:?}");
    assert!(e.to_string().contains("/theirs"), "{e}");
    let e = EtcdStore::open(&etcd.endpoints(), "/newer/", None)
        .await
        .expect_err("a newer layout");
    assert!(matches!(e, Error::SchemaTooNew { found: 99, .. }), "{e:?}");
    // Refusing wrote nothing.
    let all = raw
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .expect("get");
    assert_eq!(all.kvs().len(), 2);

    let a = etcd.store("/a/").await;
    let b = etcd.store("/b").await;
    put(&a, "/tasks/x", "1").await;
    put(&b, "/tasks/y", "2").await;
    assert_eq!(keys(&a, "/").await, ["/tasks/x"]);
    assert_eq!(keys(&b, "/").await, ["/tasks/y"]);
    let raw_keys: Vec<String> = raw
        .get("/a/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert_eq!(raw_keys, ["/a/tasks/x"], "keys live under the prefix");
    // Opened again, the store is recognised, not taken for someone else's.
    let again = etcd.store("/a/").await;
    assert_eq!(keys(&again, "/tasks/").await, ["/tasks/x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_larger_than_a_page_is_read_at_one_revision() {
    let etcd = Etcd::start(1).await;
    let s = etcd.store("/bramble/").await;
    for chunk in 0..12 {
        let ops = (0..100)
            .map(|i| Op::put(format!("/k/{:04}", chunk * 100 + i), vec![b'v'; 10]))
            .collect();
        s.txn(Txn {
            compares: vec![],
            ops,
        })
        .await
        .expect("txn");
    }
    let listing = s.list("/k/").await.expect("list");
    assert_eq!(listing.kvs.len(), 1200);
    assert!(listing.kvs.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(listing.revision, s.revision().await.expect("revision"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_goes_on_when_the_member_it_used_dies() {
    let mut etcd = Etcd::start(3).await;
    let s = etcd.store("/bramble/").await;
    put(&s, "/a", "1").await;
    let lease = s.grant(Duration::from_secs(10)).await.expect("grant");

    // The first endpoint is the one in use; it loses power. If it led etcd, a write
    // sent to another member before that member noticed may time out (its outcome
    // unknown); the next try goes through the new leader.
    etcd.kill(0);
    let r = put_until_done(&s, "/b", "2").await;
    assert_eq!(keys(&s, "/").await, ["/a", "/b"]);
    s.keep_alive(lease.id)
        .await
        .expect("keep-alive through another member");
    let mut w = s
        .watch("/", r + 1)
        .await
        .expect("watch through another member");
    put(&s, "/c", "3").await;
    let b = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a change within 10 s")
        .expect("the watch goes on")
        .expect("no watch error");
    assert_eq!(b.events[0].kv.key, "/c");

    // With two of three members gone there is no quorum: calls fail, and say so,
    // rather than hang or answer from a stale member.
    etcd.kill(1);
    let e = tokio::time::timeout(Duration::from_secs(60), s.get("/a"))
        .await
        .expect("an answer, not a hang")
        .expect_err("no quorum");
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_a_controller_with_a_certificate_of_etcds_ca_gets_in() {
    let etcd = Etcd::start_tls().await;
    let s = etcd.store("/bramble/").await;
    put(&s, "/a", "1").await;
    assert_eq!(keys(&s, "/").await, ["/a"]);
    let pki = etcd.pki();

    // No client certificate: etcd (--client-cert-auth) refuses the connection.
    let no_cert = TlsFiles {
        cert: None,
        key: None,
        ..pki.client.clone()
    };
    let e = EtcdStore::open(&etcd.endpoints(), "/bramble/", Some(&no_cert))
        .await
        .expect_err("no client certificate");
    assert!(matches!(e, Error::Open { .. }), "{e:?}");
    // Trusting another CA: etcd's certificate does not verify, nothing is sent.
    let wrong_ca = TlsFiles {
        ca: pki.other_ca.clone(),
        ..pki.client.clone()
    };
    let e = EtcdStore::open(&etcd.endpoints(), "/bramble/", Some(&wrong_ca))
        .await
        .expect_err("another CA");
    assert!(matches!(e, Error::Open { .. }), "{e:?}");
    // A CA file that is not a certificate is named.
    let bad = TlsFiles {
        ca: pki.client.key.clone().expect("a key file"),
        ..pki.client.clone()
    };
    let e = EtcdStore::open(&etcd.endpoints(), "/bramble/", Some(&bad))
        .await
        .expect_err("a key as CA");
    let text = format!("{e:?}");
    assert!(text.contains("no PEM certificate"), "{text}");
    // Nothing the refused clients did reached the store.
    assert_eq!(keys(&s, "/").await, ["/a"]);
}
