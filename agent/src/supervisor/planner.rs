//! The supervisor's pure core: what to do so that Docker runs exactly the desired tasks.
//!
//! [`plan`] is a function of the desired set, the observed containers, the failure and
//! probe history ([`RestartTracker`]), the time and the fence; it returns [`Action`]s,
//! and [`RestartTracker::apply`] folds each action's outcome back into the history. No
//! I/O and no clock: the shell reads both and passes them in, so every rule of the
//! module doc (see [`super`]) is tested here without Docker.

use std::collections::{HashMap, HashSet};

use bramble_api::backoff;
use bramble_api::manifest::{Kind, RestartPolicy};
use bramble_api::task::{Reason, TaskPhase};
use bramble_api::wire::{Assignment, TaskStatus};
use chrono::{DateTime, Utc};

use crate::probe::{self, Run, Verdict};
use crate::runtime::{nano_cpus, ContainerState, Observed};

/// A healthy run lasts at least this many times `backoff.initial`; after one, the
/// back-off starts over at `initial`.
pub const HEALTHY_RUN_FACTOR: u32 = 10;

/// The status message of a Wallet stopped by the fence.
pub const FENCED_MESSAGE: &str =
    "fenced: no word from the controller; the wallet runs again only when the controller assigns it anew";

/// How long before a run's [`Assignment::not_before`] the round that starts it is
/// planned: the start then waits for the instant itself, so listing the node's
/// containers and planning are not part of the run's lateness.
pub const PLANNED_AHEAD: chrono::Duration = chrono::Duration::milliseconds(100);

/// One step towards the desired state, as decided by [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create and start the task's container (pulling its image if needed).
    Create {
        /// The task (boxed: it is by far the largest variant).
        assignment: Box<Assignment>,
    },
    /// Create the task's container (pulling its image if needed) without starting it: a
    /// run sent ahead of its [`Assignment::not_before`].
    Prepare {
        /// The task.
        assignment: Box<Assignment>,
    },
    /// Start a container that was created but never ran (not a restart).
    Start {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// Not before this instant (a run's slot), which is at most [`PLANNED_AHEAD`]
        /// away when planned.
        at: Option<DateTime<Utc>>,
        /// The task's CPU limit, to set right after the start, when the container was
        /// created without it (see [`Runtime::create_and_start`]).
        ///
        /// [`Runtime::create_and_start`]: crate::runtime::Runtime::create_and_start
        nano_cpus: Option<i64>,
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
        /// The task's CPU limit: widened to the whole node for the start and put back
        /// right after it, for the reason [`Runtime::create_and_start`] gives.
        ///
        /// [`Runtime::create_and_start`]: crate::runtime::Runtime::create_and_start
        nano_cpus: Option<i64>,
    },
    /// Set the CPU limit of a running container that lacks it: one whose agent died
    /// between its start and its limit (see [`Runtime::create_and_start`]), or one
    /// changed by hand.
    ///
    /// [`Runtime::create_and_start`]: crate::runtime::Runtime::create_and_start
    LimitCpu {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// The task's limit ([`nano_cpus`]).
        nano_cpus: i64,
    },
    /// Stop a running container whose liveness probe failed (SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`](super::STOP_GRACE)); it is then restarted like one that crashed.
    Stop {
        /// Container id.
        id: String,
        /// Task id.
        task: String,
        /// The probe's verdict, e.g. `liveness probe failed 3 times: GET /healthz: …`.
        cause: String,
    },
    /// Stop (SIGTERM, then SIGKILL after [`STOP_GRACE`](super::STOP_GRACE), or [`fence::GRACE`](crate::fence::GRACE) when fenced)
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

impl Action {
    /// The task it is for.
    pub fn task(&self) -> &str {
        match self {
            Action::Create { assignment } | Action::Prepare { assignment } => &assignment.task,
            Action::Start { task, .. }
            | Action::Restart { task, .. }
            | Action::LimitCpu { task, .. }
            | Action::Stop { task, .. }
            | Action::Remove { task, .. }
            | Action::ReportRemoved { task }
            | Action::GiveUp { task, .. }
            | Action::Wait { task, .. } => task,
            Action::Report { status } => &status.task,
        }
    }
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

/// A failed action: what an operator can act on, and the error in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// By name.
    pub reason: Reason,
    /// The error chain.
    pub message: String,
}

impl From<String> for Failure {
    /// A failure the engine gave no more precise reason for.
    fn from(message: String) -> Failure {
        Failure {
            reason: Reason::CreateContainerError,
            message,
        }
    }
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
    last_error: Option<Failure>,
    /// Set once the task was given up.
    gave_up: Option<String>,
    /// A run whose liveness probe failed, and the probe's message.
    liveness_failed: Option<(Run, String)>,
    /// The readiness probe's last verdict about a run.
    ready: Option<(Run, bool)>,
    /// Why this node refuses to start the task (its volumes break the node's host path
    /// rules), as the shell found it before this plan; None when it may start.
    refused: Option<String>,
}

