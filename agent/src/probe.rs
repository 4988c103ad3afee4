//! Health probes: liveness and readiness checks of a running container, each exactly one
//! of exec, HTTP GET or TCP connect.
//!
//! The supervisor starts one prober ([`watch`]) per probed container run and aborts it
//! when the container stops, is removed or replaced; a restart is a new run with a fresh
//! schedule. Probing runs in its own task, so a slow probe never holds up the
//! supervisor's converge loop. A prober only reports verdicts ([`Report`]); what they
//! mean (restart, readiness in the task status) is the supervisor's decision.
//!
//! - exec: the command runs in the container through Docker's exec API; healthy iff it
//!   exits 0 within the timeout. A command still running at the timeout is left to end
//!   on its own (Docker cannot kill an exec).
//! - http: `GET http://<container IP>:<port><path>` with a tiny HTTP/1.1 client (the agent
//!   stays small); healthy iff the status is 2xx or 3xx within the timeout.
//! - tcp: healthy iff a connection to `<container IP>:<port>` is accepted within the
//!   timeout.
//!
//! HTTP and TCP probes connect to the container's IP address on its Docker network, so
//! they need the agent in the host's network namespace (as it runs on a Pi); an agent in
//! another namespace can only use exec probes.
//!
//! Counting ([`Tally`]): the first probe is due `initialDelay` after the container
//! started, then one every `period`. `failureThreshold` failures in a row make a failed
//! verdict, a success resets the count. A failed liveness verdict ends the prober (the
//! supervisor stops and restarts the container); readiness goes on, true after each first
//! success, false after each threshold of failures.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bramble_api::duration::Duration as ApiDuration;
use bramble_api::manifest::{Probe, Probes};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, warn};

use crate::runtime::{error_chain, Engine, Observed};

/// The shortest period between two probes of one kind, whatever the manifest says: a Pi
/// has better things to do.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);

/// The longest HTTP status line read before giving up on the answer.
const MAX_STATUS_LINE: usize = 1024;

/// One run of a container: from one start to its exit. A restart is a new run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Run {
    /// Container id.
    pub container: String,
    /// When this run started (Docker's `StartedAt`).
    pub started_at: Option<DateTime<Utc>>,
}

impl Run {
    /// The current (or, once it exited, the last) run of an observed container.
    pub fn of(c: &Observed) -> Run {
        Run {
            container: c.id.clone(),
            started_at: c.started_at,
        }
    }
}

/// What a probe checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check<'a> {
    /// Run a command in the container.
    Exec(&'a [String]),
    /// HTTP GET of a path on a container port.
    Http {
        /// Container port.
        port: u16,
        /// Request path.
        path: &'a str,
    },
    /// TCP connect to a container port.
    Tcp {
        /// Container port.
        port: u16,
    },
}

impl<'a> Check<'a> {
    /// The probe's check; None if it names none (validation forbids that). Should it
    /// name several, exec wins over http over tcp.
    pub fn of(probe: &'a Probe) -> Option<Check<'a>> {
        if let Some(cmd) = &probe.exec {
            return Some(Check::Exec(cmd));
        }
        if let Some(h) = &probe.http {
            return Some(Check::Http {
                port: h.port,
                path: &h.path,
            });
        }
        probe.tcp.as_ref().map(|t| Check::Tcp { port: t.port })
    }

    /// How a status message names the check: `GET /healthz`, `TCP port 8080`,
    /// `exec litecoin-cli getblockcount`.
    pub fn describe(&self) -> String {
        match self {
            Check::Exec(cmd) => format!("exec {}", cmd.join(" ")),
            Check::Http { path, .. } => format!("GET {path}"),
            Check::Tcp { port } => format!("TCP port {port}"),
        }
    }
}

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// A failure restarts the container.
    Liveness,
    /// The result is the task's readiness.
    Readiness,
}

impl Which {
    fn as_str(self) -> &'static str {
        match self {
            Which::Liveness => "liveness",
            Which::Readiness => "readiness",
        }
    }
}

/// Consecutive results of one probe and the verdict they add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Failures in a row.
    pub failures: u32,
    /// The verdict so far; None before the first success or failed threshold.
    pub healthy: Option<bool>,
}

impl Tally {
    /// Folds one probe result in. Returns the new tally and the verdict if it changed:
    /// `Some(true)` at a success after no verdict or a failed one, `Some(false)` when the
    /// failures in a row reach `threshold` (at least 1).
    pub fn step(self, ok: bool, threshold: u32) -> (Tally, Option<bool>) {
        if ok {
            let next = Tally {
                failures: 0,
                healthy: Some(true),
            };
            (next, (self.healthy != Some(true)).then_some(true))
        } else {
            let failures = self.failures.saturating_add(1);
            let failed = failures >= threshold.max(1);
            let next = Tally {
                failures,
                healthy: if failed { Some(false) } else { self.healthy },
            };
            (
                next,
                (failed && self.healthy != Some(false)).then_some(false),
            )
        }
    }
}

