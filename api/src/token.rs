//! The join token: what a new node needs to join a cluster safely, in one string.
//!
//! ```text
//! BRAMBLE1-<64 hex: SHA-256 of the cluster CA certificate (DER)>-<secret>
//! ```
//!
//! The fingerprint lets the agent check, before it sends anything, that the controller
//! it reached holds a certificate from this cluster's CA, whether the URL came from a
//! flag or from mDNS (as k3s's `K10<hash>::…` and Swarm's `SWMTKN-1-<digest>-…` do). The
//! secret then admits the agent, once per node name: from then on the node uses its own
//! credential.

use std::fmt;
use std::str::FromStr;

/// The token's format marker and version.
pub const PREFIX: &str = "BRAMBLE1-";

/// A CA certificate's SHA-256, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// From 32 bytes of SHA-256.
    pub fn from_digest(digest: &[u8; 32]) -> Fingerprint {
        Fingerprint(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sha256:ab12…` shortened for people (the first 16 digits).
    pub fn short(&self) -> String {
        format!("sha256:{}…", &self.0[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a CA fingerprint is the certificate's SHA-256 as 64 hex digits (optionally `sha256:`-prefixed and with colons), got {got:?}")]
pub struct BadFingerprint {
    /// What was given (cut short).
    pub got: String,
}

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Fingerprint, BadFingerprint> {
        let trimmed = s.trim();
        let hex: String = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .unwrap_or(trimmed)
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Fingerprint(hex))
        } else {
            Err(BadFingerprint {
                got: s.chars().take(80).collect(),
            })
        }
    }
}

/// A secret value (a credential, a Secret's value) that never shows in debug output or
/// logs: `Debug` prints `Secret(..)`. On the wire it is the plain string.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The cluster CA's fingerprint.
    pub ca: Fingerprint,
    /// The secret that admits a new node.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, not even in a debug log.
        f.debug_struct("JoinToken")
            .field("ca", &self.ca.short())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.ca, self.secret)
    }
}

/// Why a join token is unusable. The messages never repeat the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadToken {
    /// No `BRAMBLE1-` prefix: an old token without the CA's fingerprint, or something
    /// else pasted.
    #[error("the join token does not start with {PREFIX}: take the whole token from the controller (its data dir's join-token file); tokens without the CA fingerprint are no longer accepted")]
    Format,
    /// The fingerprint part is not 64 hex digits.
    #[error("the join token's CA fingerprint is not 64 hex digits")]
    Fingerprint,
    /// The secret part is too short, too long or has characters a header cannot carry.
    #[error("the join token's secret must be 16 to 256 visible ASCII characters")]
    Secret,
}

/// Whether `s` can be a secret: 16 to 256 visible ASCII characters.
pub fn valid_secret(s: &str) -> bool {
    (16..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

impl FromStr for JoinToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<JoinToken, BadToken> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(BadToken::Format)?;
        let (fp, secret) = rest.split_once('-').ok_or(BadToken::Format)?;
        if fp.len() != 64 {
            return Err(BadToken::Fingerprint);
        }
        let ca: Fingerprint = fp.parse().map_err(|_| BadToken::Fingerprint)?;
        if !valid_secret(secret) {
            return Err(BadToken::Secret);
        }
        Ok(JoinToken {
            ca,
            secret: secret.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn round_trips_and_hides_its_secret() {
        let t: JoinToken = format!("{PREFIX}{FP}-0123456789abcdef0123")
            .parse()
            .expect("valid");
        assert_eq!(t.ca.as_str(), FP);
        assert_eq!(t.secret, "0123456789abcdef0123");
        assert_eq!(t.to_string(), format!("{PREFIX}{FP}-0123456789abcdef0123"));
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
        assert!(dbg.contains("sha256:9f86d081884c7d65"), "{dbg}");
        // A secret may itself contain dashes.
        let dashed: JoinToken = format!("{PREFIX}{FP}-abc-def-0123456789xyz")
            .parse()
            .expect("valid");
        assert_eq!(dashed.secret, "abc-def-0123456789xyz");
    }

    #[test]
    fn refuses_what_is_not_a_join_token_and_says_why() {
        let cases = [
            ("0123456789abcdef0123456789abcdef", BadToken::Format),
            (
                &format!("{PREFIX}nothex-0123456789abcdef") as &str,
                BadToken::Fingerprint,
            ),
            (
                &format!("{PREFIX}{}-0123456789abcdef", &FP[..60]),
                BadToken::Fingerprint,
            ),
            (
                &format!("{PREFIX}{}zz-0123456789abcdef", &FP[..62]),
                BadToken::Fingerprint,
            ),
            (&format!("{PREFIX}{FP}-short"), BadToken::Secret),
            (&format!("{PREFIX}{FP}-has a space in it"), BadToken::Secret),
            (&format!("{PREFIX}{FP}"), BadToken::Format),
            ("", BadToken::Format),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<JoinToken>(), Err(want.clone()), "{text:?}");
            let msg = want.to_string();
            assert!(!msg.contains("0123456789abcdef"), "no secret in {msg}");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = Secret("hunter2-but-longer".into());
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(..))");
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            "\"hunter2-but-longer\""
        );
    }

    #[test]
    fn fingerprints_are_read_in_the_usual_spellings() {
        let colons: String = FP
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("ascii").to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for s in [
            FP.to_string(),
            format!("sha256:{FP}"),
            colons,
            format!("  {FP}\n"),
        ] {
            assert_eq!(
                s.parse::<Fingerprint>().map(|f| f.0),
                Ok(FP.to_string()),
                "{s}"
            );
        }
        assert!("abc".parse::<Fingerprint>().is_err());
        assert_eq!(
            Fingerprint::from_digest(&[0xab; 32]).as_str(),
            "ab".repeat(32)
        );
    }
}
