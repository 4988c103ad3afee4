//! The agent's link against a fake controller (a WebSocket server in the test) and the
//! real Docker engine: pings keep a node unfenced, silence fences its Wallet, and only a
//! task set on a new session brings it back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bramble_agent::fence::DEFAULT_FENCE;
use bramble_agent::runtime::{ContainerState, Runtime};
use bramble_agent::supervisor::FENCED_MESSAGE;
use bramble_api::manifest::{Kind, Restart};
use bramble_api::task::{TaskPhase, TaskSpec};
use bramble_api::wire::{self, AgentMessage, Assignment, ControllerMessage};
use bramble_tests::{ensure_test_image, eventually, unique_name, ContainerGuard};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<TcpStream>;

fn assignment(task: &str, kind: Kind, args: &[&str]) -> Assignment {
    let spec = TaskSpec {
        image: bramble_tests::TEST_IMAGE.to_string(),
        command: None,
        args: Some(args.iter().map(|a| a.to_string()).collect()),
        env: BTreeMap::new(),
        ports: vec![],
        volumes: vec![],
        resources: Default::default(),
        restart: Restart::default_for(kind),
        probes: Default::default(),
        timeout: None,
    };
    Assignment {
        task: task.to_string(),
        kind,
        workload: task.to_string(),
        spec_hash: spec.hash(),
        spec,
        deadline: None,
    }
}

/// Accepts the agent's next connection and reads its Hello.
async fn accept(listener: &TcpListener) -> anyhow::Result<(Ws, AgentMessage)> {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept()).await??;
    let mut ws = tokio_tungstenite::accept_async(tcp).await?;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await? {
            Some(Ok(Message::Text(t))) => {
                return Ok((ws, wire::decode::<AgentMessage>(t.as_str())?));
            }
            Some(Ok(_)) => {}
            other => bail!("no hello: {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, msg: &ControllerMessage) -> anyhow::Result<()> {
    ws.send(Message::text(wire::encode(msg))).await?;
    Ok(())
}

/// Plays a live controller for `how_long`: pings every 200 ms (and nothing else) and
/// reads whatever the agent sends.
async fn ping_for(ws: &mut Ws, how_long: Duration) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + how_long;
    let mut ping = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return Ok(()),
            _ = ping.tick() => ws.send(Message::Ping(Default::default())).await?,
            frame = ws.next() => match frame {
                Some(Ok(_)) => {}
                other => bail!("the agent hung up: {other:?}"),
            },
        }
    }
}

async fn running(rt: &Runtime, task: &str) -> anyhow::Result<Option<String>> {
    let listed = rt.list().await?;
    let mine: Vec<_> = listed.iter().filter(|o| o.task == task).collect();
    match mine.as_slice() {
        [o] if o.state == ContainerState::Running => Ok(Some(o.id.clone())),
        [] => Ok(None),
        other => Err(anyhow!("containers {other:?}")),
    }
}

