//! `describe node|task|KIND [NAME]`.

use std::io::Write;

use anyhow::{bail, Result};
use bramble_api::manifest::Kind;
use bramble_api::rest::{CronJobView, Event, WorkloadView};
use bramble_api::task::Task;
use chrono::Utc;

use super::get::sort_tasks;
use super::not_found;
use crate::args::DescribeArgs;
use crate::client::Client;
use crate::describe;
use crate::output::{ObjectRef, Resource};

/// Prints one object's page, or every object's of the type when no name is given.
pub async fn run(client: &Client, args: &DescribeArgs, out: &mut dyn Write) -> Result<()> {
    let name = args.resource.with_name(&args.name)?;
    let now = Utc::now();
    let mut pages = Vec::new();
    match args.resource.resource {
        Resource::Nodes => {
            let nodes = super::nodes(client, name.as_deref()).await?;
            let mut events = Events::new(nodes.len());
            for n in &nodes {
                let mut tasks = client.tasks(None, Some(&n.info.name)).await?;
                sort_tasks(&mut tasks);
                let ev = events.of(client, &[ObjectRef::node(&n.info.name)]).await?;
                pages.push(describe::node(n, &tasks, ev.as_deref(), now));
            }
        }
        Resource::Secrets => {
            let secrets = match &name {
                Some(n) => vec![client
                    .secret(n)
                    .await
                    .map_err(|e| not_found(e, "secret", n))?],
                None => client.secrets().await?,
            };
            let mut events = Events::new(secrets.len());
            for s in &secrets {
                let ev = events.of(client, &[ObjectRef::secret(&s.name)]).await?;
                pages.push(describe::secret(s, ev.as_deref(), now));
            }
        }
        Resource::Endpoints => {
            let endpoints = match &name {
                Some(n) => vec![client
                    .endpoint(n)
                    .await
                    .map_err(|e| super::not_found(e, "endpoint", n))?],
                None => client.endpoints().await?,
            };
            for e in &endpoints {
                pages.push(describe::endpoint_page(e));
            }
        }
        Resource::Volumes => {
            let volumes = match &name {
                Some(n) => vec![client
                    .volume(n)
                    .await
                    .map_err(|e| super::not_found(e, "volume", n))?],
                None => client.volumes().await?,
            };
            let mut events = Events::new(volumes.len());
            for v in &volumes {
                let ev = events.of(client, &[ObjectRef::volume(&v.name)]).await?;
                pages.push(describe::volume_page(v, ev.as_deref(), now));
            }
        }
        Resource::Controllers => {
            let mut controllers = client.controllers().await?;
            if let Some(n) = &name {
                controllers.retain(|c| &c.name == n || &c.id == n);
                if controllers.is_empty() {
                    bail!("controller {n:?} not found (names and ids: bramblectl get controllers)");
                }
            }
            for c in &controllers {
                pages.push(describe::controller(c, now));
            }
        }
        Resource::Tasks => {
            let tasks = match &name {
                Some(id) => vec![client
                    .task(id)
                    .await
                    .map_err(|e| not_found(e, "task", id))?],
                None => {
                    let mut v = client.tasks(None, None).await?;
                    sort_tasks(&mut v);
                    v
                }
            };
            let mut events = Events::new(tasks.len());
            for t in &tasks {
                let ev = events.of(client, &[ObjectRef::task(&t.id)]).await?;
                pages.push(describe::task(t, ev.as_deref(), now));
            }
        }
        Resource::Workloads(kind) => {
            let workloads = match (&name, kind) {
                (Some(n), Some(k)) => vec![client
                    .workload(k, n)
                    .await
                    .map_err(|e| not_found(e, k.path(), n))?],
                _ => {
                    let mut v = client.workloads(kind).await?;
                    v.retain(|w| {
                        kind.is_none_or(|k| w.manifest.kind == k)
                            && name
                                .as_ref()
                                .is_none_or(|n| w.manifest.metadata.name.as_str() == n)
                    });
                    v.sort_by(|a, b| {
                        (a.manifest.kind, a.manifest.metadata.name.as_str())
                            .cmp(&(b.manifest.kind, b.manifest.metadata.name.as_str()))
                    });
                    if let (Some(n), true) = (&name, v.is_empty()) {
                        bail!("workload {n:?} not found");
                    }
                    v
                }
            };
            // One request for every task when describing many workloads.
            let only = match workloads.as_slice() {
                [one] => Some(one.manifest.metadata.name.as_str()),
                _ => None,
            };
            let tasks = client.tasks(only, None).await?;
            // Older controllers have no endpoints: describe works without them.
            let endpoints = client.endpoints().await.unwrap_or_default();
            let crons = cron_views(client, &workloads).await?;
            let mut events = Events::new(workloads.len());
            for w in &workloads {
                let (kind, name) = (w.manifest.kind, w.manifest.metadata.name.as_str());
                let mut mine = of_workload(&tasks, kind, name);
                sort_tasks(&mut mine);
                let cron = crons
                    .iter()
                    .find(|c| kind == Kind::CronJob && c.name == name);
                // The workload's own events and its tasks', gone ones included.
                let objects = [ObjectRef::workload(kind, name), ObjectRef::task(name)];
                let ev = events.of(client, &objects).await?;
                let endpoint = endpoints.iter().find(|e| e.kind == kind && e.name == name);
                pages.push(describe::workload(
                    w,
                    cron,
                    endpoint,
                    &mine,
                    ev.as_deref(),
                    now,
                ));
            }
        }
    }
    if pages.is_empty() {
        let _ = writeln!(std::io::stderr(), "No {} found.", args.resource.resource);
    }
    write!(out, "{}", pages.join("\n"))?;
    Ok(())
}

