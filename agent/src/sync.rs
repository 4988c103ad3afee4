//! Volume sync: the agent running a task whose managed volumes sync sends what changed
//! to its standby nodes' agents, over the mesh port ([`crate::mesh`], mutual TLS), every
//! `sync.every`, after running `sync.before` in the container.
//!
//! # Protocol
//! After `BRAMBLE/1 SYNC WORKLOAD VOLUME EPOCH` and `OK`, frames are a 4-byte big-endian
//! length and JSON, except file contents, which follow their [`Frame::File`] raw:
//! 1. sender: [`Frame::Digest`], the SHA-256 of its list of entries; a receiver whose
//!    copy was made from that very list, for the same sender and placement, answers
//!    [`Reply::Unchanged`] and that is all (an unchanged volume costs ~100 bytes);
//!    otherwise [`Reply::SendOffer`], and the sender sends [`Frame::Offer`], every
//!    entry of the volume (path, kind, size, time, mode, owner), excluded paths left
//!    out;
//! 2. receiver: [`Reply::Need`], the files its copy in force lacks or holds otherwise
//!    (size, modification time, mode or owner differ): unchanged files cost nothing;
//! 3. sender, for each: [`Frame::File`], the bytes, [`Frame::End`] saying whether the
//!    file stayed unchanged while it was read. One that changed is read again (up to
//!    [`ATTEMPTS`] times); the receiver keeps no torn file, and one that never holds
//!    still keeps its previous copy;
//! 4. sender: [`Frame::Done`]; receiver: builds the new copy beside the one in force
//!    (unchanged files as hard links to it), syncs it, and only then puts it in force
//!    ([`crate::volumes`]), answering [`Reply::Committed`].
//!
//! A receiver takes a copy only from the node and placement epoch its controller named
//! in its standby duties, and never one older than the copy it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bramble_api::glob::Glob;
use bramble_api::wire::StandbyDuty;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::mesh::{Mesh, Request};
use crate::volumes::{self, CopyMeta, Store};

/// How many times a file that changes while it is read is read.
pub const ATTEMPTS: u32 = 3;
/// The largest JSON frame (an offer of ~300,000 files).
const MAX_FRAME: usize = 64 << 20;
/// A file modified this recently is read twice and must read the same both times: a
/// write in the same clock tick as the last one does not move its time.
const YOUNG: Duration = Duration::from_secs(2);
/// No word from the other side for this long ends a sync.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

/// What went wrong in a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reading or writing the network or the disk.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The other side broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The receiver refused the copy.
    #[error("refused: {0}")]
    Refused(String),
    /// The mesh connection failed.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
}

/// The kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Link,
}

/// One entry of a volume, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `/`-separated, relative, no `.` or `..`.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Files: bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Links: the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    fn same_file(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mtime == other.mtime
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
    }
}

/// Sender to receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub enum Frame {
    /// The SHA-256 (hex) of the offer that follows if asked for.
    Digest {
        /// Hex.
        digest: String,
    },
    /// Every entry.
    Offer {
        /// Sorted by path, parents first.
        entries: Vec<Entry>,
    },
    /// The bytes of entry `index` follow: exactly `size` of them, and the file's
    /// attributes as they were when its reading began.
    File {
        /// Index into the offer.
        index: u32,
        /// Byte count.
        size: u64,
        /// Modification time (ns).
        mtime: i64,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Entry `index` holds the same bytes as the receiver's copy of it (their SHA-256
    /// match): only its attributes changed (a backup command rewrote it unchanged).
    Same {
        /// Index into the offer.
        index: u32,
        /// Modification time (ns).
        mtime: i64,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// The end of entry `index`'s bytes: `intact` unless it changed while read.
    End {
        /// Index into the offer.
        index: u32,
        /// Unchanged while read.
        intact: bool,
    },
    /// Every file was sent.
    Done,
}

/// Receiver to sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub enum Reply {
    /// The files to send.
    Need {
        /// Indexes into the offer.
        need: Vec<u32>,
        /// For each of `need`: the SHA-256 (hex) of the receiver's copy of that file
        /// when it has one of the same size, so that a file rewritten with the same
        /// bytes costs neither the network nor the standby's SD card.
        #[serde(default)]
        hashes: Vec<Option<String>>,
    },
    /// The copy is in force.
    Committed {
        /// Its generation.
        generation: u64,
        /// Files that changed at every reading: their previous copy was kept (or, new,
        /// they are missing).
        kept_old: Vec<String>,
    },
    /// The copy in force was made from the digested list: nothing to send.
    Unchanged,
    /// Send the list.
    SendOffer,
    /// The receiver gave up.
    Failed {
        /// Why.
        why: String,
    },
}

/// Writes one JSON frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> io::Result<u64> {
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    Ok(4 + u64::from(len))
}

