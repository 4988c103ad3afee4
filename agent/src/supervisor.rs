//! The supervisor: converges Docker onto the node's desired task set, restarts what
//! fails with back-off, gives up on what keeps failing, and reports task states.
//!
//! A pure core decides: [`plan`] compares the desired tasks with the observed
//! containers and a [`RestartTracker`] (failure history) at a given time, and returns
//! [`Action`]s; [`RestartTracker::apply`] folds each action's outcome back into the
//! history. A thin async shell ([`Supervisor::run`]) observes, plans, executes and
//! reports, triggered by task-set changes, Docker events, back-off timers and a periodic
//! resync (the safety net for missed events).
//!
//! # Rules
//! - A desired task without a container gets one; a container of a task that is not
//!   desired is stopped and removed, then `Removed` is reported.
//! - A container whose spec-hash label differs from the task's is replaced.
//! - An exited container is started again per `restart.policy` (Always: any exit;
//!   OnFailure: non-zero exit or OOM kill; Never: not). A Job or CronJob that exited 0
//!   is done and never restarted.
//! - Restarts back off: the n-th consecutive restart waits `initial × 2^(n-1)`, capped
//!   at `max`, counted from the exit. A run that lasted at least 10 × `initial` was
//!   healthy and resets the back-off to `initial`.
//! - Every restart-worthy exit, and every failed create or start, is a failure. At
//!   `maxFailures` failures within `window` the supervisor gives the task up: it stops
//!   restarting it and reports it Failed with `gave_up` set and the message "gave up
//!   after N failures in WINDOW: cause", so the controller places it elsewhere. Giving up sticks until the spec changes.
//! - Phase Failed is only reported when the node is done with the task (gave up, or the
//!   policy says no restart). A crashed task awaiting its restart is reported Starting,
//!   with the exit code and a message, so the controller does not move it too early.
//! - A Job's or CronJob's run still going `spec.timeout` after its container started
//!   is stopped (SIGTERM, [`STOP_GRACE`], SIGKILL) and reported Failed with "timed out
//!   after T", without `gave_up` and never restarted here: a timed-out run is a failed
//!   attempt, and retrying it is the controller's decision. A run is judged by Docker's
//!   start and finish times, so an agent restarted mid-run judges it the same way.
//! - The final status of a Job's or CronJob's run (Succeeded or Failed) carries the last
//!   [`MAX_OUTPUT_BYTES`] of its output, once; the Hello carries it again for finished
//!   runs still on the node (within [`HELLO_OUTPUT_BUDGET`]), as a report sent while the
//!   link was down is lost.
//! - Two containers for one task (never expected) → the running one, else the newest,
//!   is kept; the others are removed.
//! - Adoption: existing containers are observed and kept; restarting the agent never
//!   creates a copy. Stopping the supervisor leaves all containers running.
//! - Probes (see [`crate::probe`]): a probed task's running container gets a prober per
//!   run. A liveness probe that fails `failureThreshold` times in a row is a failure like
//!   a crash: the container is stopped, then restarted with the same back-off and give-up
//!   accounting, and the probe's message is the cause. A task with a readiness probe
//!   reports `ready` (false until the first success of the current run); one without
//!   reports none.
//! - Fencing (see [`crate::fence`]): while [`Desired::fenced`], every Wallet container of
//!   the node is stopped (SIGTERM, [`fence::GRACE`], SIGKILL) and removed, and no Wallet
//!   is created, started or restarted; other containers are left alone. This holds even
//!   before the first task set: a sweeper independent of the converge loop does it, so a
//!   long image pull cannot delay it. A Wallet starts only under a gate the sweeper also
//!   holds, and only if neither a fence nor a newer task set arrived since the plan.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::manifest::{Kind, RestartPolicy};
use bramble_api::task::{TaskPhase, MAX_OUTPUT_BYTES};
use bramble_api::wire::{AgentMessage, Assignment, TaskStatus};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, instrument, warn};

use crate::fence;
use crate::probe::{self, Run, Verdict};
use crate::runtime::{self, error_chain, ContainerState, Observed, Runtime, RuntimeEvent};

/// How often the supervisor looks at Docker even without any event.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// How long a removed container gets to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A healthy run lasts at least this many times `backoff.initial`; after one, the
/// back-off starts over at `initial`.
pub const HEALTHY_RUN_FACTOR: u32 = 10;

/// How long to wait before subscribing to Docker events again after the stream broke.
const EVENTS_RETRY: Duration = Duration::from_secs(1);

/// The status message of a Wallet stopped by the fence.
pub const FENCED_MESSAGE: &str =
    "fenced: no word from the controller; the wallet runs again only when the controller assigns it anew";

/// What the supervisor is asked to do: the link's view of the controller's wishes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The node's task set as the controller last sent it; None before the first one,
    /// and the supervisor leaves every container alone until it has one.
    pub tasks: Option<Vec<Assignment>>,
    /// The node has lost the controller: no Wallet may run. Set by the fence watcher,
    /// cleared only together with a fresh task set (see [`crate::fence`]).
    pub fenced: bool,
}

/// One step towards the desired state, as decided by [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create and start the task's container (pulling its image if needed).
    Create {
        /// The task (boxed: it is by far the largest variant).
        assignment: Box<Assignment>,
    },
    /// Start a container that was created but never ran (not a restart).
    Start {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
    },
    /// Start an exited container again after a failure.
    Restart {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// When the failed run ended (the failure's time).
        failed_at: DateTime<Utc>,
        /// Whether the failed run lasted long enough to reset the back-off.
        healthy_run: bool,
    },
    /// Stop a running container whose liveness probe failed (SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]); it is then restarted like one that crashed.
    Stop {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// The probe's verdict, e.g. `liveness probe failed 3 times: GET /healthz: …`.
        cause: String,
    },
    /// Stop (SIGTERM, then SIGKILL after [`STOP_GRACE`], or [`fence::GRACE`] when fenced)
    /// and remove a container.
    Remove {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// Why.
        reason: RemoveReason,
    },
    /// Tell the controller that an unassigned task's containers are all gone.
    ReportRemoved {
        /// Task id.
        task: String,
    },
    /// Stop restarting the task: too many failures in the window.
    GiveUp {
        /// Task id.
        task: String,
        /// `gave up after N failures in WINDOW: cause`.
        message: String,
    },
    /// Nothing to do for the task before `until` (back-off); look again then.
    Wait {
        /// Task id.
        task: String,
        /// When the next attempt is due.
        until: DateTime<Utc>,
    },
    /// The task's current status; the shell sends it only when it changed.
    Report {
        /// The status.
        status: TaskStatus,
    },
}

/// Why a container is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its task is no longer assigned to this node (reported as `Removed`).
    Unassigned,
    /// Its spec hash differs from the task's: it is replaced.
    Outdated,
    /// A second container of the same task.
    Duplicate,
    /// Docker marked it dead (a removal that failed half-way).
    Dead,
    /// A Wallet's, while the node is fenced.
    Fenced,
}

/// Failure history per task: what [`plan`] needs to know beyond Docker's state.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    tasks: HashMap<String, Record>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Record {
    /// Times of failures, oldest first (exits that were restarted, failed creates or
    /// starts). Pruned to the window when recorded.
    failures: Vec<DateTime<Utc>>,
    /// Consecutive failures since the last healthy run: the back-off exponent.
    streak: u32,
    /// Restarts so far.
    restarts: u32,
    /// The last failed create or start, which left no running container behind.
    last_error: Option<String>,
    /// Set once the task was given up.
    gave_up: Option<String>,
    /// A run whose liveness probe failed, and the probe's message.
    liveness_failed: Option<(Run, String)>,
    /// The readiness probe's last verdict about a run.
    ready: Option<(Run, bool)>,
}

impl RestartTracker {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds the outcome of an executed action into the history. `outcome` is the error
    /// text when the action failed; `now` is when it finished.
    pub fn apply(&mut self, action: &Action, outcome: Result<(), String>, now: DateTime<Utc>) {
        match action {
            Action::Create { assignment } => {
                let rec = self.tasks.entry(assignment.task.clone()).or_default();
                match outcome {
                    Ok(()) => rec.last_error = None,
                    Err(e) => rec.fail(now, Some(e)),
                }
            }
            Action::Start { task, .. } => {
                if let Err(e) = outcome {
                    self.tasks
                        .entry(task.clone())
                        .or_default()
                        .fail(now, Some(e));
                } else if let Some(rec) = self.tasks.get_mut(task) {
                    rec.last_error = None;
                }
            }
            Action::Restart {
                task,
                failed_at,
                healthy_run,
                ..
            } => {
                let rec = self.tasks.entry(task.clone()).or_default();
                if *healthy_run {
                    rec.streak = 0;
                }
                if !rec.failures.contains(failed_at) {
                    rec.fail(*failed_at, None);
                }
                match outcome {
                    Ok(()) => {
                        rec.restarts += 1;
                        rec.last_error = None;
                        // A new run: verdicts about the old one are moot.
                        rec.liveness_failed = None;
                        rec.ready = None;
                    }
                    // The start itself failed too: a second failure, backed off from now.
                    Err(e) => rec.fail(now, Some(e)),
                }
            }
            Action::Remove {
                task,
                reason: RemoveReason::Outdated | RemoveReason::Unassigned,
                ..
            } => {
                // A new spec (or no spec) starts with a clean slate.
                self.tasks.remove(task);
            }
            Action::GiveUp { task, message } => {
                self.tasks.entry(task.clone()).or_default().gave_up = Some(message.clone());
            }
            Action::Remove { .. }
            | Action::Stop { .. }
            | Action::ReportRemoved { .. }
            | Action::Wait { .. }
            | Action::Report { .. } => {}
        }
    }

    /// Forgets tasks that are no longer assigned, and failures that left their task's
    /// window before `now` (so the history stays small).
    pub fn retain(&mut self, desired: &[Assignment], now: DateTime<Utc>) {
        let windows: HashMap<&str, chrono::Duration> = desired
            .iter()
            .map(|a| {
                let w = chrono::Duration::from_std(a.spec.restart.window.std())
                    .unwrap_or(chrono::Duration::MAX);
                (a.task.as_str(), w)
            })
            .collect();
        self.tasks.retain(|task, rec| {
            let Some(window) = windows.get(task.as_str()) else {
                return false;
            };
            if let Some(since) = now.checked_sub_signed(*window) {
                rec.failures.retain(|t| *t > since);
            }
            true
        });
    }