/// The cronjob views of the CronJobs among `workloads`: one request for one, one for
/// all when there are more. A 404 (a controller without cronjob views, or a CronJob
/// deleted meanwhile) leaves the pages without their `Runs:` history.
async fn cron_views(client: &Client, workloads: &[WorkloadView]) -> Result<Vec<CronJobView>> {
    let names: Vec<&str> = workloads
        .iter()
        .filter(|w| w.manifest.kind == Kind::CronJob)
        .map(|w| w.manifest.metadata.name.as_str())
        .collect();
    let views = match names.as_slice() {
        [] => return Ok(Vec::new()),
        [one] => client.cronjob(one).await.map(|v| vec![v]),
        _ => client.cronjobs().await,
    };
    match views {
        Ok(v) => Ok(v),
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn of_workload(tasks: &[Task], kind: Kind, name: &str) -> Vec<Task> {
    tasks
        .iter()
        .filter(|t| t.kind == kind && t.workload == name)
        .cloned()
        .collect()
}

/// Where the `Events:` sections come from: one request per object when describing one,
/// one for every event when describing many; nothing more once the controller has said
/// it has no events endpoint (404: older than events).
enum Events {
    PerObject,
    AllNotYetFetched,
    All(Vec<Event>),
    Unsupported,
}

impl Events {
    fn new(pages: usize) -> Events {
        if pages > 1 {
            Events::AllNotYetFetched
        } else {
            Events::PerObject
        }
    }

    /// The events of any of `objects`, oldest first; `None` without an events endpoint.
    async fn of(&mut self, client: &Client, objects: &[ObjectRef]) -> Result<Option<Vec<Event>>> {
        let mut found = Vec::new();
        match self {
            Events::Unsupported => return Ok(None),
            Events::AllNotYetFetched | Events::All(_) => {
                if let Events::AllNotYetFetched = self {
                    *self = match client.events(None).await {
                        Ok(all) => Events::All(all),
                        Err(e) if e.is_not_found() => Events::Unsupported,
                        Err(e) => return Err(e.into()),
                    };
                }
                let Events::All(all) = self else {
                    return Ok(None);
                };
                found.extend(
                    all.iter()
                        .filter(|e| objects.iter().any(|o| o.matches(&e.object)))
                        .cloned(),
                );
            }
            Events::PerObject => {
                for o in objects {
                    match client.events(Some(&o.to_string())).await {
                        Ok(ev) => found.extend(ev.into_iter().filter(|e| o.matches(&e.object))),
                        Err(e) if e.is_not_found() => {
                            *self = Events::Unsupported;
                            return Ok(None);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                // An event matching two of the objects is shown once.
                found.sort_by_key(|e| e.seq);
                found.dedup_by_key(|e| e.seq);
            }
        }
        super::events::sort(&mut found);
        Ok(Some(found))
    }
}
