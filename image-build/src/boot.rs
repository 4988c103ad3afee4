//! The FAT boot partition inside an image file, edited in place with the `fatfs` crate
//! (no mount, so no root and no loop device).
//!
//! The partition is reached through an [`fscommon::StreamSlice`] of the image file. It is
//! deliberately unbuffered: every write goes straight to the file, so an error (such as
//! the host's disk filling up under the sparse output) surfaces from the write that
//! caused it instead of from a buffer flushed, and ignored, on drop.

use std::fs::File;
use std::io::{self, Read, Write};

use fscommon::StreamSlice;

use crate::mbr::Partition;
use crate::{Error, Result};

type Disk = StreamSlice<File>;

/// A mounted boot partition.
pub struct Boot {
    fs: fatfs::FileSystem<Disk>,
}

impl Boot {
    /// Mounts the FAT file system of partition `part` of `image`.
    pub fn mount(image: &File, part: &Partition) -> Result<Boot> {
        let fat = |source| Error::BootFs { source };
        let disk = StreamSlice::new(image.try_clone().map_err(fat)?, part.offset, part.end())
            .map_err(fat)?;
        let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new()).map_err(fat)?;
        Ok(Boot { fs })
    }

    /// Names of the files and directories in the top directory.
    pub fn top_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for e in self.fs.root_dir().iter() {
            let e = e.map_err(|source| Error::BootFs { source })?;
            let n = e.file_name();
            if n != "." && n != ".." {
                names.push(n);
            }
        }
        Ok(names)
    }

    /// The contents of the file at `path` (`/`-separated, from the top), or `None`.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let err = |source| Error::BootRead {
            file: path.to_string(),
            source,
        };
        let mut f = match self.fs.root_dir().open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(err)?;
        Ok(Some(buf))
    }

    /// Writes (creates or replaces) the file at `path`, creating its directories.
    pub fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        let err = |source| Error::BootWrite {
            file: path.to_string(),
            source,
        };
        let root = self.fs.root_dir();
        let mut dir_path = String::new();
        if let Some((dirs, _)) = path.rsplit_once('/') {
            for d in dirs.split('/') {
                if !dir_path.is_empty() {
                    dir_path.push('/');
                }
                dir_path.push_str(d);
                // create_dir opens the directory if it already exists.
                root.create_dir(&dir_path).map_err(err)?;
            }
        }
        let mut f = root.create_file(path).map_err(err)?;
        f.truncate().map_err(err)?;
        f.write_all(data).map_err(err)?;
        f.flush().map_err(err)
    }

    /// Removes a file if it exists.
    pub fn remove(&self, path: &str) -> Result<()> {
        match self.fs.root_dir().remove(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::BootWrite {
                file: path.to_string(),
                source,
            }),
        }
    }

    /// Bytes a file of `len` bytes takes on this file system (whole clusters).
    pub fn allocated(&self, len: u64) -> u64 {
        let c = u64::from(self.fs.cluster_size());
        len.div_ceil(c) * c
    }

    /// Free space in bytes.
    pub fn free(&self) -> Result<u64> {
        let s = self.fs.stats().map_err(|source| Error::BootFs { source })?;
        Ok(u64::from(s.free_clusters()) * u64::from(s.cluster_size()))
    }

    /// Writes the file system's bookkeeping (FSInfo, clean flag) and unmounts.
    pub fn unmount(self) -> Result<()> {
        self.fs.unmount().map_err(|source| Error::BootWrite {
            file: "(file system information)".to_string(),
            source,
        })
    }
}
