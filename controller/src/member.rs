//! A local etcd member that the controller starts and supervises (`--etcd-cluster
//! NAME=HOST,...`), so three controllers on three boards make a highly available
//! cluster with one command each, as `k3s server --cluster-init` does: no separate
//! etcd to configure and secure by hand. It runs Debian's `etcd` binary (`etcd-server`).
//!
//! Security: etcd holds the whole cluster state, so the member serves TLS only and asks
//! every client and every peer for a certificate of the etcd CA (`etcd-ca.crt`,
//! `etcd-ca.key` in the data dir: made by the first controller, copied to the others
//! with the other identity files). It is a CA of its own, not the cluster CA: nodes
//! hold certificates of the cluster CA, and a node must never be able to write the
//! store.
//!
//! Files under the data dir: `etcd-ca.crt`, `etcd-ca.key` (0600); `etcd/member.crt`,
//! `etcd/member.key` (signed at every start for this member's host, used to serve
//! clients and peers and to dial peers); `etcd/client.crt`, `etcd/client.key` (this
//! controller's client certificate); `etcd/data/` (etcd's own).
//!
//! Supervision: etcd's output goes to the controller's log (target `etcd`, warnings
//! and worse only, so a member at rest writes nothing to the SD card); when etcd exits
//! it is started again after a back-off (1 s doubling to 30 s); when the controller
//! stops, it stops etcd (SIGTERM, SIGKILL after 10 s). An etcd left running by a
//! controller that was killed is found by its data dir and stopped first.
//!
//! History: the member compacts revisions older than the last [`KEEP_REVISIONS`]
//! (etcd checks every 5 minutes and does nothing when nothing was written), so months
//! of applies never fill etcd's quota and turn the cluster read-only.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::files::{private_dir, write_secret};
use crate::pki::{io, load_or_make_ca, write_public, TlsError};
use crate::store::TlsFiles;

/// etcd's client port on every member.
pub const CLIENT_PORT: u16 = 2379;
/// etcd's peer port on every member.
pub const PEER_PORT: u16 = 2380;
/// The etcd CA's certificate in the data dir.
pub const ETCD_CA_CERT: &str = "etcd-ca.crt";
/// The etcd CA's key in the data dir (0600).
pub const ETCD_CA_KEY: &str = "etcd-ca.key";
/// Revisions of history kept by the member's auto-compaction.
pub const KEEP_REVISIONS: u32 = 10_000;

/// How long a stopping etcd gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Back-off between restarts of an etcd that exited.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An etcd that ran this long before exiting restarts after the first back-off again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Lines of etcd's output kept for error messages.
const KEPT_LINES: usize = 20;

/// The local member's configuration (`--etcd-cluster`, `--etcd-name`, `--etcd-binary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// This member's name, one of `cluster`'s.
    pub name: String,
    /// Every member of the cluster: (name, host), this one included.
    pub cluster: Vec<(String, String)>,
    /// The etcd binary (a path, or a name looked up on `PATH`).
    pub binary: PathBuf,
}

impl MemberConfig {
    /// This member's host.
    pub fn host(&self) -> Option<&str> {
        self.cluster
            .iter()
            .find(|(n, _)| *n == self.name)
            .map(|(_, h)| h.as_str())
    }

    /// Every member's client URL: what the controller's store connects to.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster
            .iter()
            .map(|(_, h)| format!("https://{}:{CLIENT_PORT}", url_host(h)))
            .collect()
    }

    /// The files the controller's store uses to reach the members.
    pub fn tls(data_dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: data_dir.join(ETCD_CA_CERT),
            cert: Some(data_dir.join("etcd").join("client.crt")),
            key: Some(data_dir.join("etcd").join("client.key")),
        }
    }

    /// The checks the flags need: `name` is one of the members, names are unique.
    pub fn check(&self) -> Result<(), String> {
        if self.host().is_none() {
            let names: Vec<&str> = self.cluster.iter().map(|(n, _)| n.as_str()).collect();
            return Err(format!(
                "--etcd-name {:?} is not one of --etcd-cluster's members ({}): give this controller's name with --etcd-name",
                self.name,
                names.join(", ")
            ));
        }
        Ok(())
    }
}

