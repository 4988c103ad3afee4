//! `version`.

use std::io::Write;

use anyhow::Result;

use crate::args::{Global, VersionArgs};

/// Prints the client's version, then the server's; an unreachable server is an error
/// after the client's line, as with kubectl.
pub async fn run(args: &VersionArgs, global: &Global, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Client Version: {}", env!("CARGO_PKG_VERSION"))?;
    if args.client {
        return Ok(());
    }
    out.flush()?;
    let client = super::connect(global)?;
    let v = client.version().await?;
    writeln!(
        out,
        "Server Version: {} (api {}, agent protocol {})",
        v.version, v.api_version, v.protocol
    )?;
    Ok(())
}
