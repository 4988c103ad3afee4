//! Bramble's vocabulary: the manifest kinds and their validation, the agent⇄controller
//! wire messages, the REST types, resource quantities and durations. Pure: no I/O and no
//! async runtime, so every other crate (and every test) can use it.
//!
//! # Glossary
//! - **Workload**: what the user wants, one manifest: a Service, Wallet, CronJob or Job.
//! - **Task**: one replica of a Service, the one instance of a Wallet, one run of a Job
//!   or one firing of a CronJob. The controller creates tasks from workloads.
//! - **Node**: one machine (a Pi) with an agent.
//! - **Placement**: the scheduler's choice of a node for a task.
//! - **Container**: a task as observed on its node, in Docker.
//! - **Event**: a record of a decision or a change, with time, object and reason.
//!
//! # Layout
//! - [`manifest`]: the kinds and their fields.
//! - [`parse`]: multi-document YAML parsing and validation with file:line:column errors.
//! - [`quantity`], [`duration`]: `250m`, `64Mi`, `30s`.
//! - [`endpoints`]: workload addresses, the routing table agents get, name lookup.
//! - [`backoff`]: the one exponential back-off schedule every retry uses.
//! - [`schedule`]: CronJob schedules (cron expression + time zone) and their firings.
//! - [`task`]: tasks, their specs, phases and Docker labels.
//! - [`token`]: the join token, with the cluster CA's fingerprint.
//! - [`wire`]: agent⇄controller messages.
//! - [`health`]: node health details (disks, containers, Pi throttling) and their decoding.
//! - [`host_path`]: the rules every `hostPath` volume follows on every node.
//! - [`rest`]: REST request and response bodies.
//! - [`error_chain`]: an error and its causes on one line.
//! - `yaml` (private): YAML text as placed nodes and the serde deserializer over them that
//!   [`parse`] uses, with nesting and size limits.

pub mod backoff;
pub mod diff;
pub mod duration;
pub mod elf;
pub mod endpoints;
pub mod glob;
pub mod health;
pub mod host_path;
pub mod manifest;
pub mod parse;
pub mod quantity;
pub mod reason;
pub mod rest;
pub mod schedule;
pub mod status;
pub mod task;
pub mod token;
pub mod wire;
mod yaml;

/// This release's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its causes on one line (`outer: inner: innermost`), for logs and for
/// messages that leave the process, where the chain cannot be walked any more (many
/// libraries' own message is only the outermost, "error sending request").
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
