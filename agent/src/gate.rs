//! The cron gate: starts a run's container ahead of its slot, holding its command until
//! the slot.
//!
//! Docker takes a few hundred milliseconds to start a container (more on a Pi), so a
//! run started at its slot begins that much late. A run sent ahead of its slot
//! ([`Assignment::not_before`]) is therefore started early with `bramble-gate` (the
//! `gate` crate, a static program) bind-mounted read-only at [`TARGET`] as its
//! entrypoint; the gate sleeps until the slot and then execs the run's own command, which
//! keeps PID 1, so signals, exit codes and logs are the command's, as without the gate.
//! Stopped before the slot, the gate exits and the command never runs.
//!
//! The gate must run in any image, `FROM scratch` ones included, so only a statically
//! linked executable is used ([`check`]). Without one, runs are started by Docker at
//! their slot, as before.
//!
//! [`Assignment::not_before`]: bramble_api::wire::Assignment::not_before

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};

/// Where the gate is mounted in a container.
pub const TARGET: &str = "/.bramble/gate";

/// The file name the agent looks for beside its own executable.
pub const FILE_NAME: &str = "bramble-gate";

/// Why a file cannot be the gate.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an executable file")]
    NotExecutable { path: PathBuf },
    #[error("{path} is not an ELF executable ({why})")]
    NotElf { path: PathBuf, why: &'static str },
    #[error(
        "{path} is dynamically linked (it names an ELF interpreter), so it cannot run in \
         images without one: build it static, e.g. \
         `cargo build --release -p bramble-gate --target aarch64-unknown-linux-musl`"
    )]
    Dynamic { path: PathBuf },
    #[error("{path} is built for another machine (ELF machine {found}), not this {want} node")]
    Arch {
        path: PathBuf,
        found: u16,
        want: &'static str,
    },
}

/// A usable gate, shared by every clone of the runtime.
#[derive(Debug)]
pub struct Gate {
    path: PathBuf,
    /// Set when a container could not run the gate: runs are then started at their
    /// slot for the agent's life.
    broken: AtomicBool,
    /// Set once a container ran the gate (it was still waiting a moment after its
    /// start): later runs are not watched for that.
    proven: AtomicBool,
}

impl Gate {
    /// The gate at `path`, if [`check`] finds it usable.
    pub fn open(path: &Path) -> Result<Gate, GateError> {
        Ok(Gate {
            path: check(path)?,
            broken: AtomicBool::new(false),
            proven: AtomicBool::new(false),
        })
    }

    /// The gate's absolute path on this node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether runs may be started through it.
    pub fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// Stops using the gate; true the first time.
    pub fn mark_broken(&self) -> bool {
        !self.broken.swap(true, Ordering::Relaxed)
    }

    /// Whether a container has run the gate on this node already.
    pub fn proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }

    /// Notes that a container ran the gate; true the first time.
    pub fn mark_proven(&self) -> bool {
        !self.proven.swap(true, Ordering::Relaxed)
    }
}

/// The gate to use: `explicit` (an operator's `--cron-gate`), which must be usable, or
/// else [`FILE_NAME`] beside the agent's executable when that one is (a file there that
/// is not is logged and skipped: runs still start, just through Docker).
pub fn find(explicit: Option<&Path>, exe: Option<&Path>) -> Result<Option<Gate>, GateError> {
    if let Some(path) = explicit {
        return Gate::open(path).map(Some);
    }
    let Some(beside) = exe.and_then(Path::parent).map(|dir| dir.join(FILE_NAME)) else {
        return Ok(None);
    };
    if !beside.exists() {
        return Ok(None);
    }
    match Gate::open(&beside) {
        Ok(gate) => Ok(Some(gate)),
        // A development build puts a dynamically linked one there (`cargo build` builds
        // for the host's glibc): expected, so said plainly rather than warned about.
        Err(e) => {
            tracing::info!(error = %e, "not using the cron gate found beside the agent");
            Ok(None)
        }
    }
}

