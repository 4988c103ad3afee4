//! `get nodes|workloads|tasks|services|wallets|cronjobs|jobs|secrets|controllers|endpoints [NAME]`.
//!
//! `get cronjobs` asks the cronjob endpoint (schedules, last and next runs); the other
//! kinds, and `get workloads --kind cronjob`, list workloads.

use std::io::Write;

use anyhow::Result;
use bramble_api::manifest::Kind;
use bramble_api::quantity::Memory;
use bramble_api::rest::{
    format_labels, ControllerView, CronJobView, NodeView, SecretView, WorkloadView,
};
use bramble_api::task::Task;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::not_found;
use crate::args::GetArgs;
use crate::client::Client;
use crate::describe::{
    firing_outcome, memory_limits, node_status, ready, status_cell, status_line,
};
use crate::error::usage;
use crate::output::{
    age, ago, or_none, timestamp, until, write_structured, Format, Output, Resource,
};
use crate::table::{cell, Table};

/// Lists or shows objects; with `--watch`, keeps printing what changes.
pub async fn run(client: &Client, args: &GetArgs, out: &mut dyn Write) -> Result<()> {
    if args.resource.all {
        if args.name.is_some() || args.resource.name.is_some() {
            return Err(usage("get all takes no name"));
        }
        if args.watch {
            return Err(usage("get all cannot --watch: watch one type"));
        }
        return all(client, args, out).await;
    }
    if !args.watch {
        return render(client, args, out).await;
    }
    watch(client, args, out).await
}

/// `get all`: workloads, tasks and cron jobs, each under its heading.
async fn all(client: &Client, args: &GetArgs, out: &mut dyn Write) -> Result<()> {
    let mut first = true;
    for resource in [
        Resource::Workloads(None),
        Resource::Tasks,
        Resource::Workloads(Some(Kind::CronJob)),
    ] {
        let one = GetArgs {
            resource: crate::args::ResourceArg {
                resource,
                name: None,
                all: false,
            },
            name: None,
            output: args.output.clone(),
            kind: None,
            workload: None,
            node: None,
            selector: args.selector.clone(),
            watch: false,
            quiet: true,
        };
        let mut buf = Vec::new();
        render(client, &one, &mut buf).await?;
        if buf.is_empty() {
            continue;
        }
        if !first && matches!(args.output, None | Some(Output::Format(Format::Wide))) {
            writeln!(out)?;
        }
        first = false;
        out.write_all(&buf)?;
    }
    Ok(())
}

