//! Attacks from the pool's Wi-Fi, each done for real against a running controller and
//! agent, each refused with nothing changed: a relay on the wire reads no token and no
//! wallet password (which still reaches the container, from a Secret); an impostor
//! controller gets no credential; a viewer reads no env value, no Secret and no logs; `hostPath: /` is refused at apply; plain HTTP is not served; the
//! controller's files are its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "rpc-password-hunter2-4f9a1c";
const VIEWER: &str = "viewer-token-for-security-tests";

/// A TCP relay that forwards both ways and keeps every byte it saw.
async fn relay(to: String) -> Result<(String, Arc<Mutex<Vec<u8>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&to).await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (l1, l2) = (log.clone(), log);
                let up = tokio::spawn(async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        l1.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                });
                let down = tokio::spawn(async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        l2.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                });
                let _ = tokio::join!(up, down);
            });
        }
    });
    Ok((addr, seen))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A Wallet whose RPC password comes from a Secret, and the Secret.
fn wallet(name: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Secret
metadata: {{name: {name}-rpc}}
data: {{password: {PASSWORD}}}
---
apiVersion: bramble/v1
kind: Wallet
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8332\"]
  env:
    RPC_USER: pool
    RPC_PASSWORD: {{secret: {name}-rpc, key: password}}
  resources: {{cpu: 100m, memory: 32Mi}}
"
    )
}

/// The environment of a task's container, as its node's Docker engine has it.
async fn container_env(node: &str, task: &str) -> Result<Vec<String>> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let name = bramble_api::task::container_name(node, task);
    let c = docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .with_context(|| format!("inspect {name}"))?;
    Ok(c.config.and_then(|c| c.env).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_the_wire_reads_no_token_and_no_wallet_password() -> Result<()> {
    ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let (addr, seen) = relay(format!("127.0.0.1:{}", c.port)).await?;
    let through = format!("https://{addr}");
    let node = harness::unique("relay");
    let token = c.join_token()?;
    let _agent = Agent::start_with(&through, &token, &node)?;
    c.apply("w.yaml", &wallet("ltc")).await?;
    let task = eventually(
        WAIT,
        "the wallet running on the node behind the relay",
        || async {
            let ts = c.get("/v1/tasks?workload=ltc").await?;
            Ok(ts
                .as_array()
                .and_then(|a| a.first().cloned())
                .filter(|t| t["phase"] == "Running"))
        },
    )
    .await?;
    // The password reached the container, through the relay.
    let id = task["id"].as_str().context("task id")?;
    let env = container_env(&node, id).await?;
    assert!(env.contains(&format!("RPC_PASSWORD={PASSWORD}")), "{env:?}");
    // The admin's bramblectl reads the wallet and its Secret through the relay: the
    // reference and the keys, never the value.
    let (get, describe) = tokio::task::spawn_blocking({
        let (through, ca) = (through.clone(), c.ca_fingerprint()?);
        move || {
            (
                harness::ctl(&through, &ca, &["get", "wallets", "-o", "yaml"]),
                harness::ctl(&through, &ca, &["describe", "secret", "ltc-rpc"]),
            )
        }
    })
    .await?;
    for out in [&get, &describe] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(PASSWORD), "{text}");
    }
    let yaml = String::from_utf8_lossy(&get.stdout);
    assert!(yaml.contains("secret: ltc-rpc"), "{yaml}");
    let page = String::from_utf8_lossy(&describe.stdout);
    assert!(
        page.contains("password") && page.contains("wallet/ltc"),
        "{page}"
    );
    let bytes = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        bytes.len() > 10_000,
        "the relay carried the traffic: {} bytes",
        bytes.len()
    );
    let secret = token.rsplit('-').next().unwrap_or_default().to_string();
    for needle in [
        PASSWORD,
        ADMIN_TOKEN,
        secret.as_str(),
        "RPC_PASSWORD",
        "Bearer",
        "hello",
    ] {
        assert!(
            !contains(&bytes, needle),
            "{needle:?} crossed the wire in clear"
        );
    }
    Ok(())
}