/// Checks that `path` is a regular, executable, statically linked ELF file; returns its
/// absolute path (Docker's bind mounts need one).
pub fn check(path: &Path) -> Result<PathBuf, GateError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| GateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let abs = std::fs::canonicalize(path).map_err(read)?;
    let meta = std::fs::metadata(&abs).map_err(read)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(GateError::NotExecutable { path: abs });
    }
    let bytes = std::fs::read(&abs).map_err(read)?;
    match bramble_api::elf::has_interpreter(&bytes) {
        Ok(false) => {}
        Ok(true) => return Err(GateError::Dynamic { path: abs }),
        Err(why) => return Err(GateError::NotElf { path: abs, why }),
    }
    let found = bramble_api::elf::machine(&bytes).map_err(|why| GateError::NotElf {
        path: abs.clone(),
        why,
    })?;
    match host_machine() {
        Some(want) if want != found => Err(GateError::Arch {
            path: abs,
            found,
            want: std::env::consts::ARCH,
        }),
        _ => Ok(abs),
    }
}

/// The ELF machine this agent runs on (`e_machine`), if it is one Bramble builds for.
pub fn host_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(62),
        "aarch64" => Some(183),
        "arm" => Some(40),
        "x86" => Some(3),
        "riscv64" => Some(243),
        _ => None,
    }
}

/// The entrypoint and command of a run started through the gate at `at`: the gate,
/// the instant and `--`, then the command Docker would have run — the task's own
/// `command` and `args`, else the image's, by Docker's rules (a task's `command`
/// drops the image's default arguments). None when there is no command at all (Docker
/// then refuses the create itself, with its own message).
pub fn gated_command(
    at: DateTime<Utc>,
    command: Option<&[String]>,
    args: Option<&[String]>,
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
) -> Option<(Vec<String>, Vec<String>)> {
    let entry = command.or(image_entrypoint).unwrap_or_default();
    let args = match command {
        Some(_) => args.unwrap_or_default(),
        None => args.or(image_cmd).unwrap_or_default(),
    };
    let run: Vec<String> = entry.iter().chain(args).cloned().collect();
    if run.is_empty() {
        return None;
    }
    let ms = at.timestamp_millis().max(0);
    let entrypoint = vec![TARGET.to_string(), ms.to_string(), "--".to_string()];
    Some((entrypoint, run))
}

/// How long the agent watches the node's first gated container: an exec failure ends
/// it within milliseconds, and the watch allows for a loaded node.
pub const WATCH: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a run due at `at` may start through the gate at `now`: always once a
/// container ran the gate on this node, else only with time to watch it before the
/// slot (a run whose gate failed unwatched would be lost).
pub fn may_use(proven: bool, now: DateTime<Utc>, at: DateTime<Utc>) -> bool {
    let watch = chrono::Duration::from_std(WATCH).unwrap_or_default();
    proven || now + watch * 2 < at
}

