//! Serving HTTP over TLS with bounds, so that no client can starve the others (an agent
//! that cannot reconnect fences its wallets):
//! - a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`], and when more than
//!   [`MAX_HANDSHAKES`] are under way the oldest is dropped (a flood of half-open
//!   connections costs its sender, not the cluster);
//! - a request's headers must arrive within [`HEADER_TIMEOUT`];
//! - at most [`MAX_CONNECTIONS`] connections are open at once; the file-descriptor limit
//!   is raised to allow them.
//!
//! Plain HTTP is not served: a client that speaks it gets a failed handshake.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; beyond, the oldest is dropped.
pub const MAX_HANDSHAKES: usize = 256;
/// The longest a request's headers may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; beyond, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long shutdown waits for open connections to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Handshakes under way, oldest first, each with the means to drop it.
#[derive(Default)]
struct Handshakes {
    next: AtomicU64,
    pending: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Handshakes {
    /// Registers a handshake; drops the oldest one when there are too many.
    fn start(&self) -> (u64, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.push_back((id, tx));
        while p.len() > MAX_HANDSHAKES {
            if let Some((_, oldest)) = p.pop_front() {
                let _ = oldest.send(());
            }
        }
        (id, rx)
    }

    fn done(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }
}

/// Raises this process's open-file limit to its hard limit (the default soft limit of
/// 1024 is below what [`MAX_CONNECTIONS`] needs).
pub fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes; then stops
/// accepting, asks open connections to finish and waits for them a little.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(Handshakes::default());
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or the like: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(peer = %addr, "too many connections; closing a new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handshakes = Arc::clone(&handshakes);
        let router = router.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (id, dropped) = handshakes.start();
            let stream = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
                _ = dropped => {
                    tracing::debug!(peer = %addr, "dropping an unfinished handshake for a newer one");
                    return;
                }
            };
            handshakes.done(id);
            let stream = match stream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            // The watch guard is dropped inside the branch, before anything awaits.
            let stopping = async move { stop.wait_for(|s| *s).await.is_ok() };
            let stopped = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                    }
                    false
                }
                _ = stopping => true,
            };
            if stopped {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, conn).await;
            }
        });
    }
    let _ = stop_tx.send(true);
    // Every connection holds a permit: when all are back, all have ended.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        DRAIN + Duration::from_secs(1),
        connections.acquire_many(all),
    )
    .await;
    Ok(())
}