/// How often `--watch` looks again when no event has said that something changed
/// (node metrics and ages change without events).
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// `get -w`: the list, then each row again whenever it changes (a row that goes away
/// is printed once more, marked deleted), as kubectl's watch prints. The controller's
/// event stream says when to look again; a poll catches what makes no event.
async fn watch(client: &Client, args: &GetArgs, out: &mut dyn Write) -> Result<()> {
    let table = matches!(args.output, None | Some(Output::Format(Format::Wide)));
    let mut events = client.watch_events(None).await.ok();
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    let mut first = true;
    loop {
        let mut buf = Vec::new();
        render(client, args, &mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        if table {
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let two = header.starts_with("KIND ");
            let mut now_seen = std::collections::BTreeMap::new();
            for line in lines {
                let key: Vec<&str> = line
                    .split_whitespace()
                    .take(if two { 2 } else { 1 })
                    .collect();
                now_seen.insert(key.join(" "), line.to_string());
            }
            if first && !header.is_empty() {
                writeln!(out, "{header}")?;
            }
            for (key, line) in &now_seen {
                if seen.get(key) != Some(line) {
                    writeln!(out, "{line}")?;
                }
            }
            for (key, line) in &seen {
                if !now_seen.contains_key(key) {
                    writeln!(out, "{line}   (deleted)")?;
                }
            }
            seen = now_seen;
        } else if seen.get("") != Some(&text) {
            if !first && matches!(args.output, Some(Output::Format(Format::Yaml))) {
                writeln!(out, "---")?;
            }
            out.write_all(text.as_bytes())?;
            seen.insert(String::new(), text);
        }
        out.flush()?;
        first = false;
        // Wait for an event (then a moment for its burst to settle) or the poll.
        let woke = match events.as_mut() {
            Some(stream) => match tokio::time::timeout(WATCH_POLL, stream.next()).await {
                Ok(Ok(Some(_))) => true,
                Ok(_) => {
                    // The stream ended or broke: poll from now on.
                    events = None;
                    false
                }
                Err(_) => false,
            },
            None => {
                tokio::time::sleep(WATCH_POLL).await;
                false
            }
        };
        if woke {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
    }
}

/// Lists or shows objects once.
async fn render(client: &Client, args: &GetArgs, out: &mut dyn Write) -> Result<()> {
    let name = args.resource.with_name(&args.name)?;
    let resource = args.resource.resource;
    let output = args.output.clone().unwrap_or(Output::Format(Format::Table));
    let format = match &output {
        Output::Format(f) => *f,
        _ => Format::Table,
    };
    let wide = format == Format::Wide;
    let now = Utc::now();
    let sel = args.selector.as_ref();
    if sel.is_some()
        && matches!(
            resource,
            Resource::Controllers | Resource::Endpoints | Resource::Volumes
        )
    {
        return Err(usage(
            "-l applies to nodes, workloads, tasks, cronjobs and secrets (the objects with labels)",
        ));
    }
    // Tasks and cron jobs carry their workload's labels.
    let workload_labels = match (sel, resource) {
        (Some(_), Resource::Tasks | Resource::Workloads(Some(Kind::CronJob))) => client
            .workloads(None)
            .await?
            .into_iter()
            .map(|w| {
                (
                    (w.manifest.kind, w.manifest.metadata.name.to_string()),
                    w.manifest.metadata.labels.clone(),
                )
            })
            .collect(),
        _ => std::collections::HashMap::new(),
    };
    let of_workload = |kind: Kind, name: &str| -> bool {
        sel.is_none_or(|s| {
            workload_labels
                .get(&(kind, name.to_string()))
                .is_some_and(|l| s.matches(l))
        })
    };

    if resource != Resource::Tasks && (args.workload.is_some() || args.node.is_some()) {
        return Err(usage("--workload and --node apply to tasks only"));
    }
    if matches!(
        resource,
        Resource::Nodes
            | Resource::Secrets
            | Resource::Controllers
            | Resource::Endpoints
            | Resource::Volumes
    ) && args.kind.is_some()
    {
        return Err(usage("--kind applies to workloads and tasks only"));
    }
    match resource {
        Resource::Workloads(Some(Kind::CronJob)) => {
            if let Some(k) = args.kind.filter(|k| *k != Kind::CronJob) {
                return Err(usage(format!("--kind {} contradicts {resource}", k.path())));
            }
            let cronjobs = match &name {
                Some(n) => vec![client
                    .cronjob(n)
                    .await
                    .map_err(|e| not_found(e, "cronjob", n))?],
                None => {
                    let mut v = client.cronjobs().await?;
                    v.retain(|c| of_workload(Kind::CronJob, &c.name));
                    v.sort_by(|a, b| a.name.cmp(&b.name));
                    v
                }
            };
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &cronjobs,
                |c| format!("cronjob/{}", c.name),
                || cronjobs_table(&cronjobs, wide, now),
            )
        }
        Resource::Nodes => {
            let mut nodes = super::nodes(client, name.as_deref()).await?;
            nodes.retain(|n| sel.is_none_or(|s| s.matches(&n.info.labels)));
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &nodes,
                |n| format!("node/{}", n.info.name),
                || nodes_table(&nodes, wide, now),
            )
        }
        Resource::Endpoints => {
            let endpoints = match &name {
                Some(n) => vec![client
                    .endpoint(n)
                    .await
                    .map_err(|e| not_found(e, "endpoint", n))?],
                None => client.endpoints().await?,
            };
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &endpoints,
                |e| format!("endpoint/{}", e.name),
                || endpoints_table(&endpoints, wide),
            )
        }
        Resource::Volumes => {
            let volumes = match &name {
                Some(n) => vec![client
                    .volume(n)
                    .await
                    .map_err(|e| not_found(e, "volume", n))?],
                None => client.volumes().await?,
            };
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &volumes,
                |v| format!("volume/{}", v.name),
                || volumes_table(&volumes, wide, now),
            )
        }
        Resource::Controllers => {
            let mut controllers = client.controllers().await?;
            if let Some(n) = &name {
                controllers.retain(|c| &c.name == n || &c.id == n);
                if controllers.is_empty() {
                    return Err(anyhow::anyhow!(
                        "controller {n:?} not found (names and ids: bramblectl get controllers)"
                    ));
                }
            }
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &controllers,
                |c| format!("controller/{}", c.name),
                || controllers_table(&controllers, wide, now),
            )
        }
        Resource::Workloads(kind) => {
            let kind = match (kind, args.kind) {
                (Some(a), Some(b)) if a != b => {
                    return Err(usage(format!(
                        "--kind {} contradicts {}",
                        b.path(),
                        args.resource.resource
                    )))
                }
                (a, b) => a.or(b),
            };
            let what = Resource::Workloads(kind);
            let workloads = match (&name, kind) {
                (Some(n), Some(k)) => vec![client
                    .workload(k, n)
                    .await
                    .map_err(|e| not_found(e, k.path(), n))?],
                _ => {
                    let mut v: Vec<WorkloadView> = client.workloads(kind).await?;
                    // Filter here too: it costs nothing and holds if a server ignores ?kind.
                    v.retain(|w| kind.is_none_or(|k| w.manifest.kind == k));
                    v.retain(|w| sel.is_none_or(|s| s.matches(&w.manifest.metadata.labels)));
                    if let Some(n) = &name {
                        v.retain(|w| w.manifest.metadata.name.as_str() == n);
                        if v.is_empty() {
                            anyhow::bail!("workload {n:?} not found");
                        }
                    }
                    v.sort_by(|a, b| {
                        (a.manifest.kind, a.manifest.metadata.name.as_str())
                            .cmp(&(b.manifest.kind, b.manifest.metadata.name.as_str()))
                    });
                    v
                }
            };
            let single = name.is_some() && workloads.len() == 1;
            emit(
                out,
                &output,
                args.quiet,
                single,
                what,
                &workloads,
                |w| format!("{}/{}", w.manifest.kind.path(), w.manifest.metadata.name),
                || workloads_table(&workloads, wide, now),
            )
        }
        Resource::Secrets => {
            let secrets = match &name {
                Some(n) => vec![client
                    .secret(n)
                    .await
                    .map_err(|e| not_found(e, "secret", n))?],
                None => {
                    let mut v = client.secrets().await?;
                    v.retain(|x| sel.is_none_or(|s| s.matches(&x.labels)));
                    v
                }
            };
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &secrets,
                |x| format!("secret/{}", x.name),
                || secrets_table(&secrets, wide, now),
            )
        }
        Resource::Tasks => {
            let tasks = match &name {
                Some(id) => vec![client
                    .task(id)
                    .await
                    .map_err(|e| not_found(e, "task", id))?],
                None => {
                    let mut v = client
                        .tasks(args.workload.as_deref(), args.node.as_deref())
                        .await?;
                    v.retain(|t| args.kind.is_none_or(|k| t.kind == k));
                    v.retain(|t| of_workload(t.kind, &t.workload));
                    sort_tasks(&mut v);
                    v
                }
            };
            emit(
                out,
                &output,
                args.quiet,
                name.is_some(),
                resource,
                &tasks,
                |t| format!("task/{}", t.id),
                || tasks_table(&tasks, wide, now),
            )
        }
    }
}

