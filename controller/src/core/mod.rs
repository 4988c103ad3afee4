//! The pure core: every decision the controller makes, as functions from a snapshot,
//! a request and the time to a [`snapshot::Change`] or a [`error::DomainError`]. No I/O,
//! no clock, no randomness, no store, no HTTP: imports only `bramble-api`, std,
//! chrono and serde, which is what makes it testable without a cluster.
//!
//! # Layout
//! - [`model`]: what is stored under which key.
//! - [`snapshot`]: the stored state at one revision, and the changes decisions return.
//! - [`error`]: why a request is refused.
//! - [`ops`]: apply, delete, cordon, drain, restart; what agents report.
//! - [`reconcile`]: from workloads and tasks to task writes and placements.
//! - [`secrets`]: Secrets sealed at apply, resolved for one node, followed by spec hashes.
//! - [`scheduler`]: which node each pending task goes to, with a reason per rejection.
//! - [`endpoints`]: workload addresses and the routing table agents get.
//! - [`cron`]: CronJob firings exactly once, missed slots, retries, history.
//! - [`health`]: node health from silence, and the Wallet fencing argument.
//! - [`events`]: what a change means, as events.
//! - [`views`]: what the API shows.
//! - [`volumes`]: where a workload's volume data is newest, standby duties, volume events.

pub mod cron;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod health;
pub mod model;
pub mod ops;
pub mod reconcile;
pub mod scheduler;
pub mod secrets;
pub mod snapshot;
pub mod views;
pub mod volumes;

pub use error::DomainError;
pub use snapshot::{Change, Snapshot};
