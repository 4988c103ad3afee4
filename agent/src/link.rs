//! The link to the controller: one outbound WebSocket, re-dialled with back-off.
//!
//! While the link is down the agent keeps running what it has (static stability); the
//! supervisor only acts on task sets the controller actually sent. On every (re)connect
//! the agent says Hello with the tasks it observes in Docker, so the controller's view
//! is rebuilt from facts rather than from messages that may have been lost.
//!
//! The one exception is fencing (see [`crate::fence`]): every frame from the controller
//! (text, ping or pong) is noted in the fence clock, which runs from agent start. After
//! the fence timeout of silence the node's Wallets are stopped, and the session hangs
//! up and dials again, since only a task set sent on a session welcomed after the fence
//! lifts it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::backoff::{Backoff, Retry};
use bramble_api::duration::Duration as ApiDuration;
use bramble_api::manifest::{Arch, Kind};
use bramble_api::task::container_name;
use bramble_api::wire::{self, AgentMessage, ControllerMessage, NodeInfo};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::fence::{self, Contact, SharedContact};
use crate::host_paths::Policy as HostPaths;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::supervisor::{Desired, Supervisor};
use crate::{Config, Error};

/// How often the node is measured; heartbeats in between repeat the last measurement.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// The longest wait between two dial attempts.
const MAX_REDIAL: Duration = Duration::from_secs(5);

/// Redials back off from 200 ms to [`MAX_REDIAL`], and start over at 200 ms after a
/// session the controller welcomed (it was a working link).
const REDIAL: Backoff = Backoff::new(Duration::from_millis(200), MAX_REDIAL);

/// After a refusal (bad join token, node refused) every wait is [`MAX_REDIAL`] until a
/// session is welcomed: retrying faster would not change the controller's mind.
const REFUSED: Backoff = Backoff::new(MAX_REDIAL, MAX_REDIAL);

/// Up to this much is added to each redial wait, so that agents that lost the
/// controller together do not all dial at the same instant.
const REDIAL_JITTER_MS: u64 = 200;

/// The longest wait for the connection, the Hello to go out and the Welcome to come
/// back: a partitioned network answers a TCP connect with silence, not a refusal.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one mDNS search for the controller lasts before the next dial attempt.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `http://host:port[/]` → `ws://host:port/v1/agent` (and https → wss).
pub fn agent_url(base: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::ControllerUrl {
        url: base.to_string(),
        reason: reason.to_string(),
    };
    // The scheme first: trimming slashes before would eat the `//` of a bare `http://`.
    let host = if let Some(r) = base.strip_prefix("http://") {
        r
    } else if let Some(r) = base.strip_prefix("ws://") {
        r
    } else if base.starts_with("https://") || base.starts_with("wss://") {
        return Err(bad(
            "TLS is not supported by this agent build; use http:// on a trusted network",
        ));
    } else if base.contains("://") {
        return Err(bad("expected an http:// URL"));
    } else {
        base
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad("expected http://HOST:PORT"));
    }
    Ok(format!("ws://{host}/v1/agent"))
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the controller rejected the join token (HTTP 401); check --join-token")]
    Unauthorized,
    #[error("the controller refused this agent: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("link lost: {0}")]
    Lost(String),
    #[error("docker: {0}")]
    Runtime(#[from] crate::runtime::Error),
}

