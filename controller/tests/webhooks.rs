//! Webhooks end to end, with the controller in-process on port 0 and a tiny HTTP
//! receiver on 127.0.0.1: a Warning event is delivered signed, retried after a 500,
//! counted; a 404 is a permanent failure; the test endpoint answers synchronously;
//! viewers cannot trigger it. Also: shutdown is not held up by an open dashboard stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bramble_controller::config::HealthConfig;
use bramble_controller::{Config, Controller};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ADMIN: &str = "webhook-admin-token-0123456789";
const VIEWER: &str = "webhook-viewer-token-0123456789";
const SECRET: &str = "correct horse battery staple";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    answered: u16,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A receiver: `/gone` answers 404; `/hook` answers 500 to its first request and 200
/// after. One request per connection.
async fn receiver() -> Result<(u16, Arc<Mutex<Vec<Seen>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.lines();
                let path = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .unwrap_or("")
                    .to_string();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = buf[head_end + 4..].to_vec();
                while body.len() < len {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                let answered = {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    let hooks = log.iter().filter(|s| s.path == "/hook").count();
                    let answered = match path.as_str() {
                        "/gone" => 404,
                        _ if hooks == 0 => 500,
                        _ => 200,
                    };
                    log.push(Seen {
                        path,
                        headers,
                        body,
                        answered,
                    });
                    answered
                };
                let _ = sock
                    .write_all(
                        format!("HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((port, seen))
}

fn expected_signature(body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).expect("any key");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warning_events_reach_webhooks_signed_and_retried() -> Result<()> {
    let (port, seen) = receiver().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("ops.secret"), format!("{SECRET}\n"))?;
    std::fs::write(
        dir.path().join("webhooks.yaml"),
        format!(
            "- name: ops\n  url: http://127.0.0.1:{port}/hook\n  secretFile: ops.secret\n- name: gone\n  url: http://127.0.0.1:{port}/gone\n  events: [Applied]\n"
        ),
    )?;
    let ctl = Controller::open(Config {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(ADMIN.into()),
        join_token: None,
        viewer_token: Some(VIEWER.into()),
        local_agent: None,
        health: HealthConfig::default(),
        resync: Duration::from_millis(500),
        mdns: None,
        tls: Default::default(),
        viewer_logs: false,
        cluster: Default::default(),
    })
    .await?;
    let pins = bramble_tls::Pins::one(ctl.ca_fingerprint().clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("https://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ctl.run(listener, async move {
        let _ = stop_rx.await;
    }));
    bramble_controller::install_tls_provider();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(bramble_tls::client_config(pins))
        .build()?;

    // No node can take it: a FailedScheduling Warning (and a Normal "Applied").
    let manifest = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec: {image: x, replicas: 1}\n";
    let r = http
        .post(format!("{base}/v1/apply"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"sources": [{"name": "web.yaml", "content": manifest}]}))
        .send()
        .await?;
    assert!(r.status().is_success(), "{}", r.text().await?);

    // The first try gets a 500, the retry a 200: the same delivery, signed both times.
    let tries = wait_for("a delivery retried after a 500", || {
        let log = seen.lock().unwrap_or_else(|e| e.into_inner());
        let hook: Vec<Seen> = log.iter().filter(|s| s.path == "/hook").cloned().collect();
        (hook.len() >= 2).then_some(hook)
    })
    .await?;
    assert_eq!((tries[0].answered, tries[1].answered), (500, 200));
    assert_eq!(
        tries[0].body, tries[1].body,
        "a retry resends the same body"
    );
    assert_eq!(
        tries[0].header("x-bramble-delivery"),
        tries[1].header("x-bramble-delivery")
    );
    for t in &tries[..2] {
        assert_eq!(
            t.header("x-bramble-signature"),
            Some(expected_signature(&t.body).as_str()),
            "signature over the raw body"
        );
        assert_eq!(t.header("content-type"), Some("application/json"));
    }
    let payload: Value = serde_json::from_slice(&tries[0].body)?;
    assert_eq!(payload["webhook"], "ops");
    assert_eq!(payload["test"], false);
    assert_eq!(
        payload["event"]["severity"], "Warning",
        "an empty filter means Warning events only: {payload}"
    );
    assert_eq!(
        tries[0].header("x-bramble-event"),
        payload["event"]["reason"].as_str()
    );

    // The "Applied" event went to /gone, which answered 404: failed at once, no retry.
    wait_for("the 404 recorded", || {
        let log = seen.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().any(|s| s.path == "/gone").then_some(())
    })
    .await?;
    let views: Value = wait_for_json(&http, &base, ADMIN, |v| {
        v[1]["failed"] == 1 && v[0]["sent"].as_u64() >= Some(1)
    })
    .await?;
    assert_eq!(views[0]["name"], "ops");
    assert_eq!(views[0]["signed"], true);
    assert_eq!(views[0]["failed"], 0);
    assert_eq!(views[0]["url"], format!("http://127.0.0.1:{port}/hook"));
    assert!(
        views[1]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("404")),
        "{views}"
    );
    assert_eq!(views[1]["signed"], false);
    let gone = {
        let log = seen.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().filter(|s| s.path == "/gone").count()
    };
    assert_eq!(gone, 1, "a 404 is not retried");

    // A viewer sees redacted URLs and may not send a test.
    let as_viewer: Value = http
        .get(format!("{base}/v1/webhooks"))
        .bearer_auth(VIEWER)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(as_viewer[0]["url"], format!("http://127.0.0.1:{port}/…"));
    let r = http
        .post(format!("{base}/v1/webhooks/ops/test"))
        .bearer_auth(VIEWER)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await?;
    assert_eq!(body["code"], "forbidden");

    // The test endpoint: one synchronous try, answered with the receiver's status.
    let r: Value = http
        .post(format!("{base}/v1/webhooks/ops/test"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"], 200);
    let last = {
        let log = seen.lock().unwrap_or_else(|e| e.into_inner());
        log.last().cloned().context("the test delivery")?
    };
    let payload: Value = serde_json::from_slice(&last.body)?;
    assert_eq!(payload["test"], true);
    assert_eq!(
        last.header("x-bramble-signature"),
        Some(expected_signature(&last.body).as_str())
    );
    let r = http
        .post(format!("{base}/v1/webhooks/nope/test"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(r.status(), 404);

    // An open dashboard stream does not hold up shutdown.
    let mut stream = http
        .get(format!("{base}/v1/stream"))
        .bearer_auth(VIEWER)
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await?.context("a snapshot")?;
    assert!(first.starts_with(b"event: snapshot\n"));
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .context("the controller must stop with a dashboard stream open")??
        .context("controller run")?;
    Ok(())
}

async fn wait_for_json(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    ok: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = http
            .get(format!("{base}/v1/webhooks"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if ok(&v) {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("webhook counters never became as expected: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
