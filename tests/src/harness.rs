//! Whole Bramble processes for end-to-end tests: a controller (with or without its
//! local agent), separate agents and `bramblectl`, each a real process built from this
//! workspace. Every process and container is cleaned up by Drop, also when a test fails.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Runs a command to completion and fails with its stderr when it fails; its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `sig` (`TERM`, `KILL`) to `pid`. Through the shell's builtin `kill`, so no
/// procps is needed, and without `libc` (this crate forbids unsafe code).
pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "kill", sig, &pid.to_string()])
        .output();
}

/// The processes whose command line is `exe …` (`exe` as a file name) with an
/// argument for which `pred` holds.
pub(crate) fn processes(exe: &str, pred: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_exe = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == exe));
        if is_exe && args.iter().skip(1).any(|a| pred(a)) {
            pids.push(pid);
        }
    }
    pids
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cargo profile the harness itself was built with; the binaries it runs match it,
/// so `cargo run --release -p bramble-bench` measures release binaries.
pub const PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// Path of a workspace binary, built once per test process (a no-op when cargo test
/// already built it).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "bramble-controller",
            "-p",
            "bramble-agent",
            "-p",
            "bramblectl",
            "--bins",
        ]);
        if PROFILE == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cargo build failed: {status}"))
        }
    });
    if let Err(e) = built {
        panic!("building the Bramble binaries: {e}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(PROFILE).join(name)
}

/// A free TCP port on loopback, for a server started next (released again: another
/// process may take it meanwhile, but not as an outgoing connection's port).
pub fn free_port() -> u16 {
    // 26000–31999: the etcd fixture counts in 20000–25999 (see `crate::ports`).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    crate::ports::free_port_in(&NEXT, 26_000, 6_000)
}

/// A short random suffix for names, so tests running in parallel never share a name.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{:x}{:04x}",
        std::process::id() % 0xffff,
        nanos % 0xffff
    )
}

/// Admin and join tokens of test controllers.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// See [`ADMIN_TOKEN`].
pub const JOIN_TOKEN: &str = "test-join-token-0123456789";

/// What controllers of one cluster share in their data dirs.
pub const IDENTITY_FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "secrets.key",
    "admin-token",
    "join-token",
    "viewer-token",
    // Only with a local etcd member (`--etcd-cluster`).
    "etcd-ca.crt",
    "etcd-ca.key",
];

/// How a test controller is started.
#[derive(Debug, Clone)]
pub struct ControllerOpts {
    /// Run the in-process agent under this node name; `None` for `--no-local-agent`.
    pub local_node: Option<String>,
    /// Extra flags.
    pub args: Vec<String>,
}

impl ControllerOpts {
    /// A controller without a local agent keeping its state in etcd (`endpoints`,
    /// comma-separated) under `prefix`.
    pub fn etcd(endpoints: &str, prefix: &str) -> ControllerOpts {
        ControllerOpts {
            local_node: None,
            args: vec![
                "--etcd".into(),
                endpoints.into(),
                "--etcd-prefix".into(),
                prefix.into(),
            ],
        }
    }
}

/// A running `bramble-controller` process.
pub struct Controller {
    child: Option<Child>,
    /// API port on 127.0.0.1.
    pub port: u16,
    /// Its data directory (kept across restarts).
    pub data_dir: tempfile::TempDir,
    opts: ControllerOpts,
    starts: u32,
    /// The address the API listens on (`127.0.0.1` unless started with
    /// [`Controller::start_on`]).
    host: String,
    /// The network namespace it runs in (`ip netns exec`), `None` for the host's.
    netns: Option<String>,
}

impl Controller {
    /// Starts a controller and waits until its API answers.
    pub async fn start(opts: ControllerOpts) -> Result<Controller> {
        let mut c = Controller::unstarted(opts, "127.0.0.1")?;
        c.spawn().await?;
        Ok(c)
    }

    /// Starts a controller listening on `host` (an IPv4 address of this machine, e.g. a
    /// test bridge's, so agents in other network namespaces can reach it) and waits
    /// until its API answers there.
    ///
    /// The port is still picked on loopback: it is free on every address unless
    /// something listens on the wildcard address, and then the start fails loudly.
    pub async fn start_on(opts: ControllerOpts, host: &str) -> Result<Controller> {
        let mut c = Controller::unstarted(opts, host)?;
        c.spawn().await?;
        Ok(c)
    }

