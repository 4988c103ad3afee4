//! `bramble-agent`: parses flags, installs logging and runs the agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Exit code for bad configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// Bramble agent: runs this node's tasks in Docker for a Bramble controller.
#[derive(Parser, Debug)]
#[command(name = "bramble-agent", version, about)]
struct Args {
    /// Controller URL, e.g. https://10.0.0.2:7878, or every controller's, separated by
    /// commas [default: found over mDNS].
    #[arg(long, env = "BRAMBLE_CONTROLLER")]
    controller: Option<String>,
    /// Look for the controller over mDNS only on this interface (repeatable).
    #[arg(long = "mdns-interface")]
    mdns_interfaces: Vec<String>,
    /// Join token, `BRAMBLE1-<CA fingerprint>-<secret>` (the controller's data dir,
    /// join-token). Prefer --join-token-file or the environment: argv is readable by
    /// every user of the machine.
    #[arg(
        long,
        env = "BRAMBLE_JOIN_TOKEN",
        hide_env_values = true,
        required_unless_present = "join_token_file"
    )]
    join_token: Option<String>,
    /// A file holding the join token (e.g. a 0600 file the SD-card image set up).
    #[arg(
        long,
        env = "BRAMBLE_JOIN_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "join_token"
    )]
    join_token_file: Option<PathBuf>,
    /// This node's name, kept in the data dir's node-name file [default: the kept name,
    /// else the host name, else pi-<serial> if the host name is a stock image default].
    #[arg(long, env = "BRAMBLE_NODE_NAME")]
    node_name: Option<String>,
    /// Directory for local state [default: /var/lib/bramble-agent as root, else ~/.local/share/bramble-agent].
    #[arg(long, env = "BRAMBLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Node label `key=value` (repeatable), matched by workloads' placement.nodeSelector.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Allow `hostPath` volumes under this directory (repeatable; the variable takes a
    /// comma-separated list). System paths (/, /etc, /proc, /sys, /dev, /run, /var/run,
    /// /boot, /root, /usr, /bin, /sbin, /lib, /var/lib/docker, ...), the data directory
    /// and the Docker socket's directory stay refused whatever is allowed
    /// [default: /var/lib/bramble/volumes].
    #[arg(
        long = "allow-host-path",
        env = "BRAMBLE_ALLOW_HOST_PATH",
        value_delimiter = ','
    )]
    allow_host_paths: Vec<PathBuf>,
    /// Remove images no container uses when Docker's disk is more than this many
    /// percent used (at most every 10 minutes); 100 turns it off.
    #[arg(long, env = "BRAMBLE_IMAGE_GC_THRESHOLD", default_value_t = bramble_agent::disk::DEFAULT_THRESHOLD,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    image_gc_threshold: u8,
    /// The agent-to-agent port: other nodes' agents reach this node's instances of
    /// workloads through it (mutual TLS with node certificates from the controller).
    #[arg(long, env = "BRAMBLE_MESH_PORT", default_value_t = bramble_api::endpoints::MESH_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    mesh_port: u16,
    /// Serve no workload addresses on this node: names do not resolve in its
    /// containers, and other nodes cannot reach its instances by name.
    #[arg(long, env = "BRAMBLE_NO_SERVICE_PROXY")]
    no_service_proxy: bool,
    /// Bytes a second each volume copy sent to a standby node may use, e.g. `4Mi`
    /// (a third of a Pi 3's 100 Mbit/s link); 0 means no cap.
    #[arg(long, env = "BRAMBLE_SYNC_RATE", default_value = "4Mi", value_parser = parse_rate)]
    sync_rate: u64,
    /// The static `bramble-gate` executable: cron runs are started ahead of their slot
    /// with it holding their command until the slot, so they begin on time, not a
    /// Docker start late [default: bramble-gate beside this executable, if static].
    #[arg(long, env = "BRAMBLE_CRON_GATE", value_name = "FILE")]
    cron_gate: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    s.parse::<bramble_api::quantity::Memory>()
        .map(|m| m.bytes())
        .map_err(|e| format!("{e} (bytes a second, e.g. 4Mi, or 0 for no cap)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label {s:?}: expected key=value")),
    }
}

/// The host name, lowercase and without a domain; empty if unknown.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| bramble_agent::host::short_hostname(&h))
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = bramble_agent::logging::init() {
        eprintln!("error: {e}");
        return ExitCode::from(EX_USAGE);
    }
    if let Some(Err(e)) = args
        .node_name
        .as_deref()
        .map(str::parse::<bramble_api::manifest::Name>)
    {
        eprintln!("error: --node-name: {e}");
        return ExitCode::from(EX_USAGE);
    }
    if let Some(Err(e)) = args
        .controller
        .as_deref()
        .map(bramble_agent::link::agent_urls)
    {
        eprintln!("error: --controller: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let data_dir = args.data_dir.unwrap_or_else(|| {
        if std::env::var("HOME").map(|h| h == "/root").unwrap_or(false) {
            PathBuf::from("/var/lib/bramble-agent")
        } else {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".local/share/bramble-agent")
        }
    });
    let join_token = match (args.join_token, &args.join_token_file) {
        (Some(t), _) => t,
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                eprintln!("error: --join-token-file {}: {e}", path.display());
                return ExitCode::from(EX_USAGE);
            }
        },
        (None, None) => {
            eprintln!("error: give the join token: --join-token-file FILE or BRAMBLE_JOIN_TOKEN");
            return ExitCode::from(EX_USAGE);
        }
    };
    // Checked before anything starts: a token without the CA fingerprint cannot be used.
    if let Err(e) = join_token.parse::<bramble_api::token::JoinToken>() {
        eprintln!("error: --join-token: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let mut cfg = bramble_agent::Config {
        controller: args.controller,
        mdns_interfaces: args.mdns_interfaces,
        join_token,
        // Resolved below, once the rest is known to be good: resolving may write the
        // data dir, and a bad configuration must change nothing.
        node_name: String::new(),
        data_dir,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        image_gc_threshold: args.image_gc_threshold,
        allow_host_paths: args.allow_host_paths,
        mesh_port: (!args.no_service_proxy).then_some(args.mesh_port),
        sync_rate: args.sync_rate,
        cron_gate: args.cron_gate,
    };
    // Refused here, before anything starts, rather than by the controller later.
    if let Err(e) = cfg.validate() {
        eprintln!("error: {}", bramble_api::error_chain(&e));
        return ExitCode::from(EX_USAGE);
    }
    cfg.node_name = bramble_agent::host::resolve_node_name(
        args.node_name.as_deref(),
        &cfg.data_dir,
        &hostname(),
        bramble_agent::host::machine_id().as_deref(),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending::<()>().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        bramble_agent::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", bramble_api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
