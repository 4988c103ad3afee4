//! Wallet epochs: the fencing token every Wallet placement carries (one above the store
//! revision the leader decided it at). The agent remembers the highest epoch it has
//! seen per Wallet, on disk, and refuses a task set that holds an older one: such a set
//! can only come from a leader that has lost the lead (or from before a restart of this
//! agent), and acting on it could start an old placement again. Refusing the whole set,
//! not just the Wallet, keeps the node on the newer set it already has.
//!
//! The memory belongs to one cluster: it is kept with the cluster CA's fingerprint, and
//! an agent joined to another cluster starts afresh. A cluster whose store was rebuilt
//! under the same CA starts its revisions over: remove the file ([`FILE`]) on its nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bramble_api::manifest::Kind;
use bramble_api::wire::Assignment;

/// The file in the data dir.
pub const FILE: &str = "wallet-epochs.json";

/// A Wallet of a task set older than what this node has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The Wallet.
    pub workload: String,
    /// The epoch in the refused set.
    pub epoch: u64,
    /// The highest epoch seen for it.
    pub seen: u64,
}

/// The Wallets of `tasks` whose epoch is older than the one seen for them. Pure.
pub fn stale(seen: &BTreeMap<String, u64>, tasks: &[Assignment]) -> Vec<Stale> {
    wallets(tasks)
        .filter_map(|(w, e)| {
            let s = *seen.get(w)?;
            (e < s).then(|| Stale {
                workload: w.to_string(),
                epoch: e,
                seen: s,
            })
        })
        .collect()
}

/// Records the epochs of `tasks`; whether anything rose. Pure.
pub fn record(seen: &mut BTreeMap<String, u64>, tasks: &[Assignment]) -> bool {
    let mut changed = false;
    for (w, e) in wallets(tasks) {
        let s = seen.entry(w.to_string()).or_insert(0);
        if e > *s {
            *s = e;
            changed = true;
        }
    }
    changed
}

fn wallets(tasks: &[Assignment]) -> impl Iterator<Item = (&str, u64)> {
    tasks
        .iter()
        .filter(|a| a.kind == Kind::Wallet)
        .filter_map(|a| Some((a.workload.as_str(), a.epoch.filter(|e| *e > 0)?)))
}

/// The epochs seen, kept in the data dir.
#[derive(Debug)]
pub struct Epochs {
    path: PathBuf,
    ca: String,
    seen: BTreeMap<String, u64>,
}

/// The file's content.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Stored {
    /// The cluster CA's fingerprint.
    ca: String,
    /// Highest epoch per Wallet.
    seen: BTreeMap<String, u64>,
}

impl Epochs {
    /// Reads them from `dir` (none yet: empty). A file that cannot be read is said
    /// loudly and counts as empty: the agent still runs, without the guard's memory
    /// from before this start.
    pub fn load(dir: &Path, ca: &str) -> Epochs {
        let path = dir.join(FILE);
        let seen = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(s) if s.ca == ca => s.seen,
                Ok(_) => {
                    tracing::info!(file = %path.display(), "wallet epochs of another cluster; starting afresh");
                    BTreeMap::new()
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable wallet epochs; starting without them");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read wallet epochs; starting without them");
                BTreeMap::new()
            }
        };
        Epochs {
            path,
            ca: ca.to_string(),
            seen,
        }
    }

    /// Checks a task set: Ok (and its epochs recorded, on disk when they rose) or the
    /// Wallets that make it stale (nothing recorded).
    pub fn admit(&mut self, tasks: &[Assignment]) -> Result<(), Vec<Stale>> {
        let old = stale(&self.seen, tasks);
        if !old.is_empty() {
            return Err(old);
        }
        if record(&mut self.seen, tasks) {
            if let Err(e) = self.save() {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot write wallet epochs");
            }
        }
        Ok(())
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let stored = Stored {
            ca: self.ca.clone(),
            seen: self.seen.clone(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task of `workload` (the fake runtime's, whose workload is the task id less its
    /// replica) carrying `epoch`.
    fn a(workload: &str, kind: Kind, epoch: Option<u64>) -> Assignment {
        let mut a = crate::runtime::fake::assignment(&format!("{workload}-0"), kind);
        a.epoch = epoch;
        a
    }

    #[test]
    fn an_older_epoch_of_a_wallet_is_stale_and_equal_or_newer_ones_are_not() {
        let mut seen = BTreeMap::new();
        assert!(record(&mut seen, &[a("ltc", Kind::Wallet, Some(42))]));
        assert!(
            !record(&mut seen, &[a("ltc", Kind::Wallet, Some(42))]),
            "no rise"
        );
        assert_eq!(
            stale(&seen, &[a("ltc", Kind::Wallet, Some(41))]),
            [Stale {
                workload: "ltc".into(),
                epoch: 41,
                seen: 42
            }]
        );
        assert!(stale(&seen, &[a("ltc", Kind::Wallet, Some(42))]).is_empty());
        assert!(stale(&seen, &[a("ltc", Kind::Wallet, Some(61))]).is_empty());
        // Other Wallets, Services and sets from controllers without epochs are not
        // judged.
        assert!(stale(&seen, &[a("btc", Kind::Wallet, Some(1))]).is_empty());
        assert!(stale(&seen, &[a("ltc", Kind::Service, Some(1))]).is_empty());
        assert!(stale(&seen, &[a("ltc", Kind::Wallet, None)]).is_empty());
        assert!(stale(&seen, &[a("ltc", Kind::Wallet, Some(0))]).is_empty());
    }

    #[test]
    fn a_stale_set_is_refused_whole_and_the_memory_survives_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let mut e = Epochs::load(dir.path(), "ca1");
        assert!(e
            .admit(&[
                a("ltc", Kind::Wallet, Some(10)),
                a("pool", Kind::Service, None)
            ])
            .is_ok());
        assert!(e.admit(&[a("ltc", Kind::Wallet, Some(20))]).is_ok());
        let mut again = Epochs::load(dir.path(), "ca1");
        let refused = again
            .admit(&[
                a("ltc", Kind::Wallet, Some(15)),
                a("btc", Kind::Wallet, Some(99)),
            ])
            .expect_err("older than what was seen before the restart");
        assert_eq!(refused.len(), 1);
        assert_eq!((refused[0].epoch, refused[0].seen), (15, 20));
        // Nothing of the refused set was recorded.
        assert!(again.admit(&[a("btc", Kind::Wallet, Some(50))]).is_ok());
        // Joined to another cluster: its revisions are its own.
        let mut other = Epochs::load(dir.path(), "ca2");
        assert!(other.admit(&[a("ltc", Kind::Wallet, Some(3))]).is_ok());
    }

    #[test]
    fn an_unreadable_file_is_an_empty_memory() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        let mut e = Epochs::load(dir.path(), "ca1");
        assert!(e.admit(&[a("ltc", Kind::Wallet, Some(1))]).is_ok());
    }
}
