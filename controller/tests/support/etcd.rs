//! A real etcd cluster on loopback for tests: Debian's `etcd-server` (3.4), one process
//! per member, each with its own data directory, stopped and removed on drop.
//!
//! Fails loudly when `etcd` is not installed: `.ci/run` installs it.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bramble_controller::store::EtcdStore;

/// A running etcd cluster.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

struct Member {
    name: String,
    client: String,
    peer: String,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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
        // tmpfs when there is one: etcd fsyncs every write, and tests need no durability.
        let base = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|d| std::path::Path::new(d).is_dir())
            .unwrap_or("/tmp");
        let dir = tempfile::Builder::new()
            .prefix("bramble-etcd-")
            .tempdir_in(base)
            .expect("a temporary directory");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("http://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members: Vec::new(),
            dir,
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
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("an etcd log file");
        Command::new(etcd_binary())
            .args(["--name", &m.name])
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

    async fn wait_ready(&self) {
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

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A store under `prefix` on every member's endpoint.
    pub async fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::open(&self.endpoints(), prefix)
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
