//! The userspace proxy behind every workload's stable address, on every node
//! ([`bramble_api::endpoints`]). No IPVS, VXLAN or overlay network: Pi kernels often
//! lack them, and IPVS drops idle connections that stratum-to-wallet RPC sockets keep.
//!
//! - The workloads' range is made local to the node (`ip route replace local RANGE dev
//!   lo`), so the agent can listen on any address of it and containers reach those
//!   addresses through their default gateway, the node.
//! - For each workload address and declared TCP port, a listener. A new connection
//!   goes to the next Ready instance (round robin): straight to the container when it
//!   runs on this node, else through the other node's agent ([`crate::mesh`]). An
//!   instance that does not answer is skipped for the next.
//! - A connection whose instance leaves the table (a Wallet moved, a replica removed)
//!   is closed, so its client reconnects to the live one. Instances that merely fail
//!   readiness keep the connections they have and get no new ones.
//! - The mesh port: connections from other agents for this node's instances.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::endpoints::{AddressRange, Backend, Table};
use bramble_api::task::container_name;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::mesh::Mesh;
use crate::routes::Routes;
use crate::runtime::Runtime;

/// A connection to a container on this node.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often listeners that could not be opened are tried again.
const RETRY_LISTEN: Duration = Duration::from_secs(5);

/// Why the proxy cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The range could not be made local.
    #[error("cannot make the workload addresses {range} local to this node (`ip route replace local {range} dev lo`): {why}")]
    Route {
        /// The range.
        range: AddressRange,
        /// What `ip` said.
        why: String,
    },
}

