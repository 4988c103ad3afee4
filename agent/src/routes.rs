//! The routing table this node serves ([`bramble_api::endpoints::Table`]): the last one
//! the leader sent, kept while no controller is there, and on disk (written only when it
//! changes) so an agent restarted while the controllers are away still routes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bramble_api::endpoints::{Changes, Table};
use tokio::sync::watch;

const FILE: &str = "endpoints.json";

/// The table, shared by the proxy, the resolver and the link.
#[derive(Clone)]
pub struct Routes {
    tx: Arc<watch::Sender<Arc<Table>>>,
    file: PathBuf,
}

impl Routes {
    /// The table kept in `data_dir`, or an empty one.
    pub fn load(data_dir: &Path) -> Routes {
        let file = data_dir.join(FILE);
        let table = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Table>(&bytes) {
                Ok(t) => {
                    tracing::info!(endpoints = t.endpoints.len(), "routing with the table kept from before the restart until a controller sends one");
                    t
                }
                Err(e) => {
                    tracing::warn!(path = %file.display(), error = %e, "ignoring an unreadable routing table");
                    Table::default()
                }
            },
            Err(_) => Table::default(),
        };
        Routes {
            tx: Arc::new(watch::channel(Arc::new(table)).0),
            file,
        }
    }

    /// The current table.
    pub fn current(&self) -> Arc<Table> {
        Arc::clone(&self.tx.borrow())
    }

    /// Follows the table.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.tx.subscribe()
    }

    /// Changes from the leader to the table it sent last: applied, then as [`Routes::update`].
    pub fn apply(&self, revision: u64, changes: Changes) {
        let current = self.current();
        if changes.is_empty() && current.range == changes.range {
            return;
        }
        let mut table = (*current).clone();
        table.apply(changes);
        self.update(revision, table);
    }

    /// A table from the leader: kept, and written down when it differs.
    pub fn update(&self, revision: u64, table: Table) {
        if *self.current() == table {
            return;
        }
        tracing::debug!(
            revision,
            endpoints = table.endpoints.len(),
            "routing table received"
        );
        match serde_json::to_vec(&table) {
            Ok(bytes) => {
                let tmp = self.file.with_extension("tmp");
                if let Err(e) =
                    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.file))
                {
                    tracing::warn!(path = %self.file.display(), error = %e, "cannot keep the routing table on disk; routing with it anyway");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the routing table"),
        }
        self.tx.send_replace(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::endpoints::{Endpoint, DEFAULT_RANGE};
    use bramble_api::manifest::Kind;

    #[test]
    fn a_table_is_kept_across_a_restart_and_written_only_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = Routes::load(dir.path());
        assert!(routes.current().endpoints.is_empty());
        let table = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![Endpoint {
                kind: Kind::Wallet,
                name: "coin".into(),
                address: "169.254.100.2".parse().expect("ip"),
                ports: vec![9332],
                backends: Vec::new(),
            }],
        };
        let mut rx = routes.subscribe();
        routes.update(7, table.clone());
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        let written = std::fs::metadata(dir.path().join(FILE))
            .expect("written")
            .modified()
            .expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        routes.update(8, table.clone());
        assert!(
            !rx.has_changed().expect("open"),
            "the same table is no change"
        );
        let again = std::fs::metadata(dir.path().join(FILE))
            .expect("kept")
            .modified()
            .expect("mtime");
        assert_eq!(written, again, "the same table is not written again");
        assert_eq!(*Routes::load(dir.path()).current(), table);
        std::fs::write(dir.path().join(FILE), "garbage").expect("write");
        assert!(Routes::load(dir.path()).current().endpoints.is_empty());
    }

    #[test]
    fn changes_are_applied_to_the_current_table_and_kept_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = Routes::load(dir.path());
        let endpoint = |name: &str, last: u8| Endpoint {
            kind: Kind::Service,
            name: name.into(),
            address: std::net::Ipv4Addr::new(169, 254, 100, last),
            ports: vec![80],
            backends: Vec::new(),
        };
        let first = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![endpoint("api", 3), endpoint("web", 2)],
        };
        routes.update(1, first.clone());
        let next = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![endpoint("db", 4), endpoint("web", 5)],
        };
        let mut rx = routes.subscribe();
        routes.apply(2, first.changes_to(&next));
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        assert_eq!(*routes.current(), next);
        assert_eq!(*Routes::load(dir.path()).current(), next, "kept on disk");
        // No change: nothing to tell the proxy or write.
        routes.apply(3, next.changes_to(&next));
        assert!(!rx.has_changed().expect("open"));
    }
}
