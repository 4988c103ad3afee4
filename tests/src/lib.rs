//! Helpers for Bramble's tests against real components: the test image, a bounded
//! `eventually` poll instead of bare sleeps, unique names, and a Drop guard that removes
//! a test's containers even when the test panics.
//!
//! # Layout
//! - [`ensure_test_image`]: builds `testimg` (musl, static) and imports it into Docker as
//!   [`TEST_IMAGE`], only when missing or changed; safe to call from many tests at once.
//! - [`eventually`]: poll an async check every 100 ms until it holds or a timeout passes.
//! - [`ContainerGuard`], [`remove_containers`]: force-remove containers by label.
//! - [`unique_name`]: a fresh name per test (`rt-1a2b3c`), so parallel tests never share
//!   a node name, a task id or a container.
//! - [`docker_inspect`]: `docker inspect` of one container as JSON, for assertions.
//! - [`browser`]: headless Chromium over WebDriver, for the dashboard test.
//! - [`harness`]: whole Bramble processes (controller, agents, `bramblectl`) for
//!   cluster tests.
//! - [`ports`]: free loopback ports for the servers tests start.
//! - [`netns`]: multi-node clusters with real networking: each agent in its own network
//!   namespace on a test bridge, with power loss, partitions and controller crashes.
//! - [`engines`]: a Docker Engine of its own for every node of a [`netns`] cluster.
//! - [`swarm`]: Docker Swarm on the same namespaces and engines, with the same faults,
//!   to measure Bramble against.
//! - [`hanet`]: the same with three etcd members and three controllers, each in a
//!   namespace of its own too, for controller failover, partitions and rolling restarts.

pub mod browser;
pub mod engines;
pub mod hanet;
pub mod harness;
pub mod netns;
pub mod ports;
pub mod swarm;
pub mod volumes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

/// The test image's reference: `FROM scratch`, `/testimg` as its ENTRYPOINT.
pub const TEST_IMAGE: &str = "bramble-testimg:latest";

/// The image label holding the hash of the `testimg` binary it contains.
const HASH_LABEL: &str = "bramble.testimg.hash";

/// The musl target the test image is built for, so the binary is fully static.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Serializes image builds within one test process; other processes are handled by
/// building under a unique tag and retagging (see [`ensure_test_image`]).
static BUILD: Mutex<Option<String>> = Mutex::new(None);

/// Makes sure Docker has [`TEST_IMAGE`] with the current `testimg` and returns its
/// reference.
///
/// Runs `cargo build --release -p bramble-testimg --target x86_64-unknown-linux-musl` in
/// the workspace (cargo does nothing when it is up to date), hashes the binary, and only
/// when the image is missing or labelled with another hash runs `docker build` of a
/// `FROM scratch` context. Nothing is ever pulled. Concurrent callers are safe: within a
/// process they wait for one build; across processes each builds under its own tag
/// (`bramble-testimg:<hash>`) and then `docker tag`s it, which is atomic, so a reader
/// never sees a half-built image.
pub async fn ensure_test_image() -> anyhow::Result<String> {
    tokio::task::spawn_blocking(ensure_test_image_blocking)
        .await
        .context("test image build task panicked")?
}

fn ensure_test_image_blocking() -> anyhow::Result<String> {
    // A poisoned lock only means another test panicked while building; the cached value
    // is still either None or a good answer.
    let mut done = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(image) = done.as_ref() {
        return Ok(image.clone());
    }
    let binary = build_testimg()?;
    let bytes = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    let hash = format!("{:016x}", bramble_api::task::fnv1a64(&bytes));
    if image_hash(TEST_IMAGE).as_deref() != Some(hash.as_str()) {
        build_image(&binary, &hash)?;
    }
    *done = Some(TEST_IMAGE.to_string());
    Ok(TEST_IMAGE.to_string())
}

/// The workspace root: this crate lives in `<root>/tests`.
fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Builds testimg and returns the path of the binary.
fn build_testimg() -> anyhow::Result<PathBuf> {
    build_static("bramble-testimg", "testimg")
}

