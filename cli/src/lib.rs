//! `bramblectl`: a kubectl-like client for a Bramble controller's REST API.
//!
//! `main.rs` parses the command line and calls [`run`]; a failure is turned into one
//! line on stderr and an exit code by [`report`] (see [`error`] for the codes).
//!
//! # Layout
//! - [`args`]: the command line (clap).
//! - [`client`]: the typed HTTP client for `/v1/…`.
//! - [`config`]: the config file with its contexts, and which server and token to use.
//! - [`commands`]: one module per command, doing the I/O.
//! - [`describe`]: `describe` pages, rendered from API objects (pure).
//! - [`table`]: borderless aligned tables (pure).
//! - [`output`]: ages, output formats, resource names, one-line io errors (pure).
//! - [`sources`]: reading manifest files and directories for `apply -f`.
//! - [`error`]: exit codes and error reporting.

pub mod args;
pub mod client;
pub mod commands;
pub mod config;
pub mod describe;
pub mod error;
pub mod jsonpath;
pub mod output;
pub mod selector;
pub mod sources;
pub mod suggest;
pub mod table;

pub use args::Cli;
pub use error::report;

/// Runs one command line, writing its output to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    commands::run(cli, &mut out).await
}