    /// Folds a prober's verdict in. Verdicts name the run they are about, so a late one
    /// about a container that is gone or restarted changes nothing.
    pub fn probed(&mut self, report: &probe::Report) {
        let rec = self.tasks.entry(report.task.clone()).or_default();
        match &report.verdict {
            Verdict::LivenessFailed(message) => {
                rec.liveness_failed = Some((report.run.clone(), message.clone()));
            }
            Verdict::Ready(ready) => rec.ready = Some((report.run.clone(), *ready)),
        }
    }

    /// Restarts of `task` so far.
    pub fn restarts(&self, task: &str) -> u32 {
        self.tasks.get(task).map_or(0, |r| r.restarts)
    }

    /// Whether `task` was given up.
    pub fn gave_up(&self, task: &str) -> bool {
        self.tasks.get(task).is_some_and(|r| r.gave_up.is_some())
    }
}

impl Record {
    fn fail(&mut self, at: DateTime<Utc>, error: Option<String>) {
        self.streak = self.streak.saturating_add(1);
        if let Some(e) = error {
            self.last_error = Some(e);
        }
        self.failures.push(at);
        self.failures.sort();
    }

    fn failures_since(&self, since: DateTime<Utc>) -> usize {
        self.failures.iter().filter(|t| **t > since).count()
    }

    fn last_failure(&self) -> Option<DateTime<Utc>> {
        self.failures.last().copied()
    }
}

/// The delay before the `n`-th consecutive restart (n ≥ 1): `initial × 2^(n-1)`,
/// capped at `max`.
pub fn backoff_delay(initial: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// Decides what to do so that Docker runs exactly the `desired` tasks: a pure function
/// of the desired set, the observed containers, the failure and probe history, the time
/// and whether the node is fenced (then no Wallet runs: see the module rules). Its
/// actions are ordered: removals of unwanted containers first (they may hold ports or
/// names a new container needs), then each desired task by id.
pub fn plan(
    desired: &[Assignment],
    observed: &[Observed],
    tracker: &RestartTracker,
    now: DateTime<Utc>,
    fenced: bool,
) -> Vec<Action> {
    let wanted: HashSet<&str> = desired.iter().map(|a| a.task.as_str()).collect();
    let mut by_task: HashMap<&str, Vec<&Observed>> = HashMap::new();
    for o in observed {
        by_task.entry(o.task.as_str()).or_default().push(o);
    }
    let mut actions = Vec::new();

    // Containers of tasks that are not assigned here any more.
    let mut gone: Vec<(&str, &Vec<&Observed>)> = by_task
        .iter()
        .filter(|(t, _)| !wanted.contains(*t))
        .map(|(t, cs)| (*t, cs))
        .collect();
    gone.sort_by_key(|(t, _)| *t);
    for (task, containers) in gone {
        for c in containers {
            // A fenced Wallet goes with the fence's short grace, assigned or not.
            let reason = if fenced && c.kind == Some(Kind::Wallet) {
                RemoveReason::Fenced
            } else {
                RemoveReason::Unassigned
            };
            actions.push(Action::Remove {
                id: c.id.clone(),
                task: task.to_string(),
                reason,
            });
        }
        actions.push(Action::ReportRemoved {
            task: task.to_string(),
        });
    }

    let mut desired: Vec<&Assignment> = desired.iter().collect();
    desired.sort_by(|a, b| a.task.cmp(&b.task));
    desired.dedup_by(|a, b| a.task == b.task);
    for a in desired {
        let containers = by_task.get(a.task.as_str()).cloned().unwrap_or_default();
        if fenced && a.kind == Kind::Wallet {
            plan_fenced(a, &containers, tracker.tasks.get(&a.task), &mut actions);
            continue;
        }
        let keeper = pick_keeper(&containers);
        for c in &containers {
            if Some(c.id.as_str()) != keeper.map(|k| k.id.as_str()) {
                actions.push(Action::Remove {
                    id: c.id.clone(),
                    task: a.task.clone(),
                    reason: RemoveReason::Duplicate,
                });
            }
        }
        plan_task(a, keeper, tracker.tasks.get(&a.task), now, &mut actions);
    }
    actions
}

/// A Wallet while the node is fenced: all its containers go and none starts. The task
/// stays assigned (no `Removed`): only the controller's next task set says where it runs.
fn plan_fenced(
    a: &Assignment,
    containers: &[&Observed],
    rec: Option<&Record>,
    actions: &mut Vec<Action>,
) {
    actions.push(Action::Report {
        status: TaskStatus {
            task: a.task.clone(),
            phase: TaskPhase::Stopped,
            exit_code: None,
            message: Some(FENCED_MESSAGE.to_string()),
            container_id: None,
            restarts: rec.map_or(0, |r| r.restarts),
            ready: readiness(a, None, None),
            started_at: None,
            finished_at: None,
            gave_up: false,
            output: None,
        },
    });
    for c in containers {
        actions.push(Action::Remove {
            id: c.id.clone(),
            task: a.task.clone(),
            reason: RemoveReason::Fenced,
        });
    }
}

/// A task's readiness for its status: None without a readiness probe; else whether the
/// container runs and its current run passed the probe (false until it did).
fn readiness(a: &Assignment, rec: Option<&Record>, c: Option<&Observed>) -> Option<bool> {
    a.spec.probes.readiness.as_ref()?;
    let ready = match (rec.and_then(|r| r.ready.as_ref()), c) {
        (Some((run, ready)), Some(c)) => {
            *ready && c.state == ContainerState::Running && *run == Run::of(c)
        }
        _ => false,
    };
    Some(ready)
}

/// Why the container's current run failed its liveness probe, if it did.
fn liveness_failure<'a>(rec: Option<&'a Record>, c: &Observed) -> Option<&'a str> {
    rec.and_then(|r| r.liveness_failed.as_ref())
        .filter(|(run, _)| *run == Run::of(c))
        .map(|(_, message)| message.as_str())
}

/// The containers to probe: each probed task's running container of the current spec,
/// with its run (a new run, after a restart, gets a new prober).
pub fn probe_targets<'a>(
    desired: &'a [Assignment],
    observed: &[Observed],
) -> Vec<(&'a Assignment, Run)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for a in desired {
        let probes = &a.spec.probes;
        if (probes.liveness.is_none() && probes.readiness.is_none()) || !seen.insert(&a.task) {
            continue;
        }
        let containers: Vec<&Observed> = observed.iter().filter(|o| o.task == a.task).collect();
        if let Some(c) = pick_keeper(&containers) {
            if c.state == ContainerState::Running && c.spec_hash == a.spec_hash {
                out.push((a, Run::of(c)));
            }
        }
    }
    out
}

/// The container to keep among a task's containers: a running one, else the newest.
fn pick_keeper<'a>(containers: &[&'a Observed]) -> Option<&'a Observed> {
    containers.iter().copied().max_by_key(|c| {
        (
            c.state == ContainerState::Running,
            c.created_at,
            c.id.clone(),
        )
    })
}

/// The plan for one desired task with (at most) one container.
fn plan_task(
    a: &Assignment,
    c: Option<&Observed>,
    rec: Option<&Record>,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
) {
    let restart = &a.spec.restart;
    let window = chrono::Duration::from_std(restart.window.std()).unwrap_or(chrono::Duration::MAX);
    let since = now
        .checked_sub_signed(window)
        .unwrap_or(DateTime::UNIX_EPOCH);
    let restarts = rec.map_or(0, |r| r.restarts);
    let mut status = TaskStatus {
        task: a.task.clone(),
        phase: TaskPhase::Starting,
        exit_code: None,
        message: None,
        container_id: c.map(|c| c.id.clone()),
        restarts,
        ready: readiness(a, rec, c),
        started_at: c.and_then(|c| c.started_at),
        finished_at: None,
        gave_up: false,
        output: None,
    };

    let Some(c) = c else {
        let create = Action::Create {
            assignment: Box::new(a.clone()),
        };
        attempt(a, rec, since, now, status, create, actions);
        return;
    };

    if c.spec_hash != a.spec_hash {
        status.container_id = None;
        status.started_at = None;
        status.restarts = 0;
        status.ready = readiness(a, None, None);
        actions.push(Action::Report { status });
        actions.push(Action::Remove {
            id: c.id.clone(),
            task: a.task.clone(),
            reason: RemoveReason::Outdated,
        });
        actions.push(Action::Create {
            assignment: Box::new(a.clone()),
        });
        return;
    }

    match c.state {
        ContainerState::Running | ContainerState::Paused => {
            status.phase = TaskPhase::Running;
            if c.state == ContainerState::Paused {
                status.message = Some("container is paused".to_string());
            }
            let hung = liveness_failure(rec, c).filter(|_| c.state == ContainerState::Running);
            if let Some(cause) = hung {
                // Stopped now, restarted (after the back-off) as if it had crashed.
                status.message = Some(cause.to_string());
                actions.push(Action::Report { status });
                actions.push(Action::Stop {
                    id: c.id.clone(),
                    task: a.task.clone(),
                    cause: cause.to_string(),
                });
                return;
            }
            match run_deadline(a, c).filter(|_| c.state == ContainerState::Running) {
                Some(deadline) if now >= deadline => {
                    // Stopped now; the exited run is then final (see `plan_exited`).
                    let cause = timeout_cause(a);
                    status.message = Some(format!("{cause}; stopping"));
                    actions.push(Action::Report { status });
                    actions.push(Action::Stop {
                        id: c.id.clone(),
                        task: a.task.clone(),
                        cause,
                    });
                }
                Some(deadline) => {
                    actions.push(Action::Report { status });
                    actions.push(Action::Wait {
                        task: a.task.clone(),
                        until: deadline,
                    });
                }
                None => actions.push(Action::Report { status }),
            }
        }
        ContainerState::Restarting | ContainerState::Other => {
            actions.push(Action::Report { status });
        }
        ContainerState::Created => {
            // Created but never started: an agent that died between create and start,
            // or a start that failed.
            let start = Action::Start {
                id: c.id.clone(),
                task: a.task.clone(),
            };
            attempt(a, rec, since, now, status, start, actions);
        }
        ContainerState::Dead => {
            actions.push(Action::Report { status });
            actions.push(Action::Remove {
                id: c.id.clone(),
                task: a.task.clone(),
                reason: RemoveReason::Dead,
            });
        }
        ContainerState::Exited => plan_exited(a, c, rec, since, now, status, actions),
    }
}

