//! `apply -f FILE|DIR|-`.

use std::io::Write;

use anyhow::{bail, Result};
use bramble_api::parse::parse_sources;
use bramble_api::rest::ApplyRequest;

use crate::args::ApplyArgs;
use crate::client::Client;
use crate::error::Failure;
use crate::output::object_ref;
use crate::sources;

/// Validates locally, then sends everything in one request: the controller applies all
/// or nothing.
pub async fn run(client: &Client, args: &ApplyArgs, out: &mut dyn Write) -> Result<()> {
    let sources = sources::read(&args.files, &mut std::io::stdin().lock())?;
    let docs = parse_sources(&sources).map_err(|errors| Failure::Invalid {
        errors,
        action: "applied",
    })?;
    if docs.is_empty() {
        bail!("no objects passed to apply: the files hold no manifests");
    }
    let resp = client
        .apply(&ApplyRequest {
            sources,
            dry_run: args.dry_run,
        })
        .await?;
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for r in &resp.secrets {
        writeln!(out, "secret/{} {}{suffix}", r.name, r.outcome)?;
    }
    for r in &resp.results {
        writeln!(out, "{} {}{suffix}", object_ref(r.kind, &r.name), r.outcome)?;
    }
    Ok(())
}
