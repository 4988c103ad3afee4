//! The agent's link against a fake controller (a WebSocket server over TLS, with a CA
//! of its own pinned in the join token) and the real Docker engine: keep-alives keep a node
//! unfenced, silence fences its Wallet, and only a task set on a new session brings it
//! back.

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

type Ws = WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

/// A join token for the fake controller's CA.
fn token(ca: &bramble_api::token::Fingerprint) -> String {
    format!(
        "{}{ca}-secret-of-the-fake-controller",
        bramble_api::token::PREFIX
    )
}

fn assignment(task: &str, kind: Kind, args: &[&str]) -> Assignment {
    let spec = TaskSpec {
        sync: None,
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
        restore_from: None,
        not_before: None,
        sync_to: Vec::new(),
        task: task.to_string(),
        kind,
        workload: task.to_string(),
        spec_hash: spec.hash(),
        spec,
        deadline: None,
        secrets: BTreeMap::new(),
        epoch: None,
    }
}

/// Accepts the agent's next connection (TLS, then the WebSocket) and reads its Hello.
async fn accept(
    listener: &TcpListener,
    tls: &tokio_rustls::TlsAcceptor,
) -> anyhow::Result<(Ws, AgentMessage)> {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept()).await??;
    let stream = tokio::time::timeout(WAIT, tls.accept(tcp)).await??;
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
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

/// Plays a live controller for `how_long`: a keep-alive every 200 ms (an unsolicited
/// pong, as controllers send) and nothing else, reading whatever the agent sends.
async fn alive_for(ws: &mut Ws, how_long: Duration) -> anyhow::Result<()> {
    alive_with(ws, how_long, Message::Pong(Default::default())).await
}

/// [`alive_for`] with `keep` as the keep-alive (a ping, as older controllers send).
async fn alive_with(ws: &mut Ws, how_long: Duration, keep: Message) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + how_long;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return Ok(()),
            _ = tick.tick() => ws.send(keep.clone()).await?,
            frame = ws.next() => match frame {
                Some(Ok(_)) => {}
                other => bail!("the agent hung up: {other:?}"),
            },
        }
    }
}