/// Prints a list (or one object) as a table, YAML or JSON. An empty table is said on
/// stderr, as kubectl does, so scripts reading stdout see nothing.
#[allow(clippy::too_many_arguments)]
fn emit<T: Serialize>(
    out: &mut dyn Write,
    output: &Output,
    quiet: bool,
    single: bool,
    resource: Resource,
    items: &[T],
    name_of: impl Fn(&T) -> String,
    table: impl FnOnce() -> Table,
) -> Result<()> {
    let format = match output {
        Output::Name => {
            for i in items {
                writeln!(out, "{}", name_of(i))?;
            }
            return Ok(());
        }
        Output::JsonPath(t) => {
            let value = match (single, items) {
                (true, [one]) => serde_json::to_value(one)?,
                _ => crate::jsonpath::list(
                    items
                        .iter()
                        .map(serde_json::to_value)
                        .collect::<Result<_, _>>()?,
                ),
            };
            out.write_all(t.render(&value).as_bytes())?;
            return Ok(());
        }
        Output::Format(f) => *f,
    };
    match format {
        Format::Json | Format::Yaml => match (single, items) {
            (true, [one]) => write_structured(out, format, one),
            _ => write_structured(out, format, &items),
        },
        Format::Table | Format::Wide => {
            if items.is_empty() {
                if !quiet {
                    let _ = writeln!(std::io::stderr(), "No {resource} found.");
                }
                return Ok(());
            }
            write!(out, "{}", table())?;
            Ok(())
        }
    }
}

