//! Managed volumes, the copies this node keeps of other nodes' volumes, and data set
//! aside. Everything lives in the data dir:
//!
//! ```text
//! volumes/NAME/                      a volume in use (bind-mounted into its task)
//! volumes/NAME.json                  its workload, the placement epoch that last used it, its origin
//! copies/WORKLOAD/NAME/CURRENT       the complete copy in force: its generation, epoch, time, sender
//! copies/WORKLOAD/NAME/gen-N/        that copy's files
//! copies/WORKLOAD/NAME/incoming-N/   a copy being received (not in force until CURRENT names it)
//! set-aside/NAME-epochE-TIME/        data of a placement that is over, kept for the operator
//! ```
//!
//! A copy is in force only once `CURRENT` (written to a temporary file, synced, then
//! renamed over the old one) names it: a crash or a lost sender at any point leaves the
//! previous copy in force, and leftovers are removed at the next start.
//!
//! When a task starts, [`decide`] picks what its volume starts from: the directory the
//! node has when it is at least as new as any copy it holds; else the newest copy;
//! else nothing (an empty directory). Data of an older placement than a copy held here,
//! or than the workload's current placement elsewhere, is set aside (moved, never
//! deleted) and never used again by Bramble.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bramble_api::wire::{SyncOutcome, VolumeOrigin, VolumeReport, VolumeRole};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// In-use volumes, under the data dir.
pub const VOLUMES_DIR: &str = "volumes";
/// Copies of other nodes' volumes.
pub const COPIES_DIR: &str = "copies";
/// Data set aside.
pub const SET_ASIDE_DIR: &str = "set-aside";
const CURRENT: &str = "CURRENT";

/// Why a volume could not be prepared or a copy kept.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What a volume in use records beside its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InUse {
    /// The owning workload.
    pub workload: String,
    /// The placement that last used it.
    pub epoch: u64,
    /// Where it came from at that placement's start.
    pub origin: VolumeOrigin,
}

/// What `CURRENT` says of the copy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyMeta {
    /// Its generation (`gen-N`).
    pub generation: u64,
    /// The placement that sent it.
    pub epoch: u64,
    /// When it completed.
    pub at: DateTime<Utc>,
    /// The node that sent it.
    pub owner: String,
    /// Size of its files.
    pub bytes: u64,
    /// Number of files.
    pub files: u64,
    /// The SHA-256 of the list of entries it was made from (see
    /// [`crate::sync::list_digest`]): a sender whose list is the same has nothing to
    /// send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
}

/// What a task's volume starts from. The decision of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The directory the node has.
    Keep,
    /// The copy held here; the directory the node has, if any, is set aside first.
    Restore {
        /// Whether there is a directory to set aside.
        set_aside: bool,
    },
    /// An empty directory; what the node has (another workload's data under the same
    /// name) is set aside first.
    Empty {
        /// Whether there is a directory to set aside.
        set_aside: bool,
    },
}

/// What a task of `workload` at placement `epoch` starts its volume from, given the
/// node's directory for it (`have`: its workload and epoch) and the copy it holds
/// (`copy`: its epoch). Pure.
///
/// Data is ordered by placement epoch, and within one placement the directory in use
/// is newer than any copy made of it (a copy is of its past). So the node's own
/// directory wins unless a copy from a later placement exists; a copy from the same or
/// an older placement never replaces it.
pub fn decide(workload: &str, epoch: u64, have: Option<&InUse>, copy: Option<u64>) -> Start {
    let have = have.filter(|h| h.workload == workload);
    match (have, copy) {
        (Some(h), Some(c)) if c > h.epoch && c <= epoch => Start::Restore { set_aside: true },
        (Some(_), _) => Start::Keep,
        (None, Some(c)) if c <= epoch => Start::Restore { set_aside: false },
        (None, _) => Start::Empty { set_aside: false },
    }
}

/// Whether the node's in-use data `have` is stale and must be set aside: its
/// workload's current placement (`current`) is newer and not on this node. Pure.
pub fn stale(have: &InUse, current: Option<u64>, placed_here: bool) -> bool {
    !placed_here && current.is_some_and(|c| c > have.epoch)
}

