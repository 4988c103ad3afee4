//! Which `hostPath` volumes this node lets a container mount: the node's own rule,
//! enforced by its agent whatever the controller sends, so a rogue or compromised
//! controller cannot hand a container the node.
//!
//! A host path is mounted only if:
//! - it follows the universal rules of [`bramble_api::host_path`]: absolute, clean, no
//!   `:`, no control characters, not `/` and not in or under a system path (`/etc`,
//!   `/proc`, `/run`, `/var/lib/docker`, ...);
//! - it is not in or under a path this node reserves ([`Policy::reserve`]: the agent's
//!   data directory, which will hold its credential, and the Docker socket's directory
//!   named by `DOCKER_HOST`);
//! - it is one of the allowed prefixes or under one, by whole segments
//!   (`/var/lib/bramble/volumes-evil` is not under `/var/lib/bramble/volumes`). The
//!   prefixes are the agent's `--allow-host-path` flags, [`DEFAULT_ALLOWED`] if none;
//!   system paths stay refused even under a prefix that covers them;
//! - and, with the file system read ([`check_resolved`]), the part of it that exists
//!   resolves (through symbolic links) to a place that passes the same rules against the
//!   resolved prefixes: a symlink planted inside an allowed directory (by a container
//!   that mounts it) cannot lead a later mount out of it.
//!
//! [`check`] is the pure, lexical part; [`check_resolved`] adds the symlink part and is
//! what the supervisor and the runtime call, in that order, before any directory is
//! made or container created.
//!
//! What remains: a symlink swapped in between the check and Docker's mount (a
//! container racing its own node's agent) is not caught; the check runs again right
//! before the directory is made, which narrows that window but cannot close it, since
//! Docker resolves the source path itself.

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use bramble_api::host_path::{self, PathList};
use bramble_api::manifest::Volume;

/// The allowed prefix when the agent is given none.
pub const DEFAULT_ALLOWED: &str = "/var/lib/bramble/volumes";

/// Why a host path is refused on this node.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// It breaks a rule every node applies (see [`bramble_api::host_path`]).
    #[error(transparent)]
    Rule(#[from] host_path::Refusal),
    /// It is under none of the allowed prefixes.
    #[error("not under an allowed prefix")]
    NotAllowed,
    /// Its existing part resolves through a symbolic link to a refused place.
    #[error("it resolves through a symbolic link to {resolved}, which is {why}", resolved = .resolved.display())]
    Symlink {
        /// Where the path really leads.
        resolved: PathBuf,
        /// What that place breaks (never itself a `Symlink`).
        why: Box<Refusal>,
    },
    /// A symbolic link on the way points to nothing: where it would lead once its
    /// target is made cannot be known.
    #[error("{} is a symbolic link to nothing", .link.display())]
    Dangling {
        /// The link.
        link: PathBuf,
    },
    /// Part of it cannot be read (permissions, a file where a directory should be).
    /// The cause is part of the text (not a `source`): a refusal travels as one line in
    /// a task status.
    #[error("{} cannot be resolved: {error}", .at.display())]
    Unresolvable {
        /// The part that could not be resolved.
        at: PathBuf,
        /// Why.
        error: io::Error,
    },
}

/// A volume of a task that this node refuses, with the rule, for the task's status:
/// `hostPath "/" is refused: a system path; allowed: /var/lib/bramble/volumes`.
#[derive(Debug, thiserror::Error)]
#[error("hostPath {path:?} is refused: {refusal}; allowed: {}", PathList(.allowed))]
pub struct Refused {
    /// The host path as the task gives it.
    pub path: String,
    /// The rule it breaks (in the text already, so not a `source`).
    pub refusal: Refusal,
    /// This node's allowed prefixes.
    pub allowed: Vec<PathBuf>,
}

/// An allowed prefix that cannot be one (an `--allow-host-path` flag).
#[derive(Debug, thiserror::Error)]
#[error("--allow-host-path {path:?}: {refusal}")]
pub struct BadPrefix {
    /// The prefix as given.
    pub path: PathBuf,
    /// The rule it breaks (in the text already).
    pub refusal: host_path::Refusal,
}

