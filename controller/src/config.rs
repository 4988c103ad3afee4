//! The controller's configuration and its checks, made before any port is bound.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::core::health::HealthConfig;
pub use crate::http::tls::TlsOptions;
pub use crate::state::leader::Timing;
pub use crate::store::TlsFiles;

/// The controller's configuration (see `main.rs` for flags and defaults).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the store and tokens live.
    pub data_dir: PathBuf,
    /// Admin token to use instead of the stored or generated one.
    pub admin_token: Option<String>,
    /// Join token to use instead of the stored or generated one.
    pub join_token: Option<String>,
    /// Viewer (read-only) token to use instead of the stored or generated one.
    pub viewer_token: Option<String>,
    /// Run an agent for this machine in the same process.
    pub local_agent: Option<LocalAgent>,
    /// Heartbeat and node-loss timings.
    pub health: HealthConfig,
    /// Full reconcile at least this often, whatever happens.
    pub resync: Duration,
    /// Advertise over mDNS; `None` turns it off.
    pub mdns: Option<Mdns>,
    /// Where the TLS certificate comes from (the own CA by default).
    pub tls: TlsOptions,
    /// Let the viewer token read task logs and job output (they may hold secrets).
    pub viewer_logs: bool,
    /// Where the state lives and how controllers sharing it elect a leader.
    pub cluster: Cluster,
}

/// The store, and the controllers that share it.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// An etcd cluster instead of the data dir's SQLite file (`--etcd`).
    pub etcd: Option<Etcd>,
    /// Timings of the leader election among controllers on one etcd.
    pub leader: Timing,
    /// This controller's name in the election and `get controllers` (the host name).
    pub name: String,
    /// The URL agents and `bramblectl` reach this controller at, if known.
    pub url: Option<String>,
    /// The other controllers' URLs (`--peer`): the local agent fails over to them.
    pub peers: Vec<String>,
    /// The local etcd member this controller runs (`--etcd-cluster`); `etcd` then
    /// points at the members.
    pub member: Option<crate::member::MemberConfig>,
}

/// The etcd cluster holding the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Etcd {
    /// Client URLs of its members (`https://HOST:PORT`, or `http://` on this machine).
    pub endpoints: Vec<String>,
    /// The prefix every key lives under (`/bramble/`).
    pub prefix: String,
    /// Its CA and this controller's client certificate (`--etcd-cacert`, ...).
    pub tls: Option<TlsFiles>,
    /// Plain http to another machine (`--etcd-allow-plain-http`).
    pub allow_plain_http: bool,
}

/// mDNS advertisement settings.
#[derive(Debug, Clone, Default)]
pub struct Mdns {
    /// Instance name (the host name).
    pub instance: String,
    /// Network interfaces to advertise on; empty means all.
    pub interfaces: Vec<String>,
    /// Base URL to put in the TXT record, when the addresses alone are not enough
    /// (NAT, a reverse proxy).
    pub url: Option<String>,
}

/// The embedded agent's settings.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    /// Node name.
    pub node_name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Where its tasks' `hostPath` volumes may be (the agent's `--allow-host-path`);
    /// empty means [`bramble_agent::host_paths::DEFAULT_ALLOWED`].
    pub allow_host_paths: Vec<std::path::PathBuf>,
    /// Its agent-to-agent port; `None`: it serves no workload addresses.
    pub mesh_port: Option<u16>,
    /// The static `bramble-gate` that starts its cron runs on time (the agent's
    /// `--cron-gate`); `None`: the one beside the executable, if usable.
    pub cron_gate: Option<std::path::PathBuf>,
}

/// A configuration that cannot work, said in terms of its flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub use crate::core::health::FENCE_CHECK_AND_STOP;