/// How long after `now` the first probe of a run is due: `initial_delay` after the
/// container started, or at once if that has passed. A run without a start time
/// waits the whole delay from now.
pub fn first_probe_in(
    started_at: Option<DateTime<Utc>>,
    initial_delay: Duration,
    now: DateTime<Utc>,
) -> Duration {
    let due = started_at.and_then(|s| {
        chrono::Duration::from_std(initial_delay)
            .ok()
            .and_then(|d| s.checked_add_signed(d))
    });
    match due {
        Some(due) => (due - now).to_std().unwrap_or(Duration::ZERO),
        None => initial_delay,
    }
}

/// The status code of an HTTP/1.x answer's status line (`HTTP/1.1 200 OK`).
pub fn http_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// What a prober found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The liveness probe failed `failureThreshold` times in a row; the text says how
    /// (`liveness probe failed 3 times: GET /healthz: timed out after 1s`).
    LivenessFailed(String),
    /// The readiness probe's verdict changed.
    Ready(bool),
}

/// A verdict about one run of one task's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Task id.
    pub task: String,
    /// The run probed.
    pub run: Run,
    /// What was found.
    pub verdict: Verdict,
}

/// Probes one container run until aborted (or, for liveness, until it fails), sending
/// verdicts to `out`. Liveness and readiness run side by side, each on its own schedule.
pub async fn watch<R: Engine>(
    runtime: R,
    task: String,
    run: Run,
    probes: Probes,
    out: mpsc::Sender<Report>,
) {
    let target = Target {
        runtime,
        task,
        run,
        address: OnceCell::new(),
        out,
    };
    let liveness = async {
        if let Some(p) = &probes.liveness {
            target.probe_loop(Which::Liveness, p).await;
        }
    };
    let readiness = async {
        if let Some(p) = &probes.readiness {
            target.probe_loop(Which::Readiness, p).await;
        }
    };
    tokio::join!(liveness, readiness);
}

/// One container run under probe.
struct Target<R> {
    runtime: R,
    task: String,
    run: Run,
    /// The container's IP, looked up once per run (it does not change while it runs).
    address: OnceCell<IpAddr>,
    out: mpsc::Sender<Report>,
}

impl<R: Engine> Target<R> {
    async fn probe_loop(&self, which: Which, probe: &Probe) {
        let Some(check) = Check::of(probe) else {
            warn!(task = %self.task, probe = which.as_str(), "probe names no exec, http or tcp check; not probing");
            return;
        };
        let period = probe.period.std().max(MIN_PERIOD);
        let first = first_probe_in(self.run.started_at, probe.initial_delay.std(), Utc::now());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tally = Tally::default();
        loop {
            tick.tick().await;
            let result = self.probe(check, probe.timeout).await;
            let (next, verdict) = tally.step(result.is_ok(), probe.failure_threshold);
            tally = next;
            if let Err(e) = &result {
                debug!(task = %self.task, container = %self.run.container, probe = which.as_str(), failures = tally.failures, error = %e, "probe failed");
            }
            let verdict = match (which, verdict, result) {
                (Which::Liveness, Some(false), Err(e)) => Verdict::LivenessFailed(format!(
                    "liveness probe failed {} times: {e}",
                    tally.failures
                )),
                (Which::Readiness, Some(ready), _) => Verdict::Ready(ready),
                _ => continue,
            };
            let last = matches!(verdict, Verdict::LivenessFailed(_));
            let report = Report {
                task: self.task.clone(),
                run: self.run.clone(),
                verdict,
            };
            // No receiver: the supervisor is gone, and so is the reason to probe.
            if self.out.send(report).await.is_err() || last {
                return;
            }
        }
    }

    /// One probe: Ok if healthy, else why not (`GET /healthz: HTTP 503`).
    async fn probe(&self, check: Check<'_>, timeout: ApiDuration) -> Result<(), String> {
        let what = check.describe();
        match tokio::time::timeout(timeout.std(), self.check(check)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: timed out after {timeout}")),
        }
    }

