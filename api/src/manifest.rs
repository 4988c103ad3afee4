//! The manifest kinds (`apiVersion: bramble/v1`): [`Kind::Service`], [`Kind::Wallet`],
//! [`Kind::CronJob`] and [`Kind::Job`], with every field a user can write, and
//! [`SecretManifest`] (`kind: Secret`), the values their env entries may reference.
//!
//! Parsing and validation live in [`crate::parse`]; the types here only describe the
//! shape, so they can be serialized back (`bramblectl get -o yaml`) and sent over the API.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::duration::Duration;
use crate::quantity::{Cpu, Memory};

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "bramble/v1";

/// What a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// N replicas of a long-running container.
    Service,
    /// Exactly one running instance, with fenced failover.
    Wallet,
    /// A container run on a cron schedule.
    CronJob,
    /// A container run to completion once.
    Job,
}

impl Kind {
    /// All kinds, in display order.
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::Wallet, Kind::CronJob, Kind::Job];

    /// The manifest spelling (`CronJob`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Wallet => "Wallet",
            Kind::CronJob => "CronJob",
            Kind::Job => "Job",
        }
    }

    /// The lowercase spelling used in URLs and on the command line (`cronjob`).
    pub fn path(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Wallet => "wallet",
            Kind::CronJob => "cronjob",
            Kind::Job => "job",
        }
    }

    /// Whether tasks of this kind run to completion (and so are not restarted on success).
    pub fn runs_to_completion(self) -> bool {
        matches!(self, Kind::Job | Kind::CronJob)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind name that is not one of Service, Wallet, CronJob, Job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}: expected one of service, wallet, cronjob, job")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;
    /// Case-insensitive, singular or plural, as on a kubectl command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Ok(Kind::Service),
            "wallet" | "wallets" => Ok(Kind::Wallet),
            "cronjob" | "cronjobs" | "cj" => Ok(Kind::CronJob),
            "job" | "jobs" => Ok(Kind::Job),
            _ => Err(UnknownKind(s.to_string())),
        }
    }
}

/// A CPU architecture, named as Docker names platforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// 64-bit x86 (`x86_64`).
    #[serde(alias = "x86_64")]
    Amd64,
    /// 64-bit ARM (`aarch64`): Pi 3/4/5 with a 64-bit userland.
    #[serde(alias = "aarch64")]
    Arm64,
    /// 32-bit ARM (`armv7`, `armhf`): Pi 2/3 with a 32-bit userland.
    #[serde(alias = "armv7", alias = "armhf", alias = "armv7l")]
    Arm,
}

impl Arch {
    /// The architecture of the running binary, which is the userland's architecture.
    pub fn current() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            "arm" => Some(Arch::Arm),
            _ => None,
        }
    }

    /// Docker's spelling (`arm64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Arm => "arm",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest label key, in bytes (node labels and node selectors alike).
pub const MAX_LABEL_KEY: usize = 63;

/// The longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 253;

/// Checks a label key (of `metadata.labels`, `placement.nodeSelector` or a node's
/// `--label`): 1 to [`MAX_LABEL_KEY`] ASCII letters, digits, `-`, `_`, `.` and `/`.
/// The error is the message for people.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= MAX_LABEL_KEY
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {k:?}: use up to 63 letters, digits, '-', '_', '.', '/'"
        ))
    }
}

/// Checks a label value: at most [`MAX_LABEL_VALUE`] bytes, no control characters, no
/// `,` and no `=` (which would break `key=value,key=value` lists).
pub fn check_label_value(v: &str) -> Result<(), String> {
    if v.len() > MAX_LABEL_VALUE || v.chars().any(|c| c.is_control() || c == ',' || c == '=') {
        Err(format!("invalid label value {v:?}"))
    } else {
        Ok(())
    }
}

/// A DNS-label style name: 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a
/// letter and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: use 1 to 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit")]
pub struct NameError(pub String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.last()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ok {
            Ok(Name(s.to_string()))
        } else {
            Err(NameError(s.to_string()))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One manifest document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// What the workload is.
    pub kind: Kind,
    /// Name and labels.
    pub metadata: Metadata,
    /// What to run and how.
    pub spec: WorkloadSpec,
}

/// A workload's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique per kind.
    pub name: Name,
    /// Free-form labels, shown and selectable.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "string_map"
    )]
    pub labels: BTreeMap<String, String>,
}

