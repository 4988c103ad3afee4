//! Advertises the controller on the local network as `_bramble._tcp.local.`, so an
//! agent started without `--controller` finds it (plug in a Pi, it joins).
//!
//! mdns-sd runs its own thread; this module only starts and stops it. The TXT record
//! carries `url` (the controller's base URL, when one was configured), `version` and
//! `proto`; agents otherwise use the advertised addresses and port.

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_bramble._tcp.local.";

/// A running advertisement; dropping it withdraws it.
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Advertisement {
    /// Starts advertising `port` under `instance` (the host name, with a random suffix
    /// so that namesakes never collide). With `interfaces`,
    /// only those network interfaces are used; otherwise all but loopback.
    /// The TXT record also carries `ca`, the cluster CA's fingerprint, so an agent
    /// looks only at controllers of its own cluster (it still verifies the certificate).
    pub fn start(
        instance: &str,
        port: u16,
        url: Option<&str>,
        ca: &str,
        interfaces: &[String],
    ) -> Result<Advertisement, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        if !interfaces.is_empty() {
            daemon.disable_interface(IfKind::All)?;
            for i in interfaces {
                daemon.enable_interface(IfKind::Name(i.clone()))?;
            }
        }
        let mut props = vec![
            ("version", bramble_api::VERSION.to_string()),
            ("proto", bramble_api::wire::PROTOCOL_VERSION.to_string()),
            ("tls", "1".to_string()),
            ("ca", ca.to_string()),
        ];
        if let Some(u) = url {
            props.push(("url", u.to_string()));
        }
        // Boards flashed from one image share a host name (`raspberrypi`): under it,
        // every controller's addresses would merge into one host record, and the
        // instances would fight over one name (renames such as `raspberrypi (2)` were
        // seen to hide a third controller from agents for good). A suffix of its own
        // makes both this controller's alone.
        let unique = format!("{instance}-{:08x}", rand::random::<u32>());
        let host = format!("{unique}.local.");
        let info = ServiceInfo::new(SERVICE_TYPE, &unique, &host, "", port, &props[..])?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        tracing::info!(service = %fullname, port, "advertising the controller over mDNS");
        Ok(Advertisement { daemon, fullname })
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
