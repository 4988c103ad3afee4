//! A real etcd cluster on loopback for tests: Debian's `etcd-server` (3.4), one process
//! per member, each with its own data directory, stopped and removed on drop.
//!
//! Fails loudly when `etcd` is not installed: `.ci/run` installs it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bramble_controller::store::etcd::TlsFiles;
use bramble_controller::store::EtcdStore;

#[path = "../../../tests/src/ports.rs"]
mod ports;

/// A running etcd cluster.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    tls: Option<Pki>,
}

/// Certificates for an etcd that serves TLS and asks its clients for certificates: a CA,
/// etcd's server certificate (127.0.0.1, used by peers too), and one client certificate.
pub struct Pki {
    /// Files for [`EtcdStore::open`] with the client certificate.
    pub client: TlsFiles,
    /// A CA that signed nothing here, for "wrong CA" tests.
    pub other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn pki(dir: &std::path::Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write a PEM file");
        p
    };
    let ca = |name: &str| {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        let path = write(&format!("{name}.pem"), &cert.pem());
        (Issuer::new(params, key), path)
    };
    let (issuer, ca_path) = ca("etcd-ca");
    let (_, other_ca) = ca("other-ca");
    let leaf = |name: &str, sans: Vec<String>| {
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateParams::new(sans)
            .expect("leaf params")
            .signed_by(&key, &issuer)
            .expect("leaf certificate");
        (
            write(&format!("{name}.pem"), &cert.pem()),
            write(&format!("{name}-key.pem"), &key.serialize_pem()),
        )
    };
    let (server_cert, server_key) = leaf("server", vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf("client", vec!["bramble-controller".into()]);
    Pki {
        client: TlsFiles {
            ca: ca_path,
            cert: Some(client_cert),
            key: Some(client_key),
        },
        other_ca,
        server_cert,
        server_key,
    }
}

struct Member {
    name: String,
    client: String,
    peer: String,
    child: Option<Child>,
}

/// A free TCP port on loopback for an etcd member to listen on.
fn free_port() -> u16 {
    // 20000–25999: the end-to-end harness counts in 26000–31999 (see `ports`).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    ports::free_port_in(&NEXT, 20_000, 6_000)
}

fn etcd_binary() -> PathBuf {
    let candidates = ["/usr/bin/etcd", "/usr/local/bin/etcd"];
    for c in candidates {
        if std::path::Path::new(c).exists() {
            return PathBuf::from(c);
        }
    }
    panic!(
        "etcd is not installed (looked in {candidates:?}); install Debian's etcd-server \
         (apt-get install etcd-server), as .ci/run does"
    );
}

impl Etcd {
    /// Starts `n` members forming one cluster and waits until it has a leader.
    pub async fn start(n: usize) -> Etcd {
        Etcd::start_with(n, false).await
    }

    /// Starts one member that serves clients over TLS only and requires a client
    /// certificate from its CA ([`Etcd::pki`]).
    pub async fn start_tls() -> Etcd {
        Etcd::start_with(1, true).await
    }

    async fn start_with(n: usize, tls: bool) -> Etcd {
        // tmpfs when there is one: etcd fsyncs every write, and tests need no durability.
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|d| std::path::Path::new(d).is_dir())
            .unwrap_or("/tmp");
        let dir = tempfile::Builder::new()
            .prefix("bramble-etcd-")
            .tempdir_in(base)
            .expect("a temporary directory");
        let scheme = if tls { "https" } else { "http" };
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let tls = tls.then(|| pki(dir.path()));
        let mut etcd = Etcd {
            members: Vec::new(),
            dir,
            tls,
        };
        for m in &mut members {
            m.child = Some(etcd.spawn(m, &cluster));
        }
        etcd.members = members;
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(&self, m: &Member, cluster: &str) -> Child {
        let data = self.dir.path().join(&m.name);
        // Appended to, so a member started again keeps its earlier lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("an etcd log file");
        let mut cmd = Command::new(etcd_binary());
        if let Some(pki) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.client.ca)
                .arg("--client-cert-auth");
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "bramble-test"])
            // Faster elections than the defaults (100/1000 ms): tests wait less.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
    }

    /// The certificates of an etcd started with [`Etcd::start_tls`].
    pub fn pki(&self) -> &Pki {
        self.tls.as_ref().expect("started with TLS")
    }

    async fn wait_ready(&self) {
        if self.tls.is_some() {
            return self.wait_ready_tls().await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ready = 0;
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Ok(mut c) = etcd_client::Client::connect([m.client.as_str()], None).await {
                    if tokio::time::timeout(Duration::from_secs(2), c.get("/", None))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        ready += 1;
                    }
                }
            }
            if ready == self.members.iter().filter(|m| m.child.is_some()).count() {
                return;
            }
            if Instant::now() > deadline {
                panic!("etcd did not become ready in 30 s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// TLS members are ready once a store opens on them.
    async fn wait_ready_tls(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let files = &self.pki().client;
            if EtcdStore::open(&self.endpoints(), "/ready/", Some(files))
                .await
                .is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("etcd did not become ready in 30 s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A store under `prefix` on every member's endpoint.
    pub async fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::open(
            &self.endpoints(),
            prefix,
            self.tls.as_ref().map(|p| &p.client),
        )
        .await
        .unwrap_or_else(|e| panic!("opening the etcd store: {e:?}\n{}", self.logs()))
    }

    /// A raw client, for writing what Bramble never would.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), None)
            .await
            .expect("an etcd client")
    }

    /// The process ids of the members still running.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// Kills member `i` (SIGKILL: a power loss).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again after [`Etcd::kill`], on its data (power back on).
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_some() {
            return;
        }
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let child = self.spawn(&self.members[i], &cluster);
        self.members[i].child = Some(child);
    }

    /// The last lines of every member's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- etcd {}:\n", m.name));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
