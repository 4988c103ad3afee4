//! `cron run|suspend|resume NAME`.

use std::io::Write;

use anyhow::Result;

use super::not_found;
use crate::args::CronCommand;
use crate::client::Client;

/// Starts a CronJob's run by hand, or suspends or resumes its schedule.
pub async fn run(client: &Client, cmd: &CronCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        CronCommand::Run { name } => {
            let task = client
                .cron_run(name)
                .await
                .map_err(|e| not_found(e, "cronjob", name))?;
            writeln!(out, "cronjob/{name} triggered (task {})", task.id)?;
        }
        CronCommand::Suspend { name } | CronCommand::Resume { name } => {
            let suspend = matches!(cmd, CronCommand::Suspend { .. });
            let view = client
                .cron_suspend(name, suspend)
                .await
                .map_err(|e| not_found(e, "cronjob", name))?;
            let done = if suspend { "suspended" } else { "resumed" };
            writeln!(out, "cronjob/{} {done}", view.name)?;
            if !suspend && view.suspended {
                // `suspend: true` in the manifest wins over `cron resume`.
                let _ = writeln!(
                    std::io::stderr(),
                    "note: cronjob/{} is still suspended: its manifest says suspend: true",
                    view.name
                );
            }
        }
    }
    Ok(())
}
