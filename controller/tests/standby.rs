//! Standby links: two in-process controllers on one real etcd, raw WebSocket clients
//! playing an agent. The follower serves a standby link only to an agent that asks for
//! one, vouches for the node while the leader has no suspicion of it, stops the moment
//! the leader suspects it, vouches again once the leader hears it back, and hands the
//! link over (closes it) when it becomes the leader itself.

use std::sync::Arc;
use std::time::Duration;

use bramble_api::token::Secret;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo, NodeMetrics};
use bramble_controller::config::{Cluster, Etcd as EtcdConfig, HealthConfig};
use bramble_controller::state::leader::Timing;
use bramble_controller::{Config, Controller};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/etcd.rs"]
mod support;

const WAIT: Duration = Duration::from_secs(15);
const JOIN: &str = "join-token-for-tests";
const ADMIN: &str = "admin-token-for-tests";
const CRED: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

/// A controller on a free port; dropping `stop` shuts it down (revoking its lease).
struct Running {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), bramble_controller::Error>>,
}

impl Running {
    async fn shut_down(mut self) {
        drop(self.stop.take());
        let _ = tokio::time::timeout(WAIT, &mut self.done).await;
    }
}

async fn controller(
    data: &std::path::Path,
    name: &str,
    endpoints: &[String],
    prefix: &str,
) -> Running {
    let cfg = Config {
        data_dir: data.to_path_buf(),
        admin_token: Some(ADMIN.into()),
        join_token: Some(JOIN.into()),
        viewer_token: None,
        local_agent: None,
        health: HealthConfig {
            // Suspected one second after it goes silent to the leader.
            startup_grace: Duration::ZERO,
            ..Default::default()
        },
        resync: Duration::from_secs(5),
        mdns: None,
        tls: Default::default(),
        viewer_logs: false,
        cluster: Cluster {
            etcd: Some(EtcdConfig {
                endpoints: endpoints.to_vec(),
                prefix: prefix.into(),
                tls: None,
                allow_plain_http: false,
            }),
            leader: Timing::for_lease(Duration::from_secs(3)),
            name: name.into(),
            url: None,
            peers: vec![],
            member: None,
        },
    };
    let controller = Controller::open(cfg).await.expect("controller opens");
    bramble_tls::install_provider();
    let tls = Arc::new(bramble_tls::client_config(bramble_tls::Pins::one(
        controller.ca_fingerprint().clone(),
    )));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(controller.run(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        tls,
        stop: Some(stop),
        done,
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        machine_id: Some("10000000aaaaaa11".into()),
        memory_limits: Some(true),
        ..nodes::node("pi1")
    }
}

/// What an agent's link sees: its controller's messages, and keep-alives (unsolicited
/// pongs) as `None`.
struct Link {
    rx: mpsc::UnboundedReceiver<Option<ControllerMessage>>,
    beats: tokio::task::JoinHandle<()>,
}

impl Link {
    /// The next frame within `within`: `Some(Some(msg))`, `Some(None)` for a keep-alive,
    /// `None` when the link closed or nothing came.
    async fn next(&mut self, within: Duration) -> Option<Option<ControllerMessage>> {
        tokio::time::timeout(within, self.rx.recv()).await.ok()?
    }

    /// Waits for a Vouch (true) or for `within` to pass with keep-alives only (false).
    async fn vouches_within(&mut self, within: Duration) -> bool {
        let end = tokio::time::Instant::now() + within;
        while let Some(left) = end.checked_duration_since(tokio::time::Instant::now()) {
            match self.next(left).await {
                Some(Some(ControllerMessage::Vouch)) => return true,
                Some(_) => {}
                None => return false,
            }
        }
        false
    }

    /// Whether no Vouch arrives for `quiet` (the link staying up all along).
    async fn silent_for(&mut self, quiet: Duration) -> bool {
        let end = tokio::time::Instant::now() + quiet;
        let mut keep_alives = 0;
        while let Some(left) = end.checked_duration_since(tokio::time::Instant::now()) {
            match self.next(left).await {
                Some(Some(ControllerMessage::Vouch)) => return false,
                Some(None) => keep_alives += 1,
                Some(Some(_)) => {}
                None => break,
            }
        }
        keep_alives > 0
    }

    /// Whether the controller closes the link within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let end = tokio::time::Instant::now() + within;
        loop {
            let Some(left) = end.checked_duration_since(tokio::time::Instant::now()) else {
                return false;
            };
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.beats.abort();
    }
}

/// Dials `c` as the agent does (`standby_header`: asks for a standby link), says Hello
/// (`standby`: it can keep one), and returns the Welcome (or refusal) and the link,
/// which sends a heartbeat every 250 ms from then on. `Err(status)`: refused before
/// the upgrade.
async fn dial(
    c: &Running,
    bearer: &str,
    standby_header: bool,
    standby: bool,
) -> Result<(ControllerMessage, Link), u16> {
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
    if standby_header {
        req.headers_mut()
            .insert("x-bramble-standby", HeaderValue::from_static("1"));
    }
    let mut ws = match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
        .await
        .expect("answers in time")
    {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => return Err(r.status().as_u16()),
        Err(e) => panic!("unexpected handshake failure: {e}"),
    };
    let hello = AgentMessage::Hello {
        not_before: true,
        endpoint_changes: false,
        csr: None,
        node: node(),
        tasks: vec![],
        credential: Some(Secret(CRED.into())),
        standby,
    };
    ws.send(Message::text(wire::encode(&hello)))
        .await
        .expect("hello sent");
    let first = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an answer")
        {
            Some(Ok(Message::Text(t))) => {
                break wire::decode::<ControllerMessage>(t.as_str()).expect("decodes")
            }
            Some(Ok(_)) => {}
            other => panic!("closed before an answer: {other:?}"),
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let beats = tokio::spawn(async move {
        let beat = wire::encode(&AgentMessage::Heartbeat {
            metrics: NodeMetrics::default(),
        });
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if ws.send(Message::text(beat.clone())).await.is_err() {
                        return;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let _ = tx.send(wire::decode::<ControllerMessage>(t.as_str()).ok());
                    }
                    // A pong, not a ping: a ping would draw an answer from every agent.
                    Some(Ok(Message::Pong(_))) => {
                        let _ = tx.send(None);
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    });
    Ok((first, Link { rx, beats }))
}

fn standby_of(m: &ControllerMessage) -> bool {
    match m {
        ControllerMessage::Welcome { standby, .. } => *standby,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Copies the first controller's identity (CA and Secrets key) into another data dir,
/// as the HA setup says.
fn share_identity(from: &std::path::Path, to: &std::path::Path) {
    for f in ["ca.crt", "ca.key", "secrets.key"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_vouches_until_the_leader_suspects_the_node_and_hands_over_when_it_leads() {
    let etcd = support::Etcd::start(1).await;
    let endpoints = etcd.endpoints();
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = controller(dir_a.path(), "a", &endpoints, "/standby/").await;
    // Up for longer than `not_ready_after` before the node joins.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The first controller leads once its link is a leader's.
    let (welcome, mut leader_link) = tokio::time::timeout(WAIT, async {
        loop {
            match dial(&a, JOIN, true, true).await {
                Ok((w @ ControllerMessage::Welcome { .. }, link)) if !standby_of(&w) => {
                    break (w, link)
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("the first controller leads");
    assert!(!standby_of(&welcome));
    // A node that joins a controller up for longer than `not_ready_after` is heard at
    // its Hello: not suspected (and its link not closed) as silent since the start.
    assert!(
        !leader_link.closed_within(Duration::from_millis(1500)).await,
        "a node that just joined was taken for silent"
    );
    std::fs::create_dir_all(dir_b.path()).expect("dir");
    share_identity(dir_a.path(), dir_b.path());
    let b = controller(dir_b.path(), "b", &endpoints, "/standby/").await;

    // An agent that does not ask for a standby link is refused by the follower, before
    // the upgrade (as older agents expect) or after a Hello that cannot keep one.
    let mut refused = false;
    for _ in 0..50 {
        match dial(&b, CRED, false, true).await {
            Err(503) => {
                refused = true;
                break;
            }
            // The follower may not know yet that it follows.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(refused, "no 503 from the follower");
    let (answer, _) = dial(&b, CRED, true, false).await.expect("upgraded");
    assert!(
        matches!(&answer, ControllerMessage::Error { code, .. } if code == "not_leader"),
        "{answer:?}"
    );

    // A standby link: welcomed as one, and vouched for while the leader hears the node.
    let (welcome, mut standby) = dial(&b, CRED, true, true).await.expect("upgraded");
    assert!(standby_of(&welcome), "{welcome:?}");
    assert!(standby.vouches_within(WAIT).await, "the follower vouches");
    // The follower shows the node as it hears it.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*b.tls).clone())
        .build()
        .expect("client");
    let seen: serde_json::Value = http
        .get(format!("https://{}/v1/nodes/pi1", b.addr))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET node")
        .json()
        .await
        .expect("JSON");
    assert_eq!(seen["status"], "Ready", "{seen}");

    // The node goes silent to the leader: the leader suspects it and closes its link,
    // and the follower stops vouching at once, though it still hears the node.
    leader_link.beats.abort();
    assert!(
        leader_link.closed_within(WAIT).await,
        "the leader closes a suspected node's link"
    );
    let mut stopped = false;
    for _ in 0..40 {
        if standby.silent_for(Duration::from_millis(800)).await {
            stopped = true;
            break;
        }
    }
    assert!(
        stopped,
        "the follower stopped vouching for a suspected node"
    );

    // Back on the leader: the suspicion goes, the follower vouches again.
    let (_, _leader_link) = dial(&a, CRED, true, true).await.expect("upgraded");
    assert!(standby.vouches_within(WAIT).await, "vouching again");

    // The leader shuts down (handing its lease back): the follower leads and closes the
    // standby link, so the agent dials it again for a leader's link.
    a.shut_down().await;
    assert!(
        standby.closed_within(WAIT).await,
        "the new leader closes standby links"
    );
    let (welcome, _) = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok((w @ ControllerMessage::Welcome { .. }, link)) =
                dial(&b, CRED, true, true).await
            {
                if !standby_of(&w) {
                    break (w, link);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the new leader welcomes a leader's link");
    assert!(!standby_of(&welcome));
    b.shut_down().await;
}
