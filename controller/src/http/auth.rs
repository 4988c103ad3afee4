//! Bearer tokens and node credentials. On first start the controller creates an admin
//! token (full access), a join token (a new node's first connection only) and a viewer
//! token (read-only: the dashboard and `GET`s) in its data directory; flags can set them
//! instead. The join token carries the cluster CA's fingerprint
//! (`bramble_api::token`); agents send only its secret part. Each node, at its first
//! join, brings its own credential; the controller keeps only its SHA-256, and from then
//! on that name is admitted only with it ([`credential_hash`]). [`access`] is who may do
//! what.

use std::fs;
use std::path::{Path, PathBuf};

use bramble_api::token::{valid_secret, Fingerprint, JoinToken};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::files::write_secret;

/// The controller's tokens.
#[derive(Clone)]
pub struct Tokens {
    admin: String,
    join: JoinToken,
    viewer: String,
}

/// What the controller keeps of a node credential: its SHA-256, hex.
pub fn credential_hash(credential: &str) -> String {
    let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
    Fingerprint::from_digest(&digest).as_str().to_string()
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

/// Who a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The admin token: everything.
    Admin,
    /// The join token: only the agent link, and only to join a new node.
    Agent,
    /// A node's own credential: only the agent link, as that node.
    Node,
    /// The viewer token: reads only (every `GET` under `/v1` but the agent link).
    Viewer,
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Go ahead.
    Allowed,
    /// No valid token (401).
    Unauthenticated,
    /// A valid token that may not do this (403): a viewer changing state.
    Forbidden,
}

/// Whether `path` needs a token: the API under `/v1` and `/metrics`. The dashboard's
/// page and assets hold no data.
pub fn protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/metrics"
}

/// Who may do what on a [`protected`] path: the admin token everything, the join token
/// only the agent link, a viewer token reads (`GET`, `HEAD`) except the agent link. A
/// join token elsewhere is refused as if invalid, so an agent's token reveals nothing
/// about the API (nor its metrics).
pub fn access(role: Option<Role>, method: &axum::http::Method, path: &str) -> Access {
    use axum::http::Method;
    match role {
        Some(Role::Admin) => Access::Allowed,
        Some(Role::Agent | Role::Node) if path == "/v1/agent" => Access::Allowed,
        Some(Role::Agent | Role::Node) | None => Access::Unauthenticated,
        Some(Role::Viewer) => {
            // A command in a container changes whatever it likes: not a read.
            let exec = path.starts_with("/v1/tasks/") && path.ends_with("/exec");
            if (method == Method::GET || method == Method::HEAD) && path != "/v1/agent" && !exec {
                Access::Allowed
            } else {
                Access::Forbidden
            }
        }
    }
}

/// Where the tokens came from, for the start-up banner.
#[derive(Debug, Clone)]
pub struct TokenFiles {
    /// Admin token file.
    pub admin: PathBuf,
    /// Join token file.
    pub join: PathBuf,
    /// Viewer token file.
    pub viewer: PathBuf,
}

/// A token file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing a token file failed.
    #[error("token file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A token given on the command line or in a file is unusable.
    #[error("{what} must be 16 to 256 visible ASCII characters")]
    Invalid {
        /// Which token.
        what: &'static str,
    },
    /// A join token given whole carries another cluster's CA.
    #[error("the join token's CA fingerprint ({given}) is not this controller's CA ({ours}); give its secret part only, or the token from this data directory")]
    OtherCluster {
        /// The fingerprint in the token.
        given: String,
        /// This controller's.
        ours: String,
    },
}

fn valid(t: &str) -> bool {
    valid_secret(t)
}

fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn load_or_create(
    path: &Path,
    given: Option<String>,
    what: &'static str,
) -> Result<String, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(t) = given {
        if !valid(&t) {
            return Err(TokenError::Invalid { what });
        }
        write_secret(path, &t).map_err(io)?;
        return Ok(t);
    }
    match fs::read_to_string(path) {
        Ok(s) => {
            let t = s.trim().to_string();
            if valid(&t) {
                Ok(t)
            } else {
                Err(TokenError::Invalid { what })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = generate();
            write_secret(path, &t).map_err(io)?;
            Ok(t)
        }
        Err(e) => Err(io(e)),
    }
}

