//! `delete KIND NAME…` and `delete -f FILE|DIR|-`.

use std::io::Write;

use anyhow::Result;
use bramble_api::manifest::Kind;
use bramble_api::parse::parse_sources;

use crate::args::DeleteArgs;
use crate::client::Client;
use crate::error::{usage, Failure, EXIT_FAILURE};
use crate::output::{object_ref, Resource};
use crate::sources;

/// Deletes each workload in turn; a missing one is reported and the rest still go.
pub async fn run(client: &Client, args: &DeleteArgs, out: &mut dyn Write) -> Result<()> {
    let targets = targets(args)?;
    let mut missing = 0;
    for (kind, name) in &targets {
        let r = object_ref(*kind, name);
        match client.delete_workload(*kind, name).await {
            Ok(_) => writeln!(out, "{r} deleted")?,
            Err(e) if e.is_not_found() => {
                if !args.ignore_not_found {
                    out.flush()?;
                    let _ = writeln!(std::io::stderr(), "error: {r} not found");
                    missing += 1;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if missing > 0 {
        return Err(Failure::Reported(EXIT_FAILURE).into());
    }
    Ok(())
}

/// The workloads the arguments name, in order.
fn targets(args: &DeleteArgs) -> Result<Vec<(Kind, String)>> {
    if !args.files.is_empty() {
        if !args.names.is_empty() {
            return Err(usage("give either -f or KIND NAME, not both"));
        }
        let sources = sources::read(&args.files, &mut std::io::stdin().lock())?;
        let docs = parse_sources(&sources).map_err(|errors| Failure::Invalid {
            errors,
            action: "deleted",
        })?;
        if docs.is_empty() {
            anyhow::bail!("no objects passed to delete: the files hold no manifests");
        }
        return Ok(docs
            .into_iter()
            .map(|d| (d.manifest.kind, d.manifest.metadata.name.to_string()))
            .collect());
    }
    let Some(resource) = &args.resource else {
        return Err(usage(
            "name what to delete: KIND NAME, KIND/NAME or -f FILE",
        ));
    };
    let kind = match resource.resource {
        Resource::Workloads(Some(kind)) => kind,
        Resource::Workloads(None) => {
            return Err(usage(
                "name the workload's kind: service, wallet, cronjob or job",
            ))
        }
        Resource::Tasks => {
            return Err(usage(
                "tasks cannot be deleted: delete or change the workload that owns them",
            ))
        }
        Resource::Nodes => {
            return Err(usage(
                "nodes cannot be deleted with bramblectl: stop the node's agent",
            ))
        }
    };
    let names: Vec<String> = resource.name.iter().chain(&args.names).cloned().collect();
    if names.is_empty() {
        return Err(usage(format!("name the {} to delete", kind.path())));
    }
    Ok(names.into_iter().map(|n| (kind, n)).collect())
}