/// Reads one JSON frame of at most [`MAX_FRAME`] bytes.
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, SyncError> {
    let mut len = [0u8; 4];
    tokio::time::timeout(IO_TIMEOUT, r.read_exact(&mut len))
        .await
        .map_err(|_| SyncError::Protocol("no frame in time".into()))??;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(SyncError::Protocol(format!(
            "a frame of {len} bytes, more than {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    tokio::time::timeout(IO_TIMEOUT, r.read_exact(&mut body))
        .await
        .map_err(|_| SyncError::Protocol("a frame cut short".into()))??;
    serde_json::from_slice(&body).map_err(|e| SyncError::Protocol(format!("bad frame: {e}")))
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// The entries of the tree at `root`, excluded ones (and all they hold) left out,
/// sorted so that every directory comes before what it holds. Blocking.
pub fn scan(root: &Path, exclude: &[Glob]) -> io::Result<Vec<Entry>> {
    use rustix::fs::FileType;
    // Every directory is opened beneath the root without following links, and listed
    // from its descriptor (see `crate::beneath`): a container cannot lead this out of
    // its volume, however it rearranges it meanwhile.
    let root_fd = crate::beneath::open_root(root)?;
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let found = if rel.is_empty() {
            crate::beneath::list(&root_fd)?
        } else {
            match crate::beneath::open_at(&root_fd, &rel, true) {
                Ok(fd) => crate::beneath::list(&fd)?,
                // Gone, or swapped for a link, since it was listed: its entries are not
                // copied this round.
                Err(_) => continue,
            }
        };
        let mut subdirs = Vec::new();
        for f in found {
            let path = if rel.is_empty() {
                f.name.clone()
            } else {
                format!("{rel}/{}", f.name)
            };
            let kind = match f.kind {
                FileType::Directory => Kind::Dir,
                FileType::RegularFile => Kind::File,
                FileType::Symlink => Kind::Link,
                // Sockets, pipes, devices: nothing to copy.
                _ => continue,
            };
            if bramble_api::glob::excluded(exclude, &path, kind == Kind::Dir) {
                continue;
            }
            if kind == Kind::Link && f.target.is_none() {
                continue;
            }
            out.push(Entry {
                path: path.clone(),
                kind,
                size: if kind == Kind::File { f.size } else { 0 },
                mtime: f.mtime,
                mode: f.mode,
                uid: f.uid,
                gid: f.gid,
                target: f.target,
            });
            if kind == Kind::Dir {
                subdirs.push(path);
            }
        }
        // Depth first, in name order.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    Ok(out)
}

/// Checks an offer from another node before anything is written: relative clean
/// paths, each once, every parent a directory of the offer. Pure.
pub fn check_offer(entries: &[Entry]) -> Result<(), String> {
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for e in entries {
        let p = e.path.as_str();
        if p.is_empty()
            || p.starts_with('/')
            || p.contains('\0')
            || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(format!("bad path {p:?}"));
        }
        if !seen.insert(p) {
            return Err(format!("{p:?} is offered twice"));
        }
        if let Some((parent, _)) = p.rsplit_once('/') {
            if !dirs.contains(parent) {
                return Err(format!("{p:?} comes before its directory {parent:?}"));
            }
        }
        match e.kind {
            Kind::Dir => {
                dirs.insert(p);
            }
            Kind::Link
                if e.target
                    .as_deref()
                    .is_none_or(|t| t.is_empty() || t.contains('\0')) =>
            {
                return Err(format!("link {p:?} without a target"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Which files of `offer` a receiver holding `have` (its copy in force) needs. Pure.
pub fn needed(offer: &[Entry], have: &BTreeMap<String, Entry>) -> Vec<u32> {
    offer
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == Kind::File)
        .filter(|(_, e)| !have.get(&e.path).is_some_and(|h| h.same_file(e)))
        .filter_map(|(i, _)| u32::try_from(i).ok())
        .collect()
}

/// Caps what a writer sends per second.
struct Throttle {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            start: Instant::now(),
            sent: 0,
        }
    }

    async fn spend(&mut self, n: u64) {
        self.sent += n;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// What one push did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushed {
    /// Bytes sent (frames and file contents).
    pub sent: u64,
    /// Files sent.
    pub files: u64,
    /// Files that never held still while read.
    pub kept_old: Vec<String>,
}

/// Sends the volume at `root` to the agent of `peer` (at `addr`) as `workload`'s
/// `volume` of placement `epoch`, at most `rate` bytes a second (0: no cap).
pub async fn push(
    mesh: &Mesh,
    addr: &str,
    peer: &str,
    req: (&str, &str, u64),
    root: &Path,
    exclude: &[Glob],
    rate: u64,
) -> Result<Pushed, SyncError> {
    let (workload, volume, epoch) = req;
    let entries = scan_async(root, exclude).await?;
    let mut stream = mesh
        .dial_for(
            addr,
            peer,
            &Request::Sync {
                workload: workload.to_string(),
                volume: volume.to_string(),
                epoch,
            },
        )
        .await?;
    send(&mut stream, &entries, root, rate).await
}

async fn scan_async(root: &Path, exclude: &[Glob]) -> Result<Vec<Entry>, SyncError> {
    let root_buf = root.to_path_buf();
    let globs = exclude.to_vec();
    tokio::task::spawn_blocking(move || scan(&root_buf, &globs))
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))?
        .map_err(SyncError::from)
}

/// The sender's side of the protocol on an open stream: the files of `entries` under
/// `root`.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    entries: &[Entry],
    root: &Path,
    rate: u64,
) -> Result<Pushed, SyncError> {
    let mut out = Pushed::default();
    let mut throttle = Throttle::new(rate);
    out.sent += write_frame(
        stream,
        &Frame::Digest {
            digest: list_digest(entries),
        },
    )
    .await?;
    stream.flush().await?;
    match read_frame::<_, Reply>(stream).await? {
        Reply::Unchanged => return Ok(out),
        Reply::SendOffer => {}
        Reply::Failed { why } => return Err(SyncError::Refused(why)),
        other => {
            return Err(SyncError::Protocol(format!(
                "expected an answer to the digest, got {other:?}"
            )))
        }
    }
    let n = write_frame(
        stream,
        &Frame::Offer {
            entries: entries.to_vec(),
        },
    )
    .await?;
    throttle.spend(n).await;
    out.sent += n;
    let need = match read_frame::<_, Reply>(stream).await? {
        Reply::Need { need, hashes } => need
            .into_iter()
            .zip(hashes.into_iter().chain(std::iter::repeat(None)))
            .collect::<Vec<_>>(),
        Reply::Failed { why } => return Err(SyncError::Refused(why)),
        other => {
            return Err(SyncError::Protocol(format!(
                "expected the files to send, got {other:?}"
            )))
        }
    };
    let mut buf = vec![0u8; CHUNK];
    for (index, theirs) in need {
        let Some(e) = entries.get(index as usize) else {
            return Err(SyncError::Protocol(format!(
                "asked for entry {index}, not offered"
            )));
        };
        if let Some(theirs) = theirs {
            if let Some(same) = same_bytes(root, &e.path, &theirs).await {
                out.sent += write_frame(
                    stream,
                    &Frame::Same {
                        index,
                        mtime: same.0,
                        mode: same.1,
                        uid: same.2,
                        gid: same.3,
                    },
                )
                .await?;
                continue;
            }
        }
        let mut intact = false;
        for _ in 0..ATTEMPTS {
            let mut file = match crate::beneath::open_file(root, &e.path) {
                Ok(f) => tokio::fs::File::from_std(f),
                // Gone or replaced by something else: nothing intact to send.
                Err(_) => break,
            };
            let before = file.metadata().await?;
            if !before.is_file() {
                break;
            }
            let size = before.len();
            let young = SystemTime::now()
                .duration_since(before.modified().unwrap_or(UNIX_EPOCH))
                .map_or(true, |age| age < YOUNG);
            let header = Frame::File {
                index,
                size,
                mtime: mtime_ns(&before),
                mode: before.mode() & 0o7777,
                uid: before.uid(),
                gid: before.gid(),
            };
            let n = write_frame(stream, &header).await?;
            out.sent += n;
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            let mut left = size;
            let mut short = false;
            while left > 0 {
                let want = (left as usize).min(CHUNK);
                let got = if short {
                    0
                } else {
                    file.read(&mut buf[..want]).await?
                };
                if got == 0 {
                    // Shrunk while read: pad to the size announced; the file is torn.
                    short = true;
                    buf[..want].fill(0);
                    stream.write_all(&buf[..want]).await?;
                    left -= want as u64;
                    throttle.spend(want as u64).await;
                    out.sent += want as u64;
                    continue;
                }
                digest.update(&buf[..got]);
                stream.write_all(&buf[..got]).await?;
                left -= got as u64;
                throttle.spend(got as u64).await;
                out.sent += got as u64;
            }
            let after = file.metadata().await?;
            let mut same = !short && held_still(&before, &after);
            if same && young {
                let first = hex(digest.finish().as_ref());
                same = read_again_matches(root, &e.path, size, &first).await;
            }
            out.sent += write_frame(
                stream,
                &Frame::End {
                    index,
                    intact: same,
                },
            )
            .await?;
            if same {
                intact = true;
                out.files += 1;
                break;
            }
            tracing::debug!(path = %e.path, "changed while read; reading it again");
        }
        if !intact {
            out.kept_old.push(e.path.clone());
        }
    }
    out.sent += write_frame(stream, &Frame::Done).await?;
    stream.flush().await?;
    match read_frame::<_, Reply>(stream).await? {
        Reply::Committed { kept_old, .. } => {
            out.kept_old = kept_old;
            Ok(out)
        }
        Reply::Failed { why } => Err(SyncError::Refused(why)),
        other => Err(SyncError::Protocol(format!(
            "expected the commit, got {other:?}"
        ))),
    }
}

/// Whether a file's size, modification time and change time are the same after it
/// was read as before: nothing wrote it meanwhile.
fn held_still(before: &std::fs::Metadata, after: &std::fs::Metadata) -> bool {
    after.len() == before.len()
        && mtime_ns(after) == mtime_ns(before)
        && after.ctime() == before.ctime()
        && after.ctime_nsec() == before.ctime_nsec()
}

/// The SHA-256 (hex) of what `f` holds from where it stands, and its byte count.
/// Blocking.
fn sha256_hex(f: &mut std::fs::File) -> io::Result<(String, u64)> {
    use std::io::Read;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok((hex(digest.finish().as_ref()), total)),
            n => {
                digest.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
}

/// The attributes of the file `rel` under `root` if it holds still while read and its
/// SHA-256 is `want` (hex).
async fn same_bytes(root: &Path, rel: &str, want: &str) -> Option<(i64, u32, u32, u32)> {
    let (root, rel, want) = (root.to_path_buf(), rel.to_string(), want.to_string());
    tokio::task::spawn_blocking(move || {
        let mut f = crate::beneath::open_file(&root, &rel).ok()?;
        let before = f.metadata().ok()?;
        if !before.is_file() {
            return None;
        }
        let (got, _) = sha256_hex(&mut f).ok()?;
        let after = f.metadata().ok()?;
        (held_still(&before, &after) && got == want).then(|| {
            (
                mtime_ns(&before),
                before.mode() & 0o7777,
                before.uid(),
                before.gid(),
            )
        })
    })
    .await
    .ok()
    .flatten()
}

/// The SHA-256 (hex) of a list of entries, as the protocol sends it.
pub fn list_digest(entries: &[Entry]) -> String {
    let json = serde_json::to_vec(entries).unwrap_or_default();
    hex(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of a file. Blocking.
fn file_sha256(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    sha256_hex(&mut f).ok().map(|(h, _)| h)
}

/// Whether an offer lists exactly what the receiver holds: the same entries, files
/// with the same size, time, mode and owner, links to the same targets, directories
/// with the same mode and owner (a directory's time moves whenever a file in it is
/// replaced, and says nothing of the data). Pure.
pub fn unchanged(offer: &[Entry], have: &BTreeMap<String, Entry>) -> bool {
    offer.len() == have.len()
        && offer.iter().all(|e| {
            have.get(&e.path).is_some_and(|h| match e.kind {
                Kind::File => h.same_file(e),
                Kind::Link => h.kind == Kind::Link && h.target == e.target,
                Kind::Dir => {
                    h.kind == Kind::Dir && h.mode == e.mode && h.uid == e.uid && h.gid == e.gid
                }
            })
        })
}

/// Whether the file `rel` under `root`, read again, has `size` bytes with the SHA-256
/// `want` (hex).
async fn read_again_matches(root: &Path, rel: &str, size: u64, want: &str) -> bool {
    let (root, rel) = (root.to_path_buf(), rel.to_string());
    let again = tokio::task::spawn_blocking(move || {
        let mut f = crate::beneath::open_file(&root, &rel)?;
        sha256_hex(&mut f)
    })
    .await;
    matches!(again, Ok(Ok((h, n))) if n == size && h == want)
}

/// The standby duties the leader gave this node, shared by the link (which sets them)
/// and the receiver (which checks every offer against them).
#[derive(Debug, Default)]
pub struct Duties(RwLock<Vec<StandbyDuty>>);

impl Duties {
    /// Replaces the duties.
    pub fn set(&self, duties: Vec<StandbyDuty>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = duties;
    }

    fn find(&self, workload: &str) -> Option<StandbyDuty> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|d| d.workload == workload)
            .cloned()
    }
}

/// Takes copies other agents send.
pub struct Receiver {
    store: Arc<Store>,
    duties: Arc<Duties>,
    /// Copies being received, by (workload, volume): one at a time each.
    busy: Mutex<BTreeSet<(String, String)>>,
}

/// A copy being received, released when dropped.
struct Claim<'a> {
    busy: &'a Mutex<BTreeSet<(String, String)>>,
    key: (String, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

const BUSY: &str = "a copy of that volume is being received already";

/// Why an offer is refused, if it is. Pure.
pub fn refusal(
    duty: Option<&StandbyDuty>,
    peer_is_owner: bool,
    volume: &str,
    epoch: u64,
    held: Option<u64>,
) -> Option<String> {
    let Some(d) = duty else {
        return Some("this node keeps no copy of that workload".into());
    };
    if !peer_is_owner {
        return Some(format!(
            "only {}, which runs the workload, may send its copies",
            d.owner
        ));
    }
    if !d.volumes.iter().any(|v| v == volume) {
        return Some(format!("the workload has no managed volume {volume:?}"));
    }
    if epoch != d.epoch {
        return Some(format!(
            "placement epoch {epoch}, and the workload's current one is {}",
            d.epoch
        ));
    }
    if held.is_some_and(|h| h > epoch) {
        return Some(format!(
            "this node holds a copy of a newer placement ({}); an older one never replaces it",
            held.unwrap_or_default()
        ));
    }
    None
}

impl Receiver {
    /// A receiver into `store`, checking offers against `duties`.
    pub fn new(store: Arc<Store>, duties: Arc<Duties>) -> Receiver {
        Receiver {
            store,
            duties,
            busy: Mutex::new(BTreeSet::new()),
        }
    }

    /// Serves a copy request of another agent on an accepted mesh connection (a task
    /// connection is the proxy's).
    pub async fn serve(
        &self,
        mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        req: Request,
    ) {
        match req {
            Request::Sync {
                workload,
                volume,
                epoch,
            } => self.receive(stream, workload, volume, epoch).await,
            Request::Fetch {
                workload,
                volume,
                epoch,
            } => self.serve_fetch(stream, workload, volume, epoch).await,
            Request::Task { .. } => {
                let _ = crate::mesh::answer(&mut stream, &Err("not a copy request".into())).await;
            }
        }
    }

    /// One copy of `workload`'s `volume` at a time: `None` while another is received.
    fn claim(&self, workload: &str, volume: &str) -> Option<Claim<'_>> {
        let key = (workload.to_string(), volume.to_string());
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
            .then_some(Claim {
                busy: &self.busy,
                key,
            })
    }

    /// The duty this node has for `workload`, and whether the peer of `stream` is the
    /// node it names as the workload's owner.
    fn duty_of(
        &self,
        stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        workload: &str,
    ) -> (Option<StandbyDuty>, bool) {
        let duty = self.duties.find(workload);
        let owner = duty
            .as_ref()
            .is_some_and(|d| crate::mesh::peer_is(stream, &d.owner));
        (duty, owner)
    }

    /// Serves one offer on an accepted mesh connection.
    async fn receive(
        &self,
        mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        workload: String,
        volume: String,
        epoch: u64,
    ) {
        let (duty, owner) = self.duty_of(&stream, &workload);
        let held = self.store.copy(&workload, &volume).map(|(m, _)| m.epoch);
        if let Some(why) = refusal(duty.as_ref(), owner, &volume, epoch, held) {
            tracing::warn!(workload, volume, epoch, why, "refused a volume copy");
            let _ = crate::mesh::answer(&mut stream, &Err(why)).await;
            return;
        }
        let Some(claim) = self.claim(&workload, &volume) else {
            let _ = crate::mesh::answer(&mut stream, &Err(BUSY.into())).await;
            return;
        };
        let owner_name = duty.map(|d| d.owner).unwrap_or_default();
        let result = async {
            crate::mesh::answer(&mut stream, &Ok(())).await?;
            self.take(&mut stream, &workload, &volume, epoch, &owner_name, None)
                .await
        }
        .await;
        drop(claim);
        match result {
            Ok(meta) => {
                tracing::info!(
                    workload,
                    volume,
                    epoch,
                    generation = meta.generation,
                    bytes = meta.bytes,
                    files = meta.files,
                    "volume copy in force"
                );
                self.store.copy_changed();
            }
            Err(e) => {
                tracing::warn!(workload, volume, epoch, error = %e, "volume copy not taken; the previous one stays in force");
                let _ = write_frame(&mut stream, &Reply::Failed { why: e.to_string() }).await;
            }
        }
    }

    /// Serves a node that now runs a workload this node keeps a copy of and asks for
    /// it (it holds older data, or none): this node sends its copy in force, as a sync
    /// would, to the node and placement its duty names.
    async fn serve_fetch(
        &self,
        mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        workload: String,
        volume: String,
        epoch: u64,
    ) {
        let (duty, owner) = self.duty_of(&stream, &workload);
        let copy = self.store.copy(&workload, &volume);
        let why = match (&duty, &copy) {
            (_, None) => Some("this node holds no copy of that volume".to_string()),
            (d, Some(_)) => refusal(d.as_ref(), owner, &volume, epoch, None),
        };
        if let Some(why) = why {
            tracing::warn!(
                workload,
                volume,
                epoch,
                why,
                "refused to send a volume copy"
            );
            let _ = crate::mesh::answer(&mut stream, &Err(why)).await;
            return;
        }
        let Some((meta, gen)) = copy else { return };
        let sent = async {
            crate::mesh::answer(&mut stream, &Ok(())).await?;
            write_frame(&mut stream, &meta).await?;
            let entries = scan_async(&gen, &[]).await?;
            // No cap: a wallet waits for this to start.
            send(&mut stream, &entries, &gen, 0).await
        }
        .await;
        match sent {
            Ok(p) => tracing::info!(
                workload,
                volume,
                epoch,
                sent_bytes = p.sent,
                "volume copy sent to the node now running the workload"
            ),
            Err(e) => {
                tracing::warn!(workload, volume, epoch, error = %e, "could not send a volume copy")
            }
        }
    }

    /// Fetches `source`'s copy of `workload`'s `volume` for this node's placement
    /// `epoch`, and puts it in force here (as a copy: [`Store::prepare`] then restores
    /// it).
    pub async fn fetch(
        &self,
        mesh: &Mesh,
        source: &bramble_api::wire::RestoreSource,
        workload: &str,
        volume: &str,
        epoch: u64,
    ) -> Result<CopyMeta, SyncError> {
        let Some(claim) = self.claim(workload, volume) else {
            return Err(SyncError::Refused(BUSY.into()));
        };
        let result = async {
            let mut stream = mesh
                .dial_for(
                    &source.mesh,
                    &source.node,
                    &Request::Fetch {
                        workload: workload.to_string(),
                        volume: volume.to_string(),
                        epoch,
                    },
                )
                .await?;
            let meta: CopyMeta = read_frame(&mut stream).await?;
            self.take(
                &mut stream,
                workload,
                volume,
                meta.epoch,
                &meta.owner,
                Some(meta.at),
            )
            .await
        }
        .await;
        drop(claim);
        if result.is_ok() {
            self.store.copy_changed();
        }
        result
    }

    async fn take<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        workload: &str,
        volume: &str,
        epoch: u64,
        owner: &str,
        made_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<CopyMeta, SyncError> {
        let dir = self.store.copy_dir(workload, volume);
        tokio::fs::create_dir_all(&dir).await?;
        let current = self.store.copy(workload, volume);
        let digest = match read_frame::<_, Frame>(stream).await? {
            Frame::Digest { digest } => digest,
            _ => return Err(SyncError::Protocol("expected the list's digest".into())),
        };
        if let Some((meta, _)) = current.as_ref().filter(|(m, _)| {
            m.epoch == epoch && m.owner == owner && m.list.as_deref() == Some(digest.as_str())
        }) {
            // The copy in force was made from this very list: nothing is sent, nothing
            // is written.
            self.store.confirm_copy(workload, volume);
            write_frame(stream, &Reply::Unchanged).await?;
            stream.flush().await?;
            return Ok(meta.clone());
        }
        write_frame(stream, &Reply::SendOffer).await?;
        stream.flush().await?;
        let entries = match read_frame::<_, Frame>(stream).await? {
            Frame::Offer { entries } => entries,
            _ => return Err(SyncError::Protocol("expected the offer".into())),
        };
        check_offer(&entries).map_err(SyncError::Protocol)?;
        if list_digest(&entries) != digest {
            return Err(SyncError::Protocol(
                "the list does not match its digest".into(),
            ));
        }
        let old_gen = current.as_ref().map(|c| c.1.clone());
        let (have, need, hashes) = {
            let (offer, old) = (entries.clone(), old_gen.clone());
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                let have: BTreeMap<String, Entry> = match &old {
                    Some(gen) => scan(gen, &[])?
                        .into_iter()
                        .map(|e| (e.path.clone(), e))
                        .collect(),
                    None => BTreeMap::new(),
                };
                let need = needed(&offer, &have);
                // Same size: perhaps the same bytes under a new time (a backup written
                // again unchanged); the sender checks before sending them.
                let hashes = need
                    .iter()
                    .map(|i| {
                        let e = &offer[*i as usize];
                        let h = have
                            .get(&e.path)
                            .filter(|h| h.kind == Kind::File && h.size == e.size)?;
                        file_sha256(&old.as_ref()?.join(&h.path))
                    })
                    .collect::<Vec<_>>();
                Ok((have, need, hashes))
            })
            .await
            .map_err(|e| SyncError::Protocol(e.to_string()))??
        };
        // Nothing at all changed, for the same placement: nothing is written (an idle
        // wallet costs its standby's SD card nothing).
        if let Some((meta, _)) = current.as_ref().filter(|(m, _)| {
            m.epoch == epoch && m.owner == owner && need.is_empty() && unchanged(&entries, &have)
        }) {
            write_frame(
                stream,
                &Reply::Need {
                    need: Vec::new(),
                    hashes: Vec::new(),
                },
            )
            .await?;
            stream.flush().await?;
            match read_frame::<_, Frame>(stream).await? {
                Frame::Done => {}
                _ => return Err(SyncError::Protocol("expected the end".into())),
            }
            self.store.confirm_copy(workload, volume);
            write_frame(
                stream,
                &Reply::Committed {
                    generation: meta.generation,
                    kept_old: Vec::new(),
                },
            )
            .await?;
            stream.flush().await?;
            return Ok(meta.clone());
        }
        let generation = current.as_ref().map_or(0, |c| c.0.generation) + 1;
        let incoming = dir.join(format!("incoming-{generation}"));
        let _ = tokio::fs::remove_dir_all(&incoming).await;
        tokio::fs::create_dir_all(&incoming).await?;
        let received = match self
            .receive_files(stream, &entries, &need, &hashes, &incoming)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&incoming).await;
                return Err(e);
            }
        };
        let owner = owner.to_string();
        let need_set: BTreeSet<u32> = need.iter().copied().collect();
        let dir2 = dir.clone();
        let incoming2 = incoming.clone();
        let built = tokio::task::spawn_blocking(move || {
            let (kept_old, bytes, files) = build(
                &entries,
                &need_set,
                &received,
                old_gen.as_deref(),
                &have,
                &incoming2,
            )?;
            let gen_dir = dir2.join(volumes::gen_name(generation));
            let _ = std::fs::remove_dir_all(&gen_dir);
            std::fs::rename(&incoming2, &gen_dir).map_err(|source| volumes::VolumeError::Io {
                what: "cannot move into place",
                path: gen_dir.clone(),
                source,
            })?;
            volumes::sync_dir(&dir2);
            let meta = CopyMeta {
                list: Some(digest),
                generation,
                epoch,
                at: made_at.unwrap_or_else(Utc::now),
                owner,
                bytes,
                files,
            };
            volumes::write_json(&dir2.join("CURRENT"), &meta)?;
            if let Some(old) = old_gen {
                let _ = std::fs::remove_dir_all(old);
            }
            Ok::<_, volumes::VolumeError>((meta, kept_old))
        })
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))?;
        let (meta, kept_old) = match built {
            Ok(x) => x,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&incoming).await;
                return Err(e.into());
            }
        };
        write_frame(
            stream,
            &Reply::Committed {
                generation,
                kept_old,
            },
        )
        .await?;
        stream.flush().await?;
        Ok(meta)
    }

    /// Receives the files asked for into `incoming`: what arrived, by index.
    async fn receive_files<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        entries: &[Entry],
        need: &[u32],
        hashes: &[Option<String>],
        incoming: &Path,
    ) -> Result<BTreeMap<u32, Arrived>, SyncError> {
        write_frame(
            stream,
            &Reply::Need {
                need: need.to_vec(),
                hashes: hashes.to_vec(),
            },
        )
        .await?;
        stream.flush().await?;
        let wanted: BTreeSet<u32> = need.iter().copied().collect();
        let offered_hash: BTreeSet<u32> = need
            .iter()
            .zip(hashes)
            .filter(|(_, h)| h.is_some())
            .map(|(i, _)| *i)
            .collect();
        let mut arrived = BTreeMap::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read_frame::<_, Frame>(stream).await? {
                Frame::Done => return Ok(arrived),
                Frame::Same {
                    index,
                    mtime,
                    mode,
                    uid,
                    gid,
                } => {
                    if !offered_hash.contains(&index) {
                        return Err(SyncError::Protocol(format!(
                            "entry {index} claimed unchanged, and no hash of it was given"
                        )));
                    }
                    arrived.insert(
                        index,
                        Arrived::Same {
                            mtime,
                            mode,
                            uid,
                            gid,
                        },
                    );
                }
                Frame::File {
                    index,
                    size,
                    mtime,
                    mode,
                    uid,
                    gid,
                } => {
                    if !wanted.contains(&index) {
                        return Err(SyncError::Protocol(format!(
                            "entry {index} was not asked for"
                        )));
                    }
                    let e = &entries[index as usize];
                    let path = incoming.join(&e.path);
                    if let Some(parent) = path.parent() {
                        tokio::fs::create_dir_all(parent).await?;
                    }
                    let mut f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                        .mode(0o600)
                        .open(&path)
                        .await?;
                    let mut left = size;
                    while left > 0 {
                        let want = (left as usize).min(CHUNK);
                        let got = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf[..want]))
                            .await
                            .map_err(|_| {
                                SyncError::Protocol("file bytes stopped coming".into())
                            })??;
                        if got == 0 {
                            return Err(SyncError::Protocol(
                                "closed in the middle of a file".into(),
                            ));
                        }
                        f.write_all(&buf[..got]).await?;
                        left -= got as u64;
                    }
                    let ok = match read_frame::<_, Frame>(stream).await? {
                        Frame::End { index: i, intact } if i == index => intact,
                        _ => return Err(SyncError::Protocol("expected the end of a file".into())),
                    };
                    if ok {
                        f.sync_all().await?;
                        drop(f);
                        let path2 = path.clone();
                        tokio::task::spawn_blocking(move || {
                            volumes::set_meta(&path2, uid, gid, mode, Some(system_time(mtime)))
                        })
                        .await
                        .map_err(|e| SyncError::Protocol(e.to_string()))??;
                        arrived.insert(index, Arrived::Bytes);
                    } else {
                        drop(f);
                        arrived.remove(&index);
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                }
                _ => return Err(SyncError::Protocol("unexpected frame".into())),
            }
        }
    }
}

