//! `bramble-controller`: parses flags, installs logging, binds and runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bramble_controller::config::HealthConfig;
use bramble_controller::{Config, Controller, LocalAgent};
use clap::Parser;

/// Exit code for bad configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// Bramble controller: REST API, store, scheduler, and (by default) an agent for this machine.
#[derive(Parser, Debug)]
#[command(name = "bramble-controller", version, about)]
struct Args {
    /// Address and port to serve the API, the agent link and the dashboard on.
    #[arg(long, env = "BRAMBLE_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    /// Directory for the store and tokens [default: /var/lib/bramble as root, else ~/.local/share/bramble].
    #[arg(long, env = "BRAMBLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Admin token to use (otherwise read from, or created in, the data directory).
    #[arg(long, env = "BRAMBLE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Join token agents must present (otherwise read from, or created in, the data directory).
    #[arg(long, env = "BRAMBLE_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Read-only token for the dashboard and `GET`s (otherwise read from, or created in, the data directory).
    #[arg(long, env = "BRAMBLE_VIEWER_TOKEN", hide_env_values = true)]
    viewer_token: Option<String>,
    /// Do not run an agent for this machine in the controller process.
    #[arg(long)]
    no_local_agent: bool,
    /// Node name of the local agent [default: the host name].
    #[arg(long, env = "BRAMBLE_NODE_NAME")]
    node_name: Option<String>,
    /// Do not advertise the controller over mDNS (`_bramble._tcp.local.`).
    #[arg(long)]
    no_mdns: bool,
    /// Advertise over mDNS only on this network interface (repeatable) [default: all].
    #[arg(long = "mdns-interface")]
    mdns_interfaces: Vec<String>,
    /// Base URL agents should use, put in the mDNS TXT record (e.g. behind NAT).
    #[arg(long)]
    advertise_url: Option<String>,
    /// The local agent serves no workload addresses: names do not resolve in its
    /// containers, and other nodes cannot reach its instances by name.
    #[arg(long, env = "BRAMBLE_NO_SERVICE_PROXY")]
    no_service_proxy: bool,
    /// The local agent's agent-to-agent port.
    #[arg(long, env = "BRAMBLE_MESH_PORT", default_value_t = bramble_api::endpoints::MESH_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    mesh_port: u16,
    /// Label of the local agent's node, `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where the local agent lets `hostPath` volumes be: a directory prefix
    /// (repeatable) [default: /var/lib/bramble/volumes].
    #[arg(
        long = "allow-host-path",
        env = "BRAMBLE_ALLOW_HOST_PATH",
        value_delimiter = ','
    )]
    allow_host_paths: Vec<std::path::PathBuf>,
    /// The static `bramble-gate` executable with which the local agent starts cron runs
    /// ahead of their slot, their command held until it [default: bramble-gate beside
    /// this executable, if static].
    #[arg(long, env = "BRAMBLE_CRON_GATE", value_name = "FILE")]
    cron_gate: Option<std::path::PathBuf>,
    /// How often agents send heartbeats (and the controller its keep-alives).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    heartbeat: Duration,
    /// A node silent this long is NotReady (gets no new tasks).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    node_not_ready_after: Duration,
    /// A node silent this long is Dead: its Services and Jobs run elsewhere.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    node_dead_after: Duration,
    /// An agent that hears nothing from the controller this long stops its Wallets.
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    fence_timeout: Duration,
    /// Extra wait before a silent node's Wallet starts elsewhere; must exceed the
    /// heartbeat plus the time to stop a container (see HealthConfig in nodes.rs).
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    fence_margin: Duration,
    /// After a controller start, extra time a node that has not reconnected yet gets
    /// before it counts as Dead (agents redial with back-off of up to 5 s).
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    startup_grace: Duration,
    /// Serve this certificate chain (PEM, leaf first, ending with the CA agents are to
    /// pin) instead of one from the controller's own CA.
    #[arg(
        long,
        env = "BRAMBLE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "BRAMBLE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Another name or address to put in the server certificate (repeatable); the host
    /// name, `.local` and every interface address are there already.
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Let the viewer token read task logs and job output (they may hold secrets).
    #[arg(long)]
    viewer_logs: bool,
    /// Keep the state in this etcd v3 cluster (client URLs, `http://HOST:PORT`,
    /// comma-separated) instead of the data dir's SQLite file. Several controllers on
    /// one etcd elect a leader; every one serves the API and the dashboard.
    #[arg(long, env = "BRAMBLE_ETCD", value_delimiter = ',', value_name = "URL")]
    etcd: Vec<String>,
    /// Run and supervise a local etcd member of this cluster of members (NAME=HOST,
    /// comma-separated, the same list on every controller; ports 2379 and 2380) and keep
    /// the state there: three controllers on three machines, one command each. TLS
    /// with client certificates of an etcd CA the controller makes (copy etcd-ca.crt and
    /// etcd-ca.key with the other identity files). Needs the `etcd` binary (Debian's
    /// etcd-server).
    #[arg(
        long,
        env = "BRAMBLE_ETCD_CLUSTER",
        value_delimiter = ',',
        value_name = "NAME=HOST",
        conflicts_with_all = ["etcd", "etcd_cacert", "etcd_allow_plain_http"]
    )]
    etcd_cluster: Vec<String>,
    /// This controller's member name in --etcd-cluster (default: the host name).
    #[arg(
        long,
        env = "BRAMBLE_ETCD_NAME",
        value_name = "NAME",
        requires = "etcd_cluster"
    )]
    etcd_name: Option<String>,
    /// The etcd binary the local member runs.
    #[arg(
        long,
        env = "BRAMBLE_ETCD_BINARY",
        default_value = "etcd",
        value_name = "PATH"
    )]
    etcd_binary: PathBuf,
    /// The CA that signed etcd's server certificates (PEM); the endpoints are then
    /// https://.
    #[arg(long, env = "BRAMBLE_ETCD_CACERT", value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// This controller's client certificate for etcd (PEM; etcd's --client-cert-auth).
    #[arg(long, env = "BRAMBLE_ETCD_CERT", value_name = "FILE", requires_all = ["etcd_key", "etcd_cacert"])]
    etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(
        long,
        env = "BRAMBLE_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    etcd_key: Option<PathBuf>,
    /// Allow plain http:// to an etcd on another machine (the state crosses the network in
    /// clear): only on a network that only the controllers reach.
    #[arg(long)]
    etcd_allow_plain_http: bool,
    /// The prefix every key lives under in etcd, so clusters can share one.
    #[arg(long, env = "BRAMBLE_ETCD_PREFIX", default_value = "/bramble/")]
    etcd_prefix: String,
    /// The leader's lease in etcd: a dead leader is replaced about this long after its
    /// last renewal (at least 2s). The leader renews every sixth of it and stops acting
    /// a third of it before the lease can end.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    leader_lease: Duration,
    /// Another controller of this cluster (repeatable or comma-separated): the local
    /// agent fails over to it.
    #[arg(
        long = "peer",
        env = "BRAMBLE_PEERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    peers: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<bramble_api::duration::Duration>()
        .map(|d| d.std())
        .map_err(|e| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label {s:?}: expected key=value")),
    }
}