/// Pushes `next` (a create or a start), unless earlier failed creates or starts say to
/// back off or to give up, or the task was given up already.
fn attempt(
    a: &Assignment,
    rec: Option<&Record>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    mut status: TaskStatus,
    next: Action,
    actions: &mut Vec<Action>,
) {
    if let Some(r) = rec {
        if let Some(msg) = &r.gave_up {
            status.phase = TaskPhase::Failed;
            status.message = Some(msg.clone());
            status.gave_up = true;
            actions.push(Action::Report { status });
            return;
        }
        if let Some(err) = &r.last_error {
            let failures = r.failures_since(since);
            if failures >= a.spec.restart.max_failures as usize {
                let message = gave_up_message(failures, a, err);
                status.phase = TaskPhase::Failed;
                status.message = Some(message.clone());
                status.gave_up = true;
                actions.push(Action::GiveUp {
                    task: a.task.clone(),
                    message,
                });
                actions.push(Action::Report { status });
                return;
            }
            // No time in the text: an unchanged situation must give an unchanged report.
            status.message = Some(format!("{err}; retrying with back-off"));
            let until = r.last_failure().unwrap_or(now) + delay(a, r.streak);
            if now < until {
                actions.push(Action::Report { status });
                actions.push(Action::Wait {
                    task: a.task.clone(),
                    until,
                });
                return;
            }
        }
    }
    actions.push(Action::Report { status });
    actions.push(next);
}

/// The plan for a task whose container exited.
fn plan_exited(
    a: &Assignment,
    c: &Observed,
    rec: Option<&Record>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    mut status: TaskStatus,
    actions: &mut Vec<Action>,
) {
    let restart = &a.spec.restart;
    status.exit_code = c.exit_code;
    status.finished_at = c.finished_at;
    // A run stopped for failing its liveness probe failed, whatever its exit code.
    let liveness = liveness_failure(rec, c);
    let success = c.exit_code == Some(0) && !c.oom_killed && liveness.is_none();
    let cause = liveness.map_or_else(|| exit_cause(c), str::to_string);

    if let Some(msg) = rec.and_then(|r| r.gave_up.clone()) {
        status.phase = TaskPhase::Failed;
        status.message = Some(msg);
        status.gave_up = true;
        actions.push(Action::Report { status });
        return;
    }
    if timed_out(a, c) {
        // A failed attempt, whatever the exit code (a graceful stop may exit 0). Never
        // restarted here: retrying is the controller's decision (`retries`).
        status.phase = TaskPhase::Failed;
        status.message = Some(timeout_cause(a));
        actions.push(Action::Report { status });
        return;
    }
    let wants_restart = !(a.kind.runs_to_completion() && success)
        && match restart.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
    if !wants_restart {
        // Done: the final phase of this run.
        if success {
            status.phase = TaskPhase::Succeeded;
        } else {
            status.phase = TaskPhase::Failed;
            status.message = Some(cause);
        }
        actions.push(Action::Report { status });
        return;
    }

    // A failure to restart from. It may already be in the history, if a restart of it
    // was attempted and failed.
    let failed_at = c.finished_at.unwrap_or(DateTime::UNIX_EPOCH);
    let recorded = rec.is_some_and(|r| r.failures.contains(&failed_at));
    let past = rec.map_or(0, |r| r.failures_since(since));
    let failures = past + usize::from(!recorded && failed_at > since);
    if failures >= restart.max_failures as usize {
        let message = gave_up_message(failures, a, &cause);
        status.phase = TaskPhase::Failed;
        status.message = Some(message.clone());
        status.gave_up = true;
        actions.push(Action::GiveUp {
            task: a.task.clone(),
            message,
        });
        actions.push(Action::Report { status });
        return;
    }

    let reset_after = a.spec.restart.backoff.initial.std() * HEALTHY_RUN_FACTOR;
    let healthy_run = match (c.started_at, c.finished_at) {
        (Some(s), Some(f)) => (f - s).to_std().is_ok_and(|ran| ran >= reset_after),
        _ => false,
    };
    let streak = rec.map_or(0, |r| r.streak);
    let until = match rec.and_then(Record::last_failure) {
        // A failed restart attempt: back off from that attempt.
        Some(last) if recorded => last.max(failed_at) + delay(a, streak),
        _ if healthy_run => failed_at + delay(a, 1),
        _ => failed_at + delay(a, streak + 1),
    };
    status.message = Some(match rec.and_then(|r| r.last_error.as_ref()) {
        Some(err) if recorded => format!("{cause}; restart failed: {err}; retrying with back-off"),
        _ => format!("{cause}; restarting with back-off"),
    });
    actions.push(Action::Report { status });
    if now < until {
        actions.push(Action::Wait {
            task: a.task.clone(),
            until,
        });
    } else {
        actions.push(Action::Restart {
            id: c.id.clone(),
            task: a.task.clone(),
            failed_at,
            healthy_run,
        });
    }
}

/// When a Job's or CronJob's current run must end: its start plus `spec.timeout`.
/// None for other kinds, without a timeout, or before the run started.
fn run_deadline(a: &Assignment, c: &Observed) -> Option<DateTime<Utc>> {
    if !a.kind.runs_to_completion() {
        return None;
    }
    let timeout = chrono::Duration::from_std(a.spec.timeout?.std()).ok()?;
    c.started_at?.checked_add_signed(timeout)
}

/// Whether an exited run lasted its timeout or longer: then the agent stopped it, or
/// would have (an agent restarted mid-run judges by Docker's times alone). Both times
/// come from the engine's clock, and the agent stops a run only at or after its
/// deadline, so a run it stopped always counts.
fn timed_out(a: &Assignment, c: &Observed) -> bool {
    match (run_deadline(a, c), c.finished_at) {
        (Some(deadline), Some(finished)) => finished >= deadline,
        _ => false,
    }
}

/// `timed out after 10m`.
fn timeout_cause(a: &Assignment) -> String {
    match a.spec.timeout {
        Some(t) => format!("timed out after {t}"),
        None => "timed out".to_string(),
    }
}

