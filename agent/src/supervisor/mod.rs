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
//! # Layout
//! - `planner`: the pure decisions: [`plan`], [`RestartTracker`], [`Action`], back-off
//!   and give-up rules, [`observed_status`]. Sync; time is an argument.
//! - `shell`: the I/O around them: [`Supervisor`] (the converge loop: observe, plan,
//!   execute, report; probers; Docker events) and [`Observer`] (the Hello's task list).
//! - `sweeper`: the fence's side: stops the node's Wallets while it is fenced, and the
//!   gate that keeps a Wallet start from racing a fence.
//!
//! Imports go one way: `shell` uses `planner` and `sweeper`; those two use neither
//! `shell` nor each other. All three use [`Desired`] and [`RESYNC_INTERVAL`] from here.
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
//! - A task with a volume whose host path this node refuses (see [`crate::host_paths`])
//!   is never created, started or restarted here, and no directory is made for it: it is
//!   reported Failed with `gave_up` set and the refusal as its message (`hostPath "/" is
//!   refused: a system path; allowed: /var/lib/bramble/volumes`). Given up, because it
//!   can never start on this node while the node's rules stand, and another node's
//!   rules may allow it: the controller moves it there (a Job's or CronJob's run fails,
//!   and its retries decide), and comes back here only after its give-up back-off. The
//!   refusal is checked afresh every round, not remembered. A container already running
//!   it (adopted after the agent restarted with narrower rules) is left running, as
//!   adoption never kills; once it exits it is not restarted. An outdated one is
//!   removed, and not replaced.
//! - Phase Failed is only reported when the node is done with the task (gave up, or the
//!   policy says no restart). A crashed task awaiting its restart is reported Starting,
//!   with the exit code and a message, so the controller does not move it too early.
//! - A Job's or CronJob's run still going `spec.timeout` after its container started
//!   is stopped (SIGTERM, [`STOP_GRACE`], SIGKILL) and reported Failed with "timed out
//!   after T", without `gave_up` and never restarted here: a timed-out run is a failed
//!   attempt, and retrying it is the controller's decision. A run is judged by Docker's
//!   start and finish times, so an agent restarted mid-run judges it the same way.
//! - The final status of a Job's or CronJob's run (Succeeded or Failed) carries the last
//!   [`MAX_OUTPUT_BYTES`](bramble_api::task::MAX_OUTPUT_BYTES) of its output, once; the Hello carries it again for finished
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
//!   the node is stopped (SIGTERM, [`crate::fence::GRACE`], SIGKILL) and removed, and no
//!   Wallet is created, started or restarted; other containers are left alone. This holds even
//!   before the first task set: a sweeper independent of the converge loop does it, so a
//!   long image pull cannot delay it. A Wallet starts only under a gate the sweeper also
//!   holds, and only if neither a fence nor a newer task set arrived since the plan.

mod lanes;
mod planner;
mod shell;
mod sweeper;

use std::time::Duration;

use bramble_api::wire::Assignment;

pub use planner::{
    observed_status, plan, probe_targets, Action, RemoveReason, RestartTracker, FENCED_MESSAGE,
    HEALTHY_RUN_FACTOR,
};
pub use shell::{Observer, Supervisor, HELLO_OUTPUT_BUDGET, STOP_GRACE};

/// How often the supervisor looks at Docker even without any event (the converge loop
/// and the fence sweeper both).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

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