/// Everything a workload's spec may say. Fields that belong to one kind only
/// (`replicas`, `schedule`, …) are rejected on the others by validation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The container image; pulled if absent, used as is if present locally.
    pub image: String,
    /// Replaces the image ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables; numbers and booleans are taken as their text, and
    /// `{secret: NAME, key: KEY}` takes the value from a Secret.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "env_map"
    )]
    pub env: BTreeMap<String, EnvValue>,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Directories bound into the container: managed volumes and host paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// How the managed volumes follow the workload to another node (Wallets: on by
    /// default, with [`VolumeSync::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<VolumeSync>,
    /// Requested (and enforced) CPU and memory.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Where the workload may run.
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// What happens when the container exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// Health probes.
    #[serde(default, skip_serializing_if = "Probes::is_empty")]
    pub probes: Probes,

    /// Service only: how many copies run (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,

    /// CronJob only: the cron expression (5 fields, or 6 with leading seconds, or `@daily`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// CronJob only: IANA time zone of the schedule (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// CronJob only: what to do when a run is still active at the next slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,
    /// CronJob only: a slot missed by more than this is recorded as missed, not fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline: Option<Duration>,
    /// CronJob only: stop firing without deleting the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// CronJob only: how many finished runs to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,

    /// Job and CronJob: how many times a failed run is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Job and CronJob: a run taking longer is stopped and counted as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// Port inside the container.
    pub container: u16,
    /// Port on the node; absent means not published on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u16>,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// Transport protocol of a port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Port {
    /// The host port it binds, as `PORT/PROTOCOL` (`8080/tcp`); None when it is not
    /// published on the host.
    pub fn host_binding(&self) -> Option<String> {
        self.host.map(|h| format!("{h}/{}", self.protocol.as_str()))
    }
}

impl Protocol {
    fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
    /// Docker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A directory bound into the container: a managed volume (`name`), which the agent
/// keeps under its data dir and which can follow its workload to another node (see
/// [`VolumeSync`]), or an operator-managed `hostPath`. Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// A managed volume's name, unique in the cluster; made on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// Absolute directory on the node; created if missing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    /// Absolute path inside the container.
    pub path: String,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Volume {
    /// The managed volume's name, if it is one.
    pub fn managed(&self) -> Option<&str> {
        self.name.as_ref().map(Name::as_str)
    }
}

/// How a workload's managed volumes follow it: while an instance runs, its agent runs
/// `before` in the container, then sends what changed to `copies` standby nodes, each
/// copy complete or not at all. A Wallet with managed volumes syncs by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSync {
    /// How often (default 1m): writes after the last completed sync are what a
    /// failover can lose.
    #[serde(default = "VolumeSync::default_every")]
    pub every: Duration,
    /// How many standby nodes hold a copy (default 1; 0 turns syncing off).
    #[serde(default = "VolumeSync::default_copies")]
    pub copies: u32,
    /// A command run in the container before each sync (e.g. `litecoin-cli
    /// backupwallet /data/backup.dat`); a sync whose command fails is not made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before: Vec<String>,
    /// Paths never copied: globs relative to the volume (`*`, `?`, `**`; without a `/`
    /// a pattern matches a name at any depth, a leading `/` anchors it at the top, a
    /// trailing `/` matches a directory and all it holds; see [`crate::glob`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl VolumeSync {
    /// The most standby copies a workload may ask for.
    pub const MAX_COPIES: u32 = 5;
    /// The shortest interval.
    pub const MIN_EVERY: Duration = Duration::from_secs(1);

    fn default_every() -> Duration {
        Duration::from_secs(60)
    }
    fn default_copies() -> u32 {
        1
    }
}

