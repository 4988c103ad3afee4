//! `webhooks list|test`.

use std::io::Write;

use anyhow::{bail, Result};
use bramble_api::rest::WebhookView;

use super::not_found;
use crate::args::WebhooksCommand;
use crate::client::Client;
use crate::output::{write_structured, Format};
use crate::table::Table;

/// Lists the webhooks, or sends one a test event.
pub async fn run(client: &Client, cmd: &WebhooksCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        WebhooksCommand::List { output } => {
            let hooks = client.webhooks().await?;
            match output {
                Some(f) => write_structured(out, Format::from(*f), &hooks)?,
                None if hooks.is_empty() => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "No webhooks: the controller reads them from webhooks.yaml in its data dir at start."
                    );
                }
                None => write!(out, "{}", table(&hooks))?,
            }
        }
        WebhooksCommand::Test { name } => {
            let r = client
                .webhook_test(name)
                .await
                .map_err(|e| not_found(e, "webhook", name))?;
            if !r.ok {
                let why = match (r.status, &r.error) {
                    (_, Some(e)) => e.clone(),
                    (Some(s), None) => format!("HTTP {s}"),
                    (None, None) => "no answer".to_string(),
                };
                bail!(
                    "webhook {name}: test event not delivered: {why} ({} ms)",
                    r.elapsed_ms
                );
            }
            let status = r.status.map_or_else(String::new, |s| format!(" HTTP {s}"));
            writeln!(
                out,
                "webhook/{name} answered{status} in {} ms",
                r.elapsed_ms
            )?;
        }
    }
    Ok(())
}

/// `webhooks list` as a table.
pub fn table(hooks: &[WebhookView]) -> Table {
    let mut t = Table::new([
        "NAME",
        "URL",
        "EVENTS",
        "SIGNED",
        "SENT",
        "FAILED",
        "DROPPED",
        "QUEUED",
        "LAST-ERROR",
    ]);
    for h in hooks {
        t.row([
            h.name.clone(),
            h.url.clone(),
            if h.events.is_empty() {
                "Warning".to_string()
            } else {
                h.events.join(",")
            },
            h.signed.to_string(),
            h.sent.to_string(),
            h.failed.to_string(),
            h.dropped.to_string(),
            h.queued.to_string(),
            h.last_error.clone().unwrap_or_else(|| "<none>".into()),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_what_each_webhook_gets_and_how_delivery_went() {
        let hooks: Vec<WebhookView> = serde_json::from_value(serde_json::json!([
            {"name": "ops", "url": "http://10.0.0.5:9000/bramble", "events": [], "signed": true,
             "sent": 12, "failed": 1, "dropped": 0, "queued": 0, "lastError": "HTTP 500"},
            {"name": "chat", "url": "http://10.0.0.6/hook", "events": ["NodeDead", "GaveUp"],
             "signed": false, "sent": 0, "failed": 0, "dropped": 0, "queued": 2}
        ]))
        .expect("valid views");
        assert_eq!(
            table(&hooks).to_string(),
            "NAME   URL                            EVENTS            SIGNED   SENT   FAILED   DROPPED   QUEUED   LAST-ERROR\n\
             ops    http://10.0.0.5:9000/bramble   Warning           true     12     1        0         0        HTTP 500\n\
             chat   http://10.0.0.6/hook           NodeDead,GaveUp   false    0      0        0         2        <none>\n"
        );
    }
}