    /// Starts another controller of `peer`'s cluster: its data dir gets `peer`'s CA,
    /// tokens and Secrets key first (what an operator copies to a second controller).
    pub async fn start_sharing(opts: ControllerOpts, peer: &Controller) -> Result<Controller> {
        let mut c = Controller::unstarted(opts, "127.0.0.1")?;
        c.copy_identity(peer)?;
        c.spawn().await?;
        Ok(c)
    }

    /// Starts a controller inside the network namespace `netns` (through `ip netns
    /// exec`, which execs it: [`Controller::pid`] is the controller's own), listening on
    /// `host`, an address of that namespace the test process reaches. With `peer`, it
    /// joins `peer`'s cluster as [`Controller::start_sharing`] does.
    pub async fn start_in(
        opts: ControllerOpts,
        netns: &str,
        host: &str,
        peer: Option<&Controller>,
    ) -> Result<Controller> {
        let mut c = Controller::launch_in(opts, netns, host, peer)?;
        c.wait_serving().await?;
        Ok(c)
    }

    /// Starts a controller inside `netns` as [`Controller::start_in`] does, but returns
    /// as soon as the process runs: for controllers that cannot serve until others run
    /// too (local etcd members waiting for a quorum). Then [`Controller::serving`].
    pub fn launch_in(
        opts: ControllerOpts,
        netns: &str,
        host: &str,
        peer: Option<&Controller>,
    ) -> Result<Controller> {
        let mut c = Controller::unstarted(opts, host)?;
        c.netns = Some(netns.to_string());
        if let Some(peer) = peer {
            c.copy_identity(peer)?;
        }
        c.starts += 1;
        let mut cmd = c.command()?;
        c.child = Some(cmd.spawn().context("starting bramble-controller")?);
        Ok(c)
    }

    /// Waits until a controller from [`Controller::launch_in`] answers its API.
    pub async fn serving(&mut self) -> Result<()> {
        self.wait_serving().await
    }