/// How new the data of `workload`'s `volume` on this node is: (epoch, in use, copy
/// time). Data in use is newer than any copy of its own placement.
pub type Newest = Option<(u64, bool, Option<DateTime<Utc>>)>;

/// The newest data of `workload`'s `volume` this node holds (in use or a copy).
pub fn newest_here(store: &Store, workload: &str, volume: &str) -> Newest {
    let in_use = store
        .in_use(volume)
        .filter(|h| h.workload == workload && store.volume_dir(volume).is_dir())
        .map(|h| (h.epoch, true, None));
    let copy = store
        .copy(workload, volume)
        .map(|(m, _)| (m.epoch, false, Some(m.at)));
    in_use.max(copy)
}

/// Whether `mine` is older than a copy of placement `epoch` completed at `at`. Pure.
pub fn older_than(mine: Newest, epoch: u64, at: Option<DateTime<Utc>>) -> bool {
    match mine {
        None => true,
        Some((e, in_use, t)) => e < epoch || (e == epoch && !in_use && t < at),
    }
}

/// This node's managed volumes, copies and set-aside data.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// The last sync of each volume in use, by name (memory only).
    syncs: Mutex<BTreeMap<String, SyncOutcome>>,
    /// When a sync last found a copy current without changing it, by (workload,
    /// volume) (memory only).
    confirmed: Mutex<BTreeMap<(String, String), DateTime<Utc>>>,
    /// Bumped whenever what [`Store::report`] says may have changed.
    changed: watch::Sender<u64>,
    /// Serialises preparing, restoring and setting aside against each other.
    lock: Mutex<()>,
}

