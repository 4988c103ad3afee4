//! The rules every `hostPath` follows on every node, whatever that node allows.
//!
//! A `hostPath` volume puts a directory of the node inside a container, so it is the
//! widest door a manifest can open: `/` or `/etc` would hand the container the node
//! itself, the Docker socket's directory the whole engine. Two checks guard it:
//!
//! - these universal rules ([`check`]): the controller applies them to every manifest
//!   (an error with file, line and column at apply time) and every agent applies them
//!   again to every task it is sent, since it must not trust a controller blindly;
//! - each agent's own allow list (`--allow-host-path`), which only the agent knows and
//!   enforces, on top of these rules and after resolving symbolic links.
//!
//! The rules are lexical (no file system is read here):
//! - the path is absolute and clean: no `.` or `..` segment and no `//` (a single
//!   trailing `/` is harmless and allowed), so what is checked is what is mounted;
//! - no `:`: Docker's short bind syntax is `src:dst:options`, so a `:` in a path could
//!   smuggle in options or a second path. Agents mount with the structured Mount API,
//!   which has no such syntax, but a path that needs a `:` is refused everywhere so a
//!   manifest means the same on every runtime;
//! - no control characters (NUL cuts a path short in C, newlines forge log lines);
//! - not `/` itself and nothing in or under a [`SYSTEM_PATHS`] entry. These are refused
//!   even where an agent's allow list covers them.

use std::fmt;
use std::path::Path;

/// Directories a container must never mount, nor anything under them. `/` is refused
/// separately and only as itself (everything is under it).
///
/// Beyond the operating system's own trees: `/run` and `/var/run` hold the Docker socket
/// (its directory on a stock install), and `/var/lib/docker` and `/var/lib/containerd`
/// every container's file system and every image, so mounting any of them hands over
/// the whole engine.
pub const SYSTEM_PATHS: &[&str] = &[
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/boot",
    "/root",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/var/lib/docker",
    "/var/lib/containerd",
];

/// Why a host path is refused: which rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Empty, or does not start with `/`.
    #[error("not an absolute path")]
    NotAbsolute,
    /// Has a `..` segment.
    #[error("has a '..' segment")]
    ParentSegment,
    /// Has a `.` segment or an empty one (`//`).
    #[error("not a clean path (no '.' segments, no '//')")]
    NotClean,
    /// Has a `:`.
    #[error("contains ':', which Docker's bind syntax would read as a separator")]
    Colon,
    /// Has a control character (NUL, newline, ...).
    #[error("contains a control character")]
    Control,
    /// Is a system path, or under one.
    #[error("{}", system_text(root, *exact))]
    System {
        /// The system path: one of [`SYSTEM_PATHS`], `/`, or a path a node refuses as
        /// one of its own (e.g. its agent's data directory).
        root: String,
        /// Whether the path is `root` itself rather than something under it.
        exact: bool,
    },
}

fn system_text(root: &str, exact: bool) -> String {
    if exact {
        "a system path".to_string()
    } else {
        format!("under the system path {root}")
    }
}

impl Refusal {
    /// Whether the path is merely written badly (not absolute, `..`): the error the
    /// manifest check has always given for those.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Refusal::NotAbsolute | Refusal::ParentSegment)
    }
}

/// Checks `path` against the universal rules (see the module doc).
pub fn check(path: &str) -> Result<(), Refusal> {
    check_form(path)?;
    check_not_under(path, SYSTEM_PATHS.iter().copied())
}

/// The rules about how a path is written: absolute, clean, no `:` and no control
/// characters. No list of system paths is consulted.
pub fn check_form(path: &str) -> Result<(), Refusal> {
    if !path.starts_with('/') {
        return Err(Refusal::NotAbsolute);
    }
    if path.chars().any(char::is_control) {
        return Err(Refusal::Control);
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    if segments.contains(&"..") {
        return Err(Refusal::ParentSegment);
    }
    if path.contains(':') {
        return Err(Refusal::Colon);
    }
    let last = segments.len() - 1;
    let unclean = segments
        .iter()
        .enumerate()
        // An empty last segment is a trailing `/` (or the path `/`): harmless.
        .any(|(i, s)| *s == "." || (s.is_empty() && i != last));
    if unclean {
        return Err(Refusal::NotClean);
    }
    Ok(())
}

/// Refuses `/` itself and every path that is one of `roots` or under one (by whole
/// segments: `/etcetera` is not under `/etc`). `path` should already pass
/// [`check_form`].
pub fn check_not_under<'a>(
    path: &str,
    roots: impl IntoIterator<Item = &'a str>,
) -> Result<(), Refusal> {
    let p = Path::new(path);
    if p == Path::new("/") {
        return Err(Refusal::System {
            root: "/".to_string(),
            exact: true,
        });
    }
    for root in roots {
        let r = Path::new(root);
        // `/` as a root would refuse everything: it is refused only as itself, above.
        if r != Path::new("/") && p.starts_with(r) {
            return Err(Refusal::System {
                root: root.to_string(),
                exact: p == r,
            });
        }
    }
    Ok(())
}