/// Plays a follower on a standby link for `how_long`: every 200 ms a Vouch (`vouch`)
/// or only a keep-alive, reading whatever the agent sends.
async fn standby_for(ws: &mut Ws, vouch: bool, how_long: Duration) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + how_long;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return Ok(()),
            _ = tick.tick() => {
                if vouch {
                    send(ws, &ControllerMessage::Vouch).await?;
                } else {
                    ws.send(Message::Pong(Default::default())).await?;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(_)) => {}
                other => bail!("the agent hung up the standby link: {other:?}"),
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
    let base = format!("https://{}", listener.local_addr().expect("addr"));
    let (ca, tls) = bramble_tests::tls_identity().expect("a CA");
    let cfg = bramble_agent::Config {
        mesh_port: None,
        sync_rate: 0,
        cron_gate: None,
        controller: Some(base.clone()),
        join_token: token(&ca),
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
        certificate: None,
        ca: None,
        node: node.clone(),
        heartbeat_ms: 200,
        fence_ms: 1000,
        standby: false,
    };

    let (mut ws, hello) = accept(&listener, &tls).await.expect("first session");
    assert!(matches!(hello, AgentMessage::Hello { .. }), "{hello:?}");
    send(&mut ws, &welcome).await.expect("welcome");
    let assign = ControllerMessage::Assign {
        epochs: Default::default(),
        standby: Vec::new(),
        revision: 1,
        tasks: tasks.clone(),
    };
    send(&mut ws, &assign).await.expect("assign");
    // A live controller sends keep-alives while the containers start (a slow start must not
    // outlast the fence timeout in silence).
    let pool_id = tokio::select! {
        r = eventually(WAIT, "both tasks to run", || async {
            let (w, p) = (
                running(&rt, &wallet.task).await?,
                running(&rt, &pool.task).await?,
            );
            Ok(w.and(p))
        }) => r.expect("running"),
        r = alive_for(&mut ws, WAIT + Duration::from_secs(1)) => panic!("the keep-alives ended first: {r:?}"),
    };

    // Keep-alives alone, for longer than the fence timeout, keep the node unfenced:
    // pongs, and the pings of an older controller.
    alive_for(&mut ws, Duration::from_millis(2500))
        .await
        .expect("keep-alives");
    assert!(
        running(&rt, &wallet.task).await.expect("list").is_some(),
        "pongs count as word from the controller"
    );
    alive_with(
        &mut ws,
        Duration::from_millis(2500),
        Message::Ping(Default::default()),
    )
    .await
    .expect("pings");
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
        "fenced {took:?} after the last keep-alive (fence 1s)"
    );
    assert_eq!(
        running(&rt, &pool.task).await.expect("list"),
        Some(pool_id),
        "the service keeps running"
    );

    // The agent hangs up the silent session and dials again; its Hello tells the fence.
    let (mut ws2, hello) = accept(&listener, &tls).await.expect("second session");
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
    alive_for(&mut ws2, Duration::from_millis(700))
        .await
        .expect("keep-alives");
    assert_eq!(running(&rt, &wallet.task).await.expect("list"), None);
    let assign = ControllerMessage::Assign {
        epochs: Default::default(),
        standby: Vec::new(),
        revision: 2,
        tasks: tasks.clone(),
    };
    send(&mut ws2, &assign).await.expect("assign");
    // A live controller goes on with its keep-alives while the wallet starts.
    let deadline = Instant::now() + WAIT;
    while running(&rt, &wallet.task).await.expect("list").is_none() {
        assert!(Instant::now() < deadline, "the wallet never ran again");
        alive_for(&mut ws2, Duration::from_millis(200))
            .await
            .expect("keep-alives");
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
    let (ca, _) = bramble_tests::tls_identity().expect("a CA");
    let cfg = bramble_agent::Config {
        mesh_port: None,
        sync_rate: 0,
        cron_gate: None,
        controller: Some(format!("https://{closed}")),
        join_token: token(&ca),
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

/// A controller (the real one compromised, or one the operator was tricked into
/// pinning) asks the agent to mount the node's root, the Docker socket's directory and
/// a path with bind options in it: the agent refuses each by its own rules, reports
/// it Failed with the reason, and creates no container and no directory.
#[tokio::test]
async fn a_controller_cannot_make_the_agent_mount_what_its_rules_refuse() {
    let node = unique_name("rogue");
    let _guard = ContainerGuard::node(&node);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&node).await.expect("docker");
    let data = tempfile::tempdir().expect("temp dir");
    let allowed = tempfile::tempdir().expect("allowed dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (ca, tls) = bramble_tests::tls_identity().expect("a CA");
    let cfg = bramble_agent::Config {
        mesh_port: None,
        sync_rate: 0,
        cron_gate: None,
        controller: Some(format!("https://{}", listener.local_addr().expect("addr"))),
        join_token: token(&ca),
        node_name: node.clone(),
        data_dir: data.path().to_path_buf(),
        labels: BTreeMap::new(),
        mdns_interfaces: vec![],
        image_gc_threshold: 100,
        allow_host_paths: vec![allowed.path().to_path_buf()],
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(bramble_agent::run(cfg, async {
        let _ = stopped.await;
    }));
    let (mut ws, _) = accept(&listener, &tls).await.expect("session");
    send(
        &mut ws,
        &ControllerMessage::Welcome {
            certificate: None,
            ca: None,
            node: node.clone(),
            heartbeat_ms: 200,
            fence_ms: 5000,
            standby: false,
        },
    )
    .await
    .expect("welcome");
    let outside = std::env::temp_dir().join(unique_name("not-allowed"));
    let evil: Vec<Assignment> = [
        ("root", "/".to_string()),
        ("sock", "/var/run".to_string()),
        ("opts", format!("{}/x:/etc:rw", allowed.path().display())),
        ("outside", outside.display().to_string()),
    ]
    .into_iter()
    .map(|(name, path)| {
        let mut a = assignment(
            &format!("{name}-aaaaaa-0"),
            Kind::Service,
            &["sleep", "600"],
        );
        a.spec.volumes = vec![bramble_api::manifest::Volume {
            name: None,
            host_path: path.clone(),
            path: "/host".into(),
            read_only: false,
        }];
        a.spec_hash = a.spec.hash();
        a
    })
    .collect();
    // One allowed task alongside: the agent works, it only refuses.
    let mut fine = assignment("fine-aaaaaa-0", Kind::Service, &["sleep", "600"]);
    fine.spec.volumes = vec![bramble_api::manifest::Volume {
        name: None,
        host_path: allowed.path().join("data").display().to_string(),
        path: "/data".into(),
        read_only: false,
    }];
    fine.spec_hash = fine.spec.hash();
    let mut tasks = evil.clone();
    tasks.push(fine.clone());
    send(
        &mut ws,
        &ControllerMessage::Assign {
            epochs: Default::default(),
            standby: Vec::new(),
            revision: 1,
            tasks,
        },
    )
    .await
    .expect("assign");
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while failed.len() < evil.len() {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("every refusal reported in time");
        if let Some(Ok(Message::Text(t))) = frame {
            if let Ok(AgentMessage::Status { status }) = wire::decode::<AgentMessage>(t.as_str()) {
                if status.phase == TaskPhase::Failed {
                    failed.insert(status.task.clone(), status.message.unwrap_or_default());
                }
            }
        }
    }
    for a in &evil {
        let msg = &failed[&a.task];
        assert!(
            msg.contains("hostPath") || msg.contains("host path"),
            "{}: {msg}",
            a.task
        );
        assert_eq!(
            running(&rt, &a.task).await.expect("list"),
            None,
            "{}",
            a.task
        );
        assert!(
            rt.list()
                .await
                .expect("list")
                .iter()
                .all(|o| o.task != a.task),
            "no container at all for {}",
            a.task
        );
    }
    assert!(
        !outside.exists(),
        "no directory made outside the allowed prefix"
    );
    assert!(!allowed.path().join("x:").exists());
    eventually(WAIT, "the allowed task to run", || async {
        running(&rt, &fine.task).await
    })
    .await
    .expect("the allowed task runs");
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, agent).await;
}

// Several threads: the agent runs in this process, and a busy CI machine must not
// starve the test's keep-alives of the one thread (the fence is only 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_vouches_keep_the_wallet_running_while_the_leader_is_silent() {
    let node = unique_name("standby");
    let _guard = ContainerGuard::node(&node);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&node).await.expect("docker");
    let data = tempfile::tempdir().expect("temp dir");
    let leader = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let follower = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = |l: &TcpListener| format!("https://{}", l.local_addr().expect("addr"));
    let (ca, tls) = bramble_tests::tls_identity().expect("a CA");
    let cfg = bramble_agent::Config {
        mesh_port: None,
        sync_rate: 0,
        cron_gate: None,
        controller: Some(format!("{},{}", url(&leader), url(&follower))),
        join_token: token(&ca),
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

    // The agent dials both, and tells each it can keep a standby link; each answers
    // on its own, as controllers do.
    let welcome = |standby| ControllerMessage::Welcome {
        certificate: None,
        ca: None,
        node: node.clone(),
        heartbeat_ms: 200,
        fence_ms: 2000,
        standby,
    };
    let serve = |listener, standby| {
        let (tls, welcome) = (&tls, welcome(standby));
        async move {
            let (mut ws, hello) = accept(listener, tls).await?;
            send(&mut ws, &welcome).await?;
            anyhow::Ok((ws, hello))
        }
    };
    let (l, f) = tokio::join!(serve(&leader, false), serve(&follower, true));
    let ((mut lws, lhello), (mut fws, fhello)) =
        (l.expect("leader link"), f.expect("standby link"));
    for hello in [&lhello, &fhello] {
        assert!(
            matches!(hello, AgentMessage::Hello { standby: true, .. }),
            "{hello:?}"
        );
    }
    let wallet = assignment("ltc-bbbbbb-0", Kind::Wallet, &["sleep", "600"]);
    let assign = ControllerMessage::Assign {
        epochs: Default::default(),
        standby: Vec::new(),
        revision: 1,
        tasks: vec![wallet.clone()],
    };
    send(&mut lws, &assign).await.expect("assign");
    let id = tokio::select! {
        r = eventually(WAIT, "the wallet to run", || async { running(&rt, &wallet.task).await }) => r.expect("running"),
        r = alive_for(&mut lws, WAIT + Duration::from_secs(1)) => panic!("the keep-alives ended first: {r:?}"),
        r = standby_for(&mut fws, false, WAIT + Duration::from_secs(1)) => panic!("standby ended first: {r:?}"),
    };

    // The leader falls silent (it died): the follower's vouches keep the wallet
    // running, well past the fence timeout.
    standby_for(&mut fws, true, Duration::from_secs(5))
        .await
        .expect("vouching");
    assert_eq!(
        running(&rt, &wallet.task).await.expect("list"),
        Some(id),
        "vouched for: the same container runs on"
    );

    // The follower stops vouching (it lost the store's quorum, or the leader suspects
    // the node): its keep-alives do not count, and the wallet is fenced.
    let silent = Instant::now();
    tokio::select! {
        r = eventually(WAIT, "the fenced wallet to go", || async {
            Ok(rt.list().await?.iter().all(|o| o.task != wallet.task).then_some(()))
        }) => r.expect("fenced"),
        r = standby_for(&mut fws, false, WAIT + Duration::from_secs(1)) => panic!("standby ended first: {r:?}"),
    }
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "fenced {took:?} after the last vouch (fence 2s)"
    );
    drop(lws);
    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops")
        .expect("no panic")
        .expect("no error");
}

