//! The userspace proxy behind every workload's stable address, on every node
//! ([`bramble_api::endpoints`]). No IPVS, VXLAN or overlay network: Pi kernels often
//! lack them, and IPVS drops idle connections that stratum-to-wallet RPC sockets keep.
//!
//! - The workloads' range lives in a network namespace of the agent's own
//!   ([`Namespace`]), routed from the node: the agent listens on any address of it
//!   without taking ports from the node, and containers reach those addresses through
//!   their default gateway, the node.
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
use futures_util::StreamExt;
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
    /// The proxy's network namespace could not be made.
    #[error(
        "cannot set up the network namespace that serves the workload addresses {range}: {why}"
    )]
    Namespace {
        /// The range.
        range: AddressRange,
        /// What failed.
        why: String,
    },
}

/// The network namespace the workload addresses live in, joined to the node by a veth
/// pair (`bramble0` on the node, `bramble1` inside). Its own port space keeps a
/// workload address's listener on port P from taking P from the node, where a
/// container may publish it as a host port. Containers reach it through their default
/// gateway, the node, which routes the range to `bramble1`.
///
/// One thread of the agent lives in that namespace, and every listening socket is made
/// there (sockets stay in the namespace they were made in).
pub struct Namespace {
    tx: std::sync::mpsc::Sender<Request>,
}

enum Request {
    Tcp(
        SocketAddr,
        tokio::sync::oneshot::Sender<std::io::Result<std::net::TcpListener>>,
    ),
    Udp(
        SocketAddr,
        tokio::sync::oneshot::Sender<std::io::Result<std::net::UdpSocket>>,
    ),
}

/// The node's end of the link.
pub const NODE_LINK: &str = "bramble0";
const INNER_LINK: &str = "bramble1";

