//! `config set-context|use-context|delete-context|get-contexts|current-context|view`.

use std::io::Write;

use anyhow::{bail, Result};

use crate::args::{ConfigCommand, Global};
use crate::client::{parse_servers, pinned};
use crate::config::{self, ConfigFile, Trust};
use crate::error::usage;
use crate::table::Table;

/// Reads, changes and writes the config file.
pub fn run(cmd: &ConfigCommand, global: &Global, out: &mut dyn Write) -> Result<()> {
    let path = config::path_from_env()?;
    let mut file = ConfigFile::load(&path)?;
    match cmd {
        ConfigCommand::SetContext { name } => {
            if name.trim().is_empty() {
                return Err(usage("a context needs a name"));
            }
            if let Some(s) = &global.server {
                parse_servers(s).map_err(|e| usage(e.to_string()))?;
            }
            // A CA file is stored as its fingerprint: the file may move, the CA may not.
            let trust = match (&global.certificate_authority, &global.ca_fingerprint) {
                (Some(f), _) => Some(Trust::File(f.clone())),
                (None, Some(fp)) => Some(Trust::Fingerprint(fp.clone())),
                (None, None) => None,
            };
            let fingerprint = trust
                .map(|t| pinned(&t).map(|f| f.to_string()))
                .transpose()
                .map_err(|e| usage(e.to_string()))?;
            let created = file.set_context(
                name,
                global.server.clone(),
                global.token.clone(),
                fingerprint,
            );
            file.save(&path)?;
            let what = if created { "created" } else { "modified" };
            writeln!(out, "Context {name:?} {what}.")?;
            if created && file.current_context.as_deref() == Some(name) {
                writeln!(out, "Switched to context {name:?}.")?;
            }
        }
        ConfigCommand::UseContext { name } => {
            if file.context(name).is_none() {
                bail!(config::Error::NoContext {
                    name: name.clone(),
                    path
                });
            }
            file.current_context = Some(name.clone());
            file.save(&path)?;
            writeln!(out, "Switched to context {name:?}.")?;
        }
        ConfigCommand::DeleteContext { name } => {
            let before = file.contexts.len();
            file.contexts.retain(|c| &c.name != name);
            if file.contexts.len() == before {
                bail!(config::Error::NoContext {
                    name: name.clone(),
                    path
                });
            }
            if file.current_context.as_deref() == Some(name) {
                file.current_context = None;
            }
            file.save(&path)?;
            writeln!(out, "Deleted context {name:?} from {}.", path.display())?;
        }
        ConfigCommand::GetContexts => {
            if file.contexts.is_empty() {
                let _ = writeln!(
                    std::io::stderr(),
                    "No contexts in {}: add one with `bramblectl login URL` or `bramblectl config set-context NAME --server URL --token TOKEN --ca-fingerprint SHA256`.",
                    path.display()
                );
                return Ok(());
            }
            let mut t = Table::new(["CURRENT", "NAME", "SERVER", "TOKEN", "CA"]);
            for c in &file.contexts {
                let current = file.current_context.as_deref() == Some(c.name.as_str());
                let ca = c
                    .ca_fingerprint
                    .as_deref()
                    .and_then(|f| f.parse::<bramble_api::token::Fingerprint>().ok())
                    .map_or_else(|| "<not pinned>".to_string(), |f| f.short());
                t.row([
                    if current { "*" } else { "" }.to_string(),
                    c.name.clone(),
                    c.server.clone(),
                    if c.token.is_some() { "set" } else { "<none>" }.to_string(),
                    ca,
                ]);
            }
            write!(out, "{t}")?;
        }
        ConfigCommand::CurrentContext => match &file.current_context {
            Some(c) => writeln!(out, "{c}")?,
            None => bail!("current-context is not set in {}", path.display()),
        },
        ConfigCommand::View { raw } => {
            let shown = if *raw { file } else { file.redacted() };
            write!(out, "{}", serde_yaml::to_string(&shown)?)?;
        }
    }
    Ok(())
}