/// Runs the supervisor and keeps the link up until `shutdown`. `url` is the controller's
/// agent URL (see [`agent_url`]); without one, each dial attempt looks for the
/// controller over mDNS first. Either way the supervisor and the fence clock run from
/// the start, so an agent that never reaches a controller still fences its Wallets.
pub async fn run(
    cfg: Config,
    url: Option<String>,
    host_paths: HostPaths,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    tracing::info!(host_paths = %host_paths, "host path rules");
    let runtime = Runtime::connect(&cfg.node_name)
        .await?
        .with_host_paths(host_paths);
    let docker_version = runtime.version().await?;
    let metrics = Metrics::new();
    metrics.watch(&runtime, &cfg.data_dir);
    let memory_limits = crate::host::memory_limits(&runtime).await;
    let mut warnings = Vec::new();
    if memory_limits == Some(false) {
        // Loud: every `resources.memory` on this node is silently ignored by Docker.
        tracing::error!(
            fix = crate::host::MEMORY_LIMITS_WARNING,
            "MEMORY LIMITS ARE NOT ENFORCED on this node: the kernel's memory cgroup is disabled"
        );
        warnings.push(crate::host::MEMORY_LIMITS_WARNING.to_string());
    }
    let info = NodeInfo {
        name: cfg.node_name.clone(),
        arch: Arch::current().unwrap_or(Arch::Amd64),
        cores: metrics.cores(),
        memory_bytes: metrics.memory_total(),
        docker_version,
        labels: cfg.labels.clone(),
        agent_version: bramble_api::VERSION.to_string(),
        os: Metrics::os(),
        machine_id: crate::host::machine_id(),
        memory_limits,
        warnings,
    };
    tracing::info!(node = %info.name, machine_id = info.machine_id.as_deref().unwrap_or("unknown"), arch = %info.arch, docker = %info.docker_version, controller = url.as_deref().unwrap_or("(mDNS)"), "agent starting");

    let contact: SharedContact = Arc::new(Mutex::new(Contact::new(fence::now())));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (out_tx, mut out_rx) = mpsc::channel::<AgentMessage>(1024);
    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let supervisor = Supervisor::new(runtime.clone(), cfg.node_name.clone(), out_tx);
    let observer = supervisor.observer();
    let mut sup_stop = stop_rx.clone();
    let sup = tokio::spawn(supervisor.run(desired_rx, async move {
        let _ = sup_stop.changed().await;
    }));
    let fencer = tokio::spawn(fence::watch(Arc::clone(&contact), {
        let desired_tx = desired_tx.clone();
        move || desired_tx.send_modify(|d| d.fenced = true)
    }));
    let image_gc = tokio::spawn(crate::disk::watch(runtime.clone(), cfg.image_gc_threshold));

    let mut shutdown = std::pin::pin!(shutdown);
    let mut metrics = metrics;
    let mut redial = Retry::new(REDIAL);
    loop {
        let welcomed_before = fence::lock(&contact).session();
        let attempt = async {
            let url = match &url {
                Some(u) => u.clone(),
                None => discover(&cfg).await?,
            };
            session(
                &cfg,
                &url,
                &info,
                &runtime,
                &observer,
                &mut out_rx,
                &desired_tx,
                &contact,
                &mut metrics,
            )
            .await
        };
        let result = tokio::select! {
            () = &mut shutdown => break,
            r = attempt => r,
        };
        let welcomed = fence::lock(&contact).session() > welcomed_before;
        let refused = matches!(
            result,
            Err(SessionError::Unauthorized | SessionError::Refused { .. })
        );
        let delay = next_redial(&mut redial, welcomed, refused);
        match result {
            Ok(()) => {}
            Err(e) if refused => {
                tracing::error!(error = %e, retry_in = ?delay, "controller refused the agent; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "controller link down; containers keep running")
            }
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % REDIAL_JITTER_MS);
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay + jitter) => {}
        }
    }
    fencer.abort();
    image_gc.abort();
    let _ = stop_tx.send(true);
    let _ = sup.await;
    tracing::info!("agent stopped; containers left running");
    Ok(())
}

/// The wait before the next dial, after a session that ended (`welcomed`: the
/// controller had welcomed it; `refused`: the controller refused the agent). Without
/// jitter; pure, so the schedule is tested.
fn next_redial(redial: &mut Retry, welcomed: bool, refused: bool) -> Duration {
    if welcomed {
        *redial = Retry::new(REDIAL);
    }
    if refused {
        *redial = Retry::new(REFUSED);
    }
    redial.failed()
}

