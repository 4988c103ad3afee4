//! What the controller keeps in the store, and under which keys.
//!
//! | key | value |
//! | --- | --- |
//! | `/workloads/{kind}/{name}` | [`StoredWorkload`] |
//! | `/tasks/{id}` | [`bramble_api::task::Task`] |
//! | `/nodes/{name}` | [`StoredNode`] |
//!
//! Values are JSON. Heartbeats and metrics are never stored (see `nodes`): the store is
//! written only when desired or observed state really changes, so an SD card is not
//! worn out by a cluster at rest.

use bramble_api::manifest::{Kind, Manifest};
use bramble_api::task::{Task, TaskSpec};
use bramble_api::wire::NodeInfo;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{KeyValue, Store};

/// Prefix of all workload keys.
pub const WORKLOADS: &str = "/workloads/";
/// Prefix of all task keys.
pub const TASKS: &str = "/tasks/";
/// Prefix of all node keys.
pub const NODES: &str = "/nodes/";

/// Key of a workload.
pub fn workload_key(kind: Kind, name: &str) -> String {
    format!("{WORKLOADS}{}/{name}", kind.path())
}

/// Key of a task.
pub fn task_key(id: &str) -> String {
    format!("{TASKS}{id}")
}

/// Key of a node.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// A workload as stored: the manifest as applied plus bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredWorkload {
    /// The manifest as applied.
    pub manifest: Manifest,
    /// Bumped on every change of the manifest.
    pub generation: u64,
    /// Hash of the container part; tasks with another hash are replaced.
    pub spec_hash: String,
    /// First applied.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl StoredWorkload {
    /// A new workload at generation 1.
    pub fn new(manifest: Manifest, now: DateTime<Utc>) -> StoredWorkload {
        let spec_hash = TaskSpec::from_manifest(&manifest).hash();
        StoredWorkload {
            manifest,
            generation: 1,
            spec_hash,
            created_at: now,
            updated_at: now,
        }
    }

    /// The same workload with a new manifest, or `None` if the manifest is unchanged.
    pub fn updated(&self, manifest: Manifest, now: DateTime<Utc>) -> Option<StoredWorkload> {
        if manifest == self.manifest {
            return None;
        }
        Some(StoredWorkload {
            spec_hash: TaskSpec::from_manifest(&manifest).hash(),
            manifest,
            generation: self.generation + 1,
            created_at: self.created_at,
            updated_at: now,
        })
    }

    /// Kind.
    pub fn kind(&self) -> Kind {
        self.manifest.kind
    }

    /// Name.
    pub fn name(&self) -> &str {
        self.manifest.metadata.name.as_str()
    }
}

/// A node as stored: what it reported at registration, and the operator's cordon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredNode {
    /// As reported by the agent.
    pub info: NodeInfo,
    /// Kept free of new tasks.
    #[serde(default)]
    pub cordoned: bool,
    /// First registration.
    pub registered_at: DateTime<Utc>,
}

/// A value read from the store with its revision, for compare-and-swap.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its key's mod revision.
    pub rev: u64,
}

/// A value in the store that does not decode: someone wrote it by hand, or a newer
/// release wrote it. Reported, never silently dropped.
#[derive(Debug, thiserror::Error)]
#[error("stored value at {key} does not decode")]
pub struct DecodeError {
    /// The key.
    pub key: String,
    /// Why.
    #[source]
    pub source: serde_json::Error,
}

/// Decodes one stored value.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, DecodeError> {
    serde_json::from_slice(&kv.value)
        .map(|value| Versioned {
            value,
            rev: kv.mod_revision,
        })
        .map_err(|source| DecodeError {
            key: kv.key.clone(),
            source,
        })
}

/// Encodes a value for the store.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("stored types always serialize")
}

/// Reads every value under `prefix`. Values that do not decode are logged and skipped,
/// so one bad row cannot stop the controller; they stay in the store untouched.
pub fn list<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> crate::store::Result<Vec<Versioned<T>>> {
    let mut out = Vec::new();
    for kv in store.list(prefix)? {
        match decode(&kv) {
            Ok(v) => out.push(v),
            Err(e) => {
                tracing::error!(key = %e.key, error = %e.source, "skipping undecodable store value")
            }
        }
    }
    Ok(out)
}

/// Reads one value.
pub fn get<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<Versioned<T>>, crate::Error> {
    match store.get(key)? {
        None => Ok(None),
        Some(kv) => Ok(Some(decode(&kv)?)),
    }
}

/// A task's key.
pub fn key_of(task: &Task) -> String {
    task_key(&task.id)
}