/// The join token's secret from what was given (a secret, or a whole token of this
/// cluster) or stored (a whole token, or the bare secret of an older release), made on
/// first start; the file then holds the whole token.
fn load_join(
    path: &Path,
    given: Option<String>,
    ca: &Fingerprint,
) -> Result<JoinToken, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let secret_of = |text: &str| -> Result<String, TokenError> {
        let text = text.trim();
        match text.parse::<JoinToken>() {
            Ok(t) if t.ca == *ca => Ok(t.secret),
            Ok(t) => Err(TokenError::OtherCluster {
                given: t.ca.short(),
                ours: ca.short(),
            }),
            Err(_) if valid(text) => Ok(text.to_string()),
            Err(_) => Err(TokenError::Invalid {
                what: "the join token",
            }),
        }
    };
    let secret = match given {
        Some(g) => secret_of(&g)?,
        None => match fs::read_to_string(path) {
            Ok(stored) => secret_of(&stored)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate(),
            Err(e) => return Err(io(e)),
        },
    };
    let token = JoinToken {
        ca: ca.clone(),
        secret,
    };
    let whole = token.to_string();
    if fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .ok()
        .as_deref()
        != Some(whole.as_str())
    {
        write_secret(path, &whole).map_err(io)?;
    }
    Ok(token)
}

impl Tokens {
    /// Reads the tokens from `dir`, creating missing ones; a given token replaces the
    /// stored one. `ca` is the cluster CA the join token names.
    pub fn load(
        dir: &Path,
        admin: Option<String>,
        join: Option<String>,
        viewer: Option<String>,
        ca: &Fingerprint,
    ) -> Result<(Tokens, TokenFiles), TokenError> {
        let files = TokenFiles {
            admin: dir.join("admin-token"),
            join: dir.join("join-token"),
            viewer: dir.join("viewer-token"),
        };
        let admin = load_or_create(&files.admin, admin, "the admin token")?;
        let join = load_join(&files.join, join, ca)?;
        let viewer = load_or_create(&files.viewer, viewer, "the viewer token")?;
        Ok((
            Tokens {
                admin,
                join,
                viewer,
            },
            files,
        ))
    }

    /// The viewer (read-only) token.
    pub fn viewer(&self) -> &str {
        &self.viewer
    }

    /// The whole join token, CA fingerprint included (for the embedded agent).
    pub fn join(&self) -> String {
        self.join.to_string()
    }

    /// The admin token.
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// Who holds `token` among the controller's own tokens, if anyone. A node's own
    /// credential is not among them (see [`credential_hash`]). The join token counts
    /// whole or as its secret.
    pub fn role(&self, token: &str) -> Option<Role> {
        let join_secret = token
            .parse::<JoinToken>()
            .ok()
            .filter(|t| t.ca == self.join.ca)
            .map_or_else(|| token.to_string(), |t| t.secret);
        if ct_eq(token.as_bytes(), self.admin.as_bytes()) {
            Some(Role::Admin)
        } else if ct_eq(join_secret.as_bytes(), self.join.secret.as_bytes()) {
            Some(Role::Agent)
        } else if ct_eq(token.as_bytes(), self.viewer.as_bytes()) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Compares in time independent of where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Fingerprint {
        Fingerprint::from_digest(&[7; 32])
    }

    #[test]
    fn creates_tokens_once_and_keeps_them_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, _) = Tokens::load(dir.path(), None, None, None, &ca()).expect("create");
        let (b, files) = Tokens::load(dir.path(), None, None, None, &ca()).expect("reload");
        assert_eq!(a.admin(), b.admin());
        assert_eq!(a.join(), b.join());
        assert_ne!(a.admin(), a.join());
        use std::os::unix::fs::PermissionsExt;
        for f in [&files.admin, &files.join, &files.viewer] {
            let mode = fs::metadata(f).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        // The file holds the whole join token, with the CA's fingerprint.
        let stored = fs::read_to_string(&files.join).expect("join-token");
        let token: JoinToken = stored.trim().parse().expect("a whole join token");
        assert_eq!(token.ca, ca());
        assert_eq!(token.to_string(), a.join());
    }