impl RestartTracker {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds the outcome of an executed action into the history. `outcome` is the error
    /// text when the action failed; `now` is when it finished.
    pub fn apply(&mut self, action: &Action, outcome: Result<(), Failure>, now: DateTime<Utc>) {
        match action {
            Action::Create { assignment } | Action::Prepare { assignment } => {
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
            | Action::LimitCpu { .. }
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

    /// Marks `task` as one this node refuses to start, and why (see `Rules` in the
    /// module doc of [`super`]), or clears that with None. Not sticky: the shell sets it
    /// before every plan from the node's rules and file system as they are then. Whether
    /// it changed.
    pub fn refuse(&mut self, task: &str, why: Option<String>) -> bool {
        match why {
            Some(why) => {
                let rec = self.tasks.entry(task.to_string()).or_default();
                let changed = rec.refused.as_deref() != Some(why.as_str());
                rec.refused = Some(why);
                changed
            }
            None => self
                .tasks
                .get_mut(task)
                .and_then(|r| r.refused.take())
                .is_some(),
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
    fn fail(&mut self, at: DateTime<Utc>, error: Option<Failure>) {
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

/// A task's restart schedule, Bramble's one back-off type: the `n`-th consecutive
/// restart (n ≥ 1) waits `initial × 2^(n-1)`, capped at `max`.
fn schedule(a: &Assignment) -> backoff::Backoff {
    let b = a.spec.restart.backoff;
    backoff::Backoff::new(b.initial.std(), b.max.std())
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
            reason: Some(Reason::Fenced),
            restart_at: None,
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
pub(super) fn pick_keeper<'a>(containers: &[&'a Observed]) -> Option<&'a Observed> {
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
        // A run started ahead through the cron gate began at its slot, when the gate
        // ran its command, not when its container started.
        started_at: c
            .and_then(|c| c.started_at)
            .map(|started| a.not_before.map_or(started, |at| started.max(at))),
        finished_at: None,
        gave_up: false,
        output: None,
        reason: None,
        restart_at: None,
    };

    let never_started = c.is_none_or(|c| c.state == ContainerState::Created);
    if never_started {
        if let Some(deadline) = unstarted_past_deadline(a, now) {
            let why = rec
                .and_then(|r| r.last_error.as_ref())
                .map(|e| e.message.as_str())
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            status.phase = TaskPhase::Failed;
            status.reason = Some(Reason::DeadlineExceeded);
            status.message = Some(format!(
                "timed out: not started by its deadline {}{why}",
                deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
            status.finished_at = Some(deadline);
            actions.push(Action::Report { status });
            return;
        }
        if let Some(deadline) = a.deadline.filter(|_| a.kind.runs_to_completion()) {
            actions.push(Action::Wait {
                task: a.task.clone(),
                until: deadline,
            });
        }
    }

    // A run sent ahead of its slot: readied now, started at the slot, never before.
    let waits_until = a.not_before.filter(|at| *at > now);
    if let Some(at) = waits_until.filter(|_| never_started) {
        status.message = Some(format!(
            "waiting for its slot {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ));
    }
    let create = |a: &Assignment| match waits_until {
        Some(_) => Action::Prepare {
            assignment: Box::new(a.clone()),
        },
        None => Action::Create {
            assignment: Box::new(a.clone()),
        },
    };

    let Some(c) = c else {
        if let Some(at) = waits_until {
            actions.push(Action::Wait {
                task: a.task.clone(),
                until: at - PLANNED_AHEAD,
            });
        }
        attempt(a, rec, since, now, status, create(a), actions);
        return;
    };

    if c.spec_hash != a.spec_hash {
        status.container_id = None;
        status.started_at = None;
        status.restarts = 0;
        status.ready = readiness(a, None, None);
        // The old container goes either way: it runs a spec that is no longer wanted.
        let remove = Action::Remove {
            id: c.id.clone(),
            task: a.task.clone(),
            reason: RemoveReason::Outdated,
        };
        if let Some(why) = rec.and_then(|r| r.refused.as_deref()) {
            refuse(status, why, actions);
            actions.push(remove);
            return;
        }
        actions.push(Action::Report { status });
        actions.push(remove);
        actions.push(create(a));
        return;
    }

    match c.state {
        ContainerState::Running if waits_until.is_some() => {
            // Started ahead through the cron gate, which holds the run's command until
            // its slot: the run itself has not begun.
            if let Some(at) = waits_until {
                status.started_at = None;
                status.message = Some(format!(
                    "started ahead; its command runs at its slot {}",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ));
                actions.push(Action::Report { status });
                actions.push(Action::Wait {
                    task: a.task.clone(),
                    until: at,
                });
            }
        }
        ContainerState::Running | ContainerState::Paused => {
            status.phase = TaskPhase::Running;
            if c.state == ContainerState::Paused {
                status.message = Some("container is paused".to_string());
            }
            let hung = liveness_failure(rec, c).filter(|_| c.state == ContainerState::Running);
            if let Some(cause) = hung {
                // Stopped now, restarted (after the back-off) as if it had crashed.
                status.reason = Some(Reason::Unhealthy);
                status.message = Some(cause.to_string());
                actions.push(Action::Report { status });
                actions.push(Action::Stop {
                    id: c.id.clone(),
                    task: a.task.clone(),
                    cause: cause.to_string(),
                });
                return;
            }
            if let Some(limit) = lacked_cpu_limit(a, c) {
                actions.push(Action::LimitCpu {
                    id: c.id.clone(),
                    task: a.task.clone(),
                    nano_cpus: limit,
                });
            }
            match run_deadline(a, c).filter(|_| c.state == ContainerState::Running) {
                Some(deadline) if now >= deadline => {
                    // Stopped now; the exited run is then final (see `plan_exited`).
                    let cause = timeout_cause(a);
                    status.reason = Some(Reason::DeadlineExceeded);
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
            // Created but never started: a run readied ahead of its slot, an agent that
            // died between create and start, or a start that failed.
            if let Some(at) = waits_until.filter(|at| now < *at - PLANNED_AHEAD) {
                actions.push(Action::Report { status });
                actions.push(Action::Wait {
                    task: a.task.clone(),
                    until: at - PLANNED_AHEAD,
                });
                return;
            }
            let start = Action::Start {
                id: c.id.clone(),
                task: a.task.clone(),
                at: waits_until,
                nano_cpus: lacked_cpu_limit(a, c),
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
        if let Some(why) = &r.refused {
            refuse(status, why, actions);
            return;
        }
        if let Some(msg) = &r.gave_up {
            status.phase = TaskPhase::Failed;
            status.message = Some(msg.clone());
            status.reason = r.last_error.as_ref().map(|e| e.reason);
            status.gave_up = true;
            actions.push(Action::Report { status });
            return;
        }
        if let Some(Failure {
            reason,
            message: err,
        }) = &r.last_error
        {
            status.reason = Some(*reason);
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
            // Set whether or not the wait is over, so the report made when it is over
            // equals the one made while waiting (no new report, no store write).
            status.restart_at = Some(until);
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

/// The task's CPU limit, when container `c` lacks it (has none, or another one).
fn lacked_cpu_limit(a: &Assignment, c: &Observed) -> Option<i64> {
    nano_cpus(a).filter(|n| c.nano_cpus != Some(*n))
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
    // Why it failed, if it did; a crash loop is named once it is restarted.
    let failed_because = if liveness.is_some() {
        Some(Reason::Unhealthy)
    } else if c.oom_killed {
        Some(Reason::OomKilled)
    } else {
        None
    };

    if let Some(msg) = rec.and_then(|r| r.gave_up.clone()) {
        status.phase = TaskPhase::Failed;
        status.reason = failed_because.or(Some(Reason::CrashLoopBackOff));
        status.message = Some(msg);
        status.gave_up = true;
        actions.push(Action::Report { status });
        return;
    }
    if timed_out(a, c) {
        // A failed attempt, whatever the exit code (a graceful stop may exit 0). Never
        // restarted here: retrying is the controller's decision (`retries`).
        status.phase = TaskPhase::Failed;
        status.reason = Some(Reason::DeadlineExceeded);
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
            status.reason = failed_because;
            status.message = Some(cause);
        }
        actions.push(Action::Report { status });
        return;
    }

    if let Some(why) = rec.and_then(|r| r.refused.as_deref()) {
        refuse(status, &format!("{cause}; not restarted: {why}"), actions);
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
        status.reason = failed_because.or(Some(Reason::CrashLoopBackOff));
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
        // The first crash after a healthy run is not a loop: restarted at once. The
        // back-off is for crash loops, and grows from here if it becomes one.
        _ if healthy_run => failed_at,
        _ => failed_at + delay(a, streak + 1),
    };
    let at_once = healthy_run && !recorded;
    status.message = Some(match rec.and_then(|r| r.last_error.as_ref()) {
        Some(err) if recorded => format!(
            "{cause}; restart failed: {}; retrying with back-off",
            err.message
        ),
        _ if at_once => format!("{cause}; restarting"),
        _ => format!("{cause}; restarting with back-off"),
    });
    status.reason = match rec.and_then(|r| r.last_error.as_ref()).map(|e| e.reason) {
        Some(r) if recorded => Some(r),
        _ if at_once => failed_because,
        _ => Some(Reason::CrashLoopBackOff),
    };
    status.restart_at = (!at_once).then_some(until);
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
            nano_cpus: nano_cpus(a),
        });
    }
}

/// Reports a task this node refuses to start (see [`RestartTracker::refuse`]): Failed
/// and given up, so the controller places it on a node whose rules allow it. Nothing
/// is created, started or restarted; the refusal is the whole message.
fn refuse(mut status: TaskStatus, why: &str, actions: &mut Vec<Action>) {
    status.phase = TaskPhase::Failed;
    status.reason = Some(Reason::HostPathRefused);
    status.message = Some(why.to_string());
    status.gave_up = true;
    actions.push(Action::Report { status });
}

/// When a Job's or CronJob's current run must end: its start plus `spec.timeout`, or
/// the controller's deadline (`timeout` after the firing) if that is earlier. None for
/// other kinds, without a timeout, or before the run started.
fn run_deadline(a: &Assignment, c: &Observed) -> Option<DateTime<Utc>> {
    if !a.kind.runs_to_completion() {
        return None;
    }
    let timeout = chrono::Duration::from_std(a.spec.timeout?.std()).ok()?;
    let from_start = c.started_at?.checked_add_signed(timeout)?;
    Some(a.deadline.map_or(from_start, |d| d.min(from_start)))
}

/// A run that has not started by the controller's deadline has failed: it is not
/// started late (its slot may be long gone), and it must not hold the next slots.
fn unstarted_past_deadline(a: &Assignment, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    a.deadline
        .filter(|d| a.kind.runs_to_completion() && now >= *d)
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

/// The wait before the `n`-th consecutive restart (0 counts as 1).
fn delay(a: &Assignment, n: u32) -> chrono::Duration {
    let d = schedule(a).delay(n);
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn exit_cause(c: &Observed) -> String {
    if c.oom_killed {
        "killed: out of memory".to_string()
    } else {
        match c.exit_code {
            // Docker flags an OOM kill only when containerd was already watching the
            // container's memory cgroup, which it starts after the process does: one
            // killed in its first milliseconds shows as a bare SIGKILL.
            Some(SIGKILLED) => format!(
                "exited with code {SIGKILLED} (SIGKILL: out of memory, or killed from outside)"
            ),
            Some(code) => format!("exited with code {code}"),
            None => "exited".to_string(),
        }
    }
}

/// The exit code of a process killed by SIGKILL (128 + 9).
const SIGKILLED: i64 = 137;

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
        reason: (phase == TaskPhase::Failed && o.oom_killed).then_some(Reason::OomKilled),
        restart_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::duration::Duration as ApiDuration;
    use bramble_api::manifest::{Backoff, HttpProbe, Kind, Probe, Restart};
    use bramble_api::task::TaskSpec;
    use chrono::TimeZone;
    use std::time::Duration;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn assignment(task: &str, kind: Kind, policy: RestartPolicy) -> Assignment {
        let spec = TaskSpec {
            sync: None,
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
            restore_from: None,
            not_before: None,
            sync_to: Vec::new(),
            task: task.into(),
            kind,
            workload: "w".into(),
            spec_hash: spec.hash(),
            spec,
            deadline: None,
            secrets: Default::default(),
            epoch: None,
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
            host_ports: Vec::new(),
            exit_code: None,
            oom_killed: false,
            error: None,
            created_at: Some(t(0)),
            started_at: Some(t(1)),
            finished_at: None,
            nano_cpus: nano_cpus(a),
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
                Action::Prepare { assignment } => Some(format!("prepare {}", assignment.task)),
                Action::Start { id, nano_cpus, .. } => Some(match nano_cpus {
                    Some(n) => format!("start {id} limit {n}"),
                    None => format!("start {id}"),
                }),
                Action::Restart { id, .. } => Some(format!("restart {id}")),
                Action::Stop { id, .. } => Some(format!("stop {id}")),
                Action::LimitCpu { id, nano_cpus, .. } => Some(format!("limit {id} {nano_cpus}")),
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
    fn a_running_container_without_its_cpu_limit_gets_it_and_no_other_is_touched() {
        let mut limited = service("web-0");
        limited.spec.resources.cpu = Some("250m".parse().expect("cpu"));
        limited.spec_hash = limited.spec.hash();
        let free = service("free-0");
        let with = |a: &Assignment, state, n: Option<i64>| Observed {
            nano_cpus: n,
            ..container(a, "c1", state)
        };
        let cases = [
            // The agent died between start and limit.
            (
                &limited,
                with(&limited, ContainerState::Running, None),
                vec!["limit c1 250000000"],
            ),
            // Changed by hand: set back.
            (
                &limited,
                with(&limited, ContainerState::Running, Some(1_000_000_000)),
                vec!["limit c1 250000000"],
            ),
            (
                &limited,
                with(&limited, ContainerState::Paused, None),
                vec!["limit c1 250000000"],
            ),
            (
                &limited,
                with(&limited, ContainerState::Running, Some(250_000_000)),
                vec![],
            ),
            // Created without it (to start unthrottled): limited right after the start.
            (
                &limited,
                with(&limited, ContainerState::Created, None),
                vec!["start c1 limit 250000000"],
            ),
            (
                &limited,
                with(&limited, ContainerState::Created, Some(250_000_000)),
                vec!["start c1"],
            ),
            // A task without a limit: a container's own limit is not lifted.
            (
                &free,
                with(&free, ContainerState::Running, Some(500_000_000)),
                vec![],
            ),
            (&free, with(&free, ContainerState::Running, None), vec![]),
        ];
        // A restart carries the limit, to put back after a start without it.
        for (a, want) in [(&limited, Some(250_000_000)), (&free, None)] {
            let crashed = exited(a, "c1", 1, 1, 5);
            let actions = plan(
                std::slice::from_ref(a),
                &[crashed],
                &RestartTracker::new(),
                t(10),
                false,
            );
            let restart = actions
                .iter()
                .find_map(|x| match x {
                    Action::Restart { nano_cpus, .. } => Some(*nano_cpus),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no restart: {actions:?}"));
            assert_eq!(restart, want, "{}", a.task);
        }
        for (a, c, want) in cases {
            let actions = plan(
                std::slice::from_ref(a),
                std::slice::from_ref(&c),
                &RestartTracker::new(),
                t(10),
                false,
            );
            assert_eq!(
                moves(&actions),
                want,
                "{} {:?} {:?}",
                a.task,
                c.state,
                c.nano_cpus
            );
            if c.state != ContainerState::Created {
                assert_eq!(
                    phase_of(&actions, &a.task),
                    Some(TaskPhase::Running),
                    "{:?}",
                    c.nano_cpus
                );
            }
        }
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

        // A SIGKILL that Docker did not flag as an OOM kill may still be one.
        let actions = plan(
            std::slice::from_ref(&once),
            &[exited(&once, "c1", 137, 1, 2)],
            &RestartTracker::new(),
            t(10),
            false,
        );
        let s = &reports(&actions)[0];
        assert_eq!((s.phase, s.reason), (TaskPhase::Failed, None));
        assert_eq!(
            s.message.as_deref(),
            Some("exited with code 137 (SIGKILL: out of memory, or killed from outside)")
        );

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
        let mut a = service("web-0");
        let got: Vec<Duration> = (1..=6).map(|n| schedule(&a).delay(n)).collect();
        assert_eq!(got, vec![s(1), s(2), s(4), s(8), s(8), s(8)]);
        a.spec.restart.backoff.max = ApiDuration::from_secs(300);
        assert_eq!(schedule(&a).delay(200), s(300), "no overflow");
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
                nano_cpus: None,
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
                nano_cpus: None,
            };
            tracker.apply(&r, Ok(()), at);
        }
        // Quick exit: the 4th consecutive restart waits 8s.
        let quick = exited(&a, "c1", 1, 20, 21);
        assert_eq!(
            moves(&plan(&[a.clone()], &[quick], &tracker, t(22), false)),
            vec!["wait web-0 29s"]
        );
        // After a run of 10 × initial (10s) the first crash restarts at once…
        let healthy = exited(&a, "c1", 1, 20, 30);
        let actions = plan(
            &[a.clone()],
            std::slice::from_ref(&healthy),
            &tracker,
            t(30),
            false,
        );
        assert_eq!(moves(&actions), vec!["restart c1"]);
        let s = &reports(&actions)[0];
        assert_eq!(
            (s.message.as_deref(), s.reason, s.restart_at),
            (Some("exited with code 1; restarting"), None, None)
        );
        // …and a quick second one backs off: 2 s, the second failure of a new streak.
        let restart = actions
            .iter()
            .find(|x| matches!(x, Action::Restart { .. }))
            .expect("restart");
        tracker.apply(restart, Ok(()), t(30));
        let again = exited(&a, "c1", 1, 30, 31);
        assert_eq!(
            moves(&plan(&[a.clone()], &[again], &tracker, t(31), false)),
            vec!["wait web-0 33s"]
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
                tracker.apply(c, Err(err.clone().into()), now);
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
                assert_eq!(s.reason, Some(Reason::CreateContainerError));
                let wait = actions.iter().find_map(|x| match x {
                    Action::Wait { until, .. } => Some(*until),
                    _ => None,
                });
                assert_eq!(s.restart_at, wait, "the next try is the end of the wait");
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
        assert_eq!(s.reason, Some(Reason::CreateContainerError));
    }

    #[test]
    fn failures_are_named_and_the_report_does_not_change_when_the_wait_ends() {
        let a = service("web-0");
        let mut tracker = RestartTracker::new();
        let failure = Failure {
            reason: Reason::PortInUse,
            message: "cannot start container c: port is already allocated".into(),
        };
        let create = Action::Create {
            assignment: Box::new(a.clone()),
        };
        tracker.apply(&create, Err(failure), t(0));
        let waiting = plan(std::slice::from_ref(&a), &[], &tracker, t(0), false);
        let over = plan(std::slice::from_ref(&a), &[], &tracker, t(5), false);
        assert_eq!(moves(&waiting), vec!["wait web-0 1s"]);
        assert_eq!(moves(&over), vec!["create web-0"]);
        assert_eq!(reports(&waiting)[0].reason, Some(Reason::PortInUse));
        assert_eq!(reports(&waiting)[0].restart_at, Some(t(1)));
        assert_eq!(
            reports(&waiting),
            reports(&over),
            "no new report, no store write"
        );
        // Created at last: the reason goes with the error.
        tracker.apply(&create, Ok(()), t(6));
        let running = container(&a, "c1", ContainerState::Running);
        let s = &reports(&plan(
            std::slice::from_ref(&a),
            &[running],
            &tracker,
            t(7),
            false,
        ))[0];
        assert_eq!(
            (s.phase, s.reason, s.restart_at),
            (TaskPhase::Running, None, None)
        );

        // A crash loop, and a kill for memory within it.
        let report = |c: Observed| {
            reports(&plan(std::slice::from_ref(&a), &[c], &tracker, t(7), false))[0].clone()
        };
        let s = report(exited(&a, "c1", 3, 6, 7));
        assert_eq!(s.reason, Some(Reason::CrashLoopBackOff));
        assert_eq!(
            s.restart_at,
            Some(t(9)),
            "the create failure counts in the streak"
        );
        let mut oom = exited(&a, "c1", 137, 6, 7);
        oom.oom_killed = true;
        let s = report(oom);
        assert_eq!(s.reason, Some(Reason::CrashLoopBackOff));
        assert_eq!(
            s.message.as_deref(),
            Some("killed: out of memory; restarting with back-off")
        );
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

    const REFUSED: &str =
        "hostPath \"/\" is refused: a system path; allowed: /var/lib/bramble/volumes";

    #[test]
    fn a_refused_task_is_never_started_and_is_given_up_in_every_situation() {
        let web = service("web-0");
        let job = assignment("job-0", Kind::Job, RestartPolicy::OnFailure);
        let mut changed = web.clone();
        changed.spec_hash = "0000000000000000".into();
        let mut tracker = RestartTracker::new();
        for task in ["web-0", "job-0"] {
            assert!(tracker.refuse(task, Some(REFUSED.into())), "newly refused");
            assert!(!tracker.refuse(task, Some(REFUSED.into())), "unchanged");
        }
        // (what, desired, observed, moves, message)
        type Case = (
            &'static str,
            Assignment,
            Vec<Observed>,
            Vec<&'static str>,
            String,
        );
        let cases: Vec<Case> = vec![
            ("no container", web.clone(), vec![], vec![], REFUSED.into()),
            (
                "created, never started",
                web.clone(),
                vec![container(&web, "c1", ContainerState::Created)],
                vec![],
                REFUSED.into(),
            ),
            (
                "crashed, restart wanted",
                web.clone(),
                vec![exited(&web, "c1", 1, 1, 2)],
                vec![],
                format!("exited with code 1; not restarted: {REFUSED}"),
            ),
            (
                "outdated: removed, not replaced",
                changed.clone(),
                vec![container(&web, "c1", ContainerState::Running)],
                vec!["remove c1 Outdated"],
                REFUSED.into(),
            ),
            (
                "a job's run, failed",
                job.clone(),
                vec![exited(&job, "c1", 3, 1, 2)],
                vec![],
                format!("exited with code 3; not restarted: {REFUSED}"),
            ),
        ];
        for (what, a, observed, want, message) in cases {
            let actions = plan(std::slice::from_ref(&a), &observed, &tracker, t(100), false);
            assert_eq!(moves(&actions), want, "{what}");
            let r = reports(&actions);
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            assert_eq!(r[0].phase, TaskPhase::Failed, "{what}");
            assert!(r[0].gave_up, "{what}: the controller places it elsewhere");
            assert_eq!(r[0].message.as_deref(), Some(message.as_str()), "{what}");
        }
    }

    #[test]
    fn a_refused_task_that_already_runs_or_is_done_is_left_as_it_is() {
        let web = service("web-0");
        let job = assignment("job-0", Kind::Job, RestartPolicy::OnFailure);
        let mut tracker = RestartTracker::new();
        tracker.refuse("web-0", Some(REFUSED.into()));
        tracker.refuse("job-0", Some(REFUSED.into()));
        // Adopted after the agent restarted with narrower rules: never killed for it.
        let running = container(&web, "c1", ContainerState::Running);
        let actions = plan(
            std::slice::from_ref(&web),
            &[running],
            &tracker,
            t(100),
            false,
        );
        assert_eq!(moves(&actions), Vec::<String>::new());
        assert_eq!(phase_of(&actions, "web-0"), Some(TaskPhase::Running));
        // A job that succeeded is done: its success stands.
        let done = exited(&job, "c2", 0, 1, 2);
        let actions = plan(&[job], &[done], &tracker, t(100), false);
        assert_eq!(moves(&actions), Vec::<String>::new());
        assert_eq!(phase_of(&actions, "job-0"), Some(TaskPhase::Succeeded));
    }

    #[test]
    fn a_refusal_is_not_sticky_once_the_rules_allow_the_task() {
        let web = service("web-0");
        let mut tracker = RestartTracker::new();
        tracker.refuse("web-0", Some(REFUSED.into()));
        let actions = plan(std::slice::from_ref(&web), &[], &tracker, t(0), false);
        assert_eq!(moves(&actions), Vec::<String>::new());
        assert!(tracker.refuse("web-0", None), "cleared");
        assert!(!tracker.refuse("web-0", None), "nothing to clear");
        assert!(!tracker.refuse("other-0", None), "no record made for it");
        let actions = plan(&[web], &[], &tracker, t(1), false);
        assert_eq!(moves(&actions), ["create web-0"]);
        assert!(!tracker.gave_up("web-0"), "no give-up was recorded");
    }

    #[test]
    fn converging_twice_on_a_refused_task_changes_nothing() {
        let web = service("web-0");
        let mut tracker = RestartTracker::new();
        tracker.refuse("web-0", Some(REFUSED.into()));
        let first = plan(std::slice::from_ref(&web), &[], &tracker, t(0), false);
        for a in &first {
            tracker.apply(a, Ok(()), t(0));
        }
        let second = plan(&[web], &[], &tracker, t(60), false);
        assert_eq!(first, second);
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
                Action::Prepare { assignment } => observed.push(Observed {
                    created_at: Some(now),
                    ..container(
                        assignment,
                        &format!("new-{}", assignment.task),
                        ContainerState::Created,
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
    fn the_controllers_deadline_counts_from_the_firing_not_the_start() {
        let mut job = assignment("cron-0", Kind::CronJob, RestartPolicy::OnFailure);
        job.spec.timeout = Some(ApiDuration::from_secs(10));
        job.spec_hash = job.spec.hash();
        // Fired at t(0); its deadline is t(10) whenever it starts.
        job.deadline = Some(t(10));
        let tracker = RestartTracker::new();
        let one = |observed: &[Observed], now| {
            plan(std::slice::from_ref(&job), observed, &tracker, now, false)
        };

        // Not started yet: created, and woken at the deadline.
        let actions = one(&[], t(3));
        assert_eq!(moves(&actions), vec!["wait cron-0 10s", "create cron-0"]);

        // Not started by the deadline (its image would not pull, say): failed, and not
        // started late.
        for observed in [vec![], vec![container(&job, "c0", ContainerState::Created)]] {
            let actions = one(&observed, t(10));
            assert_eq!(moves(&actions), Vec::<String>::new(), "{observed:?}");
            let s = &reports(&actions)[0];
            assert_eq!(s.phase, TaskPhase::Failed);
            assert_eq!(
                s.message.as_deref(),
                Some("timed out: not started by its deadline 2027-01-15T08:00:10Z")
            );
            assert!(!s.gave_up, "retries, not the scheduler, decide");
        }

        // Started late at t(1): stopped at the firing's deadline, not at t(11).
        let running = container(&job, "c1", ContainerState::Running);
        assert_eq!(
            moves(&one(std::slice::from_ref(&running), t(5))),
            vec!["wait cron-0 10s"]
        );
        assert_eq!(
            moves(&one(std::slice::from_ref(&running), t(10))),
            vec!["stop c1"]
        );
        let stopped = exited(&job, "c1", 143, 1, 10);
        let s = &reports(&one(std::slice::from_ref(&stopped), t(10)))[0];
        assert_eq!(
            (s.phase, s.message.as_deref()),
            (TaskPhase::Failed, Some("timed out after 10s"))
        );
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
        // It ran 10 s, healthy by the back-off's measure: restarted at once.
        assert_eq!(moves(&actions), vec!["restart c1"]);
        let s = &reports(&actions)[0];
        assert_eq!(s.phase, TaskPhase::Starting);
        assert_eq!(s.reason, Some(Reason::Unhealthy));
        assert_eq!(
            s.message.as_deref(),
            Some(format!("{HUNG}; restarting").as_str())
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

    /// A CronJob run sent ahead of its slot at `t(10)`, and the slot.
    fn run_ahead() -> (Assignment, DateTime<Utc>) {
        let slot = t(10);
        let a = Assignment {
            not_before: Some(slot),
            ..assignment("run", Kind::CronJob, RestartPolicy::Never)
        };
        (a, slot)
    }

    #[test]
    fn a_run_sent_ahead_of_its_slot_is_created_at_once_and_started_at_the_slot_never_before() {
        let (a, slot) = run_ahead();
        let tracker = RestartTracker::new();
        let ms = chrono::Duration::milliseconds;
        let created = Observed {
            started_at: None,
            ..container(&a, "c1", ContainerState::Created)
        };
        let planned = |observed: &[Observed], now| {
            plan(std::slice::from_ref(&a), observed, &tracker, now, false)
        };

        // Seconds ahead, nothing there: created (not started), and a look again just
        // before the slot.
        let actions = planned(&[], t(5));
        assert_eq!(moves(&actions), ["wait run 9s", "prepare run"]);
        assert!(actions.contains(&Action::Wait {
            task: "run".into(),
            until: slot - PLANNED_AHEAD
        }));
        let status = &reports(&actions)[0];
        assert_eq!(status.phase, TaskPhase::Starting);
        assert_eq!(
            status.message.as_deref(),
            Some("waiting for its slot 2027-01-15T08:00:10.000Z")
        );

        // Created and still ahead: it waits, and says the same (no new report).
        let waiting = planned(std::slice::from_ref(&created), t(5) + ms(300));
        assert_eq!(moves(&waiting), ["wait run 9s"]);
        assert_eq!(
            reports(&waiting),
            reports(&actions)
                .iter()
                .map(|s| TaskStatus {
                    container_id: Some("c1".into()),
                    ..s.clone()
                })
                .collect::<Vec<_>>()
        );

        // Within PLANNED_AHEAD of the slot: a start that waits for the slot itself.
        for now in [slot - PLANNED_AHEAD, slot - ms(1)] {
            let actions = planned(std::slice::from_ref(&created), now);
            assert!(
                actions.contains(&Action::Start {
                    id: "c1".into(),
                    task: "run".into(),
                    at: Some(slot),
                    nano_cpus: None,
                }),
                "{now}: {actions:?}"
            );
        }
        // At or past the slot: started at once; nothing there yet: created and started.
        for now in [slot, slot + ms(400)] {
            let actions = planned(std::slice::from_ref(&created), now);
            assert!(actions.contains(&Action::Start {
                id: "c1".into(),
                task: "run".into(),
                at: None,
                nano_cpus: None,
            }));
            assert_eq!(moves(&planned(&[], now)), ["create run"]);
        }
        // A created container of an older spec is replaced by one made ahead too (the
        // round after it sees the new one created, and waits).
        let outdated = Observed {
            spec_hash: "old".into(),
            ..created.clone()
        };
        assert_eq!(
            moves(&planned(std::slice::from_ref(&outdated), t(5))),
            ["remove c1 Outdated", "prepare run"]
        );
        // A run that is going is a run like any other.
        let running = container(&a, "c1", ContainerState::Running);
        assert!(moves(&planned(std::slice::from_ref(&running), slot + ms(1))).is_empty());
    }

    #[test]
    fn a_run_started_ahead_through_the_gate_begins_at_its_slot() {
        let (a, slot) = run_ahead();
        let tracker = RestartTracker::new();
        let ms = chrono::Duration::milliseconds;
        // The container started 1.5 s ahead; the gate holds the command.
        let gated = Observed {
            started_at: Some(slot - ms(1500)),
            ..container(&a, "c1", ContainerState::Running)
        };
        let planned = |observed: &[Observed], now| {
            plan(std::slice::from_ref(&a), observed, &tracker, now, false)
        };
        for now in [slot - ms(1400), slot - ms(1)] {
            let actions = planned(std::slice::from_ref(&gated), now);
            // Not started again, not stopped: looked at again at the slot.
            assert_eq!(moves(&actions), ["wait run 10s"], "{now}");
            assert!(actions.contains(&Action::Wait {
                task: "run".into(),
                until: slot
            }));
            let status = &reports(&actions)[0];
            assert_eq!(status.phase, TaskPhase::Starting);
            assert_eq!(status.started_at, None);
            assert_eq!(
                status.message.as_deref(),
                Some("started ahead; its command runs at its slot 2027-01-15T08:00:10.000Z")
            );
        }
        // From the slot on it runs, and began at the slot, not at its container's start.
        let actions = planned(std::slice::from_ref(&gated), slot + ms(5));
        let status = &reports(&actions)[0];
        assert_eq!(status.phase, TaskPhase::Running);
        assert_eq!(status.started_at, Some(slot));
        // Finished: the same start time.
        let done = Observed {
            started_at: Some(slot - ms(1500)),
            finished_at: Some(slot + ms(40)),
            ..exited(&a, "c1", 0, 0, 0)
        };
        let actions = planned(std::slice::from_ref(&done), slot + ms(100));
        let status = &reports(&actions)[0];
        assert_eq!(status.phase, TaskPhase::Succeeded);
        assert_eq!(status.started_at, Some(slot));
        // A container started by Docker after the slot keeps its own start time.
        let late = Observed {
            started_at: Some(slot + ms(180)),
            ..container(&a, "c1", ContainerState::Running)
        };
        let status = &reports(&planned(std::slice::from_ref(&late), slot + ms(200)))[0];
        assert_eq!(status.started_at, Some(slot + ms(180)));
    }
}