/// `"/a", "/b"`: a list of paths for a message.
pub struct PathList<'a, P>(pub &'a [P]);

impl<P: AsRef<Path>> fmt::Display for PathList<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", p.as_ref().display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_follow_every_rule_pass() {
        for ok in [
            "/var/lib/bramble/volumes",
            "/var/lib/bramble/volumes/ltc",
            "/var/lib/bramble/volumes/ltc/",
            "/srv/pool",
            "/home/pi/data",
            "/mnt/ssd/wallet.dat",
            "/etcetera",
            "/usrdata/x",
            "/var/runner",
            "/var/lib/dockerish",
            "/opt/a b/c",
            "/tmp/x",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn each_rule_refuses_its_paths() {
        use Refusal::*;
        let sys = |root: &str, exact: bool| System {
            root: root.to_string(),
            exact,
        };
        let cases: &[(&str, Refusal)] = &[
            ("", NotAbsolute),
            ("data", NotAbsolute),
            ("./data", NotAbsolute),
            ("~/data", NotAbsolute),
            ("/a/../etc", ParentSegment),
            ("/..", ParentSegment),
            ("/var/lib/bramble/volumes/..", ParentSegment),
            ("/a/./b", NotClean),
            ("/.", NotClean),
            ("/var//lib", NotClean),
            ("//etc", NotClean),
            ("/var/lib/bramble/volumes//x", NotClean),
            ("/var/lib/bramble/volumes/x:/etc", Colon),
            ("/var/lib/bramble/volumes/x:rw", Colon),
            ("/data:ro", Colon),
            ("/var/lib/x\0/etc", Control),
            ("/var/lib/x\n", Control),
            ("/", sys("/", true)),
            ("/etc", sys("/etc", true)),
            ("/etc/", sys("/etc", true)),
            ("/etc/bramble/stratum", sys("/etc", false)),
            ("/proc/1/root", sys("/proc", false)),
            ("/sys", sys("/sys", true)),
            ("/dev/mem", sys("/dev", false)),
            ("/run", sys("/run", true)),
            ("/run/docker.sock", sys("/run", false)),
            ("/var/run", sys("/var/run", true)),
            ("/var/run/docker.sock", sys("/var/run", false)),
            ("/boot/firmware", sys("/boot", false)),
            ("/root/.ssh", sys("/root", false)),
            ("/usr", sys("/usr", true)),
            ("/usr/local/bin", sys("/usr", false)),
            ("/bin", sys("/bin", true)),
            ("/sbin", sys("/sbin", true)),
            ("/lib", sys("/lib", true)),
            ("/lib/modules", sys("/lib", false)),
            ("/lib64", sys("/lib64", true)),
            ("/var/lib/docker", sys("/var/lib/docker", true)),
            ("/var/lib/docker/volumes/x", sys("/var/lib/docker", false)),
            ("/var/lib/containerd", sys("/var/lib/containerd", true)),
        ];
        for (path, want) in cases {
            assert_eq!(check(path).as_ref(), Err(want), "{path:?}");
        }
    }

    #[test]
    fn every_system_path_is_refused_as_itself_and_below() {
        for root in SYSTEM_PATHS {
            assert!(
                matches!(check(root), Err(Refusal::System { exact: true, .. })),
                "{root}"
            );
            let below = format!("{root}/x/y");
            assert!(
                matches!(check(&below), Err(Refusal::System { exact: false, .. })),
                "{below}"
            );
            // A sibling that merely shares the prefix as text is not under it.
            let sibling = format!("{root}-data");
            assert_eq!(check(&sibling), Ok(()), "{sibling}");
        }
    }

    #[test]
    fn other_roots_are_refused_by_whole_segments() {
        let roots = ["/var/lib/bramble-agent", "/srv/docker"];
        let check = |p: &str| check_not_under(p, roots.iter().copied());
        assert!(check("/var/lib/bramble-agent").is_err());
        assert!(check("/var/lib/bramble-agent/node-credential").is_err());
        assert!(check("/srv/docker/docker.sock").is_err());
        assert_eq!(check("/var/lib/bramble-agent2"), Ok(()));
        assert_eq!(check("/srv/dockerfiles"), Ok(()));
        assert!(
            check_not_under("/x", ["/"]).is_ok(),
            "`/` as a root refuses only itself"
        );
        assert!(check_not_under("/", []).is_err());
    }

    #[test]
    fn refusals_read_as_the_rule_they_break() {
        assert_eq!(
            check("/").expect_err("refused").to_string(),
            "a system path"
        );
        assert_eq!(
            check("/etc/bramble").expect_err("refused").to_string(),
            "under the system path /etc"
        );
        assert_eq!(
            check("/v/x:/etc").expect_err("refused").to_string(),
            "contains ':', which Docker's bind syntax would read as a separator"
        );
        assert_eq!(
            PathList(&["/a", "/b/c"]).to_string(),
            "/a, /b/c",
            "lists for messages"
        );
        assert_eq!(PathList::<&str>(&[]).to_string(), "(none)");
    }
}