/// The link's addresses: the last /30 of the range, which no workload gets.
fn link_addresses(range: AddressRange) -> (Ipv4Addr, Ipv4Addr) {
    let last = range.len() - 4;
    let at = |i| range.nth(last + i).unwrap_or(range.base);
    (at(1), at(2))
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Namespace {
    /// Makes the namespace, the link and the routes for `range`.
    pub async fn create(range: AddressRange) -> Result<Namespace, ProxyError> {
        tokio::task::spawn_blocking(move || Namespace::create_blocking(range))
            .await
            .map_err(|e| ProxyError::Namespace {
                range,
                why: e.to_string(),
            })?
    }

    fn create_blocking(range: AddressRange) -> Result<Namespace, ProxyError> {
        let fail = |why: String| ProxyError::Namespace { range, why };
        let (node_ip, inner_ip) = link_addresses(range);
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<i32, String>>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("bramble-names".into())
            .spawn(move || {
                // Safe for NEWNET: the deprecation is about unsharing the file table.
                #[allow(deprecated)]
                let unshared = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET);
                if let Err(e) = unshared {
                    let _ = ready_tx.send(Err(format!("unshare: {e} (the agent runs as root)")));
                    return;
                }
                let tid = rustix::thread::gettid().as_raw_nonzero().get();
                // Commands this thread starts run in its namespace.
                let inside = |args: &[&str]| run(args);
                // The node's side moves the inner link in, then says go.
                if ready_tx.send(Ok(tid)).is_err() || go_rx.recv().is_err() {
                    return;
                }
                let setup = (|| {
                    inside(&["link", "set", "lo", "up"])?;
                    inside(&["addr", "add", &format!("{inner_ip}/30"), "dev", INNER_LINK])?;
                    inside(&["link", "set", INNER_LINK, "up"])?;
                    inside(&["route", "add", "local", &range.to_string(), "dev", "lo"])?;
                    inside(&["route", "add", "default", "via", &node_ip.to_string()])
                })();
                let _ = ready_tx.send(setup.map(|()| tid));
                while let Ok(req) = rx.recv() {
                    match req {
                        Request::Tcp(addr, reply) => {
                            let _ = reply.send(std::net::TcpListener::bind(addr).and_then(|l| {
                                l.set_nonblocking(true)?;
                                Ok(l)
                            }));
                        }
                        Request::Udp(addr, reply) => {
                            let _ = reply.send(std::net::UdpSocket::bind(addr).and_then(|s| {
                                s.set_nonblocking(true)?;
                                Ok(s)
                            }));
                        }
                    }
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        let tid = ready_rx
            .recv()
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        // A link left by an agent that was killed went with its namespace; one left
        // otherwise is replaced.
        let _ = run(&["link", "del", NODE_LINK]);
        let _ = run(&[
            "route",
            "del",
            "local",
            &range.to_string(),
            "dev",
            "lo",
            "table",
            "local",
        ]);
        run(&[
            "link",
            "add",
            NODE_LINK,
            "type",
            "veth",
            "peer",
            "name",
            INNER_LINK,
            "netns",
            &tid.to_string(),
        ])
        .map_err(fail)?;
        // The inside is set up once its link is there.
        go_tx.send(()).map_err(|e| fail(e.to_string()))?;
        let inner = ready_rx.recv().map_err(|e| fail(e.to_string()))?;
        inner.map_err(fail)?;
        run(&["addr", "add", &format!("{node_ip}/30"), "dev", NODE_LINK]).map_err(fail)?;
        run(&["link", "set", NODE_LINK, "up"]).map_err(fail)?;
        run(&[
            "route",
            "replace",
            &range.to_string(),
            "via",
            &inner_ip.to_string(),
            "dev",
            NODE_LINK,
        ])
        .map_err(fail)?;
        tracing::info!(%range, link = NODE_LINK, "workload addresses are served in the agent's own network namespace");
        Ok(Namespace { tx })
    }

    /// A TCP listener at `addr`, in the namespace.
    pub async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::from_std(self.ask(|reply| Request::Tcp(addr, reply)).await?)
    }

    /// A UDP socket at `addr`, in the namespace.
    pub async fn udp(&self, addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        tokio::net::UdpSocket::from_std(self.ask(|reply| Request::Udp(addr, reply)).await?)
    }

    /// Has the namespace's thread make a socket.
    async fn ask<T: Send + 'static>(
        &self,
        request: impl FnOnce(tokio::sync::oneshot::Sender<std::io::Result<T>>) -> Request,
    ) -> std::io::Result<T> {
        let gone = || std::io::Error::other("the names thread is gone");
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(request(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// The proxy of one node.
pub struct Proxy {
    node: String,
    routes: Routes,
    mesh: Arc<Mesh>,
    runtime: Runtime,
    ns: Arc<Namespace>,
    /// Round-robin position per workload address.
    next: Mutex<HashMap<Ipv4Addr, usize>>,
    /// Containers' addresses by task (asking the engine costs a few ms per connection);
    /// forgotten when a connection to one fails.
    addresses: Mutex<HashMap<String, IpAddr>>,
    /// Takes the volume copies other agents send on the mesh port.
    copies: Option<Arc<crate::sync::Receiver>>,
}

impl Proxy {
    /// The proxy of `node`.
    pub fn new(
        node: String,
        routes: Routes,
        mesh: Arc<Mesh>,
        runtime: Runtime,
        ns: Arc<Namespace>,
        copies: Option<Arc<crate::sync::Receiver>>,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            copies,
            node,
            routes,
            mesh,
            runtime,
            ns,
            next: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
        })
    }

    /// Forgets the containers' addresses whenever a container of this node starts or
    /// stops (a restarted container may get another address, and its old one another
    /// container), and whenever the event stream breaks.
    async fn follow_containers(self: Arc<Self>) {
        loop {
            let mut events = std::pin::pin!(self.runtime.events());
            while events.next().await.is_some() {
                self.forget_addresses();
            }
            self.forget_addresses();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn forget_addresses(&self) {
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Keeps a listener on every workload address and port of the table, until aborted.
    pub async fn listen(self: Arc<Self>) {
        let follower = tokio::spawn(Arc::clone(&self).follow_containers());
        let _stop = AbortOnDrop(follower);
        let mut rx = self.routes.subscribe();
        let mut open: HashMap<(Ipv4Addr, u16), JoinHandle<()>> = HashMap::new();
        loop {
            let table = rx.borrow_and_update().clone();
            self.forget_addresses();
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
                match self.ns.tcp(SocketAddr::from(key)).await {
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
        let known = self
            .addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task)
            .copied();
        let ip = match known {
            Some(ip) => ip,
            None => {
                let container = container_name(&self.node, task);
                let ip: IpAddr = self
                    .runtime
                    .address(&container)
                    .await
                    .map_err(|e| bramble_api::error_chain(&e))?
                    .ok_or_else(|| format!("container {container} has no address"))?;
                let mut cache = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
                // Tasks come and go: keep the cache to what can be running here.
                if cache.len() > 1024 {
                    cache.clear();
                }
                cache.insert(task.to_string(), ip);
                ip
            }
        };
        let addr = SocketAddr::new(ip, port);
        let connected = tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("{addr}: no answer within {LOCAL_CONNECT_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| format!("{addr}: {e}")));
        match connected {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Err(e) => {
                // The container may have been replaced under the same task (a restart
                // gives it a new address): ask the engine next time.
                self.addresses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(task);
                Err(e)
            }
        }
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
            let _ = tcp.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let (mut stream, req) = match me.mesh.accept(tcp).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "refused a connection on the agent-to-agent port");
                        return;
                    }
                };
                let (task, port) = match req {
                    crate::mesh::Request::Task { task, port } => (task, port),
                    copy => {
                        match &me.copies {
                            Some(r) => r.serve(stream, copy).await,
                            None => {
                                let _ = crate::mesh::answer(
                                    &mut stream,
                                    &Err("this node keeps no copies".into()),
                                )
                                .await;
                            }
                        }
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

/// Aborts a task when dropped (with the task that owns it).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
