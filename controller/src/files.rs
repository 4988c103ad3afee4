//! Files only their owner may read: the data dir, keys and tokens.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Creates a directory readable by its owner only (the data dir holds the store with
/// the cluster's secrets, the tokens and the keys), and tightens an existing one.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes a secret readable by its owner only, atomically (temp file + rename), ending
/// in a newline.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    if !secret.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Reads a secret file, first making it readable by its owner only if it was not
/// (a key copied in with the default umask).
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "was readable by others; made it 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn secrets_and_their_directory_are_owner_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("data");
        fs::create_dir(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("private");
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("k");
        write_secret(&f, "abc").expect("write");
        assert_eq!(mode(&f), 0o600);
        assert_eq!(fs::read_to_string(&f).expect("read"), "abc\n");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(read_secret(&f).expect("read"), "abc\n");
        assert_eq!(mode(&f), 0o600);
    }
}