fn delay(a: &Assignment, n: u32) -> chrono::Duration {
    let b = a.spec.restart.backoff;
    let d = backoff_delay(b.initial.std(), b.max.std(), n.max(1));
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn exit_cause(c: &Observed) -> String {
    if c.oom_killed {
        "killed: out of memory".to_string()
    } else {
        match c.exit_code {
            Some(code) => format!("exited with code {code}"),
            None => "exited".to_string(),
        }
    }
}

fn gave_up_message(failures: usize, a: &Assignment, cause: &str) -> String {
    format!(
        "gave up after {failures} failures in {}: {cause}",
        a.spec.restart.window
    )
}

/// A container's status as seen by Docker alone (no history): what an agent reports
/// for the containers it finds when it starts.
pub fn observed_status(o: &Observed) -> TaskStatus {
    let phase = match o.state {
        ContainerState::Created | ContainerState::Restarting => TaskPhase::Starting,
        ContainerState::Running | ContainerState::Paused => TaskPhase::Running,
        ContainerState::Exited if o.exit_code == Some(0) && !o.oom_killed => TaskPhase::Succeeded,
        ContainerState::Exited | ContainerState::Dead => TaskPhase::Failed,
        ContainerState::Other => TaskPhase::Stopped,
    };
    let ended = matches!(o.state, ContainerState::Exited | ContainerState::Dead);
    TaskStatus {
        task: o.task.clone(),
        phase,
        exit_code: o.exit_code,
        message: (phase == TaskPhase::Failed).then(|| exit_cause(o)),
        container_id: Some(o.id.clone()),
        restarts: 0,
        ready: None,
        started_at: o.started_at,
        finished_at: ended.then_some(o.finished_at).flatten(),
        gave_up: false,
        output: None,
    }
}

/// At most this much run output goes into one Hello, so it stays far below the frame
/// limit ([`bramble_api::wire::MAX_FRAME_BYTES`]) however many finished runs the node
/// keeps; runs beyond it are reported without output.
pub const HELLO_OUTPUT_BUDGET: usize = 1 << 20;

/// The last status sent per task, shared between the supervisor and its observers.
type Sent = Arc<Mutex<HashMap<String, TaskStatus>>>;

fn lock(sent: &Sent) -> std::sync::MutexGuard<'_, HashMap<String, TaskStatus>> {
    // A panic while holding this lock cannot leave the map half-updated (single
    // inserts and removes), so a poisoned lock is still usable.
    sent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the node's current tasks, for the Hello message of each (re)connection.
/// Cheap to clone; usable while the supervisor runs.
#[derive(Debug, Clone)]
pub struct Observer {
    runtime: Runtime,
    sent: Sent,
}

impl Observer {
    /// The node's tasks: one status per task container found in Docker (the last status
    /// the supervisor reported for it, which knows restarts and give-ups, or else one
    /// derived from the container), plus the last status of tasks that have no container
    /// (e.g. an image that cannot be pulled).
    #[instrument(skip(self), fields(node = %self.runtime.node()))]
    pub async fn observe(&self) -> runtime::Result<Vec<TaskStatus>> {
        let observed = self.runtime.list().await?;
        let sent = lock(&self.sent).clone();
        let mut out: HashMap<String, TaskStatus> = HashMap::new();
        let mut by_task: HashMap<&str, Vec<&Observed>> = HashMap::new();
        for o in &observed {
            by_task.entry(o.task.as_str()).or_default().push(o);
        }
        let mut budget = HELLO_OUTPUT_BUDGET;
        for (task, containers) in by_task {
            if let Some(c) = pick_keeper(&containers) {
                let mut status = sent
                    .get(task)
                    .cloned()
                    .unwrap_or_else(|| observed_status(c));
                // A finished run's output again: its Status may have been lost with the
                // link (reports queued while it was down are dropped for the Hello).
                let finished_run = c.kind.is_some_and(|k| k.runs_to_completion())
                    && c.state == ContainerState::Exited
                    && is_finished(status.phase)
                    && status.container_id.as_deref() == Some(c.id.as_str());
                if finished_run && budget > 0 {
                    status.output = read_output(&self.runtime, task, &c.id).await;
                    let used = status.output.as_ref().map_or(0, String::len);
                    if used > budget {
                        // Over the frame's budget: left out (the controller may have it).
                        status.output = None;
                        budget = 0;
                    } else {
                        budget -= used;
                    }
                }
                out.insert(task.to_string(), status);
            }
        }
        for (task, status) in sent {
            out.entry(task).or_insert(status);
        }
        let mut out: Vec<TaskStatus> = out.into_values().collect();
        out.sort_by(|a, b| a.task.cmp(&b.task));
        Ok(out)
    }
}

type Events = Pin<Box<dyn Stream<Item = runtime::Result<RuntimeEvent>> + Send>>;

/// A spawned task that is aborted when this handle is dropped, so no prober or sweeper
/// outlives the supervisor, whichever way its `run` ends.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The prober of one task's current container run.
#[derive(Debug)]
struct Prober {
    run: Run,
    _task: AbortOnDrop,
}

/// The async shell around [`plan`]: observes Docker, executes the plan, reports.
#[derive(Debug)]
pub struct Supervisor {
    runtime: Runtime,
    node: String,
    out: mpsc::Sender<AgentMessage>,
    tracker: RestartTracker,
    sent: Sent,
    /// Held while a Wallet is created or started, and while the fence sweeper stops
    /// Wallets: a start that raced a fence has finished before the sweep looks.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Probers by task.
    probers: HashMap<String, Prober>,
    probe_tx: mpsc::Sender<probe::Report>,
    probe_rx: Option<mpsc::Receiver<probe::Report>>,
}

impl Supervisor {
    /// A supervisor for `node`'s containers, sending task reports to `out`.
    pub fn new(runtime: Runtime, node: String, out: mpsc::Sender<AgentMessage>) -> Self {
        let (probe_tx, probe_rx) = mpsc::channel(64);
        Supervisor {
            runtime,
            node,
            out,
            tracker: RestartTracker::new(),
            sent: Sent::default(),
            gate: Arc::default(),
            probers: HashMap::new(),
            probe_tx,
            probe_rx: Some(probe_rx),
        }
    }

    /// The runtime, e.g. for streaming logs (clone it: it is a cheap handle).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// An observer of this supervisor's tasks that stays usable after [`Self::run`]
    /// has taken the supervisor.
    pub fn observer(&self) -> Observer {
        Observer {
            runtime: self.runtime.clone(),
            sent: Arc::clone(&self.sent),
        }
    }

    /// The node's current tasks, for the Hello message. See [`Observer::observe`].
    pub async fn observe(&self) -> runtime::Result<Vec<TaskStatus>> {
        self.observer().observe().await
    }

    /// Converges until `shutdown` completes, then returns, leaving every container as it
    /// is (an agent restart is not a task kill); probers stop with it.
    ///
    /// Does nothing until `desired` holds a task set: before the controller has spoken,
    /// the node keeps running what it has. Fencing is the exception: whenever `desired`
    /// says fenced, the node's Wallets are stopped, task set or not. Then it converges on
    /// every change of `desired`, every Docker event of the node's containers, every
    /// probe verdict, when a back-off delay ends, and every [`RESYNC_INTERVAL`]. A failed
    /// round (Docker unreachable) is logged and retried at the next trigger; it never
    /// ends the loop.
    #[instrument(skip_all, fields(node = %self.node))]
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Desired>,
        shutdown: impl Future<Output = ()>,
    ) {
        let _sweeper = AbortOnDrop(tokio::spawn(enforce_fence(
            self.runtime.clone(),
            desired.clone(),
            Arc::clone(&self.gate),
        )));
        let mut probe_rx = self
            .probe_rx
            .take()
            .expect("run consumes the supervisor, so the receiver is still there");
        let mut shutdown = std::pin::pin!(shutdown);
        let (mut current, mut fenced) = loop {
            let d = desired.borrow_and_update().clone();
            if let Some(set) = d.tasks {
                break (set, d.fenced);
            }
            tokio::select! {
                () = &mut shutdown => return,
                changed = desired.changed() => {
                    if changed.is_err() {
                        // The controller link is gone before it ever spoke: nothing to do.
                        shutdown.await;
                        return;
                    }
                }
            }
        };
        info!(
            tasks = current.len(),
            fenced, "first task set received; supervising"
        );
        let mut desired_open = true;
        let mut events: Option<Events> = Some(Box::pin(self.runtime.events()));
        let mut events_retry = tokio::time::Instant::now();
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        loop {
            let wake = self.converge(&current, fenced, &desired).await;
            let wake_at = wake.map(|at| {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tokio::time::Instant::now() + wait
            });
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = desired.changed(), if desired_open => {
                    match changed {
                        Ok(()) => {
                            let d = desired.borrow_and_update().clone();
                            // None never replaces a task set the controller sent.
                            if let Some(set) = d.tasks {
                                current = set;
                            }
                            fenced = d.fenced;
                        }
                        // The link is gone for good: keep running the last set.
                        Err(_) => desired_open = false,
                    }
                }
                Some(report) = probe_rx.recv() => self.probed(&report),
                event = next_event(&mut events) => {
                    match event {
                        Some(Ok(e)) => {
                            debug!(container = %e.id, task = ?e.task, action = ?e.action, exit_code = ?e.exit_code, "docker event");
                            drain_ready(&mut events);
                        }
                        Some(Err(e)) => {
                            warn!(error = %error_chain(&e), "docker event stream failed; resubscribing");
                            events = None;
                            events_retry = tokio::time::Instant::now() + EVENTS_RETRY;
                        }
                        None => {
                            warn!("docker event stream ended; resubscribing");
                            events = None;
                            events_retry = tokio::time::Instant::now() + EVENTS_RETRY;
                        }
                    }
                }
                () = tokio::time::sleep_until(events_retry), if events.is_none() => {
                    events = Some(Box::pin(self.runtime.events()));
                }
                () = sleep_until_opt(wake_at), if wake_at.is_some() => {}
                _ = resync.tick() => {}
            }
        }
        info!("supervisor stopped; containers left running");
    }

    /// Folds a probe verdict into the history; the next round acts on it.
    fn probed(&mut self, report: &probe::Report) {
        match &report.verdict {
            Verdict::LivenessFailed(message) => {
                warn!(task = %report.task, container = %report.run.container, message = %message, "liveness probe failed; restarting the container");
            }
            Verdict::Ready(ready) => {
                info!(task = %report.task, container = %report.run.container, ready, "readiness changed");
            }
        }
        self.tracker.probed(report);
    }

    /// One or two rounds of observe → plan → execute; returns when the next back-off
    /// ends, if any. A second round follows a round that changed something, so the
    /// resulting states (e.g. Running) are reported at once.
    async fn converge(
        &mut self,
        desired: &[Assignment],
        fenced: bool,
        latest: &watch::Receiver<Desired>,
    ) -> Option<DateTime<Utc>> {
        let mut wake = None;
        for _ in 0..2 {
            match self.round(desired, fenced, latest).await {
                Ok((acted, w)) => {
                    wake = w;
                    if !acted {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot observe containers; retrying later");
                    break;
                }
            }
        }
        wake
    }

    /// Observes, plans and executes once. Returns whether anything was changed in
    /// Docker and the earliest back-off end. `latest` is the desired state's channel, to
    /// see a fence or a newer task set that arrives while the round runs.
    #[instrument(skip_all, fields(node = %self.node))]
    async fn round(
        &mut self,
        desired: &[Assignment],
        fenced: bool,
        latest: &watch::Receiver<Desired>,
    ) -> runtime::Result<(bool, Option<DateTime<Utc>>)> {
        let observed = self.runtime.list().await?;
        let now = Utc::now();
        self.tracker.retain(desired, now);
        let actions = plan(desired, &observed, &self.tracker, now, fenced);
        let wallets: HashSet<&str> = desired
            .iter()
            .filter(|a| a.kind == Kind::Wallet)
            .map(|a| a.task.as_str())
            .collect();
        let completing: HashSet<&str> = desired
            .iter()
            .filter(|a| a.kind.runs_to_completion())
            .map(|a| a.task.as_str())
            .collect();
        let mut acted = false;
        let mut wake: Option<DateTime<Utc>> = None;
        let mut not_removed: HashSet<String> = HashSet::new();
        // Containers stopped or removed in this round: they get no prober.
        let mut touched: HashSet<&str> = HashSet::new();
        for action in &actions {
            let wallet_start = match action {
                Action::Create { assignment } => assignment.kind == Kind::Wallet,
                Action::Start { task, .. } | Action::Restart { task, .. } => {
                    wallets.contains(task.as_str())
                }
                _ => false,
            };
            // A Wallet's image is pulled before the gate is taken: a pull can take
            // minutes, and a fence must not wait for it.
            let pulled = match action {
                Action::Create { assignment } if wallet_start => {
                    self.runtime.ensure_image(&assignment.spec.image).await
                }
                _ => Ok(()),
            };
            let _gate = if wallet_start && pulled.is_ok() {
                let gate = self.gate.lock().await;
                if wallets_barred(latest) {
                    debug!(
                        ?action,
                        "wallet start skipped: fenced, or a newer task set arrived"
                    );
                    continue;
                }
                Some(gate)
            } else {
                None
            };
            let outcome = match (pulled, action) {
                (Err(e), _) => Err(e),
                (Ok(()), Action::Report { status }) => {
                    let completing = completing.contains(status.task.as_str());
                    self.report(status, completing).await;
                    continue;
                }
                (Ok(()), Action::Wait { until, .. }) => {
                    wake = Some(wake.map_or(*until, |w| w.min(*until)));
                    continue;
                }
                (Ok(()), Action::ReportRemoved { task }) => {
                    if !not_removed.contains(task) {
                        self.report_removed(task).await;
                    }
                    continue;
                }
                (Ok(()), Action::GiveUp { task, message }) => {
                    warn!(task = %task, message = %message, "giving the task up");
                    Ok(())
                }
                (Ok(()), Action::Create { assignment }) => {
                    acted = true;
                    info!(task = %assignment.task, image = %assignment.spec.image, "creating container");
                    self.runtime.create_and_start(assignment).await.map(|_| ())
                }
                (Ok(()), Action::Start { id, task }) => {
                    acted = true;
                    info!(task = %task, container = %id, "starting container");
                    self.runtime.start(id).await
                }
                (Ok(()), Action::Restart { id, task, .. }) => {
                    acted = true;
                    info!(task = %task, container = %id, restarts = self.tracker.restarts(task) + 1, "restarting container");
                    self.runtime.start(id).await
                }
                (Ok(()), Action::Stop { id, task, cause }) => {
                    acted = true;
                    touched.insert(id.as_str());
                    warn!(task = %task, container = %id, cause = %cause, "stopping an unhealthy container");
                    self.runtime.stop(id, STOP_GRACE).await
                }
                (Ok(()), Action::Remove { id, task, reason }) => {
                    acted = true;
                    touched.insert(id.as_str());
                    let r = if *reason == RemoveReason::Fenced {
                        warn!(task = %task, container = %id, "removing a wallet: the node is fenced");
                        self.runtime.terminate(id, fence::GRACE).await
                    } else {
                        info!(task = %task, container = %id, ?reason, "removing container");
                        self.stop_and_remove(id).await
                    };
                    if r.is_err() {
                        not_removed.insert(task.clone());
                    }
                    r
                }
            };
            let outcome = outcome.map_err(|e| {
                let msg = error_chain(&e);
                warn!(error = %msg, ?action, "action failed");
                msg
            });
            self.tracker.apply(action, outcome, Utc::now());
        }

        // Tasks reported earlier that are neither assigned nor in Docker any more (e.g.
        // unassigned while their image could not be pulled): confirm them gone too.
        let wanted: HashSet<&str> = desired.iter().map(|a| a.task.as_str()).collect();
        let present: HashSet<&str> = observed.iter().map(|o| o.task.as_str()).collect();
        let orphans: Vec<String> = lock(&self.sent)
            .keys()
            .filter(|t| !wanted.contains(t.as_str()) && !present.contains(t.as_str()))
            .cloned()
            .collect();
        for task in orphans {
            self.report_removed(&task).await;
        }
        let untouched: Vec<Observed> = observed
            .iter()
            .filter(|o| !touched.contains(o.id.as_str()))
            .cloned()
            .collect();
        self.sync_probers(desired, &untouched);
        Ok((acted, wake))
    }

    /// Keeps one prober per probed running container run: starts missing ones, aborts
    /// those whose container stopped, went or restarted.
    fn sync_probers(&mut self, desired: &[Assignment], observed: &[Observed]) {
        let targets = probe_targets(desired, observed);
        self.probers.retain(|task, p| {
            targets
                .iter()
                .any(|(a, run)| a.task == *task && *run == p.run)
        });
        for (a, run) in targets {
            if self.probers.contains_key(&a.task) {
                continue;
            }
            debug!(task = %a.task, container = %run.container, "probing");
            let handle = tokio::spawn(probe::watch(
                self.runtime.clone(),
                a.task.clone(),
                run.clone(),
                a.spec.probes.clone(),
                self.probe_tx.clone(),
            ));
            self.probers.insert(
                a.task.clone(),
                Prober {
                    run,
                    _task: AbortOnDrop(handle),
                },
            );
        }
    }

    async fn stop_and_remove(&self, id: &str) -> runtime::Result<()> {
        match self.runtime.stop(id, STOP_GRACE).await {
            Ok(()) | Err(runtime::Error::NotFound { .. }) => {}
            // Removal is forced anyway; a failed stop only costs the grace period.
            Err(e) => {
                warn!(container = %id, error = %error_chain(&e), "stop failed; removing by force")
            }
        }
        self.runtime.remove(id).await
    }

    /// Sends a status unless it equals the last one sent for the task. The final status
    /// of a Job's or CronJob's run (`completing`) carries the run's output, read once
    /// here: the statuses kept for comparison never hold output, so an unchanged final
    /// status is not sent (nor read) again.
    async fn report(&self, status: &TaskStatus, completing: bool) {
        {
            let mut sent = lock(&self.sent);
            if sent.get(&status.task) == Some(status) {
                return;
            }
            sent.insert(status.task.clone(), status.clone());
        }
        info!(task = %status.task, phase = %status.phase, exit_code = ?status.exit_code, message = ?status.message, "task status");
        let mut status = status.clone();
        if completing && is_finished(status.phase) {
            if let Some(id) = &status.container_id {
                status.output = read_output(&self.runtime, &status.task, id).await;
            }
        }
        self.send(AgentMessage::Status { status }).await;
    }

    async fn report_removed(&self, task: &str) {
        lock(&self.sent).remove(task);
        info!(task = %task, "task removed");
        self.send(AgentMessage::Removed {
            task: task.to_string(),
        })
        .await;
    }

    async fn send(&self, msg: AgentMessage) {
        if self.out.send(msg).await.is_err() {
            // The link owns the receiver; without it there is no one to tell. The
            // next Hello carries the current state.
            debug!("report channel closed; report dropped");
        }
    }
}

