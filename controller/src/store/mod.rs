//! The controller's key-value store: etcd's data model, small enough for one SQLite file.
//!
//! - A global **revision** counter is bumped by every write transaction; it never goes
//!   back, also across restarts.
//! - Each key has a `create_revision` (the revision that created it) and a `mod_revision`
//!   (the revision that last wrote it). A key that does not exist has mod revision 0.
//! - A **transaction** is a list of [`Compare`]s and a list of [`Op`]s: if every compare
//!   holds, every op is applied at one new revision; otherwise nothing is. That is
//!   compare-and-swap, and what lets two controllers (or two loops) race safely.
//!
//! Writes wear an SD card, so the contract is explicit: every successful transaction
//! with at least one op is exactly one write ([`Store::write_count`]), even if it puts a
//! value identical to the stored one. Callers compare before they write.
//!
//! Backends: [`sqlite::SqliteStore`] (the default, one file); an etcd backend can
//! implement [`Store`] unchanged, which is why transactions follow etcd's rules (see
//! [`Store::txn`]).

pub mod sqlite;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or prepared: a missing directory, no
    /// permission, a file that is not an SQLite database, or a corrupt one.
    #[error("cannot open store {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is an SQLite database, but someone else's: refusing to write into it.
    #[error("{} is an SQLite database but not a Bramble store", path.display())]
    NotAStore {
        /// The database file.
        path: PathBuf,
    },
    /// The store was written by a newer release with a schema this one does not know.
    #[error("store {} has schema version {found}; this release understands up to {supported}", path.display())]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// `user_version` found in the file.
        found: i64,
        /// The newest schema this release knows.
        supported: i64,
    },
    /// A read or write failed in SQLite (I/O error, disk full, corruption found late).
    #[error("store {}: {op} failed", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done (`read`, `write`, `commit`…).
        op: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row breaks the schema's rules (edited by hand, or a damaged file).
    #[error("store {}: row {key:?} is invalid: {reason}", path.display())]
    CorruptRow {
        /// The database file.
        path: PathBuf,
        /// The row's key (or `?` if the key itself is unreadable).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A transaction etcd would refuse: the same key written twice, a put inside a
    /// deleted range, or a delete of the empty prefix (everything).
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// A value is not the JSON the caller expected.
    #[error("value at {key} does not decode")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be turned into JSON (a map with non-string keys, say).
    #[error("value for {key} does not encode")]
    Encode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value, as written.
    pub value: Vec<u8>,
    /// The revision that created the key (kept across later puts).
    pub create_revision: u64,
    /// The revision that last wrote the key; what [`Compare::ModRevision`] checks.
    pub mod_revision: u64,
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
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces a key.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// Deletes a key; deleting an absent key is not an error.
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

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (and so every op was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction: the new one if it wrote.
    pub revision: u64,
}

/// A revisioned key-value store with all-or-nothing transactions (etcd's model).
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Reads every key that starts with `prefix`, sorted by key (byte order). The match
    /// is exact on the string: `list("/tasks/a")` also returns `/tasks/ab`, so callers
    /// pass the trailing `/` when they mean a directory.
    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>>;

    /// If every compare holds, applies `ops` in order at one new revision and returns
    /// `succeeded: true`; otherwise changes nothing and returns `succeeded: false`.
    ///
    /// Each successful transaction with at least one op bumps the revision by one and
    /// counts as one write, whether or not the values changed (as in etcd). A
    /// transaction with no ops is a consistent read of its compares and writes nothing.
    ///
    /// As etcd requires, a key may be put at most once per transaction and not inside a
    /// range the same transaction deletes, and the empty prefix may not be deleted:
    /// such a transaction is [`Error::InvalidTxn`]. (An etcd backend also caps the
    /// number of ops, 128 by default.)
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult>;

    /// The current revision: that of the last write transaction (0 for a new store).
    fn revision(&self) -> Result<u64>;

    /// Write transactions committed since the store was opened, for the "no store
    /// writes at rest" budget and its tests.
    fn write_count(&self) -> u64;
}

/// Checks that `ops` form a transaction etcd would accept (see [`Store::txn`]), so a
/// transaction that works on SQLite also works on etcd.
pub fn check_ops(ops: &[Op]) -> Result<()> {
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

/// Typed JSON access on any [`Store`] (also `dyn Store`).
pub trait StoreExt: Store {
    /// Reads and decodes one key, with its mod revision for a later [`cas_json`](Self::cas_json).
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        self.get(key)?.map(|kv| decode(&kv)).transpose()
    }

    /// Reads and decodes every key under `prefix`, sorted by key, each with its mod
    /// revision. One value that does not decode fails the whole call, naming its key.
    fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(T, u64)>> {
        self.list(prefix)?.iter().map(decode).collect()
    }

    /// Writes `value` whatever is stored; returns the new revision. One write, even if
    /// the value is unchanged.
    fn put_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        let op = Op::Put {
            key: key.to_string(),
            value: encode(key, value)?,
        };
        Ok(self.txn(&[], &[op])?.revision)
    }

    /// Writes `value` only if the key's mod revision is still `expected_rev` (0: only if
    /// absent). Returns whether it wrote; `false` means someone else wrote first, so
    /// re-read and decide again.
    fn cas_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        expected_rev: u64,
        value: &T,
    ) -> Result<bool> {
        let cmp = Compare::ModRevision {
            key: key.to_string(),
            rev: expected_rev,
        };
        let op = Op::Put {
            key: key.to_string(),
            value: encode(key, value)?,
        };
        Ok(self.txn(&[cmp], &[op])?.succeeded)
    }

    /// Deletes the key only if its mod revision is still `expected_rev`. Returns whether
    /// it deleted.
    fn cas_delete(&self, key: &str, expected_rev: u64) -> Result<bool> {
        let cmp = Compare::ModRevision {
            key: key.to_string(),
            rev: expected_rev,
        };
        let op = Op::Delete {
            key: key.to_string(),
        };
        Ok(self.txn(&[cmp], &[op])?.succeeded)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<(T, u64)> {
    serde_json::from_slice(&kv.value)
        .map(|v| (v, kv.mod_revision))
        .map_err(|source| Error::Decode {
            key: kv.key.clone(),
            source,
        })
}

fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Encode {
        key: key.to_string(),
        source,
    })
}

/// The smallest string greater than every string that starts with `prefix`, or `None`
/// if there is none (the prefix is empty or all U+10FFFF). With it a prefix scan is a
/// key range, which the index serves. UTF-8 byte order is code point order, so bumping
/// the last code point that can be bumped gives the bound.
fn prefix_end(prefix: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.to_string(),
            value: Vec::new(),
        }
    }

    #[test]
    fn rejects_transactions_etcd_would_refuse() {
        let bad = [
            vec![put("/a"), put("/a")],
            vec![put("/a"), Op::Delete { key: "/a".into() }],
            vec![
                put("/t/x"),
                Op::DeletePrefix {
                    prefix: "/t/".into(),
                },
            ],
            vec![Op::DeletePrefix {
                prefix: String::new(),
            }],
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
            vec![
                Op::Delete { key: "/a".into() },
                Op::DeletePrefix { prefix: "/".into() },
            ],
        ];
        for ops in good {
            assert!(check_ops(&ops).is_ok(), "{ops:?}");
        }
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