impl Config {
    /// Checks the timings against each other, the Wallet safety inequality among them
    /// (see [`HealthConfig`]): the margin must cover a heartbeat interval, the agent's
    /// check period and a fencing stop, so a fenced Wallet is surely stopped before it
    /// starts elsewhere.
    pub fn validate(&self) -> Result<(), Invalid> {
        let h = &self.health;
        if h.not_ready_after >= h.dead_after {
            return Err(Invalid(
                "--node-not-ready-after must be shorter than --node-dead-after".into(),
            ));
        }
        if h.heartbeat >= h.not_ready_after {
            return Err(Invalid(
                "--heartbeat must be shorter than --node-not-ready-after".into(),
            ));
        }
        if h.heartbeat >= h.fence {
            return Err(Invalid(
                "--heartbeat must be shorter than --fence-timeout".into(),
            ));
        }
        // The vouch window is two heartbeats (`health::vouch_window`).
        let needed = crate::core::health::least_margin(h);
        if h.fence_margin <= needed {
            return Err(Invalid(format!(
                "--fence-margin must exceed 2 x --heartbeat + {}ms ({}ms) so a fenced Wallet is surely stopped before it starts elsewhere",
                FENCE_CHECK_AND_STOP.as_millis(),
                needed.as_millis()
            )));
        }
        self.cluster.leader.check().map_err(Invalid)?;
        if let Some(etcd) = &self.cluster.etcd {
            #[cfg(feature = "etcd")]
            {
                crate::store::etcd::check_endpoints(
                    &etcd.endpoints,
                    etcd.tls.as_ref(),
                    etcd.allow_plain_http,
                )
                .map_err(Invalid)?;
                crate::store::etcd::root_of(&etcd.prefix).map_err(Invalid)?;
            }
            #[cfg(not(feature = "etcd"))]
            {
                let _ = etcd;
                return Err(Invalid(
                    "--etcd: this controller was built without the etcd feature".into(),
                ));
            }
        }
        for peer in &self.cluster.peers {
            if !peer.starts_with("https://") {
                return Err(Invalid(format!(
                    "--peer {peer}: expected https://HOST:PORT (controllers serve TLS only)"
                )));
            }
        }
        if self.resync.is_zero() {
            return Err(Invalid("the resync period must be positive".into()));
        }
        if let Some(la) = &self.local_agent {
            la.node_name
                .parse::<bramble_api::manifest::Name>()
                .map_err(|e| Invalid(format!("--node-name: {e}")))?;
            bramble_agent::host_paths::Policy::new(la.allow_host_paths.clone())
                .map_err(|e| Invalid(format!("--allow-host-path: {e}")))?;
            if let Some(gate) = &la.cron_gate {
                bramble_agent::gate::check(gate)
                    .map_err(|e| Invalid(format!("--cron-gate: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            data_dir: PathBuf::from("/tmp/x"),
            admin_token: None,
            join_token: None,
            viewer_token: None,
            local_agent: None,
            health: HealthConfig::default(),
            resync: Duration::from_millis(500),
            mdns: None,
            tls: TlsOptions::default(),
            viewer_logs: false,
            cluster: Cluster::default(),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn refuses_timings_that_break_the_wallet_argument() {
        fn ms(n: u64) -> Duration {
            Duration::from_millis(n)
        }
        type Tweak = fn(&mut HealthConfig);
        let cases: [(&str, Tweak, &str); 5] = [
            (
                "not ready after dead",
                |h| h.not_ready_after = ms(3000),
                "--node-not-ready-after",
            ),
            (
                "heartbeat slower than not ready",
                |h| h.heartbeat = ms(1200),
                "--heartbeat must be shorter than --node-not-ready-after",
            ),
            (
                "heartbeat slower than the fence",
                |h| {
                    h.heartbeat = ms(900);
                    h.fence = ms(800)
                },
                "--fence-timeout",
            ),
            (
                "margin too small",
                |h| h.fence_margin = ms(1050),
                "--fence-margin must exceed 2 x --heartbeat + 800ms (1300ms)",
            ),
            (
                "margin equal to the need",
                |h| {
                    h.heartbeat = ms(500);
                    h.fence_margin = ms(1800)
                },
                "(1800ms)",
            ),
        ];
        for (name, tweak, want) in cases {
            let mut c = config();
            tweak(&mut c.health);
            let err = c.validate().expect_err(name);
            assert!(err.0.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn refuses_a_bad_node_name() {
        let mut c = config();
        c.local_agent = Some(LocalAgent {
            mesh_port: None,
            node_name: "Not A Name".into(),
            labels: BTreeMap::new(),
            allow_host_paths: vec![],
            cron_gate: None,
        });
        assert!(c
            .validate()
            .expect_err("bad name")
            .0
            .starts_with("--node-name:"));
    }

    #[test]
    fn refuses_a_host_path_prefix_the_local_agent_would_refuse() {
        let mut c = config();
        c.local_agent = Some(LocalAgent {
            mesh_port: None,
            node_name: "pi".into(),
            labels: BTreeMap::new(),
            allow_host_paths: vec!["/etc/bramble".into()],
            cron_gate: None,
        });
        let e = c.validate().expect_err("a system path");
        assert!(e.0.starts_with("--allow-host-path:"), "{e}");
    }

    #[test]
    fn refuses_a_cron_gate_that_cannot_run_in_every_image() {
        let mut c = config();
        c.local_agent = Some(LocalAgent {
            mesh_port: None,
            node_name: "pi".into(),
            labels: BTreeMap::new(),
            allow_host_paths: vec![],
            cron_gate: Some("/nonexistent/bramble-gate".into()),
        });
        let e = c.validate().expect_err("missing");
        assert!(
            e.0.starts_with("--cron-gate: cannot read /nonexistent/bramble-gate"),
            "{e}"
        );
        if std::path::Path::new("/bin/ls").exists() {
            c.local_agent.as_mut().expect("agent").cron_gate = Some("/bin/ls".into());
            let e = c.validate().expect_err("dynamic");
            assert!(e.0.contains("dynamically linked"), "{e}");
        }
    }
}