/// Tasks grouped by workload, then by replica, oldest first.
pub fn sort_tasks(tasks: &mut [Task]) {
    tasks.sort_by(|a, b| {
        (&a.workload, a.kind, a.replica, a.created_at, &a.id).cmp(&(
            &b.workload,
            b.kind,
            b.replica,
            b.created_at,
            &b.id,
        ))
    });
}

/// `get nodes`.
pub fn nodes_table(nodes: &[NodeView], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec![
        "NAME",
        "STATUS",
        "ARCH",
        "CPU(cores)",
        "MEMORY",
        "TASKS",
        "AGE",
        "VERSION",
    ];
    if wide {
        headers.extend([
            "OS",
            "DOCKER",
            "CPU%",
            "MEM-USED",
            "MEM-LIMITS",
            "LABELS",
            "ADDRESS",
            "WARNINGS",
        ]);
    }
    let mut t = Table::new(headers);
    for n in nodes {
        let i = &n.info;
        let mut row = vec![
            i.name.clone(),
            node_status(n),
            i.arch.to_string(),
            i.cores.to_string(),
            Memory(i.memory_bytes).human(),
            n.tasks.to_string(),
            age(n.registered_at, now),
            i.agent_version.clone(),
        ];
        if wide {
            let (cpu, mem) = match &n.metrics {
                Some(m) => (
                    format!("{:.0}%", m.cpu_percent),
                    Memory(m.memory_used_bytes).human(),
                ),
                None => ("<unknown>".into(), "<unknown>".into()),
            };
            row.extend([
                if i.os.is_empty() {
                    "<unknown>".into()
                } else {
                    cell(&i.os)
                },
                i.docker_version.clone(),
                cpu,
                mem,
                memory_limits(i.memory_limits).to_string(),
                format_labels(&i.labels),
                or_none(n.address.as_deref()),
                if i.warnings.is_empty() {
                    "<none>".into()
                } else {
                    i.warnings.join("; ")
                },
            ]);
        }
        t.row(row);
    }
    t
}

/// `get workloads`.
pub fn workloads_table(workloads: &[WorkloadView], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec!["KIND", "NAME", "DESIRED", "RUNNING", "IMAGE", "AGE"];
    if wide {
        headers.extend(["LABELS", "GENERATION"]);
    }
    let mut t = Table::new(headers);
    for w in workloads {
        let m = &w.manifest;
        let mut row = vec![
            m.kind.to_string(),
            m.metadata.name.to_string(),
            w.desired.to_string(),
            w.running.to_string(),
            m.spec.image.clone(),
            age(w.created_at, now),
        ];
        if wide {
            row.extend([format_labels(&m.metadata.labels), w.generation.to_string()]);
        }
        t.row(row);
    }
    t
}

/// `get secrets`: names, keys and users; the values never leave the controller.
pub fn secrets_table(secrets: &[SecretView], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec!["NAME", "KEYS", "USED BY", "AGE"];
    if wide {
        headers.extend(["LABELS", "GENERATION"]);
    }
    let mut t = Table::new(headers);
    for s in secrets {
        let mut row = vec![
            s.name.clone(),
            or_none((!s.keys.is_empty()).then(|| s.keys.join(","))),
            or_none((!s.used_by.is_empty()).then(|| s.used_by.join(","))),
            age(s.created_at, now),
        ];
        if wide {
            row.extend([format_labels(&s.labels), s.generation.to_string()]);
        }
        t.row(row);
    }
    t
}

