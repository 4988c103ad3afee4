//! The command line.

use std::path::PathBuf;
use std::str::FromStr;

use bramble_api::duration::Duration;
use bramble_api::manifest::Kind;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::output::{Format, ObjectRef, Output, Resource, UnknownResource};
use crate::selector::Selector;

/// Control a Bramble cluster: apply manifests, look at nodes, workloads, tasks and
/// events, read logs, cordon and drain nodes, run and suspend CronJobs.
#[derive(Debug, Parser)]
#[command(
    name = "bramblectl",
    version,
    propagate_version = true,
    after_help = "The controller is picked from, last one winning: https://127.0.0.1:7878 < the \
                  context (--context, BRAMBLE_CONTEXT or current-context in $BRAMBLE_CONFIG or \
                  ~/.bramble/config.yaml) < BRAMBLE_SERVER and BRAMBLE_TOKEN < --server and --token. \
                  The controller must hold the cluster CA pinned in the context (bramblectl login), \
                  BRAMBLE_CA_FINGERPRINT, --ca-fingerprint or --certificate-authority: nothing is \
                  sent to it before it proves so."
)]
pub struct Cli {
    /// Where and as whom to connect.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Default, Args)]
pub struct Global {
    /// Controller URL, e.g. https://pi-1:7878 (default: from the context, BRAMBLE_SERVER,
    /// or https://127.0.0.1:7878)
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token (default: from the context or BRAMBLE_TOKEN)
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Context of the config file to use (default: BRAMBLE_CONTEXT or current-context)
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// SHA-256 fingerprint of the cluster CA the controller must hold (default: from the
    /// context or BRAMBLE_CA_FINGERPRINT)
    #[arg(long, global = true, value_name = "SHA256")]
    pub ca_fingerprint: Option<String>,
    /// Trust the CA certificate in this PEM file for this call (the controller's
    /// DATA_DIR/ca.crt), as kubectl's flag does
    #[arg(long, global = true, value_name = "FILE")]
    pub certificate_authority: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update workloads from manifest files
    Apply(ApplyArgs),
    /// Show what apply -f would change, field by field, and which tasks it would
    /// replace; exits 1 when something would change
    Diff(DiffArgs),
    /// List nodes, workloads, tasks or cronjobs
    #[command(
        after_help = "TYPE is nodes (node, no), workloads (workload, wl), tasks (task), \
                            or a kind: services (svc), wallets, cronjobs (cj), jobs. \
                            TYPE/NAME is accepted too. cronjobs shows the schedules and their \
                            last and next runs; workloads --kind cronjob shows them as workloads."
    )]
    Get(GetArgs),
    /// Show a node, task or workload in detail, with its tasks and events
    Describe(DescribeArgs),
    /// Delete workloads by kind and name, those in manifest files, or a node
    Delete(DeleteArgs),
    /// Print a task's logs (or a workload's task's)
    Logs(LogsArgs),
    /// List events, or watch them as they happen
    #[command(
        after_help = "OBJECT is TYPE/NAME: node/pi-1, task/web-1a2b3c-0, service/web \
                            (svc/web), wallet/…, cronjob/… (cj/…), job/…. task/WORKLOAD \
                            stands for every task of the workload."
    )]
    Events(EventsArgs),
    /// Mark a node unschedulable: no new tasks are placed on it
    Cordon(NodeArgs),
    /// Mark a node schedulable again
    Uncordon(NodeArgs),
    /// Cordon a node and move its tasks elsewhere, waiting until it is empty
    Drain(DrainArgs),
    /// Run a command in a task's container, through the controller (admin token only)
    #[command(
        after_help = "Examples:\n  bramblectl exec ltc-wallet -- litecoin-cli getblockcount\n  bramblectl exec -it web -- sh"
    )]
    Exec(ExecArgs),
    /// Set a Service's number of replicas
    Scale(ScaleArgs),
    /// Restart a Service one replica at a time (each Ready before the next), or a Wallet
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// CPU, memory and temperature of nodes, or CPU and memory of tasks
    Top(TopArgs),
    /// Start a CronJob's run by hand, or suspend and resume its schedule
    #[command(subcommand)]
    Cron(CronCommand),
    /// List the controller's webhooks with their delivery counts, or send one a test event
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Print the client and server versions
    Version(VersionArgs),
    /// Pin a controller's cluster CA in a context: shows its fingerprint and asks
    Login(LoginArgs),
    /// Manage contexts in the config file
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script
    #[command(after_help = "bash: source <(bramblectl completion bash)\n\
                            zsh:  bramblectl completion zsh > \"${fpath[1]}/_bramblectl\"\n\
                            fish: bramblectl completion fish > ~/.config/fish/completions/bramblectl.fish")]
    Completion(CompletionArgs),
}

