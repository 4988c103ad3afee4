//! `bramble-gate UNIX_MS -- COMMAND [ARG...]`: waits until the wall-clock instant
//! `UNIX_MS` (milliseconds since the epoch), then replaces itself with `COMMAND`.
//!
//! Starting a container takes Docker a few hundred milliseconds (shim, namespaces,
//! cgroups, mounts), too long for a cron run that must begin at its slot. The agent
//! therefore starts a run's container ahead of the slot with this program, bind-mounted
//! read-only, as its entrypoint; the run's own command begins when the gate execs it,
//! a fraction of a millisecond after the slot, and never before it.
//!
//! - The command keeps the container's PID 1, environment, user and working directory,
//!   so signals and exit codes are the command's own, as without the gate.
//! - A SIGTERM, SIGINT, SIGHUP or SIGQUIT before the slot (the run was called off, the
//!   node is draining) ends the gate without running the command: exit 128 + signal.
//! - A command that cannot be run ends the gate with 127 (not found) or 126 (any other
//!   reason), as a shell does, with the reason on stderr.
//!
//! It must run in any image, `FROM scratch` ones too: build it static (a musl target).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::thread::{clock_nanosleep_absolute, ClockId, Timespec};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str = "usage: bramble-gate UNIX_MS -- COMMAND [ARG...]";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (at, command) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("bramble-gate: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // PID 1 of a container ignores signals it has no handler for: without this thread a
    // run called off before its slot would wait for Docker's SIGKILL.
    match Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    eprintln!(
                        "bramble-gate: signal {sig} before the slot; the command did not run"
                    );
                    std::process::exit(128 + sig);
                }
            });
        }
        Err(e) => eprintln!("bramble-gate: cannot handle SIGTERM: {e}"),
    }
    wait_until(at);
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    eprintln!(
        "bramble-gate: cannot run {:?}: {err}",
        command[0].to_string_lossy()
    );
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// The instant and the command, from `UNIX_MS -- COMMAND [ARG...]`.
fn parse(args: &[OsString]) -> Result<(SystemTime, &[OsString]), String> {
    let [ms, dashes, command @ ..] = args else {
        return Err("missing arguments".to_string());
    };
    if dashes != "--" {
        return Err(format!("expected \"--\" after the instant, got {dashes:?}"));
    }
    if command.is_empty() {
        return Err("no command to run".to_string());
    }
    let ms: u64 = ms
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("invalid instant {ms:?} (milliseconds since the epoch)"))?;
    let at = UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(|| format!("instant {ms} is out of range"))?;
    Ok((at, command))
}

/// Sleeps until the wall clock reads `at`: an absolute sleep on the real-time clock, so
/// a clock step while waiting moves the wake-up with it.
fn wait_until(at: SystemTime) {
    let Ok(since_epoch) = at.duration_since(UNIX_EPOCH) else {
        return;
    };
    let Ok(tv_sec) = i64::try_from(since_epoch.as_secs()) else {
        return;
    };
    let request = Timespec {
        tv_sec,
        tv_nsec: since_epoch.subsec_nanos().into(),
    };
    // Interrupted by a signal handler: sleep again until the instant.
    while clock_nanosleep_absolute(ClockId::Realtime, &request).is_err() {
        if SystemTime::now() >= at {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_instant_and_the_command() {
        let a = args(&["1700000000123", "--", "/bin/job", "-x"]);
        let (at, command) = parse(&a).expect("valid");
        assert_eq!(at, UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(command, &args(&["/bin/job", "-x"])[..]);
    }

    #[test]
    fn refuses_bad_arguments_with_what_was_wrong() {
        for (a, want) in [
            (vec![], "missing arguments"),
            (vec!["1"], "missing arguments"),
            (vec!["1", "--"], "no command"),
            (vec!["1", "-x", "/bin/job"], "expected \"--\""),
            (vec!["soon", "--", "/bin/job"], "invalid instant \"soon\""),
            (vec!["-5", "--", "/bin/job"], "invalid instant"),
        ] {
            let err = parse(&args(&a)).expect_err("invalid");
            assert!(err.contains(want), "{a:?}: {err}");
        }
    }

    #[test]
    fn an_instant_in_the_past_does_not_wait() {
        let t = std::time::Instant::now();
        wait_until(UNIX_EPOCH + Duration::from_secs(1));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