/// `get endpoints`: what each name resolves to in containers and who answers there.
/// `get volumes`: NAME WORKLOAD NODE SIZE SYNCED COPIES (with their nodes and ages),
/// and with `-o wide` what is set aside.
pub fn volumes_table(
    volumes: &[bramble_api::rest::VolumeView],
    wide: bool,
    now: DateTime<Utc>,
) -> Table {
    let mut headers = vec!["NAME", "WORKLOAD", "NODE", "SIZE", "LAST SYNC", "COPIES"];
    if wide {
        headers.push("SET ASIDE");
    }
    let mut t = Table::new(headers);
    for v in volumes {
        let synced = match &v.last_sync {
            None if v.sync.is_none() => "<no sync>".to_string(),
            None => "<not yet>".to_string(),
            Some(s) if s.error.is_some() => format!("failed {}", ago(s.at, now)),
            Some(s) => ago(s.at, now),
        };
        let copies: Vec<String> = v
            .copies
            .iter()
            .map(|c| {
                let age = c.at.map(|at| ago(at, now)).unwrap_or_default();
                let stale = if c.stale { ",stale" } else { "" };
                format!("{}({age}{stale})", c.node)
            })
            .collect();
        let mut row = vec![
            v.name.clone(),
            v.workload.clone(),
            or_none(v.node.as_deref()),
            if v.node.is_some() {
                Memory(v.bytes).to_string()
            } else {
                "<none>".to_string()
            },
            synced,
            if copies.is_empty() {
                "<none>".to_string()
            } else {
                copies.join(",")
            },
        ];
        if wide {
            let aside: Vec<String> = v
                .set_aside
                .iter()
                .map(|a| format!("{}:{}", a.node, a.path.as_deref().unwrap_or("?")))
                .collect();
            row.push(if aside.is_empty() {
                "<none>".to_string()
            } else {
                aside.join(",")
            });
        }
        t.row(row);
    }
    t
}

pub fn endpoints_table(endpoints: &[bramble_api::endpoints::Endpoint], wide: bool) -> Table {
    let mut headers = vec!["NAME", "KIND", "ADDRESS", "PORTS", "READY", "INSTANCES"];
    if wide {
        headers.push("NOT READY");
    }
    let mut t = Table::new(headers);
    for e in endpoints {
        let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
        let on = |ready: bool| -> String {
            let v: Vec<String> = e
                .backends
                .iter()
                .filter(|b| b.ready == ready)
                .map(|b| format!("{}@{}", b.task, b.node))
                .collect();
            if v.is_empty() {
                "<none>".to_string()
            } else {
                v.join(",")
            }
        };
        let mut row = vec![
            e.name.clone(),
            e.kind.to_string(),
            e.address.to_string(),
            if ports.is_empty() {
                "<none>".to_string()
            } else {
                ports.join(",")
            },
            format!("{}/{}", e.ready().count(), e.backends.len()),
            on(true),
        ];
        if wide {
            row.push(on(false));
        }
        t.row(row);
    }
    t
}

/// `get controllers`: who leads and since when; `*` marks the one that answered.
pub fn controllers_table(controllers: &[ControllerView], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec!["NAME", "ROLE", "LEADING FOR", "UP", "URL"];
    if wide {
        headers.push("ID");
    }
    let mut t = Table::new(headers);
    for c in controllers {
        let name = if c.answering {
            format!("{} *", c.name)
        } else {
            c.name.clone()
        };
        let mut row = vec![
            name,
            if c.leader { "leader" } else { "follower" }.to_string(),
            c.leader_since
                .map_or_else(|| "-".to_string(), |s| age(s, now)),
            age(c.started, now),
            or_none(c.url.clone()),
        ];
        if wide {
            row.push(c.id.clone());
        }
        t.row(row);
    }
    t
}

/// `get cronjobs`: no AGE, as the cronjob view has no creation time (`get workloads
/// --kind cronjob` has it).
pub fn cronjobs_table(cronjobs: &[CronJobView], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec![
        "NAME",
        "SCHEDULE",
        "TIMEZONE",
        "SUSPEND",
        "ACTIVE",
        "LAST RUN",
        "LAST RESULT",
        "NEXT RUN",
    ];
    if wide {
        headers.extend(["LAST SLOT", "NEXT SLOT", "LAST FIRING"]);
    }
    let mut t = Table::new(headers);
    for c in cronjobs {
        let mut row = vec![
            c.name.clone(),
            cell(&c.schedule),
            c.timezone.clone(),
            c.suspended.to_string(),
            c.active.to_string(),
            c.last_slot.map_or_else(|| "<none>".into(), |s| ago(s, now)),
            or_none(c.last_result),
            c.next.map_or_else(|| "<none>".into(), |s| until(s, now)),
        ];
        if wide {
            // Firings come newest first; the newest may be a manual run or a skipped slot.
            let last = c.firings.iter().max_by_key(|f| (f.slot, f.decided_at));
            row.extend([
                or_none(c.last_slot.map(timestamp)),
                or_none(c.next.map(timestamp)),
                or_none(last.map(|f| firing_outcome(f.outcome))),
            ]);
        }
        t.row(row);
    }
    t
}