/// `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The controller, e.g. https://pi-1:7878
    #[arg(value_name = "URL")]
    pub server: String,
    /// The context to save it in (default: the current one, else "default")
    #[arg(long = "as", value_name = "NAME")]
    pub name: Option<String>,
}

/// `-f` of the commands that read manifests.
#[derive(Debug, Args)]
pub struct ManifestFiles {
    /// Manifest file, directory (recursive, *.yaml and *.yml) or - for stdin; repeatable
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<PathBuf>,
}

/// `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The manifests.
    #[command(flatten)]
    pub manifests: ManifestFiles,
    /// Validate on the server without storing anything, and show what would change
    #[arg(long)]
    pub dry_run: bool,
}

/// `diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The manifests.
    #[command(flatten)]
    pub manifests: ManifestFiles,
}

/// A resource type, optionally with a name: `tasks`, `service/hello`; or `all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceArg {
    /// The type.
    pub resource: Resource,
    /// The name after a slash.
    pub name: Option<String>,
    /// `all` (only `get` takes it).
    pub all: bool,
}

impl ResourceArg {
    /// The object's name from `TYPE/NAME` or from a separate `NAME` argument; both at
    /// once is a usage error.
    pub fn with_name(&self, name: &Option<String>) -> anyhow::Result<Option<String>> {
        match (&self.name, name) {
            (Some(_), Some(n)) => Err(crate::error::usage(format!(
                "name {n:?} given twice: use either TYPE/NAME or TYPE NAME"
            ))),
            (a, b) => Ok(a.clone().or_else(|| b.clone())),
        }
    }
}

impl FromStr for ResourceArg {
    type Err = UnknownResource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(ResourceArg {
                resource: Resource::Workloads(None),
                name: None,
                all: true,
            });
        }
        let (resource, name) = Resource::parse_with_name(s)?;
        Ok(ResourceArg {
            resource,
            name,
            all: false,
        })
    }
}

/// `get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// nodes | workloads | tasks | services | wallets | cronjobs | jobs | all
    #[arg(value_name = "TYPE")]
    pub resource: ResourceArg,
    /// Show only this one
    pub name: Option<String>,
    /// Output format: wide, yaml, json, name, or jsonpath=TEMPLATE
    /// (e.g. -o jsonpath='{.items[*].id}'); default: a table
    #[arg(short, long, value_name = "FORMAT")]
    pub output: Option<Output>,
    /// Only objects whose labels match, e.g. app=web,tier!=cache (tasks and cron jobs
    /// by their workload's labels)
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<Selector>,
    /// After the list, keep printing objects as they change
    #[arg(short, long)]
    pub watch: bool,
    /// Say nothing of an empty list (`get all` leaves empty types out).
    #[arg(skip)]
    pub quiet: bool,
    /// Workloads and tasks of this kind only
    #[arg(long, value_name = "KIND")]
    pub kind: Option<Kind>,
    /// Tasks of this workload only
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Tasks on this node only
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

/// `describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// node | task | service | wallet | cronjob | job | workload
    #[arg(value_name = "TYPE")]
    pub resource: ResourceArg,
    /// Name (task id for tasks); without one, every object of the type
    pub name: Option<String>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// service | wallet | cronjob | job (or KIND/NAME)
    #[arg(value_name = "KIND", required_unless_present = "files")]
    pub resource: Option<ResourceArg>,
    /// Names of the workloads
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// Delete the workloads defined in these files or directories (- for stdin)
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        conflicts_with = "resource"
    )]
    pub files: Vec<PathBuf>,
    /// Succeed when a workload does not exist
    #[arg(long)]
    pub ignore_not_found: bool,
    /// Every workload of the kind (of every kind for `workloads`)
    #[arg(long, conflicts_with_all = ["files", "names"])]
    pub all: bool,
    /// The workloads of the kind whose labels match, e.g. app=web
    #[arg(short = 'l', long, value_name = "SELECTOR", conflicts_with_all = ["files", "names"])]
    pub selector: Option<Selector>,
}