/// This node's host path rules: the allowed prefixes and the node's reserved paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allowed: Vec<PathBuf>,
    reserved: Vec<PathBuf>,
}

impl Default for Policy {
    /// [`DEFAULT_ALLOWED`] only, nothing reserved beyond the system paths.
    fn default() -> Self {
        Policy {
            allowed: vec![PathBuf::from(DEFAULT_ALLOWED)],
            reserved: Vec::new(),
        }
    }
}

impl Policy {
    /// A policy allowing `allowed` ([`DEFAULT_ALLOWED`] when empty). Each prefix must
    /// itself follow the universal rules: a prefix that is, or is under, a system path
    /// would allow nothing and is surely a mistake, so it is refused at start.
    pub fn new(allowed: Vec<PathBuf>) -> Result<Policy, BadPrefix> {
        if allowed.is_empty() {
            return Ok(Policy::default());
        }
        for p in &allowed {
            let bad = |refusal| BadPrefix {
                path: p.clone(),
                refusal,
            };
            let text = p.to_str().ok_or_else(|| bad(host_path::Refusal::Control))?;
            host_path::check(text).map_err(bad)?;
        }
        Ok(Policy {
            allowed,
            reserved: Vec::new(),
        })
    }

    /// Also refuses `dir` and everything under it, as if it were a system path (made
    /// absolute against the working directory if relative).
    pub fn reserve(mut self, dir: impl AsRef<Path>) -> Policy {
        let dir = std::path::absolute(dir.as_ref()).unwrap_or_else(|_| dir.as_ref().into());
        self.reserved.push(normalize(&dir));
        self
    }

    /// The allowed prefixes.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
    }

    /// The first volume whose host path this node refuses, with the file system read
    /// (see [`check_resolved`]).
    pub fn check_volumes(&self, volumes: &[Volume]) -> Result<(), Refused> {
        // Managed volumes live in the agent's own data dir, made by the agent.
        for v in volumes.iter().filter(|v| v.name.is_none()) {
            check_resolved(&v.host_path, self).map_err(|refusal| Refused {
                path: v.host_path.clone(),
                refusal,
                allowed: self.allowed.clone(),
            })?;
        }
        Ok(())
    }
}

/// The Docker socket's directory from a `DOCKER_HOST` value (`unix:///run/x/docker.sock`
/// → `/run/x`); `/var/run` without one. None for a TCP engine.
pub fn docker_socket_dir(docker_host: Option<&str>) -> Option<PathBuf> {
    let socket = match docker_host {
        None | Some("") => "/var/run/docker.sock",
        Some(h) => h.strip_prefix("unix://")?,
    };
    Path::new(socket).parent().map(Path::to_path_buf)
}

/// The lexical rules (see the module doc): no file system is read.
pub fn check(path: &str, policy: &Policy) -> Result<(), Refusal> {
    host_path::check(path)?;
    check_placed(Path::new(path), &policy.allowed, &policy.reserved)
}

/// Not reserved, and under an allowed prefix. `path` is clean and absolute.
fn check_placed(path: &Path, allowed: &[PathBuf], reserved: &[PathBuf]) -> Result<(), Refusal> {
    let text = path.to_string_lossy();
    host_path::check_not_under(&text, reserved.iter().filter_map(|r| r.to_str()))?;
    if allowed.iter().any(|prefix| path.starts_with(prefix)) {
        Ok(())
    } else {
        Err(Refusal::NotAllowed)
    }
}

