//! The client configuration file and which controller a command talks to.
//!
//! The file is `$BRAMBLE_CONFIG` or `~/.bramble/config.yaml`:
//!
//! ```yaml
//! current-context: pool
//! contexts:
//!   - name: pool
//!     server: https://bramble.local:7878   # or a list: [https://a:7878, https://b:7878]
//!     token: s3cret
//!     certificate-authority-fingerprint: 9f86d081884c7d65…
//! ```
//!
//! The controller and token come from, last one winning: the default
//! (`https://127.0.0.1:7878`, no token) < the context (`--context`, `BRAMBLE_CONTEXT` or
//! `current-context`) < `BRAMBLE_SERVER` / `BRAMBLE_TOKEN` < `--server` / `--token`.
//! The cluster CA the controller must prove it holds comes the same way:
//! the context's `certificate-authority-fingerprint` < `BRAMBLE_CA_FINGERPRINT` <
//! `--ca-fingerprint` or `--certificate-authority FILE` (as kubectl's, for one call).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::output::describe_io;

/// Where the controller is when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7878";

/// What `config view` shows instead of a token.
pub const REDACTED: &str = "REDACTED";

/// Config file problems.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `$BRAMBLE_CONFIG` nor `$HOME` is set.
    #[error("cannot find the config file: set BRAMBLE_CONFIG or HOME")]
    NoPath,
    /// The file exists but cannot be read.
    #[error("cannot read config file {}: {}", path.display(), describe_io(cause))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error("invalid config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml's message, with its line and column.
        message: String,
    },
    /// The file cannot be written.
    #[error("cannot write config file {}: {}", path.display(), describe_io(cause))]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: io::Error,
    },
    /// A context is named that the file does not have.
    #[error("context {name:?} not found in {}", path.display())]
    NoContext {
        /// The missing context.
        name: String,
        /// The file.
        path: PathBuf,
    },
}

/// The config file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigFile {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Known controllers.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One controller and its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Name to pick it by.
    pub name: String,
    /// Base URL, e.g. `https://bramble.local:7878`; several controllers of one cluster
    /// comma-separated, or as a YAML list (kept comma-separated).
    #[serde(deserialize_with = "one_or_many")]
    pub server: String,
    /// Bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The SHA-256 of the cluster CA certificate the controller must prove it holds
    /// (64 hex digits), pinned by `login` or `config set-context --ca-fingerprint`.
    #[serde(
        default,
        rename = "certificate-authority-fingerprint",
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_fingerprint: Option<String>,
}

/// A server setting: one string, or a list of them (joined with commas).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Servers {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Servers::deserialize(d)? {
        Servers::One(s) => s,
        Servers::Many(v) => v.join(","),
    })
}

/// The config file's path: `$BRAMBLE_CONFIG`, else `$HOME/.bramble/config.yaml`.
pub fn default_path(bramble_config: Option<&str>, home: Option<&Path>) -> Result<PathBuf, Error> {
    match (bramble_config.filter(|s| !s.is_empty()), home) {
        (Some(p), _) => Ok(PathBuf::from(p)),
        (None, Some(h)) => Ok(h.join(".bramble").join("config.yaml")),
        (None, None) => Err(Error::NoPath),
    }
}

/// The config file's path from this process's environment.
pub fn path_from_env() -> Result<PathBuf, Error> {
    let config = std::env::var("BRAMBLE_CONFIG").ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    default_path(config.as_deref(), home.as_deref())
}

impl ConfigFile {
    /// Reads the file; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<ConfigFile, Error> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
            Err(cause) => {
                return Err(Error::Read {
                    path: path.to_path_buf(),
                    cause,
                })
            }
        };
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        serde_yaml::from_str(&text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Writes the file, readable by its owner only (it holds tokens), creating its
    /// directory. The new content replaces the old in one rename, so a crash never
    /// leaves half a file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let err = |cause| Error::Write {
            path: path.to_path_buf(),
            cause,
        };
        let text = serde_yaml::to_string(self).expect("a config always serializes");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(err)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = private_file(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(err)
    }

    /// The named context.
    pub fn context(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// Creates or updates a context; returns whether it was new. A new context becomes
    /// the current one when there is none yet.
    pub fn set_context(
        &mut self,
        name: &str,
        server: Option<String>,
        token: Option<String>,
        ca_fingerprint: Option<String>,
    ) -> bool {
        if let Some(c) = self.contexts.iter_mut().find(|c| c.name == name) {
            if let Some(s) = server {
                c.server = s;
            }
            if token.is_some() {
                c.token = token.filter(|t| !t.is_empty());
            }
            if ca_fingerprint.is_some() {
                c.ca_fingerprint = ca_fingerprint.filter(|t| !t.is_empty());
            }
            return false;
        }
        self.contexts.push(Context {
            name: name.to_string(),
            server: server.unwrap_or_else(|| DEFAULT_SERVER.to_string()),
            token: token.filter(|t| !t.is_empty()),
            ca_fingerprint: ca_fingerprint.filter(|t| !t.is_empty()),
        });
        if self.current_context.is_none() {
            self.current_context = Some(name.to_string());
        }
        true
    }

    /// The same config with every token replaced by [`REDACTED`].
    pub fn redacted(&self) -> ConfigFile {
        let mut c = self.clone();
        for ctx in &mut c.contexts {
            if ctx.token.is_some() {
                ctx.token = Some(REDACTED.to_string());
            }
        }
        c
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` only applies to new files; a left-over temporary file keeps its own.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> io::Result<fs::File> {
    fs::File::create(path)
}

/// What the command line and the environment say about the target; `None` is unsaid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--context`, else `BRAMBLE_CONTEXT`.
    pub context: Option<String>,
    /// `BRAMBLE_SERVER`.
    pub env_server: Option<String>,
    /// `BRAMBLE_TOKEN`.
    pub env_token: Option<String>,
    /// `--server`.
    pub flag_server: Option<String>,
    /// `--token`.
    pub flag_token: Option<String>,
    /// `BRAMBLE_CA_FINGERPRINT`.
    pub env_ca_fingerprint: Option<String>,
    /// `--ca-fingerprint`.
    pub flag_ca_fingerprint: Option<String>,
    /// `--certificate-authority FILE`.
    pub flag_ca_file: Option<PathBuf>,
}

/// How the controller's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Its chain must hold the CA with this SHA-256 (hex, as given).
    Fingerprint(String),
    /// Its chain must hold the CA certificate in this PEM file.
    File(PathBuf),
}