/// Whether a Docker error is about the gate itself (the engine could not exec it).
pub fn blames_gate(message: &str) -> bool {
    message.contains(TARGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_gated_command_follows_dockers_rules_for_command_and_args() {
        let at = DateTime::parse_from_rfc3339("2026-12-03T04:00:00.250Z")
            .expect("time")
            .with_timezone(&Utc);
        let gate = v(&[TARGET, "1796270400250", "--"]);
        let (img_e, img_c) = (v(&["/entry"]), v(&["img-arg"]));
        let (cmd, args) = (v(&["/job"]), v(&["-x"]));
        type Case<'a> = (
            Option<&'a [String]>,
            Option<&'a [String]>,
            Option<&'a [String]>,
            Option<&'a [String]>,
            Option<Vec<String>>,
        );
        let cases: [Case; 7] = [
            // The task's command and args replace the image's.
            (
                Some(&cmd),
                Some(&args),
                Some(&img_e),
                Some(&img_c),
                Some(v(&["/job", "-x"])),
            ),
            // A task's command alone drops the image's default arguments.
            (
                Some(&cmd),
                None,
                Some(&img_e),
                Some(&img_c),
                Some(v(&["/job"])),
            ),
            // Args alone follow the image's entrypoint.
            (
                None,
                Some(&args),
                Some(&img_e),
                Some(&img_c),
                Some(v(&["/entry", "-x"])),
            ),
            // Nothing set: the image's entrypoint and default arguments.
            (
                None,
                None,
                Some(&img_e),
                Some(&img_c),
                Some(v(&["/entry", "img-arg"])),
            ),
            // An image with a command only.
            (None, None, None, Some(&img_c), Some(v(&["img-arg"]))),
            // No command anywhere: not gated.
            (None, None, None, None, None),
            (None, Some(&[][..]), None, None, None),
        ];
        for (command, args, ie, ic, want) in cases {
            let got = gated_command(at, command, args, ie, ic);
            match want {
                Some(run) => assert_eq!(got, Some((gate.clone(), run))),
                None => assert_eq!(got, None),
            }
        }
    }

    #[test]
    fn an_executable_for_another_machine_is_refused() {
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(bramble_api::elf::machine(&exe).ok(), host_machine());
        let dir = tempfile::tempdir().expect("dir");
        // Made static-looking (no interpreter) and for another machine.
        let mut elf = vec![0u8; 64];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[0x36] = 56;
        elf[0x12..0x14].copy_from_slice(&(host_machine().unwrap_or(62) ^ 0x100).to_le_bytes());
        let path = dir.path().join("gate");
        std::fs::write(&path, &elf).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = check(&path).expect_err("other machine");
        assert!(matches!(err, GateError::Arch { .. }), "{err}");
        assert!(
            err.to_string().contains("built for another machine"),
            "{err}"
        );
        // The same file for this machine passes.
        if let Some(m) = host_machine() {
            elf[0x12..0x14].copy_from_slice(&m.to_le_bytes());
            std::fs::write(&path, &elf).expect("write");
            assert!(check(&path).is_ok());
        }
    }

    #[test]
    fn check_refuses_what_cannot_be_the_gate_and_names_it() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("nope");
        assert!(matches!(check(&missing), Err(GateError::Read { .. })));
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\n").expect("write");
        assert!(matches!(check(&text), Err(GateError::NotExecutable { .. })));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = check(&text).expect_err("not ELF");
        assert!(err.to_string().contains("not an ELF executable"), "{err}");
        assert!(matches!(
            check(dir.path()),
            Err(GateError::NotExecutable { .. })
        ));
        if Path::new("/bin/ls").exists() {
            let err = check(Path::new("/bin/ls")).expect_err("dynamic");
            assert!(err.to_string().contains("dynamically linked"), "{err}");
            // Found beside an executable, a dynamic one is skipped, not an error.
            let beside = dir.path().join(FILE_NAME);
            std::fs::copy("/bin/ls", &beside).expect("copy");
            let found = find(None, Some(&dir.path().join("bramble-agent"))).expect("skipped");
            assert!(found.is_none());
            // Named by the operator, it is an error.
            assert!(find(Some(&beside), None).is_err());
        }
        assert!(find(None, Some(&dir.path().join("bramble-agent")))
            .expect("none")
            .is_none());
    }

    #[test]
    fn an_unproven_gate_is_used_only_with_time_to_watch_it() {
        let at = DateTime::parse_from_rfc3339("2026-12-03T04:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let ms = chrono::Duration::milliseconds;
        for (proven, ahead, want) in [
            (false, 2000, true),
            (false, 1001, true),
            (false, 1000, false),
            (false, 300, false),
            (false, -5, false),
            (true, 2000, true),
            (true, 1, true),
        ] {
            assert_eq!(
                may_use(proven, at - ms(ahead), at),
                want,
                "{proven} {ahead}"
            );
        }
    }

    #[test]
    fn a_broken_gate_is_reported_once() {
        let exe = std::env::current_exe().expect("exe");
        let gate = Gate {
            path: exe,
            broken: AtomicBool::new(false),
            proven: AtomicBool::new(false),
        };
        assert!(gate.usable());
        assert!(gate.mark_broken());
        assert!(!gate.mark_broken());
        assert!(!gate.usable());
        assert!(!gate.proven());
        assert!(gate.mark_proven());
        assert!(!gate.mark_proven());
        assert!(gate.proven());
    }
}