    #[test]
    fn roles_and_bad_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = Tokens::load(
            dir.path(),
            Some("a".repeat(20)),
            Some("j".repeat(20)),
            None,
            &ca(),
        )
        .expect("given");
        assert_eq!(t.role(&"a".repeat(20)), Some(Role::Admin));
        assert_eq!(
            t.role(&"j".repeat(20)),
            Some(Role::Agent),
            "the secret alone"
        );
        assert_eq!(t.role(&t.join()), Some(Role::Agent), "the whole token");
        let other = JoinToken {
            ca: Fingerprint::from_digest(&[8; 32]),
            secret: "j".repeat(20),
        };
        assert_eq!(t.role(&other.to_string()), None, "another cluster's token");
        assert_eq!(t.role("nope"), None);
        assert_eq!(t.role(""), None);
        assert!(Tokens::load(dir.path(), Some("short".into()), None, None, &ca()).is_err());
        // A whole token of another cluster is refused at start, naming neither secret.
        let Err(err) = Tokens::load(dir.path(), None, Some(other.to_string()), None, &ca()) else {
            panic!("another cluster's token was accepted");
        };
        assert!(matches!(err, TokenError::OtherCluster { .. }), "{err}");
        assert!(!err.to_string().contains(&"j".repeat(20)));
    }

    #[test]
    fn an_old_bare_join_token_becomes_the_secret_of_a_whole_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = "0123456789abcdef0123456789abcdef0123456789abcdef";
        fs::write(dir.path().join("join-token"), format!("{old}\n")).expect("write");
        let (t, _) = Tokens::load(dir.path(), None, None, None, &ca()).expect("upgraded");
        assert_eq!(t.role(old), Some(Role::Agent));
        let stored = fs::read_to_string(dir.path().join("join-token")).expect("file");
        assert_eq!(stored.trim(), format!("BRAMBLE1-{}-{old}", ca()));
    }

    #[test]
    fn viewer_token_is_created_once_and_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, files) = Tokens::load(dir.path(), None, None, None, &ca()).expect("create");
        assert!(files.viewer.exists());
        let (b, _) = Tokens::load(dir.path(), None, None, None, &ca()).expect("reload");
        assert_eq!(a.viewer(), b.viewer());
        assert_ne!(a.viewer(), a.admin());
        assert_eq!(a.role(a.viewer()), Some(Role::Viewer));
        let (c, _) =
            Tokens::load(dir.path(), None, None, Some("v".repeat(20)), &ca()).expect("given");
        assert_eq!(c.role(&"v".repeat(20)), Some(Role::Viewer));
        assert!(Tokens::load(dir.path(), None, None, Some("x".into()), &ca()).is_err());
    }

    #[test]
    fn credentials_are_kept_as_their_hash() {
        let h = credential_hash("node-secret-0123456789");
        assert_eq!(h.len(), 64);
        assert_ne!(h, credential_hash("node-secret-0123456788"));
        assert!(!h.contains("node-secret"));
    }

    #[test]
    fn only_the_api_and_metrics_need_a_token() {
        for p in ["/v1", "/v1/nodes", "/v1/agent", "/metrics"] {
            assert!(protected(p), "{p}");
        }
        for p in [
            "/",
            "/dashboard/app.js",
            "/favicon.ico",
            "/v1x",
            "/metricsx",
        ] {
            assert!(!protected(p), "{p}");
        }
    }

    #[test]
    fn who_may_do_what() {
        use axum::http::Method;
        use Access::*;
        let (a, j, v) = (Some(Role::Admin), Some(Role::Agent), Some(Role::Viewer));
        let n = Some(Role::Node);
        let table: &[(Option<Role>, Method, &str, Access)] = &[
            (a, Method::GET, "/v1/nodes", Allowed),
            (a, Method::POST, "/v1/nodes/pi1/cordon", Allowed),
            (a, Method::DELETE, "/v1/workloads/service/web", Allowed),
            (a, Method::GET, "/v1/agent", Allowed),
            (j, Method::GET, "/v1/agent", Allowed),
            (j, Method::GET, "/v1/nodes", Unauthenticated),
            (j, Method::POST, "/v1/apply", Unauthenticated),
            (n, Method::GET, "/v1/agent", Allowed),
            (n, Method::GET, "/v1/nodes", Unauthenticated),
            (n, Method::GET, "/metrics", Unauthenticated),
            (v, Method::GET, "/v1/nodes", Allowed),
            (v, Method::GET, "/v1/stream", Allowed),
            (v, Method::GET, "/v1/tasks/web-1/logs", Allowed),
            (v, Method::HEAD, "/v1/events", Allowed),
            (v, Method::GET, "/v1/agent", Forbidden),
            (v, Method::POST, "/v1/apply", Forbidden),
            (v, Method::POST, "/v1/nodes/pi1/cordon", Forbidden),
            (
                v,
                Method::POST,
                "/v1/workloads/service/web/restart",
                Forbidden,
            ),
            (v, Method::DELETE, "/v1/workloads/service/web", Forbidden),
            (
                v,
                Method::POST,
                "/v1/workloads/service/web/scale",
                Forbidden,
            ),
            (v, Method::POST, "/v1/tasks/web-1/restart", Forbidden),
            (v, Method::GET, "/v1/tasks/web-1/exec", Forbidden),
            (a, Method::GET, "/v1/tasks/web-1/exec", Allowed),
            (v, Method::POST, "/v1/webhooks/ops/test", Forbidden),
            (v, Method::PUT, "/v1/nodes/pi1", Forbidden),
            (a, Method::GET, "/metrics", Allowed),
            (v, Method::GET, "/metrics", Allowed),
            (j, Method::GET, "/metrics", Unauthenticated),
            (None, Method::GET, "/metrics", Unauthenticated),
            (None, Method::GET, "/v1/nodes", Unauthenticated),
            (None, Method::GET, "/v1/stream", Unauthenticated),
        ];
        for (role, method, path, want) in table {
            assert_eq!(
                access(*role, method, path),
                *want,
                "{role:?} {method} {path}"
            );
        }
    }
}