/// The static `bramble-gate` every agent the harness starts uses (`BRAMBLE_CRON_GATE`),
/// as a node with the gate installed does: built once per test process for the musl
/// target (the gate runs inside `FROM scratch` containers).
pub fn cron_gate() -> anyhow::Result<PathBuf> {
    static GATE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = GATE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = done.as_ref() {
        return Ok(path.clone());
    }
    let path = build_static("bramble-gate", "bramble-gate")?;
    *done = Some(path.clone());
    Ok(path)
}

/// Builds binary `bin` of `package` static (release, musl target) and returns its path,
/// as cargo reports it (so a custom `CARGO_TARGET_DIR` is honoured).
fn build_static(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--target",
            MUSL_TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .with_context(|| format!("running {cargo} build for {package}"))?;
    if !out.status.success() {
        bail!(
            "building {package} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo built {package} but reported no executable {bin}")
}

/// The binary hash label of `image`, or None when the image is absent.
fn image_hash(image: &str) -> Option<String> {
    let template = format!("{{{{ index .Config.Labels \"{HASH_LABEL}\" }}}}");
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", &template, image])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn build_image(binary: &Path, hash: &str) -> anyhow::Result<()> {
    let ctx = tempfile::tempdir().context("creating a docker build context")?;
    std::fs::copy(binary, ctx.path().join("testimg")).context("copying testimg")?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY testimg /testimg\nENTRYPOINT [\"/testimg\"]\n",
    )
    .context("writing the Dockerfile")?;
    let unique = format!("bramble-testimg:{hash}");
    // The classic builder: FROM scratch needs nothing from a registry, and it works
    // without the buildx plugin.
    let out = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "--label"])
        .arg(format!("{HASH_LABEL}={hash}"))
        .args(["-t", &unique])
        .arg(ctx.path())
        .output()
        .context("running docker build")?;
    check(&out, "docker build of the test image")?;
    let out = Command::new("docker")
        .args(["tag", &unique, TEST_IMAGE])
        .output()
        .context("running docker tag")?;
    check(&out, "docker tag of the test image")
}

fn check(out: &Output, what: &str) -> anyhow::Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `f` every 100 ms until it returns `Ok(Some(value))`, and returns that value.
///
/// `Ok(None)` means "not yet"; `Err(e)` also means "not yet" but records `e` as the last
/// state, so a check can say what it saw (`bail!("container is {state:?}")`). After
/// `timeout` it fails with `timed out after …s waiting for {what}; last state: …`.
pub async fn eventually<F, Fut, T>(timeout: Duration, what: &str, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_every(timeout, Duration::from_millis(100), what, f).await
}

/// [`eventually`], looking every `every`.
pub async fn eventually_every<F, Fut, T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = "the condition was never met".to_string();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {:.1}s waiting for {what}; last state: {last}",
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// A name no other test (in this or another process) uses: `{prefix}-{12 hex digits}`.
/// Lowercase, so it is valid as a node name, a workload name and in container names.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let h = bramble_api::task::fnv1a64(seed.as_bytes());
    format!("{prefix}-{:012x}", h & 0xffff_ffff_ffff)
}