#[tokio::test]
async fn a_silent_controller_fences_the_wallet_and_only_a_new_session_lifts_it() {
    let node = unique_name("link");
    let _guard = ContainerGuard::node(&node);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&node).await.expect("docker");
    let data = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let cfg = bramble_agent::Config {
        controller: Some(base.clone()),
        join_token: "token".into(),
        node_name: node.clone(),
        data_dir: data.path().to_path_buf(),
        labels: BTreeMap::new(),
        mdns_interfaces: vec![],
        image_gc_threshold: 100,
        allow_host_paths: vec![],
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(bramble_agent::run(cfg, async {
        let _ = stopped.await;
    }));

    let wallet = assignment("ltc-aaaaaa-0", Kind::Wallet, &["sleep", "600"]);
    let pool = assignment("pool-aaaaaa-0", Kind::Service, &["sleep", "600"]);
    let tasks = vec![wallet.clone(), pool.clone()];
    let welcome = ControllerMessage::Welcome {
        node: node.clone(),
        heartbeat_ms: 200,
        fence_ms: 1000,
    };

    let (mut ws, hello) = accept(&listener).await.expect("first session");
    assert!(matches!(hello, AgentMessage::Hello { .. }), "{hello:?}");
    send(&mut ws, &welcome).await.expect("welcome");
    let assign = ControllerMessage::Assign {
        revision: 1,
        tasks: tasks.clone(),
    };
    send(&mut ws, &assign).await.expect("assign");
    // A live controller pings while the containers start (a slow start must not
    // outlast the fence timeout in silence).
    let pool_id = tokio::select! {
        r = eventually(WAIT, "both tasks to run", || async {
            let (w, p) = (
                running(&rt, &wallet.task).await?,
                running(&rt, &pool.task).await?,
            );
            Ok(w.and(p))
        }) => r.expect("running"),
        r = ping_for(&mut ws, WAIT + Duration::from_secs(1)) => panic!("pinging ended first: {r:?}"),
    };

    // Pings alone, for longer than the fence timeout, keep the node unfenced.
    ping_for(&mut ws, Duration::from_millis(2500))
        .await
        .expect("pinging");
    assert!(
        running(&rt, &wallet.task).await.expect("list").is_some(),
        "pings count as word from the controller"
    );

    // Silence: the wallet goes within the fence timeout plus the stop.
    let silent = Instant::now();
    eventually(WAIT, "the fenced wallet to go", || async {
        Ok(rt
            .list()
            .await?
            .iter()
            .all(|o| o.task != wallet.task)
            .then_some(()))
    })
    .await
    .expect("fenced");
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "fenced {took:?} after the last ping (fence 1s)"
    );
    assert_eq!(
        running(&rt, &pool.task).await.expect("list"),
        Some(pool_id),
        "the service keeps running"
    );

    // The agent hangs up the silent session and dials again; its Hello tells the fence.
    let (mut ws2, hello) = accept(&listener).await.expect("second session");
    drop(ws);
    let AgentMessage::Hello { tasks: seen, .. } = hello else {
        panic!("expected hello, got {hello:?}");
    };
    let w = seen
        .iter()
        .find(|s| s.task == wallet.task)
        .expect("the wallet is in the hello");
    assert_eq!(
        (w.phase, w.message.as_deref()),
        (TaskPhase::Stopped, Some(FENCED_MESSAGE))
    );
    send(&mut ws2, &welcome).await.expect("welcome");
    // Welcomed, but no task set yet: the wallet stays stopped.
    ping_for(&mut ws2, Duration::from_millis(700))
        .await
        .expect("pinging");
    assert_eq!(running(&rt, &wallet.task).await.expect("list"), None);
    let assign = ControllerMessage::Assign {
        revision: 2,
        tasks: tasks.clone(),
    };
    send(&mut ws2, &assign).await.expect("assign");
    // A live controller goes on pinging while the wallet starts.
    let deadline = Instant::now() + WAIT;
    while running(&rt, &wallet.task).await.expect("list").is_none() {
        assert!(Instant::now() < deadline, "the wallet never ran again");
        ping_for(&mut ws2, Duration::from_millis(200))
            .await
            .expect("pinging");
    }

    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops")
        .expect("no panic")
        .expect("no error");
    assert!(
        running(&rt, &wallet.task).await.expect("list").is_some(),
        "stopping the agent leaves the wallet running"
    );
}

#[tokio::test]
async fn an_agent_that_never_reaches_the_controller_fences_its_wallets() {
    let node = unique_name("link");
    let _guard = ContainerGuard::node(&node);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&node).await.expect("docker");
    // Left running from before an agent restart.
    let wallet = assignment("ltc-bbbbbb-0", Kind::Wallet, &["sleep", "600"]);
    let pool = assignment("pool-bbbbbb-0", Kind::Service, &["sleep", "600"]);
    rt.create_and_start(&wallet).await.expect("wallet");
    let pool_id = rt.create_and_start(&pool).await.expect("pool");
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let data = tempfile::tempdir().expect("temp dir");
    let cfg = bramble_agent::Config {
        controller: Some(format!("http://{closed}")),
        join_token: "token".into(),
        node_name: node.clone(),
        data_dir: data.path().to_path_buf(),
        labels: BTreeMap::new(),
        mdns_interfaces: vec![],
        image_gc_threshold: 100,
        allow_host_paths: vec![],
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let agent = tokio::spawn(bramble_agent::run(cfg, async {
        let _ = stopped.await;
    }));
    eventually(WAIT, "the wallet to be fenced", || async {
        Ok(running(&rt, &wallet.task).await?.is_none().then_some(()))
    })
    .await
    .expect("fenced");
    let took = started.elapsed();
    assert!(
        took >= DEFAULT_FENCE - Duration::from_millis(100)
            && took < DEFAULT_FENCE + Duration::from_secs(2),
        "fenced {took:?} after start (default fence {DEFAULT_FENCE:?})"
    );
    assert_eq!(
        running(&rt, &pool.task).await.expect("list"),
        Some(pool_id),
        "the service keeps running"
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops")
        .expect("no panic")
        .expect("no error");
}
