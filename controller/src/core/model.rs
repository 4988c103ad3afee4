//! What the controller keeps in the store, and under which keys.
//!
//! | key | value |
//! | --- | --- |
//! | `/workloads/{kind}/{name}` | [`StoredWorkload`] |
//! | `/tasks/{id}` | [`bramble_api::task::Task`] |
//! | `/nodes/{name}` | [`StoredNode`] |
//! | `/cronfirings/{job}/{slot}` | [`bramble_api::rest::Firing`] (see [`super::cron`]) |
//! | `/cronstate/{job}` | [`CronState`] |
//! | `/events/{writer}-{n}` | [`StoredEvents`]: the events of one commit |
//! | `/secrets/{name}` | [`StoredSecret`]: values sealed (see [`super::secrets`]) |
//!
//! Values are JSON (the `state` layer encodes them). Heartbeats and metrics are never
//! stored: the store is written only when desired or observed state really changes, so
//! an SD card is not worn out by a cluster at rest.

use std::collections::BTreeMap;

use bramble_api::manifest::{Kind, Manifest};
use bramble_api::rest::Severity;
use bramble_api::task::TaskSpec;
use bramble_api::wire::NodeInfo;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Prefix of all workload keys.
pub const WORKLOADS: &str = "/workloads/";
/// Prefix of all task keys.
pub const TASKS: &str = "/tasks/";
/// Prefix of all node keys.
pub const NODES: &str = "/nodes/";
/// Prefix of all CronJob firing records.
pub const FIRINGS: &str = "/cronfirings/";
/// Prefix of per-CronJob operator state (`cron suspend|resume`).
pub const CRON_STATE: &str = "/cronstate/";
/// Prefix of event records.
pub const EVENTS: &str = "/events/";
/// Prefix of Secrets.
pub const SECRETS: &str = "/secrets/";

/// Prefix of the leader's suspicions of silent nodes (see [`Suspicion`]).
pub const SUSPECTS: &str = "/suspects/";

/// Key of a Secret.
pub fn secret_key(name: &str) -> String {
    format!("{SECRETS}{name}")
}

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

/// Key of the suspicion of one node.
pub fn suspect_key(node: &str) -> String {
    format!("{SUSPECTS}{node}")
}

/// Key of a CronJob's operator state.
pub fn cron_state_key(job: &str) -> String {
    format!("{CRON_STATE}{job}")
}

/// Prefix of one CronJob's firing records.
pub fn firings_prefix(job: &str) -> String {
    format!("{FIRINGS}{job}/")
}

/// What a stored key holds, by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `/workloads/…`
    Workload,
    /// `/tasks/…`
    Task,
    /// `/nodes/…`
    Node,
    /// `/cronfirings/…`
    Firing,
    /// `/cronstate/…`
    CronState,
    /// `/events/…`
    Events,
    /// `/secrets/…`
    Secret,
    /// `/suspects/…`
    Suspect,
}

impl KeyKind {
    /// The kind of `key`, or `None` for a key Bramble does not own.
    pub fn of(key: &str) -> Option<KeyKind> {
        [
            (WORKLOADS, KeyKind::Workload),
            (TASKS, KeyKind::Task),
            (NODES, KeyKind::Node),
            (FIRINGS, KeyKind::Firing),
            (CRON_STATE, KeyKind::CronState),
            (EVENTS, KeyKind::Events),
            (SECRETS, KeyKind::Secret),
            (SUSPECTS, KeyKind::Suspect),
        ]
        .into_iter()
        .find(|(p, _)| key.starts_with(p))
        .map(|(_, k)| k)
    }
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
    /// Its stable address ([`bramble_api::endpoints`]): given once by the leader,
    /// kept across every update, freed when the workload is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
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
            address: None,
        }
    }

    /// The same workload with its spec hash set (a hash that also follows the Secrets
    /// it references, see [`super::secrets::spec_hash`]).
    pub fn with_spec_hash(mut self, spec_hash: String) -> StoredWorkload {
        self.spec_hash = spec_hash;
        self
    }

    /// The same workload with a new manifest and spec hash, or `None` if neither
    /// changed.
    pub fn updated(
        &self,
        manifest: Manifest,
        spec_hash: String,
        now: DateTime<Utc>,
    ) -> Option<StoredWorkload> {
        if manifest == self.manifest && spec_hash == self.spec_hash {
            return None;
        }
        Some(StoredWorkload {
            spec_hash,
            manifest,
            generation: self.generation + 1,
            created_at: self.created_at,
            updated_at: now,
            address: self.address,
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

/// A sealed value as stored: `v1:` then base64 of nonce, ciphertext and tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(pub String);

/// The leader has not heard a node that runs a Wallet and is about to treat its Wallets
/// as stopped. Written before the Wallet is placed anywhere else, so that every other
/// controller stops vouching for the node first (see `core::health::HealthConfig`);
/// deleted once the leader hears the node again. Written only on a failure, never at
/// rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suspicion {
    /// The node.
    pub node: String,
    /// The controller (leader) that wrote it.
    pub by: String,
    /// When, by that controller's wall clock (for people; no decision reads it).
    pub at: DateTime<Utc>,
}

/// A Secret as stored: labels in the clear, values sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSecret {
    /// Name.
    pub name: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Sealed values by key.
    pub data: BTreeMap<String, Sealed>,
    /// Bumped whenever a value, a key or a label changes.
    pub generation: u64,
    /// First applied.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl StoredSecret {
    /// What goes into the spec hash of the workloads that reference this Secret: it
    /// changes whenever a value does (and when the Secret is made anew), and says
    /// nothing about the values.
    pub fn version(&self) -> String {
        format!(
            "{}@{}.{}",
            self.name,
            self.generation,
            self.created_at.timestamp_millis()
        )
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
    /// SHA-256 (hex) of the node's own credential, set at its first join; the name is
    /// admitted only with that credential. Never shown by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Operator overrides for one CronJob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CronState {
    /// Suspended by `bramblectl cron suspend`.
    pub suspended: bool,
    /// When it was last resumed: slots before it are neither fired nor missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<DateTime<Utc>>,
}

/// One event as stored; its sequence number comes from the revision that stored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Normal or Warning.
    pub severity: Severity,
    /// `task/…`, `node/…`, `service/…`.
    pub object: String,
    /// One CamelCase word.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// The events of one commit, stored under one key in the same transaction as the
/// change they describe: one op whatever their number, and a key no other writer can
/// pick (it carries the writer's id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvents {
    /// The events, in the order they were drafted.
    pub events: Vec<StoredEvent>,
}

/// How many events one commit may carry: the low bits of an event's sequence number
/// (see [`event_seq`]).
pub const EVENTS_PER_COMMIT: u64 = 1 << 20;

/// The sequence number of the `index`-th event stored at `revision`: increasing in
/// commit order across every controller sharing the store, since revisions are.
pub fn event_seq(revision: u64, index: usize) -> u64 {
    revision
        .saturating_mul(EVENTS_PER_COMMIT)
        .saturating_add(index as u64 % EVENTS_PER_COMMIT)
}

/// A value read from the store with its revisions, for compare-and-swap.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its key's mod revision: what a compare-and-swap checks.
    pub rev: u64,
    /// Its key's create revision: the revision that made it, kept across updates.
    pub created: u64,
}
