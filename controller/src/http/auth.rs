//! Bearer tokens. On first start the controller creates an admin token (full access), a
//! join token (agents only) and a viewer token (read-only: the dashboard and `GET`s) in
//! its data directory; flags can set them instead. [`access`] is who may do what.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;

/// The controller's tokens.
#[derive(Clone)]
pub struct Tokens {
    admin: String,
    join: String,
    viewer: String,
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
    /// The join token: only the agent link.
    Agent,
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
        Some(Role::Agent) if path == "/v1/agent" => Access::Allowed,
        Some(Role::Agent) | None => Access::Unauthenticated,
        Some(Role::Viewer) => {
            if (method == Method::GET || method == Method::HEAD) && path != "/v1/agent" {
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
}

fn valid(t: &str) -> bool {
    (16..=256).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic())
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

/// Writes a secret readable by its owner only, atomically (temp file + rename).
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

impl Tokens {
    /// Reads the tokens from `dir`, creating missing ones; a given token replaces the
    /// stored one.
    pub fn load(
        dir: &Path,
        admin: Option<String>,
        join: Option<String>,
    ) -> Result<(Tokens, TokenFiles), TokenError> {
        Tokens::load_with_viewer(dir, admin, join, None)
    }

    /// [`Tokens::load`], with the viewer token given too.
    pub fn load_with_viewer(
        dir: &Path,
        admin: Option<String>,
        join: Option<String>,
        viewer: Option<String>,
    ) -> Result<(Tokens, TokenFiles), TokenError> {
        let files = TokenFiles {
            admin: dir.join("admin-token"),
            join: dir.join("join-token"),
            viewer: dir.join("viewer-token"),
        };
        let admin = load_or_create(&files.admin, admin, "the admin token")?;
        let join = load_or_create(&files.join, join, "the join token")?;
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

    /// The join token (for the embedded agent).
    pub fn join(&self) -> &str {
        &self.join
    }

    /// The admin token.
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// Who holds `token`, if anyone.
    pub fn role(&self, token: &str) -> Option<Role> {
        if ct_eq(token.as_bytes(), self.admin.as_bytes()) {
            Some(Role::Admin)
        } else if ct_eq(token.as_bytes(), self.join.as_bytes()) {
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

    #[test]
    fn creates_tokens_once_and_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, _) = Tokens::load(dir.path(), None, None).expect("create");
        let (b, files) = Tokens::load(dir.path(), None, None).expect("reload");
        assert_eq!(a.admin(), b.admin());
        assert_eq!(a.join(), b.join());
        assert_ne!(a.admin(), a.join());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.admin)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn roles_and_bad_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) =
            Tokens::load(dir.path(), Some("a".repeat(20)), Some("j".repeat(20))).expect("given");
        assert_eq!(t.role(&"a".repeat(20)), Some(Role::Admin));
        assert_eq!(t.role(&"j".repeat(20)), Some(Role::Agent));
        assert_eq!(t.role("nope"), None);
        assert_eq!(t.role(""), None);
        assert!(Tokens::load(dir.path(), Some("short".into()), None).is_err());
    }

    #[test]
    fn viewer_token_is_created_once_and_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, files) = Tokens::load(dir.path(), None, None).expect("create");
        assert!(files.viewer.exists());
        let (b, _) = Tokens::load(dir.path(), None, None).expect("reload");
        assert_eq!(a.viewer(), b.viewer());
        assert_ne!(a.viewer(), a.admin());
        assert_eq!(a.role(a.viewer()), Some(Role::Viewer));
        let (c, _) =
            Tokens::load_with_viewer(dir.path(), None, None, Some("v".repeat(20))).expect("given");
        assert_eq!(c.role(&"v".repeat(20)), Some(Role::Viewer));
        assert!(Tokens::load_with_viewer(dir.path(), None, None, Some("x".into())).is_err());
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
        let table: &[(Option<Role>, Method, &str, Access)] = &[
            (a, Method::GET, "/v1/nodes", Allowed),
            (a, Method::POST, "/v1/nodes/pi1/cordon", Allowed),
            (a, Method::DELETE, "/v1/workloads/service/web", Allowed),
            (a, Method::GET, "/v1/agent", Allowed),
            (j, Method::GET, "/v1/agent", Allowed),
            (j, Method::GET, "/v1/nodes", Unauthenticated),
            (j, Method::POST, "/v1/apply", Unauthenticated),
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
