//! The `/v1/agent` WebSocket of an in-process controller, with raw WebSocket clients
//! playing agents: two machines flashed from one image must not share a node name.

use std::collections::BTreeMap;
use std::time::Duration;

use bramble_api::manifest::Arch;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo};
use bramble_controller::{Config, Controller};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);
const JOIN: &str = "join-token-for-tests";
const ADMIN: &str = "admin-token-for-tests";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A controller serving on a free port until the returned sender is dropped.
async fn controller(data: &std::path::Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let cfg = Config {
        data_dir: data.to_path_buf(),
        admin_token: Some(ADMIN.into()),
        join_token: Some(JOIN.into()),
        viewer_token: None,
        local_agent: None,
        health: Default::default(),
        resync: Duration::from_secs(5),
        mdns: None,
    };
    let controller = Controller::open(cfg).expect("controller opens");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/v1/agent", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(controller.run(listener, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

fn node(name: &str, machine_id: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        arch: Arch::Arm64,
        cores: 4,
        memory_bytes: 1 << 30,
        docker_version: "20.10.24".into(),
        labels: BTreeMap::new(),
        agent_version: bramble_api::VERSION.into(),
        os: String::new(),
        machine_id: Some(machine_id.into()),
        memory_limits: Some(false),
        warnings: vec!["memory limits are not enforced".into()],
    }
}

/// Connects as an agent, says Hello, and returns the link and the first answer.
async fn hello(url: &str, info: NodeInfo) -> (Ws, ControllerMessage) {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {JOIN}")).expect("header"),
    );
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connects in time")
        .expect("connects");
    let hello = AgentMessage::Hello {
        node: info,
        tasks: vec![],
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

#[tokio::test]
async fn a_second_machine_cannot_take_a_connected_nodes_name() {
    let data = tempfile::tempdir().expect("temp dir");
    let (url, _stop) = controller(data.path()).await;

    let (mut first, answer) = hello(&url, node("raspberrypi", "10000000aaaaaa11")).await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );

    // The node's identity and setup warnings are shown as the agent reported them.
    let api = url
        .replace("ws://", "http://")
        .replace("/v1/agent", "/v1/nodes");
    let nodes: serde_json::Value = {
        bramble_controller::install_tls_provider();
        reqwest::Client::new()
    }
    .get(&api)
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
    assert_eq!(
        info["warnings"],
        serde_json::json!(["memory limits are not enforced"])
    );

    // A second board from the same image, same name, another serial: refused.
    let (mut second, answer) = hello(&url, node("raspberrypi", "10000000bbbbbb22")).await;
    match answer {
        ControllerMessage::Error { code, message } => {
            assert_eq!(code, "name_in_use");
            assert_eq!(
                message,
                "node name raspberrypi is in use by another machine; give this one --node-name"
            );
            assert!(
                !message.contains("10000000aaaaaa11"),
                "the refusal must not name the other machine's identity"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        next_message(&mut second).await.is_none(),
        "closed after the refusal"
    );

    // The first one keeps its link: it still gets pinged and answers.
    first
        .send(Message::text(wire::encode(&AgentMessage::Removed {
            task: "nothing-0".into(),
        })))
        .await
        .expect("the first link is still up");

    // The same machine reconnecting replaces its own link, as before.
    let (_again, answer) = hello(&url, node("raspberrypi", "10000000aaaaaa11")).await;
    assert!(
        matches!(answer, ControllerMessage::Welcome { .. }),
        "{answer:?}"
    );

    // Once the name is free, another machine may take it.
    drop(first);
    drop(_again);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_ws, answer) = hello(&url, node("raspberrypi", "10000000bbbbbb22")).await;
        if matches!(answer, ControllerMessage::Welcome { .. }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed name was never given to the other machine: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
