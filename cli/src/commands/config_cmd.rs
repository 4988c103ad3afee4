//! `config set-context|use-context|delete-context|get-contexts|current-context|view`.

use std::io::Write;

use anyhow::{bail, Result};

use crate::args::{ConfigCommand, Global};
use crate::client::parse_server;
use crate::config::{self, ConfigFile};
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
                parse_server(s).map_err(|e| usage(e.to_string()))?;
            }
            let created = file.set_context(name, global.server.clone(), global.token.clone());
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
                    "No contexts in {}: add one with `bramblectl config set-context NAME --server URL --token TOKEN`.",
                    path.display()
                );
                return Ok(());
            }
            let mut t = Table::new(["CURRENT", "NAME", "SERVER", "TOKEN"]);
            for c in &file.contexts {
                let current = file.current_context.as_deref() == Some(c.name.as_str());
                t.row([
                    if current { "*" } else { "" }.to_string(),
                    c.name.clone(),
                    c.server.clone(),
                    if c.token.is_some() { "set" } else { "<none>" }.to_string(),
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
