//! The key Secrets are sealed with: 32 random bytes, made on first start and kept as
//! hex in `DATA_DIR/secrets.key` (0600), never in the store, so a copy of the database
//! (a backup, an SD card) alone reveals no value. Each value is sealed with
//! ChaCha20-Poly1305 under a fresh random nonce, with its Secret's name and key as
//! associated data: a sealed value moved to another place in the store does not open.
//!
//! Losing the key loses the values (the Secrets must then be applied again); the
//! controller says so at start when it finds values it cannot open.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use bramble_api::token::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::core::model::Sealed;
use crate::core::secrets::Sealer;
use crate::core::Snapshot;
use crate::files;

/// The key's file in the data dir.
pub const KEY_FILE: &str = "secrets.key";

const VERSION: &str = "v1:";

/// Why the key cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The file cannot be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error("{path}: not a Secrets key (64 hex digits); restore it from a backup, or move it away to make a new one and apply every Secret again")]
    Invalid {
        /// The file.
        path: PathBuf,
    },
    /// The system's random generator failed.
    #[error("cannot make a Secrets key: the system's random number generator failed")]
    Random,
}

/// Seals and opens Secret values with the cluster's key.
pub struct Vault {
    key: LessSafeKey,
    rng: SystemRandom,
    id: String,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(..)")
    }
}

impl Vault {
    /// A vault over a given key.
    pub fn from_key(bytes: &[u8; 32]) -> Vault {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .expect("a 32-byte key is always a ChaCha20-Poly1305 key");
        // Names the key without revealing it: controllers sharing a store compare ids.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"bramble/secrets-key-id/");
        ctx.update(bytes);
        let id = ctx.finish().as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Vault {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
            id,
        }
    }

    /// A one-way id of the key (not the key): equal ids, equal keys.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Loads the key from `dir`, or makes it there on first start.
    pub fn load(dir: &Path) -> Result<Vault, VaultError> {
        let path = dir.join(KEY_FILE);
        let io = |source| VaultError::Io {
            path: path.clone(),
            source,
        };
        match files::read_secret(&path) {
            Ok(text) => {
                let bytes = decode_hex(text.trim())
                    .ok_or_else(|| VaultError::Invalid { path: path.clone() })?;
                Ok(Vault::from_key(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| VaultError::Random)?;
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                files::write_secret(&path, &hex).map_err(io)?;
                Ok(Vault::from_key(&bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The Secrets in `snap` with a value this key does not open: sealed with another
    /// key (the key file was lost or replaced) or damaged.
    pub fn unreadable(&self, snap: &Snapshot) -> Vec<String> {
        snap.secrets
            .values()
            .filter(|s| {
                s.value
                    .data
                    .iter()
                    .any(|(k, v)| self.open(&s.value.name, k, v).is_none())
            })
            .map(|s| s.value.name.clone())
            .collect()
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn aad(secret: &str, key: &str) -> String {
    format!("bramble/secret/{secret}/{key}")
}

impl Sealer for Vault {
    fn seal(&self, secret: &str, key: &str, value: &Secret) -> Option<Sealed> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = value.0.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(secret, key).as_bytes()),
                &mut buf,
            )
            .ok()?;
        let mut all = nonce.to_vec();
        all.extend_from_slice(&buf);
        Some(Sealed(format!(
            "{VERSION}{}",
            base64::engine::general_purpose::STANDARD.encode(all)
        )))
    }

    fn open(&self, secret: &str, key: &str, sealed: &Sealed) -> Option<Secret> {
        let b64 = sealed.0.strip_prefix(VERSION)?;
        let all = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        if all.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = all.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(secret, key).as_bytes()), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok().map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret(s: &str) -> Secret {
        Secret(s.to_string())
    }

    #[test]
    fn values_open_only_where_they_were_sealed_and_only_with_the_key() {
        let v = Vault::from_key(&[7; 32]);
        let s = v
            .seal("ltc-rpc", "password", &secret("hunter2"))
            .expect("seal");
        assert!(s.0.starts_with("v1:"));
        assert!(!s.0.contains("hunter2"));
        assert_eq!(v.open("ltc-rpc", "password", &s), Some(secret("hunter2")));
        // Fresh nonce: the same value seals differently every time.
        let again = v
            .seal("ltc-rpc", "password", &secret("hunter2"))
            .expect("seal");
        assert_ne!(s, again);
        // Moved to another key or Secret: refused.
        assert_eq!(v.open("ltc-rpc", "user", &s), None);
        assert_eq!(v.open("other", "password", &s), None);
        // Another key: refused.
        assert_eq!(
            Vault::from_key(&[8; 32]).open("ltc-rpc", "password", &s),
            None
        );
        // Tampered with, cut short, not base64, no version: refused.
        let mut bytes = s.0.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = Sealed(String::from_utf8(bytes).expect("ascii"));
        for bad in [
            tampered,
            Sealed("v1:AAAA".into()),
            Sealed("v1:!!".into()),
            Sealed(s.0.trim_start_matches("v1:").to_string()),
        ] {
            assert_eq!(v.open("ltc-rpc", "password", &bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_key_is_made_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tmp");
        let v = Vault::load(dir.path()).expect("made");
        let path = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = v.seal("a", "b", &secret("c")).expect("seal");
        let again = Vault::load(dir.path()).expect("loaded");
        assert_eq!(again.open("a", "b", &s), Some(secret("c")));
        std::fs::write(&path, "not hex").expect("write");
        let e = Vault::load(dir.path()).expect_err("refused");
        assert!(e.to_string().contains("not a Secrets key"), "{e}");
    }
}
