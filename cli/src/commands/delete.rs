//! `delete KIND NAME…`, `delete -f FILE|DIR|-`, `delete node NAME…` and
//! `delete secret NAME…`.

use std::io::Write;

use anyhow::Result;
use bramble_api::manifest::Kind;
use bramble_api::parse::parse_sources;

use crate::args::DeleteArgs;
use crate::client::Client;
use crate::error::{usage, Failure, EXIT_FAILURE};
use crate::output::{object_ref, Resource};
use crate::sources;

/// What to delete.
enum Target {
    Workload(Kind, String),
    Node(String),
    Secret(String),
}

/// Deletes each workload (or node) in turn; a missing one is reported and the rest
/// still go.
pub async fn run(client: &Client, args: &DeleteArgs, out: &mut dyn Write) -> Result<()> {
    let targets = match (&args.resource, args.all || args.selector.is_some()) {
        (Some(r), true) => selected(client, args, r).await?,
        _ => targets(args)?,
    };
    if targets.is_empty() {
        let _ = writeln!(std::io::stderr(), "No workloads found.");
        return Ok(());
    }
    let mut missing = 0;
    for target in &targets {
        let (r, result) = match target {
            Target::Workload(kind, name) => (
                object_ref(*kind, name),
                client.delete_workload(*kind, name).await.map(|_| ()),
            ),
            Target::Node(name) => (
                format!("node/{name}"),
                client.delete_node(name).await.map(|_| ()),
            ),
            Target::Secret(name) => (
                format!("secret/{name}"),
                client.delete_secret(name).await.map(|_| ()),
            ),
        };
        match result {
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

/// `delete KIND --all` and `delete KIND -l SELECTOR`: the workloads of the kind (of
/// every kind for `workloads`) that match.
async fn selected(
    client: &Client,
    args: &DeleteArgs,
    resource: &crate::args::ResourceArg,
) -> Result<Vec<Target>> {
    if resource.all {
        return Err(usage(
            "delete all is not a type: use delete workloads --all",
        ));
    }
    if resource.name.is_some() || !args.names.is_empty() {
        return Err(usage("--all and -l select by themselves: give no NAME"));
    }
    let Resource::Workloads(kind) = resource.resource else {
        return Err(usage(format!(
            "--all and -l delete workloads: name a kind (service, wallet, cronjob, job) or workloads, not {}",
            resource.resource
        )));
    };
    let mut ws = client.workloads(kind).await?;
    ws.retain(|w| kind.is_none_or(|k| w.manifest.kind == k));
    if let Some(s) = &args.selector {
        ws.retain(|w| s.matches(&w.manifest.metadata.labels));
    }
    ws.sort_by(|a, b| {
        (a.manifest.kind, a.manifest.metadata.name.as_str())
            .cmp(&(b.manifest.kind, b.manifest.metadata.name.as_str()))
    });
    Ok(ws
        .into_iter()
        .map(|w| Target::Workload(w.manifest.kind, w.manifest.metadata.name.to_string()))
        .collect())
}

/// What the arguments name, in order.
fn targets(args: &DeleteArgs) -> Result<Vec<Target>> {
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
        // Workloads first: a Secret still referenced cannot go.
        let workloads = docs
            .workloads
            .into_iter()
            .map(|d| Target::Workload(d.manifest.kind, d.manifest.metadata.name.to_string()));
        let secrets = docs
            .secrets
            .into_iter()
            .map(|d| Target::Secret(d.secret.metadata.name.to_string()));
        return Ok(workloads.chain(secrets).collect());
    }
    let Some(resource) = &args.resource else {
        return Err(usage(
            "name what to delete: KIND NAME, KIND/NAME or -f FILE",
        ));
    };
    if resource.all {
        return Err(usage(
            "delete all is not a type: use delete workloads --all",
        ));
    }
    let kind =
        match resource.resource {
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
            Resource::Endpoints => {
                return Err(usage(
                    "endpoints cannot be deleted: they come and go with their workloads",
                ))
            }
            Resource::Volumes => {
                return Err(usage(
                    "volumes are not deleted by Bramble: a volume stays when its workload goes, and data set aside stays until the operator removes it from the node (its path: bramblectl describe volume NAME)",
                ))
            }
            Resource::Controllers => return Err(usage(
                "controllers cannot be deleted: stop the controller; it leaves the list at once",
            )),
            Resource::Secrets => {
                let names: Vec<String> = resource.name.iter().chain(&args.names).cloned().collect();
                if names.is_empty() {
                    return Err(usage("name the secret to delete"));
                }
                return Ok(names.into_iter().map(Target::Secret).collect());
            }
            Resource::Nodes => {
                // A node (and its credential) goes only once its agent is stopped; the
                // controller refuses otherwise.
                let names: Vec<String> = resource.name.iter().chain(&args.names).cloned().collect();
                if names.is_empty() {
                    return Err(usage("name the node to delete"));
                }
                return Ok(names.into_iter().map(Target::Node).collect());
            }
        };
    let names: Vec<String> = resource.name.iter().chain(&args.names).cloned().collect();
    if names.is_empty() {
        return Err(usage(format!("name the {} to delete", kind.path())));
    }
    Ok(names
        .into_iter()
        .map(|n| Target::Workload(kind, n))
        .collect())
}
