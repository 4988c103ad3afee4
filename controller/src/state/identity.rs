//! What controllers sharing one store must have in common: the cluster CA (agents pin
//! it, so any controller must present a certificate from it) and the key Secrets are
//! sealed with (any controller must open them). The first controller on a store
//! records both; every later one checks them before it serves anything, so a
//! controller started with a fresh data dir is refused at once instead of serving
//! agents a CA they distrust and tasks Secrets it cannot open.

use bramble_api::token::Fingerprint;
use serde::{Deserialize, Serialize};

use crate::store::{self, Compare, Op, Store, Txn};

/// The key holding the cluster's identity.
pub const IDENTITY_KEY: &str = "/cluster/identity";

/// What is recorded: public fingerprints only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// SHA-256 of the cluster CA's certificate.
    pub ca: String,
    /// A one-way id of the Secrets key.
    pub secrets_key: String,
}

/// Why this controller may not join the store's cluster.
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    /// The store failed.
    #[error("cannot read the cluster's identity")]
    Store(#[from] store::Error),
    /// Another CA or Secrets key than the cluster's.
    #[error(
        "this controller's {what} differs from the cluster's in the store ({mine} here, {theirs} in the store): \
         copy ca.crt, ca.key, admin-token, join-token, viewer-token and secrets.key from the data dir of a \
         controller of this cluster into this one's, then start it again"
    )]
    Differs {
        /// `cluster CA` or `Secrets key`.
        what: &'static str,
        /// This controller's.
        mine: String,
        /// The store's.
        theirs: String,
    },
    /// The recorded identity does not decode.
    #[error("{IDENTITY_KEY} in the store is damaged: {0}")]
    Damaged(String),
}

/// Records this controller's identity in a new store, or checks it against the one
/// recorded. One write, at the first start only.
pub async fn check(store: &dyn Store, ca: &Fingerprint, key_id: &str) -> Result<(), Mismatch> {
    let mine = Identity {
        ca: ca.as_str().to_string(),
        secrets_key: key_id.to_string(),
    };
    loop {
        let (kv, _) = store.get(IDENTITY_KEY).await?;
        let Some(kv) = kv else {
            let value = serde_json::to_vec(&mine).map_err(|e| Mismatch::Damaged(e.to_string()))?;
            let r = store
                .txn(Txn {
                    compares: vec![Compare::CreateRevision {
                        key: IDENTITY_KEY.into(),
                        rev: 0,
                    }],
                    ops: vec![Op::put(IDENTITY_KEY, value)],
                })
                .await?;
            if r.succeeded {
                tracing::info!(ca = %ca.short(), "recorded the cluster's identity in the store");
                return Ok(());
            }
            // Another controller recorded it first: check against theirs.
            continue;
        };
        let theirs: Identity =
            serde_json::from_slice(&kv.value).map_err(|e| Mismatch::Damaged(e.to_string()))?;
        return compare(&mine, &theirs);
    }
}

/// Whether `mine` may serve the cluster recorded as `theirs`.
pub fn compare(mine: &Identity, theirs: &Identity) -> Result<(), Mismatch> {
    if mine.ca != theirs.ca {
        return Err(Mismatch::Differs {
            what: "cluster CA",
            mine: mine.ca.clone(),
            theirs: theirs.ca.clone(),
        });
    }
    if mine.secrets_key != theirs.secrets_key {
        return Err(Mismatch::Differs {
            what: "Secrets key",
            mine: mine.secrets_key.clone(),
            theirs: theirs.secrets_key.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ca: &str, key: &str) -> Identity {
        Identity {
            ca: ca.into(),
            secrets_key: key.into(),
        }
    }

    #[test]
    fn only_the_same_ca_and_key_may_serve_a_cluster() {
        assert!(compare(&id("a", "k"), &id("a", "k")).is_ok());
        let e = compare(&id("b", "k"), &id("a", "k")).expect_err("ca");
        assert!(e.to_string().contains("cluster CA differs"), "{e}");
        assert!(e.to_string().contains("copy ca.crt"), "{e}");
        let e = compare(&id("a", "j"), &id("a", "k")).expect_err("key");
        assert!(e.to_string().contains("Secrets key differs"), "{e}");
    }

    #[tokio::test]
    async fn the_first_controller_records_and_the_next_are_checked() {
        let store = crate::store::SqliteStore::open_in_memory().expect("store");
        let ca: Fingerprint = "ab".repeat(32).parse().expect("fingerprint");
        let other: Fingerprint = "cd".repeat(32).parse().expect("fingerprint");
        check(&store, &ca, "k1").await.expect("recorded");
        let writes = store.write_count();
        check(&store, &ca, "k1").await.expect("same cluster");
        assert_eq!(store.write_count(), writes, "checking writes nothing");
        assert!(matches!(
            check(&store, &other, "k1").await,
            Err(Mismatch::Differs {
                what: "cluster CA",
                ..
            })
        ));
        assert!(matches!(
            check(&store, &ca, "k2").await,
            Err(Mismatch::Differs {
                what: "Secrets key",
                ..
            })
        ));
    }
}