/// `get tasks`. Wide, SLOT and ATTEMPT are added when a listed task is a CronJob run or
/// a retry, so a list of services does not carry two empty columns.
pub fn tasks_table(tasks: &[Task], wide: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec![
        "NAME", "WORKLOAD", "NODE", "PHASE", "READY", "RESTARTS", "AGE", "STATUS",
    ];
    let runs = wide && tasks.iter().any(|t| t.slot.is_some() || t.attempt > 0);
    if wide {
        headers.extend(["KIND", "EXIT", "CONTAINER"]);
        if runs {
            headers.extend(["SLOT", "ATTEMPT"]);
        }
        headers.push("MESSAGE");
    }
    let mut t = Table::new(headers);
    for task in tasks {
        let mut row = vec![
            task.id.clone(),
            task.workload.clone(),
            or_none(task.node.as_deref()),
            task.phase.to_string(),
            ready(task).to_string(),
            task.restarts.to_string(),
            age(task.created_at, now),
            if wide {
                status_line(task, now)
            } else {
                status_cell(task, now)
            },
        ];
        if wide {
            row.extend([
                task.kind.to_string(),
                task.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
                task.container_id
                    .as_deref()
                    .map_or_else(|| "-".into(), |c| c.chars().take(12).collect()),
            ]);
            if runs {
                row.extend([
                    task.slot.map_or_else(|| "-".into(), timestamp),
                    task.attempt.to_string(),
                ]);
            }
            row.push(cell(task.message.as_deref().unwrap_or("")));
        }
        t.row(row);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::describe::fixtures::*;

    #[test]
    fn node_table_shows_cordoned_nodes_like_kubectl() {
        let t = nodes_table(&[node_view(true)], false, now()).to_string();
        assert_eq!(
            t,
            "NAME   STATUS                     ARCH    CPU(cores)   MEMORY   TASKS   AGE   VERSION\n\
             pi-1   Ready,SchedulingDisabled   arm64   4            1.0Gi    1       5d    0.1.0\n"
        );
    }

    #[test]
    fn wide_node_table_adds_system_and_load() {
        let t = nodes_table(&[node_view(false)], true, now()).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("VERSION   OS                               DOCKER   CPU%   MEM-USED   MEM-LIMITS   LABELS     ADDRESS           WARNINGS"), "{t}");
        assert!(lines[1].ends_with("0.1.0     Debian GNU/Linux 12 (bookworm)   24.0.5   12%    410Mi      <unknown>    disk=ssd   10.0.0.11:51234   <none>"), "{t}");
    }

    #[test]
    fn wide_node_table_shows_the_memory_cgroup_fix() {
        let mut n = node_view(false);
        n.info.memory_limits = Some(false);
        n.info.warnings = vec![crate::describe::fixtures::MEMORY_CGROUP_WARNING.into()];
        let t = nodes_table(&[n], true, now()).to_string();
        let row = t.lines().nth(1).unwrap_or_default();
        assert!(row.contains("   NOT-ENFORCED   "), "{t}");
        assert!(
            row.ends_with(crate::describe::fixtures::MEMORY_CGROUP_WARNING),
            "{t}"
        );
    }

    fn endpoint(ready: &[(&str, bool)]) -> bramble_api::endpoints::Endpoint {
        bramble_api::endpoints::Endpoint {
            kind: Kind::Wallet,
            name: "ltc-wallet".into(),
            address: std::net::Ipv4Addr::new(169, 254, 100, 2),
            ports: vec![9332, 9333],
            backends: ready
                .iter()
                .map(|(node, r)| bramble_api::endpoints::Backend {
                    task: "ltc-wallet-abc123-0".into(),
                    node: node.to_string(),
                    mesh: Some("10.0.0.11:7947".into()),
                    ready: *r,
                })
                .collect(),
        }
    }

    #[test]
    fn endpoint_table_says_where_a_name_leads() {
        let t = endpoints_table(&[endpoint(&[("pi-1", true)])], false).to_string();
        assert_eq!(
            t,
            concat!(
                "NAME         KIND     ADDRESS         PORTS       READY   INSTANCES\n",
                "ltc-wallet   Wallet   169.254.100.2   9332,9333   1/1     ltc-wallet-abc123-0@pi-1\n"
            )
        );
        let t = endpoints_table(&[endpoint(&[("pi-2", false)])], true).to_string();
        let row = t.lines().nth(1).unwrap_or_default();
        assert!(
            row.ends_with("0/1     <none>      ltc-wallet-abc123-0@pi-2"),
            "{t}"
        );
    }

    #[test]
    fn volume_table_says_where_a_volume_is_its_sync_and_its_copies() {
        use bramble_api::rest::{VolumeCopyView, VolumeView};
        let at = now() - chrono::Duration::seconds(40);
        let v = VolumeView {
            name: "ltc-wallet-keys".into(),
            workload: "ltc-wallet".into(),
            kind: Some(Kind::Wallet),
            sync: Some(bramble_api::manifest::VolumeSync::default()),
            node: Some("pi-1".into()),
            bytes: 3 << 20,
            files: 4,
            last_sync: Some(bramble_api::wire::SyncOutcome {
                at,
                done: vec!["pi-2".into()],
                sent_bytes: 120,
                error: None,
            }),
            copies: vec![VolumeCopyView {
                node: "pi-2".into(),
                epoch: 9,
                at: Some(at),
                bytes: 3 << 20,
                files: 4,
                ..VolumeCopyView::default()
            }],
            set_aside: vec![VolumeCopyView {
                node: "pi-3".into(),
                epoch: 4,
                path: Some("/var/lib/bramble/set-aside/x".into()),
                ..VolumeCopyView::default()
            }],
            ..VolumeView::default()
        };
        let t = volumes_table(std::slice::from_ref(&v), true, now()).to_string();
        let mut lines = t.lines();
        assert_eq!(
            lines
                .next()
                .map(str::split_whitespace)
                .map(Iterator::collect::<Vec<_>>),
            Some(vec![
                "NAME", "WORKLOAD", "NODE", "SIZE", "LAST", "SYNC", "COPIES", "SET", "ASIDE"
            ])
        );
        let row = lines.next().unwrap_or_default();
        for part in [
            "ltc-wallet-keys",
            "pi-1",
            "3Mi",
            "40s ago",
            "pi-2(40s ago)",
            "pi-3:/var/lib/bramble/set-aside/x",
        ] {
            assert!(row.contains(part), "{part:?} in {row}");
        }
        let mut failing = v.clone();
        failing.copies.clear();
        if let Some(s) = failing.last_sync.as_mut() {
            s.error = Some("pi-2: refused".into());
        }
        let t = volumes_table(&[failing], false, now()).to_string();
        assert!(t.contains("failed 40s ago") && t.contains("<none>"), "{t}");
    }

    #[test]
    fn workload_table_has_counts_and_image() {
        let t = workloads_table(&[wallet()], true, now()).to_string();
        assert_eq!(
            t,
            "KIND     NAME         DESIRED   RUNNING   IMAGE                 AGE   LABELS     GENERATION\n\
             Wallet   ltc-wallet   1         0         pool/litecoind:0.21   5d    app=pool   2\n"
        );
    }

    #[test]
    fn cronjob_table_says_when_it_last_ran_and_runs_next() {
        let suspended = cron_view();
        let mut live = cron_view();
        live.name = "backup".into();
        live.schedule = "0 3 * * *".into();
        live.timezone = "UTC".into();
        live.suspended = false;
        live.active = 1;
        live.last_slot = Some("2026-11-10T11:59:48Z".parse().expect("valid time"));
        live.last_result = Some(bramble_api::task::TaskPhase::Running);
        live.next = Some("2026-11-10T12:00:48Z".parse().expect("valid time"));
        live.firings.truncate(1);
        let never = CronJobView {
            name: "fresh".into(),
            last_slot: None,
            last_result: None,
            firings: Vec::new(),
            ..live.clone()
        };
        let t = cronjobs_table(&[live.clone(), suspended.clone(), never], false, now()).to_string();
        assert_eq!(
            t,
            "NAME     SCHEDULE      TIMEZONE        SUSPEND   ACTIVE   LAST RUN   LAST RESULT   NEXT RUN\n\
             backup   0 3 * * *     UTC             false     1        12s ago    Running       in 48s\n\
             payout   */5 * * * *   Europe/Berlin   true      0        5m ago     Succeeded     <none>\n\
             fresh    0 3 * * *     UTC             false     1        <none>     <none>        in 48s\n"
        );
        let t = cronjobs_table(&[live, suspended], true, now()).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0]
                .ends_with("NEXT RUN   LAST SLOT              NEXT SLOT              LAST FIRING"),
            "{t}"
        );
        assert!(
            lines[1].ends_with("in 48s     2026-11-10T11:59:48Z   2026-11-10T12:00:48Z   Fired"),
            "{t}"
        );
        assert!(
            lines[2].ends_with("<none>     2026-11-10T11:55:00Z   <none>                 Fired"),
            "{t}"
        );
    }

    #[test]
    fn wide_task_table_shows_slot_and_attempt_of_runs() {
        let mut tasks = cron_runs();
        tasks.push(running_task());
        sort_tasks(&mut tasks);
        let t = tasks_table(&tasks, true, now()).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].ends_with(
                "KIND      EXIT   CONTAINER      SLOT                   ATTEMPT   MESSAGE"
            ),
            "{t}"
        );
        assert!(
            lines[1].starts_with("payout-20261110t114217z-manual "),
            "{t}"
        );
        assert!(lines[3].starts_with("payout-20261110t115500z-r1 "), "{t}");
        assert!(
            lines[3].ends_with("CronJob   0      -              2026-11-10T11:55:00Z   1"),
            "{t}"
        );
        assert!(
            lines[4].ends_with("Service   -      4f9a2b7c1d3e   -                      0"),
            "{t}"
        );
        let narrow = tasks_table(&tasks, false, now()).to_string();
        assert!(!narrow.contains("SLOT"), "{narrow}");
    }

    #[test]
    fn wide_task_table_says_why_a_task_is_pending() {
        let mut tasks = vec![pending_task(), running_task()];
        sort_tasks(&mut tasks);
        let t = tasks_table(&tasks, true, now()).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME                  WORKLOAD     NODE     PHASE     READY   RESTARTS   AGE   STATUS    KIND      EXIT   CONTAINER      MESSAGE");
        assert_eq!(lines[1], "ltc-wallet-0a1b2c-0   ltc-wallet   <none>   Pending   -       0          45s   Pending   Wallet    -      -              no node fits: pi-1: label disk=ssd missing; pi-2: needs 256Mi memory, 100Mi free");
        assert_eq!(lines[2], "web-0a1b2c-1          web          pi-1     Running   true    2          3h    Running   Service   -      4f9a2b7c1d3e");
        let narrow = tasks_table(&tasks, false, now()).to_string();
        let lines: Vec<&str> = narrow.lines().collect();
        assert!(lines[1].ends_with("45s   Pending: no node fits: pi-1: label disk=ssd missing; pi-2: needs 256Mi memory, 100Mi free"), "{narrow}");
        assert!(lines[2].ends_with("3h    Running"), "{narrow}");
    }

    #[test]
    fn task_table_names_a_crash_loop_with_its_cause_and_next_try() {
        let mut t = running_task();
        t.phase = bramble_api::task::TaskPhase::Starting;
        t.reason = Some(bramble_api::task::Reason::CrashLoopBackOff);
        t.message = Some("exited with code 3; restarting with back-off".into());
        t.restart_at = Some(now() + chrono::Duration::seconds(8));
        let narrow = tasks_table(&[t], false, now()).to_string();
        let row = narrow.lines().nth(1).unwrap_or_default();
        assert!(
            row.ends_with(
                "CrashLoopBackOff (next try in 8s): exited with code 3; restarting with back-off"
            ),
            "{narrow}"
        );
    }
}