/// Force-removes every container (running or not) carrying `label`, e.g.
/// `bramble.node=rt-1a2b3c`. Uses the `docker` CLI synchronously so it also works from
/// `Drop` and outside any async runtime. Failures are printed, not raised: cleanup must
/// never hide a test's own failure.
pub fn remove_containers(label: &str) {
    let ids = match Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label={label}"))
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        Ok(out) => {
            eprintln!(
                "cleanup: docker ps failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("cleanup: cannot run docker: {e}");
            return;
        }
    };
    if ids.is_empty() {
        return;
    }
    match Command::new("docker")
        .args(["rm", "-f"])
        .args(&ids)
        .output()
    {
        Ok(out) if !out.status.success() => eprintln!(
            "cleanup: docker rm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("cleanup: cannot run docker: {e}"),
    }
}

/// Removes the containers carrying a label when dropped, also when the test panics.
/// Create it before the first container:
/// `let _guard = ContainerGuard::node(&node);`.
#[derive(Debug)]
pub struct ContainerGuard {
    label: String,
}

impl ContainerGuard {
    /// Guards containers with the label `key=value`.
    pub fn new(key: &str, value: &str) -> Self {
        ContainerGuard {
            label: format!("{key}={value}"),
        }
    }

    /// Guards the containers of node `node` (label `bramble.node=<node>`).
    pub fn node(node: &str) -> Self {
        Self::new(bramble_api::task::labels::NODE, node)
    }

    /// Removes the containers now (the guard still removes any created later on drop).
    pub fn cleanup(&self) {
        remove_containers(&self.label);
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        remove_containers(&self.label);
    }
}

/// `docker inspect` of one container (or image) as JSON, for assertions on what Docker
/// really holds.
pub fn docker_inspect(id: &str) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("docker")
        .args(["inspect", id])
        .output()
        .context("running docker inspect")?;
    check(&out, "docker inspect")?;
    let mut all: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing docker inspect output")?;
    if all.is_empty() {
        bail!("docker inspect {id} returned nothing");
    }
    Ok(all.swap_remove(0))
}

/// The cluster CAs the tests' clients trust: every test controller's, pinned as it
/// starts (see [`harness::Controller`]). Real TLS verification, against the tests' own
/// clusters only.
pub fn pins() -> &'static bramble_tls::Pins {
    static PINS: std::sync::OnceLock<bramble_tls::Pins> = std::sync::OnceLock::new();
    PINS.get_or_init(bramble_tls::Pins::default)
}

/// An HTTPS client for the tests that trusts the tests' controllers (by their pinned
/// CAs) and nothing else. Installs rustls's ring provider first: reqwest panics
/// without one.
pub fn http() -> reqwest::Client {
    bramble_tls::install_provider();
    reqwest::Client::builder()
        .tls_backend_preconfigured(bramble_tls::client_config(pins().clone()))
        .build()
        .expect("a TLS client builds")
}

/// A TLS server identity of a CA of its own, as a controller (or an impostor) has: the
/// CA's fingerprint, for join tokens, and an acceptor serving a certificate for
/// `127.0.0.1` and `localhost` signed by that CA.
pub fn tls_identity() -> anyhow::Result<(bramble_api::token::Fingerprint, tokio_rustls::TlsAcceptor)>
{
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    bramble_tls::install_provider();
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
        .signed_by(&leaf_key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)?;
    Ok((
        bramble_tls::fingerprint(ca.der()),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            let n = n;
            async move { Ok((n >= 3).then_some(n)) }
        })
        .await
        .expect("reaches 3");
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn eventually_names_what_and_the_last_state_on_timeout() {
        let err = eventually::<_, _, ()>(Duration::from_millis(250), "the moon", || async {
            Err(anyhow!("still cheese"))
        })
        .await
        .expect_err("times out");
        let msg = format!("{err:#}");
        assert!(msg.contains("waiting for the moon"), "{msg}");
        assert!(msg.contains("last state: still cheese"), "{msg}");
    }

    #[test]
    fn unique_names_differ_and_are_dns_labels() {
        let a = unique_name("rt");
        let b = unique_name("rt");
        assert_ne!(a, b);
        assert!(a.starts_with("rt-") && a.len() == 15, "{a}");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[tokio::test]
    async fn builds_the_test_image_once_and_it_runs() {
        let image = ensure_test_image().await.expect("test image");
        assert_eq!(image, TEST_IMAGE);
        // A second call is served from the cache and yields the same image.
        assert_eq!(ensure_test_image().await.expect("again"), image);
        let out = Command::new("docker")
            .args(["run", "--rm", &image, "exit", "7"])
            .output()
            .expect("docker run");
        assert_eq!(out.status.code(), Some(7), "{out:?}");
    }
}