/// Makes every address of `range` local to this node, so the agent can listen on
/// them. Idempotent.
pub async fn make_local(range: AddressRange) -> Result<(), ProxyError> {
    let fail = |why: String| ProxyError::Route { range, why };
    let out = tokio::process::Command::new("ip")
        .args(["route", "replace", "local", &range.to_string(), "dev", "lo"])
        .output()
        .await
        .map_err(|e| fail(format!("cannot run ip (install iproute2): {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// The proxy of one node.
pub struct Proxy {
    node: String,
    routes: Routes,
    mesh: Arc<Mesh>,
    runtime: Runtime,
    /// Round-robin position per workload address.
    next: Mutex<HashMap<Ipv4Addr, usize>>,
}

impl Proxy {
    /// The proxy of `node`.
    pub fn new(node: String, routes: Routes, mesh: Arc<Mesh>, runtime: Runtime) -> Arc<Proxy> {
        Arc::new(Proxy {
            node,
            routes,
            mesh,
            runtime,
            next: Mutex::new(HashMap::new()),
        })
    }

    /// Keeps a listener on every workload address and port of the table, until aborted.
    pub async fn listen(self: Arc<Self>) {
        let mut rx = self.routes.subscribe();
        let mut open: HashMap<(Ipv4Addr, u16), JoinHandle<()>> = HashMap::new();
        loop {
            let table = rx.borrow_and_update().clone();
            let wanted: Vec<(Ipv4Addr, u16)> = table
                .endpoints
                .iter()
                .flat_map(|e| e.ports.iter().map(move |p| (e.address, *p)))
                .collect();
            open.retain(|key, task| {
                let keep = wanted.contains(key) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            let mut failed = 0;
            for key in wanted {
                if open.contains_key(&key) {
                    continue;
                }
                match TcpListener::bind(key).await {
                    Ok(l) => {
                        tracing::debug!(address = %key.0, port = key.1, "serving a workload address");
                        open.insert(key, tokio::spawn(Arc::clone(&self).accept(l, key.0, key.1)));
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(address = %key.0, port = key.1, error = %e, "cannot serve a workload address; trying again");
                    }
                }
            }
            let retry = async {
                if failed > 0 {
                    tokio::time::sleep(RETRY_LISTEN).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                () = retry => {}
            }
        }
        for (_, task) in open {
            task.abort();
        }
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, address: Ipv4Addr, port: u16) {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(Arc::clone(&self).forward(client, address, port));
                }
                Err(e) => {
                    tracing::debug!(%address, port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The Ready instances of the workload at `address`, starting at the next one in
    /// turn.
    fn candidates(&self, table: &Table, address: Ipv4Addr) -> Vec<Backend> {
        let Some(e) = table.at(address) else {
            return Vec::new();
        };
        let ready: Vec<Backend> = e.ready().cloned().collect();
        if ready.is_empty() {
            return ready;
        }
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let n = next.entry(address).or_insert(0);
            let start = *n % ready.len();
            *n = n.wrapping_add(1);
            start
        };
        ready
            .iter()
            .cycle()
            .skip(start)
            .take(ready.len())
            .cloned()
            .collect()
    }

    async fn forward(self: Arc<Self>, client: TcpStream, address: Ipv4Addr, port: u16) {
        let mut rx = self.routes.subscribe();
        let table = rx.borrow_and_update().clone();
        let name = table
            .at(address)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let candidates = self.candidates(&table, address);
        if candidates.is_empty() {
            tracing::debug!(workload = %name, port, "no Ready instance; closing the connection");
            return;
        }
        for b in candidates {
            if b.node == self.node {
                match self.open_local(&b.task, port).await {
                    Ok(stream) => return splice(client, stream, rx, address, b.task).await,
                    Err(why) => {
                        tracing::debug!(workload = %name, task = %b.task, port, why, "instance on this node did not answer; trying the next");
                    }
                }
                continue;
            }
            let Some(mesh) = b.mesh.as_deref() else {
                continue;
            };
            match self.mesh.dial(mesh, &b.node, &b.task, port).await {
                Ok(stream) => return splice(client, stream, rx, address, b.task).await,
                Err(e) => {
                    tracing::debug!(workload = %name, task = %b.task, node = %b.node, port, error = %e, "instance on another node did not answer; trying the next");
                }
            }
        }
        tracing::info!(workload = %name, port, "no instance answered; closing the connection");
    }

    /// Connects to `port` of this node's container of `task`.
    async fn open_local(&self, task: &str, port: u16) -> Result<TcpStream, String> {
        let container = container_name(&self.node, task);
        let ip: IpAddr = self
            .runtime
            .address(&container)
            .await
            .map_err(|e| bramble_api::error_chain(&e))?
            .ok_or_else(|| format!("container {container} has no address"))?;
        let addr = SocketAddr::new(ip, port);
        let stream = tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("{addr}: no answer within {LOCAL_CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Serves other agents on the mesh port, until aborted.
    pub async fn serve_mesh(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "mesh accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let (mut stream, task, port) = match me.mesh.accept(tcp).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "refused a connection on the agent-to-agent port");
                        return;
                    }
                };
                let mut rx = me.routes.subscribe();
                let table = rx.borrow_and_update().clone();
                let served = table.endpoints.iter().find(|e| {
                    e.ports.contains(&port)
                        && e.backends
                            .iter()
                            .any(|b| b.task == task && b.node == me.node)
                });
                let Some(address) = served.map(|e| e.address) else {
                    let _ = crate::mesh::answer(
                        &mut stream,
                        &Err(format!("no task {task} with port {port} on this node")),
                    )
                    .await;
                    return;
                };
                match me.open_local(&task, port).await {
                    Ok(local) => {
                        if crate::mesh::answer(&mut stream, &Ok(())).await.is_ok() {
                            splice(stream, local, rx, address, task).await;
                        }
                    }
                    Err(why) => {
                        let _ = crate::mesh::answer(&mut stream, &Err(why)).await;
                    }
                }
            });
        }
    }
}

/// Copies both ways until either side closes, or until `task` leaves the table at
/// `address` (then both are closed, so the client reconnects to the live instance).
async fn splice<A, B>(
    mut a: A,
    mut b: B,
    mut rx: watch::Receiver<Arc<Table>>,
    address: Ipv4Addr,
    task: String,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let gone = async {
        loop {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let table = rx.borrow_and_update().clone();
            let present = table
                .at(address)
                .is_some_and(|e| e.backends.iter().any(|b| b.task == task));
            if !present {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
        () = gone => {
            tracing::info!(%address, task = %task, "instance left the table; closing its connection so the client reconnects");
        }
    }
}
