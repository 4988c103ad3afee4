//! The controller's key-value store: etcd's data model, so one contract serves an
//! embedded SQLite file and an etcd cluster alike.
//!
//! # The contract
//! - A global **revision** counter grows by one with every write transaction that
//!   changes something; it never goes back, also across restarts.
//! - Each key has a `create_revision` (the revision that created it) and a
//!   `mod_revision` (the revision that last wrote it). An absent key has both 0.
//! - Reads say the revision they were taken at ([`Listing::revision`]), so a caller can
//!   watch from exactly the next one and miss nothing.
//! - A **transaction** ([`Txn`]) is a list of [`Compare`]s and a list of [`Op`]s: if
//!   every compare holds, every op is applied at one new revision; otherwise nothing is.
//!   That is compare-and-swap, and what lets two controllers (or two loops) race safely.
//! - A **watch** ([`Store::watch`]) streams every change under a prefix from a given
//!   revision on, one [`WatchBatch`] per revision, in order, with no gap. A revision
//!   the store no longer remembers is [`Error::Compacted`]: list again and watch from
//!   there.
//! - A **lease** ([`Store::grant`]) ends `ttl` after its last keep-alive; keys put with
//!   it disappear when it ends (expiry or revoke), in one revision, seen by watchers.
//!   A lease is at least as long as granted: the store may keep it a little longer
//!   (etcd's new leader re-extends every lease), never shorter.
//!
//! Writes wear an SD card, so the count is explicit: every transaction that changes a
//! key is one write ([`Store::write_count`]), even if it puts a value identical to the
//! stored one. Callers compare before they write.
//!
//! Transactions follow etcd's rules (see [`check_ops`]), so a transaction that works
//! on one backend works on every backend. The conformance suite every backend passes is
//! in `controller/tests/store.rs`.
//!
//! Backends: [`sqlite::SqliteStore`] (the default: one file, one controller) and
//! [`etcd::EtcdStore`] (an etcd v3 cluster that several controllers share).

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod sqlite;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use sqlite::SqliteStore;

/// Why a store operation failed. No variant names a backend: callers decide on the
/// kind of failure, the message and its source say the rest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store cannot be opened: a missing directory, no permission, a file or
    /// cluster that is not a store, or a damaged one.
    #[error("cannot open store {location}")]
    Open {
        /// Where the store is (a file, a list of endpoints).
        location: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The location holds someone else's data: refusing to write into it.
    #[error("{location} holds data that is not a Bramble store")]
    Foreign {
        /// Where the store is.
        location: String,
    },
    /// The store was written by a newer release with a layout this one does not know.
    #[error(
        "store {location} has schema version {found}; this release understands up to {supported}"
    )]
    SchemaTooNew {
        /// Where the store is.
        location: String,
        /// Version found.
        found: i64,
        /// The newest this release knows.
        supported: i64,
    },
    /// A read or write failed (I/O error, disk full, lost connection, timeout).
    #[error("store {location}: {op} failed")]
    Backend {
        /// Where the store is.
        location: String,
        /// What was being done (`read`, `write`, `watch`…).
        op: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored entry breaks the store's own rules (edited by hand, or damaged).
    #[error("store {location}: entry {key:?} is invalid: {reason}")]
    Corrupt {
        /// Where the store is.
        location: String,
        /// The entry's key (or `?` if the key itself is unreadable).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A transaction every backend must refuse: the same key written twice, a put
    /// inside a deleted range, a delete of everything, too many ops.
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// The watch asked for revisions the store no longer remembers; list again and
    /// watch from the listing's revision + 1.
    #[error("revision {requested} is no longer available (the oldest is {oldest}); list again")]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The oldest revision a watch can start from now.
        oldest: u64,
    },
    /// A watcher fell too far behind the changes and was cut off; list again.
    #[error("the watch fell behind and was cut off; list again")]
    WatchLagged,
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
}

/// How the controller proves itself to an etcd store and checks etcd's certificate
/// (`--etcd-cacert`, `--etcd-cert`, `--etcd-key`, named as etcdctl names them). Plain
/// data, here rather than in [`etcd`], so a build without that backend still parses
/// the flags and says why it cannot use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA etcd's server certificates are checked against (PEM).
    pub ca: std::path::PathBuf,
    /// This controller's client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    pub key: Option<std::path::PathBuf>,
}

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// The most ops a transaction may have. etcd refuses more than `--max-txn-ops`, 128 by
/// default; Bramble keeps under it on every backend.
pub const MAX_TXN_OPS: usize = 128;

/// One key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value, as written.
    pub value: Vec<u8>,
    /// The revision that created the key (kept across later puts).
    pub create_revision: u64,
    /// The revision that last wrote the key.
    pub mod_revision: u64,
    /// The lease the key is attached to; 0 for none.
    pub lease: LeaseId,
}

/// Keys read at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    /// The keys, sorted by key (byte order).
    pub kvs: Vec<KeyValue>,
    /// The store's revision when they were read: a watch from `revision + 1` continues
    /// exactly where this listing ends.
    pub revision: u64,
}

