//! This node's own credential: made at the agent's first start, kept readable by its
//! owner only in the data dir (`node-credential`), and sent in the first Hello with
//! the join token. From then on the controller admits this node's name only with it,
//! so the join token that sits on every SD card cannot become this node.

use std::io::Write;
use std::path::Path;

use rand::RngCore;

use crate::Error;

/// The credential's file in the data dir.
pub const FILE: &str = "node-credential";

/// Creates `dir` readable by its owner only, and tightens an existing one.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if std::fs::metadata(dir)?.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the credential, or makes and stores one (0600, written whole before it is
/// ever sent, so the controller never knows a credential this node could lose).
pub fn load_or_create(dir: &Path) -> Result<String, Error> {
    let path = dir.join(FILE);
    let err = |source| Error::Credential {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if bramble_api::token::valid_secret(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a node credential (64 hex digits); remove the file to make a new one, then delete the node on the controller so it can join again",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let secret = generate();
    write_private(&path, &secret).map_err(err)?;
    tracing::info!(path = %path.display(), "made this node's credential");
    Ok(secret)
}

/// Writes `text` to `path` atomically, readable by the owner only.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("agent");
        private_dir(&data).expect("dir");
        let a = load_or_create(&data).expect("made");
        let b = load_or_create(&data).expect("read");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&data.join(FILE)), 0o600);
        assert_eq!(mode(&data), 0o700);
        std::fs::write(data.join(FILE), "short").expect("write");
        assert!(
            load_or_create(&data).is_err(),
            "a damaged credential is not replaced silently"
        );
    }
}