impl Store {
    /// The store in `data_dir`; removes what a crash left half done (copies being
    /// received, generations no `CURRENT` names, restores).
    pub fn open(data_dir: &Path) -> Result<Store, VolumeError> {
        let store = Store {
            root: data_dir.to_path_buf(),
            syncs: Mutex::new(BTreeMap::new()),
            confirmed: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            lock: Mutex::new(()),
        };
        for d in [VOLUMES_DIR, COPIES_DIR, SET_ASIDE_DIR] {
            let p = store.root.join(d);
            std::fs::create_dir_all(&p).map_err(io_err("cannot make", &p))?;
            // Other users of the node have no business with wallet data.
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700));
        }
        store.clean();
        Ok(store)
    }

    fn clean(&self) {
        let vols = self.root.join(VOLUMES_DIR);
        for e in read_dir_names(&vols) {
            if e.starts_with(".restoring-") {
                let p = vols.join(&e);
                tracing::info!(path = %p.display(), "removing a restore cut short");
                let _ = std::fs::remove_dir_all(p);
            }
        }
        for (workload, volume) in self.copy_keys() {
            let dir = self.copy_dir(&workload, &volume);
            let current = read_json::<CopyMeta>(&dir.join(CURRENT)).map(|m| m.generation);
            for e in read_dir_names(&dir) {
                let keep = e == CURRENT || current.is_some_and(|g| e == gen_name(g));
                if !keep {
                    let p = dir.join(&e);
                    tracing::info!(path = %p.display(), "removing a copy not in force");
                    let _ = remove_any(&p);
                }
            }
        }
    }

    /// A receiver of what changes ([`Store::report`] may say something new).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The directory of volume `name` in use.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.root.join(VOLUMES_DIR).join(name)
    }

    fn in_use_file(&self, name: &str) -> PathBuf {
        self.root.join(VOLUMES_DIR).join(format!("{name}.json"))
    }

    /// The directory of `workload`'s copies of `volume`.
    pub fn copy_dir(&self, workload: &str, volume: &str) -> PathBuf {
        self.root.join(COPIES_DIR).join(workload).join(volume)
    }

    /// The record of volume `name` in use, if the node has one.
    pub fn in_use(&self, name: &str) -> Option<InUse> {
        read_json(&self.in_use_file(name))
    }

    /// The copy of `workload`'s `volume` in force, and its directory.
    pub fn copy(&self, workload: &str, volume: &str) -> Option<(CopyMeta, PathBuf)> {
        let dir = self.copy_dir(workload, volume);
        let meta: CopyMeta = read_json(&dir.join(CURRENT))?;
        let gen = dir.join(gen_name(meta.generation));
        gen.is_dir().then_some((meta, gen))
    }

    /// Readies volume `name` of a task of `workload` at placement `epoch` (see
    /// [`decide`]) and returns its directory and where its data came from. Blocking:
    /// a restore copies the whole volume.
    pub fn prepare(
        &self,
        workload: &str,
        name: &str,
        epoch: u64,
    ) -> Result<(PathBuf, VolumeOrigin), VolumeError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.volume_dir(name);
        let have = self.in_use(name).filter(|_| dir.is_dir());
        let copy = self.copy(workload, name);
        let start = decide(
            workload,
            epoch,
            have.as_ref(),
            copy.as_ref().map(|c| c.0.epoch),
        );
        let origin = match start {
            // The same placement restarting keeps the origin it started with.
            Start::Keep => have
                .as_ref()
                .filter(|h| h.epoch == epoch)
                .map_or(VolumeOrigin::Kept, |h| h.origin.clone()),
            Start::Restore { set_aside } => {
                if set_aside || dir.exists() {
                    self.set_aside_locked(name, have.as_ref())?;
                }
                let Some((meta, gen)) = copy else {
                    unreachable!("decide restores only a copy it was given")
                };
                let tmp = self
                    .root
                    .join(VOLUMES_DIR)
                    .join(format!(".restoring-{name}"));
                let _ = std::fs::remove_dir_all(&tmp);
                tracing::info!(volume = name, epoch = meta.epoch, at = %meta.at, bytes = meta.bytes, "restoring the volume from its copy");
                copy_tree(&gen, &tmp)?;
                sync_dir(&tmp);
                std::fs::rename(&tmp, &dir).map_err(io_err("cannot move into place", &dir))?;
                VolumeOrigin::Copy {
                    epoch: meta.epoch,
                    at: meta.at,
                    owner: meta.owner,
                }
            }
            Start::Empty { .. } => {
                if dir.exists() {
                    self.set_aside_locked(name, have.as_ref())?;
                }
                VolumeOrigin::Empty
            }
        };
        std::fs::create_dir_all(&dir).map_err(io_err("cannot make", &dir))?;
        let record = InUse {
            workload: workload.to_string(),
            epoch,
            origin: origin.clone(),
        };
        if have.as_ref() != Some(&record) {
            write_json(&self.in_use_file(name), &record)?;
        }
        self.touch();
        Ok((dir, origin))
    }

    /// Sets aside every volume in use whose workload's current placement (`epochs`) is
    /// newer than its own and has no task on this node (`placed_here`). Returns where
    /// each went.
    pub fn set_aside_stale(
        &self,
        epochs: &BTreeMap<String, u64>,
        placed_here: &BTreeSet<String>,
    ) -> Vec<PathBuf> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut moved = Vec::new();
        for name in self.in_use_names() {
            let Some(have) = self.in_use(&name) else {
                continue;
            };
            let here = placed_here.contains(&have.workload);
            if !stale(&have, epochs.get(&have.workload).copied(), here) {
                continue;
            }
            match self.set_aside_locked(&name, Some(&have)) {
                Ok(p) => {
                    tracing::warn!(volume = %name, workload = %have.workload, epoch = have.epoch, path = %p.display(), "set aside: the workload now runs elsewhere from a newer placement; this data is kept for the operator and never used again");
                    moved.push(p);
                }
                Err(e) => tracing::warn!(volume = %name, error = %e, "cannot set aside stale data"),
            }
        }
        if !moved.is_empty() {
            self.touch();
        }
        moved
    }

    fn set_aside_locked(&self, name: &str, have: Option<&InUse>) -> Result<PathBuf, VolumeError> {
        let epoch = have.map_or(0, |h| h.epoch);
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let dest = self
            .root
            .join(SET_ASIDE_DIR)
            .join(format!("{name}-epoch{epoch}-{stamp}"));
        let src = self.volume_dir(name);
        if src.exists() {
            std::fs::rename(&src, &dest).map_err(io_err("cannot set aside", &src))?;
        } else {
            std::fs::create_dir_all(&dest).map_err(io_err("cannot make", &dest))?;
        }
        if let Some(h) = have {
            write_json(&dest.with_extension("json"), h)?;
        }
        let _ = std::fs::remove_file(self.in_use_file(name));
        Ok(dest)
    }

    /// Records the outcome of a sync of volume `name`.
    pub fn record_sync(&self, name: &str, outcome: SyncOutcome) {
        self.syncs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), outcome);
        self.touch();
    }

    /// Records that the copy of `workload`'s `volume` in force was found current by a
    /// sync that changed nothing (memory only: nothing is written).
    pub fn confirm_copy(&self, workload: &str, volume: &str) {
        self.confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((workload.to_string(), volume.to_string()), Utc::now());
        self.touch();
    }

    /// Tells subscribers that a copy came into force.
    pub fn copy_changed(&self) {
        self.touch();
    }

    fn in_use_names(&self) -> Vec<String> {
        read_dir_names(&self.root.join(VOLUMES_DIR))
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .collect()
    }

    fn copy_keys(&self) -> Vec<(String, String)> {
        let base = self.root.join(COPIES_DIR);
        let mut keys = Vec::new();
        for w in read_dir_names(&base) {
            for v in read_dir_names(&base.join(&w)) {
                keys.push((w.clone(), v));
            }
        }
        keys
    }

    /// Everything the node holds, for the controller. Walks the volumes for their
    /// sizes (reads only).
    pub fn report(&self) -> Vec<VolumeReport> {
        let syncs = self.syncs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Vec::new();
        for name in self.in_use_names() {
            let Some(h) = self.in_use(&name) else {
                continue;
            };
            let (bytes, files) = tree_size(&self.volume_dir(&name));
            let last_sync = syncs.get(&name).cloned();
            out.push(VolumeReport {
                workload: h.workload,
                volume: name,
                role: VolumeRole::InUse,
                epoch: h.epoch,
                at: last_sync
                    .as_ref()
                    .filter(|s| s.error.is_none() && !s.done.is_empty())
                    .map(|s| s.at),
                bytes,
                files,
                origin: Some(h.origin),
                last_sync,
                path: None,
            });
        }
        let confirmed = self
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (workload, volume) in self.copy_keys() {
            if let Some((m, _)) = self.copy(&workload, &volume) {
                let seen = confirmed.get(&(workload.clone(), volume.clone())).copied();
                let at = seen.map_or(m.at, |s| s.max(m.at));
                out.push(VolumeReport {
                    workload,
                    volume,
                    role: VolumeRole::Copy,
                    epoch: m.epoch,
                    at: Some(at),
                    bytes: m.bytes,
                    files: m.files,
                    origin: None,
                    last_sync: None,
                    path: None,
                });
            }
        }
        let aside = self.root.join(SET_ASIDE_DIR);
        for e in read_dir_names(&aside) {
            let Some(stem) = e.strip_suffix(".json") else {
                continue;
            };
            let Some(h) = read_json::<InUse>(&aside.join(&e)) else {
                continue;
            };
            let dir = aside.join(stem);
            let (bytes, files) = tree_size(&dir);
            let volume = stem.split("-epoch").next().unwrap_or(stem).to_string();
            out.push(VolumeReport {
                workload: h.workload,
                volume,
                role: VolumeRole::SetAside,
                epoch: h.epoch,
                at: None,
                bytes,
                files,
                origin: None,
                last_sync: None,
                path: Some(dir.display().to_string()),
            });
        }
        out.sort_by(|a, b| (&a.volume, a.role, a.epoch).cmp(&(&b.volume, b.role, b.epoch)));
        out
    }
}

