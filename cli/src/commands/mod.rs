//! The commands: each reads its arguments, talks to the controller and prints.

use std::io::Write;

use anyhow::Result;

use crate::args::{Cli, Command, Global};
use bramble_api::rest::NodeView;

use crate::client::{self, Client};
use crate::config::{self, ConfigFile, Overrides, Target};

pub mod apply;
pub mod completion;
pub mod config_cmd;
pub mod cordon;
pub mod cron;
pub mod delete;
pub mod describe;
pub mod drain;
pub mod events;
pub mod exec;
pub mod get;
pub mod login;
pub mod logs;
pub mod rollout;
pub mod scale;
pub mod top;
pub mod version;
pub mod webhooks;

/// Runs a parsed command line.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let Cli { global, command } = cli;
    match command {
        Command::Completion(a) => completion::run(&a, out),
        Command::Config(c) => config_cmd::run(&c, &global, out),
        Command::Version(a) => version::run(&a, &global, out).await,
        Command::Login(a) => login::run(&a, &global, out).await,
        Command::Apply(a) => apply::run(&connect(&global)?, &a, out).await,
        Command::Diff(a) => apply::diff(&connect(&global)?, &a, out).await,
        Command::Get(a) => get::run(&connect(&global)?, &a, out).await,
        Command::Describe(a) => describe::run(&connect(&global)?, &a, out).await,
        Command::Delete(a) => delete::run(&connect(&global)?, &a, out).await,
        Command::Logs(a) => logs::run(&connect(&global)?, &a, out).await,
        Command::Events(a) => events::run(&connect(&global)?, &a, out).await,
        Command::Cordon(a) => cordon::run(&connect(&global)?, &a.node, true, out).await,
        Command::Uncordon(a) => cordon::run(&connect(&global)?, &a.node, false, out).await,
        Command::Drain(a) => drain::run(&connect(&global)?, &a, out).await,
        Command::Cron(c) => cron::run(&connect(&global)?, &c, out).await,
        Command::Exec(a) => exec::run(&connect(&global)?, &a, out).await,
        Command::Scale(a) => scale::run(&connect(&global)?, &a, out).await,
        Command::Rollout(c) => rollout::run(&connect(&global)?, &c, out).await,
        Command::Top(a) => top::run(&connect(&global)?, &a, out).await,
        Command::Webhooks(c) => webhooks::run(&connect(&global)?, &c, out).await,
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The server and token from the config file, the environment and the flags.
pub fn target(global: &Global) -> Result<Target> {
    let overrides = Overrides {
        context: global.context.clone().or_else(|| env("BRAMBLE_CONTEXT")),
        env_server: env("BRAMBLE_SERVER"),
        env_token: env("BRAMBLE_TOKEN"),
        flag_server: global.server.clone(),
        flag_token: global.token.clone(),
        env_ca_fingerprint: env("BRAMBLE_CA_FINGERPRINT"),
        flag_ca_fingerprint: global.ca_fingerprint.clone(),
        flag_ca_file: global.certificate_authority.clone(),
    };
    let (file, path) = match config::path_from_env() {
        Ok(path) => (ConfigFile::load(&path)?, path),
        // No HOME and no BRAMBLE_CONFIG: there can be no contexts, but flags and
        // environment still work.
        Err(config::Error::NoPath) => (ConfigFile::default(), "<no config file>".into()),
        Err(e) => return Err(e.into()),
    };
    Ok(config::resolve(&file, &path, &overrides)?)
}

/// A client for the controller the flags, environment and config file point at.
pub fn connect(global: &Global) -> Result<Client> {
    Ok(Client::new(&target(global)?)?)
}

/// Turns the server's 404 into `task "x" not found`.
/// One node by name, or all of them sorted by name.
pub async fn nodes(client: &Client, name: Option<&str>) -> Result<Vec<NodeView>> {
    Ok(match name {
        Some(n) => vec![client.node(n).await.map_err(|e| not_found(e, "node", n))?],
        None => {
            let mut v = client.nodes().await?;
            v.sort_by(|a, b| a.info.name.cmp(&b.info.name));
            v
        }
    })
}

pub fn not_found(e: client::Error, what: &str, name: &str) -> anyhow::Error {
    if e.is_not_found() {
        anyhow::anyhow!("{what} {name:?} not found")
    } else {
        e.into()
    }
}