/// `logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Task id, or the name of a workload
    #[arg(value_name = "TASK|WORKLOAD", required_unless_present = "selector")]
    pub target: Option<String>,
    /// The tasks of every workload whose labels match, e.g. app=web (each line
    /// prefixed with [task id])
    #[arg(short = 'l', long, value_name = "SELECTOR", conflicts_with = "target")]
    pub selector: Option<Selector>,
    /// Keep streaming new output
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
    /// For a workload: every task's logs, each line prefixed with [task id]
    #[arg(long)]
    pub all: bool,
}

/// `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// After the events so far, keep printing new ones as they happen
    #[arg(short, long)]
    pub watch: bool,
    /// Only the events of this object (TYPE/NAME)
    #[arg(long = "for", value_name = "OBJECT")]
    pub object: Option<ObjectRef>,
    /// Output format (default: a table)
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub output: Option<RawFormat>,
}

/// `-o` for commands that have only a table besides the raw objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RawFormat {
    /// The full objects as YAML.
    Yaml,
    /// The full objects as JSON.
    Json,
}

impl From<RawFormat> for Format {
    fn from(f: RawFormat) -> Format {
        match f {
            RawFormat::Yaml => Format::Yaml,
            RawFormat::Json => Format::Json,
        }
    }
}

/// `cordon`, `uncordon`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Node name
    #[arg(value_name = "NODE")]
    pub node: String,
}

/// `drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Node name
    #[arg(value_name = "NODE")]
    pub node: String,
    /// How long to wait for the tasks to leave, e.g. 90s, 5m, 1h
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: Duration,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Task id, or a workload (one of its running tasks)
    #[arg(value_name = "TASK|WORKLOAD")]
    pub target: String,
    /// Pass stdin to the command
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// Give the command a terminal (with -i, an interactive shell)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments, after --
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// service/NAME (or service NAME)
    #[arg(value_name = "KIND/NAME")]
    pub target: ResourceArg,
    /// Name, when not given as KIND/NAME
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// How many replicas
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub replicas: u32,
}

/// `rollout …`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Restart every task: a Service's replicas one at a time, each running (and Ready,
    /// with a readiness probe) before the next stops; a Wallet's one task stops, then
    /// starts again
    Restart(RolloutArgs),
}

/// `rollout restart`.
#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// service/NAME or wallet/NAME
    #[arg(value_name = "KIND/NAME")]
    pub target: ResourceArg,
    /// Name, when not given as KIND/NAME
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// How long to wait for each task, e.g. 90s, 5m
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: Duration,
}

/// What `top` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopResource {
    /// Nodes: CPU, memory, temperature, load.
    #[value(alias = "node", alias = "no")]
    Nodes,
    /// Tasks: their containers' CPU and memory.
    #[value(alias = "task")]
    Tasks,
}

/// `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// nodes | tasks
    #[arg(value_enum, value_name = "TYPE")]
    pub resource: TopResource,
}