/// One mDNS search for the controller; its agent URL.
async fn discover(cfg: &Config) -> Result<String, SessionError> {
    tracing::info!("no --controller given; looking for one over mDNS (_bramble._tcp.local.)");
    let found = crate::discovery::discover(DISCOVERY_TIMEOUT, &cfg.mdns_interfaces)
        .await
        .map_err(|e| SessionError::Connect(crate::runtime::error_chain(&e)))?;
    agent_url(&found).map_err(|e| SessionError::Connect(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &Config,
    url: &str,
    info: &NodeInfo,
    runtime: &Runtime,
    observer: &crate::supervisor::Observer,
    out_rx: &mut mpsc::Receiver<AgentMessage>,
    desired_tx: &watch::Sender<Desired>,
    contact: &SharedContact,
    metrics: &mut Metrics,
) -> Result<(), SessionError> {
    let mut req = url
        .into_client_request()
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {}", cfg.join_token)).map_err(|_| {
        SessionError::Connect("the join token has characters not allowed in a header".into())
    })?;
    req.headers_mut().insert("authorization", auth);
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| {
            SessionError::Connect(format!(
                "no answer within {}",
                ApiDuration::from(HANDSHAKE_TIMEOUT)
            ))
        })?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401 => {
                SessionError::Unauthorized
            }
            e => SessionError::Connect(e.to_string()),
        })?;
    let (mut sink, mut stream) = ws.split();

    // Reports queued while the link was down are superseded by the Hello.
    while out_rx.try_recv().is_ok() {}
    let tasks = observer.observe().await?;
    let hello = AgentMessage::Hello {
        node: info.clone(),
        tasks,
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.send(Message::text(frame(hello))))
        .await
        .map_err(|_| SessionError::Lost("the hello could not be sent".into()))?
        .map_err(|e| SessionError::Lost(e.to_string()))?;

    let (heartbeat, session, fence) = loop {
        let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.next())
            .await
            .map_err(|_| SessionError::Lost("no welcome within 10s".into()))?;
        if let Some(Ok(_)) = &frame {
            fence::lock(contact).heard(fence::now());
        }
        match frame {
            Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str()) {
                Ok(ControllerMessage::Welcome {
                    heartbeat_ms,
                    fence_ms,
                    ..
                }) => {
                    // Used as given, even if tiny: a longer fence than the controller
                    // assumes would break its failover timing (see `fence`).
                    let fence = Duration::from_millis(fence_ms);
                    let session = fence::lock(contact).welcomed(fence::now(), fence);
                    break (Duration::from_millis(heartbeat_ms.max(100)), session, fence);
                }
                Ok(ControllerMessage::Error { code, message }) => {
                    return Err(SessionError::Refused { code, message })
                }
                Ok(other) => tracing::debug!(?other, "ignoring message before welcome"),
                Err(e) => return Err(SessionError::Lost(e.to_string())),
            },
            Some(Ok(Message::Close(_))) | None => {
                return Err(SessionError::Lost("closed before welcome".into()))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(SessionError::Lost(e.to_string())),
        }
    };
    tracing::info!(node = %info.name, session, fence_ms = fence.as_millis(), "connected to controller");

    let (log_tx, mut log_rx) = mpsc::channel::<AgentMessage>(256);
    let mut logs: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(fence::CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A send that blocks this long means the link is gone (a full socket buffer).
    let send_timeout = fence.max(fence::CHECK_EVERY);
    let mut sampled: Option<(std::time::Instant, bramble_api::wire::NodeMetrics)> = None;
    let result = loop {
        let outgoing = tokio::select! {
            _ = ticker.tick() => {
                // Heartbeats are frequent (fast failover); measuring is not: a Pi's CPU
                // is for its tasks, and the dashboard draws 10-second points.
                let stale = sampled.as_ref().is_none_or(|(at, _)| at.elapsed() >= METRICS_EVERY);
                if stale {
                    sampled = Some((std::time::Instant::now(), metrics.sample()));
                }
                let m = sampled.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
                AgentMessage::Heartbeat { metrics: m }
            }
            _ = check.tick() => {
                let c = fence::lock(contact);
                if c.must_redial(session, fence::now()) {
                    let why = if c.is_fenced() {
                        "the node is fenced; dialling again for a fresh task set".to_string()
                    } else {
                        format!("no word from the controller for {}", ApiDuration::from(c.fence()))
                    };
                    break Err(SessionError::Lost(why));
                }
                continue;
            }
            Some(m) = out_rx.recv() => m,
            Some(m) = log_rx.recv() => m,
            frame = stream.next() => {
                if let Some(Ok(_)) = &frame {
                    // Pings count too: tungstenite answers them, but they still show up here.
                    fence::lock(contact).heard(fence::now());
                }
                match frame {
                    Some(Ok(Message::Text(t))) => match wire::decode::<ControllerMessage>(t.as_str()) {
                        Ok(ControllerMessage::Assign { revision, tasks }) => {
                            tracing::debug!(revision, tasks = tasks.len(), "task set received");
                            let wallets = tasks.iter().filter(|a| a.kind == Kind::Wallet).count();
                            let count = tasks.len();
                            // Decided and published under the contact lock, as the fence
                            // watcher does, so the two never disagree.
                            let unfenced = {
                                let mut c = fence::lock(contact);
                                let unfenced = c.assigned(session);
                                desired_tx.send_modify(|d| {
                                    d.tasks = Some(tasks);
                                    if unfenced {
                                        d.fenced = false;
                                    }
                                });
                                unfenced
                            };
                            if unfenced {
                                tracing::warn!(session, revision, tasks = count, wallets, "wallets unfenced: the controller sent a fresh task set");
                            }
                        }
                        Ok(ControllerMessage::Logs { request, task, follow, tail }) => {
                            logs.retain(|_, h| !h.is_finished());
                            let name = container_name(&info.name, &task);
                            let h = tokio::spawn(stream_logs(runtime.clone(), request, task, name, follow, tail, log_tx.clone()));
                            logs.insert(request, h);
                        }
                        Ok(ControllerMessage::CancelLogs { request }) => {
                            if let Some(h) = logs.remove(&request) {
                                h.abort();
                            }
                        }
                        Ok(ControllerMessage::Error { code, message }) => tracing::warn!(code = %code, message = %message, "controller reported an error"),
                        Ok(ControllerMessage::Welcome { .. }) => {}
                        Err(e) => tracing::warn!(error = %e, "ignoring a frame the agent does not understand"),
                    },
                    Some(Ok(Message::Close(_))) | None => break Err(SessionError::Lost("closed by the controller".into())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Err(SessionError::Lost(e.to_string())),
                }
                continue;
            }
        };
        match tokio::time::timeout(send_timeout, sink.send(Message::text(frame(outgoing)))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Err(SessionError::Lost(e.to_string())),
            Err(_) => {
                break Err(SessionError::Lost(format!(
                    "a send blocked for {}",
                    ApiDuration::from(send_timeout)
                )))
            }
        }
    };
    for (_, h) in logs {
        h.abort();
    }
    result
}

/// A message as a frame, cut to the wire's limits first (see [`wire`]'s Limits): what
/// this node measures or is told by Docker may be odd (a many-core machine, a long error
/// text), and the controller refuses a message beyond a limit as a whole.
fn frame(mut msg: AgentMessage) -> String {
    // Said once loudly: a machine that needs it once (many cores) needs it every beat.
    static WARNED: AtomicBool = AtomicBool::new(false);
    if msg.cap() {
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                kind = msg_kind(&msg),
                "a message was cut to the wire's limits"
            );
        } else {
            tracing::warn!(
                kind = msg_kind(&msg),
                "a message was cut to the wire's limits"
            );
        }
    }
    wire::encode(&msg)
}

