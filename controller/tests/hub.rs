//! The `/v1/agent` WebSocket of an in-process controller, over TLS pinned to its CA,
//! with raw WebSocket clients playing agents: a join token joins a new name once, a
//! joined name is admitted only with its own credential (connected or not, whatever
//! machine id is claimed), and no refusal names another node's identity.

use std::sync::Arc;
use std::time::Duration;

use bramble_api::token::Secret;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo};
use bramble_controller::{Config, Controller};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[path = "support/nodes.rs"]
mod nodes;

const WAIT: Duration = Duration::from_secs(10);
const JOIN: &str = "join-token-for-tests";
const ADMIN: &str = "admin-token-for-tests";

type Ws = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A controller on a free port, until the returned sender is dropped.
struct Running {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn controller(data: &std::path::Path) -> Running {
    let cfg = Config {
        data_dir: data.to_path_buf(),
        admin_token: Some(ADMIN.into()),
        join_token: Some(JOIN.into()),
        viewer_token: None,
        local_agent: None,
        // Fast fencing, so a disconnected node may be deleted soon.
        health: bramble_controller::config::HealthConfig {
            startup_grace: Duration::ZERO,
            ..Default::default()
        },
        resync: Duration::from_secs(5),
        mdns: None,
        tls: Default::default(),
        viewer_logs: false,
        cluster: Default::default(),
    };
    let controller = Controller::open(cfg).await.expect("controller opens");
    bramble_tls::install_provider();
    let tls = Arc::new(bramble_tls::client_config(bramble_tls::Pins::one(
        controller.ca_fingerprint().clone(),
    )));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(controller.run(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        tls,
        _stop: stop,
    }
}

fn node(name: &str, machine_id: &str) -> NodeInfo {
    NodeInfo {
        machine_id: Some(machine_id.into()),
        memory_limits: Some(false),
        warnings: vec!["memory limits are not enforced".into()],
        ..nodes::node(name)
    }
}

/// Opens the agent link with `bearer`; `Err(status)` when refused before the upgrade.
async fn open(c: &Running, bearer: &str) -> Result<Ws, u16> {
    let tcp = TcpStream::connect(&c.addr).await.expect("connects");
    let tls = tokio_rustls::TlsConnector::from(c.tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name"),
            tcp,
        )
        .await
        .expect("TLS with the pinned CA");
    let mut req = format!("wss://{}/v1/agent", c.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {bearer}")).expect("header"),
    );
    match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
        .await
        .expect("answers in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

/// Connects with `bearer`, says Hello with `credential`, returns the first answer.
async fn hello(
    c: &Running,
    bearer: &str,
    info: NodeInfo,
    credential: Option<&str>,
) -> (Ws, ControllerMessage) {
    hello_as(c, bearer, info, credential, Says::CURRENT).await
}

/// What a Hello says the agent can take.
#[derive(Clone, Copy)]
struct Says {
    not_before: bool,
    endpoint_changes: bool,
}

impl Says {
    /// An agent of this version.
    const CURRENT: Says = Says {
        not_before: true,
        endpoint_changes: true,
    };
}

/// [`hello`] from an agent that can take what `says` says.
async fn hello_as(
    c: &Running,
    bearer: &str,
    info: NodeInfo,
    credential: Option<&str>,
    says: Says,
) -> (Ws, ControllerMessage) {
    let mut ws = open(c, bearer).await.expect("upgraded");
    let hello = AgentMessage::Hello {
        not_before: says.not_before,
        endpoint_changes: says.endpoint_changes,
        csr: None,
        node: info,
        tasks: vec![],
        credential: credential.map(|c| Secret(c.to_string())),
        standby: false,
    };
    ws.send(Message::text(wire::encode(&hello)))
        .await
        .expect("hello sent");
    let answer = next_message(&mut ws).await.expect("an answer");
    (ws, answer)
}

/// The next controller message (pings skipped); None once the link is closed.
async fn next_message(ws: &mut Ws) -> Option<ControllerMessage> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return wire::decode(t.as_str()).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn refusal(answer: &ControllerMessage) -> (&str, &str) {
    match answer {
        ControllerMessage::Error { code, message } => (code.as_str(), message.as_str()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const CRED_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const CRED_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_cannot_become_a_joined_node_connected_or_not() {
    let data = tempfile::tempdir().expect("temp dir");
    let c = controller(data.path()).await;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.tls).clone())
        .build()
        .expect("client");
    let api = format!("https://{}", c.addr);

    // The real Pi joins with the join token and its own credential.
    let (mut first, answer) = hello(
        &c,
        JOIN,
        node("raspberrypi", "10000000aaaaaa11"),
        Some(CRED_A),
    )
    .await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );

    // The node's identity and setup warnings are shown as the agent reported them, and
    // its credential is not.
    let nodes: serde_json::Value = http
        .get(format!("{api}/v1/nodes"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET /v1/nodes")
        .json()
        .await
        .expect("JSON");
    let info = &nodes[0]["info"];
    assert_eq!(info["machineId"], "10000000aaaaaa11", "{nodes}");
    assert_eq!(info["memoryLimits"], false, "{nodes}");
    assert!(!nodes.to_string().contains(CRED_A), "{nodes}");

    // An attacker with the join token (on every SD card) and another credential, with
    // the Pi's machine id, another one, or none: refused, naming nobody's identity.
    for machine in ["10000000aaaaaa11", "10000000bbbbbb22", ""] {
        let (mut ws, answer) = hello(&c, JOIN, node("raspberrypi", machine), Some(CRED_B)).await;
        let (code, message) = refusal(&answer);
        assert!(
            matches!(code, "name_taken" | "name_in_use"),
            "{code}: {message}"
        );
        for secret in ["10000000aaaaaa11", CRED_A, CRED_B] {
            assert!(!message.contains(secret), "{message}");
        }
        assert!(
            next_message(&mut ws).await.is_none(),
            "closed after the refusal"
        );
    }
    // Without any credential: refused too.
    let (_, answer) = hello(&c, JOIN, node("raspberrypi", ""), None).await;
    refusal(&answer);
    // The real node keeps its link: it still gets pinged and answers.
    first
        .send(Message::text(wire::encode(&AgentMessage::Removed {
            task: "nothing-0".into(),
        })))
        .await
        .expect("the first link is still up");

    // Disconnected, the name is still its alone.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, answer) = hello(
        &c,
        JOIN,
        node("raspberrypi", "10000000bbbbbb22"),
        Some(CRED_B),
    )
    .await;
    assert_eq!(refusal(&answer).0, "name_taken");

    // The real node comes back with its own credential: welcome.
    let (again, answer) = hello(
        &c,
        CRED_A,
        node("raspberrypi", "10000000aaaaaa11"),
        Some(CRED_A),
    )
    .await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );
    // Its credential opens no other name.
    let (_, answer) = hello(
        &c,
        CRED_A,
        node("pi-other", "10000000aaaaaa11"),
        Some(CRED_A),
    )
    .await;
    assert_eq!(refusal(&answer).0, "refused");
    // And an unknown credential opens nothing.
    assert_eq!(open(&c, CRED_B).await.err(), Some(401));

    // A connected node cannot be deleted.
    let r = http
        .delete(format!("{api}/v1/nodes/raspberrypi"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(
        r.status().as_u16(),
        409,
        "{}",
        r.text().await.unwrap_or_default()
    );

    // Once its agent is gone and its wallets surely fenced, the operator deletes it;
    // then the name may be joined by another machine.
    drop(again);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .delete(format!("{api}/v1/nodes/raspberrypi"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("DELETE");
        if r.status().is_success() {
            break;
        }
        assert_eq!(r.status().as_u16(), 409);
        assert!(tokio::time::Instant::now() < deadline, "never deletable");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, answer) = hello(
        &c,
        JOIN,
        node("raspberrypi", "10000000bbbbbb22"),
        Some(CRED_B),
    )
    .await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );
    // The deleted node's credential is gone with it.
    assert_eq!(open(&c, CRED_A).await.err(), Some(401));
}

/// A fake agent's link: read in the background, controller messages arriving on `got`,
/// and heartbeating every 250 ms as agents do (a silent node is suspected within a
/// second, and its link closed). Frames go out through `out`, in order.
struct Fake {
    out: tokio::sync::mpsc::UnboundedSender<Message>,
    got: tokio::sync::mpsc::UnboundedReceiver<ControllerMessage>,
}

fn fake(ws: Ws) -> Fake {
    let (mut send, mut recv) = ws.split();
    let (tx, got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = recv.next().await {
            if let Message::Text(t) = m {
                if let Ok(msg) = wire::decode::<ControllerMessage>(t.as_str()) {
                    let _ = tx.send(msg);
                }
            }
        }
    });
    let (out, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        let beat = Message::text(wire::encode(&AgentMessage::Heartbeat {
            metrics: Default::default(),
        }));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let m = tokio::select! {
                _ = tick.tick() => beat.clone(),
                m = outgoing.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            if send.send(m).await.is_err() {
                return;
            }
        }
    });
    Fake { out, got }
}

impl Fake {
    async fn say(&mut self, m: AgentMessage) {
        self.out
            .send(Message::text(wire::encode(&m)))
            .expect("the link is up");
    }

    async fn expect(
        &mut self,
        what: &str,
        mut f: impl FnMut(&ControllerMessage) -> bool,
    ) -> ControllerMessage {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.got.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
                .unwrap_or_else(|| panic!("link closed before {what}"));
            if f(&m) {
                return m;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_report_for_or_write_into_another_nodes_tasks() {
    let data = tempfile::tempdir().expect("temp dir");
    let c = controller(data.path()).await;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.tls).clone())
        .build()
        .expect("client");
    let api = format!("https://{}", c.addr);
    let (a, answer) = hello(&c, JOIN, node("pi-a", "aaaa"), Some(CRED_A)).await;
    assert!(matches!(answer, ControllerMessage::Welcome { .. }));
    let a = fake(a);
    let (b, answer) = hello(&c, JOIN, node("pi-b", "bbbb"), Some(CRED_B)).await;
    assert!(matches!(answer, ControllerMessage::Welcome { .. }));
    let mut b = fake(b);

    // A task that lands on pi-a (pi-b does not have the label).
    let mut labelled = node("pi-a", "aaaa");
    labelled.labels.insert("disk".into(), "ssd".into());
    drop(a);
    let (a2, _) = hello(&c, CRED_A, labelled, Some(CRED_A)).await;
    let mut a = fake(a2);
    let manifest = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  image: x\n  placement: {nodeSelector: {disk: ssd}}\n";
    let r = http
        .post(format!("{api}/v1/apply"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"sources": [{"name": "web.yaml", "content": manifest}]}))
        .send()
        .await
        .expect("apply");
    assert!(r.status().is_success());
    let set = a
        .expect(
            "a task set with the task",
            |m| matches!(m, ControllerMessage::Assign { tasks, .. } if !tasks.is_empty()),
        )
        .await;
    let ControllerMessage::Assign { tasks, .. } = set else {
        unreachable!()
    };
    let task = tasks[0].task.clone();
    let get_task = || {
        let (http, api, task) = (http.clone(), api.clone(), task.clone());
        async move {
            http.get(format!("{api}/v1/tasks/{task}"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("task")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        }
    };
    let before = get_task().await;

    // pi-b reports pi-a's task failed, then gone: refused, nothing changes.
    b.say(AgentMessage::Status {
        status: wire::TaskStatus {
            task: task.clone(),
            phase: bramble_api::task::TaskPhase::Failed,
            exit_code: Some(1),
            message: Some("FORGED by pi-b".into()),
            container_id: Some("forged".into()),
            restarts: 0,
            ready: None,
            started_at: None,
            finished_at: None,
            gave_up: true,
            output: None,
            reason: None,
            restart_at: None,
        },
    })
    .await;
    b.say(AgentMessage::Removed { task: task.clone() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = get_task().await;
    assert_eq!(after["phase"], before["phase"], "{after}");
    assert_eq!(after["node"], "pi-a", "{after}");
    assert!(!after.to_string().contains("FORGED"), "{after}");

    // The admin asks for the task's logs; pi-a gets the request.
    let logs = tokio::spawn({
        let (http, api, task) = (http.clone(), api.clone(), task.clone());
        async move {
            http.get(format!("{api}/v1/tasks/{task}/logs"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("logs")
                .text()
                .await
                .expect("body")
        }
    });
    let asked = a
        .expect("a log request", |m| {
            matches!(m, ControllerMessage::Logs { .. })
        })
        .await;
    let ControllerMessage::Logs { request, .. } = asked else {
        unreachable!()
    };
    // pi-b writes into that stream (it can guess the sequential id), then pi-a answers.
    for guess in request.saturating_sub(3)..request + 3 {
        b.say(AgentMessage::LogData {
            request: guess,
            data: "FORGED by pi-b\n".into(),
        })
        .await;
    }
    b.say(AgentMessage::LogEnd {
        request,
        error: Some("forged end".into()),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.say(AgentMessage::LogData {
        request,
        data: "real line from pi-a\n".into(),
    })
    .await;
    a.say(AgentMessage::LogEnd {
        request,
        error: None,
    })
    .await;
    let body = tokio::time::timeout(WAIT, logs)
        .await
        .expect("the stream ends")
        .expect("task");
    assert_eq!(body, "real line from pi-a\n");
    let _ = &mut b;
}

/// Everything in the data dir's store files, to search for values in clear.
fn store_bytes(data: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["bramble.db", "bramble.db-wal", "bramble.db-shm"] {
        if let Ok(b) = std::fs::read(data.join(f)) {
            all.extend(b);
        }
    }
    all
}

fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_only_the_node_that_runs_its_task_and_no_get_returns_it() {
    const VALUE: &str = "rpc-secret-value-7d1e0c9b";
    const ROTATED: &str = "rpc-secret-value-rotated-55aa";
    let data = tempfile::tempdir().expect("temp dir");
    let c = controller(data.path()).await;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.tls).clone())
        .build()
        .expect("client");
    let api = format!("https://{}", c.addr);
    let apply = |text: String| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let r = http
                .post(format!("{api}/v1/apply"))
                .bearer_auth(ADMIN)
                .json(&serde_json::json!({"sources": [{"name": "s.yaml", "content": text}]}))
                .send()
                .await
                .expect("apply");
            let status = r.status().as_u16();
            (status, r.text().await.expect("body"))
        }
    };
    let mut labelled = node("pi-a", "aaaa");
    labelled.labels.insert("disk".into(), "ssd".into());
    let (a, answer) = hello(&c, JOIN, labelled, Some(CRED_A)).await;
    assert!(matches!(answer, ControllerMessage::Welcome { .. }));
    let mut a = fake(a);
    let (b, answer) = hello(&c, JOIN, node("pi-b", "bbbb"), Some(CRED_B)).await;
    assert!(matches!(answer, ControllerMessage::Welcome { .. }));
    let mut b = fake(b);

    let secret = |v: &str| {
        format!("apiVersion: bramble/v1\nkind: Secret\nmetadata: {{name: ltc-rpc}}\ndata: {{password: {v}, user: pool}}\n")
    };
    let wallet = "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: ltc}\nspec:\n  image: x\n  placement: {nodeSelector: {disk: ssd}}\n  env:\n    RPC_PASSWORD: {secret: ltc-rpc, key: password}\n";

    // A reference to a Secret that is not there is refused, with its place.
    let (status, body) = apply(wallet.to_string()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("spec.env.RPC_PASSWORD") && body.contains("no Secret \\\"ltc-rpc\\\""),
        "{body}"
    );

    let (status, body) = apply(format!("{}---\n{wallet}", secret(VALUE))).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(VALUE), "{body}");
    let set = a
        .expect(
            "the wallet with its value",
            |m| matches!(m, ControllerMessage::Assign { tasks, .. } if !tasks.is_empty()),
        )
        .await;
    let ControllerMessage::Assign { tasks, .. } = set else {
        unreachable!()
    };
    assert_eq!(
        tasks[0].secrets.get("RPC_PASSWORD").map(|s| s.0.as_str()),
        Some(VALUE)
    );
    // The spec itself holds the reference, not the value.
    assert!(!serde_json::to_string(&tasks[0].spec)
        .expect("json")
        .contains(VALUE));
    let first_task = tasks[0].task.clone();

    // Re-applying the same values changes nothing.
    let (status, body) = apply(secret(VALUE)).await;
    assert_eq!(status, 200);
    assert!(body.contains("unchanged"), "{body}");

    // No GET shows the value, to the admin either.
    for path in [
        "/v1/secrets",
        "/v1/secrets/ltc-rpc",
        "/v1/workloads/wallet/ltc",
        "/v1/tasks",
        "/v1/events",
    ] {
        let text = http
            .get(format!("{api}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("body");
        assert!(!text.contains(VALUE), "{path} shows the value: {text}");
    }
    let view: serde_json::Value = http
        .get(format!("{api}/v1/secrets/ltc-rpc"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(view["keys"], serde_json::json!(["password", "user"]));
    assert_eq!(view["usedBy"], serde_json::json!(["wallet/ltc"]));

    // Referenced: cannot be deleted, nor lose the referenced key.
    let r = http
        .delete(format!("{api}/v1/secrets/ltc-rpc"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 409);
    assert!(r.text().await.expect("body").contains("wallet/ltc"));
    let (status, body) = apply(
        "apiVersion: bramble/v1\nkind: Secret\nmetadata: {name: ltc-rpc}\ndata: {user: pool}\n"
            .into(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("\\\"password\\\" is used by wallet/ltc"),
        "{body}"
    );

    // A new value replaces the wallet's task, and the new task carries the new value.
    let (status, body) = apply(secret(ROTATED)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"Wallet\""),
        "the wallet is reconfigured: {body}"
    );
    // The old task leaves the set; once the node says its container is gone, the new
    // one is placed (a Wallet never runs twice).
    a.expect("the old task stopped", |m| {
        matches!(m, ControllerMessage::Assign { tasks, .. } if tasks.iter().all(|t| t.task != first_task))
    })
    .await;
    a.say(AgentMessage::Removed {
        task: first_task.clone(),
    })
    .await;
    let set = a
        .expect("the replacement task", |m| {
            matches!(m, ControllerMessage::Assign { tasks, .. } if tasks.iter().any(|t| t.task != first_task))
        })
        .await;
    let ControllerMessage::Assign { tasks, .. } = set else {
        unreachable!()
    };
    let new = tasks
        .iter()
        .find(|t| t.task != first_task)
        .expect("new task");
    assert_eq!(
        new.secrets.get("RPC_PASSWORD").map(|s| s.0.as_str()),
        Some(ROTATED)
    );

    // pi-b never received either value.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(m) = b.got.try_recv() {
        let text = wire::encode(&m);
        assert!(
            !text.contains(VALUE) && !text.contains(ROTATED),
            "pi-b got {text}"
        );
    }
    // Sealed at rest: the store files hold neither value in clear.
    let bytes = store_bytes(data.path());
    assert!(bytes.len() > 1000, "the store was read");
    assert!(
        !holds(&bytes, VALUE) && !holds(&bytes, ROTATED),
        "a value is in the store in clear"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.path().join("secrets.key"))
            .expect("key file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hellos_and_heartbeats_are_refused_with_the_field_named() {
    let data = tempfile::tempdir().expect("temp dir");
    let c = controller(data.path()).await;
    // 1,000 labels: refused at the Hello, nothing registered.
    let mut fat = node("pi-fat", "ffff");
    for i in 0..1000 {
        fat.labels.insert(format!("l{i}"), "x".repeat(60));
    }
    let (_ws, answer) = hello(&c, JOIN, fat, Some(CRED_A)).await;
    let (code, message) = refusal(&answer);
    assert_eq!(code, "bad_message");
    assert!(
        message.contains("node.labels") && message.contains("limit"),
        "{message}"
    );
    assert!(!message.contains("xxxxxxxx"), "no value echoed: {message}");

    // A joined node's 2.7 MB heartbeat: refused unread, the link stays up.
    let (ws, answer) = hello(&c, JOIN, node("pi-a", "aaaa"), Some(CRED_A)).await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );
    let mut a = fake(ws);
    let huge = format!(
        "{{\"v\":{},\"type\":\"heartbeat\",\"metrics\":{{\"warnings\":[\"{}\"]}}}}",
        wire::PROTOCOL_VERSION,
        "w".repeat(2_700_000)
    );
    a.out.send(Message::text(huge)).expect("sent");
    let m = a
        .expect("the refusal", |m| {
            matches!(m, ControllerMessage::Error { .. })
        })
        .await;
    let (code, message) = refusal(&m);
    assert_eq!(code, "bad_message");
    assert!(
        message.contains("heartbeat frame of") && message.contains("limit"),
        "{message}"
    );
    // Still connected: a normal heartbeat is taken.
    a.say(AgentMessage::Heartbeat {
        metrics: Default::default(),
    })
    .await;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.tls).clone())
        .build()
        .expect("client");
    let nodes = http
        .get(format!("https://{}/v1/nodes", c.addr))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("nodes")
        .text()
        .await
        .expect("body");
    assert!(
        nodes.contains("pi-a") && !nodes.contains("pi-fat"),
        "{nodes}"
    );
    assert!(
        !nodes.contains("wwwwwwww"),
        "nothing of the refused heartbeat kept"
    );
}

/// pi-a joined with what `says`, as a fake agent, and an API client of `c`.
async fn joined(c: &Running, says: Says) -> (Fake, reqwest::Client) {
    let (ws, answer) = hello_as(c, JOIN, node("pi-a", "aaaa"), Some(CRED_A), says).await;
    assert!(matches!(answer, ControllerMessage::Welcome { .. }));
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*c.tls).clone())
        .build()
        .expect("client");
    (fake(ws), http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_run_reaches_its_node_ahead_of_its_slot_but_an_older_agent_only_at_the_slot() {
    for waits in [true, false] {
        let data = tempfile::tempdir().expect("temp dir");
        let c = controller(data.path()).await;
        let (mut a, http) = joined(
            &c,
            Says {
                not_before: waits,
                ..Says::CURRENT
            },
        )
        .await;
        let manifest = "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {name: tick}\nspec:\n  image: x\n  schedule: \"*/5 * * * * *\"\n";
        let r = http
            .post(format!("https://{}/v1/apply", c.addr))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"sources": [{"name": "tick.yaml", "content": manifest}]}))
            .send()
            .await
            .expect("apply");
        assert!(r.status().is_success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let (slot, got) = loop {
            let m = tokio::time::timeout_at(deadline, a.got.recv())
                .await
                .expect("a run within 15 s")
                .expect("link open");
            if let ControllerMessage::Assign { tasks, .. } = m {
                if let Some(t) = tasks.first() {
                    break (
                        t.not_before.expect("a cron run has its slot"),
                        chrono::Utc::now(),
                    );
                }
            }
        };
        if waits {
            assert!(got < slot, "sent ahead of its slot {slot}, got at {got}");
        } else {
            assert!(
                got >= slot,
                "an older agent got the run at {got}, before its slot {slot}"
            );
        }
    }
}

/// A task the fake agent reports Running.
fn running(task: &str) -> AgentMessage {
    AgentMessage::Status {
        status: wire::TaskStatus {
            container_id: Some(format!("c-{task}")),
            started_at: Some(chrono::Utc::now()),
            ..wire::TaskStatus::new(task, bramble_api::task::TaskPhase::Running)
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_says_so_gets_the_endpoints_whole_once_then_only_their_changes() {
    for changes in [true, false] {
        let data = tempfile::tempdir().expect("temp dir");
        let c = controller(data.path()).await;
        let (mut a, http) = joined(
            &c,
            Says {
                endpoint_changes: changes,
                ..Says::CURRENT
            },
        )
        .await;
        let apply = |name: &str| {
            let manifest = format!("apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  image: x\n  replicas: 2\n  ports: [{{container: 80}}]\n");
            http.post(format!("https://{}/v1/apply", c.addr))
                .bearer_auth(ADMIN)
                .json(&serde_json::json!({"sources": [{"name": "w.yaml", "content": manifest}]}))
                .send()
        };
        // A new link's first table is whole (here still empty).
        let whole = a
            .expect("the whole table", |m| {
                matches!(m, ControllerMessage::Endpoints { .. })
            })
            .await;
        let ControllerMessage::Endpoints { mut table, .. } = whole else {
            unreachable!()
        };
        assert!(table.endpoints.is_empty(), "{table:?}");
        assert!(apply("web").await.expect("apply").status().is_success());
        // Until the table has web's two instances and api: each change is applied to
        // the table as an agent does, and checked to be only what changed. web's tasks
        // are reported Running when they come, and api is applied then.
        let mut reported = false;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, a.got.recv())
                .await
                .expect("web's instances and api in the table")
                .expect("link open");
            match m {
                ControllerMessage::Assign { tasks, .. } if tasks.len() == 2 && !reported => {
                    for t in &tasks {
                        a.say(running(&t.task)).await;
                    }
                    assert!(apply("api").await.expect("apply").status().is_success());
                    reported = true;
                }
                ControllerMessage::EndpointChanges { changes: c, .. } => {
                    assert!(changes, "an agent that did not say so got changes");
                    assert!(!c.set.iter().any(|e| table.endpoints.contains(e)), "{c:?}");
                    table.apply(c);
                }
                ControllerMessage::Endpoints { table: t, .. } => {
                    assert!(
                        !changes,
                        "an agent that takes changes got a whole table again"
                    );
                    table = t;
                }
                _ => {}
            }
            let backends = table.lookup("web").map_or(0, |e| e.backends.len());
            if backends == 2 && table.lookup("api").is_some() {
                break;
            }
        }
        let names: Vec<&str> = table.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_keep_alives_are_pongs_which_no_agent_answers() {
    let data = tempfile::tempdir().expect("temp dir");
    let c = controller(data.path()).await;
    let (mut ws, answer) = hello(&c, JOIN, node("pi-a", "aaaa"), Some(CRED_A)).await;
    let ControllerMessage::Welcome { heartbeat_ms, .. } = answer else {
        panic!("expected a welcome, got {answer:?}");
    };
    // Twelve heartbeats of a live agent, longer than the dead timeout, counting what
    // the controller sends besides text. A ping would have this very client
    // (tungstenite, as the agent) answer with a pong: a third frame per heartbeat for
    // the controller to read.
    let beat = Message::text(wire::encode(&AgentMessage::Heartbeat {
        metrics: Default::default(),
    }));
    let mut tick = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    let end = tokio::time::Instant::now() + Duration::from_millis(12 * heartbeat_ms);
    let (mut pongs, mut pings) = (0, 0);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => ws.send(beat.clone()).await.expect("heartbeat sent"),
            frame = ws.next() => match frame {
                Some(Ok(Message::Pong(_))) => pongs += 1,
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(_)) => {}
                other => panic!("the link ended: {other:?}"),
            },
        }
    }
    assert_eq!(pings, 0, "keep-alives that ask for an answer");
    assert!(
        pongs >= 6,
        "a keep-alive every heartbeat ({heartbeat_ms} ms): only {pongs} in twelve"
    );

    // An agent that goes silent with its TCP connection up (a partition sends no
    // reset) is suspected once it has been silent for `not_ready_after`, and its link
    // closed: nothing of the leader may reach it then, so that only a vouch could keep
    // its Wallets running.
    let not_ready = bramble_controller::config::HealthConfig::default().not_ready_after;
    let silent = tokio::time::Instant::now();
    let end = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the silent link is closed")
        {
            Some(Ok(Message::Close(c))) => break format!("closed: {c:?}"),
            Some(Err(e)) => break format!("failed: {e}"),
            None => break "ended".to_string(),
            Some(Ok(_)) => {}
        }
    };
    let took = silent.elapsed();
    assert!(
        took + Duration::from_millis(300) >= not_ready,
        "{end} {took:?} into the silence, before the node could be suspected ({not_ready:?})"
    );
}