impl Default for VolumeSync {
    fn default() -> Self {
        VolumeSync {
            every: VolumeSync::default_every(),
            copies: VolumeSync::default_copies(),
            before: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

/// Requested CPU and memory. They are both what the scheduler reserves on a node and
/// the limits Docker enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU, e.g. `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Memory, e.g. `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
}

impl Resources {
    fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none()
    }
}

/// Where a workload may run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Node labels that must all match.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "string_map"
    )]
    pub node_selector: BTreeMap<String, String>,
    /// Allowed node architectures; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<Arch>,
}

impl Placement {
    fn is_empty(&self) -> bool {
        self.node_selector.is_empty() && self.architectures.is_empty()
    }
}

/// When a container that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Always restart (Service and Wallet default).
    Always,
    /// Restart only after a non-zero exit (Job and CronJob default).
    OnFailure,
    /// Never restart.
    Never,
}

/// Restart policy with back-off and give-up rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Restart {
    /// When to restart.
    pub policy: RestartPolicy,
    /// Delay between restarts.
    #[serde(default)]
    pub backoff: Backoff,
    /// After this many failures within `window` the node gives the task up and it is
    /// placed elsewhere.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// See `max_failures`.
    #[serde(default = "default_window")]
    pub window: Duration,
}

fn default_max_failures() -> u32 {
    5
}
fn default_window() -> Duration {
    Duration::from_secs(600)
}

impl Restart {
    /// The policy a workload of `kind` gets when its manifest names none.
    pub fn default_for(kind: Kind) -> Restart {
        Restart {
            policy: if kind.runs_to_completion() {
                RestartPolicy::Never
            } else {
                RestartPolicy::Always
            },
            backoff: Backoff::default(),
            max_failures: default_max_failures(),
            window: default_window(),
        }
    }
}

/// Exponential back-off: `initial`, doubling, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// First delay.
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,
    /// Largest delay.
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// Liveness and readiness probes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    /// A failing liveness probe restarts the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// A failing readiness probe marks the task not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
}

impl Probes {
    fn is_empty(&self) -> bool {
        self.liveness.is_none() && self.readiness.is_none()
    }
}

/// One health probe: exactly one of `exec`, `http`, `tcp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Command run inside the container; exit code 0 is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// HTTP GET; a 2xx or 3xx answer is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// TCP connect; an accepted connection is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// Time between probes (default 10s).
    #[serde(default = "default_probe_period")]
    pub period: Duration,
    /// A probe taking longer fails (default 5s).
    #[serde(default = "default_probe_timeout")]
    pub timeout: Duration,
    /// Consecutive failures before the probe counts as failed (default 3).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Wait this long after start before the first probe (default 0s).
    #[serde(default)]
    pub initial_delay: Duration,
}

fn default_probe_period() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_failure_threshold() -> u32 {
    3
}

/// HTTP GET probe against the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProbe {
    /// Container port.
    pub port: u16,
    /// Path (default `/`).
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_http_path() -> String {
    "/".to_string()
}

/// TCP connect probe against the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpProbe {
    /// Container port.
    pub port: u16,
}

/// What a CronJob does when a run is still active at the next slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConcurrencyPolicy {
    /// Start the new run anyway.
    #[default]
    Allow,
    /// Skip the new run.
    Forbid,
    /// Stop the active run and start the new one.
    Replace,
}

/// How many finished CronJob runs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct History {
    /// Successful runs kept (default 3).
    #[serde(default = "default_history_ok")]
    pub successful: u32,
    /// Failed runs kept (default 5).
    #[serde(default = "default_history_failed")]
    pub failed: u32,
}

fn default_history_ok() -> u32 {
    3
}
fn default_history_failed() -> u32 {
    5
}

impl Default for History {
    fn default() -> Self {
        History {
            successful: default_history_ok(),
            failed: default_history_failed(),
        }
    }
}

/// One environment variable's value: text, or a reference to a Secret's key, resolved
/// by the controller for the one node that runs the task.
///
/// Text serializes as a plain string, as it always has, so the specs (and hashes) of
/// workloads without references do not change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnvValue {
    /// The value itself.
    Text(String),
    /// The value of a Secret's key.
    Secret(SecretRef),
}

/// `{secret: ltc-rpc, key: password}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SecretRef {
    /// The Secret's name.
    pub secret: Name,
    /// The key in its `data`.
    pub key: String,
}