/// `gen-N`.
pub fn gen_name(generation: u64) -> String {
    format!("gen-{generation}")
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    }
}

/// Reads a JSON file; None if missing or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable record ignored");
            None
        }
    }
}

/// Writes a JSON file whole or not at all (temporary file, sync, rename, sync the
/// directory).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VolumeError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| VolumeError::Io {
        what: "cannot encode",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err("cannot write", &tmp))?;
        f.write_all(&text).map_err(io_err("cannot write", &tmp))?;
        f.sync_all().map_err(io_err("cannot sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err("cannot write", path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Syncs a directory's entries to disk (best effort: not every file system can).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Bytes and files under `dir`, symbolic links not followed (a volume's contents are
/// its container's: see [`crate::beneath`]).
pub fn tree_size(dir: &Path) -> (u64, u64) {
    crate::beneath::tree_size(dir)
}

/// Copies the tree at `from` to `to` (which must not exist): files, directories and
/// symbolic links, with their modes, owners and modification times (so a copy of a
/// copy compares equal and the next sync sends nothing). Links are copied as links,
/// never followed.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir(to).map_err(io_err("cannot make", to))?;
    let mut dirs: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = stack.pop() {
        let entries = std::fs::read_dir(&src).map_err(io_err("cannot read", &src))?;
        for e in entries {
            let e = e.map_err(io_err("cannot read", &src))?;
            let s = e.path();
            let d = dst.join(e.file_name());
            let m = std::fs::symlink_metadata(&s).map_err(io_err("cannot read", &s))?;
            let ft = m.file_type();
            if ft.is_dir() {
                std::fs::create_dir(&d).map_err(io_err("cannot make", &d))?;
                stack.push((s, d.clone()));
                dirs.push((d, m));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&s).map_err(io_err("cannot read", &s))?;
                std::os::unix::fs::symlink(&target, &d).map_err(io_err("cannot make", &d))?;
                let _ = std::os::unix::fs::lchown(&d, Some(m.uid()), Some(m.gid()));
            } else if ft.is_file() {
                std::fs::copy(&s, &d).map_err(io_err("cannot copy", &s))?;
                apply_meta(&d, &m)?;
                if let Ok(f) = std::fs::File::open(&d) {
                    let _ = f.sync_all();
                }
            }
        }
    }
    // Directories last: filling them changed their times.
    for (d, m) in dirs.iter().rev() {
        apply_meta(d, m)?;
        sync_dir(d);
    }
    if let Ok(m) = std::fs::metadata(from) {
        apply_meta(to, &m)?;
    }
    Ok(())
}