#[tokio::test]
async fn a_task_set_with_an_older_wallet_epoch_is_refused_whole() {
    let node = unique_name("epoch");
    let _guard = ContainerGuard::node(&node);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&node).await.expect("docker");
    let data = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (ca, tls) = bramble_tests::tls_identity().expect("a CA");
    let cfg = bramble_agent::Config {
        mesh_port: None,
        sync_rate: 0,
        cron_gate: None,
        controller: Some(format!("https://{}", listener.local_addr().expect("addr"))),
        join_token: token(&ca),
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
    let (mut ws, _) = accept(&listener, &tls).await.expect("session");
    send(
        &mut ws,
        &ControllerMessage::Welcome {
            certificate: None,
            ca: None,
            node: node.clone(),
            heartbeat_ms: 200,
            fence_ms: 5000,
            standby: false,
        },
    )
    .await
    .expect("welcome");
    let with_epoch = |epoch| {
        let mut w = assignment("ltc-cccccc-0", Kind::Wallet, &["sleep", "600"]);
        w.epoch = Some(epoch);
        w
    };
    let pool = assignment("pool-cccccc-0", Kind::Service, &["sleep", "600"]);
    let assign = |revision, tasks| ControllerMessage::Assign {
        epochs: Default::default(),
        standby: Vec::new(),
        revision,
        tasks,
    };
    send(&mut ws, &assign(1, vec![with_epoch(5), pool.clone()]))
        .await
        .expect("assign");
    tokio::select! {
        r = eventually(WAIT, "both to run", || async {
            Ok(running(&rt, "ltc-cccccc-0").await?.and(running(&rt, &pool.task).await?))
        }) => r.expect("running"),
        r = alive_for(&mut ws, WAIT + Duration::from_secs(1)) => panic!("the keep-alives ended first: {r:?}"),
    };

    // A set with an older placement of the wallet (and without the pool): refused as a
    // whole, so the pool keeps running.
    send(&mut ws, &assign(2, vec![with_epoch(3)]))
        .await
        .expect("assign");
    alive_for(&mut ws, Duration::from_millis(1500))
        .await
        .expect("keep-alives");
    assert!(
        running(&rt, &pool.task).await.expect("list").is_some(),
        "the stale set was not applied"
    );

    // A newer one is applied: the pool goes.
    send(&mut ws, &assign(3, vec![with_epoch(6)]))
        .await
        .expect("assign");
    tokio::select! {
        r = eventually(WAIT, "the pool to go", || async {
            Ok(running(&rt, &pool.task).await?.is_none().then_some(()))
        }) => r.expect("gone"),
        r = alive_for(&mut ws, WAIT + Duration::from_secs(1)) => panic!("the keep-alives ended first: {r:?}"),
    };
    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops")
        .expect("no panic")
        .expect("no error");
}
