//! Opening what lies under a managed volume without ever following a symbolic link.
//!
//! A volume's contents are written by its container, which may plant links and swap a
//! directory for a link at any moment. The agent runs as root and reads volumes to copy
//! them: a path opened the usual way could lead it out of the volume (to `/etc/shadow`,
//! say), and the copy would bring that file back into the container on the next
//! failover. So every open below a volume's root goes through the kernel's
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, on kernels before 5.6, one
//! component at a time with `O_NOFOLLOW`. Directories are listed from the file
//! descriptor that was opened, never by path again.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

const DIR: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);
const FILE: OFlags = OFlags::RDONLY
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// Opens the volume's root (the agent's own directory).
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(root, DIR, Mode::empty())?)
}

/// Opens `rel` (relative, `/`-separated) under the directory `root`: a directory if
/// `dir`, else a file. Fails if any component is a symbolic link.
pub fn open_at(root: &OwnedFd, rel: &str, dir: bool) -> io::Result<OwnedFd> {
    let flags = if dir { DIR } else { FILE };
    match rustix::fs::openat2(
        root,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => {}
        r => return Ok(r?),
    }
    let parts: Vec<&str> = rel.split('/').collect();
    let mut fd: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a clean relative path",
            ));
        }
        let f = if i + 1 == parts.len() { flags } else { DIR };
        let next = match &fd {
            None => rustix::fs::openat(root, *part, f, Mode::empty())?,
            Some(d) => rustix::fs::openat(d, *part, f, Mode::empty())?,
        };
        fd = Some(next);
    }
    fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}

/// Opens the file `rel` under `root` (see [`open_at`]).
pub fn open_file(root: &Path, rel: &str) -> io::Result<File> {
    let r = open_root(root)?;
    Ok(File::from(open_at(&r, rel, false)?))
}

/// One entry of a directory, from `lstat` on the directory's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: FileType,
    /// Bytes (files).
    pub size: u64,
    /// Modification time, ns since the Unix epoch.
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// A link's target.
    pub target: Option<String>,
}

/// The entries of the directory open at `dir`, by name (names that are not UTF-8 left
/// out, with a warning).
pub fn list(dir: &OwnedFd) -> io::Result<Vec<Found>> {
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = d.read() {
        let e = e?;
        let raw = e.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let Ok(name) = std::str::from_utf8(raw) else {
            tracing::warn!(name = ?OsStr::from_bytes(raw), "a file name that is not UTF-8 is not copied");
            continue;
        };
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Gone meanwhile.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = FileType::from_raw_mode(st.st_mode as _);
        let target = if kind == FileType::Symlink {
            match rustix::fs::readlinkat(dir, name, Vec::new()) {
                Ok(t) => t.into_string().ok(),
                Err(_) => continue,
            }
        } else {
            None
        };
        let (size, mtime, mode, uid, gid) = fields(&st);
        out.push(Found {
            name: name.to_string(),
            kind,
            size,
            mtime,
            mode,
            uid,
            gid,
            target,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Bytes and files under `root`, links not followed (the walk of [`list`] and
/// [`open_at`]); what cannot be listed counts nothing.
pub fn tree_size(root: &Path) -> (u64, u64) {
    let Ok(r) = open_root(root) else {
        return (0, 0);
    };
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let found = if rel.is_empty() {
            list(&r)
        } else {
            open_at(&r, &rel, true).and_then(|fd| list(&fd))
        };
        for f in found.unwrap_or_default() {
            match f.kind {
                FileType::RegularFile => {
                    bytes += f.size;
                    files += 1;
                }
                FileType::Directory if rel.is_empty() => stack.push(f.name),
                FileType::Directory => stack.push(format!("{rel}/{}", f.name)),
                _ => {}
            }
        }
    }
    (bytes, files)
}

/// Size, modification time (ns), permission bits, owner and group of a `stat`.
// The field types of `struct stat` differ between architectures (armv7's are 32-bit):
// `as` is the one conversion that compiles on all of them.
#[allow(clippy::unnecessary_cast)]
fn fields(st: &rustix::fs::Stat) -> (u64, i64, u32, u32, u32) {
    let mtime = (st.st_mtime as i64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec as i64);
    (
        st.st_size as u64,
        mtime,
        (st.st_mode as u32) & 0o7777,
        st.st_uid as u32,
        st.st_gid as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_anywhere_on_the_way_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"host").expect("write");
        let root = dir.path();
        std::fs::create_dir(root.join("real")).expect("mkdir");
        std::fs::write(root.join("real/file"), b"mine").expect("write");
        std::os::unix::fs::symlink(outside.path(), root.join("swapped")).expect("link");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("leaf")).expect("link");
        std::os::unix::fs::symlink("../..", root.join("real/up")).expect("link");

        let mut s = String::new();
        use std::io::Read;
        open_file(root, "real/file")
            .expect("a plain file")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "mine");
        // ".." that stays beneath the root is harmless and allowed; one that leaves is not.
        for bad in [
            "swapped/secret",
            "leaf",
            "real/up/etc/passwd",
            "../x",
            "real/../../x",
        ] {
            assert!(open_file(root, bad).is_err(), "{bad} was opened");
        }
        let r = open_root(root).expect("root");
        assert!(open_at(&r, "swapped", true).is_err());
        let names: Vec<(String, FileType)> = list(&r)
            .expect("list")
            .into_iter()
            .map(|f| (f.name, f.kind))
            .collect();
        assert_eq!(
            names,
            vec![
                ("leaf".to_string(), FileType::Symlink),
                ("real".to_string(), FileType::Directory),
                ("swapped".to_string(), FileType::Symlink),
            ]
        );
    }
}