    async fn check(&self, check: Check<'_>) -> Result<(), String> {
        match check {
            Check::Exec(cmd) => match self.runtime.exec(&self.run.container, cmd).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("exit code {code}")),
                Err(e) => Err(error_chain(&e)),
            },
            Check::Http { port, path } => {
                let addr = SocketAddr::new(self.address().await?, port);
                let status = http_get(addr, path).await?;
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
            Check::Tcp { port } => {
                let addr = SocketAddr::new(self.address().await?, port);
                TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn address(&self) -> Result<IpAddr, String> {
        self.address
            .get_or_try_init(|| async {
                match self.runtime.address(&self.run.container).await {
                    Ok(Some(ip)) => Ok(ip),
                    Ok(None) => Err("the container has no IP address".to_string()),
                    Err(e) => Err(error_chain(&e)),
                }
            })
            .await
            .copied()
    }
}

/// `GET path` on `addr` over HTTP/1.1; returns the status code. Only the status line is
/// read: that is all a probe needs.
async fn http_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("invalid path {path:?}"));
    }
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bramble-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        bramble_api::VERSION
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    http_status(&head).ok_or_else(|| {
        if head.is_empty() {
            "connection closed without an answer".to_string()
        } else {
            "not an HTTP answer".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn failures_in_a_row_make_a_failed_verdict_and_a_success_resets_them() {
        // (result, failures after, verdict emitted)
        let steps = [
            (false, 1, None),
            (false, 2, None),
            (true, 0, Some(true)),
            (false, 1, None),
            (false, 2, None),
            (false, 3, Some(false)),
            (false, 4, None),
            (true, 0, Some(true)),
            (true, 0, None),
        ];
        let mut t = Tally::default();
        for (i, (ok, failures, verdict)) in steps.into_iter().enumerate() {
            let (next, v) = t.step(ok, 3);
            assert_eq!((next.failures, v), (failures, verdict), "step {i}");
            t = next;
        }
    }

    #[test]
    fn a_threshold_of_one_fails_at_once_and_zero_counts_as_one() {
        for threshold in [0, 1] {
            let (t, v) = Tally::default().step(false, threshold);
            assert_eq!(v, Some(false));
            assert_eq!(t.healthy, Some(false));
        }
    }

    #[test]
    fn first_success_makes_ready_and_failures_before_it_do_not_flap() {
        let (t, v) = Tally::default().step(false, 3);
        assert_eq!((t.healthy, v), (None, None), "still unknown");
        let (t, v) = t.step(true, 3);
        assert_eq!((t.healthy, v), (Some(true), Some(true)));
    }

    #[test]
    fn the_first_probe_waits_the_initial_delay_from_the_start() {
        let t = |s: i64| {
            Utc.timestamp_opt(1_800_000_000 + s, 0)
                .single()
                .expect("valid time")
        };
        let s = Duration::from_secs;
        assert_eq!(first_probe_in(Some(t(0)), s(30), t(10)), s(20));
        assert_eq!(first_probe_in(Some(t(0)), s(30), t(30)), s(0));
        assert_eq!(first_probe_in(Some(t(0)), s(30), t(100)), s(0), "long past");
        assert_eq!(first_probe_in(Some(t(0)), s(0), t(0)), s(0));
        assert_eq!(first_probe_in(None, s(5), t(0)), s(5), "unknown start");
        assert_eq!(
            first_probe_in(Some(t(0)), Duration::MAX, t(0)),
            Duration::MAX,
            "no overflow"
        );
    }

    #[test]
    fn http_status_lines_are_parsed() {
        let cases: [(&[u8], Option<u16>); 7] = [
            (b"HTTP/1.1 200 OK\r\n", Some(200)),
            (b"HTTP/1.0 302 Found\r\nLocation: /x\r\n", Some(302)),
            (b"HTTP/1.1 503\r\n", Some(503)),
            (b"HTTP/1.1 200 OK", Some(200)),
            (b"SSH-2.0-OpenSSH\r\n", None),
            (b"HTTP/1.1 20 OK\r\n", None),
            (b"", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                http_status(head),
                want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn checks_are_named_for_messages() {
        let cmd = vec!["litecoin-cli".to_string(), "getblockcount".to_string()];
        assert_eq!(
            Check::Exec(&cmd).describe(),
            "exec litecoin-cli getblockcount"
        );
        assert_eq!(
            Check::Http {
                port: 80,
                path: "/healthz"
            }
            .describe(),
            "GET /healthz"
        );
        assert_eq!(Check::Tcp { port: 8080 }.describe(), "TCP port 8080");
    }

    #[tokio::test]
    async fn http_get_reads_the_status_and_refuses_bad_paths() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["204 No Content", "500 Internal Server Error"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut req = vec![0u8; 1024];
                let n = s.read(&mut req).await.expect("read");
                assert!(req[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                s.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        assert_eq!(http_get(addr, "/healthz").await, Ok(204));
        assert_eq!(http_get(addr, "/healthz").await, Ok(500));
        assert!(http_get(addr, "/a b").await.is_err());
        assert!(http_get(addr, "/a\r\nX: y").await.is_err());
    }
}