fn msg_kind(msg: &AgentMessage) -> &'static str {
    match msg {
        AgentMessage::Hello { .. } => "hello",
        AgentMessage::Heartbeat { .. } => "heartbeat",
        AgentMessage::Status { .. } => "status",
        AgentMessage::Removed { .. } => "removed",
        AgentMessage::LogData { .. } => "logData",
        AgentMessage::LogEnd { .. } => "logEnd",
    }
}

/// Streams a task's container logs back to the controller.
#[allow(clippy::too_many_arguments)]
async fn stream_logs(
    runtime: Runtime,
    request: u64,
    task: String,
    container: String,
    follow: bool,
    tail: Option<u32>,
    tx: mpsc::Sender<AgentMessage>,
) {
    let error = match runtime.logs(&container, follow, tail).await {
        Ok(stream) => {
            let mut stream = std::pin::pin!(stream);
            let mut error = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(data) => {
                        if tx
                            .send(AgentMessage::LogData { request, data })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            error
        }
        Err(e) => Some(format!("cannot read logs of task {task}: {e}")),
    };
    let _ = tx.send(AgentMessage::LogEnd { request, error }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redials_back_off_to_5s_start_over_after_a_welcome_and_stay_slow_after_a_refusal() {
        let ms = Duration::from_millis;
        let mut r = Retry::new(REDIAL);
        let waits: Vec<Duration> = (0..7).map(|_| next_redial(&mut r, false, false)).collect();
        assert_eq!(
            waits,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(next_redial(&mut r, true, false), ms(200), "a working link");
        assert_eq!(next_redial(&mut r, false, false), ms(400));
        assert_eq!(next_redial(&mut r, false, true), MAX_REDIAL, "refused");
        assert_eq!(
            next_redial(&mut r, false, false),
            MAX_REDIAL,
            "slow until a session is welcomed"
        );
        assert_eq!(next_redial(&mut r, true, false), ms(200));
    }

    #[test]
    fn the_redial_schedule_is_the_one_the_link_had_before_the_shared_backoff() {
        // The link's own arithmetic before it used `Backoff`: reset on a welcome, jump to
        // the cap on a refusal, wait, then double up to the cap.
        fn before(delay: &mut Duration, welcomed: bool, refused: bool) -> Duration {
            if welcomed {
                *delay = Duration::from_millis(200);
            }
            if refused {
                *delay = MAX_REDIAL;
            }
            let wait = *delay;
            *delay = (*delay * 2).min(MAX_REDIAL);
            wait
        }
        // Every sequence of 8 session endings (of 4 kinds) gives the same waits.
        for n in 0..4u32.pow(8) {
            let mut old = Duration::from_millis(200);
            let mut new = Retry::new(REDIAL);
            for i in 0..8 {
                let kind = (n >> (2 * i)) & 3;
                let (welcomed, refused) = (kind & 1 == 1, kind & 2 == 2);
                assert_eq!(
                    next_redial(&mut new, welcomed, refused),
                    before(&mut old, welcomed, refused),
                    "sequence {n:#x}, step {i}"
                );
            }
        }
    }

    #[test]
    fn what_the_agent_sends_is_cut_to_the_limits_the_controller_checks() {
        // A machine with more cores than a heartbeat may carry, and a long Docker error.
        let beat = AgentMessage::Heartbeat {
            metrics: wire::NodeMetrics {
                cores_percent: Some(vec![1.5; 300]),
                ..Default::default()
            },
        };
        let status = AgentMessage::Status {
            status: wire::TaskStatus {
                task: "web-0123ab-0".into(),
                phase: bramble_api::task::TaskPhase::Starting,
                exit_code: None,
                message: Some("cannot create container: ".repeat(1000)),
                container_id: None,
                restarts: 0,
                ready: None,
                started_at: None,
                finished_at: None,
                gave_up: false,
                output: None,
            },
        };
        for msg in [beat, status] {
            assert!(msg.validate().is_err(), "over a limit before");
            let text = frame(msg);
            assert!(wire::decode_agent(&text).is_ok(), "{}", &text[..100]);
        }
        assert!(crate::host::MEMORY_LIMITS_WARNING.len() <= wire::MAX_WARNING_BYTES);
    }

    #[test]
    fn controller_urls() {
        let ok = |u: &str| agent_url(u).expect("valid");
        assert_eq!(ok("http://10.0.0.1:7878"), "ws://10.0.0.1:7878/v1/agent");
        assert_eq!(ok("http://pi1.local:7878/"), "ws://pi1.local:7878/v1/agent");
        assert_eq!(ok("127.0.0.1:7878"), "ws://127.0.0.1:7878/v1/agent");
        assert_eq!(ok("ws://pi1:7878//"), "ws://pi1:7878/v1/agent");
        for bad in [
            "ftp://x",
            "http://",
            "http:///",
            "ws://",
            "https://x:1",
            "http://a b",
            "http://a/b",
            "",
        ] {
            assert!(agent_url(bad).is_err(), "{bad}");
        }
    }
}