/// [`check`], then the symlink rule: the longest existing ancestor of `path` is
/// resolved, and the place the path really leads to must be neither a system path nor
/// reserved, and must be under one of the allowed prefixes as they themselves resolve
/// (an operator may well make `/var/lib/bramble/volumes` a link to an SSD). A link to
/// nothing on the way is refused, and so is a part that cannot be read: fail closed.
pub fn check_resolved(path: &str, policy: &Policy) -> Result<(), Refusal> {
    check(path, policy)?;
    let real = resolve(Path::new(path))?;
    // A prefix that cannot be resolved (a link to nothing yet) is taken as written.
    let allowed: Vec<PathBuf> = policy
        .allowed
        .iter()
        .map(|p| resolve(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let reserved: Vec<PathBuf> = policy
        .reserved
        .iter()
        .map(|p| resolve(p).unwrap_or_else(|_| p.clone()))
        .chain(policy.reserved.iter().cloned())
        .collect();
    let text = real.to_string_lossy();
    let verdict = host_path::check_not_under(&text, host_path::SYSTEM_PATHS.iter().copied())
        .map_err(Refusal::from)
        .and_then(|()| check_placed(&real, &allowed, &reserved));
    verdict.map_err(|why| Refusal::Symlink {
        resolved: real.clone(),
        why: Box::new(why),
    })
}

/// Where `path` (absolute, clean) really leads: its longest existing ancestor
/// canonicalized, with the part that does not exist yet appended.
fn resolve(path: &Path) -> Result<PathBuf, Refusal> {
    let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
    let mut at = path;
    loop {
        match std::fs::symlink_metadata(at) {
            Ok(meta) => {
                return match std::fs::canonicalize(at) {
                    Ok(mut real) => {
                        real.extend(missing.iter().rev());
                        Ok(real)
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound && meta.is_symlink() => {
                        Err(Refusal::Dangling {
                            link: at.to_path_buf(),
                        })
                    }
                    Err(error) => Err(Refusal::Unresolvable {
                        at: at.to_path_buf(),
                        error,
                    }),
                };
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
                    // `/` always exists; only a relative path gets here.
                    return Err(Refusal::Unresolvable {
                        at: at.to_path_buf(),
                        error: e,
                    });
                };
                missing.push(name);
                at = parent;
            }
            Err(error) => {
                return Err(Refusal::Unresolvable {
                    at: at.to_path_buf(),
                    error,
                })
            }
        }
    }
}

/// `dir` without `.` segments or a trailing `/` (`..` is left: it only comes from an
/// operator's flag, made absolute, and then lexically harmless to compare).
fn normalize(dir: &Path) -> PathBuf {
    dir.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "allowed: {}", PathList(&self.allowed))?;
        if !self.reserved.is_empty() {
            write!(f, "; reserved: {}", PathList(&self.reserved))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> Policy {
        Policy::new(allowed.iter().map(PathBuf::from).collect()).expect("valid prefixes")
    }

    fn refusal(path: &str, p: &Policy) -> String {
        match check(path, p) {
            Ok(()) => "allowed".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_default_allows_only_bramble_volumes() {
        let p = Policy::new(Vec::new()).expect("the default");
        assert_eq!(p, Policy::default());
        assert_eq!(p.allowed(), [PathBuf::from(DEFAULT_ALLOWED)]);
        assert!(check("/var/lib/bramble/volumes/ltc", &p).is_ok());
        assert!(check("/var/lib/bramble/volumes", &p).is_ok());
        assert!(check("/var/lib/bramble/volumes/ltc/blocks/", &p).is_ok());
        assert!(matches!(
            check("/var/lib/bramble", &p),
            Err(Refusal::NotAllowed)
        ));
        assert!(matches!(check("/srv/pool", &p), Err(Refusal::NotAllowed)));
    }

    #[test]
    fn every_rule_refuses_lexically() {
        let p = policy(&["/var/lib/bramble/volumes", "/srv/pool"])
            .reserve("/var/lib/bramble-agent")
            .reserve("/srv/pool/docker");
        let cases = [
            // Allowed: under a prefix, by whole segments.
            ("/var/lib/bramble/volumes/ltc", "allowed"),
            ("/srv/pool", "allowed"),
            ("/srv/pool/a/b/c", "allowed"),
            ("/srv/pool/dockerfiles", "allowed"),
            // Not under a prefix.
            (
                "/var/lib/bramble/volumes-evil",
                "not under an allowed prefix",
            ),
            ("/var/lib/bramble/volume", "not under an allowed prefix"),
            ("/srv/poolside", "not under an allowed prefix"),
            ("/srv", "not under an allowed prefix"),
            ("/home/pi", "not under an allowed prefix"),
            // The universal rules.
            ("/", "a system path"),
            ("/etc", "a system path"),
            ("/etc/shadow", "under the system path /etc"),
            ("/var/run", "a system path"),
            ("/var/run/docker.sock", "under the system path /var/run"),
            ("/proc/self", "under the system path /proc"),
            ("relative", "not an absolute path"),
            ("", "not an absolute path"),
            ("/srv/pool/../../etc", "has a '..' segment"),
            ("/srv/pool/./x", "not a clean path"),
            ("/srv//pool", "not a clean path"),
            (
                "/srv/pool/x:/etc",
                "contains ':', which Docker's bind syntax would read as a separator",
            ),
            ("/srv/pool/x:ro", "contains ':'"),
            ("/srv/pool/x\0", "contains a control character"),
            // The node's reserved paths, even under an allowed prefix.
            ("/var/lib/bramble-agent", "a system path"),
            (
                "/var/lib/bramble-agent/node-credential",
                "under the system path /var/lib/bramble-agent",
            ),
            (
                "/srv/pool/docker/docker.sock",
                "under the system path /srv/pool/docker",
            ),
        ];
        for (path, want) in cases {
            let got = refusal(path, &p);
            assert!(got.starts_with(want), "{path:?}: {got}");
        }
    }

    #[test]
    fn system_paths_stay_refused_under_a_prefix_that_covers_them() {
        // Prefixes under a system path are refused as flags...
        for bad in [
            "/",
            "/etc",
            "/etc/bramble",
            "/run/user",
            "/var/lib/docker",
            "/var/run",
            "relative",
            "/a/../b",
            "/a:b",
        ] {
            assert!(Policy::new(vec![PathBuf::from(bad)]).is_err(), "{bad}");
        }
        let e = Policy::new(vec!["/".into()]).expect_err("refused");
        assert_eq!(e.to_string(), "--allow-host-path \"/\": a system path");
        // ...and a broad one that covers system paths still refuses them.
        let p = policy(&["/var"]);
        assert!(check("/var/cache/x", &p).is_ok());
        assert!(check("/var/run/docker.sock", &p).is_err());
        assert!(check("/var/lib/docker", &p).is_err());
        assert!(check("/var/lib/docker/overlay2", &p).is_err());
        assert!(check("/var/lib/containerd", &p).is_err());
    }

    #[test]
    fn a_refused_volume_names_its_path_the_rule_and_what_is_allowed() {
        let p = Policy::default();
        let vol = |path: &str| Volume {
            name: None,
            host_path: path.into(),
            path: "/data".into(),
            read_only: false,
        };
        let e = p
            .check_volumes(&[vol("/var/lib/bramble/volumes/ok"), vol("/")])
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "hostPath \"/\" is refused: a system path; allowed: /var/lib/bramble/volumes"
        );
        let e = p.check_volumes(&[vol("/srv/x")]).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "hostPath \"/srv/x\" is refused: not under an allowed prefix; allowed: /var/lib/bramble/volumes"
        );
        assert!(p.check_volumes(&[]).is_ok());
    }

    #[test]
    fn the_docker_socket_directory_comes_from_docker_host() {
        let dir = |h: Option<&str>| docker_socket_dir(h);
        assert_eq!(dir(None), Some(PathBuf::from("/var/run")));
        assert_eq!(dir(Some("")), Some(PathBuf::from("/var/run")));
        assert_eq!(
            dir(Some("unix:///srv/node1/docker.sock")),
            Some(PathBuf::from("/srv/node1"))
        );
        assert_eq!(dir(Some("tcp://10.0.0.2:2375")), None);
    }

    /// A temp dir with `allowed/` and `outside/` in it, resolved (the temp dir itself
    /// may sit behind a link, as on macOS).
    fn layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = std::fs::canonicalize(dir.path()).expect("resolves");
        let allowed = root.join("allowed");
        let outside = root.join("outside");
        std::fs::create_dir_all(&allowed).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        (dir, allowed, outside)
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn a_symlink_out_of_the_allowed_prefix_is_refused() {
        let (_dir, allowed, outside) = layout();
        let p = Policy::new(vec![allowed.clone()]).expect("valid");
        let link = allowed.join("escape");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");

        // Lexically fine, really outside: the link itself, through it, and deeper
        // paths that do not exist yet.
        for path in [link.clone(), link.join("x"), link.join("not/yet/made")] {
            assert!(check(&s(&path), &p).is_ok(), "lexically allowed");
            match check_resolved(&s(&path), &p) {
                Err(Refusal::Symlink { resolved, why }) => {
                    assert!(resolved.starts_with(&outside), "{}", resolved.display());
                    assert!(matches!(*why, Refusal::NotAllowed), "{why}");
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        assert!(!outside.join("x").exists() && !outside.join("not").exists());

        // A link that stays inside is fine.
        std::fs::create_dir(allowed.join("real")).expect("mkdir");
        std::os::unix::fs::symlink(allowed.join("real"), allowed.join("alias")).expect("symlink");
        assert!(check_resolved(&s(&allowed.join("alias/new")), &p).is_ok());
        // And so is a plain directory, existing or not.
        assert!(check_resolved(&s(&allowed.join("real")), &p).is_ok());
        assert!(check_resolved(&s(&allowed.join("fresh/deeper")), &p).is_ok());
    }

    #[test]
    fn a_symlink_to_a_system_path_is_refused_as_one() {
        let (_dir, allowed, _) = layout();
        let p = Policy::new(vec![allowed.clone()]).expect("valid");
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).expect("symlink");
        let e = check_resolved(&s(&allowed.join("etc/cron.d")), &p).expect_err("refused");
        assert_eq!(
            e.to_string(),
            "it resolves through a symbolic link to /etc/cron.d, which is under the system path /etc"
        );
        std::os::unix::fs::symlink("/", allowed.join("root")).expect("symlink");
        let e = check_resolved(&s(&allowed.join("root")), &p).expect_err("refused");
        assert!(e.to_string().ends_with("which is a system path"), "{e}");
    }

    #[test]
    fn a_link_to_nothing_and_an_unreadable_path_are_refused() {
        let (_dir, allowed, outside) = layout();
        let p = Policy::new(vec![allowed.clone()]).expect("valid");
        std::os::unix::fs::symlink(outside.join("later"), allowed.join("dangling"))
            .expect("symlink");
        for path in [allowed.join("dangling"), allowed.join("dangling/x")] {
            assert!(
                matches!(check_resolved(&s(&path), &p), Err(Refusal::Dangling { .. })),
                "{}",
                path.display()
            );
        }
        // A file where a directory should be.
        std::fs::write(allowed.join("file"), "x").expect("write");
        assert!(matches!(
            check_resolved(&s(&allowed.join("file/x")), &p),
            Err(Refusal::Unresolvable { .. })
        ));
    }

    #[test]
    fn an_allowed_prefix_that_is_itself_a_link_allows_what_is_under_its_target() {
        let (_dir, allowed, outside) = layout();
        // The operator keeps volumes on another disk: `volumes` → `outside`.
        let volumes = allowed.join("volumes");
        std::os::unix::fs::symlink(&outside, &volumes).expect("symlink");
        let p = Policy::new(vec![volumes.clone()]).expect("valid");
        assert!(check_resolved(&s(&volumes.join("ltc")), &p).is_ok());
        // Yet a link under it that leaves the target is refused.
        std::os::unix::fs::symlink(&allowed, outside.join("up")).expect("symlink");
        assert!(matches!(
            check_resolved(&s(&volumes.join("up/x")), &p),
            Err(Refusal::Symlink { .. })
        ));
    }

    #[test]
    fn a_reserved_directory_is_refused_through_links_too() {
        let (_dir, allowed, _) = layout();
        let data = allowed.join("agent-data");
        std::fs::create_dir(&data).expect("mkdir");
        let p = Policy::new(vec![allowed.clone()])
            .expect("valid")
            .reserve(&data);
        assert!(check_resolved(&s(&data.join("x")), &p).is_err());
        std::os::unix::fs::symlink(&data, allowed.join("innocent")).expect("symlink");
        let e = check_resolved(&s(&allowed.join("innocent")), &p).expect_err("refused");
        assert!(matches!(e, Refusal::Symlink { .. }), "{e}");
    }
}