/// `cron …`.
#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// Start a run now, whatever the schedule (it counts as a manual firing)
    Run {
        /// CronJob name
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Stop firing on schedule, without changing the manifest (runs in progress go on)
    Suspend {
        /// CronJob name
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Fire on schedule again (slots missed while suspended are not run)
    Resume {
        /// CronJob name
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `webhooks …`.
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// The webhooks of the controller's webhooks.yaml: URL, events, deliveries
    #[command(visible_alias = "ls")]
    List {
        /// Output format (default: a table)
        #[arg(short, long, value_enum, value_name = "FORMAT")]
        output: Option<RawFormat>,
    },
    /// Send one test event to a webhook now and print what the receiver answered
    Test {
        /// Webhook name
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `version`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Only the client's version; do not contact the server
    #[arg(long)]
    pub client: bool,
}

/// `config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Create or change a context: bramblectl config set-context NAME --server URL --token T
    SetContext {
        /// Context name
        name: String,
    },
    /// Make a context the current one
    UseContext {
        /// Context name
        name: String,
    },
    /// Remove a context
    DeleteContext {
        /// Context name
        name: String,
    },
    /// List the contexts
    GetContexts,
    /// Print the current context's name
    CurrentContext,
    /// Print the config file (tokens redacted)
    View {
        /// Show tokens
        #[arg(long)]
        raw: bool,
    },
}

/// `completion`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// Shell
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// For an unknown command (`bramblectl gte nodes`), the message with the command
/// meant, when clap has none to offer.
pub fn suggest_command(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::CommandFactory;
    if e.kind() != ErrorKind::InvalidSubcommand || e.get(ContextKind::SuggestedSubcommand).is_some()
    {
        return None;
    }
    let Some(ContextValue::String(word)) = e.get(ContextKind::InvalidSubcommand) else {
        return None;
    };
    let cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .flat_map(|c| {
            std::iter::once(c.get_name().to_string()).chain(c.get_all_aliases().map(str::to_string))
        })
        .collect();
    let meant = crate::suggest::did_you_mean(word, names.iter().map(String::as_str))?;
    Some(format!(
        "error: unknown command {word:?}: did you mean {meant:?}?\n\nUsage: bramblectl {meant} …  (bramblectl --help lists every command)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn a_mistyped_command_gets_the_one_meant() {
        let e = Cli::try_parse_from(["bramblectl", "gte", "nodes"]).expect_err("unknown");
        let hint = suggest_command(&e).expect("a suggestion");
        assert!(
            hint.starts_with("error: unknown command \"gte\": did you mean \"get\"?"),
            "{hint}"
        );
        let e = Cli::try_parse_from(["bramblectl", "zzzz"]).expect_err("unknown");
        assert_eq!(suggest_command(&e), None);
        let e = Cli::try_parse_from(["bramblectl", "get", "nodse"]).expect_err("unknown type");
        assert!(e.to_string().contains("did you mean \"nodes\"?"), "{e}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "bramblectl",
            "get",
            "svc/web",
            "-o",
            "wide",
            "--server",
            "http://x:1",
        ])
        .expect("parses");
        assert_eq!(cli.global.server.as_deref(), Some("http://x:1"));
        let Command::Get(g) = cli.command else {
            panic!("not get")
        };
        assert_eq!(
            g.resource.resource,
            Resource::Workloads(Some(Kind::Service))
        );
        assert_eq!(g.resource.name.as_deref(), Some("web"));
        assert!(matches!(g.output, Some(Output::Format(Format::Wide))));
    }

    #[test]
    fn drain_timeout_and_events_object_are_parsed() {
        let cli = Cli::try_parse_from(["bramblectl", "drain", "pi-1"]).expect("parses");
        let Command::Drain(d) = cli.command else {
            panic!("not drain")
        };
        assert_eq!(d.timeout, Duration::from_secs(300));
        let cli = Cli::try_parse_from(["bramblectl", "drain", "pi-1", "--timeout", "90s"])
            .expect("parses");
        let Command::Drain(d) = cli.command else {
            panic!("not drain")
        };
        assert_eq!(d.timeout, Duration::from_secs(90));
        assert!(Cli::try_parse_from(["bramblectl", "drain", "pi-1", "--timeout", "soon"]).is_err());

        let cli = Cli::try_parse_from(["bramblectl", "events", "-w", "--for", "svc/web"])
            .expect("parses");
        let Command::Events(e) = cli.command else {
            panic!("not events")
        };
        assert!(e.watch);
        assert_eq!(
            e.object.map(|o| o.to_string()).as_deref(),
            Some("service/web")
        );
        assert!(Cli::try_parse_from(["bramblectl", "events", "--for", "web"]).is_err());
        assert!(Cli::try_parse_from(["bramblectl", "events", "-o", "wide"]).is_err());
    }

    #[test]
    fn delete_needs_a_kind_or_files() {
        assert!(Cli::try_parse_from(["bramblectl", "delete"]).is_err());
        assert!(Cli::try_parse_from(["bramblectl", "delete", "-f", "m/"]).is_ok());
        assert!(Cli::try_parse_from(["bramblectl", "delete", "job", "x"]).is_ok());
    }
}