/// A condition a transaction checks before it applies its ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals `rev`; `rev` 0 means "the key is absent".
    ModRevision {
        /// The key.
        key: String,
        /// The expected mod revision.
        rev: u64,
    },
    /// The key's create revision equals `rev`; `rev` 0 means "the key is absent". A key
    /// deleted and created again has a new create revision, which is what makes this a
    /// fencing token.
    CreateRevision {
        /// The key.
        key: String,
        /// The expected create revision.
        rev: u64,
    },
    /// The key exists and its value equals `value` byte for byte.
    Value {
        /// The key.
        key: String,
        /// The expected value.
        value: Vec<u8>,
    },
}

impl Compare {
    /// The key compared.
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision { key, .. }
            | Compare::CreateRevision { key, .. }
            | Compare::Value { key, .. } => key,
        }
    }

    /// Whether the compare holds for `kv` (`None`: the key is absent).
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        match self {
            Compare::ModRevision { rev, .. } => kv.map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::CreateRevision { rev, .. } => kv.map_or(0, |kv| kv.create_revision) == *rev,
            Compare::Value { value, .. } => kv.is_some_and(|kv| kv.value == *value),
        }
    }
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces a key; `lease` 0 detaches it from any lease.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The lease the key lives and dies with; 0 for none.
        lease: LeaseId,
    },
    /// Deletes a key; deleting an absent key is not an error (and changes nothing).
    Delete {
        /// The key.
        key: String,
    },
    /// Deletes every key that starts with `prefix` (exactly the string, byte for byte).
    DeletePrefix {
        /// The prefix; must not be empty.
        prefix: String,
    },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Op {
        Op::Put {
            key: key.into(),
            value,
            lease: 0,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
}

/// Compares and the ops to apply if they all hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes, applied in order at one new revision.
    pub ops: Vec<Op>,
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (and so every op was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction: the new one if it changed
    /// something, else the current one (also when it failed: a caller that lost a race
    /// knows how far to catch up).
    pub revision: u64,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    /// Created or replaced.
    Put,
    /// Deleted (by a delete, a prefix delete or its lease ending).
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// For a put, the key as written. For a delete, the key with an empty value, its
    /// `mod_revision` the revision of the delete and `create_revision` 0.
    pub kv: KeyValue,
}

/// The changes of one revision under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision.
    pub revision: u64,
    /// The changes, in the order the transaction made them.
    pub events: Vec<WatchEvent>,
}

/// A stream of changes; ends with an error when the watch is cut off (the caller lists
/// again), or without one when the store closes.
pub type Watch = Pin<Box<dyn Stream<Item = Result<WatchBatch>> + Send>>;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id, for puts and keep-alives.
    pub id: LeaseId,
    /// How long it lasts after each keep-alive (the store may round up).
    pub ttl: Duration,
}

/// A revisioned key-value store with transactions, watches and leases (etcd's model).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key, with the revision the read was taken at.
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, u64)>;

    /// Reads every key that starts with `prefix`, sorted by key (byte order), at one
    /// revision. The match is exact on the string: `list("/tasks/a")` also returns
    /// `/tasks/ab`, so callers pass the trailing `/` when they mean a directory.
    async fn list(&self, prefix: &str) -> Result<Listing>;

    /// If every compare holds, applies the ops in order at one new revision and returns
    /// `succeeded: true`; otherwise changes nothing and returns `succeeded: false`.
    /// A transaction whose ops change nothing (deletes of absent keys only, or no ops)
    /// does not bump the revision and is no write. [`check_ops`] says which
    /// transactions are refused as [`Error::InvalidTxn`]; a put with a lease that does
    /// not exist is [`Error::LeaseNotFound`].
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Streams the changes under `prefix` from `from_revision` on (0: from the next
    /// change), one batch per revision that touched the prefix. A revision no longer
    /// remembered is [`Error::Compacted`], here or later in the stream.
    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch>;

    /// Grants a lease of at least `ttl` (rounded up to whole seconds, at least 1 s).
    async fn grant(&self, ttl: Duration) -> Result<Lease>;

    /// Keeps a lease alive for another TTL, counted from now; returns the TTL. A lease
    /// that has ended is [`Error::LeaseNotFound`].
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Ends a lease now, deleting its keys in one revision. An unknown lease is
    /// [`Error::LeaseNotFound`].
    async fn revoke(&self, lease: LeaseId) -> Result<()>;

    /// The current revision: that of the last change (0 for a new store).
    async fn revision(&self) -> Result<u64>;

    /// Write transactions committed since the store was opened, for the "no store
    /// writes at rest" budget and its tests.
    fn write_count(&self) -> u64;

    /// Where the store is, for messages (a file, endpoints).
    fn location(&self) -> String;
}