    fn copy_identity(&self, peer: &Controller) -> Result<()> {
        for f in IDENTITY_FILES {
            let from = peer.data_dir.path().join(f);
            if from.exists() {
                fs::copy(&from, self.data_dir.path().join(f))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
        Ok(())
    }

    /// Starts a controller and returns its exit status and what it printed if it exits
    /// within `within` (a refusal), or an error if it keeps running.
    pub async fn start_expecting_exit(
        opts: ControllerOpts,
        within: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let mut c = Controller::unstarted(opts, "127.0.0.1")?;
        c.starts = 1;
        let mut child = c
            .command()?
            .spawn()
            .context("starting bramble-controller")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, c.logs()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the controller kept running:\n{}", c.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A controller not started yet, on a free port and a new data dir.
    fn unstarted(opts: ControllerOpts, host: &str) -> Result<Controller> {
        Ok(Controller {
            child: None,
            port: free_port(),
            data_dir: tempfile::tempdir().context("temp data dir")?,
            opts,
            starts: 0,
            host: host.to_string(),
            netns: None,
        })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// The cluster CA's fingerprint (from `ca.crt` in its data dir).
    pub fn ca_fingerprint(&self) -> Result<String> {
        let path = self.data_dir.path().join("ca.crt");
        let pem = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let certs = bramble_tls::certificates(&pem).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(bramble_tls::fingerprint(&certs[0]).to_string())
    }

    /// The SHA-256 of the public key of the certificate it serves now, base64 (what
    /// Chromium's `--ignore-certificate-errors-spki-list` takes). Read from a handshake
    /// that records the chain and sends nothing.
    pub async fn spki_sha256_base64(&self) -> Result<String> {
        use base64::Engine as _;
        use sha2::Digest as _;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        let seen = bramble_tls::Seen::default();
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
        let _ = tokio_rustls::TlsConnector::from(std::sync::Arc::new(seen.client_config()))
            .connect(name, tcp)
            .await;
        let chain = seen.chain();
        let leaf = chain
            .first()
            .context("the controller sent no certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| anyhow::anyhow!("the controller's certificate does not parse: {e}"))?;
        let spki = cert.tbs_certificate.subject_pki.raw;
        Ok(base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki)))
    }

    /// The whole join token (`BRAMBLE1-<CA fingerprint>-<secret>`), from its data dir.
    pub fn join_token(&self) -> Result<String> {
        let path = self.data_dir.path().join("join-token");
        Ok(fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// The node name of its local agent.
    pub fn node(&self) -> Option<&str> {
        self.opts.local_node.as_deref()
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir
            .path()
            .join(format!("controller-{}.log", self.starts))
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = self.command()?;
        self.child = Some(cmd.spawn().context("starting bramble-controller")?);
        self.wait_serving().await
    }

    /// The command line of this controller's next run, its output going to the run's
    /// log file.
    fn command(&self) -> Result<Command> {
        let log = File::create(self.log_path()).context("controller log file")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("bramble-controller"));
                c
            }
            None => Command::new(bin("bramble-controller")),
        };
        cmd.arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--admin-token", ADMIN_TOKEN, "--join-token", JOIN_TOKEN])
            // Tests keep multicast off the machine's real interfaces; the discovery test
            // turns it on for its own bridge only.
            .args(if self.opts.args.iter().any(|a| a.starts_with("--mdns")) {
                &[][..]
            } else {
                &["--no-mdns"][..]
            })
            .args(&self.opts.args)
            .env(
                "BRAMBLE_LOG",
                "info,bramble_controller=debug,bramble_agent=debug",
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        match &self.opts.local_node {
            // The local agent uses the machine's engine: see `Agent::spawn`.
            Some(n) => cmd.args(["--node-name", n, "--no-service-proxy"]),
            None => cmd.arg("--no-local-agent"),
        };
        if self.opts.local_node.is_some() && !self.opts.args.iter().any(|a| a == "--cron-gate") {
            cmd.env("BRAMBLE_CRON_GATE", crate::cron_gate()?);
        }
        Ok(cmd)
    }

    /// Waits until the started process has made its CA and answers its API.
    async fn wait_serving(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        // Its CA is made (or read) before it listens: pin it for the tests' clients.
        loop {
            if let Ok(fp) = self.ca_fingerprint() {
                crate::pins().add(fp.parse().map_err(|e| anyhow::anyhow!("{e}"))?);
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("controller exited with {status}:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!("controller made no CA within 20s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client = crate::http();
        loop {
            let r = client
                .get(format!("{}/v1/version", self.url()))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("controller exited with {status}:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!("controller did not answer within 20s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process with SIGKILL (no clean shutdown) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Stops it as a service manager does: SIGTERM, then waits up to `grace` for it to
    /// exit (SIGKILL after that). Returns whether it exited on its own.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Starts it again after [`Controller::terminate`] or [`Controller::kill9`] and
    /// waits until its API answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }

    /// Everything the controller printed, all runs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.data_dir.path().join(format!("controller-{i}.log"));
            out.push_str(&format!("--- controller run {i} ---\n"));
            out.push_str(&fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    /// GET a JSON document with the admin token.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let r = crate::http()
            .get(format!("{}{path}", self.url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.context("JSON body")?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Runs `bramblectl` against this controller.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(
            &self.url(),
            &self.ca_fingerprint().unwrap_or_default(),
            args,
        )
    }

    /// POST with the admin token and no body; the answer as JSON (`null` when empty).
    pub async fn post(&self, path: &str) -> Result<Value> {
        let r = crate::http()
            .post(format!("{}{path}", self.url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        json_answer("POST", path, r).await
    }

    /// `POST /v1/apply` of one manifest text (one or more YAML documents), named
    /// `name` in error messages; the [`bramble_api::rest::ApplyResponse`] as JSON.
    pub async fn apply(&self, name: &str, manifest: &str) -> Result<Value> {
        let body = serde_json::json!({"sources": [{"name": name, "content": manifest}]});
        let r = crate::http()
            .post(format!("{}/v1/apply", self.url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await?;
        json_answer("POST", "/v1/apply", r).await
    }
}

/// The JSON body of an answer, or an error naming the request, the status and the body
/// (as text, since an error from a missing route need not be JSON).
async fn json_answer(method: &str, path: &str, r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let text = r.text().await.context("reading the body")?;
    if !status.is_success() {
        bail!("{method} {path}: {status}: {text}");
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", tail(&self.logs(), 120));
        }
        self.kill9();
        if let Some(n) = &self.opts.local_node {
            remove_node_containers(n);
        }
    }
}

/// Runs `bramblectl` with the admin token against `server`, whose cluster CA has the
/// fingerprint `ca`, ignoring any user config.
pub fn ctl(server: &str, ca: &str, args: &[&str]) -> Output {
    Command::new(bin("bramblectl"))
        .args(args)
        .env("BRAMBLE_SERVER", server)
        .env("BRAMBLE_TOKEN", ADMIN_TOKEN)
        .env("BRAMBLE_CA_FINGERPRINT", ca)
        .env("BRAMBLE_CONFIG", "/nonexistent/bramble-test-config.yaml")
        .current_dir(workspace_root())
        .output()
        .expect("bramblectl runs")
}

/// How an agent finds its controller.
enum Reach {
    /// `--controller URL`.
    Url(String),
    /// Over mDNS, browsing on this network interface only.
    Mdns(String),
}

/// A running `bramble-agent` process.
pub struct Agent {
    child: Option<Child>,
    /// Node name.
    pub node: String,
    reach: Reach,
    /// The whole join token of its controller.
    token: String,
    data_dir: tempfile::TempDir,
    starts: u32,
    /// The network namespace it runs in (`ip netns exec`), `None` for the host's.
    netns: Option<String>,
    /// The Docker Engine it runs containers on (`DOCKER_HOST`), `None` for the
    /// machine's.
    docker_host: Option<String>,
    /// Its cron gate, if not the harness's static one.
    cron_gate: Option<PathBuf>,
}

impl Agent {
    /// Starts an agent for `node` against `controller`, with its join token.
    pub fn start(controller: &Controller, node: &str) -> Result<Agent> {
        Agent::spawned(
            node,
            None,
            Reach::Url(controller.url()),
            controller.join_token()?,
        )
    }

    /// Starts an agent for `node` that dials `url` (a relay, an impostor) with the join
    /// token `token`.
    pub fn start_with(url: &str, token: &str, node: &str) -> Result<Agent> {
        Agent::spawned(node, None, Reach::Url(url.to_string()), token.to_string())
    }

    /// Starts an agent for `node` inside the network namespace `netns`, through
    /// `ip netns exec` (which execs the agent, so [`Agent::pid`] is the agent's own
    /// pid). It still reaches Docker through `/var/run/docker.sock`, a file.
    pub fn start_in(netns: &str, controller: &Controller, node: &str) -> Result<Agent> {
        Agent::spawned(
            node,
            Some(netns),
            Reach::Url(controller.url()),
            controller.join_token()?,
        )
    }

    /// Starts an agent for `node` inside the network namespace `netns` that knows every
    /// controller in `urls` (comma-separated), with the join token `token`.
    pub fn start_with_in(netns: &str, urls: &str, token: &str, node: &str) -> Result<Agent> {
        Agent::spawned(
            node,
            Some(netns),
            Reach::Url(urls.to_string()),
            token.to_string(),
        )
    }

    /// Starts an agent for `node` inside `netns` against `controller` that runs its
    /// containers on the engine at `docker_host` (a node engine of
    /// [`crate::engines`]).
    pub fn start_on_engine_in(
        netns: &str,
        controller: &Controller,
        node: &str,
        docker_host: &str,
    ) -> Result<Agent> {
        let mut a = Agent::unspawned(
            node,
            Some(netns),
            Reach::Url(controller.url()),
            controller.join_token()?,
        )?;
        a.docker_host = Some(docker_host.to_string());
        a.spawn()?;
        Ok(a)
    }

    /// Starts an agent for `node` inside `netns` with no `--controller`: it must find
    /// the controller over mDNS, browsing on `interface` only.
    pub fn start_discovering_in(
        netns: &str,
        interface: &str,
        controller: &Controller,
        node: &str,
    ) -> Result<Agent> {
        Agent::spawned(
            node,
            Some(netns),
            Reach::Mdns(interface.to_string()),
            controller.join_token()?,
        )
    }

    fn spawned(node: &str, netns: Option<&str>, reach: Reach, token: String) -> Result<Agent> {
        let mut a = Agent::unspawned(node, netns, reach, token)?;
        a.spawn()?;
        Ok(a)
    }

    fn unspawned(node: &str, netns: Option<&str>, reach: Reach, token: String) -> Result<Agent> {
        Ok(Agent {
            child: None,
            node: node.to_string(),
            reach,
            token,
            data_dir: tempfile::tempdir()?,
            starts: 0,
            netns: netns.map(str::to_string),
            docker_host: None,
            cron_gate: None,
        })
    }

    /// Runs this agent with `gate` as its cron gate from its next start on (by
    /// default it has the harness's static one, [`crate::cron_gate`]).
    pub fn set_cron_gate(&mut self, gate: PathBuf) {
        self.cron_gate = Some(gate);
    }

    /// Whether the process is still alive (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = File::create(
            self.data_dir
                .path()
                .join(format!("agent-{}.log", self.starts)),
        )?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("bramble-agent"));
                c
            }
            None => Command::new(bin("bramble-agent")),
        };
        match &self.reach {
            Reach::Url(url) => cmd.args(["--controller", url]),
            Reach::Mdns(interface) => cmd.args(["--mdns-interface", interface]),
        };
        match &self.docker_host {
            Some(host) => {
                cmd.env("DOCKER_HOST", host);
            }
            // Workload addresses are served only by agents with an engine of their own
            // (in their own namespace): on the machine's engine, every cluster of every
            // test would share the machine's resolver address and ports.
            None => {
                cmd.arg("--no-service-proxy");
            }
        }
        let gate = match &self.cron_gate {
            Some(gate) => gate.clone(),
            None => crate::cron_gate()?,
        };
        let child = cmd
            .env("BRAMBLE_CRON_GATE", gate)
            .args(["--node-name", &self.node])
            // In the environment, not in argv (which anyone on the machine can read).
            .env("BRAMBLE_JOIN_TOKEN", &self.token)
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .env("BRAMBLE_LOG", "info,bramble_agent=debug")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting bramble-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Its data directory (its "SD card": managed volumes, copies, set-aside data).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, leaving its containers as they are.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same name and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Everything it printed.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                fs::read_to_string(self.data_dir.path().join(format!("agent-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent {} ---\n{}", self.node, tail(&self.logs(), 80));
        }
        let was_running = self.child.is_some();
        self.kill9();
        remove_node_containers(&self.node);
        if was_running && self.docker_host.is_none() {
            // A create the agent sent just before it died may still complete in
            // Docker after the sweep above: sweep once more when it has.
            std::thread::sleep(Duration::from_millis(500));
            remove_node_containers(&self.node);
        }
    }
}

pub(crate) fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Force-removes every container of a node (by its `bramble.node` label).
pub fn remove_node_containers(node: &str) {
    let ids = node_containers(node, true).unwrap_or_default();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// Container ids of a node (`all` includes stopped ones).
pub fn node_containers(node: &str, all: bool) -> Result<Vec<String>> {
    let mut cmd = Command::new("docker");
    cmd.args([
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=bramble.node={node}"),
    ]);
    if all {
        cmd.arg("-a");
    }
    let out = cmd.output().context("docker ps")?;
    if !out.status.success() {
        bail!("docker ps failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// `docker inspect` of containers, as JSON.
pub fn inspect(ids: &[String]) -> Result<Vec<Value>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let out = Command::new("docker")
        .arg("inspect")
        .args(ids)
        .output()
        .context("docker inspect")?;
    if !out.status.success() {
        bail!(
            "docker inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Resident memory of a process in bytes (VmRSS), if it is running.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Checks that every slot of the CronJob `name` that `c` lists fired exactly once and
/// ran exactly one task, with no slot missing between the first and the last listed
/// (`period_secs` apart); returns how many slots are listed.
pub async fn every_slot_once(c: &Controller, name: &str, period_secs: i64) -> Result<usize> {
    use std::collections::BTreeMap;
    let view = c.get(&format!("/v1/cronjobs/{name}")).await?;
    let mut slots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in view["firings"].as_array().cloned().unwrap_or_default() {
        slots
            .entry(f["slot"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(f["outcome"].as_str().unwrap_or_default().to_string());
    }
    for (slot, outcomes) in &slots {
        if outcomes != &["Fired"] {
            bail!("slot {slot}: {outcomes:?}");
        }
    }
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        slots.keys().filter_map(|s| s.parse().ok()).collect();
    for w in times.windows(2) {
        if (w[1] - w[0]).num_seconds() != period_secs {
            bail!("a slot is missing between {} and {}", w[0], w[1]);
        }
    }
    let tasks = c.get(&format!("/v1/tasks?workload={name}")).await?;
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks.as_array().cloned().unwrap_or_default() {
        *runs
            .entry(t["slot"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for slot in slots.keys() {
        if runs.get(slot) != Some(&1) {
            bail!("slot {slot} ran {:?} times", runs.get(slot));
        }
    }
    Ok(slots.len())
}

/// A CronJob of the test image firing every 5 s (a short job), keeping every firing in
/// its history, for [`every_slot_once`].
pub fn ticking_cronjob(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: CronJob
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"exit\", \"0\", \"1\"]
  schedule: \"*/5 * * * * *\"
  startingDeadline: 30s
  history: {{successful: 100, failed: 100}}
"
    )
}

/// A Wallet of the test image serving on 8080.
pub fn wallet(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Wallet
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  resources: {{cpu: 100m, memory: 16Mi}}
"
    )
}

/// A one-replica Service of the test image serving on 8080, small enough for many.
pub fn web_service(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata:
  name: {name}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  resources: {{cpu: 100m, memory: 16Mi}}
  replicas: 1
"
    )
}