/// Whether a run-to-completion task's phase ends its run (its output is final).
fn is_finished(phase: TaskPhase) -> bool {
    matches!(phase, TaskPhase::Succeeded | TaskPhase::Failed)
}

/// The last [`MAX_OUTPUT_BYTES`] of a finished run's output; None (logged) if the logs
/// cannot be read, which must not hold up the status itself.
async fn read_output(runtime: &Runtime, task: &str, container: &str) -> Option<String> {
    match runtime.output(container, MAX_OUTPUT_BYTES).await {
        Ok(text) => Some(text),
        Err(e) => {
            warn!(task = %task, container = %container, error = %error_chain(&e), "cannot read the output of a finished run");
            None
        }
    }
}

async fn next_event(events: &mut Option<Events>) -> Option<runtime::Result<RuntimeEvent>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Swallows events that are already waiting: one round covers them all.
fn drain_ready(events: &mut Option<Events>) {
    if let Some(s) = events {
        while let Some(Some(Ok(_))) = s.next().now_or_never() {}
    }
}

/// Whether a Wallet start planned earlier must not happen now: the node is fenced, or a
/// newer desired state (a fence, or a task set) arrived since the plan; the next round
/// plans again with it.
fn wallets_barred(latest: &watch::Receiver<Desired>) -> bool {
    latest.borrow().fenced || latest.has_changed().unwrap_or(false)
}

/// Keeps the node's Wallets stopped while it is fenced, with or without a task set: stops
/// them as soon as the fence falls, retries every [`fence::CHECK_EVERY`] while Docker
/// fails, and looks again every [`RESYNC_INTERVAL`] as a safety net. Runs beside the
/// converge loop, which may be busy (an image pull, a slow stop), until aborted.
async fn enforce_fence(
    runtime: Runtime,
    mut desired: watch::Receiver<Desired>,
    gate: Arc<tokio::sync::Mutex<()>>,
) {
    loop {
        let closed = desired.wait_for(|d| d.fenced).await.is_err();
        if closed {
            return;
        }
        let swept = {
            let _gate = gate.lock().await;
            stop_wallets(&runtime).await
        };
        let again = match swept {
            Ok(()) => RESYNC_INTERVAL,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot stop the node's wallets while fenced; retrying");
                fence::CHECK_EVERY
            }
        };
        let lifted = async { desired.wait_for(|d| !d.fenced).await.is_err() };
        tokio::select! {
            closed = lifted => if closed { return },
            () = tokio::time::sleep(again) => {}
        }
    }
}