/// Gives `path` (a file or directory, not a link) `m`'s owner, mode and times.
pub fn apply_meta(path: &Path, m: &std::fs::Metadata) -> Result<(), VolumeError> {
    set_meta(path, m.uid(), m.gid(), m.mode(), m.modified().ok())
}

/// Gives `path` (a file or directory, not a link) an owner, mode and modification time.
pub fn set_meta(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    modified: Option<SystemTime>,
) -> Result<(), VolumeError> {
    // Owner first: chown clears setuid bits, which the mode then sets again.
    if let Err(e) = std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        // Not root (a developer's agent): files keep the agent's owner.
        tracing::debug!(path = %path.display(), error = %e, "cannot keep the owner");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(io_err("cannot set the mode of", path))?;
    if let Some(t) = modified {
        let f = std::fs::File::open(path).map_err(io_err("cannot open", path))?;
        f.set_modified(t)
            .map_err(io_err("cannot set the time of", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(workload: &str, epoch: u64) -> InUse {
        InUse {
            workload: workload.into(),
            epoch,
            origin: VolumeOrigin::Empty,
        }
    }

    #[test]
    fn the_newest_data_wins_and_a_copy_never_replaces_newer_data() {
        use Start::*;
        // Nothing here.
        assert_eq!(decide("w", 5, None, None), Empty { set_aside: false });
        assert_eq!(decide("w", 5, None, Some(3)), Restore { set_aside: false });
        // A copy from a later placement than this node's data: this node's is stale.
        assert_eq!(
            decide("w", 9, Some(&have("w", 3)), Some(5)),
            Restore { set_aside: true }
        );
        // A copy of this node's own placement (or an older one): the directory is newer.
        assert_eq!(decide("w", 9, Some(&have("w", 5)), Some(5)), Keep);
        assert_eq!(decide("w", 9, Some(&have("w", 5)), Some(2)), Keep);
        assert_eq!(decide("w", 9, Some(&have("w", 5)), None), Keep);
        // The same placement restarting keeps its directory.
        assert_eq!(decide("w", 5, Some(&have("w", 5)), Some(5)), Keep);
        // Another workload's directory under the name is not this one's data.
        assert_eq!(
            decide("w", 5, Some(&have("x", 7)), None),
            Empty { set_aside: false }
        );
        assert_eq!(
            decide("w", 5, Some(&have("x", 7)), Some(4)),
            Restore { set_aside: false }
        );
        // A copy claiming a placement newer than the task's own is not trusted.
        assert_eq!(decide("w", 5, None, Some(8)), Empty { set_aside: false });
        assert_eq!(decide("w", 5, Some(&have("w", 3)), Some(8)), Keep);
    }

    #[test]
    fn a_copy_elsewhere_is_fetched_only_if_it_is_newer() {
        let t = |s| chrono::TimeZone::timestamp_opt(&Utc, s, 0).single();
        assert!(older_than(None, 3, t(1)));
        assert!(
            older_than(Some((2, true, None)), 3, t(1)),
            "in use, of an older placement"
        );
        assert!(
            !older_than(Some((3, true, None)), 3, t(9)),
            "in use beats a copy of its placement"
        );
        assert!(
            older_than(Some((3, false, t(1))), 3, t(2)),
            "an older copy of the placement"
        );
        assert!(!older_than(Some((3, false, t(2))), 3, t(2)));
        assert!(!older_than(Some((4, false, t(0))), 3, t(9)));
    }

    #[test]
    fn only_data_of_an_older_placement_elsewhere_is_stale() {
        let h = have("w", 5);
        assert!(stale(&h, Some(6), false));
        assert!(!stale(&h, Some(6), true), "placed here: the start decides");
        assert!(
            !stale(&h, Some(5), false),
            "the same placement (stopped, not moved)"
        );
        assert!(
            !stale(&h, None, false),
            "not placed at all (deleted, or waiting)"
        );
    }

    #[test]
    fn prepare_restores_sets_aside_and_keeps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        // A copy of generation 1 at epoch 4.
        let copy = store.copy_dir("w", "data");
        std::fs::create_dir_all(copy.join("gen-1/sub")).expect("mkdir");
        std::fs::write(copy.join("gen-1/sub/a"), b"copied").expect("write");
        let meta = CopyMeta {
            list: None,
            generation: 1,
            epoch: 4,
            at: Utc::now(),
            owner: "n1".into(),
            bytes: 6,
            files: 1,
        };
        write_json(&copy.join(CURRENT), &meta).expect("current");
        // Leftovers of a crash go at the next open.
        std::fs::create_dir_all(copy.join("incoming-2")).expect("mkdir");
        let store = Store::open(dir.path()).expect("store");
        assert!(!copy.join("incoming-2").exists());

        let (path, origin) = store.prepare("w", "data", 7).expect("prepare");
        assert!(
            matches!(origin, VolumeOrigin::Copy { epoch: 4, .. }),
            "{origin:?}"
        );
        assert_eq!(std::fs::read(path.join("sub/a")).expect("read"), b"copied");
        // Restarting the same placement keeps what it wrote.
        std::fs::write(path.join("new"), b"x").expect("write");
        let (_, origin) = store.prepare("w", "data", 7).expect("prepare");
        assert!(
            matches!(origin, VolumeOrigin::Copy { .. }),
            "the origin stays"
        );
        assert!(path.join("new").exists());

        // The workload moved on to epoch 9 elsewhere: set aside, not deleted.
        let moved = store.set_aside_stale(&BTreeMap::from([("w".into(), 9)]), &BTreeSet::new());
        assert_eq!(moved.len(), 1);
        assert!(moved[0].join("new").exists());
        assert!(!path.exists());
        let report = store.report();
        let roles: Vec<_> = report.iter().map(|r| (r.role, r.epoch)).collect();
        assert_eq!(
            roles,
            vec![(VolumeRole::Copy, 4), (VolumeRole::SetAside, 7)]
        );
    }
}