impl EnvValue {
    /// The reference, if the value is one.
    pub fn secret_ref(&self) -> Option<&SecretRef> {
        match self {
            EnvValue::Secret(r) => Some(r),
            EnvValue::Text(_) => None,
        }
    }
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> EnvValue {
        EnvValue::Text(s.to_string())
    }
}

impl Serialize for EnvValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EnvValue::Text(t) => s.serialize_str(t),
            EnvValue::Secret(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text, a number, a boolean or a {secret, key} reference")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EnvValue, A::Error> {
                const FIELDS: &[&str] = &["secret", "key"];
                let mut secret: Option<Name> = None;
                let mut key: Option<String> = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "secret" if secret.is_none() => secret = Some(map.next_value()?),
                        "key" if key.is_none() => key = Some(map.next_value()?),
                        "secret" | "key" => {
                            return Err(serde::de::Error::duplicate_field(
                                FIELDS[usize::from(k == "key")],
                            ))
                        }
                        other => return Err(serde::de::Error::unknown_field(other, FIELDS)),
                    }
                }
                Ok(EnvValue::Secret(SecretRef {
                    secret: secret.ok_or_else(|| serde::de::Error::missing_field("secret"))?,
                    key: key.ok_or_else(|| serde::de::Error::missing_field("key"))?,
                }))
            }
        }
        d.deserialize_any(V)
    }
}

/// The environment mapping, with the error every other map of text gives when it is not
/// a mapping at all.
fn env_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, EnvValue>, D::Error> {
    struct M;
    impl<'de> serde::de::Visitor<'de> for M {
        type Value = BTreeMap<String, EnvValue>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of names to text, numbers, booleans or {secret, key} references")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, EnvValue>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(M)
}

/// `kind: Secret`: named values that workloads' env entries reference. Only the
/// controller reads `data`; it is stored encrypted and never served back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretManifest {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Always `Secret`.
    pub kind: SecretKind,
    /// Name (unique among Secrets) and labels.
    pub metadata: Metadata,
    /// The values, by key; numbers and booleans are taken as their text.
    #[serde(default, deserialize_with = "secret_map")]
    pub data: BTreeMap<String, crate::token::Secret>,
}

/// The one spelling of a Secret's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretKind {
    /// `kind: Secret`.
    Secret,
}

fn secret_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, crate::token::Secret>, D::Error> {
    Ok(string_map(d)?
        .into_iter()
        .map(|(k, v)| (k, crate::token::Secret(v)))
        .collect())
}

/// A mapping whose values may be written as any YAML scalar (`PORT: 8080`,
/// `DEBUG: true`) and are kept as text, as Docker wants them.
fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        B(bool),
        U(u64),
        I(i64),
        F(f64),
    }
    let raw: Option<BTreeMap<String, Scalar>> = Option::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a mapping of names to text, numbers or booleans")
    })?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::S(s) => s,
                Scalar::B(b) => b.to_string(),
                Scalar::U(u) => u.to_string(),
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl Manifest {
    /// The restart rule in force: the manifest's, or the kind's default.
    pub fn restart(&self) -> Restart {
        self.spec
            .restart
            .unwrap_or_else(|| Restart::default_for(self.kind))
    }

    /// The sync rule in force: the manifest's, a Wallet's default when it has managed
    /// volumes, else none; `copies: 0` is none.
    pub fn sync(&self) -> Option<VolumeSync> {
        let managed = self.spec.volumes.iter().any(|v| v.name.is_some());
        let rule = match (&self.spec.sync, self.kind) {
            (Some(s), _) => Some(s.clone()),
            (None, Kind::Wallet) if managed => Some(VolumeSync::default()),
            (None, _) => None,
        };
        rule.filter(|s| s.copies > 0 && managed)
    }

    /// How many tasks the workload wants running at once.
    pub fn replicas(&self) -> u32 {
        match self.kind {
            Kind::Service => self.spec.replicas.unwrap_or(1),
            Kind::Wallet | Kind::Job => 1,
            Kind::CronJob => 0,
        }
    }
}