/// Stops and removes every Wallet container of the node, all at once (the timing
/// argument allows one grace period, not one per wallet).
async fn stop_wallets(runtime: &Runtime) -> runtime::Result<()> {
    let wallets = runtime.list_kind(Kind::Wallet).await?;
    let stops = wallets.iter().map(|w| async move {
        let r = runtime.terminate(&w.id, fence::GRACE).await;
        if r.is_ok() {
            warn!(task = %w.task, container = %w.id, "wallet stopped and removed: the node is fenced");
        }
        r
    });
    futures_util::future::join_all(stops)
        .await
        .into_iter()
        .collect()
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::duration::Duration as ApiDuration;
    use bramble_api::manifest::{Backoff, HttpProbe, Kind, Probe, Restart};
    use bramble_api::task::TaskSpec;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn assignment(task: &str, kind: Kind, policy: RestartPolicy) -> Assignment {
        let spec = TaskSpec {
            image: "img:1".into(),
            command: None,
            args: None,
            env: Default::default(),
            ports: vec![],
            volumes: vec![],
            resources: Default::default(),
            restart: Restart {
                policy,
                backoff: Backoff {
                    initial: ApiDuration::from_secs(1),
                    max: ApiDuration::from_secs(8),
                },
                max_failures: 3,
                window: ApiDuration::from_secs(600),
            },
            probes: Default::default(),
            timeout: None,
        };
        Assignment {
            task: task.into(),
            kind,
            workload: "w".into(),
            spec_hash: spec.hash(),
            spec,
        }
    }

    fn service(task: &str) -> Assignment {
        assignment(task, Kind::Service, RestartPolicy::Always)
    }

    fn container(a: &Assignment, id: &str, state: ContainerState) -> Observed {
        Observed {
            id: id.into(),
            name: format!("bramble-n-{}", a.task),
            task: a.task.clone(),
            workload: a.workload.clone(),
            kind: Some(a.kind),
            spec_hash: a.spec_hash.clone(),
            node: "n".into(),
            state,
            exit_code: None,
            oom_killed: false,
            error: None,
            created_at: Some(t(0)),
            started_at: Some(t(1)),
            finished_at: None,
        }
    }

    fn exited(a: &Assignment, id: &str, code: i64, started: i64, finished: i64) -> Observed {
        Observed {
            exit_code: Some(code),
            started_at: Some(t(started)),
            finished_at: Some(t(finished)),
            ..container(a, id, ContainerState::Exited)
        }
    }

    /// The actions other than reports, in a compact form for table comparisons.
    fn moves(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { assignment } => Some(format!("create {}", assignment.task)),
                Action::Start { id, .. } => Some(format!("start {id}")),
                Action::Restart { id, .. } => Some(format!("restart {id}")),
                Action::Stop { id, .. } => Some(format!("stop {id}")),
                Action::Remove { id, reason, .. } => Some(format!("remove {id} {reason:?}")),
                Action::ReportRemoved { task } => Some(format!("removed {task}")),
                Action::GiveUp { task, .. } => Some(format!("give up {task}")),
                Action::Wait { task, until } => {
                    Some(format!("wait {task} {}s", (*until - t(0)).num_seconds()))
                }
                Action::Report { .. } => None,
            })
            .collect()
    }

    fn reports(actions: &[Action]) -> Vec<TaskStatus> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report { status } => Some(status.clone()),
                _ => None,
            })
            .collect()
    }

    fn phase_of(actions: &[Action], task: &str) -> Option<TaskPhase> {
        reports(actions)
            .into_iter()
            .find(|s| s.task == task)
            .map(|s| s.phase)
    }

    #[test]
    fn plans_each_situation_as_the_rules_say() {
        let web = service("web-0");
        let job = assignment("job-0", Kind::Job, RestartPolicy::OnFailure);
        let cron = assignment("cron-0", Kind::CronJob, RestartPolicy::Always);
        let once = assignment("once-0", Kind::Service, RestartPolicy::Never);
        let onfail = assignment("of-0", Kind::Service, RestartPolicy::OnFailure);
        let mut changed = web.clone();
        changed.spec_hash = "0000000000000000".into();
        let old = container(&web, "c-old", ContainerState::Running);
        let stranger = container(&service("gone-0"), "c-gone", ContainerState::Running);
        let newer = Observed {
            created_at: Some(t(5)),
            ..exited(&web, "c-new", 1, 5, 6)
        };
        let oom = Observed {
            oom_killed: true,
            exit_code: Some(137),
            ..exited(&onfail, "c-oom", 137, 1, 3)
        };
        let now = t(100);

        type Case<'a> = (
            &'a str,
            Vec<Assignment>,
            Vec<Observed>,
            Vec<&'a str>,
            Option<(&'a str, TaskPhase)>,
        );
        let cases: Vec<Case> = vec![
            (
                "desired task without container is created",
                vec![web.clone()],
                vec![],
                vec!["create web-0"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "running container is kept and reported running",
                vec![web.clone()],
                vec![container(&web, "c1", ContainerState::Running)],
                vec![],
                Some(("web-0", TaskPhase::Running)),
            ),
            (
                "paused container is left alone",
                vec![web.clone()],
                vec![container(&web, "c1", ContainerState::Paused)],
                vec![],
                Some(("web-0", TaskPhase::Running)),
            ),
            (
                "created but never started container is started",
                vec![web.clone()],
                vec![container(&web, "c1", ContainerState::Created)],
                vec!["start c1"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "undesired container is removed and reported removed",
                vec![web.clone()],
                vec![
                    container(&web, "c1", ContainerState::Running),
                    stranger.clone(),
                ],
                vec!["remove c-gone Unassigned", "removed gone-0"],
                Some(("web-0", TaskPhase::Running)),
            ),
            (
                "empty desired set removes everything",
                vec![],
                vec![stranger.clone()],
                vec!["remove c-gone Unassigned", "removed gone-0"],
                None,
            ),
            (
                "changed spec hash replaces the container",
                vec![changed.clone()],
                vec![old.clone()],
                vec!["remove c-old Outdated", "create web-0"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "two containers for one task keep the running one",
                vec![web.clone()],
                vec![old.clone(), newer.clone()],
                vec!["remove c-new Duplicate"],
                Some(("web-0", TaskPhase::Running)),
            ),
            (
                "two stopped containers for one task keep the newest",
                vec![web.clone()],
                vec![exited(&web, "c-a", 1, 1, 2), newer.clone()],
                vec!["remove c-a Duplicate", "restart c-new"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "always policy restarts after a clean exit",
                vec![web.clone()],
                vec![exited(&web, "c1", 0, 1, 2)],
                vec!["restart c1"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "always policy restarts after a failure",
                vec![web.clone()],
                vec![exited(&web, "c1", 2, 1, 2)],
                vec!["restart c1"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "exit within the first back-off waits",
                vec![web.clone()],
                vec![exited(&web, "c1", 2, 99, 100)],
                vec!["wait web-0 101s"],
                Some(("web-0", TaskPhase::Starting)),
            ),
            (
                "on-failure policy does not restart a clean exit",
                vec![onfail.clone()],
                vec![exited(&onfail, "c1", 0, 1, 2)],
                vec![],
                Some(("of-0", TaskPhase::Succeeded)),
            ),
            (
                "on-failure policy restarts a failure",
                vec![onfail.clone()],
                vec![exited(&onfail, "c1", 1, 1, 2)],
                vec!["restart c1"],
                Some(("of-0", TaskPhase::Starting)),
            ),
            (
                "an oom kill is a failure even for on-failure",
                vec![onfail.clone()],
                vec![oom],
                vec!["restart c-oom"],
                Some(("of-0", TaskPhase::Starting)),
            ),
            (
                "never policy leaves a failure failed",
                vec![once.clone()],
                vec![exited(&once, "c1", 1, 1, 2)],
                vec![],
                Some(("once-0", TaskPhase::Failed)),
            ),
            (
                "never policy leaves a success succeeded",
                vec![once.clone()],
                vec![exited(&once, "c1", 0, 1, 2)],
                vec![],
                Some(("once-0", TaskPhase::Succeeded)),
            ),
            (
                "a job that exited 0 is done",
                vec![job.clone()],
                vec![exited(&job, "c1", 0, 1, 2)],
                vec![],
                Some(("job-0", TaskPhase::Succeeded)),
            ),
            (
                "a job that failed is retried on failure",
                vec![job.clone()],
                vec![exited(&job, "c1", 3, 1, 2)],
                vec!["restart c1"],
                Some(("job-0", TaskPhase::Starting)),
            ),
            (
                "a cron job that exited 0 is done even with policy always",
                vec![cron.clone()],
                vec![exited(&cron, "c1", 0, 1, 2)],
                vec![],
                Some(("cron-0", TaskPhase::Succeeded)),
            ),
            (
                "a dead container is removed",
                vec![web.clone()],
                vec![container(&web, "c1", ContainerState::Dead)],
                vec!["remove c1 Dead"],
                Some(("web-0", TaskPhase::Starting)),
            ),
        ];
        for (name, desired, observed, want, phase) in cases {
            let actions = plan(&desired, &observed, &RestartTracker::new(), now, false);
            assert_eq!(moves(&actions), want, "{name}");
            if let Some((task, phase)) = phase {
                assert_eq!(phase_of(&actions, task), Some(phase), "{name}");
            }
        }
    }

    #[test]
    fn reports_carry_exit_code_times_and_container() {
        let once = assignment("once-0", Kind::Job, RestartPolicy::Never);
        let actions = plan(
            std::slice::from_ref(&once),
            &[exited(&once, "c1", 4, 1, 2)],
            &RestartTracker::new(),
            t(10),
            false,
        );
        let s = &reports(&actions)[0];
        assert_eq!(s.phase, TaskPhase::Failed);
        assert_eq!(s.exit_code, Some(4));
        assert!(!s.gave_up, "policy Never: done, not given up");
        assert_eq!(s.container_id.as_deref(), Some("c1"));
        assert_eq!((s.started_at, s.finished_at), (Some(t(1)), Some(t(2))));
        assert_eq!(s.message.as_deref(), Some("exited with code 4"));

        let web = service("web-0");
        let actions = plan(
            std::slice::from_ref(&web),
            &[container(&web, "c9", ContainerState::Running)],
            &RestartTracker::new(),
            t(10),
            false,
        );
        let s = &reports(&actions)[0];
        assert_eq!(s.container_id.as_deref(), Some("c9"));
        assert_eq!(s.started_at, Some(t(1)));
        assert_eq!((s.exit_code, s.message.as_deref()), (None, None));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        let got: Vec<Duration> = (1..=6).map(|n| backoff_delay(s(1), s(8), n)).collect();
        assert_eq!(got, vec![s(1), s(2), s(4), s(8), s(8), s(8)]);
        assert_eq!(backoff_delay(s(1), s(300), 200), s(300), "no overflow");
    }

    /// Runs a crash loop: each restart's container exits again one second after it
    /// started. Returns the delays between exit and restart, and the final actions.
    fn crash_loop(a: &Assignment, rounds: usize) -> (Vec<i64>, Vec<Action>) {
        let mut tracker = RestartTracker::new();
        let mut now = t(0);
        let mut c = exited(a, "c1", 1, 0, 1);
        let mut delays = Vec::new();
        for _ in 0..rounds {
            // Poll every second, like events and resyncs would.
            loop {
                now += chrono::Duration::seconds(1);
                let actions = plan(
                    std::slice::from_ref(a),
                    std::slice::from_ref(&c),
                    &tracker,
                    now,
                    false,
                );
                if let Some(r) = actions.iter().find(|x| matches!(x, Action::Restart { .. })) {
                    tracker.apply(r, Ok(()), now);
                    delays.push((now - c.finished_at.expect("finished")).num_seconds());
                    c = exited(
                        a,
                        "c1",
                        1,
                        (now - t(0)).num_seconds(),
                        (now - t(0)).num_seconds() + 1,
                    );
                    break;
                }
                if let Some(g) = actions.iter().find(|x| matches!(x, Action::GiveUp { .. })) {
                    tracker.apply(g, Ok(()), now);
                    return (
                        delays,
                        plan(
                            std::slice::from_ref(a),
                            &[c.clone()],
                            &tracker,
                            now + chrono::Duration::hours(1),
                            false,
                        ),
                    );
                }
                assert!(now < t(10_000), "the loop must progress");
            }
        }
        (
            delays,
            plan(std::slice::from_ref(a), &[c], &tracker, now, false),
        )
    }

    #[test]
    fn crash_loop_backs_off_exponentially_then_gives_up() {
        let mut a = service("web-0");
        a.spec.restart.max_failures = 6;
        let (delays, last) = crash_loop(&a, 10);
        assert_eq!(delays, vec![1, 2, 4, 8, 8], "doubling, capped at 8s");
        assert_eq!(
            moves(&last),
            Vec::<String>::new(),
            "given up: no restart, even an hour later"
        );
        let s = &reports(&last)[0];
        assert_eq!(s.phase, TaskPhase::Failed);
        assert_eq!(s.exit_code, Some(1));
        assert!(s.gave_up);
        assert_eq!(
            s.message.as_deref(),
            Some("gave up after 6 failures in 10m: exited with code 1")
        );
    }

    #[test]
    fn give_up_counts_only_failures_within_the_window() {
        let mut a = service("web-0");
        a.spec.restart.window = ApiDuration::from_secs(60);
        let mut tracker = RestartTracker::new();
        // Two old failures, long ago.
        for (i, at) in [t(0), t(10)].into_iter().enumerate() {
            let r = Action::Restart {
                id: "c1".into(),
                task: a.task.clone(),
                failed_at: at,
                healthy_run: false,
            };
            tracker.apply(&r, Ok(()), at);
            assert_eq!(tracker.restarts(&a.task), i as u32 + 1);
        }
        // A third failure far outside the window of the first two: restarted, not given up.
        let c = exited(&a, "c1", 1, 990, 1000);
        let actions = plan(
            &[a.clone()],
            std::slice::from_ref(&c),
            &tracker,
            t(1100),
            false,
        );
        assert_eq!(moves(&actions), vec!["restart c1"]);
        // The same third failure within the window of the first two: given up.
        let c = exited(&a, "c1", 1, 15, 20);
        let actions = plan(&[a.clone()], &[c], &tracker, t(21), false);
        assert_eq!(moves(&actions), vec!["give up web-0"]);
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let mut a = service("web-0");
        a.spec.restart.max_failures = 10;
        let mut tracker = RestartTracker::new();
        for at in [t(0), t(2), t(6)] {
            let r = Action::Restart {
                id: "c1".into(),
                task: a.task.clone(),
                failed_at: at,
                healthy_run: false,
            };
            tracker.apply(&r, Ok(()), at);
        }
        // Quick exit: the 4th consecutive restart waits 8s.
        let quick = exited(&a, "c1", 1, 20, 21);
        assert_eq!(
            moves(&plan(&[a.clone()], &[quick], &tracker, t(22), false)),
            vec!["wait web-0 29s"]
        );
        // After a run of 10 × initial (10s) the delay is back to 1s.
        let healthy = exited(&a, "c1", 1, 20, 30);
        assert_eq!(
            moves(&plan(&[a.clone()], &[healthy], &tracker, t(30), false)),
            vec!["wait web-0 31s"]
        );
    }

    #[test]
    fn failed_creates_back_off_and_give_up_with_the_error() {
        let a = service("web-0");
        let mut tracker = RestartTracker::new();
        let err = "image img:1 not found locally and pull failed: no registry".to_string();
        let mut now = t(0);
        let mut attempts = Vec::new();
        loop {
            let actions = plan(std::slice::from_ref(&a), &[], &tracker, now, false);
            if let Some(c) = actions.iter().find(|x| matches!(x, Action::Create { .. })) {
                attempts.push((now - t(0)).num_seconds());
                tracker.apply(c, Err(err.clone()), now);
            } else if let Some(g) = actions.iter().find(|x| matches!(x, Action::GiveUp { .. })) {
                tracker.apply(g, Ok(()), now);
                break;
            } else {
                let s = &reports(&actions)[0];
                assert_eq!(s.phase, TaskPhase::Starting);
                assert_eq!(
                    s.message.as_deref(),
                    Some(format!("{err}; retrying with back-off").as_str())
                );
            }
            now += chrono::Duration::milliseconds(500);
            assert!(now < t(100), "must give up");
        }
        assert_eq!(attempts, vec![0, 1, 3], "1s, then 2s back-off");
        let actions = plan(
            std::slice::from_ref(&a),
            &[],
            &tracker,
            now + chrono::Duration::hours(1),
            false,
        );
        assert_eq!(moves(&actions), Vec::<String>::new());
        let s = &reports(&actions)[0];
        assert_eq!(s.phase, TaskPhase::Failed);
        assert_eq!(
            s.message.as_deref(),
            Some(format!("gave up after 3 failures in 10m: {err}").as_str())
        );
        assert!(s.gave_up);
    }

    #[test]
    fn a_new_spec_gets_a_fresh_failure_budget() {
        let a = service("web-0");
        let mut tracker = RestartTracker::new();
        tracker.apply(
            &Action::GiveUp {
                task: a.task.clone(),
                message: "gave up".into(),
            },
            Ok(()),
            t(0),
        );
        assert!(tracker.gave_up(&a.task));
        let mut b = a.clone();
        b.spec_hash = "ffffffffffffffff".into();
        let c = exited(&a, "c1", 1, 0, 1);
        let actions = plan(&[b.clone()], &[c], &tracker, t(5), false);
        let remove = actions
            .iter()
            .find(|x| matches!(x, Action::Remove { .. }))
            .expect("replaced");
        tracker.apply(remove, Ok(()), t(5));
        assert!(!tracker.gave_up(&a.task));
    }

    /// Applies the plan's actions to a fake Docker (a list of containers), as the shell
    /// does to the real one.
    fn simulate(observed: &mut Vec<Observed>, actions: &[Action], now: DateTime<Utc>) {
        for action in actions {
            match action {
                Action::Create { assignment } => observed.push(Observed {
                    created_at: Some(now),
                    started_at: Some(now),
                    ..container(
                        assignment,
                        &format!("new-{}", assignment.task),
                        ContainerState::Running,
                    )
                }),
                Action::Start { id, .. } | Action::Restart { id, .. } => {
                    for c in observed.iter_mut().filter(|c| &c.id == id) {
                        c.state = ContainerState::Running;
                        c.started_at = Some(now);
                        c.exit_code = None;
                    }
                }
                Action::Remove { id, .. } => observed.retain(|c| &c.id != id),
                Action::Stop { id, .. } => {
                    for c in observed.iter_mut().filter(|c| &c.id == id) {
                        c.state = ContainerState::Exited;
                        c.finished_at = Some(now);
                        c.exit_code = Some(0);
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn a_run_past_its_timeout_is_stopped_and_fails_without_a_local_restart() {
        let mut job = assignment("job-0", Kind::Job, RestartPolicy::OnFailure);
        job.spec.timeout = Some(ApiDuration::from_secs(10));
        job.spec_hash = job.spec.hash();
        let running = container(&job, "c1", ContainerState::Running); // started t(1)
        let tracker = RestartTracker::new();
        let one = |observed: &Observed, now| {
            plan(
                std::slice::from_ref(&job),
                std::slice::from_ref(observed),
                &tracker,
                now,
                false,
            )
        };

        let actions = one(&running, t(5));
        assert_eq!(
            moves(&actions),
            vec!["wait job-0 11s"],
            "wakes at the deadline"
        );
        assert_eq!(reports(&actions)[0].phase, TaskPhase::Running);

        let actions = one(&running, t(11));
        assert_eq!(moves(&actions), vec!["stop c1"]);
        assert_eq!(
            reports(&actions)[0].message.as_deref(),
            Some("timed out after 10s; stopping")
        );

        // The graceful stop exited 0; it is a failed attempt all the same.
        for code in [0, 143, 137] {
            let stopped = exited(&job, "c1", code, 1, 12);
            let actions = one(&stopped, t(12));
            assert_eq!(moves(&actions), Vec::<String>::new(), "not restarted here");
            let s = &reports(&actions)[0];
            assert_eq!(
                (s.phase, s.message.as_deref(), s.gave_up, s.exit_code),
                (
                    TaskPhase::Failed,
                    Some("timed out after 10s"),
                    false,
                    Some(code)
                )
            );
        }

        // Done in time: judged by its exit code as usual.
        let quick = exited(&job, "c1", 0, 1, 10);
        assert_eq!(
            phase_of(&one(&quick, t(12)), "job-0"),
            Some(TaskPhase::Succeeded)
        );
        let crashed = exited(&job, "c1", 1, 1, 10);
        assert_eq!(moves(&one(&crashed, t(12))), vec!["restart c1"]);

        // Only Jobs and CronJobs have a timeout.
        let mut web = service("web-0");
        web.spec.timeout = Some(ApiDuration::from_secs(10));
        web.spec_hash = web.spec.hash();
        let actions = plan(
            std::slice::from_ref(&web),
            &[container(&web, "c2", ContainerState::Running)],
            &tracker,
            t(100),
            false,
        );
        assert_eq!(moves(&actions), Vec::<String>::new());
    }

    #[test]
    fn converging_twice_changes_nothing() {
        let web = service("web-0");
        let web2 = service("web-1");
        let job = assignment("job-0", Kind::Job, RestartPolicy::OnFailure);
        let mut changed = web.clone();
        changed.spec_hash = "0000000000000000".into();
        let starts: Vec<(Vec<Assignment>, Vec<Observed>)> = vec![
            (vec![web.clone(), web2.clone()], vec![]),
            (
                vec![changed],
                vec![container(&web, "c1", ContainerState::Running)],
            ),
            (
                vec![web.clone(), job.clone()],
                vec![
                    exited(&web, "c1", 1, 1, 2),
                    exited(&web, "c2", 1, 1, 3),
                    exited(&job, "c3", 0, 1, 2),
                    container(&service("x-0"), "c4", ContainerState::Running),
                ],
            ),
            (
                vec![web2.clone()],
                vec![container(&web2, "c1", ContainerState::Created)],
            ),
        ];
        for (desired, mut observed) in starts {
            let tracker = RestartTracker::new();
            let now = t(100);
            let first = plan(&desired, &observed, &tracker, now, false);
            simulate(&mut observed, &first, now);
            let second = plan(&desired, &observed, &tracker, now, false);
            assert_eq!(moves(&second), Vec::<String>::new(), "{desired:?}");
            assert_eq!(
                observed.len(),
                desired.len(),
                "exactly one container per desired task"
            );
        }
    }

    #[test]
    fn observed_status_reflects_docker_alone() {
        let web = service("web-0");
        let cases = [
            (
                container(&web, "c", ContainerState::Running),
                TaskPhase::Running,
            ),
            (
                container(&web, "c", ContainerState::Created),
                TaskPhase::Starting,
            ),
            (exited(&web, "c", 0, 1, 2), TaskPhase::Succeeded),
            (exited(&web, "c", 1, 1, 2), TaskPhase::Failed),
            (
                container(&web, "c", ContainerState::Dead),
                TaskPhase::Failed,
            ),
        ];
        for (o, phase) in cases {
            let s = observed_status(&o);
            assert_eq!(s.phase, phase, "{:?}", o.state);
            assert_eq!(s.container_id.as_deref(), Some("c"));
        }
    }

    fn wallet(task: &str) -> Assignment {
        assignment(task, Kind::Wallet, RestartPolicy::Always)
    }

    fn probe() -> Probe {
        Probe {
            exec: None,
            http: Some(HttpProbe {
                port: 8080,
                path: "/healthz".into(),
            }),
            tcp: None,
            period: ApiDuration::from_secs(1),
            timeout: ApiDuration::from_secs(1),
            failure_threshold: 3,
            initial_delay: ApiDuration::from_secs(0),
        }
    }

    /// A task with the given probes (the spec hash follows the spec).
    fn probed(task: &str, liveness: bool, readiness: bool) -> Assignment {
        let mut a = service(task);
        a.spec.probes.liveness = liveness.then(probe);
        a.spec.probes.readiness = readiness.then(probe);
        a.spec_hash = a.spec.hash();
        a
    }

    fn verdict(o: &Observed, verdict: Verdict) -> probe::Report {
        probe::Report {
            task: o.task.clone(),
            run: Run::of(o),
            verdict,
        }
    }

    const HUNG: &str = "liveness probe failed 3 times: GET /healthz: timed out after 1s";

    #[test]
    fn a_fenced_node_stops_its_wallets_and_starts_none() {
        let w = wallet("ltc-0");
        let web = service("web-0");
        let gone = wallet("old-0");
        let now = t(100);
        type Case<'a> = (&'a str, Vec<Assignment>, Vec<Observed>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "a running wallet is removed, a service is left alone",
                vec![w.clone(), web.clone()],
                vec![
                    container(&w, "c-w", ContainerState::Running),
                    container(&web, "c-web", ContainerState::Running),
                ],
                vec!["remove c-w Fenced"],
            ),
            (
                "a missing wallet is not created",
                vec![w.clone()],
                vec![],
                vec![],
            ),
            (
                "an exited wallet is removed, not restarted",
                vec![w.clone()],
                vec![exited(&w, "c-w", 1, 1, 2)],
                vec!["remove c-w Fenced"],
            ),
            (
                "a created wallet is removed, not started",
                vec![w.clone()],
                vec![container(&w, "c-w", ContainerState::Created)],
                vec!["remove c-w Fenced"],
            ),
            (
                "an unassigned wallet goes with the fence's grace",
                vec![],
                vec![container(&gone, "c-g", ContainerState::Running)],
                vec!["remove c-g Fenced", "removed old-0"],
            ),
            (
                "a wallet with an outdated spec is removed, not replaced",
                vec![w.clone()],
                vec![Observed {
                    spec_hash: "0000000000000000".into(),
                    ..container(&w, "c-w", ContainerState::Running)
                }],
                vec!["remove c-w Fenced"],
            ),
        ];
        for (name, desired, observed, want) in cases {
            let actions = plan(&desired, &observed, &RestartTracker::new(), now, true);
            assert_eq!(moves(&actions), want, "{name}");
            if desired.contains(&w) {
                let s = reports(&actions)
                    .into_iter()
                    .find(|s| s.task == w.task)
                    .expect("the wallet is reported");
                assert_eq!(s.phase, TaskPhase::Stopped, "{name}");
                assert_eq!(s.message.as_deref(), Some(FENCED_MESSAGE), "{name}");
                assert_eq!(s.container_id, None, "{name}");
            }
        }
        // Unfenced, the same wallet runs again.
        let actions = plan(
            std::slice::from_ref(&w),
            &[],
            &RestartTracker::new(),
            now,
            false,
        );
        assert_eq!(moves(&actions), vec!["create ltc-0"]);
    }

    #[test]
    fn converging_twice_while_fenced_changes_nothing() {
        let w = wallet("ltc-0");
        let web = service("web-0");
        let mut observed = vec![
            container(&w, "c-w", ContainerState::Running),
            exited(&web, "c-web", 1, 1, 2),
        ];
        let tracker = RestartTracker::new();
        let desired = [w.clone(), web.clone()];
        let first = plan(&desired, &observed, &tracker, t(100), true);
        simulate(&mut observed, &first, t(100));
        let second = plan(&desired, &observed, &tracker, t(100), true);
        assert_eq!(moves(&second), Vec::<String>::new());
        assert_eq!(
            observed.iter().map(|o| o.task.as_str()).collect::<Vec<_>>(),
            vec!["web-0"],
            "the service was restarted, the wallet is gone"
        );
    }

    #[test]
    fn a_failed_liveness_probe_stops_the_container_and_restarts_it_like_a_crash() {
        let a = probed("web-0", true, false);
        let running = container(&a, "c1", ContainerState::Running);
        let mut tracker = RestartTracker::new();
        tracker.probed(&verdict(&running, Verdict::LivenessFailed(HUNG.into())));

        let actions = plan(
            std::slice::from_ref(&a),
            std::slice::from_ref(&running),
            &tracker,
            t(10),
            false,
        );
        assert_eq!(moves(&actions), vec!["stop c1"]);
        let s = &reports(&actions)[0];
        assert_eq!(
            (s.phase, s.message.as_deref()),
            (TaskPhase::Running, Some(HUNG))
        );

        // Stopped gracefully (exit 0): still a failure, restarted after the back-off.
        let stopped = Observed {
            exit_code: Some(0),
            finished_at: Some(t(11)),
            ..running.clone()
        };
        let stopped = Observed {
            state: ContainerState::Exited,
            ..stopped
        };
        let actions = plan(
            std::slice::from_ref(&a),
            std::slice::from_ref(&stopped),
            &tracker,
            t(11),
            false,
        );
        assert_eq!(moves(&actions), vec!["wait web-0 12s"]);
        let s = &reports(&actions)[0];
        assert_eq!(s.phase, TaskPhase::Starting);
        assert_eq!(
            s.message.as_deref(),
            Some(format!("{HUNG}; restarting with back-off").as_str())
        );
        let actions = plan(
            std::slice::from_ref(&a),
            std::slice::from_ref(&stopped),
            &tracker,
            t(12),
            false,
        );
        assert_eq!(moves(&actions), vec!["restart c1"]);
        let restart = actions
            .iter()
            .find(|x| matches!(x, Action::Restart { .. }))
            .expect("restart");
        tracker.apply(restart, Ok(()), t(12));
        assert_eq!(tracker.restarts(&a.task), 1);

        // The new run is judged afresh: no stop without a new verdict.
        let again = Observed {
            started_at: Some(t(12)),
            ..running
        };
        let actions = plan(std::slice::from_ref(&a), &[again], &tracker, t(13), false);
        assert_eq!(moves(&actions), Vec::<String>::new());
        assert_eq!(reports(&actions)[0].message, None);
    }

    #[test]
    fn liveness_failures_count_towards_giving_up() {
        let mut a = probed("web-0", true, false);
        a.spec.restart.max_failures = 1;
        a.spec_hash = a.spec.hash();
        let c = exited(&a, "c1", 0, 1, 2);
        let mut tracker = RestartTracker::new();
        tracker.probed(&verdict(&c, Verdict::LivenessFailed(HUNG.into())));
        let actions = plan(std::slice::from_ref(&a), &[c], &tracker, t(5), false);
        assert_eq!(moves(&actions), vec!["give up web-0"]);
        let s = &reports(&actions)[0];
        assert_eq!(
            s.message.as_deref(),
            Some(format!("gave up after 1 failures in 10m: {HUNG}").as_str())
        );
    }

    #[test]
    fn a_liveness_failure_is_a_failure_for_on_failure_and_never_policies() {
        for (policy, want, phase) in [
            (
                RestartPolicy::OnFailure,
                vec!["restart c1"],
                TaskPhase::Starting,
            ),
            (RestartPolicy::Never, vec![], TaskPhase::Failed),
        ] {
            let mut a = assignment("web-0", Kind::Service, policy);
            a.spec.probes.liveness = Some(probe());
            a.spec_hash = a.spec.hash();
            let c = exited(&a, "c1", 0, 1, 2);
            let mut tracker = RestartTracker::new();
            tracker.probed(&verdict(&c, Verdict::LivenessFailed(HUNG.into())));
            let actions = plan(std::slice::from_ref(&a), &[c], &tracker, t(50), false);
            assert_eq!(moves(&actions), want, "{policy:?}");
            assert_eq!(reports(&actions)[0].phase, phase, "{policy:?}");
        }
    }

    #[test]
    fn a_verdict_about_another_run_changes_nothing() {
        let a = probed("web-0", true, true);
        let running = container(&a, "c1", ContainerState::Running);
        let old_run = Observed {
            started_at: Some(t(0)),
            ..running.clone()
        };
        let mut tracker = RestartTracker::new();
        tracker.probed(&verdict(&old_run, Verdict::LivenessFailed(HUNG.into())));
        tracker.probed(&verdict(&old_run, Verdict::Ready(true)));
        let actions = plan(std::slice::from_ref(&a), &[running], &tracker, t(10), false);
        assert_eq!(moves(&actions), Vec::<String>::new());
        assert_eq!(reports(&actions)[0].ready, Some(false));
    }

    #[test]
    fn readiness_is_reported_only_for_tasks_with_a_readiness_probe() {
        let plain = service("plain-0");
        let a = probed("web-0", false, true);
        let running = container(&a, "c1", ContainerState::Running);
        let ready_of = |a: &Assignment, o: Vec<Observed>, tracker: &RestartTracker| {
            reports(&plan(std::slice::from_ref(a), &o, tracker, t(10), false))[0].ready
        };
        let mut tracker = RestartTracker::new();
        assert_eq!(
            ready_of(
                &plain,
                vec![container(&plain, "c0", ContainerState::Running)],
                &tracker
            ),
            None
        );
        assert_eq!(
            ready_of(&a, vec![running.clone()], &tracker),
            Some(false),
            "not ready before the first success"
        );
        tracker.probed(&verdict(&running, Verdict::Ready(true)));
        assert_eq!(ready_of(&a, vec![running.clone()], &tracker), Some(true));
        assert_eq!(
            ready_of(&a, vec![exited(&a, "c1", 1, 1, 2)], &tracker),
            Some(false),
            "an exited container is not ready"
        );
        assert_eq!(ready_of(&a, vec![], &tracker), Some(false));
        tracker.probed(&verdict(&running, Verdict::Ready(false)));
        assert_eq!(ready_of(&a, vec![running], &tracker), Some(false));
    }

    #[test]
    fn probes_target_the_running_container_of_the_current_spec() {
        let a = probed("web-0", true, false);
        let plain = service("plain-0");
        let running = container(&a, "c1", ContainerState::Running);
        let targets = |desired: &[Assignment], observed: &[Observed]| {
            probe_targets(desired, observed)
                .into_iter()
                .map(|(a, run)| (a.task.clone(), run.container))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            targets(
                &[a.clone(), plain.clone()],
                &[
                    running.clone(),
                    container(&plain, "c2", ContainerState::Running)
                ]
            ),
            vec![("web-0".to_string(), "c1".to_string())]
        );
        assert!(targets(std::slice::from_ref(&a), &[exited(&a, "c1", 1, 1, 2)]).is_empty());
        let outdated = Observed {
            spec_hash: "0000000000000000".into(),
            ..running
        };
        assert!(targets(std::slice::from_ref(&a), &[outdated]).is_empty());
        assert!(targets(std::slice::from_ref(&a), &[]).is_empty());
    }
}
