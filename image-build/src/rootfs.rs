//! Reading files from the ext4 root partition inside an image, with `debugfs` from
//! e2fsprogs.
//!
//! debugfs opens the partition in place: e2fsprogs' unix I/O manager takes an
//! `?offset=BYTES` suffix on the device name, so nothing is extracted to a temporary file
//! (a Raspberry Pi OS root is several GB) and nothing needs root or a loop device. It is
//! opened read-only (`-c`, no `-w`): Bramble's first boot is driven entirely from the boot
//! partition, so the root file system is never written.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// Symbolic links followed before giving up (as a kernel would with ELOOP).
const MAX_LINKS: usize = 8;

/// An ext4 file system at an offset inside an image file.
pub struct RootFs {
    /// What debugfs is given: `LINK?offset=N`.
    device: String,
    /// Holds a symlink to the image, so that a `?` in the image's own path cannot be
    /// mistaken for the start of the options.
    _dir: tempfile::TempDir,
}

impl RootFs {
    /// Opens the file system of `image` that starts `offset` bytes in.
    pub fn open(image: &Path, offset: u64) -> Result<RootFs> {
        check_debugfs()?;
        let abs = std::path::absolute(image).map_err(|source| Error::ReadInput {
            path: image.to_path_buf(),
            source,
        })?;
        let dir = tempfile::tempdir().map_err(|source| Error::Temp { source })?;
        let link: PathBuf = dir.path().join("image");
        std::os::unix::fs::symlink(&abs, &link).map_err(|source| Error::Temp { source })?;
        let fs = RootFs {
            device: format!("{}?offset={offset}", link.display()),
            _dir: dir,
        };
        // Any request shows whether debugfs could open the file system at all.
        fs.run("stat /")?;
        Ok(fs)
    }

    /// The contents of the file at `path` (absolute), following symbolic links; `None` if
    /// there is no such file.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(real) = self.resolve(path)? else {
            return Ok(None);
        };
        let (out, err) = self.run(&format!("cat \"{real}\""))?;
        if err.contains("not found") {
            return Ok(None);
        }
        if err.contains("while reading") {
            return Err(Error::Debugfs {
                message: format!("cat {real}: {}", last_line(&err)),
            });
        }
        Ok(Some(out))
    }

    /// Follows `path`'s last component through symbolic links (debugfs's `cat` does not);
    /// links in the directories on the way are followed by debugfs itself.
    fn resolve(&self, path: &str) -> Result<Option<String>> {
        let mut p = path.to_string();
        for _ in 0..MAX_LINKS {
            let (out, err) = self.run(&format!("stat \"{p}\""))?;
            let out = String::from_utf8_lossy(&out);
            if err.contains("not found") || out.trim().is_empty() {
                return Ok(None);
            }
            if !out.contains("Type: symlink") {
                return Ok(Some(p));
            }
            let dest = out
                .lines()
                .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
                .map(|d| d.trim().trim_matches('"').to_string())
                .ok_or_else(|| Error::Debugfs {
                    message: format!(
                        "{p} is a symbolic link longer than 60 bytes, which is not followed"
                    ),
                })?;
            p = join(&p, &dest);
        }
        Err(Error::Debugfs {
            message: format!("{path}: more than {MAX_LINKS} symbolic links"),
        })
    }

    /// Runs one debugfs request, returning stdout and stderr; fails if the file system
    /// could not be opened.
    fn run(&self, request: &str) -> Result<(Vec<u8>, String)> {
        let out = Command::new(tool("debugfs"))
            .arg("-c")
            .arg("-R")
            .arg(request)
            .arg(&self.device)
            // debugfs pipes some output through a pager when it thinks it has a terminal.
            .env("DEBUGFS_PAGER", "__none__")
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::DebugfsMissing,
                _ => Error::Debugfs {
                    message: format!("cannot run debugfs: {e}"),
                },
            })?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // debugfs exits 0 even when it cannot open the device; its message says so.
        if err.contains("while trying to open") || err.contains("Filesystem not open") {
            return Err(Error::RootFs {
                message: last_line(
                    err.lines()
                        .find(|l| l.contains("while trying to open"))
                        .unwrap_or(&err),
                )
                .replace(&self.device, "the root partition"),
            });
        }
        Ok((out.stdout, err))
    }
}

/// Where to run an e2fsprogs program from: found on `PATH`, or else in `/usr/sbin` or
/// `/sbin`, which Debian leaves off the `PATH` of users other than root.
pub fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !on_path {
        for dir in ["/usr/sbin", "/sbin"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from(name)
}

/// Fails with [`Error::DebugfsMissing`] unless `debugfs` can be run.
pub fn check_debugfs() -> Result<()> {
    match Command::new(tool("debugfs")).arg("-V").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::DebugfsMissing),
        Err(e) => Err(Error::Debugfs {
            message: format!("cannot run debugfs: {e}"),
        }),
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Resolves a symlink target `dest` found at absolute path `at` to an absolute,
/// normalised path.
fn join(at: &str, dest: &str) -> String {
    let base = if dest.starts_with('/') {
        String::new()
    } else {
        at.rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or("")
            .to_string()
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in base.split('/').chain(dest.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn joins_link_targets() {
        assert_eq!(
            join("/etc/os-release", "../usr/lib/os-release"),
            "/usr/lib/os-release"
        );
        assert_eq!(
            join("/etc/os-release", "/usr/lib/os-release"),
            "/usr/lib/os-release"
        );
        assert_eq!(join("/bin/sh", "dash"), "/bin/dash");
        assert_eq!(join("/a/b", "../../../x"), "/x");
        assert_eq!(join("/a/b", "./c/./d"), "/a/c/d");
    }
}