/// How a file asked for arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrived {
    /// Its bytes, intact, in the new copy already.
    Bytes,
    /// The same bytes as the copy in force, with these attributes.
    Same {
        mtime: i64,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// Completes the copy in `incoming`: directories, links, unchanged files (hard links
/// to the copy in force), and the previous copy of files that never arrived intact.
/// Returns the paths of the latter, and the copy's bytes and files. Blocking.
fn build(
    entries: &[Entry],
    need: &BTreeSet<u32>,
    arrived: &BTreeMap<u32, Arrived>,
    old: Option<&Path>,
    have: &BTreeMap<String, Entry>,
    incoming: &Path,
) -> Result<(Vec<String>, u64, u64), volumes::VolumeError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| volumes::VolumeError::Io { what, path, source }
    };
    let mut kept_old = Vec::new();
    let mut bytes = 0;
    let mut files = 0;
    for (i, e) in entries.iter().enumerate() {
        let i = i as u32;
        let to = incoming.join(&e.path);
        match e.kind {
            Kind::Dir => std::fs::create_dir_all(&to).map_err(io("cannot make", &to))?,
            Kind::Link => {
                let target = e.target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(&target, &to).map_err(io("cannot make", &to))?;
                let _ = std::os::unix::fs::lchown(&to, Some(e.uid), Some(e.gid));
            }
            Kind::File => {
                let got = arrived.get(&i);
                if got == Some(&Arrived::Bytes) {
                    bytes += std::fs::symlink_metadata(&to).map(|m| m.len()).unwrap_or(0);
                    files += 1;
                    continue;
                }
                // Only a file the copy in force lists as one: its path there runs through
                // real directories only, never through a link.
                let from = old.map(|o| o.join(&e.path));
                let usable = have.get(&e.path).filter(|h| h.kind == Kind::File);
                if need.contains(&i) && got.is_none() {
                    kept_old.push(e.path.clone());
                }
                if let (Some(from), Some(m)) = (from, usable) {
                    if let Some(parent) = to.parent() {
                        std::fs::create_dir_all(parent).map_err(io("cannot make", parent))?;
                    }
                    if std::fs::hard_link(&from, &to).is_err() {
                        std::fs::copy(&from, &to).map_err(io("cannot copy", &from))?;
                    }
                    if let Some(Arrived::Same {
                        mtime,
                        mode,
                        uid,
                        gid,
                    }) = got
                    {
                        // The inode is shared with the copy in force, which so gets the
                        // new attributes a moment early: its bytes, all that a restore
                        // relies on, are the same either way, and no data is written.
                        volumes::set_meta(&to, *uid, *gid, *mode, Some(system_time(*mtime)))?;
                    }
                    bytes += m.size;
                    files += 1;
                }
            }
        }
    }
    // Directories' attributes last, deepest first: filling them changed their times.
    for e in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let to = incoming.join(&e.path);
        volumes::set_meta(&to, e.uid, e.gid, e.mode, Some(system_time(e.mtime)))?;
        volumes::sync_dir(&to);
    }
    volumes::sync_dir(incoming);
    Ok((kept_old, bytes, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size: 1,
            mtime: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: (kind == Kind::Link).then(|| "x".into()),
        }
    }

    #[test]
    fn offers_with_escapes_or_orphans_are_refused() {
        let ok = vec![
            entry("a", Kind::Dir),
            entry("a/b", Kind::File),
            entry("l", Kind::Link),
        ];
        assert_eq!(check_offer(&ok), Ok(()));
        for bad in [
            vec![entry("../x", Kind::File)],
            vec![entry("/etc/passwd", Kind::File)],
            vec![entry("a//b", Kind::File)],
            vec![entry("", Kind::File)],
            vec![entry("a/b", Kind::File)],
            // A file under a link: writing it would follow the link.
            vec![entry("l", Kind::Link), entry("l/x", Kind::File)],
            vec![entry("a", Kind::File), entry("a", Kind::File)],
            vec![Entry {
                target: None,
                ..entry("l", Kind::Link)
            }],
        ] {
            assert!(check_offer(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_changed_files_are_needed() {
        let offer = vec![
            entry("d", Kind::Dir),
            entry("d/same", Kind::File),
            entry("d/new", Kind::File),
            entry("d/grown", Kind::File),
            entry("l", Kind::Link),
        ];
        let mut have = BTreeMap::new();
        have.insert("d/same".to_string(), entry("d/same", Kind::File));
        have.insert(
            "d/grown".to_string(),
            Entry {
                size: 0,
                ..entry("d/grown", Kind::File)
            },
        );
        assert_eq!(needed(&offer, &have), vec![2, 3]);
        let touched = Entry {
            mtime: 2,
            ..entry("d/same", Kind::File)
        };
        assert_eq!(needed(&[touched], &have), vec![0], "a new time is a change");
    }

    #[test]
    fn an_offer_is_unchanged_only_if_every_entry_is() {
        let offer = vec![
            entry("d", Kind::Dir),
            entry("d/f", Kind::File),
            entry("l", Kind::Link),
        ];
        let have: BTreeMap<String, Entry> =
            offer.iter().map(|e| (e.path.clone(), e.clone())).collect();
        assert!(unchanged(&offer, &have));
        let moved_dir = Entry {
            mtime: 9,
            ..entry("d", Kind::Dir)
        };
        assert!(
            unchanged(
                &[moved_dir, entry("d/f", Kind::File), entry("l", Kind::Link)],
                &have
            ),
            "a directory's time says nothing"
        );
        let chmod = Entry {
            mode: 0o700,
            ..entry("d", Kind::Dir)
        };
        assert!(!unchanged(
            &[chmod, entry("d/f", Kind::File), entry("l", Kind::Link)],
            &have
        ));
        let relinked = Entry {
            target: Some("y".into()),
            ..entry("l", Kind::Link)
        };
        assert!(!unchanged(
            &[entry("d", Kind::Dir), entry("d/f", Kind::File), relinked],
            &have
        ));
        assert!(
            !unchanged(&offer[..2], &have),
            "a deleted entry is a change"
        );
    }

    #[test]
    fn an_offer_is_refused_unless_the_duty_names_its_sender_and_epoch() {
        let duty = StandbyDuty {
            workload: "w".into(),
            owner: "n1".into(),
            epoch: 7,
            volumes: vec!["data".into()],
        };
        assert_eq!(refusal(Some(&duty), true, "data", 7, Some(5)), None);
        assert_eq!(refusal(Some(&duty), true, "data", 7, Some(7)), None);
        assert!(refusal(None, true, "data", 7, None).is_some());
        assert!(
            refusal(Some(&duty), false, "data", 7, None).is_some(),
            "another node"
        );
        assert!(refusal(Some(&duty), true, "other", 7, None).is_some());
        assert!(
            refusal(Some(&duty), true, "data", 6, None).is_some(),
            "an old placement"
        );
        assert!(
            refusal(Some(&duty), true, "data", 7, Some(9)).is_some(),
            "older than what is held"
        );
    }

    #[test]
    fn a_scan_leaves_out_what_is_excluded_and_lists_parents_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("blocks/index")).expect("mkdir");
        std::fs::create_dir_all(root.join("wallets")).expect("mkdir");
        std::fs::write(root.join("blocks/blk0.dat"), b"x").expect("write");
        std::fs::write(root.join("wallets/wallet.dat"), b"key").expect("write");
        std::fs::write(root.join("debug.log"), b"log").expect("write");
        std::os::unix::fs::symlink("wallets/wallet.dat", root.join("link")).expect("link");
        let globs = vec![
            Glob::new("blocks/").expect("glob"),
            Glob::new("*.log").expect("glob"),
        ];
        let paths: Vec<_> = scan(root, &globs)
            .expect("scan")
            .into_iter()
            .map(|e| (e.path, e.kind))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("link".into(), Kind::Link),
                ("wallets".into(), Kind::Dir),
                ("wallets/wallet.dat".into(), Kind::File)
            ]
        );
        assert_eq!(check_offer(&scan(root, &[]).expect("scan")), Ok(()));
    }
}
