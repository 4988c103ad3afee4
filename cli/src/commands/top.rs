//! `top nodes`, `top tasks`: CPU, memory and temperature as the agents last measured.

use std::io::Write;

use anyhow::Result;
use bramble_api::quantity::Memory;
use bramble_api::rest::NodeView;

use crate::args::{TopArgs, TopResource};
use crate::client::Client;
use crate::table::Table;

/// Prints the table.
pub async fn run(client: &Client, args: &TopArgs, out: &mut dyn Write) -> Result<()> {
    let nodes = super::nodes(client, None).await?;
    let table = match args.resource {
        TopResource::Nodes => nodes_table(&nodes),
        TopResource::Tasks => {
            let tasks = client.tasks(None, None).await?;
            tasks_table(&nodes, &tasks)
        }
    };
    if table.is_empty() {
        let _ = writeln!(
            std::io::stderr(),
            "No measurements yet: agents report them every few seconds."
        );
        return Ok(());
    }
    write!(out, "{table}")?;
    Ok(())
}

fn or_unknown<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "<unknown>".to_string(), f)
}

/// `top nodes`: kubectl's columns, and the SoC temperature a Pi has.
pub fn nodes_table(nodes: &[NodeView]) -> Table {
    let mut t = Table::new(vec![
        "NAME",
        "CPU(cores)",
        "CPU%",
        "MEMORY(bytes)",
        "MEMORY%",
        "TEMP",
        "LOAD",
    ]);
    for n in nodes {
        let m = n.metrics.as_ref();
        let cores = n.info.cores.max(1);
        t.row(vec![
            n.info.name.clone(),
            or_unknown(m, |m| {
                format!("{:.0}m", f64::from(m.cpu_percent) * f64::from(cores) * 10.0)
            }),
            or_unknown(m, |m| format!("{:.0}%", m.cpu_percent)),
            or_unknown(m, |m| Memory(m.memory_used_bytes).human()),
            or_unknown(m.filter(|m| m.memory_total_bytes > 0), |m| {
                format!(
                    "{:.0}%",
                    m.memory_used_bytes as f64 * 100.0 / m.memory_total_bytes as f64
                )
            }),
            or_unknown(m.and_then(|m| m.temperature_celsius), |c| {
                format!("{c:.1}°C")
            }),
            or_unknown(m, |m| format!("{:.2}", m.load1)),
        ]);
    }
    t
}

/// `top tasks`: each running task's container, as its node measured it.
pub fn tasks_table(nodes: &[NodeView], tasks: &[bramble_api::task::Task]) -> Table {
    let mut t = Table::new(vec![
        "NAME",
        "WORKLOAD",
        "NODE",
        "CPU(cores)",
        "MEMORY(bytes)",
    ]);
    let mut rows = Vec::new();
    for n in nodes {
        let Some(usage) = n.metrics.as_ref().and_then(|m| m.containers.as_ref()) else {
            continue;
        };
        for u in usage {
            let workload = tasks
                .iter()
                .find(|t| t.id == u.task)
                .map_or_else(|| "<unknown>".to_string(), |t| t.workload.clone());
            rows.push(vec![
                u.task.clone(),
                workload,
                n.info.name.clone(),
                // Docker's CPU percent is of one core.
                or_unknown(u.cpu_percent, |p| format!("{:.0}m", f64::from(p) * 10.0)),
                or_unknown(u.memory_bytes, |b| Memory(b).human()),
            ]);
        }
    }
    rows.sort();
    for r in rows {
        t.row(r);
    }
    t
}
