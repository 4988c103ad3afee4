//! `cordon NODE`, `uncordon NODE`.

use std::io::Write;

use anyhow::Result;

use super::not_found;
use crate::client::Client;

/// Marks the node unschedulable (`cordon`) or schedulable again; both are idempotent.
pub async fn run(client: &Client, node: &str, cordon: bool, out: &mut dyn Write) -> Result<()> {
    let view = if cordon {
        client.cordon(node).await
    } else {
        client.uncordon(node).await
    }
    .map_err(|e| not_found(e, "node", node))?;
    let done = if cordon { "cordoned" } else { "uncordoned" };
    writeln!(out, "node/{} {done}", view.info.name)?;
    Ok(())
}