/// A TLS server with a certificate of its own CA, recording what reaches its HTTP layer.
async fn impostor() -> Result<(String, Arc<Mutex<Vec<u8>>>)> {
    bramble_tls::install_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let log = got.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        log.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
    });
    Ok((url, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_controller_gets_no_credential_and_the_agent_says_why() -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let (url, got) = impostor().await?;
    let node = harness::unique("fooled");
    let agent = Agent::start_with(&url, &c.join_token()?, &node)?;
    let logs = eventually(
        Duration::from_secs(30),
        "the agent refusing the impostor",
        || async {
            let l = agent.logs();
            Ok(l.contains("not a controller of this cluster, nothing sent")
                .then_some(l))
        },
    )
    .await?;
    assert!(logs.contains("not from the pinned cluster CA"), "{logs}");
    assert!(
        got.lock().unwrap_or_else(|e| e.into_inner()).is_empty(),
        "not a byte of HTTP (so no token) reached the impostor"
    );
    // bramblectl refuses it too, before sending its token.
    let out = harness::ctl(&url, &c.ca_fingerprint()?, &["get", "nodes"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the one pinned (nothing was sent)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(got.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_no_env_value_and_no_logs() -> Result<()> {
    ensure_test_image().await?;
    let node = harness::unique("viewer");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec!["--viewer-token".into(), VIEWER.into()],
    })
    .await?;
    c.apply("w.yaml", &wallet("btc")).await?;
    let task = eventually(WAIT, "the wallet running", || async {
        let ts = c.get("/v1/tasks?workload=btc").await?;
        Ok(ts
            .as_array()
            .and_then(|a| a.first().cloned())
            .filter(|t| t["phase"] == "Running"))
    })
    .await?;
    let id = task["id"].as_str().context("task id")?.to_string();
    let http = bramble_tests::http();
    for path in [
        "/v1/workloads",
        "/v1/workloads/wallet/btc",
        "/v1/tasks",
        &format!("/v1/tasks/{id}"),
    ] {
        let r = http
            .get(format!("{}{path}", c.url()))
            .bearer_auth(VIEWER)
            .send()
            .await?;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        let text = r.text().await?;
        assert!(
            !text.contains(PASSWORD),
            "{path} shows the password to a viewer: {text}"
        );
        // Plain values are redacted; the reference names where the value comes from.
        assert!(
            text.contains("RPC_USER") && text.contains("<redacted>"),
            "{path}: {text}"
        );
        assert!(!text.contains("\"pool\""), "{path}: {text}");
        assert!(text.contains("btc-rpc"), "{path}: {text}");
    }
    for path in ["/v1/secrets", "/v1/secrets/btc-rpc"] {
        let text = http
            .get(format!("{}{path}", c.url()))
            .bearer_auth(VIEWER)
            .send()
            .await?
            .text()
            .await?;
        assert!(
            text.contains("password") && !text.contains(PASSWORD),
            "{path}: {text}"
        );
    }
    let logs = http
        .get(format!("{}/v1/tasks/{id}/logs", c.url()))
        .bearer_auth(VIEWER)
        .send()
        .await?;
    assert_eq!(logs.status(), 403);
    // The admin reads the plain values, and no Secret value either.
    let admin = c.get("/v1/workloads/wallet/btc").await?.to_string();
    assert!(
        admin.contains("pool") && !admin.contains(PASSWORD),
        "{admin}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_host_paths_are_refused_at_apply_and_nothing_is_stored() -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    for path in ["/", "/etc", "/var/run", "/var/lib/x:/etc:rw"] {
        let manifest = format!(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: evil}}\nspec:\n  image: a\n  volumes: [{{hostPath: \"{path}\", path: /host}}]\n"
        );
        let body = serde_json::json!({"sources": [{"name": "evil.yaml", "content": manifest}]});
        let r = bramble_tests::http()
            .post(format!("{}/v1/apply", c.url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status(), 422, "{path}");
        let err: serde_json::Value = r.json().await?;
        assert_eq!(
            err["details"][0]["field"], "spec.volumes[0].hostPath",
            "{err}"
        );
        assert_eq!(err["details"][0]["line"], 6, "{err}");
    }
    assert_eq!(c.get("/v1/workloads").await?, serde_json::json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_not_served_and_the_controllers_files_are_its_own() -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    // Plain HTTP: no answer but a failed handshake, and the server carries on.
    let mut tcp = TcpStream::connect(("127.0.0.1", c.port)).await?;
    tcp.write_all(b"GET /v1/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !contains(&buf, "HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert!(c.get("/v1/version").await.is_ok());
    // Something is written, so the store's WAL exists too.
    c.apply(
        "x.yaml",
        "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: x}\nspec: {image: a}\n",
    )
    .await?;
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::metadata(p)
            .with_context(|| p.display().to_string())?
            .permissions()
            .mode()
            & 0o777)
    };
    let dir = c.data_dir.path();
    assert_eq!(mode(dir)?, 0o700, "the data dir");
    for f in [
        "bramble.db",
        "bramble.db-wal",
        "admin-token",
        "join-token",
        "viewer-token",
        "ca.key",
    ] {
        assert_eq!(mode(&dir.join(f))?, 0o600, "{f}");
    }
    Ok(())
}
