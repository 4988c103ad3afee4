//! `scale KIND/NAME --replicas N`.

use std::io::Write;

use anyhow::Result;
use bramble_api::manifest::Kind;

use super::not_found;
use crate::args::ScaleArgs;
use crate::client::Client;
use crate::error::usage;
use crate::output::Resource;

/// Sets a Service's replicas: the controller adds or removes tasks.
pub async fn run(client: &Client, args: &ScaleArgs, out: &mut dyn Write) -> Result<()> {
    let name = args
        .target
        .with_name(&args.name)?
        .ok_or_else(|| usage("name what to scale: scale service/NAME --replicas N"))?;
    let Resource::Workloads(Some(kind)) = args.target.resource else {
        return Err(usage(format!(
            "only a Service has replicas to scale, not {}",
            args.target.resource
        )));
    };
    let r = client
        .scale(kind, &name, args.replicas)
        .await
        .map_err(|e| not_found(e, kind.path(), &name))?;
    let what = format!("{}/{}", Kind::path(r.kind), r.name);
    if r.previous == r.replicas {
        writeln!(out, "{what} unchanged ({} replicas)", r.replicas)?;
    } else {
        writeln!(
            out,
            "{what} scaled from {} to {} replicas",
            r.previous, r.replicas
        )?;
    }
    Ok(())
}