/// An IPv6 address in brackets, as URLs want it.
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Parses `--etcd-cluster`'s entries (`NAME=HOST`, HOST an address or a DNS name
/// without scheme or port): the members in the order given.
pub fn parse_cluster(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut members: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for e in entries {
        let Some((name, host)) = e.split_once('=') else {
            return Err(format!(
                "--etcd-cluster: {e:?} is not NAME=HOST (e.g. pi1=192.168.1.11)"
            ));
        };
        let (name, host) = (name.trim(), host.trim());
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !name_ok {
            return Err(format!(
                "--etcd-cluster: member name {name:?} must be 1-63 letters, digits, '-', '_' or '.'"
            ));
        }
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        let host_ok = is_ip
            || (!host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !host_ok {
            return Err(format!(
                "--etcd-cluster: {name}'s host {host:?} must be an address or a DNS name, without scheme or port (ports are {CLIENT_PORT} and {PEER_PORT})"
            ));
        }
        if members.iter().any(|(n, _)| n == name) {
            return Err(format!("--etcd-cluster: member {name} is listed twice"));
        }
        if members.iter().any(|(_, h)| h == host) {
            return Err(format!(
                "--etcd-cluster: host {host} is listed twice (one member per machine)"
            ));
        }
        members.push((name.to_string(), host.to_string()));
    }
    if members.is_empty() {
        return Err("--etcd-cluster: no member given".into());
    }
    Ok(members)
}

/// Why the local member cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// Its certificates cannot be made.
    #[error("etcd member certificates")]
    Tls(#[from] TlsError),
    /// The etcd binary is not there.
    #[error("etcd binary {0:?} not found: install Debian's etcd-server (apt install etcd-server, then systemctl disable --now etcd: the controller runs the member) or give --etcd-binary")]
    NoBinary(PathBuf),
    /// etcd cannot be started.
    #[error("starting {binary:?}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration does not name this member.
    #[error("{0}")]
    Config(String),
}

/// The running member and its supervisor; [`Member::stop`] ends both.
pub struct Member {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Everything one start of etcd needs.
#[derive(Clone)]
struct Launch {
    binary: PathBuf,
    args: Vec<String>,
    data: PathBuf,
}

impl Member {
    /// Makes the member's certificates (and the etcd CA on first start), stops an etcd
    /// a killed controller left on this data dir, and starts etcd under supervision.
    pub async fn start(cfg: &MemberConfig, data_dir: &Path) -> Result<Member, MemberError> {
        let host = cfg
            .host()
            .ok_or_else(|| MemberError::Config(cfg.check().err().unwrap_or_default()))?
            .to_string();
        let binary =
            find_binary(&cfg.binary).ok_or_else(|| MemberError::NoBinary(cfg.binary.clone()))?;
        let dir = data_dir.join("etcd");
        private_dir(&dir).map_err(io(&dir))?;
        let (issuer, _) = load_or_make_ca(
            &data_dir.join(ETCD_CA_CERT),
            &data_dir.join(ETCD_CA_KEY),
            "Bramble etcd CA",
        )?;
        // Peers dial each other with the member certificate too: both uses.
        issue(
            &issuer,
            &dir,
            "member",
            vec![host.clone(), "localhost".into(), "127.0.0.1".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        issue(
            &issuer,
            &dir,
            "client",
            vec!["bramble-controller".into()],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let data = dir.join("data");
        let ca = data_dir.join(ETCD_CA_CERT);
        let launch = Launch {
            args: etcd_args(cfg, &host, &dir, &data, &ca),
            binary,
            data,
        };
        stop_leftover(&launch.data).await;
        let (stop, stop_rx) = watch::channel(false);
        let first = spawn(&launch).map_err(|source| MemberError::Spawn {
            binary: launch.binary.clone(),
            source,
        })?;
        tracing::info!(
            name = %cfg.name,
            client = %format!("https://{}:{CLIENT_PORT}", url_host(&host)),
            peers = cfg.cluster.len(),
            "etcd member started"
        );
        let task = tokio::spawn(supervise(launch, first, stop_rx));
        Ok(Member { stop, task })
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and its supervisor.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The command line of the member.
fn etcd_args(cfg: &MemberConfig, host: &str, dir: &Path, data: &Path, ca: &Path) -> Vec<String> {
    let host = url_host(host);
    let initial = cfg
        .cluster
        .iter()
        .map(|(n, h)| format!("{n}=https://{}:{PEER_PORT}", url_host(h)))
        .collect::<Vec<_>>()
        .join(",");
    let path = |p: &Path| p.display().to_string();
    let member_cert = path(&dir.join("member.crt"));
    let member_key = path(&dir.join("member.key"));
    let ca = path(ca);
    [
        ("--name", cfg.name.clone()),
        ("--data-dir", path(data)),
        (
            "--listen-client-urls",
            format!("https://0.0.0.0:{CLIENT_PORT}"),
        ),
        (
            "--advertise-client-urls",
            format!("https://{host}:{CLIENT_PORT}"),
        ),
        ("--listen-peer-urls", format!("https://0.0.0.0:{PEER_PORT}")),
        (
            "--initial-advertise-peer-urls",
            format!("https://{host}:{PEER_PORT}"),
        ),
        ("--initial-cluster", initial),
        ("--initial-cluster-state", "new".into()),
        // Fixed, not derived from the CA: a member first started with the wrong CA
        // (before the operator copied the files) must still join once it has the
        // right one. The CA is what keeps other clusters' members out.
        ("--initial-cluster-token", "bramble".into()),
        ("--cert-file", member_cert.clone()),
        ("--key-file", member_key.clone()),
        ("--trusted-ca-file", ca.clone()),
        ("--client-cert-auth", "true".into()),
        ("--peer-cert-file", member_cert),
        ("--peer-key-file", member_key),
        ("--peer-trusted-ca-file", ca),
        ("--peer-client-cert-auth", "true".into()),
        // A member back from a power cut asks before it campaigns (Raft's pre-vote;
        // etcd 3.4 leaves it off). Without it, a member whose election timer ran out
        // while it rejoined bumps the term and unseats a healthy etcd leader, and the
        // stall made the controller that led lose its lease.
        ("--pre-vote", "true".into()),
        ("--auto-compaction-mode", "revision".into()),
        ("--auto-compaction-retention", KEEP_REVISIONS.to_string()),
        ("--logger", "zap".into()),
        ("--log-outputs", "stderr".into()),
        ("--log-level", "warn".into()),
    ]
    .into_iter()
    .map(|(flag, value)| format!("{flag}={value}"))
    .collect()
}

/// Signs a fresh certificate `NAME.crt` (+ `NAME.key`, 0600) in `dir`.
fn issue(
    issuer: &Issuer<'static, KeyPair>,
    dir: &Path,
    name: &str,
    sans: Vec<String>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<(), TlsError> {
    let generate = |source| TlsError::Generate {
        what: "etcd certificate",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(sans).map_err(generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("bramble etcd {name}"));
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, issuer).map_err(generate)?;
    let key_path = dir.join(format!("{name}.key"));
    write_secret(&key_path, &key.serialize_pem()).map_err(io(&key_path))?;
    let cert_path = dir.join(format!("{name}.crt"));
    write_public(&cert_path, &cert.pem()).map_err(io(&cert_path))?;
    Ok(())
}

/// The binary's path: as given when it names a file, else looked up on `PATH`.
fn find_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn spawn(launch: &Launch) -> std::io::Result<Child> {
    Command::new(&launch.binary)
        .args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // A controller that panics or returns early still takes its member along.
        .kill_on_drop(true)
        .spawn()
}

/// Forwards etcd's output to the log and keeps its last lines.
fn forward_output(child: &mut Child, last: Arc<Mutex<VecDeque<String>>>) {
    let Some(stderr) = child.stderr.take() else {
        return;
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::warn!(target: "etcd", "{line}");
            let mut kept = last.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
}

/// Keeps etcd running until told to stop, then stops it.
async fn supervise(launch: Launch, first: Child, mut stop: watch::Receiver<bool>) {
    let mut child = first;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let last = Arc::new(Mutex::new(VecDeque::new()));
        forward_output(&mut child, Arc::clone(&last));
        let started = tokio::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                let lines: Vec<String> = last.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = FIRST_BACKOFF;
                }
                tracing::error!(
                    status = ?status.ok(),
                    restart_in = ?backoff,
                    last_output = %lines.join("\n"),
                    "etcd member exited; starting it again"
                );
            }
            _ = stop.changed() => {
                terminate(&mut child).await;
                tracing::info!("etcd member stopped");
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        stop_leftover(&launch.data).await;
        child = loop {
            match spawn(&launch) {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, binary = ?launch.binary, retry_in = ?backoff, "cannot start etcd");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn terminate(child: &mut Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        tracing::warn!("etcd did not stop within 10 s of SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

/// Stops every etcd process serving `data` (left by a controller that was killed, which
/// could not stop it): two would fight over the data dir and the ports.
async fn stop_leftover(data: &Path) {
    let wanted = format!("--data-dir={}", data.display());
    let pids: Vec<rustix::process::Pid> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let exe = args.next()?;
            let is_etcd = Path::new(std::str::from_utf8(exe).ok()?)
                .file_name()
                .is_some_and(|n| n == "etcd");
            let ours = args.any(|a| a == wanted.as_bytes());
            (is_etcd && ours).then_some(pid)
        })
        .filter_map(rustix::process::Pid::from_raw)
        .collect();
    for pid in &pids {
        tracing::warn!(
            pid = pid.as_raw_nonzero().get(),
            "stopping an etcd left running on this data dir"
        );
        let _ = rustix::process::kill_process(*pid, rustix::process::Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for pid in &pids {
        while Path::new(&format!("/proc/{}", pid.as_raw_nonzero().get())).exists() {
            if tokio::time::Instant::now() > deadline {
                let _ = rustix::process::kill_process(*pid, rustix::process::Signal::KILL);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(s: &[&str]) -> Vec<String> {
        s.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_cluster_is_names_and_hosts_in_order() {
        let m = parse_cluster(&entries(&[
            "pi1=192.168.1.11",
            "pi2=pi2.local",
            "pi3=fd00::3",
        ]))
        .expect("valid");
        assert_eq!(
            m,
            vec![
                ("pi1".to_string(), "192.168.1.11".to_string()),
                ("pi2".to_string(), "pi2.local".to_string()),
                ("pi3".to_string(), "fd00::3".to_string()),
            ]
        );
        let cfg = MemberConfig {
            name: "pi3".into(),
            cluster: m,
            binary: "etcd".into(),
        };
        assert_eq!(
            cfg.endpoints(),
            [
                "https://192.168.1.11:2379",
                "https://pi2.local:2379",
                "https://[fd00::3]:2379"
            ]
        );
        assert_eq!(cfg.host(), Some("fd00::3"));
        cfg.check().expect("pi3 is a member");
    }

    #[test]
    fn bad_entries_are_refused_with_what_is_wrong() {
        for (bad, says) in [
            (&["pi1"][..], "is not NAME=HOST"),
            (&["=10.0.0.1"][..], "member name"),
            (&["pi 1=10.0.0.1"][..], "member name"),
            (&["pi1=https://10.0.0.1:2379"][..], "without scheme or port"),
            (&["pi1=10.0.0.1:2379"][..], "without scheme or port"),
            (&["pi1="][..], "without scheme or port"),
            (&["pi1=10.0.0.1", "pi1=10.0.0.2"][..], "listed twice"),
            (&["pi1=10.0.0.1", "pi2=10.0.0.1"][..], "listed twice"),
            (&[][..], "no member"),
        ] {
            let err = parse_cluster(&entries(bad)).expect_err(&format!("{bad:?} refused"));
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_name_not_in_the_cluster_is_refused() {
        let cfg = MemberConfig {
            name: "pi9".into(),
            cluster: parse_cluster(&entries(&["pi1=10.0.0.1"])).expect("valid"),
            binary: "etcd".into(),
        };
        let err = cfg.check().expect_err("refused");
        assert!(err.contains("pi9") && err.contains("pi1"), "{err}");
    }

    #[test]
    fn the_member_serves_and_peers_over_tls_with_client_certificates_only() {
        let cfg = MemberConfig {
            name: "a".into(),
            cluster: parse_cluster(&entries(&["a=10.0.0.1", "b=10.0.0.2", "c=10.0.0.3"]))
                .expect("valid"),
            binary: "etcd".into(),
        };
        let dir = Path::new("/d/etcd");
        let args = etcd_args(
            &cfg,
            "10.0.0.1",
            dir,
            &dir.join("data"),
            Path::new("/d/etcd-ca.crt"),
        );
        for want in [
            "--client-cert-auth=true",
            "--peer-client-cert-auth=true",
            "--trusted-ca-file=/d/etcd-ca.crt",
            "--peer-trusted-ca-file=/d/etcd-ca.crt",
            "--advertise-client-urls=https://10.0.0.1:2379",
            "--initial-cluster=a=https://10.0.0.1:2380,b=https://10.0.0.2:2380,c=https://10.0.0.3:2380",
            "--data-dir=/d/etcd/data",
            "--pre-vote=true",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
        }
        assert!(
            args.iter().all(|a| !a.contains("http://")),
            "no plain http: {args:?}"
        );
    }
}