fn default_data_dir() -> PathBuf {
    let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::env::var("HOME").map(|h| h == "/root").unwrap_or(false);
    if is_root {
        PathBuf::from("/var/lib/bramble")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".local/share/bramble")
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_string())
}

/// The configuration the flags ask for, checked ([`Config::validate`]).
fn config(args: Args) -> Result<Config, String> {
    let local_agent = (!args.no_local_agent).then(|| LocalAgent {
        node_name: args.node_name.unwrap_or_else(hostname),
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        allow_host_paths: args.allow_host_paths,
        mesh_port: (!args.no_service_proxy).then_some(args.mesh_port),
        cron_gate: args.cron_gate,
    });
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let member = if args.etcd_cluster.is_empty() {
        None
    } else {
        let m = bramble_controller::member::MemberConfig {
            name: args.etcd_name.clone().unwrap_or_else(hostname),
            cluster: bramble_controller::member::parse_cluster(&args.etcd_cluster)?,
            binary: args.etcd_binary.clone(),
        };
        m.check()?;
        Some(m)
    };
    let etcd = match &member {
        Some(m) => Some(bramble_controller::config::Etcd {
            endpoints: m.endpoints(),
            prefix: args.etcd_prefix.clone(),
            tls: Some(bramble_controller::member::MemberConfig::tls(&data_dir)),
            allow_plain_http: false,
        }),
        None => (!args.etcd.is_empty()).then(|| bramble_controller::config::Etcd {
            endpoints: args.etcd.clone(),
            prefix: args.etcd_prefix.clone(),
            tls: args
                .etcd_cacert
                .clone()
                .map(|ca| bramble_controller::config::TlsFiles {
                    ca,
                    cert: args.etcd_cert.clone(),
                    key: args.etcd_key.clone(),
                }),
            allow_plain_http: args.etcd_allow_plain_http,
        }),
    };
    let cfg = Config {
        data_dir,
        admin_token: args.admin_token,
        join_token: args.join_token,
        viewer_token: args.viewer_token,
        local_agent,
        health: HealthConfig {
            heartbeat: args.heartbeat,
            not_ready_after: args.node_not_ready_after,
            dead_after: args.node_dead_after,
            fence: args.fence_timeout,
            fence_margin: args.fence_margin,
            startup_grace: args.startup_grace,
        },
        resync: Duration::from_millis(500),
        mdns: (!args.no_mdns).then(|| bramble_controller::Mdns {
            instance: hostname(),
            interfaces: args.mdns_interfaces,
            url: args.advertise_url.clone(),
        }),
        tls: bramble_controller::config::TlsOptions {
            cert: args.tls_cert,
            key: args.tls_key,
            names: args.tls_sans,
        },
        viewer_logs: args.viewer_logs,
        cluster: bramble_controller::config::Cluster {
            etcd,
            leader: bramble_controller::config::Timing::for_lease(args.leader_lease),
            name: hostname(),
            url: args.advertise_url.clone(),
            peers: args.peers,
            member,
        },
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    with_malloc_tunables();
    if let Err(e) = bramble_agent::logging::init() {
        eprintln!("error: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let listen = args.listen;
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(cfg, listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The allocator settings the controller runs with, unless `GLIBC_TUNABLES` is set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536:glibc.malloc.top_pad=0";

/// Runs this program again, with the same pid, arguments and file descriptors, under
/// [`MALLOC_TUNABLES`]: glibc reads them only when a program starts.
///
/// Why: placing a thousand tasks frees in bursts what each tokio worker's malloc arena
/// then keeps, a burst's size in every arena, for the life of the process. With 100
/// nodes and 1,000 tasks at rest that was 39-40 MiB of RSS, 35 MiB with these (large
/// blocks mapped on their own, and freed memory at the top of a heap given back).
/// `mallopt` would do it in-process, but this workspace has no unsafe code. An operator's
/// own `GLIBC_TUNABLES` is kept as it is, which also ends the second start here.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn with_malloc_tunables() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "GLIBC_TUNABLES";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let Some(arg0) = args.next() else {
        return;
    };
    // Returns only if the exec failed: the controller then runs with glibc's defaults.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(VAR, MALLOC_TUNABLES)
        .exec();
    eprintln!(
        "note: running with glibc's default allocator settings: cannot restart with {VAR}: {err}"
    );
}

#[tokio::main]
async fn run(cfg: Config, listen: SocketAddr) -> anyhow::Result<()> {
    let data_dir = cfg.data_dir.clone();
    let local = cfg.local_agent.as_ref().map(|l| l.node_name.clone());
    let member = cfg.cluster.member.as_ref().map(|m| m.name.clone());
    let controller = Controller::open(cfg)
        .await
        .context("cannot start the controller")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let files = controller.token_files();
    let shown = if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    };
    let ca = controller.ca_fingerprint().clone();
    println!(
        "Bramble controller {} on https://{listen}",
        bramble_api::VERSION
    );
    println!("  data dir:     {}", data_dir.display());
    println!("  store:        {}", controller.store_location());
    if let Some(name) = member {
        println!(
            "  etcd member:  {name}, run by this controller (data {}; copy etcd-ca.crt and etcd-ca.key to the other controllers)",
            data_dir.join("etcd").join("data").display()
        );
    }
    println!(
        "  cluster CA:   sha256 {ca}  ({}/ca.crt)",
        data_dir.display()
    );
    println!(
        "  dashboard:    https://{shown}/  (trust {}/ca.crt in the browser)",
        data_dir.display()
    );
    println!(
        "  admin token:  {}  (bramblectl login https://{shown}; export BRAMBLE_TOKEN=$(cat {}))",
        files.admin.display(),
        files.admin.display()
    );
    println!(
        "  join token:   {}  (agents: --join-token-file or BRAMBLE_JOIN_TOKEN; it carries the CA)",
        files.join.display()
    );
    println!(
        "  viewer token: {}  (read-only dashboard sign-in)",
        files.viewer.display()
    );
    match &local {
        Some(n) => println!("  local agent:  node {n:?}"),
        None => println!("  local agent:  off"),
    }
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending::<()>().await,
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    };
    controller.run(listener, shutdown).await?;
    Ok(())
}