/// The controller a command talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Base URL.
    pub server: String,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// The context it came from, if any.
    pub context: Option<String>,
    /// The CA to check the controller against; `None` until pinned.
    pub trust: Option<Trust>,
}

/// Picks server and token: default < context < environment < flags. Empty values count
/// as unset, so `BRAMBLE_TOKEN=` does not send an empty token.
pub fn resolve(file: &ConfigFile, path: &Path, o: &Overrides) -> Result<Target, Error> {
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let name = nonempty(&o.context).or_else(|| nonempty(&file.current_context));
    let ctx = match &name {
        Some(n) => Some(file.context(n).ok_or_else(|| Error::NoContext {
            name: n.clone(),
            path: path.to_path_buf(),
        })?),
        None => None,
    };
    let server = nonempty(&o.flag_server)
        .or_else(|| nonempty(&o.env_server))
        .or_else(|| ctx.map(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = nonempty(&o.flag_token)
        .or_else(|| nonempty(&o.env_token))
        .or_else(|| ctx.and_then(|c| nonempty(&c.token)));
    let trust = o
        .flag_ca_file
        .clone()
        .map(Trust::File)
        .or_else(|| nonempty(&o.flag_ca_fingerprint).map(Trust::Fingerprint))
        .or_else(|| nonempty(&o.env_ca_fingerprint).map(Trust::Fingerprint))
        .or_else(|| {
            ctx.and_then(|c| nonempty(&c.ca_fingerprint))
                .map(Trust::Fingerprint)
        });
    Ok(Target {
        server,
        token,
        context: name,
        trust,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> ConfigFile {
        ConfigFile {
            current_context: Some("home".into()),
            contexts: vec![
                Context {
                    name: "home".into(),
                    server: "https://home:7878".into(),
                    token: Some("home-token".into()),
                    ca_fingerprint: Some("ab".repeat(32)),
                },
                Context {
                    name: "lab".into(),
                    server: "https://lab:7878".into(),
                    token: None,
                    ca_fingerprint: None,
                },
            ],
        }
    }

    fn resolve_ok(f: &ConfigFile, o: Overrides) -> Target {
        resolve(f, Path::new("c.yaml"), &o).expect("resolves")
    }

    #[test]
    fn nothing_configured_means_the_local_default() {
        let t = resolve_ok(&ConfigFile::default(), Overrides::default());
        assert_eq!(t.server, DEFAULT_SERVER);
        assert_eq!(t.token, None);
        assert_eq!(t.context, None);
    }

    #[test]
    fn current_context_is_used() {
        let t = resolve_ok(&file(), Overrides::default());
        assert_eq!(t.server, "https://home:7878");
        assert_eq!(t.token.as_deref(), Some("home-token"));
        assert_eq!(t.context.as_deref(), Some("home"));
        assert_eq!(t.trust, Some(Trust::Fingerprint("ab".repeat(32))));
    }

    #[test]
    fn context_flag_picks_another_context() {
        let t = resolve_ok(
            &file(),
            Overrides {
                context: Some("lab".into()),
                ..Overrides::default()
            },
        );
        assert_eq!(t.server, "https://lab:7878");
        assert_eq!(t.token, None);
    }

    #[test]
    fn environment_beats_context_and_flags_beat_environment() {
        let env = Overrides {
            env_server: Some("http://env:1".into()),
            env_token: Some("env-token".into()),
            ..Overrides::default()
        };
        let t = resolve_ok(&file(), env.clone());
        assert_eq!(t.server, "http://env:1");
        assert_eq!(t.token.as_deref(), Some("env-token"));

        let flags = Overrides {
            flag_server: Some("http://flag:2".into()),
            flag_token: Some("flag-token".into()),
            ..env
        };
        let t = resolve_ok(&file(), flags);
        assert_eq!(t.server, "http://flag:2");
        assert_eq!(t.token.as_deref(), Some("flag-token"));
    }

    #[test]
    fn the_ca_comes_from_a_file_the_flag_the_environment_or_the_context() {
        let base = Overrides::default();
        let t = resolve_ok(
            &file(),
            Overrides {
                env_ca_fingerprint: Some("ef".repeat(32)),
                ..base.clone()
            },
        );
        assert_eq!(t.trust, Some(Trust::Fingerprint("ef".repeat(32))));
        let t = resolve_ok(
            &file(),
            Overrides {
                env_ca_fingerprint: Some("ef".repeat(32)),
                flag_ca_fingerprint: Some("01".repeat(32)),
                ..base.clone()
            },
        );
        assert_eq!(t.trust, Some(Trust::Fingerprint("01".repeat(32))));
        let t = resolve_ok(
            &file(),
            Overrides {
                flag_ca_fingerprint: Some("01".repeat(32)),
                flag_ca_file: Some(PathBuf::from("/var/lib/bramble/ca.crt")),
                ..base.clone()
            },
        );
        assert_eq!(
            t.trust,
            Some(Trust::File(PathBuf::from("/var/lib/bramble/ca.crt")))
        );
        let t = resolve_ok(
            &file(),
            Overrides {
                context: Some("lab".into()),
                ..base
            },
        );
        assert_eq!(t.trust, None, "not pinned yet");
    }

    #[test]
    fn each_field_falls_back_on_its_own() {
        let t = resolve_ok(
            &file(),
            Overrides {
                flag_server: Some("http://flag:2".into()),
                env_token: Some(String::new()),
                ..Overrides::default()
            },
        );
        assert_eq!(t.server, "http://flag:2");
        assert_eq!(t.token.as_deref(), Some("home-token"));
    }

    #[test]
    fn an_unknown_context_is_an_error() {
        let err = resolve(
            &file(),
            Path::new("c.yaml"),
            &Overrides {
                context: Some("nope".into()),
                ..Overrides::default()
            },
        )
        .expect_err("must fail");
        assert_eq!(err.to_string(), "context \"nope\" not found in c.yaml");
    }

    #[test]
    fn path_prefers_bramble_config_over_home() {
        let home = Path::new("/home/pi");
        assert_eq!(
            default_path(Some("/etc/b.yaml"), Some(home)).ok(),
            Some(PathBuf::from("/etc/b.yaml"))
        );
        assert_eq!(
            default_path(None, Some(home)).ok(),
            Some(PathBuf::from("/home/pi/.bramble/config.yaml"))
        );
        assert!(default_path(Some(""), None).is_err());
    }

    #[test]
    fn file_round_trips_with_owner_only_permissions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub").join("config.yaml");
        assert_eq!(
            ConfigFile::load(&path).expect("missing is empty"),
            ConfigFile::default()
        );
        let f = file();
        f.save(&path).expect("saves");
        assert_eq!(ConfigFile::load(&path).expect("loads"), f);
        let text = fs::read_to_string(&path).expect("readable");
        assert!(text.contains("current-context: home"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_broken_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.yaml");
        fs::write(&path, "contexts: 3\n").expect("writes");
        let err = ConfigFile::load(&path).expect_err("must fail").to_string();
        assert!(err.starts_with("invalid config file "), "{err}");
    }

    #[test]
    fn set_context_creates_then_updates() {
        let mut f = ConfigFile::default();
        assert!(f.set_context("a", Some("https://a".into()), Some("t".into()), None));
        assert_eq!(f.current_context.as_deref(), Some("a"));
        assert!(!f.set_context("a", None, Some("u".into()), Some("cd".repeat(32))));
        assert_eq!(f.context("a").map(|c| c.server.as_str()), Some("https://a"));
        assert_eq!(f.context("a").and_then(|c| c.token.as_deref()), Some("u"));
        assert_eq!(
            f.context("a").and_then(|c| c.ca_fingerprint.clone()),
            Some("cd".repeat(32)),
            "the pinned CA is kept with the context"
        );
        assert!(f.set_context("b", None, None, None));
        assert_eq!(f.current_context.as_deref(), Some("a"));
        assert_eq!(
            f.context("b").map(|c| c.server.as_str()),
            Some(DEFAULT_SERVER)
        );
    }

    #[test]
    fn redacted_hides_tokens_only() {
        let r = file().redacted();
        assert_eq!(r.contexts[0].token.as_deref(), Some(REDACTED));
        assert_eq!(r.contexts[1].token, None);
        assert_eq!(r.contexts[0].server, "https://home:7878");
        assert!(
            r.contexts[0].ca_fingerprint.is_some(),
            "a fingerprint is no secret"
        );
    }
}
