//! Finds the controllers over mDNS (`_bramble._tcp.local.`) when no `--controller` is
//! given: every controller advertises itself, the agent browses, and for each controller
//! of its own cluster (the `ca` in the TXT record is the one in its join token) the
//! first advertised address that accepts a TCP connection is kept. The agent links to
//! every controller found (see `link`). Anyone can advertise anything over mDNS: the TLS
//! handshake, pinned to that CA, is what decides, before any credential is sent.

use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};

/// The DNS-SD service type the controller advertises.
pub const SERVICE_TYPE: &str = "_bramble._tcp.local.";

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mDNS daemon could not start.
    #[error("mDNS")]
    Mdns(#[from] mdns_sd::Error),
    /// Nothing answered in time.
    #[error("no Bramble controller answered on the local network within {0:?}")]
    NotFound(Duration),
}

/// How long a first search browses on after the first controller was found, for the
/// others: short, so a new node joins fast (later searches find the rest).
pub const SETTLE: Duration = Duration::from_millis(700);

/// How long a later search browses on after the first controller was found: answers
/// come spread out (responders delay them, queries are repeated after 1 s and 2 s), and
/// a later search is not in a hurry.
pub const SETTLE_THOROUGH: Duration = Duration::from_secs(3);

/// Browses for the controllers of the cluster whose CA is `ca`: up to `timeout` for the
/// first, then `settle` for more; returns their base URLs (`https://ADDR:PORT`), the
/// first found first. With `interfaces`, only those network interfaces are used.
pub async fn discover(
    timeout: Duration,
    settle: Duration,
    interfaces: &[String],
    ca: &str,
) -> Result<Vec<String>, Error> {
    let daemon = ServiceDaemon::new()?;
    if !interfaces.is_empty() {
        daemon.disable_interface(IfKind::All)?;
        for i in interfaces {
            daemon.enable_interface(IfKind::Name(i.clone()))?;
        }
    }
    let events = daemon.browse(SERVICE_TYPE)?;
    let mut found: Vec<(String, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut until = deadline;
    loop {
        let Ok(Ok(ev)) = tokio::time::timeout_at(until, events.recv_async()).await else {
            break;
        };
        {
            let ServiceEvent::ServiceResolved(info) = ev else {
                continue;
            };
            if found.iter().any(|(instance, _)| *instance == info.fullname) {
                continue;
            }
            if info.get_property_val_str("ca") != Some(ca) {
                tracing::debug!(instance = %info.fullname, "a controller of another cluster (or an older one); skipping it");
                continue;
            }
            let port = info.get_port();
            let mut candidates: Vec<String> = Vec::new();
            if let Some(url) = info.get_property_val_str("url") {
                candidates.push(url.trim_end_matches('/').to_string());
            }
            let mut addrs: Vec<_> = info.get_addresses_v4().into_iter().collect();
            addrs.sort();
            candidates.extend(addrs.into_iter().map(|a| format!("https://{a}:{port}")));
            for url in candidates {
                if reachable(&url).await {
                    tracing::info!(controller = %url, instance = %info.fullname, "found the controller over mDNS");
                    if found.is_empty() {
                        until = (tokio::time::Instant::now() + settle).min(deadline);
                    }
                    found.push((info.fullname.clone(), url));
                    break;
                }
                tracing::debug!(candidate = %url, "advertised controller address not reachable");
            }
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    if found.is_empty() {
        return Err(Error::NotFound(timeout));
    }
    Ok(found.into_iter().map(|(_, url)| url).collect())
}

async fn reachable(url: &str) -> bool {
    let Some(hostport) = url.strip_prefix("https://") else {
        return false;
    };
    let Ok(addr) = hostport.parse::<SocketAddr>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_millis(800),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}