/// Checks that `txn` is one every backend accepts: at most [`MAX_TXN_OPS`] ops, a key
/// put at most once and not inside a range the same transaction deletes, nor both put
/// and deleted, and never the empty prefix deleted (everything).
pub fn check_ops(ops: &[Op]) -> Result<()> {
    if ops.len() > MAX_TXN_OPS {
        return Err(Error::InvalidTxn(format!(
            "{} ops in one transaction; at most {MAX_TXN_OPS}",
            ops.len()
        )));
    }
    let mut puts = BTreeSet::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if !puts.insert(key.as_str()) {
                return Err(Error::InvalidTxn(format!("key {key:?} is put twice")));
            }
        }
    }
    for op in ops {
        match op {
            Op::Put { .. } => {}
            Op::Delete { key } => {
                if puts.contains(key.as_str()) {
                    return Err(Error::InvalidTxn(format!(
                        "key {key:?} is both put and deleted"
                    )));
                }
            }
            Op::DeletePrefix { prefix } => {
                if prefix.is_empty() {
                    return Err(Error::InvalidTxn(
                        "deleting the empty prefix would delete everything".to_string(),
                    ));
                }
                // Put keys sort after their prefix, so the first one at or after it
                // tells whether any is inside the range.
                if let Some(key) = puts.range(prefix.as_str()..).next() {
                    if key.starts_with(prefix.as_str()) {
                        return Err(Error::InvalidTxn(format!(
                            "key {key:?} is put inside deleted prefix {prefix:?}"
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The smallest string greater than every string that starts with `prefix`, or `None`
/// if there is none (the prefix is empty or all U+10FFFF). With it a prefix scan is a
/// key range, which an index serves. UTF-8 byte order is code point order, so bumping
/// the last code point that can be bumped gives the bound.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        let next = match c {
            // Surrogates are not chars: the code point after U+D7FF is U+E000.
            '\u{D7FF}' => Some('\u{E000}'),
            _ => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The TTL a lease request gets: whole seconds, rounded up, at least one.
pub fn lease_seconds(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Op {
        Op::put(key, Vec::new())
    }

    #[test]
    fn rejects_transactions_etcd_would_refuse() {
        let bad = [
            vec![put("/a"), put("/a")],
            vec![put("/a"), Op::delete("/a")],
            vec![
                put("/t/x"),
                Op::DeletePrefix {
                    prefix: "/t/".into(),
                },
            ],
            vec![Op::DeletePrefix {
                prefix: String::new(),
            }],
            (0..=MAX_TXN_OPS).map(|i| put(&format!("/k{i}"))).collect(),
        ];
        for ops in bad {
            assert!(
                matches!(check_ops(&ops), Err(Error::InvalidTxn(_))),
                "{ops:?}"
            );
        }
        let good = [
            vec![put("/a"), put("/b")],
            vec![
                put("/t"),
                Op::DeletePrefix {
                    prefix: "/t/".into(),
                },
            ],
            vec![
                put("/s/x"),
                Op::DeletePrefix {
                    prefix: "/t/".into(),
                },
            ],
            vec![Op::delete("/a"), Op::DeletePrefix { prefix: "/".into() }],
            (0..MAX_TXN_OPS).map(|i| put(&format!("/k{i}"))).collect(),
        ];
        for ops in good {
            assert!(check_ops(&ops).is_ok(), "{ops:?}");
        }
    }

    #[test]
    fn compares_hold_as_etcd_says() {
        let kv = KeyValue {
            key: "/a".into(),
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 5,
            lease: 0,
        };
        let m = |rev| Compare::ModRevision {
            key: "/a".into(),
            rev,
        };
        let c = |rev| Compare::CreateRevision {
            key: "/a".into(),
            rev,
        };
        let v = |value: &[u8]| Compare::Value {
            key: "/a".into(),
            value: value.to_vec(),
        };
        assert!(m(5).holds(Some(&kv)) && !m(3).holds(Some(&kv)) && !m(0).holds(Some(&kv)));
        assert!(m(0).holds(None) && !m(5).holds(None));
        assert!(c(3).holds(Some(&kv)) && !c(5).holds(Some(&kv)) && c(0).holds(None));
        assert!(v(b"v").holds(Some(&kv)) && !v(b"w").holds(Some(&kv)));
        assert!(!v(b"").holds(None), "an absent key equals no value");
    }

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        assert_eq!(lease_seconds(Duration::ZERO), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(6)), 6);
    }

    #[test]
    fn prefix_end_bounds_exactly_the_prefix() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("/tasks/").as_deref(), Some("/tasks0"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end("x\u{D7FF}").as_deref(), Some("x\u{E000}"));
    }

    proptest::proptest! {
        #[test]
        fn prefix_end_matches_starts_with(
            prefix in "[a/\u{D7FF}\u{E000}\u{10FFFF}]{0,4}",
            key in "[a/\u{D7FF}\u{E000}\u{10FFFF}b]{0,6}",
        ) {
            let in_range = key.as_str() >= prefix.as_str()
                && prefix_end(&prefix).is_none_or(|end| key < end);
            proptest::prop_assert_eq!(in_range, key.starts_with(&prefix));
        }
    }
}
